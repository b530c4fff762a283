"""``mp.TritonClient`` and ``mp.AsyncTritonClient``: Triton over gRPC or HTTP, shaped to each model.

Both read a model's config once and use its batching hints: a request
larger than ``max_batch_size`` is split and its outputs joined back in
order; with ``coalesce=True``, concurrent small requests are merged: a batch
goes as soon as every caller is in it (as many as were ever seen calling at
once), at the model's preferred size, or after ``coalesce_wait_us``, whichever
comes first, with up to ``max_in_flight`` batches outstanding. Without
``coalesce_wait_us`` the wait starts at the model's ``max_queue_delay_microseconds``
and adapts to how long the callers take to come back (up to ten times that).
Server errors become mlplat errors that say which:
:class:`~mlplat.errors.ModelNotReadyError`, :class:`~mlplat.errors.QueueFullError`,
:class:`~mlplat.errors.InferenceTimeoutError`, else :class:`~mlplat.errors.ServingError`.

Usage::

    client = mp.TritonClient("127.0.0.1:8001")            # gRPC; protocol="http" for port 8000
    out = client.infer("fraud", {"input__0": x})           # {"output__0": array}
    async with mp.AsyncTritonClient("127.0.0.1:8001", coalesce=True) as c:
        out = await c.infer("fraud", table)                # a pandas/Arrow table works too
"""
from __future__ import annotations

import asyncio
import functools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import plain, require_bool, require_number
from ..errors import ConfigError, InferenceTimeoutError, ModelNotReadyError, ServingError
from .shaping import (ModelInfo, check_model, check_outputs, check_request, empty_outputs, join, map_error, merge,
                      rows_of, split, to_arrays, unmerge)

__all__ = ["TritonClient", "AsyncTritonClient"]

#: gRPC statuses of a call that never reached the server or got no answer in time (not a refusal)
_UNREACHED = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


def _modules(protocol: str, asynchronous: bool):
    if protocol not in ("grpc", "http"):
        raise ConfigError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    try:
        if protocol == "grpc":
            import tritonclient.grpc as base
            import tritonclient.grpc.aio as aio
        else:
            import tritonclient.http as base
            import tritonclient.http.aio as aio
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise ConfigError(f"the Triton client needs tritonclient: pip install 'mlplat[triton]' ({exc})") from None
    # gRPC reports every failure as an InferenceServerException; tritonclient's HTTP clients let the socket's
    # errors through (refused, reset, timed out: OSError), the asyncio one aiohttp's too
    # (and geventhttpclient's, for a peer that closes the connection or does not answer HTTP), and rapidjson's
    # for an answer that is not JSON
    errors: tuple[type[BaseException], ...] = (InferenceServerException,)
    if protocol == "http":
        import http.client

        import rapidjson

        errors += (OSError, rapidjson.JSONDecodeError)
        if asynchronous:
            import aiohttp

            errors += (aiohttp.ClientError,)
        else:
            errors += (http.client.HTTPException,)  # geventhttpclient's HTTPParseError, HTTPConnectionClosed
    return (aio if asynchronous else base), base, errors


def _grpc_channel_args() -> list[tuple[str, int]]:
    """tritonclient's gRPC channel options, and reconnect back-off capped at 1 s.

    gRPC's default back-off grows to minutes: after a server restart a client kept failing fast
    (UNAVAILABLE) for about 10 s after the server was ready again. With these, it reconnects within a second.
    (Not ``grpc.min_reconnect_backoff_ms``: it is also each connection attempt's time-out, 20 s by default;
    at 100 ms no server 100 ms away (another region) could be reached.)
    """
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keep = KeepAliveOptions()
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


_INT64 = {3, 4, 6, 16, 18}  # FieldDescriptor.TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64


def _numbers_of(answer: Mapping, message: Any) -> dict[str, Any]:
    """A protobuf message's JSON (``answer``) with its 64-bit integer fields as ints, as ``message``
    (the protobuf class) declares them; map keys stay strings, as JSON has them."""
    def walk(value: Any, desc: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        out = dict(value)
        for name, v in value.items():
            field = desc.fields_by_name.get(name)
            if field is None:
                continue
            if field.message_type is not None:
                entry = field.message_type
                if entry.GetOptions().map_entry:
                    val = entry.fields_by_name["value"]
                    out[name] = {k: walk(x, val.message_type) if val.message_type else
                                 (int(x) if val.type in _INT64 else x) for k, x in v.items()}
                else:
                    out[name] = [walk(x, entry) for x in v] if isinstance(v, list) else walk(v, entry)
            elif field.type in _INT64:
                out[name] = [int(x) for x in v] if isinstance(v, list) else int(v)
        return out

    return walk(answer, message.DESCRIPTOR)


def _check_http_url(url: str) -> None:
    """An HTTP client's ``host:port`` (tritonclient's would fail only on the first call, with a ValueError); an
    IPv6 host in brackets (``[::1]:8000``: unbracketed, its last colon was read as the port's)."""
    host, _, port = url.rpartition(":")
    bare_v6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not host or bare_v6 or "/" in url or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"the Triton HTTP url must be host:port (e.g. 127.0.0.1:8000 or [::1]:8000, no scheme), "
                          f"got {url!r}")


def _inputs(mod, info: ModelInfo, arrays: dict[str, np.ndarray]) -> list:
    out = []
    for name, dtype, _ in info.inputs:
        arr = arrays[name]
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _upload(folder: Path, model: str) -> dict[str, Any]:
    """A model folder as Triton's load-with-override arguments: the config as JSON (named ``model``, which
    the server requires of it: "failed to poll from model repository" otherwise), every file by path."""
    config = folder / "config.pbtxt"
    if not config.is_file():
        raise ConfigError(f"{folder} is not a Triton model folder: it has no config.pbtxt")
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigError(f"sending a model to Triton needs tritonclient[grpc]: pip install 'mlplat[triton]' "
                          f"({exc})") from None
    try:
        parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config} is not a Triton model config this client can read ({type(exc).__name__}: "
                          f"{exc}); export it again with p.serving.export_triton") from None
    parsed.name = model  # the folder may be loaded under another name than its config's
    files = {f"file:{f.relative_to(folder).as_posix()}": f.read_bytes()
             for f in sorted(folder.rglob("*")) if f.is_file() and f != config}
    return {"config": json_format.MessageToJson(parsed), "files": files}


