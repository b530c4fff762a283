"""Engine factory and transactions for SQLite and PostgreSQL.

SQLite gets WAL journaling, a busy timeout and foreign keys, and mlplat
issues its own BEGIN so that a write transaction can start with
``BEGIN IMMEDIATE`` (taking the write lock up front instead of failing with
"database is locked" when a read turns into a write). PostgreSQL goes through
psycopg 3 with a connection pool whose size is configurable.
"""
from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from ..errors import ConfigError, DataError, StoreError
from ..settings import hide_password
from .models import SHORT_VALUE

__all__ = ["Database", "create_engine", "enable_wal", "normalize_url", "sqlite_file"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: seconds to wait for a PostgreSQL connection to be made, unless the URL says (``?connect_timeout=N``)
PG_CONNECT_TIMEOUT_S = 10


def normalize_url(url: str) -> sa.URL:
    """Parse a database URL and pick mlplat's driver (psycopg 3 for PostgreSQL).

    >>> normalize_url("postgresql://root@127.0.0.1/test").drivername
    'postgresql+psycopg'

    A relative SQLite path is made absolute here, against the current folder: SQLite opens each new
    connection by its path, and a later ``os.chdir`` (a notebook, a job changing folders) would otherwise
    make the pool's next connection open another file.
    """
    url = url.strip()  # a URL read from a file or a secret often ends in a newline
    shown = hide_password(url)
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigError(f"database_url {shown!r} is not a valid URL: {hide_password(str(exc))}") from None
    backend = parsed.get_backend_name().lower()  # a URL's scheme is case-insensitive (RFC 3986): SQLITE:// too
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            return parsed.set(drivername="sqlite")
        return parsed.set(drivername="sqlite", database=os.path.abspath(Path(parsed.database).expanduser()))
    raise ConfigError(f"database_url {shown!r}: only sqlite:// and postgresql:// databases are supported")


def create_engine(
    url: str, *, pool_size: int = 5, max_overflow: int = 10, pool_timeout: float = 30.0, echo: bool = False
) -> Engine:
    """An engine for ``url`` with mlplat's connection settings.

    >>> engine = create_engine("sqlite://")
    >>> with engine.connect() as conn:
    ...     conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    1
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, echo, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError(
            "PostgreSQL needs the psycopg driver: pip install 'mlplat[postgres]'"
        ) from None
    connect_args: dict[str, Any] = {"prepare_threshold": None}
    if "connect_timeout" not in parsed.query:
        # libpq waits for ever by default: a server host that drops packets, or a port that accepts and never
        # answers, hung the platform's opening (and each thread asking the pool) instead of failing
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    return sa.create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        echo=echo,
        # psycopg prepares a statement server-side after 5 runs, and PostgreSQL then may plan it once for
        # any parameters (a generic plan): run search turned 30x slower that way. Plan every query.
        connect_args=connect_args,
    )


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite database URL names (``~`` expanded); None for an in-memory or non-SQLite database.

    >>> sqlite_file("sqlite:////tmp/home/mlplat.db")
    PosixPath('/tmp/home/mlplat.db')
    >>> sqlite_file("sqlite://") is None
    True
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


#: every engine made here, so that a forked child drops the pooled connections it inherited
_ENGINES: weakref.WeakSet = weakref.WeakSet()


#: in-memory SQLite databases: a forked child keeps its copy of the one connection (it is the database)
_MEMORY_DATABASES: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (a pre-fork server's worker) opens connections of its own: a connection shared
    with the parent across ``fork()`` is one socket or SQLite handle used by two processes (a child's
    writes through it were lost once the parent closed it). SQLAlchemy's recipe: drop the pool without
    closing the parent's connections.

    An in-memory SQLite database is the exception: its one connection *is* the database, and the
    child's copy of it is the child's own (dropping it gave the child an empty database: "mlplat's
    tables are gone"). The child takes it over: a fresh turn lock (one a parent's thread held at the
    fork was never released in the child) and that thread's unfinished transaction rolled back."""
    for engine in list(_ENGINES):
        if not isinstance(engine.pool, StaticPool):
            engine.dispose(close=False)
    for db in list(_MEMORY_DATABASES):
        db._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _sqlite_engine(url: sa.URL, echo: bool, **pool: Any) -> Engine:
    """A SQLite engine; a file's has a pool of ``pool`` (pool_size, max_overflow, pool_timeout), as PostgreSQL's."""
    memory = url.database in (None, "", ":memory:")
    if not memory:
        folder = Path(url.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"database_url {hide_password(str(url))!r}: cannot create the database's folder "
                              f"{folder} ({exc.strerror}: {exc.filename}); point database_url (or "
                              "$MLPLAT_DATABASE_URL) at a folder that exists or can be created") from None
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
    if memory:
        kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(pool)
    engine = sa.create_engine(url, echo=echo, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        dbapi_conn.isolation_level = None  # mlplat emits BEGIN itself (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if not memory:
            enable_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        _like_as_postgresql(dbapi_conn, cur)
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    @event.listens_for(engine, "invalidate")
    def _on_invalidate(dbapi_conn: sqlite3.Connection, record: Any, exc: BaseException | None) -> None:
        # SQLAlchemy invalidates a connection a KeyboardInterrupt (Ctrl-C) stopped inside a statement; its
        # close() then waits for the statement, which the traceback keeps alive, so the transaction and its
        # write lock stayed until the garbage collector ran: every other writer failed "database is locked"
        try:
            if dbapi_conn.in_transaction:
                dbapi_conn.rollback()
        except sqlite3.Error:
            pass

    return engine


#: the two letters whose str.lower() is not their own lowercase letter: 'İ' (two characters, 'i' and a
#: combining dot) and 'Σ' ('ς' at the end of a word); PostgreSQL lowers one character at a time: 'i', 'σ'
_ONE_BY_ONE = str.maketrans({"\u0130": "i", "\u03a3": "\u03c3"})


def _unicode_lower(value: Any) -> Any:
    """SQLite's ``lower()`` as PostgreSQL's (UTF-8): every letter, not only ASCII ones ('Ä' -> 'ä'), one
    character at a time ('ΟΔΟΣ' -> 'οδοσ', 'İ' -> 'i')."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if not text.isascii() and ("\u0130" in text or "\u03a3" in text):
        text = text.translate(_ONE_BY_ONE)
    return text.lower()


#: the texts a run filter reads as numbers when it compares a param or tag with one (mlplat.runs.search):
#: JSON's number form (what str() of an int or a float writes), blanks around it, an exponent of at most
#: 4 digits, at most SHORT_VALUE characters in all (what PostgreSQL's numeric always holds)
NUMBER_TEXT = r"[ \t\n\r]*-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]{1,4})?[ \t\n\r]*"
_NUMBER_TEXT = re.compile(NUMBER_TEXT)


def _text_number(value: Any) -> float | None:
    """``mlplat_number(text)`` on SQLite: the float a number's text rounds to (Python's float(), correctly
    rounded as PostgreSQL's float8 is; SQLite's own CAST is not), NULL for any other text."""
    if isinstance(value, str) and len(value) <= SHORT_VALUE and _NUMBER_TEXT.fullmatch(value):
        return float(value)
    return None


@functools.lru_cache(maxsize=256)
def _like_regex(pattern: str, escape: str | None) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if escape is not None and c == escape and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


def _like(pattern: Any, value: Any, escape: Any = None) -> int | None:
    """A case-sensitive ``value LIKE pattern [ESCAPE escape]`` (SQLite calls like(pattern, value, escape))."""
    if pattern is None or value is None:
        return None
    return int(_like_regex(str(pattern), escape).fullmatch(str(value)) is not None)


def _like_as_postgresql(dbapi_conn: sqlite3.Connection, cur: sqlite3.Cursor) -> None:
    """LIKE and ``lower()`` (hence ILIKE, which SQLAlchemy writes as ``lower(x) LIKE lower(y)`` on SQLite) as on
    PostgreSQL: LIKE is case-sensitive (SQLite's ignores ASCII case) and lower() folds every letter
    (SQLite's only ASCII ones). A SQLite built without the (deprecated) case_sensitive_like pragma gets a
    LIKE function of mlplat's instead."""
    dbapi_conn.create_function("lower", 1, _unicode_lower, deterministic=True)
    dbapi_conn.create_function("mlplat_number", 1, _text_number, deterministic=True)
    cur.execute("PRAGMA case_sensitive_like=ON")
    if cur.execute("SELECT 'A' LIKE 'a'").fetchone()[0]:
        dbapi_conn.create_function("like", 2, _like, deterministic=True)
        dbapi_conn.create_function("like", 3, _like, deterministic=True)


def enable_wal(conn: sqlite3.Connection | sqlite3.Cursor) -> None:
    """Switch a file database to WAL journaling, waiting out other connections doing the same.

    Changing the journal mode takes an exclusive lock, and SQLite answers "database is locked"
    at once instead of calling the busy handler when another connection holds the file (seen
    when several processes or threads open a new database together), so retry here until the
    busy timeout. Used by the SQL database and by the SQLite online store.

    Example::

        conn = sqlite3.connect("online.db", timeout=30, isolation_level=None)
        enable_wal(conn)
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


#: PostgreSQL's "undefined_table" and "invalid_schema_name" (the search path's schema is gone)
_MISSING_TABLE_STATES = {"42P01", "3F000"}


def _missing_table(exc: sa.exc.DBAPIError) -> bool:
    """Whether ``exc`` says a table (or the schema holding them) does not exist."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _MISSING_TABLE_STATES:
        return True
    return isinstance(orig, sqlite3.OperationalError) and str(orig).startswith("no such table")


def _foreign_key(exc: sa.exc.DBAPIError) -> bool:
    """Whether ``exc`` is a foreign-key violation: the row a write refers to (a run, a model) is not there."""
    orig = exc.orig
    return getattr(orig, "sqlstate", None) == "23503" or (
        isinstance(orig, sqlite3.IntegrityError) and str(orig).startswith("FOREIGN KEY constraint failed"))


def _not_a_database(exc: sa.exc.DBAPIError) -> bool:
    """Whether ``exc`` is SQLite's SQLITE_NOTADB: the file at the database's path is not a SQLite database."""
    orig = exc.orig
    return isinstance(orig, sqlite3.DatabaseError) and (
        getattr(orig, "sqlite_errorcode", None) == 26 or str(orig) == "file is not a database")


def _sqlite_busy(exc: sa.exc.DBAPIError) -> bool:
    """Whether ``exc`` is SQLite's SQLITE_BUSY ("database is locked"): the busy timeout ran out."""
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None) or 0  # extended codes (SQLITE_BUSY_SNAPSHOT, ...) included
    return isinstance(orig, sqlite3.OperationalError) and (code & 0xFF == 5 or "database is locked" in str(orig))


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class Database:
    """The shared SQL database: an engine plus transaction helpers.

    Usage::

        db = Database("sqlite:///tmp/x.db")
        with db.session(write=True) as s:
            s.add(...)
    """

    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 10, pool_timeout: float = 30.0) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout)
        self.dialect = self.engine.dialect.name
        _ENGINES.add(self.engine)
        # an in-memory SQLite database is one connection (StaticPool) that threads must take in turn: two
        # transactions on it at once fail ("cannot start a transaction within a transaction")
        self._memory = self.dialect == "sqlite" and self.engine.url.database in (None, "", ":memory:")
        self._turns = threading.RLock() if self._memory else nullcontext()
        self._memory_closed = False
        if self._memory:
            _MEMORY_DATABASES.add(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child, for an in-memory database (see the module's fork handler)."""
        self._turns = threading.RLock()
        if self._memory_closed:
            return
        try:
            raw = self.engine.raw_connection()
        except Exception:  # noqa: BLE001 - never opened (or closed): nothing to take over
            return
        try:
            dbapi = raw.dbapi_connection
            if dbapi is not None and dbapi.in_transaction:  # a parent's thread was inside a transaction
                dbapi.execute("ROLLBACK")
        finally:
            raw.close()

    @contextmanager
    def connect(self, *, write: bool = False) -> Iterator[Connection]:
        """A connection inside a transaction, committed on success, rolled back on error.

        ``write=True`` takes SQLite's write lock at BEGIN (no effect on PostgreSQL).
        """
        try:
            with self._turns, self._open() as conn:
                if write and self.dialect == "sqlite":
                    conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except sa.exc.TimeoutError as exc:  # every pooled connection stayed in use for pool_timeout seconds
            pool = self.engine.pool
            size, overflow = pool.size(), getattr(pool, "_max_overflow", 0)
            timeout = getattr(pool, "_timeout", None)
            raise StoreError(
                f"database {self._shown_url()}: no free connection: all {size + max(overflow, 0)} connections of "
                f"the pool (db_pool_size {size} + db_max_overflow {overflow}) stayed in use for the "
                f"db_pool_timeout of {timeout:g} s; nothing was read or written: use fewer threads at once, or "
                "raise $MLPLAT_DB_POOL_SIZE / $MLPLAT_DB_MAX_OVERFLOW (within the server's max_connections)"
            ) from exc
        except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
            if _missing_table(exc):
                raise StoreError(f"database {self._shown_url()}: {_first_line(exc.orig)}: mlplat's tables are gone "
                                 "(was the schema dropped or the database reset?); nothing was written: re-open "
                                 "the platform (mp.Platform(...)) to create them again") from exc
            if isinstance(exc, sa.exc.ProgrammingError):
                raise  # a bug in the statement itself: keep SQLAlchemy's error with its SQL and parameters
            if _sqlite_busy(exc):
                raise StoreError(
                    f"database {self._shown_url()}: {_first_line(exc.orig)}: another connection (in this or "
                    f"another process) held the database's lock longer than the busy timeout of "
                    f"{SQLITE_BUSY_TIMEOUT_MS / 1000:g} s; this transaction was rolled back, nothing was written: "
                    "retry once that writer is done (a long transaction, a process stopped in a debugger, "
                    "a sqlite3 shell left inside BEGIN), or use PostgreSQL for many concurrent writers") from exc
            raise StoreError(f"database {self._shown_url()}: {exc.orig}") from exc
        except sa.exc.DataError as exc:  # a value the checks let through but its column cannot hold
            raise DataError(f"database {self._shown_url()} refused a value: {exc.orig}".rstrip()
                            + "; nothing was written: shorten or correct that value") from exc
        except sa.exc.IntegrityError as exc:  # a duplicate is the caller's to handle; a missing parent row is not
            if not _foreign_key(exc):
                raise
            raise StoreError(f"database {self._shown_url()}: {_first_line(exc.orig)}: the run or model this write "
                             "belongs to is no longer in the database (was it reset or the row deleted?); nothing "
                             "was written: start a new run (or register again) in the re-opened platform") from exc
        except sa.exc.DatabaseError as exc:  # SQLite's "file is not a database": some other file at that path
            if not _not_a_database(exc):
                raise
            raise StoreError(
                f"database {self.engine.url.database}: the file is not a SQLite database, so not an mlplat database "
                f"({exc.orig}); nothing was read or written: point database_url (or $MLPLAT_DATABASE_URL) at an "
                "mlplat database, or at a path where a new one may be created") from exc

    def _open(self) -> Connection:
        """A new connection (in its turn, for an in-memory database: a closed one is not opened again, empty)."""
        if self._memory_closed:
            raise StoreError("database sqlite:// (in memory) is closed: its platform was closed (Platform.close()) "
                             "and an in-memory database ends with it, contents included; open a new platform, or "
                             "use a file (sqlite:///path.db) or PostgreSQL to keep data past close()")
        return self.engine.connect()

    def _shown_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """An ORM session bound to one transaction (see :meth:`connect`)."""
        with self.connect(write=write) as conn:
            with Session(bind=conn, expire_on_commit=False) as s:
                yield s
                s.flush()

    def dispose(self) -> None:
        """Close every pooled connection (a later use opens new ones; an in-memory database, whose one
        connection is the database, is gone, and a later use is a :class:`~mlplat.errors.StoreError`; a
        statement running on it in another thread finishes first: closing it under the statement crashed the
        process)."""
        with self._turns:
            if self._memory:
                self._memory_closed = True
            self.engine.dispose()
