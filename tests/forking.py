"""Forked child processes for the tests of a platform used across ``os.fork()`` (a pre-fork server)."""
from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable

import pytest


def fork(child: Callable[[], None]) -> int:
    """Run ``child()`` in a forked process that exits 0 when it returns and 1 when it raises; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child()
            code = 0
        except BaseException:  # noqa: BLE001 - reported by the exit code
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 10.0) -> int:
    """The child's exit code; the test fails (and the child is killed) when it hangs past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung for {timeout} s")


def in_forked_child(child: Callable[[], None], timeout: float = 10.0) -> int:
    """Run ``child()`` in a forked process and wait for it: its exit code."""
    return wait(fork(child), timeout)
