"""Schema versioning: Alembic migrations shipped in the package, applied on first use.

``ensure_schema`` costs one query when the database is already at head. When
it is behind, the upgrade runs in one transaction under a lock (SQLite's
``BEGIN IMMEDIATE``, PostgreSQL's transaction-level advisory lock), so two
processes starting at once migrate once. A database at a revision this
package does not know was migrated by a newer mlplat: that is an error, not
something to overwrite.
"""
from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import SchemaVersionError, StoreError
from .engine import Database

__all__ = ["ensure_schema", "upgrade", "current_revision", "head_revision", "alembic_config"]

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_KEY = 0x6D6C706C6174  # "mlplat"


def alembic_config(connection: Connection | None = None):
    """An Alembic ``Config`` pointing at the migrations inside the package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this package ships."""
    return _script().get_current_head()


#: Alembic keeps its migration context and ``op`` in module globals: two threads migrating two databases at once
#: ran each other's DDL on the wrong connections (half-made schemas, KeyErrors, a segfault in sqlite3)
_ALEMBIC = threading.Lock()


def _after_fork_in_child() -> None:
    global _ALEMBIC
    _ALEMBIC = threading.Lock()  # a thread of the parent migrating at the fork holds it in the child for ever


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_revision(conn: Connection) -> str | None:
    """The revision a database is at, or None for an empty database."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def ensure_schema(db: Database) -> None:
    """Create or upgrade the schema to head if needed."""
    with db.connect() as conn:
        if current_revision(conn) == head_revision():
            return
    upgrade(db)


def upgrade(db: Database, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` in one locked transaction."""
    from alembic import command

    with db.connect(write=True) as conn:
        if db.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        current = current_revision(conn)
        if current is not None:
            try:
                _script().get_revision(current)
            except Exception:
                raise SchemaVersionError(
                    f"database {db.engine.url.render_as_string(hide_password=True)} is at schema revision "
                    f"{current!r}, which this mlplat does not know (its newest is {head_revision()!r}); "
                    "it was migrated by a newer mlplat: upgrade mlplat"
                ) from None
        if revision == "head" and current == head_revision():
            return
        try:
            with _ALEMBIC:
                command.upgrade(alembic_config(conn), revision)
        except sa.exc.ProgrammingError as exc:  # e.g. a search_path schema that does not exist
            raise StoreError(
                f"database {db.engine.url.render_as_string(hide_password=True)}: creating mlplat's tables failed: "
                f"{str(exc.orig).splitlines()[0]}; if the URL sets a search_path, create that schema first "
                "(CREATE SCHEMA ...) and grant this user USAGE and CREATE on it"
            ) from None
