"""Exactly-once batch writes for buffered writers (metric points, A/B decisions and outcomes).

A writer's flush writes its batch in one transaction together with a marker row (``flush_marks``) named by
the batch's id, a uuid4. A batch whose flush fails goes back, with its id, ahead of what was buffered since,
and is written again with that id by the next flush. Its outcome is unknown: an interrupt (Ctrl-C) can land
as the commit returns, after the database committed and before Python learned so. The next flush therefore
looks its marker up in its own transaction first and drops the batch if the marker is there.

Markers are deleted by a later transaction of the writer that wrote them (its next flush, or its close),
once it knows the batch committed and holds it no more: deleting a marker in the transaction that found it
would lose it when that transaction's own outcome is lost in turn, and the batch would be written again.
So the table holds about one marker per live writer; a process that dies leaves those of its writers (its
last flush's, and those of batches it still held): a few dozen bytes each, never read again.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .engine import Database
from .models import FlushMark

__all__ = ["Batch", "OnceWriter"]

T = TypeVar("T")  # a batch as the writer buffered it
P = TypeVar("P")  # the same, ready for its INSERTs


@dataclass(eq=False)
class Batch(Generic[T, P]):
    """One flush's rows and the id its marker has, kept from one try to the next."""

    rows: T | None  # as buffered; let go once prepared
    size: int  # rows (points, decisions) it holds: what the writer's len() counts while it waits
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tried: bool = False  # a flush of it failed: it may have committed all the same
    prepared: P | None = None


class OnceWriter(Generic[T, P]):
    """Writes one writer's batches, each exactly once. Not thread-safe: call under the writer's flush lock.

    ``prepare`` turns a buffered batch into what ``write`` inserts (once per batch, outside the transaction);
    ``write`` inserts one batch's rows on the flush's connection.
    """

    def __init__(self, db: Database, write: Callable[[Connection, P], None], prepare: Callable[[T], P]) -> None:
        self._db = db
        self._write = write
        self._prepare = prepare
        self._failed: list[Batch[T, P]] = []  # batches a flush failed to write, oldest first
        self._known: list[str] = []  # committed batches this writer holds no more: their markers can go

    @property
    def waiting(self) -> int:
        """Rows of the batches waiting for another try (not those of a flush running now)."""
        return sum(b.size for b in self._failed)

    def forked(self) -> None:
        """In a forked child: the parent writes its failed batches and deletes its markers."""
        self._failed, self._known = [], []

    def flush(self, take: Callable[[], tuple[T, int]]) -> None:
        """Write the failed batches, then the new one ``take()`` hands over (rows, count; none at 0), in one
        transaction. On any error or interrupt before the commit returns they all wait for the next flush."""
        batches, forget, committed = self._failed, self._known[:], False
        try:
            self._failed = []
            rows, size = take()
            if size:
                batches = [*batches, Batch(rows, size)]
            if not batches:
                return
            for b in batches:
                if b.rows is not None:
                    b.prepared, b.rows = self._prepare(b.rows), None
            with self._db.connect(write=True) as conn:
                retried = [b.id for b in batches if b.tried]
                done = set(conn.scalars(sa.select(FlushMark.id).where(FlushMark.id.in_(retried)))) if retried else set()
                todo = [b for b in batches if b.id not in done]
                for b in batches:
                    b.tried = True
                if forget:
                    conn.execute(sa.delete(FlushMark).where(FlushMark.id.in_(forget)))
                if todo:
                    # markers first: a marker still locked by an older try of the batch (PostgreSQL) waits for
                    # it, and if that one committed after all this INSERT fails, and the batch waits again
                    conn.execute(sa.insert(FlushMark), [{"id": b.id} for b in todo])
                for b in todo:
                    self._write(conn, b.prepared)  # type: ignore[arg-type]  # prepared above
                conn.commit()
                committed = True
        finally:
            if committed:  # none of them is held any more: their markers can go in a later transaction
                del self._known[:len(forget)]
                self._known += [b.id for b in batches]
            else:  # ahead of what was buffered meanwhile, each with its id
                self._failed = batches

    def tidy(self) -> None:
        """Delete the markers of the batches known to be committed (when the writer closes). Best effort: a
        marker left behind is a small row, never read again."""
        forget = self._known[:]
        if not forget:
            return
        try:
            with self._db.connect(write=True) as conn:
                conn.execute(sa.delete(FlushMark).where(FlushMark.id.in_(forget)))
        except Exception:  # noqa: BLE001 - the batches are written; only the clean-up failed
            return
        del self._known[:len(forget)]
