"""The embedded online store: one SQLite file (WAL mode) under the Platform's home.

Records live in one table keyed by (view tag, entity key). A write is an
upsert whose WHERE clause compares the stored and new records' ranks (their
bytes 1..16, which order by event then created time), so the newer record
wins inside SQLite, also against a concurrent writer.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

from ..._native.codec import RecordBuffers
from ...db.engine import SQLITE_BUSY_TIMEOUT_MS, enable_wal
from ...errors import ConfigError, OnlineStoreError
from .store import OnlineStore, Progress, ReadGroup

__all__ = ["SQLiteOnlineStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS online_records (
    tag TEXT NOT NULL,
    key BLOB NOT NULL,
    rank BLOB NOT NULL,
    record BLOB NOT NULL,
    expire_at INTEGER NOT NULL,
    PRIMARY KEY (tag, key)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO online_records (tag, key, rank, record, expire_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (tag, key) DO UPDATE SET rank = excluded.rank, record = excluded.record, expire_at = excluded.expire_at
WHERE excluded.rank >= online_records.rank
"""
# tag = ? AND key IN (...) searches the full primary key; a row-value IN over (tag, key) would
# search by tag alone and scan the view (tests/test_online.py checks the query plan)
_SELECT = "SELECT key, record FROM online_records WHERE tag = ? AND key IN ({})"
_CHUNK = 900  # keys per SELECT, below SQLite's parameter limit
_TRANSACTION = 20_000  # records per write transaction

#: open stores, so that a forked child process drops the connections it inherited
_STORES: weakref.WeakSet = weakref.WeakSet()
#: connections inherited over a fork: kept referenced, never used or closed, in the child
_INHERITED: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    """A forked child (a pre-fork server's worker) opens connections of its own.

    SQLite forbids using a connection across ``fork()``: the child's copy shares the parent's WAL file
    handle and lock bookkeeping, so once the parent closed its connection (and so checkpointed and
    deleted the WAL) the child's writes went to the deleted file and were lost to every other process.
    The inherited connections are kept referenced, not closed (closing one in the child could touch
    the parent's files), and never used again.
    """
    for store in list(_STORES):
        _INHERITED.extend(store._all.values())
        store._all = {}
        store._local = threading.local()
        store._lock = threading.Lock()
        store._busy, store._closing = set(), set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SQLiteOnlineStore(OnlineStore):
    """Feature records in a local SQLite file; one connection per thread (and per process: a forked
    child opens its own)."""

    def __init__(self, url: str) -> None:
        self.name = url
        database = sa.make_url(url).database
        if not database or database == ":memory:":
            raise ConfigError(f"online store {url!r}: give a file, e.g. sqlite:///path/online.db")
        self._path = Path(database).expanduser()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder of the path should be, no permission
            why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
            raise OnlineStoreError(f"online store {self.name}: cannot make its folder {self._path.parent} "
                                   f"({why or exc})") from None
        self._local = threading.local()
        self._all: dict[threading.Thread, sqlite3.Connection] = {}  # each thread's, while it lives
        self._lock = threading.Lock()
        self._busy: set[sqlite3.Connection] = set()  # connections running a statement now (one per thread)
        self._closing: set[sqlite3.Connection] = set()  # closed by their thread once its statement is done
        _STORES.add(self)
        conn = self._take()
        try:
            conn.execute(_SCHEMA)
        finally:
            self._give_back(conn)

    def _take(self) -> sqlite3.Connection:
        """This thread's connection, marked busy until :meth:`_give_back`: :meth:`close` from another thread closed
        it under a running query, and the process died (SIGSEGV in sqlite3); now the thread using it closes it
        when done. (Plain calls, not a context manager: that cost 15 % of a one-entity read.)"""
        lock = self._lock
        while True:
            conn = self._conn()
            lock.acquire()
            if getattr(self._local, "conn", None) is conn:  # else close() came in between: a new one
                self._busy.add(conn)
                lock.release()
                return conn
            lock.release()

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._busy.discard(conn)
            if conn in self._closing:
                self._closing.discard(conn)
                conn.close()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self._path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
                )
                enable_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise OnlineStoreError(f"online store {self.name}: {exc}") from None
            self._local.conn = conn
            with self._lock:
                ended = [t for t in self._all if not t.is_alive()]
                for thread in ended:  # a thread-per-request server: without this, 2 files per request ever made
                    self._all.pop(thread).close()
                self._all[threading.current_thread()] = conn
        return conn

    def read(self, groups: Sequence[ReadGroup]) -> list[bytes | None]:
        out: list[bytes | None] = []
        conn = self._take()
        try:
            for tags, keys in groups:
                unique = list(dict.fromkeys(keys))
                for tag in tags:
                    found: dict[bytes, bytes] = {}
                    for i in range(0, len(unique), _CHUNK):
                        chunk = unique[i : i + _CHUNK]
                        found.update(conn.execute(_SELECT.format(",".join("?" * len(chunk))), [tag, *chunk]))
                    out.extend(found.get(k) for k in keys)
        except sqlite3.Error as exc:
            raise OnlineStoreError(f"online store {self.name}: reading: {exc}") from None
        finally:
            self._give_back(conn)
        return out

    def write(self, tag: str, records: RecordBuffers, progress: Progress | None = None) -> int:
        n = len(records)
        conn = self._take()
        applied = 0
        try:
            for start in range(0, n, _TRANSACTION):
                stop = min(n, start + _TRANSACTION)
                rows = []
                for i in range(start, stop):
                    rec = records.record(i)
                    rows.append((tag, records.key(i), rec[1:17], rec, int(records.expire_at_ms[i])))
                before = conn.total_changes
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_UPSERT, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLite rolled back itself on some errors (a full disk): then a
                        with contextlib.suppress(sqlite3.Error):  # ROLLBACK's "no transaction is active" hid
                            conn.execute("ROLLBACK")  # the error that mattered
                    raise
                applied += conn.total_changes - before
                if progress is not None:
                    progress(stop - start)
        except sqlite3.Error as exc:
            raise OnlineStoreError(f"online store {self.name}: writing {tag}: {exc}") from None
        finally:
            self._give_back(conn)
        return applied

    def delete_expired(self, tag: str, now_ms: int | None = None) -> int:
        """Drop records of ``tag`` whose ttl ran out."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        conn = self._take()
        try:
            return conn.execute(
                "DELETE FROM online_records WHERE tag = ? AND expire_at > 0 AND expire_at < ?", (tag, now_ms)
            ).rowcount
        except sqlite3.Error as exc:  # e.g. locked past the busy timeout by another writer
            raise OnlineStoreError(f"online store {self.name}: dropping expired records of {tag}: {exc}") from None
        finally:
            self._give_back(conn)

    def close(self) -> None:
        """Close every thread's connection; one running a statement now is closed by its thread when done (that
        call finishes; the thread's next call opens a new connection)."""
        with self._lock:
            for conn in self._all.values():
                if conn in self._busy:
                    self._closing.add(conn)
                else:
                    conn.close()
            self._all.clear()
            self._local = threading.local()
