"""Buffered metric logging: a training loop pays three list appends, a background thread writes.

``MetricBuffer.add`` appends the point to its key's lists under a lock held
for a few hundred nanoseconds. The process's flusher thread (``mlplat._background``)
writes every buffer every second, or sooner once a buffer holds
``max_points``; a run flushes when it ends and every buffer flushes at
interpreter exit. A flush is one transaction that writes, per key, one row of
packed arrays (``run_metric_chunks``: steps, values, timestamps) and moves
the key's latest value forward (``run_latest_metrics``: an upsert that only
takes a greater (step, timestamp)), with a marker row naming the batch
(``flush_marks``, :mod:`mlplat.db.batches`): a batch retried after an
interrupt that hid its commit is written once. What was flushed survives a
crash or a kill; values, NaN and infinities included, are stored exactly.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .. import _background
from .._arrow import INT64_MAX, INT64_MIN
from .._checks import as_int, shown
from ..db import Database
from ..db.batches import OnceWriter
from ..db.models import LatestMetric, MetricChunk
from ..errors import DataError

__all__ = ["MetricBuffer", "metric_value", "chunk_rows", "insert_chunks", "write_chunks", "read_history"]

_INT64_MIN, _INT64_MAX = INT64_MIN, INT64_MAX  # module names: log_metric's inline checks read them per call


@dataclass
class _Points:
    """Points of one key waiting to be written."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)


_Rows = tuple[list[dict], list[dict]]  # a flush's rows: the chunks, the latest values


def chunk_rows(run_id: str, batch: dict[str, _Points]) -> _Rows:
    """The rows one flush of a run writes: a packed chunk per key and the key's latest value.

    Keys come in sorted order: the upsert of the latest values locks one row per key, and two processes
    flushing one run (a resumed run) that locked them in different orders deadlocked on PostgreSQL. Every
    upsert of one run's rows (params, tags, latest metrics) takes them sorted by key.
    """
    chunks, latest = [], []
    for key, pts in sorted(batch.items()):
        if not pts.steps:
            continue
        steps = np.asarray(pts.steps, dtype="<i8")
        values = np.asarray(pts.values, dtype="<f8")
        stamps = np.asarray(pts.timestamps, dtype="<i8")
        last = np.lexsort((stamps, steps))[-1]  # greatest step, then latest time, then logged last
        chunks.append({"run_id": run_id, "key": key, "count": len(steps), "first_step": int(steps.min()),
                       "last_step": int(steps.max()), "steps": steps.tobytes(), "values": values.tobytes(),
                       "timestamps": stamps.tobytes()})
        value = float(values[last])
        latest.append({"run_id": run_id, "key": key, "value": None if value != value else value,
                       "step": int(steps[last]), "timestamp": int(stamps[last])})
    return chunks, latest


def insert_chunks(conn: sa.Connection, rows: _Rows) -> None:
    """INSERT one flush's chunks and move each key's latest value forward, on the caller's transaction."""
    chunks, latest = rows
    if not chunks:
        return
    conn.execute(sa.insert(MetricChunk), chunks)
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(LatestMetric)
    t = LatestMetric.__table__
    newer = sa.or_(insert.excluded.step > t.c.step,
                   sa.and_(insert.excluded.step == t.c.step, insert.excluded.timestamp >= t.c.timestamp))
    conn.execute(insert.on_conflict_do_update(
        index_elements=[t.c.run_id, t.c.key],
        set_={"value": insert.excluded.value, "step": insert.excluded.step, "timestamp": insert.excluded.timestamp},
        where=newer,
    ), latest)


def write_chunks(db: Database, run_id: str, batch: dict[str, _Points]) -> None:
    """Write one flush of a run in one transaction, as it is: no exactly-once marker (a retry after an unknown
    outcome may write it twice). :class:`MetricBuffer` writes through :class:`~mlplat.db.batches.OnceWriter`."""
    rows = chunk_rows(run_id, batch)
    if rows[0]:
        with db.connect(write=True) as conn:
            insert_chunks(conn, rows)


