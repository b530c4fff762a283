"""Redis and Redis Cluster online stores.

Commands are packed by the native codec and written straight onto redis-py's
connections, whose hiredis parser reads the replies: a read is one MGET per
node (one per hash slot on a cluster, pipelined), a write is EVALSHA of a
compare-and-set script over batches of records, several batches in flight.

URL: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS), or
``redis+cluster://host:port`` for a cluster (any node; the others are found).
mlplat's own query parameters:

==============  =======  ====================================================
``prefix``      mlplat:  prefix of every key (several platforms can share a db)
``timeout``     1.0      seconds to connect and to wait for a reply
``retries``     2        retries of a read or write batch after a connection
                         error (refused, reset) or time-out, 0.05 s, 0.1 s,
                         0.2 s ... at most 0.5 s apart (writes are
                         idempotent); on a cluster each retry reads the slot
                         layout anew first
``batch``       500      records per EVALSHA
==============  =======  ====================================================

Other query parameters go to redis-py (e.g. ``ssl_cert_reqs=none``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NoReturn, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from redis.connection import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import AskError, AuthenticationError, AuthorizationError, RedisClusterException, RedisError
from redis.exceptions import NoScriptError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._native import _codec
from ...settings import hide_password
from ..._native.codec import RecordBuffers
from ...errors import ConfigError, OnlineStoreError
from .store import OnlineStore, Progress, ReadGroup

__all__ = ["RedisOnlineStore", "CAS_SCRIPT"]

_T = TypeVar("_T")

#: Keep the newer record per key: bytes 2..17 (Lua's 1-based index) order records
#: by (event time, created time); equal ranks let the later write win, as the
#: offline rule lets the row read last win. The 16 bytes are compared as four
#: unsigned 32-bit numbers (exact in Lua's doubles): Lua's ``<=`` on strings is
#: strcoll, and redis-server sets LC_COLLATE from its environment, so under
#: en_US.UTF-8 it does not order bytes as numbers. (A byte-by-byte loop cost 45 %
#: more server time when a materialization is re-run; four numbers cost nothing.)
CAS_SCRIPT = b"""
local function not_older(cur, rec)
  local a1, a2, a3, a4 = struct.unpack('>I4I4I4I4', cur, 2)
  local b1, b2, b3, b4 = struct.unpack('>I4I4I4I4', rec, 2)
  if a1 ~= b1 then return a1 < b1 end
  if a2 ~= b2 then return a2 < b2 end
  if a3 ~= b3 then return a3 < b3 end
  return a4 <= b4
end
local applied = 0
for i = 1, #KEYS do
  local rec = ARGV[2 * i - 1]
  local cur = redis.call('GET', KEYS[i])
  if (not cur) or not_older(cur, rec) then
    local at = tonumber(ARGV[2 * i])
    if at > 0 then
      redis.call('SET', KEYS[i], rec, 'PXAT', at)
    else
      redis.call('SET', KEYS[i], rec)
    end
    applied = applied + 1
  end
end
return applied
"""
_IN_FLIGHT = 8  # write batches sent before their replies are read
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
#: connection errors that another try would only repeat (a wrong password, a user lacking a permission)
_PERMANENT = (AuthenticationError, AuthorizationError)
#: ... and on a cluster: no node answered the request for the slot layout, or a slot no node serves (yet)
_CLUSTER_TRANSIENT = _TRANSIENT + (RedisClusterException,)
#: what redis-py raises for a store it cannot use: RedisClusterException (no reachable node, cluster mode off,
#: a slot no node serves) is not a RedisError
_FAILURES = (RedisError, RedisClusterException)


@dataclass(frozen=True)
class _Options:
    prefix: str = "mlplat:"
    timeout: float = 1.0
    retries: int = 2
    batch: int = 500


def _parse(url: str) -> tuple[str, _Options, bool]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    cluster = scheme.endswith("+cluster")
    base_scheme = scheme.removesuffix("+cluster")
    if base_scheme not in ("redis", "rediss"):
        raise ConfigError(f"online store {url!r}: use redis://, rediss://, redis+cluster:// or rediss+cluster://")
    query = dict(parse_qsl(parts.query))
    try:
        opts = _Options(
            prefix=query.pop("prefix", "mlplat:"),
            timeout=float(query.pop("timeout", 1.0)),
            retries=int(query.pop("retries", 2)),
            batch=int(query.pop("batch", 500)),
        )
    except ValueError as exc:
        raise ConfigError(f"online store {hide_password(url)!r}: bad parameter ({exc})") from None
    if opts.timeout <= 0 or opts.retries < 0 or opts.batch < 1:
        raise ConfigError(f"online store {hide_password(url)!r}: timeout must be > 0, retries >= 0, batch >= 1")
    base = urlunsplit((base_scheme, parts.netloc, parts.path, urlencode(query), ""))
    return base, opts, cluster


@lru_cache(maxsize=1)
def _slot_of_bucket() -> np.ndarray:
    """Cluster hash slot of every bucket tag ``{b}``."""
    from redis.crc import key_slot

    return np.array([key_slot(b"{%d}" % b) for b in range(_codec.BUCKETS)], dtype=np.int64)


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt + 1``: 0.05, 0.1, 0.2, 0.4, then 0.5 each."""
    return min(0.05 * 2**attempt, 0.5)


