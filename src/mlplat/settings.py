"""Settings: arguments, then ``MLPLAT_*`` environment variables, then defaults.

Usage::

    >>> s = Settings.resolve("/tmp/mlplat-home", environ={})
    >>> s.database_url
    'sqlite:////tmp/mlplat-home/mlplat.db'

=========================  ==========================  ===========================================
argument                   environment variable        default
=========================  ==========================  ===========================================
``home``                   ``MLPLAT_HOME``             ``./mlplat-home``
``database_url``           ``MLPLAT_DATABASE_URL``     ``sqlite:///<home>/mlplat.db``
``online_store``           ``MLPLAT_ONLINE_STORE``     ``sqlite:///<home>/online.db``
``artifact_root``          ``MLPLAT_ARTIFACT_ROOT``    ``<home>/artifacts``
``threads``                ``MLPLAT_THREADS``          the number of CPUs
``db_pool_size``           ``MLPLAT_DB_POOL_SIZE``     5
``db_max_overflow``        ``MLPLAT_DB_MAX_OVERFLOW``  10
``db_pool_timeout``        ``MLPLAT_DB_POOL_TIMEOUT``  30 seconds
``triton_url``             ``MLPLAT_TRITON_URL``       none: predict serves in-process
``served_sample_rate``     ``MLPLAT_SERVED_SAMPLE``    1.0 (share of served rows logged)
=========================  ==========================  ===========================================
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ._checks import shown
from .errors import ConfigError

__all__ = ["Settings", "hide_password"]

_DB_SCHEMES = ("sqlite", "postgresql", "postgres")
_ONLINE_SCHEMES = ("sqlite", "redis", "rediss", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class Settings:
    """Validated settings of one :class:`~mlplat.Platform`."""

    home: Path
    database_url: str
    online_store: str
    artifact_root: str
    threads: int
    db_pool_size: int = 5
    db_max_overflow: int = 10
    db_pool_timeout: float = 30.0
    triton_url: str | None = None
    served_sample_rate: float = 1.0

    def __repr__(self) -> str:  # a log line or a traceback showing the settings must not show a password
        shown = ((f.name, getattr(self, f.name)) for f in fields(self))
        return "Settings(" + ", ".join(f"{k}={hide_password(v) if isinstance(v, str) else v!r}" for k, v in shown) + ")"

    def checked(self) -> Settings:
        """These settings validated as :meth:`resolve` validates its arguments (for settings made another way,
        e.g. with ``dataclasses.replace``): a ConfigError names a bad value; the environment is not read. Valid
        settings come back as they are (the same object when resolving changes nothing).

        >>> import dataclasses
        >>> s = dataclasses.replace(Settings.resolve("/tmp/h", environ={}), threads=0)
        >>> s.checked()
        Traceback (most recent call last):
        ...
        mlplat.errors.ConfigError: threads must be at least 1, got 0 (argument threads=)
        """
        resolved = Settings.resolve(**{f.name: getattr(self, f.name) for f in fields(self)}, environ={})
        return self if resolved == self else resolved

    @classmethod
    def resolve(
        cls,
        home: str | os.PathLike[str] | None = None,
        *,
        database_url: str | None = None,
        online_store: str | None = None,
        artifact_root: str | None = None,
        threads: int | None = None,
        db_pool_size: int | None = None,
        db_max_overflow: int | None = None,
        db_pool_timeout: float | None = None,
        triton_url: str | None = None,
        served_sample_rate: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Fill what is not passed from ``environ`` (default ``os.environ``), then defaults; validate all.

        A variable's surrounding white space is dropped (a value read from a file or a secret often ends in
        a newline), and an empty or blank variable counts as unset. Relative paths (``home``, a
        ``sqlite:///`` file, a local ``artifact_root``) are made absolute against the current folder now,
        so that a later ``os.chdir`` does not move them. An empty or blank ``home`` counts as unset too,
        like ``MLPLAT_HOME`` (it is not the current folder). A setting of the wrong type (``home=123``,
        ``triton_url=5``) is a ConfigError naming the argument."""
        env = _Stripped(os.environ if environ is None else environ)
        home = _text("home", home, path=True, strip=False)
        home = home if home and home.strip() else None  # "" counts as unset, as MLPLAT_HOME="" does (not ".")
        value = home if home is not None else (env.get("MLPLAT_HOME") or "mlplat-home")
        try:
            home_path = Path(value).expanduser().resolve()
        except (ValueError, OSError, RuntimeError) as exc:  # a NUL; ~nosuchuser; a current folder deleted
            where = ("argument home=" if home is not None else "$MLPLAT_HOME" if env.get("MLPLAT_HOME")
                     else "the default")
            gone = " (the current folder no longer exists)" if isinstance(exc, FileNotFoundError) else ""
            raise ConfigError(f"home {value!r} is not a folder path this process can use ({exc}){gone} ({where})") \
                from None
        try:  # relative paths are made absolute against the current folder
            db = _url("database_url", _text("database_url", database_url), env, "MLPLAT_DATABASE_URL",
                      _sqlite_url(home_path / "mlplat.db"), _DB_SCHEMES, driver_suffix=True)
            online = _url("online_store", _text("online_store", online_store), env, "MLPLAT_ONLINE_STORE",
                          _sqlite_url(home_path / "online.db"), _ONLINE_SCHEMES)
            artifacts = (_text("artifact_root", artifact_root, path=True) or env.get("MLPLAT_ARTIFACT_ROOT")
                         or str(home_path / "artifacts"))
            if "://" not in artifacts:  # a local folder (s3://..., gs://..., file:///... stay as written)
                artifacts = os.path.abspath(os.path.expanduser(artifacts))
        except FileNotFoundError:  # os.getcwd() of a folder deleted under the process
            raise ConfigError("the current folder no longer exists, so a relative path in the settings cannot be "
                              "made absolute: change to an existing folder, or give absolute paths") from None
        return cls(
            home=home_path,
            database_url=db,
            online_store=online,
            artifact_root=artifacts,
            threads=_number("threads", threads, env, "MLPLAT_THREADS", os.cpu_count() or 1, int, minimum=1),
            db_pool_size=_number("db_pool_size", db_pool_size, env, "MLPLAT_DB_POOL_SIZE", 5, int, minimum=1),
            db_max_overflow=_number("db_max_overflow", db_max_overflow, env, "MLPLAT_DB_MAX_OVERFLOW", 10, int,
                                    minimum=0),
            db_pool_timeout=_number("db_pool_timeout", db_pool_timeout, env, "MLPLAT_DB_POOL_TIMEOUT", 30.0, float,
                                    minimum=0),
            triton_url=_text("triton_url", triton_url) or env.get("MLPLAT_TRITON_URL") or None,
            served_sample_rate=_number("served_sample_rate", served_sample_rate, env, "MLPLAT_SERVED_SAMPLE", 1.0,
                                       float, minimum=0, maximum=1),
        )


