"""The Triton clients across lifecycle events, against a real server: a sync client used before fork() answers in
the child (over HTTP every call waited timeout_s for worker threads that only the parent had); close() lets the
requests in flight answer (closing the gRPC channel cancelled them: CancelledError in async tasks nobody
cancelled, a raw ValueError in threads, and now and then a crashed Triton server)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest
import torch

import mlplat as mp
from mlplat.serving import TritonServer


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, triton_python):
    root = tmp_path_factory.mktemp("lifecycle")
    with mp.Platform(root / "home") as p:
        with p.runs.start("double") as run:
            run.log_model(_Double(), "model", example_input=torch.zeros(2, 3))
        p.models.register("double", run.id)
        p.serving.export_triton("double", version=1, repository=root / "repo", max_batch_size=8)
        p.serving.export_triton("double", version=1, repository=root / "small", max_batch_size=4)
    with TritonServer(root / "repo", python=triton_python) as s:
        s.folders = {8: root / "repo" / "double", 4: root / "small" / "double"}  # the model with either config
        yield s


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_client_used_before_fork_answers_in_the_child(server, protocol):
    x = np.ones((2, 3), np.float32)
    client = mp.TritonClient(_url(server, protocol), protocol=protocol, timeout_s=2, max_in_flight=2)
    client.infer("double", {"input__0": np.ones((64, 3), np.float32)})  # 8 parts: both HTTP workers started
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's status says
        answered = 0
        for _ in range(10):
            try:
                answered += bool(np.array_equal(client.infer("double", {"input__0": x})["output__0"], 2 * x))
            except BaseException:  # noqa: BLE001 - counted as not answered
                pass
        os._exit(0 if answered == 10 else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0  # 1: calls failed after 2 s each
    np.testing.assert_array_equal(client.infer("double", {"input__0": x})["output__0"], 2 * x)  # the parent's too
    client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_close_lets_the_requests_in_flight_answer(server, protocol):
    async def main() -> list:
        client = mp.AsyncTritonClient(_url(server, protocol), protocol=protocol)
        await client.infer("double", {"input__0": np.ones((1, 3), np.float32)})  # config read
        calls = [asyncio.ensure_future(client.infer("double", {"input__0": np.full((1, 3), i, np.float32)}))
                 for i in range(100)]
        await asyncio.sleep(0)  # every call sent
        await client.close()
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(main())
    assert [type(a).__name__ for a in answers if not isinstance(a, dict)] == []  # CancelledError before
    assert [float(a["output__0"][0, 0]) for a in answers] == [2.0 * i for i in range(100)]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_two_async_closes_at_once_close_once(server, protocol):
    """The second close() went on after the first had cleared the connection: AttributeError on None.close()."""
    async def main() -> list:
        client = mp.AsyncTritonClient(_url(server, protocol), protocol=protocol, coalesce=True)
        await client.infer("double", {"input__0": np.ones((1, 3), np.float32)})
        calls = [asyncio.ensure_future(client.infer("double", {"input__0": np.ones((1, 3), np.float32)}))
                 for _ in range(3)]
        await asyncio.sleep(0)
        return await asyncio.gather(client.close(), client.close(), *calls, return_exceptions=True)

    answers = asyncio.run(main())
    assert answers[:2] == [None, None] and all(isinstance(a, dict) for a in answers[2:]), answers


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_async_close_cancelled_while_closing_leaves_a_client_that_works(server, protocol):
    """The connection stayed marked as being closed: every later close() returned at once and every call said
    'closed while this call was being made; call again', for good."""
    async def main() -> list:
        client = mp.AsyncTritonClient(_url(server, protocol), protocol=protocol)
        x = {"input__0": np.ones((1, 3), np.float32)}
        await client.infer("double", x)
        aio = client._aio
        real_close = aio.close

        async def slow_close():  # the connection closed, the close() not yet returned
            await real_close()
            await asyncio.sleep(0.5)
        aio.close = slow_close
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0.1)
        closing.cancel()  # as asyncio.wait_for or a TaskGroup would
        with pytest.raises(asyncio.CancelledError):
            await closing
        answers = [(await client.infer("double", x))["output__0"].tolist()]
        await client.close()
        assert client._aio is None  # closed, not left open by a close() that returned at once
        return answers

    assert asyncio.run(main()) == [[[2.0, 2.0, 2.0]]]


def test_grpc_calls_racing_another_thread_s_close_are_answered_and_the_server_lives(server):
    """close() waits for the calls in flight: closing the channel under them cancelled them (a raw ValueError
    for a call that found it closed) and crashed the bundled Triton server (SIGSEGV) in about 2 runs of 10."""
    client = mp.TritonClient(server.grpc_url)
    x = np.ones((1, 3), np.float32)
    stop, odd = False, []

    def call() -> None:
        while not stop:
            try:
                client.infer("double", {"input__0": x})
            except mp.ServingError:
                pass
            except Exception as exc:  # noqa: BLE001 - a raw ValueError: "Cannot invoke RPC on closed channel!"
                odd.append(repr(exc))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for _ in range(100):
        client.close()
        time.sleep(0.005)
    stop = True
    for t in threads:
        t.join()
    client.close()
    assert odd == [], odd[:3]
    assert server.running, server.log_tail(1500)
    np.testing.assert_array_equal(client.infer("double", {"input__0": x})["output__0"], 2 * x)
    client.close()


def test_inherited_connections_stay_with_the_parent(server):
    """The child drops (keeps referenced, never closes) what it inherited: the parent's client goes on working
    after the child exits."""
    client = mp.TritonClient(server.grpc_url)
    x = np.ones((1, 3), np.float32)
    client.infer("double", {"input__0": x})
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    np.testing.assert_array_equal(client.infer("double", {"input__0": x})["output__0"], 2 * x)
    client.close()



def test_a_model_reloaded_with_another_config_by_another_client_is_shaped_anew(server):
    """Client a read max_batch_size 8; another client reloaded the model with 4: every 8-row call of a was refused
    ('batch-size must be <= 4') for the rest of a's life. Now a reads the config again and splits."""
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    operator = mp.TritonClient(server.grpc_url)

    async def main() -> None:
        a_sync = {proto: mp.TritonClient(_url(server, proto), protocol=proto) for proto in ("grpc", "http")}
        async with mp.AsyncTritonClient(server.grpc_url) as a_async:
            for client in a_sync.values():
                np.testing.assert_array_equal(client.infer("double", {"input__0": x})["output__0"], 2 * x)
            np.testing.assert_array_equal((await a_async.infer("double", {"input__0": x}))["output__0"], 2 * x)
            operator.load_model("double", server.folders[4])  # max_batch_size 4 from now on
            for client in a_sync.values():
                np.testing.assert_array_equal(client.infer("double", {"input__0": x})["output__0"], 2 * x)
                assert client.info("double").max_batch_size == 4
            np.testing.assert_array_equal((await a_async.infer("double", {"input__0": x}))["output__0"], 2 * x)
            assert (await a_async.info("double")).max_batch_size == 4
        for client in a_sync.values():
            client.close()

    try:
        asyncio.run(main())
    finally:
        operator.load_model("double", server.folders[8])
        operator.close()


def test_a_script_that_never_closes_its_http_client_exits_cleanly(server):
    """The finalizer of a client dropped without close() ran at interpreter exit and closed the worker threads'
    gevent hubs during shutdown: with torch imported, a quarter to a half of such runs ended in SIGSEGV (exit
    status 139), so eight runs all fail to show it about one time in ten."""
    import subprocess
    import sys

    script = ("import numpy as np, mlplat as mp\n"
              "import torch\n"
              f"c = mp.TritonClient({server.http_url!r}, protocol='http')\n"  # 64 rows: 8 parts, 8 workers
              "print(c.infer('double', {'input__0': np.ones((64, 3), np.float32)})['output__0'].sum())\n")
    codes = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
             for _ in range(8)]
    assert [(r.returncode, r.stdout.strip()) for r in codes] == [(0, "384.0")] * 8, \
        [(r.returncode, r.stderr[-500:]) for r in codes]
