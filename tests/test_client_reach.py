"""The Triton clients against a real server reached in other ways than the tests' loopback: through a link
with 150 ms of latency (gRPC refused to wait more than 100 ms for a connection: every first call failed
with a time-out), with a model folder loaded under another name, from two event loops at once; their
answers the same over gRPC and HTTP; and a server its owner forgot stopped, not left running."""
from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

import mlplat as mp
from mlplat.serving import TritonServer
from test_client_lifecycle import _Double


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    with mp.Platform(root / "home") as p:
        with p.runs.start("double") as run:
            run.log_model(_Double(), "model", example_input=torch.zeros(2, 3))
        p.models.register("double", run.id)
        p.serving.export_triton("double", version=1, repository=root / "repo", max_batch_size=8)
    return root / "repo"


@pytest.fixture(scope="module")
def server(repo, triton_python):
    with TritonServer(repo, python=triton_python) as s:
        yield s


class _SlowLink:
    """A TCP proxy to ``port`` that holds every chunk ``delay`` seconds in each direction (a far server)."""

    def __init__(self, port: int, delay: float) -> None:
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self._listen.getsockname()[1]}"
        self._port, self._delay = port, delay
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self._delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def close(self) -> None:
        self._listen.close()


def test_grpc_clients_reach_a_server_150_ms_away(server):
    link = _SlowLink(server.grpc_port, 0.15)
    x = np.ones((1, 3), np.float32)
    try:
        with mp.TritonClient(link.url, timeout_s=10) as client:
            assert client.infer("double", {"input__0": x})["output__0"].tolist() == [[2.0, 2.0, 2.0]]

        async def main() -> list:
            async with mp.AsyncTritonClient(link.url, timeout_s=10) as c:
                return (await c.infer("double", {"input__0": x}))["output__0"].tolist()

        assert asyncio.run(main()) == [[2.0, 2.0, 2.0]]
    finally:
        link.close()


def test_config_and_metadata_are_the_same_over_grpc_and_http(server):
    """gRPC's JSON wrote 64-bit integers as strings: dims ['3'] and shape ['-1', '3'], where HTTP gave numbers."""
    grpc, http = mp.TritonClient(server.grpc_url), mp.TritonClient(server.http_url, protocol="http")
    with grpc, http:
        config, other = grpc.config("double"), http.config("double")  # (gRPC's JSON leaves out default values)
        for part in ("input", "output"):
            assert [(t["name"], t["dims"]) for t in config[part]] == [(t["name"], t["dims"]) for t in other[part]]
        assert config["input"][0]["dims"] == [3] and config["max_batch_size"] == other["max_batch_size"] == 8
        assert config["dynamic_batching"]["preferred_batch_size"] == other["dynamic_batching"]["preferred_batch_size"]
        assert grpc.metadata("double")["inputs"] == http.metadata("double")["inputs"] == [
            {"name": "input__0", "datatype": "FP32", "shape": [-1, 3]}]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_folder_loads_under_another_name(server, repo, protocol):
    """The server requires the config's name to be the model's: "failed to poll from model repository"."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with mp.TritonClient(url, protocol=protocol) as client:
        client.load_model(f"double_{protocol}", repo / "double")
        out = client.infer(f"double_{protocol}", {"input__0": np.ones((2, 3), np.float32)})
        assert out["output__0"].tolist() == [[2.0] * 3] * 2
        client.unload_model(f"double_{protocol}")


def test_an_async_client_refuses_a_second_loop_running_at_the_same_time(server):
    """Two threads each running a loop swapped the client's connection on every switch, leaving the other's
    open: one client per loop."""
    client = mp.AsyncTritonClient(server.grpc_url)
    x = np.ones((1, 3), np.float32)
    started, finish = threading.Event(), threading.Event()

    async def first() -> None:
        await client.infer("double", {"input__0": x})
        started.set()
        while not finish.is_set():
            await asyncio.sleep(0.01)
        await client.close()

    thread = threading.Thread(target=lambda: asyncio.run(first()))
    thread.start()
    try:
        assert started.wait(30)
        for call in (lambda: client.infer("double", {"input__0": x}), client.is_live, client.close):
            with pytest.raises(mp.ServingError, match="in use by another event loop that is still running"):
                asyncio.run(call())  # is_live said False, and close() dropped the other loop's connection
    finally:
        finish.set()
        thread.join(30)

    async def later() -> list:  # one loop after another is fine
        async with client:
            return (await client.infer("double", {"input__0": x}))["output__0"].tolist()

    assert asyncio.run(later()) == [[2.0, 2.0, 2.0]]


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": 0}, "timeout_s must be seconds, a number > 0, got 0"),
    ({"timeout_s": float("nan")}, "timeout_s must be seconds"),
    ({"max_in_flight": 0}, "max_in_flight must be requests in flight at once, an integer >= 1, got 0"),
    ({"coalesce_wait_us": -5}, "coalesce_wait_us must be microseconds"),  # a raw ValueError at the first call
    ({"coalesce": "yes"}, "coalesce must be True or False"),
])
def test_client_arguments_are_checked_when_it_is_made(kwargs, message):
    for make in (mp.TritonClient, mp.AsyncTritonClient):
        with pytest.raises(mp.DataError, match=message):
            make("127.0.0.1:1", **kwargs)
        make("127.0.0.1:1", timeout_s=np.float32(5), max_in_flight=np.int64(8), coalesce=np.True_,
             coalesce_wait_us=np.int64(500))  # numpy numbers are numbers


@pytest.mark.parametrize("url, protocol, message", [
    ("::1:8000", "http", r"must be host:port \(e.g. 127.0.0.1:8000 or \[::1\]:8000"),
    (8001, "grpc", "the Triton url must be a string host:port"), (None, "http", "must be a string"),
    ("", "grpc", "must be a string"),
])
def test_a_url_the_client_cannot_use_is_a_config_error_when_it_is_made(url, protocol, message):
    """An unbracketed IPv6 HTTP url was taken: each call then killed a worker thread (its port read as ':1:8000')
    and waited timeout_s for an answer that never came; an int url was a raw AttributeError at the first call."""
    for make in (mp.TritonClient, mp.AsyncTritonClient):
        with pytest.raises(mp.ConfigError, match=message):
            make(url, protocol=protocol)
    mp.TritonClient("[::1]:8000", protocol="http").close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_name_that_is_not_a_string_or_a_config_it_cannot_read_is_an_mlplat_error(server, protocol, tmp_path):
    """infer(123) was a raw TypeError (over HTTP from quote_from_bytes), a config.pbtxt with an unknown field a
    raw protobuf ParseError."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text('name: "m"\nthis_field_is_unknown: 1\n')
    with mp.TritonClient(url, protocol=protocol) as client:
        for call in (lambda m: client.infer(m, {"input__0": np.ones((1, 3), np.float32)}), client.metadata,
                     client.config, client.load_model, client.unload_model, client.is_model_ready, client.info):
            for bad in (123, None, "", ["double"]):
                with pytest.raises(mp.DataError, match="model must be a model's name"):
                    call(bad)
        with pytest.raises(mp.ConfigError, match=r"config.pbtxt is not a Triton model config this client can read "
                                                 r"\(ParseError"):
            client.load_model("m", folder)

    async def main() -> None:
        async with mp.AsyncTritonClient(url, protocol=protocol) as client:
            for call in (client.metadata, client.config, client.unload_model, client.info):
                with pytest.raises(mp.DataError, match="model must be a model's name"):
                    await call(5)
            with pytest.raises(mp.ConfigError, match="is not a Triton model config"):
                await client.load_model("m", folder)
    asyncio.run(main())