def hide_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part, and of a ``password=`` query parameter (which
    redis-py and libpq take; ``ssl_password=`` and ``sslpassword=`` too), replaced by ``***``, for messages and
    logs; it needs no valid URL (an error about a malformed URL must not print the password either).

    >>> hide_password("postgresql://app:s3cret@db:5432/mlplat")
    'postgresql://app:***@db:5432/mlplat'
    >>> hide_password("redis://:s3cret@cache:6379/0"), hide_password("sqlite:///x.db")
    ('redis://:***@cache:6379/0', 'sqlite:///x.db')
    >>> hide_password("redis://cache/0?timeout=1&password=s3cret&db=2"), hide_password("rediss://c?ssl_password=a#b")
    ('redis://cache/0?timeout=1&password=***&db=2', 'rediss://c?ssl_password=***')
    """
    return _PASSWORD.sub(r"\1***@", _QUERY_PASSWORD.sub(r"\1***", url))  # a query password may hold an "@"


#: scheme://user:password@ -- masked up to the last "@" (a password may hold an unescaped "@" or "/")
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@]*:).*@", re.S)
#: ?password=..., &ssl_password=... (redis-py), &sslpassword=... (libpq) up to the next parameter, "#" included
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl_?)?pass(?:word|wd)=)[^&]*", re.I)


class _Stripped(Mapping):
    """An environment whose values are stripped of surrounding white space (blank values read as empty)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __getitem__(self, key: str) -> str:
        return self._env[key].strip()

    def __iter__(self):
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def _text(name: str, value: object, *, path: bool = False, strip: bool = True) -> str | None:
    """Argument ``name``'s ``value``: None as given, else a str (``path``: or an ``os.PathLike``), by default
    without surrounding white space (a URL or path pasted with a newline); anything else is a ConfigError."""
    if value is None:
        return None
    text = os.fspath(value) if path and isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        wanted = "a path (a str or os.PathLike)" if path else "a str"
        raise ConfigError(f"{name} must be {wanted}, got {shown(value)} of type {type(value).__name__} "
                          f"(argument {name}=)")
    return text.strip() if strip else text