class _Base:
    def __init__(self, url: str, protocol: str, timeout_s: float, coalesce: bool, coalesce_wait_us: int | None,
                 max_in_flight: int, asynchronous: bool) -> None:
        timeout_s, coalesce, coalesce_wait_us, max_in_flight = map(
            plain, (timeout_s, coalesce, coalesce_wait_us, max_in_flight))  # np.int64(8) too
        require_number("timeout_s", timeout_s, low=1e-6, high=10**7, meaning="seconds, a number > 0")
        require_bool("coalesce", coalesce)
        if coalesce_wait_us is not None:
            require_number("coalesce_wait_us", coalesce_wait_us, low=0, high=10**9, integer=True,
                           meaning="microseconds a coalesced batch waits, an integer >= 0 (None: adapt)")
        require_number("max_in_flight", max_in_flight, low=1, high=10**6, integer=True,
                       meaning="requests in flight at once, an integer >= 1")
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"the Triton url must be a string host:port (e.g. 127.0.0.1:8001), got "
                              f"{type(url).__name__} {url!r:.100}")
        self.url = url
        self.protocol = protocol
        self._mod, self._types, self._exc = _modules(protocol, asynchronous)
        if protocol == "http":
            _check_http_url(url)
        self._timeout = timeout_s
        self._coalesce = coalesce
        self._wait_us = coalesce_wait_us
        self._max_in_flight = max_in_flight
        self._infos: dict[str, ModelInfo] = {}
        # gRPC answers are Triton's protobuf messages, or an error; over HTTP any server answers 200 to a load
        # or a health check (all Triton sends too), so the server's metadata is checked once first
        self._triton = protocol == "grpc"

    def _error(self, exc: Exception, model: str) -> ServingError:
        return map_error(exc, model, self.url)

    def _not_triton(self, what: str, answer: object) -> ServingError:
        shown = repr(answer) if not isinstance(answer, BaseException) else f"{type(answer).__name__}: {answer}"
        shown = shown if len(shown) <= 200 else f"{shown[:200]}..."
        return ServingError(f"{self.url} is not a Triton server: it answered {what} with {shown}, not as Triton "
                            f"does; is that the Triton server's {self.protocol.upper()} port (Triton's defaults: "
                            "HTTP 8000, gRPC 8001)?")

    def _answer(self, answer: Any, what: str, message: str = "") -> dict[str, Any]:
        """A metadata or config answer as a dict, or ServingError: Triton's always is an object with a name.
        ``message``: the gRPC answer's protobuf type, whose 64-bit integers its JSON writes as strings (dims
        ['-1', '2'] over gRPC, [-1, 2] over HTTP): made numbers, as HTTP gives them."""
        if not isinstance(answer, Mapping) or not isinstance(answer.get("name"), str):
            raise self._not_triton(what, answer)
        if message and self.protocol == "grpc":
            from tritonclient.grpc import model_config_pb2, service_pb2

            return _numbers_of(answer, getattr(service_pb2, message, None) or getattr(model_config_pb2, message))
        return dict(answer)

    def _server_checked(self, meta: Any) -> None:
        """Remember that the server is Triton, or raise ServingError: its metadata names it and its version."""
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or "version" not in meta:
            raise self._not_triton("a request for its metadata (GET /v2)", meta)
        self._triton = True

    def _server_error(self, exc: Exception, model: str) -> ServingError:
        """A failed server-metadata request: the server cannot be reached (or took too long), or it is not
        Triton (Triton answers that request whatever its models)."""
        mapped = self._error(exc, model)
        if isinstance(exc, self._exc[0]):  # an HTTP error status: 5xx from a proxy whose Triton is away
            if str(exc.status()).startswith("5"):
                return ModelNotReadyError(f"the Triton server at {self.url} is not ready: its metadata request "
                                          f"(GET /v2) failed ({exc})")
        elif isinstance(mapped, (ModelNotReadyError, InferenceTimeoutError)):  # not reached, or no answer
            return mapped
        return self._not_triton("a request for its metadata (GET /v2)", exc)

    def _config_info(self, config: dict[str, Any]) -> ModelInfo:
        try:
            return ModelInfo.from_config(config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._not_triton(f"a request for a model config ({type(exc).__name__}: {exc})", config) from None

    def _outputs_of(self, result: Any, names: list[str] | tuple[str, ...], model: str) -> dict[str, np.ndarray]:
        """The outputs ``names`` of an inference answer, or ServingError for an answer without one of them."""
        try:
            out = {n: result.as_numpy(n) for n in names}
        except (KeyError, TypeError, AttributeError) as exc:  # JSON of another shape than Triton's
            raise self._not_triton(f"an inference request for model {model!r}", exc) from None
        missing = [n for n, v in out.items() if v is None]
        if missing:
            raise self._not_triton(f"an inference request for model {model!r} (no output {missing[0]!r})",
                                   result.get_response() if hasattr(result, "get_response") else result)
        # tritonclient's arrays are read-only views of the answer's bytes; the local backend's (and a split
        # request's, joined) are the caller's own: the same whatever answered, and however many rows
        return {n: v if v.flags.writeable else v.copy() for n, v in out.items()}

    def _call_kwargs(self, as_json: bool = False, deadline: float | None = None) -> dict[str, Any]:
        """A gRPC call's time-out (timeout_s, or what is left until ``deadline``, a time.monotonic(); the HTTP
        clients carry theirs), and JSON rather than protobuf answers."""
        if self.protocol != "grpc":
            return {}
        left = self._timeout if deadline is None else max(0.001, deadline - time.monotonic())
        return {"client_timeout": left, **({"as_json": True} if as_json else {})}

    def _control_error(self, exc: Exception, what: str, model: str) -> ServingError:
        if isinstance(exc, self._exc[0]) and str(exc.status()) not in _UNREACHED:  # the server refused
            return ServingError(f"the Triton server at {self.url} could not {what} {model!r}: {exc.message()}")
        return self._error(exc, model)  # not reached, or no answer in time

    def _patience(self, info: ModelInfo) -> _Patience:
        if self._wait_us is not None:
            return _Patience(self._wait_us / 1e6, adapts=False)
        return _Patience((info.max_queue_delay_us or 500) / 1e6, adapts=True)

    def _request_kwargs(self, priority: int, timeout_us: int, version: int | None = None,
                        deadline: float | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"priority": priority, "model_version": "" if version is None else str(version)}
        if timeout_us:
            kwargs["timeout"] = timeout_us
        return {**kwargs, **self._call_kwargs(deadline=deadline)}

    def _coalesces(self, info: ModelInfo, arrays, outputs, priority: int, timeout_us: int) -> bool:
        """Small plain requests merge (with per-request outputs, priorities or time-outs they go alone)."""
        return (self._coalesce and info.max_batch_size > 0 and not (outputs or priority or timeout_us)
                and rows_of(info, arrays) < info.target_batch)

    def _outputs(self, info: ModelInfo, outputs) -> list:
        return [self._types.InferRequestedOutput(n) for n in (outputs or info.outputs)]


class _HttpWorkers:
    """The sync HTTP client's threads: at most ``size``, each with the one tritonclient HTTP client it uses.

    tritonclient's HTTP client runs on gevent, whose hub (and its pipes) belongs to the thread that used it:
    a client per calling thread kept a connection and a hub for every thread that ever called (a web server's
    request threads, short-lived ones included) until the process ran out of file descriptors. Every HTTP
    call runs here instead, so the connections are bounded, and :meth:`close` closes each client and its hub
    in its own thread. A call made on one of these threads (a split request's part) runs there directly.

    A call's ``timeout_s`` counts from when it is made, the wait for a free worker included: a call still
    queued at its deadline is not sent, and :meth:`call` gives up at the deadline (it waited 2, 4, 6 and
    8 s for a 2 s time-out when 32 threads called a hung server through 8 workers).
    """

    def __init__(self, connect: Callable[[], Any], size: int, timeout_s: float, url: str) -> None:
        self._connect = connect
        self._size = size
        self._timeout = timeout_s
        self._url = url
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._mine = threading.local()

    def call(self, fn: Callable[..., Any], *args: Any, model: str | None = None,
             deadline: float | None = None) -> Any:
        """``fn(client, *args)`` on a worker thread, waited for; its exception is raised here (``model``: the
        model it is about, for the error of a call with no answer in time; ``deadline``: the time.monotonic()
        by which the call ends, by default timeout_s from now)."""
        client = getattr(self._mine, "client", None)
        if client is not None:  # already on a worker (a split request's part): no second hop
            return fn(client, *args)
        done = _Handoff()
        started: list[float] = []
        settle = lambda value=None, error=None: done.set((value,), error)  # (value,): None is a value too
        deadline = time.monotonic() + self._timeout if deadline is None else deadline
        self._put((fn, args, settle, started, model), deadline)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise self._late(started, model)
        return done.result()[0]

    def _late(self, started: list[float], model: str | None) -> InferenceTimeoutError:
        """The error of a call that had no answer ``timeout_s`` after it was made."""
        why = ("the server did not answer in time" if started else
               f"none of the client's {self._size} HTTP connections came free in time (raise max_in_flight)")
        where = f"model {model!r} at {self._url}" if model else f"the Triton server at {self._url}"
        return InferenceTimeoutError(f"{where}: no answer within timeout_s={self._timeout:g} s: {why}")

    def submit(self, fn: Callable[..., Any], *args: Any, model: str | None = None) -> Future:
        """``fn(client, *args)`` on a worker thread, not waited for."""
        fut: Future = Future()

        def settle(value: Any = None, error: BaseException | None = None) -> None:
            fut.set_result(value) if error is None else fut.set_exception(error)

        self._put((fn, args, settle, [], model), time.monotonic() + self._timeout)
        return fut

    def _put(self, job: tuple, deadline: float) -> None:
        with self._lock:
            if self._closed:
                raise _closed_meanwhile()
            self._jobs.put((*job, deadline))
            if self._idle.acquire(blocking=False):  # a worker is waiting for it
                return
            if len(self._threads) < self._size:
                t = threading.Thread(target=self._work, name=f"mlplat-triton-http-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()

    def _work(self) -> None:
        try:
            client = self._mine.client = self._connect()
        except Exception as exc:  # noqa: BLE001 - no connection for this worker: its callers get why, not a wait
            with self._lock:
                if threading.current_thread() in self._threads:
                    self._threads.remove(threading.current_thread())  # a later call starts another
                jobs = []
                while True:
                    try:
                        jobs.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
            for job in jobs:
                if job is None:
                    self._jobs.put(None)  # close()'s, for a worker that has a connection
                else:
                    job[2](error=ServingError(f"cannot open an HTTP connection to {self._url}: "
                                              f"{type(exc).__name__}: {exc}"))
            return
        try:
            while (job := self._jobs.get()) is not None:
                fn, args, settle, started, model, deadline = job
                if time.monotonic() >= deadline:  # its caller gave up (or will now): not sent
                    settle(error=self._late(started, model))
                else:
                    started.append(time.monotonic())
                    try:
                        value = fn(client, *args)
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised in its thread
                        settle(error=exc)
                    else:
                        settle(value)
                del job, fn, args, settle, started
                self._idle.release()
        finally:
            _close_in_thread(client)

    def close(self, wait: bool = True) -> None:
        """Let the jobs queued finish, then close every worker's client and gevent hub, and end the threads."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
            for _ in threads:
                self._jobs.put(None)
        for t in threads if wait else ():
            if t is not threading.current_thread():
                t.join()


#: the sync clients alive, so that a forked child gives each connections of its own
_CLIENTS: weakref.WeakSet = weakref.WeakSet()
#: what forked children inherited from their parent's clients: kept referenced, never used or closed there
_INHERITED: list[Any] = []


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cancelling() -> bool:
    """Whether the running task was asked to cancel (Python 3.11+; before that, taken as not)."""
    task = asyncio.current_task()
    return task is not None and bool(getattr(task, "cancelling", lambda: 0)())


#: what Triton says of a request that does not fit the model's config (its batch size, an input's shape or name)
_DOES_NOT_FIT = ("batch-size must be <=", "unexpected shape for input", "unexpected inference input")


def _config_refused(exc: ServingError) -> bool:
    """Whether the server refused a request for not fitting the model's config: shaped by a config the model
    may no longer have (reloaded by another client or process), it is worth the config read again."""
    return type(exc) is ServingError and any(text in str(exc) for text in _DOES_NOT_FIT)


def _closed_meanwhile() -> ServingError:
    return ServingError("the Triton client was closed while this call was being made; call again")


def _closed_channel(exc: ValueError) -> bool:
    """Whether grpc refused a call because its channel was closed (another thread's ``close()``)."""
    return "closed" in str(exc).lower() and "channel" in str(exc).lower()


def _close_in_thread(client: Any) -> None:
    """Close a tritonclient HTTP client and the gevent hub of this thread (its loop's pipes)."""
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing what is already broken
        pass
    from gevent._hub_local import get_hub_if_exists

    hub = get_hub_if_exists()
    if hub is not None:
        hub.destroy(destroy_loop=True)


class TritonClient(_Base):
    """A synchronous Triton client (thread-safe), shaping requests to each model's batching hints.

    Over HTTP every call runs on one of ``max_in_flight`` threads of the client, each with its own connection
    (tritonclient's HTTP client is bound to its thread), so any number of calling threads share that many.
    """

    def __init__(self, url: str, *, protocol: str = "grpc", timeout_s: float = 30.0, coalesce: bool = False,
                 coalesce_wait_us: int | None = None, max_in_flight: int = 8) -> None:
        super().__init__(url, protocol, timeout_s, coalesce, coalesce_wait_us, max_in_flight, asynchronous=False)
        self._grpc: Any = None  # gRPC: made on first use, again after close()
        self._grpc_calls: dict[Any, int] = {}  # gRPC clients with calls in flight: close() waits for them
        self._coalescers: dict[tuple, _Coalescer] = {}
        self._lock = threading.Condition()
        self._http: _HttpWorkers | None = None  # made on first use, again after close()
        _CLIENTS.add(self)

    def _forked(self) -> None:
        """In a forked child (a pre-fork server's worker): connections, worker threads and coalescers of its own.

        The parent's HTTP worker threads do not exist in the child, but their idle count did: each call waited
        for one of them until timeout_s ('none of the client's 8 HTTP connections came free'), and a gRPC
        channel used across a fork failed its first call. What the parent made is kept referenced, never used
        or closed here (closing it could touch the parent's connections)."""
        _INHERITED.extend(x for x in (self._grpc, self._http) if x is not None)
        self._grpc, self._http, self._coalescers, self._grpc_calls = None, None, {}, {}
        self._lock = threading.Condition()

    def _run(self, fn: Callable[..., Any], *args: Any, model: str | None = None, deadline: float | None = None) -> Any:
        """``fn(client, *args)`` with the gRPC client, or on an HTTP worker thread with its client (ending by
        ``deadline``, a time.monotonic(); gRPC calls carry theirs in their arguments)."""
        if self.protocol == "grpc":
            client = self._grpc_take()
            try:
                return fn(client, *args)
            except ValueError as exc:  # grpc's "Cannot invoke RPC on closed channel!" escaped raw
                if _closed_channel(exc):
                    raise _closed_meanwhile() from None
                raise
            finally:
                self._grpc_done(client)
        return self._http_workers().call(fn, *args, model=model, deadline=deadline)

    def _grpc_take(self) -> Any:
        """The gRPC client (made on first use), counted as in use until :meth:`_grpc_done`."""
        with self._lock:
            client = self._grpc
            if client is None:
                client = self._grpc = self._mod.InferenceServerClient(self.url, channel_args=_grpc_channel_args())
            self._grpc_calls[client] = self._grpc_calls.get(client, 0) + 1
        return client

    def _grpc_done(self, client: Any) -> None:
        with self._lock:
            left = self._grpc_calls.pop(client) - 1
            if left:
                self._grpc_calls[client] = left
            else:
                self._lock.notify_all()

    def _http_workers(self) -> _HttpWorkers:
        workers = self._http
        if workers is None:
            with self._lock:
                if self._http is None:
                    connect = functools.partial(self._mod.InferenceServerClient, self.url,
                                                connection_timeout=self._timeout, network_timeout=self._timeout)
                    self._http = _HttpWorkers(connect, self._max_in_flight, self._timeout, self.url)
                    # a client dropped without close(); not at exit: the daemon workers then end with the process,
                    # and closing their gevent hubs during interpreter shutdown crashed it (SIGSEGV)
                    weakref.finalize(self, self._http.close, wait=False).atexit = False
                workers = self._http
        return workers

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """tritonclient's ``method`` (a health, metadata or model-control call)."""
        return self._run(lambda client: getattr(client, method)(*args, **kwargs), model=args[0] if args else None)

    def _check_server(self, model: str = "") -> None:
        """ServingError unless the server is Triton (over HTTP its metadata is read once per client)."""
        if self._triton:
            return
        kwargs = self._call_kwargs(as_json=True)
        try:  # a time-out names the model the check was made for
            meta = self._run(lambda client: client.get_server_metadata(**kwargs), model=model or None)
        except self._exc as exc:
            raise self._server_error(exc, model) from None
        self._server_checked(meta)

    def _health(self, method: str, *args: Any) -> bool:
        """A health answer (200 or not, over HTTP), once the server is known to be Triton."""
        try:
            if not self._call(method, *args, **self._call_kwargs()):
                return False
        except Exception:  # noqa: BLE001 - unreachable means not live
            return False
        try:
            self._check_server(*args)  # ServingError for a server that is not Triton: its 200 says nothing
        except (ModelNotReadyError, InferenceTimeoutError):  # gone meanwhile
            return False
        return True

    def is_live(self) -> bool:
        """Whether the server answers (its liveness); ServingError if the server there is not Triton."""
        return self._health("is_server_live")

    def is_ready(self) -> bool:
        """Whether the server is ready to take requests; ServingError if the server there is not Triton."""
        return self._health("is_server_ready")

    def is_model_ready(self, model: str) -> bool:
        """Whether ``model`` is loaded and ready to infer; ServingError if the server there is not Triton."""
        return self._health("is_model_ready", check_model(model))

    def metadata(self, model: str) -> dict[str, Any]:
        """The model's metadata (versions, inputs and outputs with types and shapes)."""
        check_model(model)
        try:
            meta = self._call("get_model_metadata", model, **self._call_kwargs(as_json=True))
        except self._exc as exc:
            raise self._error(exc, model) from None
        return self._answer(meta, f"a request for the metadata of model {model!r}", "ModelMetadataResponse")

    def config(self, model: str) -> dict[str, Any]:
        """The model's config as the server reports it (a dict of Triton's ModelConfig)."""
        check_model(model)
        try:
            cfg = self._call("get_model_config", model, **self._call_kwargs(as_json=True))
        except self._exc as exc:
            raise self._error(exc, model) from None
        cfg = cfg.get("config", cfg) if isinstance(cfg, Mapping) else cfg  # gRPC wraps it, HTTP does not
        return self._answer(cfg, f"a request for the config of model {model!r}", "ModelConfig")

    def load_model(self, model: str, folder: str | os.PathLike | None = None) -> None:
        """Ask a server in explicit model-control mode to (re)load ``model``.

        Without ``folder`` the server loads it from its own repository. With ``folder`` (a model
        folder written by ``p.serving.export_triton``: ``config.pbtxt`` and version folders) the
        config and files are sent with the request, so the server needs no access to this machine's
        disk: a Triton server anywhere can serve a model exported here.

        Usage::

            export = p.serving.export_triton("fraud", repository="triton-repo")
            client.load_model("fraud", export.model_dir)
        """
        check_model(model)
        kwargs = _upload(Path(folder), model) if folder is not None else {}
        self._check_server(model)  # Triton answers a load with 200 and nothing else: so would any web server
        try:
            self._call("load_model", model, **kwargs, **self._call_kwargs())
        except self._exc as exc:
            raise self._control_error(exc, "load", model) from None
        self._infos.pop(model, None)

    def unload_model(self, model: str) -> None:
        """Unload ``model`` (explicit model-control mode)."""
        check_model(model)
        self._check_server(model)
        try:
            self._call("unload_model", model, **self._call_kwargs())
        except self._exc as exc:
            raise self._control_error(exc, "unload", model) from None
        self._infos.pop(model, None)

    def info(self, model: str) -> ModelInfo:
        """The model's inputs, outputs and batching hints (read once, then cached)."""
        info = self._infos.get(model) if isinstance(model, str) else check_model(model)
        if info is None:
            info = self._infos[model] = self._config_info(self.config(model))
        return info

    def infer(self, model: str, inputs: Any, *, version: int | None = None, outputs: list[str] | None = None,
              priority: int = 0, timeout_us: int = 0) -> dict[str, np.ndarray]:
        """Run the model (``version``: a registered version it serves; default: the newest) on ``inputs``
        (dict of arrays, pandas or Arrow table); returns its outputs by name. A request of no rows is answered
        here, with no rows of each output, as the local backend answers it. A request the server refuses for
        not fitting the model's config, because the model was reloaded with another one since this client read
        it (by another client or process: a smaller max_batch_size), is shaped by the config read again and
        sent once more."""
        priority, timeout_us, version, outputs = check_request(priority, timeout_us, version, outputs)
        info = self.info(model)
        try:
            return self._shaped(info, inputs, version, outputs, priority, timeout_us)
        except ServingError as exc:
            if not _config_refused(exc):
                raise
            self._infos.pop(model, None)
            fresh = self.info(model)
            if fresh == info:
                raise
        return self._shaped(fresh, inputs, version, outputs, priority, timeout_us)

    def _shaped(self, info: ModelInfo, inputs: Any, version: int | None, outputs: list[str] | None, priority: int,
                timeout_us: int) -> dict[str, np.ndarray]:
        """The request shaped by ``info`` (split, merged or sent as it is) and its answer."""
        model = info.name
        check_outputs(info, outputs)
        arrays = to_arrays(info, inputs)
        if not rows_of(info, arrays):
            return empty_outputs(info, outputs)
        if self._coalesces(info, arrays, outputs, priority, timeout_us):
            return self._coalescer(info, version).submit(arrays)
        parts = split(info, arrays)
        if len(parts) == 1:
            return self._infer_once(info, parts[0], outputs, priority, timeout_us, version)
        deadline = time.monotonic() + self._timeout
        futures = [self._infer_async(info, p, outputs, priority, timeout_us, version) for p in parts]
        try:
            return join([f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures])
        except FutureTimeout:  # parts waiting for a free HTTP connection, or a server that does not answer
            raise InferenceTimeoutError(f"model {model!r} at {self.url}: no answer to all {len(parts)} parts of a "
                                        f"{rows_of(info, arrays)}-row request within timeout_s={self._timeout:g} "
                                        "s") from None

    def _infer_once(self, info: ModelInfo, arrays, outputs, priority: int, timeout_us: int,
                    version: int | None = None, deadline: float | None = None) -> dict[str, np.ndarray]:
        """One request; it ends by ``deadline`` (a time.monotonic(); by default timeout_s from now)."""
        kwargs = self._request_kwargs(priority, timeout_us, version, deadline)
        return self._run(self._infer_with, info, arrays, outputs, kwargs, model=info.name, deadline=deadline)

    def _infer_with(self, client: Any, info: ModelInfo, arrays, outputs,
                    kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        """One request sent with ``client`` (the gRPC client, or this HTTP worker's), its outputs by name."""
        try:
            result = client.infer(info.name, _inputs(self._mod, info, arrays), outputs=self._outputs(info, outputs),
                                  **kwargs)
        except self._exc as exc:
            raise self._error(exc, info.name) from None
        return self._outputs_of(result, outputs or info.outputs, info.name)

    def _infer_async(self, info: ModelInfo, arrays, outputs=None, priority: int = 0,
                     timeout_us: int = 0, version: int | None = None) -> Future:
        """One request in flight; gRPC sends without blocking, HTTP runs on a worker thread."""
        kwargs = self._request_kwargs(priority, timeout_us, version)
        if self.protocol != "grpc":  # tritonclient.http.async_infer sleeps 10 ms per call: a worker thread instead
            return self._http_workers().submit(self._infer_with, info, arrays, outputs, kwargs, model=info.name)
        fut: Future = Future()
        names = outputs or info.outputs

        def done(result=None, error=None) -> None:
            if error is not None:
                fut.set_exception(self._error(error, info.name))
                return
            try:
                fut.set_result(self._outputs_of(result, names, info.name))
            except ServingError as exc:
                fut.set_exception(exc)

        client = self._grpc_take()

        def answered(result=None, error=None) -> None:
            self._grpc_done(client)
            done(result, error)

        try:
            client.async_infer(info.name, _inputs(self._mod, info, arrays), answered,
                               outputs=self._outputs(info, outputs), **kwargs)
        except ValueError as exc:
            self._grpc_done(client)
            if not _closed_channel(exc):
                raise
            fut.set_exception(_closed_meanwhile())
        except BaseException:
            self._grpc_done(client)
            raise
        return fut

    def _coalescer(self, info: ModelInfo, version: int | None) -> _Coalescer:
        key = (info.name, version)
        c = self._coalescers.get(key)
        if c is None or c.info is not info:  # new, or the model was reloaded (its config read again)
            with self._lock:
                c = self._coalescers.get(key)
                if c is None or c.info is not info:  # callers inside an old one finish there
                    c = self._coalescers[key] = _Coalescer(self, info, version)
        return c

    def close(self) -> None:
        """Close the connections (pending coalesced requests are sent by their callers first); a later call
        opens them again. Calls in flight finish first (each within its timeout_s): cancelling gRPC calls in
        flight by closing their channel failed them, and crashed the bundled Triton 2.51 server (SIGSEGV) in
        about 2 of 10 runs of 6 threads calling while another closed the client every 5 ms."""
        # coalescers run nothing in the background: requests still pending are sent by their callers
        with self._lock:
            workers, self._http = self._http, None
            grpc_client, self._grpc = self._grpc, None
            if grpc_client is not None:  # new calls open a new channel meanwhile
                self._lock.wait_for(lambda: grpc_client not in self._grpc_calls, timeout=self._timeout)
        if workers is not None:
            workers.close()
        if grpc_client is not None:
            grpc_client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Gathering:
    """The pending batch of a coalescer (threads or coroutines) and when it is complete.

    A batch is complete when it holds as many requests as there are callers (the most seen inside
    ``submit`` at once), or the model's preferred rows; a request with no room left, or (for a model with
    a dimension of any size) with other dimensions than the batch's, sends the batch before it. When a
    batch's wait runs out it goes with what it has, and the coalescer expects fewer.
    """

    def __init__(self, client: _Base, info: ModelInfo, version: int | None) -> None:
        self._client = client
        self.info = info
        self._version = version
        self._patience = client._patience(info)
        self._target = min(info.target_batch, info.max_batch_size)
        self._pending: list = []
        self._first_at = 0.0  # when the pending batch's first request came
        self._rows = 0
        self._varies = any(-1 in dims for _, _, dims in info.inputs)  # requests may differ beyond the batch
        self._shape: tuple = ()  # the pending batch's dimensions besides the batch (where they may differ)
        self._inside = 0  # callers inside submit (the caller's own count is added before _gather)
        self._expect = 1

    def _wait(self) -> float:
        """How long a batch waits for more callers: its patience, at most half the client's timeout_s, so that it
        goes while its callers can still be answered in time."""
        return min(self._patience.seconds, self._client._timeout / 2)

    def _late(self, *, unsent: bool = False) -> InferenceTimeoutError:
        """The error of callers whose batch found every in-flight slot taken until the first one's deadline, or
        (``unsent``) whose first caller's deadline passed before the batch went."""
        c = self._client
        why = ("its batch's first caller's deadline passed before the batch went; is the server overloaded or "
               "hung?" if unsent else
               f"the client's {c._max_in_flight} coalesced requests in flight (max_in_flight) took all that time; is "
               "the server overloaded or hung?")
        return InferenceTimeoutError(f"model {self.info.name!r} at {c.url}: no answer within timeout_s={c._timeout:g} "
                                     f"s: {why}")

    def _gather(self, item: tuple, n: int, now: float) -> tuple[list | None, list | None]:
        """Add one request of ``n`` rows at time ``now``: (the batch it had no room in, the batch it completed)."""
        self._expect = max(self._expect, self._inside)
        full = None
        shape = tuple(a.shape[1:] for a in item[0].values()) if self._varies else ()
        if self._pending and (self._rows + n > self.info.max_batch_size or shape != self._shape):
            full = self._take()  # no room left (or other dimensions): it goes now, this request starts the next
        if not self._pending:
            self._first_at = now
            self._shape = shape
            self._started(now)
        self._pending.append(item)
        self._rows += n
        ready = None
        if len(self._pending) >= self._expect or self._rows >= self._target:
            self._patience.gathered(now - self._first_at)
            ready = self._take()
        return full, ready

    def _started(self, now: float) -> None:
        """A new batch's first request came at ``now``."""

    def _gave_up(self) -> list:
        """The pending batch, which waited all its patience: it goes short, and fewer callers are expected."""
        late = self._take()
        self._expect = max(1, len(late))
        self._patience.ran_out()
        return late

    def _take(self) -> list:
        batch, self._pending, self._rows = self._pending, [], 0
        return batch


class _Coalescer(_Gathering):
    """Merges concurrent small requests from threads into batches; the caller that completes a batch sends it.

    When a batch goes is :class:`_Gathering`'s rule (with 8 threads calling in a loop, each batch waits
    for the 8th and no longer). The caller that completes the batch, or whose wait ran out, sends it in
    its own thread and hands every caller its rows: no coalescer thread, no callback hops. At most
    ``max_in_flight`` batches are sent at once; a batch ends by its first caller's deadline (timeout_s
    after that call was made), its wait for a free slot included.
    """

    def __init__(self, client: TritonClient, info: ModelInfo, version: int | None) -> None:
        super().__init__(client, info, version)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(client._max_in_flight)

    def submit(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = rows_of(self.info, arrays)
        mine = _Handoff()
        now = time.monotonic()
        with self._lock:
            self._inside += 1
            full, ready = self._gather((arrays, n, mine, now + self._client._timeout), n, now)
            wait = self._wait()
        if full is not None:
            self._send(full)
        if ready is not None:
            self._send(ready)
        if not mine.wait(wait):
            with self._lock:  # waited long enough: send what has gathered, if no one else took it
                late = self._gave_up() if any(item[2] is mine for item in self._pending) else None
            if late is not None:
                self._send(late)
            mine.wait()
        return mine.result()

    def _send(self, batch: list) -> None:
        deadline = min(b[3] for b in batch)
        if time.monotonic() >= deadline:  # not sent: its answer could not come in time
            self._answer(batch, None, self._late(unsent=True))
            return
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._answer(batch, None, self._late())
            return
        try:
            try:
                arrays, sizes = merge([b[0] for b in batch])
                outputs = unmerge(self._client._infer_once(self.info, arrays, None, 0, 0, self._version, deadline),
                                  sizes)
            finally:
                self._slots.release()
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
            if _one_callers_failure(exc, batch):
                for item in batch:  # each caller's rows on their own: only the one that failed the model fails
                    self._send([item])
                return
            self._answer(batch, None, exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and the like stop the caller that was sending
        else:
            self._answer(batch, outputs, None)

    def _answer(self, batch: list, outputs: list | None, error: BaseException | None) -> None:
        with self._lock:  # these callers are answered: they no longer count as waiting inside
            self._inside -= len(batch)
        if outputs is not None:
            for item, out in zip(batch, outputs):
                item[2].set(out)
            return
        if not isinstance(error, Exception):
            error = ServingError(f"model {self.info.name!r}: the caller sending this batch was interrupted "
                                 f"({type(error).__name__}); send the request again")
        for item in batch:
            item[2].set(error=error)


def _one_callers_failure(exc: BaseException, batch: list) -> bool:
    """Whether a merged request of several callers failed in a way one caller's rows may have caused: the
    model's own error (a plain ServingError), not the server's state (not ready, queue full, time-out), which
    every caller would meet alone too. Such a batch is sent again caller by caller, so that another caller's
    bad rows do not fail (and their message reach) the rest."""
    return len(batch) > 1 and type(exc) is ServingError


class _Patience:
    """How long a coalescer's batch waits for the rest of its callers before it goes without them.

    Fixed when ``coalesce_wait_us`` was given. By default it starts at the model's queue delay and
    adapts to how long the callers take to come back (the time from a batch's first request to its
    last, smoothed as TCP smooths round trips): four times that, at least the start value and at most
    ten times it. A batch that ran out of time counts as having taken the whole wait, so callers
    that are slower than the start value lengthen it until their batches are whole again; callers
    that went away cost one wait (the batch then expects fewer). Without this, on a slower machine
    8 threads coming back one after another under the GIL missed a fixed 0.5 ms by a little: a
    quarter of the batches went short, below the model's preferred size, and Triton held those
    back for its own queue delay.

    >>> p = _Patience(0.0005, adapts=True)
    >>> for _ in range(100):
    ...     p.gathered(0.0004)
    >>> round(p.seconds * 1e6)
    1600
    """

    __slots__ = ("seconds", "_base", "_adapts", "_mean")

    def __init__(self, seconds: float, *, adapts: bool) -> None:
        self.seconds = self._base = seconds
        self._adapts = adapts
        self._mean = seconds / 4

    def gathered(self, took: float) -> None:
        """A batch was complete ``took`` seconds after its first request."""
        if self._adapts:
            self._mean += (took - self._mean) / 8
            self.seconds = min(10 * self._base, max(self._base, 4 * self._mean))

    def ran_out(self) -> None:
        """A batch went short after waiting all of ``seconds``."""
        self.gathered(self.seconds)


class _Handoff:
    """One caller's answer: a lock held until the batch's sender stores the rows and releases it.

    A waiting caller wakes once, without a Condition's second lock hand-off (a concurrent.futures.Future
    costs two wake-ups and a notify_all per result; replacing it took 8 coalesced callers from 2.06x to
    2.42x the one-by-one throughput in a back-to-back benchmark run).
    """

    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._value: dict[str, np.ndarray] | None = None
        self._error: BaseException | None = None

    def set(self, value: dict[str, np.ndarray] | None = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._done.release()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the answer is in; False when ``timeout`` seconds passed first."""
        return self._done.acquire(timeout=-1 if timeout is None else timeout)

    def result(self) -> dict[str, np.ndarray]:
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class AsyncTritonClient(_Base):
    """The asyncio Triton client (tritonclient's aio clients), with the same shaping and coalescing.

    It may be made anywhere (at import time too): its connection and coalescers are made in the
    event loop that first uses them, and made again in a new loop (a later ``asyncio.run``); loops running
    at once (in several threads) each need a client of their own (ServingError). Close it before its loop
    ends (``async with``): a connection left open then cannot be closed afterwards.
    """

    def __init__(self, url: str, *, protocol: str = "grpc", timeout_s: float = 30.0, coalesce: bool = False,
                 coalesce_wait_us: int | None = None, max_in_flight: int = 8) -> None:
        super().__init__(url, protocol, timeout_s, coalesce, coalesce_wait_us, max_in_flight, asynchronous=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aio: Any = None
        self._batchers: dict[tuple, _AsyncCoalescer] = {}
        self._flying: set[asyncio.Future] = set()  # requests in flight, each done when answered: close() waits
        self._closed_aio: Any = None  # the connection close() is closing: a call on it was cancelled by it

    def _connection(self) -> Any:
        """tritonclient's aio client of the running loop (an aio channel belongs to the loop that made it)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None and self._loop.is_running():  # two loops at once (threads each running
                # one) swapped its connection on every switch, leaving the other loop's open (and its batches)
                raise ServingError(f"this AsyncTritonClient ({self.url}) is in use by another event loop that is "
                                   "still running (another thread's); make one client per loop")
            self._aio = self._mod.InferenceServerClient(self.url, **(
                {"channel_args": _grpc_channel_args()} if self.protocol == "grpc" else {"conn_timeout": self._timeout}))
            self._batchers = {}  # their tasks ran in the old loop
            self._loop = loop
        return self._aio

    async def _check_server(self, model: str = "") -> None:
        """As :meth:`TritonClient._check_server`, awaited."""
        if self._triton:
            return
        try:
            meta = await self._connection().get_server_metadata(**self._call_kwargs(as_json=True))
        except self._exc as exc:
            raise self._server_error(exc, model) from None
        self._server_checked(meta)

    async def _health(self, method: str, *args: Any) -> bool:
        """As :meth:`TritonClient._health`, awaited."""
        conn = self._connection()  # another loop's client is an error, not "not live"
        try:
            if not await getattr(conn, method)(*args, **self._call_kwargs()):
                return False
        except Exception:  # noqa: BLE001 - unreachable means not live
            return False
        try:
            await self._check_server(*args)
        except (ModelNotReadyError, InferenceTimeoutError):  # gone meanwhile
            return False
        return True

    async def is_live(self) -> bool:
        """Whether the server answers (its liveness); ServingError if the server there is not Triton."""
        return await self._health("is_server_live")

    async def is_ready(self) -> bool:
        """Whether the server is ready to take requests; ServingError if the server there is not Triton."""
        return await self._health("is_server_ready")

    async def is_model_ready(self, model: str) -> bool:
        """Whether ``model`` is loaded and ready to infer; ServingError if the server there is not Triton."""
        return await self._health("is_model_ready", check_model(model))

    async def metadata(self, model: str) -> dict[str, Any]:
        """The model's metadata (versions, inputs and outputs with types and shapes)."""
        check_model(model)
        try:
            meta = await self._connection().get_model_metadata(model, **self._call_kwargs(as_json=True))
        except self._exc as exc:
            raise self._error(exc, model) from None
        return self._answer(meta, f"a request for the metadata of model {model!r}", "ModelMetadataResponse")

    async def config(self, model: str) -> dict[str, Any]:
        """The model's config as the server reports it (a dict of Triton's ModelConfig)."""
        check_model(model)
        try:
            cfg = await self._connection().get_model_config(model, **self._call_kwargs(as_json=True))
        except self._exc as exc:
            raise self._error(exc, model) from None
        cfg = cfg.get("config", cfg) if isinstance(cfg, Mapping) else cfg  # gRPC wraps it, HTTP does not
        return self._answer(cfg, f"a request for the config of model {model!r}", "ModelConfig")

    async def load_model(self, model: str, folder: str | os.PathLike | None = None) -> None:
        """As :meth:`TritonClient.load_model`, awaited."""
        check_model(model)
        kwargs = _upload(Path(folder), model) if folder is not None else {}
        await self._check_server(model)
        try:
            await self._connection().load_model(model, **kwargs, **self._call_kwargs())
        except self._exc as exc:
            raise self._control_error(exc, "load", model) from None
        self._infos.pop(model, None)

    async def unload_model(self, model: str) -> None:
        """Unload ``model`` (explicit model-control mode)."""
        check_model(model)
        await self._check_server(model)
        try:
            await self._connection().unload_model(model, **self._call_kwargs())
        except self._exc as exc:
            raise self._control_error(exc, "unload", model) from None
        self._infos.pop(model, None)

    async def info(self, model: str) -> ModelInfo:
        """The model's inputs, outputs and batching hints (read once, then cached)."""
        info = self._infos.get(model) if isinstance(model, str) else check_model(model)
        if info is None:
            info = self._infos[model] = self._config_info(await self.config(model))
        return info

    async def infer(self, model: str, inputs: Any, *, version: int | None = None,
                    outputs: list[str] | None = None, priority: int = 0, timeout_us: int = 0) -> dict[str, np.ndarray]:
        """As :meth:`TritonClient.infer`, awaited."""
        done = asyncio.get_running_loop().create_future()  # close() lets the calls made before it answer
        self._flying.add(done)
        try:
            return await self._infer(model, inputs, version, outputs, priority, timeout_us)
        finally:
            self._flying.discard(done)
            done.set_result(None)

    async def _infer(self, model: str, inputs: Any, version: int | None, outputs: list[str] | None, priority: int,
                     timeout_us: int) -> dict[str, np.ndarray]:
        priority, timeout_us, version, outputs = check_request(priority, timeout_us, version, outputs)
        info = await self.info(model)
        try:
            return await self._shaped(info, inputs, version, outputs, priority, timeout_us)
        except ServingError as exc:
            if not _config_refused(exc):
                raise
            self._infos.pop(model, None)
            fresh = await self.info(model)
            if fresh == info:
                raise
        return await self._shaped(fresh, inputs, version, outputs, priority, timeout_us)

    async def _shaped(self, info: ModelInfo, inputs: Any, version: int | None, outputs: list[str] | None,
                      priority: int, timeout_us: int) -> dict[str, np.ndarray]:
        """As :meth:`TritonClient._shaped`, awaited."""
        model = info.name
        check_outputs(info, outputs)
        arrays = to_arrays(info, inputs)
        if not rows_of(info, arrays):
            return empty_outputs(info, outputs)
        if self._coalesces(info, arrays, outputs, priority, timeout_us):
            self._connection()  # the batchers belong to the running loop too
            batcher = self._batchers.get((model, version))
            if batcher is None or batcher.info is not info:  # new, or the model was reloaded
                if batcher is not None:
                    batcher.flush()  # what it gathered goes now, merged as its config allowed
                batcher = self._batchers[(model, version)] = _AsyncCoalescer(self, info, version)
            return await batcher.submit(arrays)
        parts = split(info, arrays)
        results = await asyncio.gather(*(self._infer_once(info, p, outputs, priority, timeout_us, version)
                                         for p in parts))
        return join(results)

    async def _infer_once(self, info: ModelInfo, arrays, outputs=None, priority: int = 0, timeout_us: int = 0,
                          version: int | None = None, deadline: float | None = None) -> dict[str, np.ndarray]:
        """One request; it ends by ``deadline`` (a time.monotonic(); by default timeout_s from now)."""
        conn = self._connection()
        try:
            return await self._infer_on(conn, info, arrays, outputs, priority, timeout_us, version, deadline)
        except (asyncio.CancelledError, RuntimeError):  # aiohttp: "Session is closed"
            if conn is self._closed_aio and not _cancelling():  # close() closed the connection under it, the
                raise _closed_meanwhile() from None  # caller did not cancel it (gather and TaskGroup took it so)
            raise

    async def _infer_on(self, conn: Any, info: ModelInfo, arrays, outputs, priority: int, timeout_us: int,
                        version: int | None, deadline: float | None) -> dict[str, np.ndarray]:
        try:
            call = conn.infer(info.name, _inputs(self._types, info, arrays), outputs=self._outputs(info, outputs),
                              **self._request_kwargs(priority, timeout_us, version, deadline))
            if deadline is None or self.protocol == "grpc":  # gRPC's is in the request's client_timeout
                result = await call
            else:
                result = await asyncio.wait_for(call, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # not an OSError before Python 3.11
            raise InferenceTimeoutError(f"model {info.name!r} at {self.url}: no answer within "
                                        f"timeout_s={self._timeout:g} s") from None
        except self._exc as exc:
            raise self._error(exc, info.name) from None
        return self._outputs_of(result, outputs or info.outputs, info.name)

    async def close(self) -> None:
        """Send what the coalescers gathered, wait for every batch in flight, close the channel."""
        aio = self._aio
        if aio is None or self._closed_aio is aio:  # never opened, closed, or being closed by another close()
            return
        if self._loop is not asyncio.get_running_loop() and self._loop.is_running():
            self._connection()  # the ServingError: the loop using it is still running (another thread's)
        if self._loop is asyncio.get_running_loop():  # batches still pending or in flight get their answers first
            for b in list(self._batchers.values()):
                await b.drain()
            if self._flying:  # and the other requests in flight (each ends by its timeout_s)
                await asyncio.wait(list(self._flying))
            if self._aio is not aio or self._closed_aio is aio:  # another close() took it meanwhile
                return
            self._closed_aio = aio
            try:
                await aio.close()
            finally:  # cancelled too: the next call opens a connection of its own, not the half-closed one
                if self._aio is aio:
                    self._aio, self._loop, self._batchers = None, None, {}
            return
        if self._aio is aio:
            self._aio, self._loop, self._batchers = None, None, {}

    async def __aenter__(self) -> AsyncTritonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _AsyncCoalescer(_Gathering):
    """The asyncio twin of :class:`_Coalescer`, for coroutines of one event loop.

    When a batch goes is :class:`_Gathering`'s rule; its wait is a loop timer set by its first request.
    Each batch is sent by a task of its own, so a caller that is cancelled leaves the others' batch alone
    (its rows are dropped if it was not sent yet). A batch ends by its first caller's deadline, as there.
    No background task and no queue: a background task reading an ``asyncio.Queue`` with ``wait_for`` per
    request ran 8 coroutines calling back to back at 10,675 requests per second; this runs them at 12,408
    (medians of 5 interleaved rounds, one process, a 2-core machine).
    """

    def __init__(self, client: AsyncTritonClient, info: ModelInfo, version: int | None) -> None:
        super().__init__(client, info, version)
        self._slots = asyncio.Semaphore(client._max_in_flight)
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task] = set()

    async def submit(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = rows_of(self.info, arrays)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inside += 1
        try:
            for batch in self._gather((arrays, n, fut, time.monotonic() + self._client._timeout), n, loop.time()):
                if batch is not None:
                    self._go(batch)
            return await fut
        finally:
            self._inside -= 1

    def flush(self) -> None:
        """Send what is pending now."""
        if self._pending:
            self._go(self._take())

    async def drain(self) -> None:
        """Send what is pending and wait until every batch sent has its answer."""
        self.flush()
        while self._sending:
            await asyncio.wait(list(self._sending))

    def _started(self, now: float) -> None:
        self._timer = asyncio.get_running_loop().call_at(now + self._wait(), self._ran_out)

    def _ran_out(self) -> None:
        self._timer = None
        if self._pending:
            self._go(self._gave_up())

    def _take(self) -> list:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return super()._take()

    def _go(self, batch: list) -> None:
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list) -> None:
        deadline = min(b[3] for b in batch)
        unsent = time.monotonic() >= deadline  # not sent: its answer could not come in time
        if unsent or not await self._slot(deadline):
            late = self._late(unsent=unsent)
            for b in batch:
                if not b[2].done():
                    b[2].set_exception(late)
            return
        try:
            batch = [b for b in batch if not b[2].done()]  # callers cancelled meanwhile
            if not batch:
                return
            try:
                arrays, sizes = merge([b[0] for b in batch])
                outputs = unmerge(await self._client._infer_once(self.info, arrays, version=self._version,
                                                                 deadline=deadline), sizes)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
                retry = _one_callers_failure(exc, batch)
                for b in batch if not retry else ():
                    if b[2].done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):  # the send was cancelled: so are its callers
                        b[2].cancel()
                    else:
                        b[2].set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                if not retry:
                    return
            else:
                for b, out in zip(batch, outputs):
                    if not b[2].done():
                        b[2].set_result(out)
                return
        finally:
            self._slots.release()
        for b in batch:  # each caller's rows on their own (outside the slot this send held)
            await self._send([b])

    async def _slot(self, deadline: float) -> bool:
        """Take an in-flight slot, waiting until ``deadline`` (a time.monotonic()) at most: False if none came."""
        if not self._slots.locked():
            await self._slots.acquire()  # free: taken without waiting
            return True
        try:
            await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return False
        return True
