"""The db layer on SQLite and PostgreSQL: migrations, schema checks, connection settings."""
from __future__ import annotations

import multiprocessing as mpr

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import mlplat as mp
from mlplat.db import Database, normalize_url
from mlplat.db.migrate import current_revision, ensure_schema, head_revision
from mlplat.db.models import Base


def test_migrations_reach_head_and_match_the_models(database_url):
    db = Database(database_url)
    ensure_schema(db)
    with db.engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    db.dispose()


def test_ensure_schema_is_idempotent_and_downgrade_round_trips(database_url):
    db = Database(database_url)
    ensure_schema(db)
    ensure_schema(db)
    from alembic import command

    from mlplat.db.migrate import alembic_config

    with db.connect(write=True) as conn:
        command.downgrade(alembic_config(conn), "base")
    with db.connect() as conn:
        assert not sa.inspect(conn).has_table("feature_definitions")
    ensure_schema(db)
    with db.connect() as conn:
        assert sa.inspect(conn).has_table("feature_definitions")
    db.dispose()


def test_a_newer_schema_is_refused_not_overwritten(database_url):
    db = Database(database_url)
    ensure_schema(db)
    with db.connect(write=True) as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(mp.SchemaVersionError, match="9999_from_the_future.*upgrade mlplat"):
        ensure_schema(db)
    with db.connect() as conn:  # still there, untouched
        assert current_revision(conn) == "9999_from_the_future"
    db.dispose()


def _start_platform(args):
    url, home = args
    with mp.Platform(home, database_url=url):
        return True


def test_processes_starting_at_once_migrate_once(database_url, tmp_path):
    ctx = mpr.get_context("spawn")
    with ctx.Pool(4) as pool:
        assert pool.map(_start_platform, [(database_url, str(tmp_path / "home"))] * 4) == [True] * 4
    db = Database(database_url)
    with db.connect() as conn:
        assert current_revision(conn) == head_revision()
    db.dispose()


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    db.dispose()


def test_sqlite_write_transactions_take_the_lock_at_begin(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    ensure_schema(db)
    with db.connect(write=True) as conn:
        # another writer must wait: with a short timeout it gives up with a clear StoreError
        other = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}", connect_args={"timeout": 0.1})
        with other.connect() as c2:
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                c2.exec_driver_sql("BEGIN IMMEDIATE")
        other.dispose()
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    db.dispose()


def test_urls_pick_the_driver_and_refuse_others():
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(mp.ConfigError, match="only sqlite:// and postgresql://"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(mp.ConfigError, match="not a valid URL"):
        normalize_url("::nonsense")


@pytest.mark.postgres
def test_unreachable_database_is_a_store_error(pg_admin_url):
    db = Database("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(mp.StoreError, match="127.0.0.1"):
        with db.connect():
            pass
    db.dispose()


@pytest.mark.postgres
def test_postgres_pool_settings_are_applied(pg_url):
    db = Database(pg_url, pool_size=3, max_overflow=1, pool_timeout=2)
    assert (db.engine.pool.size(), db.engine.pool._max_overflow, db.engine.pool._timeout) == (3, 1, 2)
    db.dispose()


@pytest.mark.postgres
def test_postgres_statements_are_planned_every_time(pg_url):
    """psycopg would prepare a statement after 5 runs, and PostgreSQL could then reuse one generic plan
    for all parameters; search filters need plans made for their values."""
    db = Database(pg_url)
    with db.connect() as conn:
        assert conn.connection.dbapi_connection.prepare_threshold is None
    db.dispose()
