"""Threads and forked child processes for the tests of concurrent use (a pre-fork server's workers too)."""
from __future__ import annotations

import os
import threading
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


def after_parent_closes(platform, work: Callable[[], None]) -> None:
    """Fork a child that runs ``work()`` once the parent has closed ``platform`` (the child still holds
    the parent's objects, as a pre-fork worker does); the child must exit 0."""
    go_read, go_write = os.pipe()

    def child() -> None:
        os.close(go_write)
        os.read(go_read, 1)  # the parent has closed its platform
        work()

    pid = fork(child)
    os.close(go_read)
    platform.close()
    os.write(go_write, b"x")
    os.close(go_write)
    assert wait(pid) == 0


def in_threads(fn: Callable[[int], None], n: int) -> None:
    """``fn(0)`` ... ``fn(n - 1)``, each in a thread of its own, all started before any is joined."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