def _roundtrip(pool: ConnectionPool, commands: Sequence[bytes], retries: int) -> list:
    """Send packed commands at once and read every reply (an error reply is returned, not raised). A connection
    error (refused, reset) or time-out, connecting as well as sending or reading, is retried ``retries`` times
    on a fresh connection, the whole batch again: reads change nothing and the write script only applies a
    record at least as new as the stored one, so applying a batch twice leaves what applying it once does."""
    payload = b"".join(commands) if len(commands) > 1 else commands[0]
    for attempt in range(retries + 1):
        conn = None
        try:
            conn = pool.get_connection()  # connects a new connection (or reconnects a stale one): may be refused
            conn.send_packed_command([payload], check_health=False)
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except _PERMANENT:
            if conn is not None:
                conn.disconnect()
            raise
        except _TRANSIENT:
            if conn is not None:
                conn.disconnect()
            if attempt == retries:
                raise
        except BaseException:
            if conn is not None:
                conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            if conn is not None:
                pool.release(conn)
        time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, RedisTimeoutError):
        return f"timed out after {timeout} s ({exc})"
    if isinstance(exc, RedisConnectionError):
        return f"cannot connect ({exc})"
    if isinstance(exc, ResponseError):
        return f"answered with an error: {exc}"
    if isinstance(exc, RedisClusterException):
        return f"cannot use the cluster ({exc})"
    return f"{type(exc).__name__}: {exc}"