def test_the_local_backend_checks_a_model_name_as_the_clients_do(tmp_path):
    """A list was a raw TypeError (unhashable), 123 a ModelNotReadyError."""
    with mp.Platform(tmp_path / "home") as p:
        local = p.serving.local_backend()
        for call in (lambda m: local.infer(m, {"input__0": np.ones((1, 3), np.float32)}), local.info,
                     local.is_model_ready):
            for bad in (123, None, "", ["double"]):
                with pytest.raises(mp.DataError, match="model must be a model's name"):
                    call(bad)


def test_a_server_python_that_cannot_run_is_a_config_error(repo, tmp_path):
    for python in (tmp_path / "nothing" / "python", tmp_path):
        with pytest.raises(mp.ConfigError, match="cannot be run .*build_server_venv"):
            TritonServer(repo, python=python).start()
    for python in ("/bin/true", "/bin/echo"):  # they run, and answer nothing a Python would (a raw JSONDecodeError)
        with pytest.raises(mp.ConfigError, match="did not answer as a Python with pytriton"):
            TritonServer(repo, python=python).start()


def test_an_http_worker_that_cannot_connect_answers_its_callers_at_once():
    from mlplat.serving.client import _HttpWorkers

    def connect():
        raise ValueError("Port could not be cast to integer value")

    workers = _HttpWorkers(connect, 2, 30.0, "somewhere:8000")
    started = time.monotonic()
    for _ in range(3):  # each call starts a worker again (a dead one no longer counts against the pool)
        with pytest.raises(mp.ServingError, match="cannot open an HTTP connection to somewhere:8000: ValueError: Port"):
            workers.call(lambda client: None)
    assert time.monotonic() - started < 5 and workers._threads == []
    workers.close()


def test_a_server_its_owner_forgot_is_stopped_when_it_is_collected(repo, triton_python):
    """It ran on after Python exited, with its backends' folder deleted under it."""
    s = TritonServer(repo, python=triton_python, models=[]).start()  # [] loads no model (it loaded all)
    pid, folder = s._proc.pid, s._tmp.name
    with mp.TritonClient(s.grpc_url) as client:
        assert client.is_live() and not client.is_model_ready("double")
    del s, client
    gc.collect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server still runs")
    assert not os.path.exists(folder)
