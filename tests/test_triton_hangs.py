"""A Triton server that stops answering (SIGSTOP: it still accepts connections): coalesced calls end
within the client's timeout_s."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mlplat as mp
from mlplat.serving import TritonServer
from workers import in_threads


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hangs")
    with mp.Platform(root / "home") as p:
        with p.runs.start("double") as run:
            run.log_model(_Double(), "model", example_input=torch.zeros(2, 3))
        p.models.register("double", run.id)
        repo = root / "repo"
        p.serving.export_triton("double", version=1, repository=repo, max_batch_size=8,
                                dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=[8], max_queue_delay_us=500))
    return repo



@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_coalesced_calls_to_a_hung_server_end_within_timeout_s(repository, triton_python, protocol):
    """24 threads and 24 coroutines coalescing against a server that stopped answering, 2 batches in flight at
    most: each batch waited for a free in-flight slot without a deadline and then had a whole timeout_s of its
    own, so calls ended at 2-4x timeout_s; now every call ends within its timeout_s of being made, with an
    InferenceTimeoutError naming the model."""
    x = np.ones((1, 3), np.float32)
    timeout = 0.5
    with TritonServer(repository, python=triton_python) as server:
        url = server.grpc_url if protocol == "grpc" else server.http_url
        sync = mp.TritonClient(url, protocol=protocol, timeout_s=timeout, coalesce=True, max_in_flight=2)
        np.testing.assert_allclose(sync.infer("double", {"input__0": x})["output__0"], 2 * x)  # config read now
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            took: list[float] = []
            errors: list[BaseException] = []

            def call(i: int) -> None:
                t0 = time.monotonic()
                try:
                    sync.infer("double", {"input__0": x})
                except mp.ServingError as exc:
                    errors.append(exc)
                took.append(time.monotonic() - t0)

            in_threads(call, 24)

            async def main() -> None:
                async with mp.AsyncTritonClient(url, protocol=protocol, timeout_s=timeout, coalesce=True,
                                                max_in_flight=2) as c:
                    os.kill(server._proc.pid, signal.SIGCONT)
                    await c.infer("double", {"input__0": x})  # config read while the server answers
                    os.kill(server._proc.pid, signal.SIGSTOP)

                    async def one() -> None:
                        t0 = time.monotonic()
                        try:
                            await c.infer("double", {"input__0": x})
                        except mp.ServingError as exc:
                            errors.append(exc)
                        took.append(time.monotonic() - t0)

                    await asyncio.gather(*(one() for _ in range(24)))

            asyncio.run(main())
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
            sync.close()
    assert len(took) == 48 and len(errors) == 48, (len(took), errors[:3])
    assert all(isinstance(e, mp.InferenceTimeoutError) and "'double'" in str(e) for e in errors), errors
    assert max(took) < timeout + 0.35, sorted(took)[-5:]

