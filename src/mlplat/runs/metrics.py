"""Buffered metric logging: a training loop pays an append, a background thread writes batches.

``MetricBuffer.add`` appends a tuple to a deque (atomic in CPython, no lock).
A single flusher thread per process writes every buffer's points every
``interval`` seconds, or sooner once a buffer holds ``max_points``; runs
flush when they end and every buffer flushes at interpreter exit. A flush
is one transaction: every point ("run_metrics", COPY on PostgreSQL,
executemany on SQLite) plus the latest value per key ("run_latest_metrics",
an upsert that only moves forward in (step, timestamp)). What was flushed
survives a crash or a kill; NaN is stored as NULL, infinities as themselves.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..db import Database
from ..db.models import LatestMetric

__all__ = ["MetricBuffer", "write_points", "flush_all"]

Point = tuple[str, str, float | None, int, int]  # run id, key, value (None = NaN), step, timestamp ms


def write_points(db: Database, run_id: str, points: list[Point]) -> None:
    """Write points of one run (each tuple carries the run id) in one transaction, all of them or none."""
    if not points:
        return
    latest: dict[str, Point] = {}
    for p in points:
        cur = latest.get(p[1])
        if cur is None or p[3] > cur[3] or (p[3] == cur[3] and p[4] >= cur[4]):
            latest[p[1]] = p
    with db.connect(write=True) as conn:
        if db.dialect == "postgresql":
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cur, cur.copy(
                "COPY run_metrics (run_id, key, value, step, timestamp) FROM STDIN"
            ) as copy:
                copy.write(_copy_text(run_id, points))
        else:
            conn.exec_driver_sql(
                "INSERT INTO run_metrics (run_id, key, value, step, timestamp) VALUES (?, ?, ?, ?, ?)", points
            )
        insert = (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)(LatestMetric)
        t = LatestMetric.__table__
        newer = sa.or_(insert.excluded.step > t.c.step,
                       sa.and_(insert.excluded.step == t.c.step, insert.excluded.timestamp >= t.c.timestamp))
        stmt = insert.on_conflict_do_update(
            index_elements=[t.c.run_id, t.c.key],
            set_={"value": insert.excluded.value, "step": insert.excluded.step,
                  "timestamp": insert.excluded.timestamp},
            where=newer,
        )
        conn.execute(stmt, [{"run_id": r, "key": k, "value": v, "step": s, "timestamp": ts}
                            for r, k, v, s, ts in latest.values()])


def _copy_text(run_id: str, points: list[Point]) -> bytes:
    """Points in COPY's text format, built in one pass (a write_row call per point costs 3x more).

    Keys hold no control characters (validated when logged); a backslash is escaped. Floats use repr,
    which PostgreSQL reads back exactly; NaN travels as NULL, infinities as Infinity.
    """
    keys: dict[str, str] = {}
    rid = run_id.replace("\\", "\\\\")
    lines = []
    for _, key, value, step, ts in points:
        k = keys.get(key)
        if k is None:
            k = keys[key] = key.replace("\\", "\\\\")
        if value is None:
            v = "\\N"
        elif value in _INF:
            v = _INF[value]
        else:
            v = repr(value)
        lines.append(f"{rid}\t{k}\t{v}\t{step}\t{ts}")
    lines.append("")
    return "\n".join(lines).encode()


_INF = {float("inf"): "Infinity", float("-inf"): "-Infinity"}


class MetricBuffer:
    """Points logged to one run, waiting for the flusher."""

    def __init__(self, db: Database, run_id: str, *, max_points: int = 100_000) -> None:
        self._db = db
        self.run_id = run_id
        self._points: deque[Point] = deque()
        self._steps: dict[str, int] = {}
        self._max = max_points
        self._flush_lock = threading.Lock()
        _Flusher.register(self)

    def add(self, key: str, value: float, step: int | None, timestamp_ms: int | None) -> None:
        if step is None:
            step = self._steps.get(key, -1) + 1
        self._steps[key] = step
        v = float(value)
        self._points.append((self.run_id, key, None if v != v else v, step,
                             time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms))
        if len(self._points) >= self._max:
            _Flusher.wake()

    def __len__(self) -> int:
        return len(self._points)

    def flush(self) -> None:
        """Write everything logged so far; returns once it is committed."""
        with self._flush_lock:
            batch: list[Point] = []
            try:
                while True:
                    batch.append(self._points.popleft())
            except IndexError:
                pass
            try:
                write_points(self._db, self.run_id, batch)
            except BaseException:
                self._points.extendleft(reversed(batch))  # keep them for the next try
                raise

    def close(self) -> None:
        self.flush()
        _Flusher.unregister(self)


class _Flusher:
    """One daemon thread per process flushing every registered buffer."""

    interval = 1.0
    _buffers: weakref.WeakSet[MetricBuffer] = weakref.WeakSet()
    _thread: threading.Thread | None = None
    _event = threading.Event()
    _lock = threading.Lock()
    errors: list[BaseException] = []

    @classmethod
    def register(cls, buffer: MetricBuffer) -> None:
        with cls._lock:
            cls._buffers.add(buffer)
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._loop, name="mlplat-metric-flusher", daemon=True)
                cls._thread.start()

    @classmethod
    def unregister(cls, buffer: MetricBuffer) -> None:
        with cls._lock:
            cls._buffers.discard(buffer)

    @classmethod
    def wake(cls) -> None:
        cls._event.set()

    @classmethod
    def _loop(cls) -> None:
        while True:
            cls._event.wait(cls.interval)
            cls._event.clear()
            for buffer in list(cls._buffers):
                if len(buffer):
                    try:
                        buffer.flush()
                    except Exception as exc:  # noqa: BLE001 - kept for the run to report at its end
                        cls.errors.append(exc)


def flush_all() -> None:
    """Flush every buffer of this process (also runs at interpreter exit)."""
    for buffer in list(_Flusher._buffers):
        try:
            buffer.flush()
        except Exception:  # noqa: BLE001 - nothing to report to at exit
            pass


atexit.register(flush_all)
