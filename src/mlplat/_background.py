"""One background thread per process that flushes buffered writers (metrics, served features, decisions).

A writer registers an object with ``flush()`` and ``__len__()``; the thread
flushes every registered object that holds something every ``interval``
seconds, or at once after ``wake()``; an object with a ``due()`` method is
flushed only when that says so. At interpreter exit everything still
registered is flushed once more.
"""
from __future__ import annotations

import atexit
import threading
import weakref
from typing import Protocol

__all__ = ["Flushable", "register", "unregister", "wake", "flush_all", "errors"]


class Flushable(Protocol):
    def flush(self) -> None: ...

    def __len__(self) -> int: ...


interval = 1.0
_objects: weakref.WeakSet = weakref.WeakSet()
_thread: threading.Thread | None = None
_event = threading.Event()
_lock = threading.Lock()
#: exceptions raised by background flushes (the data stays buffered for the next try)
errors: list[BaseException] = []


def register(obj: Flushable) -> None:
    global _thread
    with _lock:
        _objects.add(obj)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_loop, name="mlplat-flusher", daemon=True)
            _thread.start()


def unregister(obj: Flushable) -> None:
    with _lock:
        _objects.discard(obj)


def wake() -> None:
    _event.set()


def _loop() -> None:
    while True:
        _event.wait(interval)
        _event.clear()
        for obj in list(_objects):
            due = getattr(obj, "due", None)
            if len(obj) and (due is None or due()):
                try:
                    obj.flush()
                except Exception as exc:  # noqa: BLE001 - kept buffered; reported where the writer ends
                    errors.append(exc)
                    del errors[:-100]


def flush_all() -> None:
    """Flush everything registered (also runs at interpreter exit)."""
    for obj in list(_objects):
        try:
            obj.flush()
        except Exception:  # noqa: BLE001 - nothing to report to at exit
            pass


atexit.register(flush_all)
