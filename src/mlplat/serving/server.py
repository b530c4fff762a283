"""Run a real Triton Inference Server on a model repository, on this machine's CPU.

The ``nvidia-pytriton`` wheel bundles a Triton server binary with the python
backend and python-backend stubs for several Python versions. It pins
numpy < 2, so it lives in a virtualenv of its own (with torch, for the
generated ``model.py``): :func:`build_server_venv` makes one.
:class:`TritonServer` assembles a backends folder from the wheel, starts the
binary on free 127.0.0.1 ports with explicit model control, waits until it is
ready, and stops it with SIGINT.

Usage::

    python = build_server_venv("~/.cache/mlplat/triton-venv")       # once; a few minutes
    with TritonServer("triton-repo", python=python) as server:
        client = mp.TritonClient(server.grpc_url)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from ..errors import ConfigError, ServingError

__all__ = ["TritonServer", "build_server_venv", "server_python"]

PYTRITON = "nvidia-pytriton==0.7.0"


#: starts tried when a chosen port is taken before the server binds it
_PORT_TRIES = 3

#: an error line of Triton's log (``E1127 02:00:58.892 32494 model_lifecycle.cc:642] "message"``): the message
_LOG_LINE = re.compile(r"^E\d{4} [\d:.]+\s+\d+ [^\]]*\] (.*)$")
#: the model an error line says failed to load
_FAILED_MODEL = re.compile(r"failed to load '([^']+)'|model directory '([^']+)'")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def server_python(venv: str | os.PathLike) -> Path:
    return Path(venv).expanduser() / "bin" / "python"


def build_server_venv(venv: str | os.PathLike, *, torch_version: str | None = None, python: str | None = None,
                      quiet: bool = True) -> Path:
    """A virtualenv with the bundled Triton server and torch (the training side's version by default).

    Reuses the virtualenv when it already has both. Returns its python.
    """
    venv = Path(venv).expanduser()
    py = server_python(venv)
    if torch_version is None:
        try:
            import torch

            torch_version = torch.__version__.split("+")[0]
        except ImportError:
            raise ConfigError("build_server_venv needs torch_version= (torch is not installed here)") from None
    marker = venv / ".mlplat-server"
    want = f"{PYTRITON} torch=={torch_version}\n"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    subprocess.run([python or sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    cmd = [str(py), "-m", "pip", "install", PYTRITON, f"torch=={torch_version}", "numpy<2"]
    if quiet:
        cmd.append("-q")
    result = subprocess.run(cmd, capture_output=quiet, text=True)
    if result.returncode != 0:
        raise ConfigError(f"building the Triton server virtualenv failed: {(result.stderr or '')[-2000:]}")
    marker.write_text(want)
    return py


def _stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGINT, then SIGKILL after ``timeout`` seconds, unless it ended already."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TritonServer:
    """The Triton server binary from ``nvidia-pytriton``, serving one repository on free loopback ports.

    ``models``: the models loaded at start (None: all of the repository's; [] none, for ``load_model``
    later). Use it as a context manager or call :meth:`stop`; a server left running stops when this object
    is collected or Python exits.
    """

    def __init__(self, repository: str | os.PathLike, *, python: str | os.PathLike, log_verbose: int = 0,
                 startup_timeout: float = 120.0, models: list[str] | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.python = Path(python)
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.models = models
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the server's HTTP endpoint."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the server's gRPC endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    def _layout(self) -> tuple[Path, Path, str]:
        try:
            info = subprocess.run(
                [str(self.python), "-c", "import json, os, sys, sysconfig, pytriton; print(json.dumps({"
                 "'dir': os.path.dirname(pytriton.__file__), 'libdir': sysconfig.get_config_var('LIBDIR'), "
                 "'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))"],
                capture_output=True, text=True)
        except OSError as exc:  # no such file, a folder, not executable
            raise ConfigError(f"python={str(self.python)!r} cannot be run ({exc.strerror or exc}): give the server "
                              "virtualenv's python, built with mlplat.serving.build_server_venv") from None
        if info.returncode != 0:
            raise ConfigError(f"{self.python} cannot import pytriton: build the server virtualenv with "
                              f"mlplat.serving.build_server_venv ({info.stderr.strip()[-500:]})")
        try:
            data = json.loads(info.stdout)
            data = {key: str(data[key]) for key in ("dir", "libdir", "version")}
            root = Path(data["dir"]) / "tritonserver"
        except (ValueError, KeyError, TypeError):  # it ran, and is not that python (/bin/true answers nothing)
            raise ConfigError(f"python={str(self.python)!r} did not answer as a Python with pytriton ("
                              f"{info.stdout.strip()[:200]!r}): give the server virtualenv's python, built with "
                              "mlplat.serving.build_server_venv") from None
        stub = root / "python_backend_stubs" / data["version"] / "triton_python_backend_stub"
        if not stub.exists():
            raise ConfigError(f"the bundled server has no python backend stub for Python {data['version']}")
        backends = Path(self._tmp.name) / "backends" / "python"
        backends.mkdir(parents=True)
        for source in (root / "backends" / "python" / "libtriton_python.so",
                       root / "backends" / "python" / "triton_python_backend_utils.py", stub):
            (backends / source.name).symlink_to(source)
        return root / "bin" / "tritonserver", backends.parent, data["libdir"]

    @property
    def running(self) -> bool:
        """Whether this server's process is running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TritonServer:
        """Start the server and wait until it is ready; a ServingError naming the models that failed to load and
        the server's error lines (then its log tail) if it exits or is not ready within ``startup_timeout``. A port
        taken between choosing it and the server binding it (another process's connection, say) is tried again on
        other ports, up to three times in all. A server already running is not started again (ServingError)."""
        if self.running:
            raise ServingError(f"the Triton server on {self.http_url} is already running: stop() it first")
        if not self.repository.is_dir():
            raise ConfigError(f"the Triton model repository {self.repository} is not a folder")
        for tries_left in reversed(range(_PORT_TRIES)):
            try:
                if self._start_once(retry_if_port_taken=tries_left > 0):
                    return self
            except BaseException:  # Ctrl-C or a failure while waiting: no server left running, no folder behind
                self.stop()
                raise
        raise AssertionError("unreachable: the last try raises")

    def _start_once(self, *, retry_if_port_taken: bool) -> bool:
        """One start on newly chosen ports: True once ready, False when a port was taken (and
        ``retry_if_port_taken``), else ServingError."""
        self.stop()  # a previous try's folder
        self._tmp = tempfile.TemporaryDirectory(prefix="mlplat-triton-")
        binary, backends, libdir = self._layout()
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        self.log_path = Path(self._tmp.name) / "server.log"
        args = [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}", "--grpc-address=127.0.0.1",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--allow-metrics=false",
                "--model-control-mode=explicit", f"--log-verbose={self.log_verbose}"]
        args += [f"--load-model={m}" for m in (["*"] if self.models is None else self.models)]
        env = {**os.environ, "PATH": f"{self.python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "LD_LIBRARY_PATH": f"{libdir}{os.pathsep}{os.environ.get('LD_LIBRARY_PATH', '')}"}
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        # a server its owner forgot (no `with`, no stop()) stops when the owner is collected or Python exits,
        # before the folder of its backends goes (it ran on, orphaned, with that folder deleted under it)
        self._reaper = weakref.finalize(self, _stop_process, self._proc, 20.0)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code, why = self._proc.returncode, self._failures()
                tail = self.log_tail(1000 if why else 3000)
                self.stop()
                if retry_if_port_taken and "already in use" in tail:
                    return False
                raise ServingError(f"the Triton server on {self.repository} exited ({code}){why}; log tail: {tail}")
            if self._ready():
                return True
            time.sleep(0.1)
        why = self._failures()
        tail = self.log_tail(1000 if why else 3000)
        self.stop()
        raise ServingError(f"the Triton server on {self.repository} was not ready after {self.startup_timeout} s"
                           f"{why}; log tail: {tail}")

    def _failures(self) -> str:
        """The models that failed to load and the server's error lines, from its log ('' when there are none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        models, errors = [], []
        for line in self.log_path.read_text(errors="replace").splitlines():
            found = _LOG_LINE.match(line)
            if found is None and line.startswith("error: "):
                errors.append(line.removeprefix("error: "))
            if found is None or "CudaDriverHelper" in line:  # no GPU here: not an error of this server's
                continue
            message = found.group(1).strip('"')
            failed = _FAILED_MODEL.search(message)
            name = failed and (failed.group(1) or failed.group(2))
            if name and name not in models:
                models.append(name)
            errors.append(message)
        if not models and not errors:
            return ""
        named = f": models that failed to load: {', '.join(repr(m) for m in models)}" if models else ""
        return f"{named}; server errors: " + " | ".join(e[:1000] for e in errors[-10:])

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the server's log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGINT, then SIGKILL after ``timeout`` seconds) and remove its temporary folder."""
        if self._proc is not None:
            self._reaper.detach()
            _stop_process(self._proc, timeout)
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