def read_history(db: Database, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, timestamps, values) of every point of one metric, ordered by step, then time, then logging."""
    with db.connect() as conn:
        rows = conn.execute(sa.select(MetricChunk.steps, MetricChunk.timestamps, MetricChunk.values).where(
            MetricChunk.run_id == run_id, MetricChunk.key == key).order_by(MetricChunk.id)).all()
    if not rows:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float64)
    steps = np.concatenate([np.frombuffer(r.steps, dtype="<i8") for r in rows])
    stamps = np.concatenate([np.frombuffer(r.timestamps, dtype="<i8") for r in rows])
    values = np.concatenate([np.frombuffer(r.values, dtype="<f8") for r in rows])
    order = np.lexsort((stamps, steps))  # stable: equal (step, time) keep the order they were written in
    return steps[order], stamps[order], values[order]


def _int64(key: str, what: str, value: object, meaning: str) -> int:
    """``value`` as a whole number within int64 (numpy and torch integers too), or DataError."""
    number = as_int(value)
    if number is not None and _INT64_MIN <= number <= _INT64_MAX:
        return number
    raise DataError(f"metric {key!r}: {what} must be {meaning}, an int between -2**63 and 2**63-1; "
                    f"got {shown(value)}")


def metric_value(key: str, value: object) -> float:
    """``float(value)``, else DataError naming the metric: a number, a numpy number, a one-element tensor."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"metric {key!r} must be a number, got {shown(value)}: log an int, a float, a numpy "
                        "number or a one-element tensor") from None
    except OverflowError:  # an int past a double's range (10**400): refused, not stored as inf
        raise DataError(f"metric {key!r}: {shown(value)} is too large for a float (a 64-bit double, at most "
                        "about 1.8e308); scale it, or log float('inf') if infinity is meant") from None


class MetricBuffer:
    """Points logged to one run, waiting for the flusher.

    ``resumed``: the run may already hold points, so a key's default step starts after its stored
    greatest step (read once per key) instead of at 0.
    """

    def __init__(self, db: Database, run_id: str, *, max_points: int = 100_000, resumed: bool = False) -> None:
        self._db = db
        self.run_id = run_id
        self._owner = f"the metrics of run {run_id}"  # how a failed background flush names them
        self._pending: dict[str, _Points] = {}
        self._count = 0
        self._next_step: dict[str, int] = {}
        self._resumed = resumed
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._max = max_points
        # flushes go through it: each batch is written once, also when an interrupt hides its commit
        self._once: OnceWriter[dict[str, _Points], _Rows] = OnceWriter(
            db, insert_chunks, lambda batch: chunk_rows(run_id, batch))
        _background.register(self)

    def forked(self) -> None:
        """In a forked child: nothing pending (the parent writes the points logged before the fork) and
        fresh locks (one held by a thread at the fork is never released in the child)."""
        self._lock, self._flush_lock = threading.Lock(), threading.Lock()
        self._pending, self._count = {}, 0
        self._once.forked()

    def add(self, key: str, value: float, step: int | None, timestamp_ms: int | None) -> None:
        """Buffer one point; a value, step or time that could not be stored is refused here, not at flush."""
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            v = metric_value(key, value)  # raises the DataError saying what is wrong
        # a plain int in range passes with one type test and a comparison (the checks cost 25 % of a
        # log_metric call as a function call per point)
        if step is not None and not (type(step) is int and _INT64_MIN <= step <= _INT64_MAX):
            step = _int64(key, "step", step, "a whole step number (leave it out for the key's next step)")
        if timestamp_ms is None:
            ts = time.time_ns() // 1_000_000
        elif type(timestamp_ms) is int and _INT64_MIN <= timestamp_ms <= _INT64_MAX:
            ts = timestamp_ms
        else:
            ts = _int64(key, "timestamp_ms", timestamp_ms, "whole milliseconds since the epoch (leave it out for now)")
        if step is None and self._resumed and key not in self._next_step:
            first = self._stored_next_step(key)
            with self._lock:
                self._next_step.setdefault(key, first)
        with self._lock:
            if step is None:
                step = self._next_step.get(key, 0)
                if step > _INT64_MAX:  # the last step given was 2**63 - 1
                    raise DataError(f"metric {key!r}: the next default step is past int64; pass step=")
            self._next_step[key] = step + 1
            pts = self._pending.get(key)
            if pts is None:
                pts = self._pending[key] = _Points()
            pts.steps.append(step)
            pts.values.append(v)
            pts.timestamps.append(ts)
            self._count += 1
            count = self._count
        _background.added(self, count, self._max)

    def _stored_next_step(self, key: str) -> int:
        """One past the greatest step stored for ``key`` (0 for a key the run does not have yet)."""
        with self._db.connect() as conn:
            last = conn.scalar(sa.select(LatestMetric.step).where(LatestMetric.run_id == self.run_id,
                                                                  LatestMetric.key == key))
        return 0 if last is None else last + 1

    def __len__(self) -> int:
        return self._count + self._once.waiting

    def _take(self) -> tuple[dict[str, _Points], int]:
        with self._lock:
            batch, count, self._pending, self._count = self._pending, self._count, {}, 0
        return batch, count

    def flush(self) -> None:
        """Write everything logged so far; returns once it is committed. A batch whose flush failed waits,
        ahead of the points logged since, and is written once by a later flush (see :mod:`mlplat.db.batches`)."""
        with self._flush_lock:
            self._once.flush(self._take)

    def close(self) -> None:
        self.flush()
        with self._flush_lock:
            self._once.tidy()
        _background.unregister(self)
