"""A coalesced batch that fails on one caller's rows: every other caller still gets its own answer (sync threads and
asyncio). The model stand-in below raises what the client raises for a model's own error on a request holding a
negative value; a server state (not ready) still reaches every caller of the batch."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import mlplat as mp
from mlplat.serving.client import _AsyncCoalescer, _Coalescer, _Handoff, _Patience
from mlplat.serving.shaping import ModelInfo

INFO = ModelInfo("double", (("x", "FP32", (1,)),), ("y",), 8, (4,), 0, (("FP32", (1,)),))


class _Model:
    """What the coalescers use of a client: the patience, the slots, and one request of merged rows."""

    def __init__(self, error: type[Exception] = mp.ServingError) -> None:
        self._max_in_flight = 2
        self.error = error
        self.requests: list[int] = []

    def _patience(self, info: ModelInfo) -> _Patience:
        return _Patience(0.5, adapts=False)  # long enough for the 4 callers to meet

    def _answer(self, arrays):
        self.requests.append(len(arrays["x"]))
        if (arrays["x"] < 0).any():
            raise self.error("model 'double': RuntimeError: index out of range")
        return {"y": arrays["x"] * 2}

    def _infer_once(self, info, arrays, outputs=None, priority=0, timeout_us=0, version=None, deadline=None):
        return self._answer(arrays)


class _AsyncModel(_Model):
    async def _infer_once(self, info, arrays, outputs=None, priority=0, timeout_us=0, version=None, deadline=None):
        return self._answer(arrays)


def _rows(value: float) -> dict[str, np.ndarray]:
    return {"x": np.array([[value]], dtype=np.float32)}


def _sent(mode: str, error: type[Exception], values: list[float]) -> tuple[list, list[int]]:
    """One merged batch of the callers' ``values`` sent as the coalescer sends it: (each caller's answer or
    error, the sizes of the requests made)."""
    model = _Model(error) if mode == "threads" else _AsyncModel(error)
    if mode == "threads":
        coalescer = _Coalescer(model, INFO, None)
        batch = [(_rows(v), 1, _Handoff(), time.monotonic() + 30) for v in values]
        coalescer._inside = len(batch)
        coalescer._send(batch)
        answers = []
        for _, _, handoff, _ in batch:
            try:
                answers.append(handoff.result()["y"].tolist())
            except mp.MlplatError as exc:
                answers.append(exc)
        return answers, model.requests

    async def main():
        coalescer = _AsyncCoalescer(model, INFO, None)
        loop = asyncio.get_running_loop()
        batch = [(_rows(v), 1, loop.create_future(), time.monotonic() + 30) for v in values]
        await coalescer._send(batch)
        return [b[2].exception() or b[2].result()["y"].tolist() for b in batch]
    return asyncio.run(main()), model.requests


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_one_callers_bad_rows_fail_only_that_caller(mode):
    out, requests = _sent(mode, mp.ServingError, [1.0, 2.0, -1.0, 4.0])
    assert [o if isinstance(o, list) else type(o) for o in out] == [[[2.0]], [[4.0]], mp.ServingError, [[8.0]]]
    assert "index out of range" in str(out[2])  # another caller's error reached them all before
    assert requests == [4, 1, 1, 1, 1]  # merged first; the failed batch went again caller by caller


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_a_server_state_reaches_every_caller_of_the_batch(mode):
    out, requests = _sent(mode, mp.ModelNotReadyError, [1.0, -2.0, 3.0, 4.0])
    assert all(isinstance(o, mp.ModelNotReadyError) for o in out)
    assert requests == [4]  # not sent again one by one: each would meet the same


class _Slow(_Model):
    """A client whose coalescing wait (3 s, as coalesce_wait_us=3_000_000) is longer than its timeout_s."""

    _timeout = 0.3
    url = "127.0.0.1:8001"

    def _patience(self, info: ModelInfo) -> _Patience:
        return _Patience(3.0, adapts=False)


class _AsyncSlow(_Slow, _AsyncModel):
    pass


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_a_coalesced_call_waits_at_most_half_its_timeout_and_an_expired_batch_is_not_sent(mode):
    """The wait for more callers ignored timeout_s: a call with timeout_s=1 ended after the 3 s wait, its batch
    then sent past its deadline (over HTTP the error blamed the connection pool). Now the batch goes after half
    the timeout, while it can still be answered, and one whose first caller's deadline has passed is not sent."""
    model = _Slow() if mode == "threads" else _AsyncSlow()
    started = time.monotonic()
    if mode == "threads":
        coalescer = _Coalescer(model, INFO, None)
        coalescer._expect = 2  # another caller is expected, and never comes
        answer = coalescer.submit(_rows(1.0))
        expired = [(_rows(2.0), 1, _Handoff(), time.monotonic() - 0.01)]
        coalescer._inside = 1
        coalescer._send(expired)
        with pytest.raises(mp.InferenceTimeoutError, match="deadline passed before the batch went"):
            expired[0][2].result()
    else:
        async def main():
            coalescer = _AsyncCoalescer(model, INFO, None)
            coalescer._expect = 2
            answer = await coalescer.submit(_rows(1.0))
            expired = [(_rows(2.0), 1, asyncio.get_running_loop().create_future(), time.monotonic() - 0.01)]
            await coalescer._send(expired)
            with pytest.raises(mp.InferenceTimeoutError, match="deadline passed before the batch went"):
                expired[0][2].result()
            return answer
        answer = asyncio.run(main())
    assert answer["y"].tolist() == [[2.0]] and time.monotonic() - started < 1.0
    assert model.requests == [1]  # the expired batch was not sent
