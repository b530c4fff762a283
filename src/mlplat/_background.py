"""One background thread per process that flushes buffered writers (metrics, served features, decisions).

A writer registers an object with ``flush()`` and ``__len__()``; the thread
flushes every registered object that holds something every ``interval``
seconds, or at once after ``wake()``; an object with a ``due()`` method is
flushed only when that says so. At interpreter exit everything still
registered is flushed once more.

Writers are registered weakly, but a writer holding rows (it reported them
with :func:`added`) is also held strongly until the thread finds it empty: an
owner dropped without ``close()`` (a gateway built in a function, a Platform
never closed) loses nothing, its rows are written by the thread as usual, or
at interpreter exit.

The thread runs at a lower CPU priority (Linux: nice 10 for this thread), so
that on a busy machine serving and training threads, and local servers such
as Redis, go first: predict's p99 at 100 entities fell from 1.9-2.7 ms to
1.0-1.4 ms in an interleaved A/B on a 2-core machine. On a machine saturated
for long it may then fall behind, so every writer also writes its buffer
itself once it holds :data:`BACKLOG` times its usual size (back-pressure
instead of memory growing without bound).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing.util as _mp_util
import os
import threading
import weakref
from typing import Protocol

__all__ = ["Flushable", "register", "unregister", "wake", "added", "flush_all", "errors"]


class Flushable(Protocol):
    def flush(self) -> None: ...

    def __len__(self) -> int: ...


interval = 1.0
#: a writer holding this many times its usual flush size writes it in the calling thread
BACKLOG = 4
_objects: weakref.WeakSet = weakref.WeakSet()
#: registered writers holding rows: kept alive until written, so a dropped owner loses nothing
_holding: set = set()
_thread: threading.Thread | None = None
_event = threading.Event()
_lock = threading.Lock()
#: exceptions raised by background flushes (the data stays buffered for the next try)
errors: list[BaseException] = []
#: writers whose last background flush failed (warned about once until one succeeds)
_failing: weakref.WeakSet = weakref.WeakSet()
_log = logging.getLogger("mlplat")


def _owner(obj: object) -> str:
    """What a writer holds, for a warning: its ``_owner`` text (an A/B gateway's, a run's metrics), else its type."""
    return getattr(obj, "_owner", None) or type(obj).__name__


def register(obj: Flushable) -> None:
    with _lock:
        _objects.add(obj)
        _start()


def _start() -> None:
    """Start the flusher thread unless it runs (call with ``_lock`` held)."""
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_loop, name="mlplat-flusher", daemon=True)
        _thread.start()


def _after_fork_in_child() -> None:
    """A forked child (a pre-fork server's worker, a platform made before ``os.fork()``) starts afresh.

    Only the forking thread lives on in the child: no flusher ran there (rows waited for the child's
    exit), and a lock some thread held at the fork stayed locked for ever. Each registered writer with
    a ``forked()`` method empties its buffer (the parent writes what was buffered at the fork; the child
    wrote it a second time) and takes fresh locks; then a flusher of the child's own starts.
    """
    global _lock, _event, _thread
    _lock, _event, _thread = threading.Lock(), threading.Event(), None
    _holding.clear()  # the parent's rows
    writers = list(_objects)
    for obj in writers:
        forked = getattr(obj, "forked", None)
        if forked is not None:
            forked()
    if writers:
        with _lock:
            _start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _in_multiprocessing_child(_anchor: object) -> None:
    """A ``multiprocessing.Process`` started by fork ends with ``os._exit``, past atexit, after running
    multiprocessing's finalizers: one of them writes what the child buffered (its rows were lost unless it
    called ``p.close()``). Registered here, once the child's finalizer registry was emptied."""
    _mp_util.Finalize(None, flush_all, exitpriority=10)


class _Anchor:
    """What multiprocessing's after-fork registry holds (it takes weak references)."""


_ANCHOR = _Anchor()
_mp_util.register_after_fork(_ANCHOR, _in_multiprocessing_child)


def unregister(obj: Flushable) -> None:
    with _lock:
        _objects.discard(obj)
        _holding.discard(obj)


def wake() -> None:
    _event.set()


def added(writer: Flushable, count: int, size: int) -> None:
    """Call after ``writer`` buffered more, outside its lock: ``count`` rows now, ``size`` its flush size.
    Wakes the flusher at ``size``; at ``BACKLOG`` times it, writes in the calling thread. Until its rows
    are written, a registered writer is kept alive (its owner may be dropped without closing it)."""
    if writer not in _holding:  # the lock only when it is not held yet: this runs on every log_metric
        with _lock:
            if writer in _objects:
                _holding.add(writer)
    if count >= BACKLOG * size:  # the flusher is falling behind (a saturated machine): back-pressure
        writer.flush()
    elif count >= size:
        wake()


def _loop() -> None:
    _yield_cpu()
    while True:
        _event.wait(interval)
        _event.clear()
        _pass()  # in a function: no writer stays referenced from here until the next pass


def _pass() -> None:
    """Flush each registered writer that holds rows (and is due); let go of those left empty."""
    for obj in list(_objects):
        due = getattr(obj, "due", None)
        if len(obj) and (due is None or due()):
            try:
                obj.flush()
            except Exception as exc:  # noqa: BLE001 - kept buffered; raised again by an explicit flush
                errors.append(exc)
                del errors[:-100]
                if obj not in _failing:  # once per run of failures, not every second while a database is down
                    _failing.add(obj)
                    _log.warning("a background write of %s failed (it is retried every %g s; an explicit "
                                 "flush() or close() raises the error): %s", _owner(obj), interval, exc)
            else:
                if obj in _failing:
                    _failing.discard(obj)
                    _log.warning("the background write of %s succeeded again", _owner(obj))
        _release_if_empty(obj)


def _release_if_empty(obj: Flushable) -> None:
    """Let an empty writer go (rows added meanwhile hold it again: :func:`added` runs after they are in)."""
    with _lock:
        if not len(obj):
            _holding.discard(obj)


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (Linux: a thread's own nice value); elsewhere leave it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # no per-thread priority here, or not allowed: compete as before
        pass


def flush_all() -> None:
    """Flush everything registered (also runs at interpreter exit)."""
    for obj in list(_objects):
        try:
            obj.flush()
        except Exception:  # noqa: BLE001 - nothing to report to at exit
            pass


atexit.register(flush_all)