def _sqlite_url(path: str | os.PathLike, scheme: str = "sqlite") -> str:
    """The SQLite URL of a file: '%' and '?' in its path escaped, which a URL reads as an escape and as its query
    (a home named 'report%20v2' kept its database in 'report v2', one named 'what?now' in a file 'what').

    >>> _sqlite_url("/tmp/what?now/mlplat.db")
    'sqlite:////tmp/what%3Fnow/mlplat.db'
    """
    return f"{scheme}:///" + os.fspath(path).replace("%", "%25").replace("?", "%3F")


_SQLITE_FILE = re.compile(r"(sqlite(?:\+\w+)?):///", re.IGNORECASE)


def _absolute_sqlite(url: str) -> str:
    """A ``sqlite:///relative/path`` URL (``sqlite+pysqlite:///`` too) made absolute against the current folder;
    other URLs as given (an in-memory database, an absolute path, a path under ``~``, which the engine expands)."""
    found = _SQLITE_FILE.match(url)
    if found is None:
        return url
    path, sep, query = url[found.end():].partition("?")
    if not path or path == ":memory:" or path.startswith("~") or os.path.isabs(path):
        return url
    return f"{_sqlite_url(os.path.abspath(unquote(path)), found.group(1))}{sep}{query}"


def _url(name: str, value: str | None, env: Mapping[str, str], var: str, default: str, schemes: tuple[str, ...], *,
         driver_suffix: bool = False) -> str:
    """Argument ``name``'s ``value``, else ``$var``, else ``default``: a URL urllib can split, of one of
    ``schemes`` (``driver_suffix``: ``postgresql+psycopg`` counts as ``postgresql``), and for Redis with a
    database number (``/0``) or none. The error names the argument or the variable the URL came from."""
    url = value or env.get(var) or default
    where = f"argument {name}=" if value else f"${var}" if env.get(var) else "the default"
    shown = hide_password(url)  # an error message (a log line) must not show the password
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port past 65535 (or not a number) raises here
    except ValueError as exc:  # its text may quote a piece of a password (one holding "/" reads as a port)
        secret = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
        quoted = secret and any(len(piece) > 1 and piece in str(exc) for piece in (secret, *re.split(r"[/?#]", secret)))
        detail = "its user, password, host or port cannot be read" if quoted else str(exc)
        raise ConfigError(f"{name} {shown!r} is not a valid URL ({detail}); write it as scheme://host:port/... "
                          f"({where})") from None
    scheme = parts.scheme.lower()
    base = scheme.split("+")[0] if driver_suffix else scheme  # postgresql+psycopg -> postgresql
    if base not in schemes:
        raise ConfigError(
            f"{name} {shown!r} has an unsupported scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in schemes)} ({where})"
        )
    cipher = scheme.endswith("pysqlcipher")  # its password is SQLCipher's key: a user and password, and no host
    after = url.partition("://")[2].rpartition("@")[2]  # what follows a user and password
    if base == "sqlite" and (not after.startswith("/") if cipher else parts.netloc):  # (a key "2024/k" is no port)
        # sqlite://file.db: SQLAlchemy refuses it, an online store took it as a file of the current folder
        path = after.removeprefix("/")  # no user or password in the suggestion
        suggested = hide_password(f"{scheme}:///{path}")
        raise ConfigError(f"{name} {shown!r}: a SQLite URL has no host; a file is {suggested} (three slashes; four "
                          f"for an absolute path) ({where})")
    database = unquote(parts.path).strip("/")
    if scheme.startswith("redis") and database and not (database.isascii() and database.isdigit()):
        # redis-py ignores a path it cannot read as a number and uses database 0: another store than meant
        shown_db = "its path" if "@" in database else repr(database)  # a password with "/" spilled into the path
        raise ConfigError(f"{name} {shown!r}: the Redis database {shown_db} is not a number; write "
                          f"redis://host:port/0 (a database number from 0) ({where})")
    return _absolute_sqlite(url)


def _number(name: str, value, env: Mapping[str, str], var: str, default, kind: type, *, minimum: float,
            maximum: float | None = None):
    """Argument ``name``'s ``value``, else ``$var`` parsed as ``kind``, else ``default``: a finite number in
    range, not a bool, and a whole number where ``kind`` is int (2.7 threads is refused, not cut to 2)."""
    raw = value if value is not None else env.get(var)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    where = f" (argument {name}=)" if value is not None else f" (${var})"  # where to correct it
    wanted = "a whole number" if kind is int else "a number"
    number = raw
    if isinstance(raw, str):
        try:
            number = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {wanted}, got {raw!r}{where}") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or (kind is int and number != int(number)):
        raise ConfigError(f"{name} must be {wanted}, got {raw!r}{where}")
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}{where}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {raw!r}{where}")
    return kind(number)
