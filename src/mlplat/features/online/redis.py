"""Redis and Redis Cluster online stores.

Commands are packed by the native codec and written straight onto redis-py's
connections, whose hiredis parser reads the replies: a read is one MGET per
node (one per hash slot on a cluster, pipelined), a write is EVALSHA of a
compare-and-set script over batches of records, several batches in flight.

URL: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS), or
``redis+cluster://host:port`` for a cluster (any node; the others are found).
mlplat's own query parameters:

==============  =======  ====================================================
``prefix``      mlplat:  prefix of every key (several platforms can share a db);
                         on a cluster no ``{`` or ``}`` (it hashes a key by them)
``timeout``     1.0      seconds to connect and to wait for a reply
``retries``     2        retries of a read or write batch after a connection
                         error (refused, reset) or time-out, 0.05 s, 0.1 s,
                         0.2 s ... at most 0.5 s apart (writes are
                         idempotent); on a cluster each retry reads the slot
                         layout anew first; a CLUSTERDOWN or MASTERDOWN
                         reply (a failover under way) is retried as
                         often, and a TRYAGAIN reply to a one-key command
                         (see below) waited out as often
``batch``       500      records per EVALSHA
==============  =======  ====================================================

A cluster being resharded (``redis-cli --cluster reshard``, ``CLUSTER SETSLOT
... MIGRATING/IMPORTING`` + ``MIGRATE``) keeps serving reads and writes, as the
Redis Cluster spec has clients do:

* ``MOVED`` (a slot's move is done): the command is sent to the node named, and
  the slot layout read anew (once per read or write batch), so that the next
  requests go there at once.
* ``ASK`` (a slot half-way through a move, the keys not on its old node): the
  command is sent to the node named, preceded by ``ASKING``; the layout is left
  as it is (the slot is still the old node's).
* ``TRYAGAIN`` (a command over several keys of such a slot, some moved, some
  not): the command is sent again at once as one command per key, to the slot's
  node, which serves each key or answers ``ASK``. Redis never answers a one-key
  command so, so a read or write neither waits for a move to end nor fails while
  a move is stuck half-way; were it to all the same, the command is tried again
  ``retries`` times, as far apart as after a connection error, and is then an
  error saying the slot is being moved.

Only the commands a node answered so are sent again (and the write batches
after one of their slot, after it: of two records of a key with equal times the
later still wins), each reply put in its place, and a write batch the script
applied is counted once. A command redirected 6 times in a row (nodes that
disagree on a slot's owner; a MOVED after the first waits 0.05 s, 0.1 s ...) is
an error: the sixth redirect is not followed.

Other query parameters go to redis-py (e.g. ``ssl_cert_reqs=none``); one it does not take is a
ConfigError when the store opens.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from redis.connection import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import AskError, AuthenticationError, AuthorizationError, ClusterDownError, MasterDownError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import MovedError, NoScriptError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._native import _codec
from ...settings import hide_password
from ..._native.codec import RecordBuffers
from ...errors import ConfigError, OnlineStoreError
from .store import OnlineStore, Progress, ReadGroup

__all__ = ["RedisOnlineStore", "CAS_SCRIPT"]

_T = TypeVar("_T")
_U = TypeVar("_U")

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
_RESTARTS = 3  # times one write starts again because the server lost its state, before it gives up
#: MOVED / ASK / TRYAGAIN hops of a node's commands before it is an error: a command over several keys of a slot
#: half-way through a move takes three at most (ASK: to the new node; TRYAGAIN: one command per key to the old
#: node; ASK), a MOVED before them one more
_HOPS = 6
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
#: connection errors that another try would only repeat (a wrong password, a user lacking a permission)
_PERMANENT = (AuthenticationError, AuthorizationError)
#: ... and on a cluster: no node answered the request for the slot layout, or a slot no node serves (yet)
_CLUSTER_TRANSIENT = _TRANSIENT + (RedisClusterException,)
#: ... and a node's CLUSTERDOWN / MASTERDOWN reply: the cluster lost a primary and has not yet promoted a replica
#: (every node answers so while a slot has no primary, for up to the cluster's node timeout), or a replica lost its
#: primary: another try after a wait may find the failover done
_CLUSTER_DOWN = (ClusterDownError,)  # MasterDownError is one
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
    if cluster and ("{" in opts.prefix or "}" in opts.prefix):  # a key's hash tag must be its bucket's "{b}"
        raise ConfigError(f"online store {hide_password(url)!r}: prefix {opts.prefix!r} holds a brace; a Redis "
                          "Cluster would hash the keys by the prefix's braces instead of their bucket's: leave "
                          "'{' and '}' out of it")
    decode = query.pop("decode_responses", "")  # redis-py takes the text as is: "false" would be true
    if decode.upper() not in ("", "0", "F", "FALSE", "N", "NO"):
        raise ConfigError(f"online store {hide_password(url)!r}: decode_responses={decode} would make redis-py "
                          "decode the binary feature records as text (every read failing); leave it out")
    if not opts.timeout > 0 or opts.timeout == float("inf") or opts.retries < 0 or opts.batch < 1:
        raise ConfigError(f"online store {hide_password(url)!r}: timeout must be a finite number > 0 (seconds), "
                          "retries >= 0, batch >= 1")
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


_INFO_SERVER = _codec.pack_command([b"INFO", b"server"])  # its run_id names the server process, new at each start


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
    if isinstance(exc, ClusterDownError):
        return f"answered with an error: {_reply_text(exc)} (a failover under way? give retries= room to wait it out)"
    if isinstance(exc, ResponseError):
        return f"answered with an error: {_reply_text(exc)}"
    if isinstance(exc, RedisClusterException):
        return f"cannot use the cluster ({exc})"
    return f"{type(exc).__name__}: {exc}"


class RedisOnlineStore(OnlineStore):
    """Feature records in Redis or a Redis Cluster (see the module docstring for the URL)."""

    def __init__(self, url: str) -> None:
        base, self._opts, cluster = _parse(url)
        self.name = hide_password(url)
        parts = urlsplit(url)  # what is read: the server(s), the database and the key prefix, not how to connect
        prefix = urlencode({"prefix": self._opts.prefix}) if self._opts.prefix != _Options.prefix else ""
        # a db= parameter (the last, as _parse passes it on) is the database redis-py uses, not the path's
        db = dict(parse_qsl(parts.query)).get("db")
        try:
            path = parts.path if db is None else f"/{int(db)}"
        except ValueError:
            raise ConfigError(f"online store {self.name}: db={db!r} is not a database number") from None
        self._identity = urlunsplit((parts.scheme.lower(), parts.netloc.rpartition("@")[2], path, prefix, ""))
        timeouts = {"socket_timeout": self._opts.timeout, "socket_connect_timeout": self._opts.timeout}
        self._cluster = None
        self._pool: ConnectionPool | None = None
        try:
            if cluster:
                from redis.cluster import KWARGS_DISABLED_KEYS, REDIS_ALLOWED_KEYS, RedisCluster

                ignored = [k for k, _ in parse_qsl(urlsplit(base).query)  # which RedisCluster drops unseen
                           if k != "db" and (k not in REDIS_ALLOWED_KEYS or k in KWARGS_DISABLED_KEYS)]
                if ignored:
                    raise TypeError(f"redis-py's cluster client ignores {', '.join(dict.fromkeys(ignored))}")
                try:
                    self._cluster = RedisCluster.from_url(base, **timeouts)
                except _FAILURES as exc:
                    raise OnlineStoreError(f"online store {self.name}: {_describe(exc, self._opts.timeout)}") from None
            else:
                self._pool = ConnectionPool.from_url(base, **timeouts)
                self._pool.connection_class(**self._pool.connection_kwargs)  # its arguments checked, no socket yet
        except (TypeError, ValueError, OverflowError) as exc:  # a query parameter redis-py does not take
            raise ConfigError(f"online store {self.name}: a query parameter is wrong ({exc}); mlplat's are prefix, "
                              "timeout, retries and batch, the others go to redis-py (e.g. ssl_cert_reqs=none)"
                              ) from None
        self._shas: dict[str, bytes] = {}  # node name -> script sha
        self._unlisted: dict[str, Any] = {}  # MOVED/ASK targets the slot layout lacks: node name -> ClusterNode
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        """The URL without credentials and connection settings (timeout, retries, batch, redis-py's): changing
        one of them kept the records but lost the materialization progress (the next run read the whole ttl)."""
        return self._identity

    # ---------------------------------------------------------------- helpers
    def _fail(self, exc: BaseException, doing: str) -> OnlineStoreError:
        tries = ""
        retried = isinstance(exc, _TRANSIENT) or (self._cluster is not None and isinstance(exc, _CLUSTER_DOWN))
        if retried and not isinstance(exc, _PERMANENT) and self._opts.retries:
            tries = f"; tried {self._opts.retries + 1} times"  # a connection error or time-out is raised once retried
        return OnlineStoreError(f"online store {self.name}: {doing} {_describe(exc, self._opts.timeout)}{tries}")

    def _moving(self, exc: _Unsettled, doing: str) -> OnlineStoreError:
        return OnlineStoreError(f"online store {self.name}: {doing} {exc}")

    def _node_of_slots(self, slots: np.ndarray, pools: dict[str, ConnectionPool]) -> list[str]:
        """The name of each slot's node, its pool put in ``pools``: taken from the same layout, which another thread
        may read anew meanwhile (after a MOVED reply), leaving out a node that serves no slot now."""
        nm = self._cluster.nodes_manager
        names = {}
        for s in np.unique(slots).tolist():
            node = nm.get_node_from_slot(s)
            names[s] = node.name
            if node.name not in pools:
                pools[node.name] = self._cluster.get_redis_connection(node).connection_pool
        return [names[int(s)] for s in slots]

    def _on_cluster(self, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt`` (a read or write on the cluster, each node's commands sent once; ``_settle`` follows
        MOVED, ASK and TRYAGAIN replies), reading the slot layout anew before trying again after a connection error
        or time-out (a node failed, restarted, or a replica took its slots over: nothing would redirect us, so a
        cached layout would keep failing), ``retries`` times in all, as far apart as on one node."""
        failures, stale = 0, False
        while True:
            try:
                if stale:
                    self._cluster.nodes_manager.initialize()
                    self._shas.clear()
                return attempt()
            except _CLUSTER_TRANSIENT + _CLUSTER_DOWN as exc:
                if failures == self._opts.retries or isinstance(exc, _PERMANENT):
                    raise
                time.sleep(_backoff(failures))
                failures += 1
            stale = True

    def _node(self, reply: AskError) -> tuple[str, ConnectionPool]:
        """The name and pool of the node a MOVED or ASK reply names: the cluster client's own, or for a node that
        serves no slot yet (one just added to the cluster, the move's target), one that redis-py's nodes manager
        makes with the client's settings (password, TLS, time-outs), kept until close()."""
        from redis.cluster import PRIMARY, ClusterNode, get_node_name

        nm = self._cluster.nodes_manager
        host, port = nm.remap_host_port(reply.host, reply.port)
        node = nm.get_node(host=host, port=port)
        if node is None:
            name = get_node_name(host, port)
            with self._lock:
                node = self._unlisted.get(name)
                if node is None:
                    node = self._unlisted[name] = ClusterNode(host, port, PRIMARY)
        return node.name, self._cluster.get_redis_connection(node).connection_pool

    def _settle(self, node: str, pool: ConnectionPool, pending: list[tuple[bytes, _U, ResponseError | None]],
                split: Callable[[_U], list[tuple[bytes, _U]]], take: Callable[[_U, Any], None],
                script: bool, slot_of: Callable[[_U], int] | None = None) -> None:
        """Send on the commands to ``node`` (``pool``) that a slot's move left unanswered, ``(command, unit,
        reply)`` (reply ``None``: not sent yet, for ``node``), as the Redis Cluster spec has clients do: after MOVED,
        to the node named, the slot layout read anew (once); after ASK, to the node named, preceded by ASKING, the
        layout left as it is; after TRYAGAIN (several keys of a slot, some of them moved) as one command per key
        (``split``) to the slot's node, which serves each key or answers ASK: one key is never TRYAGAIN, and one
        that is all the same is sent again ``retries`` times, as far apart as after a connection error. Only those
        commands: ``take(unit, reply)`` gets each command's reply once its round is answered; any other error reply is
        raised.
        ``script``: EVALSHA commands, whose script is loaded on a node that lacks it. ``slot_of`` (writes, whose
        order within a slot matters: of two records of a key with equal times the later wins): the commands are sent
        in the order given, and one answered after an earlier one of its slot that is sent on once more is not taken
        but sent again after it (a record it set may be overwritten by the earlier one's)."""
        waits = hops = moves = 0
        relaid = False  # the slot layout read anew
        home = (node, pool)  # the slot's node as far as we know: where a TRYAGAIN's one-key commands go
        queue = [((node, pool, False), home, cmd, unit, reply) for cmd, unit, reply in pending]
        while queue:
            # per send: (node, ASKING, home node), pool, home, [(command, unit)]; one per node, or with ``slot_of``
            # one per run of the queue's commands to a node, sent in queue order
            sends: list[tuple[tuple[str, bool, str], ConnectionPool, tuple[str, ConnectionPool], list]] = []
            by_key: dict[tuple[str, bool, str], list] = {}
            stuck = moved = None
            for (name, at, asking), home, cmd, unit, reply in queue:
                kind = "" if reply is None else _redirect(reply)
                if reply is None:
                    dest, items = (name, at, asking), [(cmd, unit)]
                elif kind == "ASK":
                    target, target_pool = self._node(_redirection(reply))
                    dest, items = (target, target_pool, True), [(cmd, unit)]
                elif kind == "MOVED":
                    if not relaid:
                        self._cluster.nodes_manager.initialize()  # other slots may have moved too
                        relaid = True
                    moved = reply
                    target, target_pool = self._node(_redirection(reply))
                    dest, items = (target, target_pool, False), [(cmd, unit)]
                    home = (target, target_pool)
                elif kind == "TRYAGAIN":
                    parts = split(unit)
                    stuck = (name, reply) if len(parts) == 1 else stuck
                    dest, items = (*home, False), parts
                elif script and _no_script(reply):
                    self._shas.pop(name, None)  # the node lost the script (restart, SCRIPT FLUSH): load it again
                    dest, items = (name, at, asking), [(cmd, unit)]
                else:
                    raise reply
                key = (dest[0], dest[2], home[0])
                if slot_of is not None:
                    if not sends or sends[-1][0] != key:
                        sends.append((key, dest[1], home, []))
                    group = sends[-1][3]
                elif key in by_key:
                    group = by_key[key]
                else:
                    group = by_key[key] = []
                    sends.append((key, dest[1], home, group))
                group.extend(items)
            if stuck is not None:
                if waits == self._opts.retries:
                    raise _Unsettled(f"a slot is being moved between nodes (resharding) and its keys are split between "
                                     f"them: {stuck[0]} answered {_reply_text(stuck[1])} {waits + 1} "
                                     f"time{'s' * (waits > 0)} in a row; try again once the move is done, or give "
                                     "retries= more room")
                time.sleep(_backoff(waits))
                waits += 1
            else:
                hops += 1
                if hops > _HOPS:
                    raise _Unsettled(f"the nodes redirected the request {_HOPS} times "
                                     f"({_reply_text(queue[0][4])}): slots are being moved (resharding) and the "
                                     "nodes disagree on which serves them; try again once the move is done")
                if moved is not None:
                    if moves:  # MOVED again: the nodes disagree for now (a move's end or a failover spreading)
                        time.sleep(_backoff(moves - 1))
                    moves += 1
            answered = []  # (where sent, home, command, unit, reply): in queue order with ``slot_of``
            for (name, asking, _), at, home, items in sends:
                if script:
                    self._sha(name, at, 0)
                cmds = [cmd for cmd, _ in items]
                if asking:  # ASKING holds for the next command on the connection only
                    cmds = [part for cmd in cmds for part in (_ASKING, cmd)]
                replies = _roundtrip(at, cmds, 0)  # _on_cluster retries, with the layout read anew
                for (cmd, unit), reply in zip(items, replies[1::2] if asking else replies):
                    answered.append(((name, at, asking), home, cmd, unit, reply))
            queue, unsettled = [], set()  # unsettled: slots of commands sent on once more
            for sent, home, cmd, unit, reply in answered:
                if isinstance(reply, ResponseError):
                    queue.append((sent, home, cmd, unit, reply))
                    if slot_of is not None:
                        unsettled.add(slot_of(unit))
                elif slot_of is not None and slot_of(unit) in unsettled:
                    queue.append((sent, home, cmd, unit, None))  # again after the earlier one
                else:
                    take(unit, reply)

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
        except _Unsettled as exc:
            raise self._moving(exc, "reading:") from None

    def _cluster_read(self, groups: list[tuple[list[str], list[bytes]]]) -> list[bytes | None]:
        slot_table = _slot_of_bucket()
        out: list[bytes | None] = []
        # per node: commands (one MGET per slot), where each reply's values go, and each command's words
        plan: dict[str, tuple[list[bytes], list[list[int]], list[list[bytes]]]] = {}
        pools: dict[str, ConnectionPool] = {}
        for tags, keys in groups:
            base = len(out)
            out.extend([None] * (len(tags) * len(keys)))
            slots = slot_table[[_codec.bucket_of(k) for k in keys]] if keys else np.zeros(0, np.int64)
            nodes = self._node_of_slots(slots, pools)
            by_slot: dict[tuple[str, int], list[int]] = {}
            for i, (node, slot) in enumerate(zip(nodes, slots.tolist())):
                by_slot.setdefault((node, slot), []).append(i)
            for (node, _), idx in by_slot.items():
                full_keys, positions = [b"MGET"], []
                for t, tag in enumerate(tags):
                    full_keys += _codec.redis_keys(self._opts.prefix, tag, [keys[i] for i in idx])
                    positions += [base + t * len(keys) + i for i in idx]
                cmds, where, words = plan.setdefault(node, ([], [], []))
                cmds.append(_codec.pack_command(full_keys))
                where.append(positions)
                words.append(full_keys)

        def take(unit: tuple[list[bytes], list[int]], reply: list) -> None:
            for pos, value in zip(unit[1], reply):
                out[pos] = value

        for node, (cmds, where, words) in plan.items():
            replies = _roundtrip(pools[node], cmds, 0)  # _on_cluster retries, with the layout read anew
            failed = []
            for cmd, reply, positions, full_keys in zip(cmds, replies, where, words):
                if isinstance(reply, ResponseError):
                    failed.append((cmd, (full_keys, positions), reply))
                    continue
                for pos, value in zip(positions, reply):
                    out[pos] = value
            if failed:
                self._settle(node, pools[node], failed, _mget_per_key, take, script=False)
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
            told = 0

            def tell(count: int) -> None:  # a write started again counts its records once
                nonlocal told
                count = min(count, n - told)
                told += count
                if count and progress is not None:
                    progress(count)

            def attempt() -> None:
                if done.tries:  # after a connection error or time-out the node may have restarted, or a replica
                    done.rows[:] = False  # taken over, without what it acknowledged (no persistence, asynchronous
                    done.applied = 0  # replication): everything again, which the script makes safe
                done.tries += 1
                self._cluster_write(tag, records, tell, done)

            self._on_cluster(attempt)
            return done.applied
        except _FAILURES as exc:
            raise self._fail(exc, f"writing {tag}:") from None
        except _Unsettled as exc:
            raise self._moving(exc, f"writing {tag}:") from None

    def _cluster_write(self, tag: str, records: RecordBuffers, progress: Progress | None, done: _Done) -> None:
        """Write the records not yet ``done`` (a try before this one may have written some), grouped by node."""
        rows = np.flatnonzero(~done.rows)
        slots = _slot_of_bucket()[records.buckets()[rows]]
        order = np.argsort(slots, kind="stable")  # stable: a key's records keep their order
        slots, rows = slots[order], rows[order]
        cut = np.flatnonzero(np.diff(slots)) + 1
        pools: dict[str, ConnectionPool] = {}
        nodes = self._node_of_slots(slots[np.concatenate(([0], cut))], pools) if len(slots) else []
        per_node: dict[str, list[np.ndarray]] = {}
        for node, node_rows in zip(nodes, np.split(rows, cut)):
            per_node.setdefault(node, []).extend(_batches(node_rows, self._opts.batch))
        for node, batches in per_node.items():
            self._write_node(node, pools[node], tag, records, batches, progress, done)

    def _write_node(self, node: str, pool: ConnectionPool, tag: str, records: RecordBuffers,
                    batches: list[np.ndarray], progress: Progress | None, done: _Done | None = None) -> int:
        """Write the batches to one node, ``_IN_FLIGHT`` at a time; on a cluster (``done`` given) the batches
        written are marked done as they are, for ``_on_cluster`` to try again the rest only.

        A server process other than the one that acknowledged the write's earlier batches (a restart, which
        without persistence lost them, seen by its INFO run_id; where INFO is refused, a lost write script) makes
        the write start again from its first batch (the script applies only a record at least as new as the
        stored one, so a batch applied twice leaves what applying it once does). Trusting what the server had
        acknowledged, materialize recorded its progress over records it no longer held, and online served
        nothing where offline had values, for good."""
        applied = 0
        retries = self._opts.retries if done is None else 0  # on a cluster _on_cluster retries
        sent: list[tuple[list[np.ndarray], int]] = []  # the windows acknowledged, with what each applied
        told = 0  # windows before this one were counted in progress before the server lost its state
        start = restarts = 0
        server = None  # the INFO run_id of the server process that acknowledged this write's batches
        ask = done is not None or len(batches) > _IN_FLIGHT  # one window on one node: nothing before it to lose
        # where INFO is refused (an ACL with -@dangerous), a key set with the first window says whether the server
        # still holds what it acknowledged (a key evicted meanwhile only costs a needless start again)
        witness = self._opts.prefix.encode() + b"write:" + uuid.uuid4().hex.encode() if done is None and ask else None
        try:
            while start < len(batches):
                window = batches[start : start + _IN_FLIGHT]
                lost = False
                for attempt in range(2):
                    sha = self._sha(node, pool, retries).decode()
                    pack = lambda rows, sha=sha: _codec.pack_evalsha(
                        sha, self._opts.prefix, tag, records.key_data, records.key_offsets, records.rec_data,
                        records.rec_offsets, records.expire_at_ms, rows)
                    cmds = [pack(rows) for rows in window]
                    # and which server process answered them (a new one at every start; a time-out retried, a key
                    # evicted or a script flushed changes nothing of it): a connection the pool replaced unseen,
                    # and a script another writer loaded again since, hid a restart
                    # (read with GET, which keeps it recently used for an LRU or LFU eviction policy; its 30 days
                    # leave it last for volatile-ttl)
                    head = [_codec.pack_command([b"GET", witness])] if witness and sent and server is None else []
                    tail = ([_codec.pack_command([b"SET", witness, b"1", b"PX", b"2592000000"])]
                            if witness and not sent else [])
                    replies = _roundtrip(pool, [*head, *cmds, *tail, *([_INFO_SERVER] if ask else [])], retries)
                    info = replies.pop() if ask else None
                    seen, replies = replies[: len(head)], replies[len(head) : len(head) + len(cmds)]
                    found = re.search(rb"run_id:(\w+)", info if isinstance(info, bytes) else b"")
                    now = found.group(1) if found else None
                    noscript = attempt == 0 and any(_no_script(r) for r in replies)
                    if sent:  # the run_id; else the witness; else (both refused) a lost script, as far as it tells
                        if now is not None and server is not None:
                            lost = now != server
                        else:
                            lost = seen[0] is None if seen and not isinstance(seen[0], ResponseError) else noscript
                    server = now
                    if noscript:
                        self._shas.pop(node, None)  # the server lost the script (restart, SCRIPT FLUSH): load it
                        if lost:
                            break
                        continue
                    break
                if lost:
                    restarts += 1
                    if restarts > _RESTARTS:
                        raise RedisError(f"the server lost its state {restarts} times during one write (restarting "
                                         "over and over?); nothing of this write is known to be stored: write again")
                    for w, count in sent:  # what they applied is applied again from the start
                        applied -= count
                        if done is not None:
                            done.rows[np.concatenate(w)] = False
                            done.applied -= count
                    sent.clear()
                    told, start = max(told, start), 0
                    continue
                tell = progress if start >= told else None
                if done is not None:
                    before = done.applied
                    self._cluster_window(node, pool, records, window, cmds, replies, pack, tell, done)
                    sent.append((window, done.applied - before))
                else:
                    for r in replies:
                        if isinstance(r, ResponseError):
                            raise r
                    count = sum(int(r) for r in replies)
                    applied += count
                    sent.append((window, count))
                    if tell is not None:
                        tell(sum(len(rows) for rows in window))
                start += _IN_FLIGHT
        finally:
            if witness is not None:
                with contextlib.suppress(*_FAILURES):  # best effort: it expires in a day anyway
                    _roundtrip(pool, [_codec.pack_command([b"DEL", witness])], 0)
        return applied

    def _cluster_window(self, node: str, pool: ConnectionPool, records: RecordBuffers, window: list[np.ndarray],
                        cmds: list[bytes], replies: list, pack: Callable[[np.ndarray], bytes],
                        progress: Progress | None, done: _Done) -> None:
        """Take a cluster node's replies to a window of write batches: count and mark done each batch applied, and
        send on (``_settle``) those a slot's move left unapplied. A batch applied after one of its slot that was not
        is sent again after it, and only then counted and marked done (a record it set may be overwritten by the
        earlier batch's, or, were the earlier batch to fail, the next try sends both again in order), so that of two
        records of a key with equal times the later still wins, and a record is counted as in order."""
        finished = 0

        def take(rows: np.ndarray, reply: Any) -> None:
            nonlocal finished
            done.applied += int(reply)
            done.rows[rows] = True
            finished += len(rows)

        try:
            failed: list[tuple[bytes, np.ndarray, ResponseError | None]] = []
            unsent: set[int] = set()  # slots of the batches not applied
            for cmd, rows, reply in zip(cmds, window, replies):
                if isinstance(reply, ResponseError):
                    failed.append((cmd, rows, reply))
                    unsent.add(_slot_of(records, rows))
                elif unsent and _slot_of(records, rows) in unsent:
                    failed.append((cmd, rows, None))  # sent again after them, taken then
                else:
                    take(rows, reply)
            if failed:
                per_key = lambda rows: [(pack(rows[i : i + 1]), rows[i : i + 1]) for i in range(len(rows))]
                self._settle(node, pool, failed, per_key, take, script=True,
                             slot_of=lambda rows: _slot_of(records, rows))
        finally:
            if progress is not None and finished:
                progress(finished)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.disconnect()
        if self._cluster is not None:
            self._cluster.close()
        for node in self._unlisted.values():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


@dataclass
class _Done:
    """A cluster write's progress across tries: the records written, and how many of them the script applied."""

    rows: np.ndarray
    applied: int = 0
    tries: int = 0


class _Unsettled(Exception):
    """A slot's move kept a request from being answered for longer than the store waits: the message says why."""


#: the cluster replies whose first word redis-py's parsers drop, turning them into these classes (subclasses first:
#: MovedError is an AskError, MasterDownError a ClusterDownError)
_WORDS = ((MovedError, "MOVED"), (AskError, "ASK"), (TryAgainError, "TRYAGAIN"), (MasterDownError, "MASTERDOWN"),
          (ClusterDownError, "CLUSTERDOWN"))


def _word(reply: ResponseError) -> str:
    """The first word of a cluster node's error reply among ``_WORDS``' (else ""): the class tells, since its text
    lacks the word ("3999 127.0.0.1:7001"); a plain ResponseError keeps the word."""
    for cls, word in _WORDS:
        if isinstance(reply, cls):
            return word
    word = str(reply).split(" ", 1)[0]
    return word if word in {w for _, w in _WORDS} else ""


def _redirect(reply: ResponseError) -> str:
    """"MOVED", "ASK" or "TRYAGAIN" when a cluster node's error reply says so, else ""."""
    word = _word(reply)
    return word if word in ("MOVED", "ASK", "TRYAGAIN") else ""


def _reply_text(reply: ResponseError) -> str:
    """The reply's text with the word redis-py dropped put back: "MOVED 3999 127.0.0.1:7001"."""
    word, text = _word(reply), str(reply)
    return text if not word or text.startswith(word) else f"{word} {text}"


def _redirection(reply: ResponseError) -> AskError:
    """A MOVED or ASK reply as redis-py's class for them, whose ``host`` and ``port`` name the node."""
    return reply if isinstance(reply, AskError) else AskError(str(reply).split(" ", 1)[1])


def _mget_per_key(unit: tuple[list[bytes], list[int]]) -> list[tuple[bytes, tuple[list[bytes], list[int]]]]:
    """One MGET of a slot's keys, (words, positions), as one MGET per key."""
    words, positions = unit
    return [(_codec.pack_command([b"MGET", key]), ([b"MGET", key], [pos])) for key, pos in zip(words[1:], positions)]


def _slot_of(records: RecordBuffers, rows: np.ndarray) -> int:
    """The cluster slot of a write batch (its records share one)."""
    return int(_slot_of_bucket()[_codec.bucket_of(records.key(int(rows[0])))])


def _no_script(reply: object) -> bool:
    """Whether a reply says the server lacks the script (restarted, SCRIPT FLUSH). redis-py's parsers turn it into
    NoScriptError, whose text drops the word (\"No matching script. Please use EVAL.\")."""
    return isinstance(reply, NoScriptError) or (isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"))


def _batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]
