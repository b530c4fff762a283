"""The online store interface: read records in one round trip, write them keeping the newer.

A record is one (entity, view version) value encoded by ``mlplat._native._codec``;
its bytes 1..16 order records by (event time, created time), so a store keeps
the newer of two records with a byte comparison done where the data lives
(a Lua script in Redis, an upsert's WHERE clause in SQLite), never by reading
into Python first.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from ..._native.codec import RecordBuffers

__all__ = ["OnlineStore", "ReadGroup", "Progress"]

ReadGroup = tuple[Sequence[str], Sequence[bytes]]  # (view tags, entity keys)
Progress = Callable[[int], None]  # called with the number of records just written


class OnlineStore(ABC):
    """Where materialized feature values live for low-latency reads."""

    #: the store's URL without credentials, for messages
    name: str

    @property
    def identity(self) -> str:
        """The records this store holds, as materialization progress is recorded for it: by default its name;
        a URL's connection settings (a timeout) are left out where they do not change what is read."""
        return self.name

    @abstractmethod
    def read(self, groups: Sequence[ReadGroup]) -> list[bytes | None]:
        """The record of every (tag, key), group by group, tag-major within a group.

        One network round trip on a single node; one per node on a cluster.
        A missing record is None.
        """

    @abstractmethod
    def write(self, tag: str, records: RecordBuffers, progress: Progress | None = None) -> int:
        """Store records under ``tag``, keeping per key the newer of the stored and the new record.

        Returns how many records were written (the rest were older than what
        was stored). Each key holds either its old or its new record, never a
        mix, also when a batch fails half way.
        """

    def delete_expired(self, tag: str, now_ms: int | None = None) -> int:
        """Drop records of ``tag`` whose ttl ran out; returns how many. Stores that expire records
        themselves (Redis, with PXAT) have nothing to do."""
        return 0

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