class RedisOnlineStore(OnlineStore):
    """Feature records in Redis or a Redis Cluster (see the module docstring for the URL)."""

    def __init__(self, url: str) -> None:
        base, self._opts, cluster = _parse(url)
        self.name = hide_password(url)
        timeouts = {"socket_timeout": self._opts.timeout, "socket_connect_timeout": self._opts.timeout}
        self._cluster = None
        self._pool: ConnectionPool | None = None
        if cluster:
            from redis.cluster import RedisCluster

            try:
                self._cluster = RedisCluster.from_url(base, **timeouts)
            except _FAILURES as exc:
                raise OnlineStoreError(f"online store {self.name}: {_describe(exc, self._opts.timeout)}") from None
        else:
            self._pool = ConnectionPool.from_url(base, **timeouts)
        self._shas: dict[str, bytes] = {}  # node name -> script sha

    # ---------------------------------------------------------------- helpers
    def _fail(self, exc: BaseException, doing: str) -> OnlineStoreError:
        tries = ""
        if isinstance(exc, _TRANSIENT) and not isinstance(exc, _PERMANENT) and self._opts.retries:
            tries = f"; tried {self._opts.retries + 1} times"  # a connection error or time-out is raised once retried
        return OnlineStoreError(f"online store {self.name}: {doing} {_describe(exc, self._opts.timeout)}{tries}")

    def _moving(self, exc: _Moved, doing: str) -> OnlineStoreError:
        return OnlineStoreError(f"online store {self.name}: {doing} a node redirected the request ({exc}) again "
                                "after the cluster's slot layout was read anew: slots are being moved (resharding); "
                                "try again once the move is done")

    def _pools(self) -> dict[str, ConnectionPool]:
        """Every primary node's pool, by node name."""
        if self._pool is not None:
            return {"": self._pool}
        return {n.name: n.redis_connection.connection_pool for n in self._cluster.get_primaries()}

    def _node_of_slots(self, slots: np.ndarray) -> list[str]:
        nm = self._cluster.nodes_manager
        names = {int(s): nm.get_node_from_slot(int(s)).name for s in np.unique(slots)}
        return [names[int(s)] for s in slots]

    def _on_cluster(self, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt`` (a read or write on the cluster, each node's commands sent once), reading the slot layout
        anew before trying again after a MOVED/ASK reply (once: slots moved) or after a connection error or
        time-out (a node failed, restarted, or a replica took its slots over: nothing would redirect us, so a cached
        layout would keep failing), the latter ``retries`` times in all, as far apart as on one node."""
        moved, failures, stale = False, 0, False
        while True:
            try:
                if stale:
                    self._cluster.nodes_manager.initialize()
                    self._shas.clear()
                return attempt()
            except _Moved:
                if moved:
                    raise
                moved = True
            except _CLUSTER_TRANSIENT as exc:
                if failures == self._opts.retries or isinstance(exc, _PERMANENT):
                    raise
                time.sleep(_backoff(failures))
                failures += 1
            stale = True

    def _check(self, replies: list, doing: str) -> None:
        for r in replies:
            if isinstance(r, ResponseError):
                raise self._fail(r, doing)

    # ------------------------------------------------------------------- read
    def read(self, groups: Sequence[ReadGroup]) -> list[bytes | None]:
        groups = [(list(tags), list(keys)) for tags, keys in groups]
        if not any(tags and keys for tags, keys in groups):
            return []
        try:
            if self._pool is not None:
                (reply,) = _roundtrip(self._pool, [_codec.pack_mget(self._opts.prefix, groups)], self._opts.retries)
                self._check([reply], "reading:")
                return reply
            return self._on_cluster(lambda: self._cluster_read(groups))
        except _FAILURES as exc:
            raise self._fail(exc, "reading:") from None
        except _Moved as exc:
            raise self._moving(exc, "reading:") from None

    def _cluster_read(self, groups: list[tuple[list[str], list[bytes]]]) -> list[bytes | None]:
        slot_table = _slot_of_bucket()
        out: list[bytes | None] = []
        # per node: commands (one MGET per slot) and where each reply's values go
        plan: dict[str, tuple[list[bytes], list[list[int]]]] = {}
        for tags, keys in groups:
            base = len(out)
            out.extend([None] * (len(tags) * len(keys)))
            slots = slot_table[[_codec.bucket_of(k) for k in keys]] if keys else np.zeros(0, np.int64)
            nodes = self._node_of_slots(slots)
            by_slot: dict[tuple[str, int], list[int]] = {}
            for i, (node, slot) in enumerate(zip(nodes, slots.tolist())):
                by_slot.setdefault((node, slot), []).append(i)
            for (node, _), idx in by_slot.items():
                full_keys, positions = [b"MGET"], []
                for t, tag in enumerate(tags):
                    full_keys += _codec.redis_keys(self._opts.prefix, tag, [keys[i] for i in idx])
                    positions += [base + t * len(keys) + i for i in idx]
                cmds, where = plan.setdefault(node, ([], []))
                cmds.append(_codec.pack_command(full_keys))
                where.append(positions)
        pools = self._pools()
        for node, (cmds, where) in plan.items():
            replies = _roundtrip(pools[node], cmds, 0)  # _on_cluster retries, with the layout read anew
            for reply, positions in zip(replies, where):
                if isinstance(reply, ResponseError):
                    _raise_reply(reply)
                for pos, value in zip(positions, reply):
                    out[pos] = value
        return out

    # ------------------------------------------------------------------ write
    def _sha(self, node: str, pool: ConnectionPool, retries: int) -> bytes:
        sha = self._shas.get(node)
        if sha is None:
            (reply,) = _roundtrip(pool, [_codec.pack_command([b"SCRIPT", b"LOAD", CAS_SCRIPT])], retries)
            self._check([reply], "loading the write script:")
            sha = self._shas[node] = reply if isinstance(reply, bytes) else str(reply).encode()
        return sha

    def write(self, tag: str, records: RecordBuffers, progress: Progress | None = None) -> int:
        n = len(records)
        if n == 0:
            return 0
        try:
            if self._pool is not None:
                rows = np.arange(n, dtype=np.int64)
                return self._write_node("", self._pool, tag, records, _batches(rows, self._opts.batch), progress)
            done = _Done(np.zeros(n, dtype=bool))
            self._on_cluster(lambda: self._cluster_write(tag, records, progress, done))
            return done.applied
        except _FAILURES as exc:
            raise self._fail(exc, f"writing {tag}:") from None
        except _Moved as exc:
            raise self._moving(exc, f"writing {tag}:") from None

    def _cluster_write(self, tag: str, records: RecordBuffers, progress: Progress | None, done: _Done) -> None:
        """Write the records not yet ``done`` (a try before this one may have written some), grouped by node."""
        rows = np.flatnonzero(~done.rows)
        slots = _slot_of_bucket()[records.buckets()[rows]]
        order = np.argsort(slots, kind="stable")  # stable: a key's records keep their order
        slots, rows = slots[order], rows[order]
        cut = np.flatnonzero(np.diff(slots)) + 1
        nodes = self._node_of_slots(slots[np.concatenate(([0], cut))]) if len(slots) else []
        per_node: dict[str, list[np.ndarray]] = {}
        for node, node_rows in zip(nodes, np.split(rows, cut)):
            per_node.setdefault(node, []).extend(_batches(node_rows, self._opts.batch))
        pools = self._pools()
        for node, batches in per_node.items():
            self._write_node(node, pools[node], tag, records, batches, progress, done)

    def _write_node(self, node: str, pool: ConnectionPool, tag: str, records: RecordBuffers,
                    batches: list[np.ndarray], progress: Progress | None, done: _Done | None = None) -> int:
        """Write the batches to one node, ``_IN_FLIGHT`` at a time; on a cluster (``done`` given) the windows
        written are marked done as they are, for ``_on_cluster`` to try again the rest only."""
        applied = 0
        retries = self._opts.retries if done is None else 0  # on a cluster _on_cluster retries
        for start in range(0, len(batches), _IN_FLIGHT):
            window = batches[start : start + _IN_FLIGHT]
            for attempt in range(2):
                sha = self._sha(node, pool, retries).decode()
                cmds = [_codec.pack_evalsha(sha, self._opts.prefix, tag, records.key_data, records.key_offsets,
                                            records.rec_data, records.rec_offsets, records.expire_at_ms, rows)
                        for rows in window]
                replies = _roundtrip(pool, cmds, retries)
                if attempt == 0 and any(_no_script(r) for r in replies):
                    self._shas.pop(node, None)  # the server lost the script (restart, SCRIPT FLUSH): load it again
                    continue
                for r in replies:
                    if isinstance(r, ResponseError):
                        _raise_reply(r)
                break
            written = sum(int(r) for r in replies)
            applied += written
            if done is not None:
                done.applied += written
                for rows in window:
                    done.rows[rows] = True
            if progress is not None:
                progress(sum(len(rows) for rows in window))
        return applied

    def close(self) -> None:
        if self._pool is not None:
            self._pool.disconnect()
        if self._cluster is not None:
            self._cluster.close()


@dataclass
class _Done:
    """A cluster write's progress across tries: the records written, and how many of them the script applied."""

    rows: np.ndarray
    applied: int = 0


class _Moved(Exception):
    """A cluster node answered MOVED/ASK: the slot layout changed."""


def _raise_reply(reply: ResponseError) -> NoReturn:
    """Raise a cluster node's error reply: :class:`_Moved` when it says the slot is (being) served elsewhere
    (MOVED, ASK; TRYAGAIN: a multi-key command in a slot half-way through a move), else the reply itself.
    redis-py's parsers turn MOVED and ASK replies into MovedError / AskError whose text drops the word
    ("3999 127.0.0.1:7001"), so the class tells, and the word is put back for the message."""
    word = {"MovedError": "MOVED", "AskError": "ASK", "TryAgainError": "TRYAGAIN"}.get(type(reply).__name__, "")
    text = str(reply)
    if isinstance(reply, (AskError, TryAgainError)) or text.startswith(("MOVED", "ASK", "TRYAGAIN")):
        raise _Moved(text if not word or text.startswith(word) else f"{word} {text}")
    raise reply


def _no_script(reply: object) -> bool:
    """Whether a reply says the server lacks the script (restarted, SCRIPT FLUSH). redis-py's parsers turn it into
    NoScriptError, whose text drops the word (\"No matching script. Please use EVAL.\")."""
    return isinstance(reply, NoScriptError) or (isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"))


def _batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]
