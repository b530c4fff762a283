"""The db layer on SQLite and PostgreSQL: migrations, schema checks, connection settings."""
from __future__ import annotations

import multiprocessing as mpr
import os
import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import mlplat as mp
from mlplat.db import Database, normalize_url
from mlplat.db.engine import sqlite_file
from mlplat.db.migrate import current_revision, ensure_schema, head_revision
from workers import after_parent_closes, in_threads
from mlplat.db.models import Base
from mlplat.features.online.sqlite import SQLiteOnlineStore


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


def _open_database(path) -> None:
    db = Database(f"sqlite:///{path}")
    with db.connect(write=True) as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    db.dispose()


def _open_online_store(path) -> None:
    SQLiteOnlineStore(f"sqlite:///{path}").close()


@pytest.mark.parametrize("opener", [_open_database, _open_online_store], ids=["database", "online-store"])
def test_threads_opening_a_new_sqlite_file_together_all_succeed(tmp_path, opener):
    # Switching a new file to WAL takes an exclusive lock and SQLite reports "database is locked"
    # without waiting for the busy timeout; without a retry about 1 in 70 rounds fails here.
    for round_ in range(150):
        path = tmp_path / f"new-{round_}.db"
        errors: list[BaseException] = []

        def open_it(_: int, path=path, errors=errors) -> None:
            try:
                opener(path)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        in_threads(open_it, 6)
        assert errors == [], f"round {round_}"
        probe = Database(f"sqlite:///{path}")
        with probe.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        probe.dispose()


def test_a_child_forked_while_a_thread_migrates_can_migrate_its_own_database(tmp_path):
    """The lock the migrations take turns by was held in the child for ever: it hung opening any new database."""
    from mlplat.db import migrate
    from workers import in_forked_child

    def open_new() -> None:
        db = Database(f"sqlite:///{tmp_path / 'child.db'}")
        ensure_schema(db)
        db.dispose()

    with migrate._ALEMBIC:  # as a thread of this process is, inside command.upgrade
        assert in_forked_child(open_new, timeout=20) == 0


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


def test_a_write_interrupted_inside_a_statement_leaves_no_lock_behind(tmp_path):
    """Ctrl-C while SQLite ran an INSERT (a KeyboardInterrupt raised while sqlite3 bound the second row): the
    connection's close() waited for the statement the traceback kept alive, so its write lock stayed until the
    garbage collector ran, and every other writer of the home failed with "database is locked"."""
    import sqlite3

    class Interrupt:  # what a SIGINT does between two rows of an executemany
        def __conform__(self, protocol):
            raise KeyboardInterrupt

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    ensure_schema(db)
    with pytest.raises(KeyboardInterrupt) as interrupted:  # the traceback stays referenced, as in a notebook
        with db.connect(write=True) as conn:
            conn.execute(sa.text("INSERT INTO experiments (name, description, created_at) VALUES (:name, '', CURRENT_TIMESTAMP)"),
                         [{"name": "a"}, {"name": Interrupt()}])
    assert interrupted.traceback  # still alive here
    other = sqlite3.connect(tmp_path / "x.db", timeout=0.2, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # "database is locked" before
    other.execute("ROLLBACK")
    other.close()
    with db.connect(write=True) as conn:  # and the database goes on, without the interrupted row
        conn.execute(sa.text("INSERT INTO experiments (name, description, created_at) VALUES ('b', '', CURRENT_TIMESTAMP)"))
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM experiments")).scalars().all() == ["b"]
    db.dispose()


def test_a_flush_interrupted_after_its_commit_does_not_write_its_rows_again(tmp_path):
    """Ctrl-C as the connection went back to the pool, after the commit: the metric buffer and the A/B gateway
    kept the rows for the next flush, which wrote them a second time (metric_history held duplicates)."""
    import torch

    p = mp.Platform(tmp_path / "home")
    with p.runs.start("e") as run:
        run.log_model(torch.nn.Linear(2, 1), "model")
    p.models.register("m", run.id)
    gateway = mp.ABGateway("m@1", "m@1", 0.5, "exp", platform=p)
    interrupt = [False]
    caller = threading.get_ident()

    def checkin(dbapi_conn, record):  # in this thread only: the background flusher's check-in took it, under load
        if interrupt[0] and threading.get_ident() == caller:
            interrupt[0] = False
            raise KeyboardInterrupt

    sa.event.listen(p.db.engine, "checkin", checkin)
    run = p.runs.start("e")
    for step in range(5):
        run.log_metric("loss", 1.0 / (step + 1), step=step)
        gateway.route(step)
    for flush in (run.flush, gateway.flush):
        interrupt[0] = True
        with pytest.raises(KeyboardInterrupt):
            flush()
        flush()  # what a later flush (or close) does
    sa.event.remove(p.db.engine, "checkin", checkin)
    run.end()
    assert [m.step for m in p.runs.metric_history(run.id, "loss")] == [0, 1, 2, 3, 4]  # each once
    with p.db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ab_decisions")).scalar() == 5
    gateway.close()
    p.close()


def test_sqlite_urls_expand_the_users_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalize_url("sqlite:///~/a/x.db").database == str(tmp_path / "a" / "x.db")
    assert sqlite_file("sqlite:///~/a/x.db") == tmp_path / "a" / "x.db"
    assert sqlite_file("sqlite://") is None and sqlite_file("postgresql://root@127.0.0.1/test") is None
    db = Database("sqlite:///~/a/x.db")  # the file lands under the home, not in a folder named '~'
    ensure_schema(db)
    db.dispose()
    assert (tmp_path / "a" / "x.db").is_file()


def test_url_schemes_are_case_insensitive(tmp_path):
    """Settings took SQLITE:// and PostgreSQL:// (as it lowers the scheme), then the engine refused them."""
    assert normalize_url(f"SQLITE:///{tmp_path / 'x.db'}").drivername == "sqlite"
    assert normalize_url("PostgreSQL://root@127.0.0.1/test").drivername == "postgresql+psycopg"
    with mp.Platform(tmp_path / "home", database_url=f"SQLite:///{tmp_path / 'home.db'}") as p:
        assert p.runs.experiments() == []
    assert (tmp_path / "home.db").is_file()


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


def test_pool_settings_are_applied(database_url):
    """SQLite files too: its engine took SQLAlchemy's defaults, and the pool-exhausted error said to raise
    settings that did nothing."""
    db = Database(database_url, pool_size=3, max_overflow=1, pool_timeout=2)
    assert (db.engine.pool.size(), db.engine.pool._max_overflow, db.engine.pool._timeout) == (3, 1, 2)
    db.dispose()


def test_threads_migrating_different_new_databases_at_once_all_reach_head(tmp_path):
    """Alembic keeps its migration context in module globals: threads migrating their own new files ran DDL on
    each other's connections (KeyError 'script', half-made schemas that never opened again, a segfault)."""
    errors: list[BaseException] = []

    def migrate(i: int) -> None:
        db = Database(f"sqlite:///{tmp_path / f'db{i}.db'}")
        try:
            ensure_schema(db)
            with db.connect() as conn:
                assert current_revision(conn) == head_revision()
                assert not compare_metadata(MigrationContext.configure(conn), Base.metadata)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            db.dispose()

    in_threads(migrate, 8)
    assert errors == []


@pytest.mark.postgres
def test_postgres_statements_are_planned_every_time(pg_url):
    """psycopg would prepare a statement after 5 runs, and PostgreSQL could then reuse one generic plan
    for all parameters; search filters need plans made for their values."""
    db = Database(pg_url)
    with db.connect() as conn:
        assert conn.connection.dbapi_connection.prepare_threshold is None
    db.dispose()


def test_a_value_its_column_cannot_hold_is_a_data_error_and_rolls_back(pg_url):
    db = Database(pg_url)
    ensure_schema(db)
    experiments = Base.metadata.tables["experiments"]
    with pytest.raises(mp.DataError, match="refused a value: value too long.*nothing was written"):
        with db.connect(write=True) as conn:
            conn.execute(experiments.insert().values(name="kept"))
            conn.execute(experiments.insert().values(name="x" * 300))
    with db.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(experiments)) == 0
    db.dispose()


def test_a_search_path_schema_that_does_not_exist_is_a_store_error_saying_so(pg_admin_url, tmp_path):
    url = f"{pg_admin_url}?options=-csearch_path%3Dmlplat_no_such_schema"
    with pytest.raises(mp.StoreError, match="creating mlplat's tables failed: .*create that schema first"):
        mp.Platform(tmp_path / "home", database_url=url)


def test_an_in_memory_database_takes_threads_in_turn(tmp_path):
    errors: list[BaseException] = []
    with mp.Platform(tmp_path / "home", database_url="sqlite://") as p:
        def start_runs(_: int) -> None:
            try:
                for _ in range(40):
                    with p.runs.start("memory") as run:
                        run.log_param("x", 1)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        in_threads(start_runs, 3)
        assert not errors, errors[0]  # was: "cannot start a transaction within a transaction"
        assert len(p.runs.search("memory", max_results=1000)) == 120


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_database_used_before_a_fork_keeps_what_the_child_writes_after_the_parent_closed(tmp_path):
    """The child's pool held the parent's SQLite connection: once the parent closed it (checkpointing and
    deleting the WAL), what the child wrote through it went to the deleted file, lost to every process."""
    p = mp.Platform(tmp_path / "home")
    run = p.runs.start("before-fork")  # the parent's pooled connection is open
    run.end()
    after_parent_closes(p, lambda: p.runs.resume(run.id).set_tag("written", "by the child"))
    with mp.Platform(tmp_path / "home") as other:
        assert other.runs.get(run.id).tags.get("written") == "by the child"


def test_sqlite_like_is_case_sensitive_and_lower_folds_every_letter_as_on_postgresql(database_url):
    db = Database(database_url)
    with db.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT 'A' LIKE 'a', lower('ÄRGER É') = 'ärger é', 'a_b' LIKE 'a\\_b' ESCAPE '\\', "
            "'axb' LIKE 'a\\_b' ESCAPE '\\', 'a%b' LIKE 'a\\%b' ESCAPE '\\', 'xyz' LIKE 'x%'")).one()
    assert [bool(v) for v in row] == [False, True, True, False, True, True]
    db.dispose()


def test_the_like_function_used_where_sqlite_ignores_case_sensitive_like():
    """A SQLite built without the deprecated pragma gets mlplat's LIKE: the same answers."""
    import sqlite3

    from mlplat.db.engine import _like

    conn = sqlite3.connect(":memory:")
    conn.create_function("like", 2, _like, deterministic=True)
    conn.create_function("like", 3, _like, deterministic=True)
    cases = [("'A' LIKE 'a'", 0), ("'abc' LIKE 'a%'", 1), ("'abc' LIKE 'a_'", 0), ("'a.c' LIKE 'a_c'", 1),
             ("'a_b' LIKE 'a\\_b' ESCAPE '\\'", 1), ("'axb' LIKE 'a\\_b' ESCAPE '\\'", 0),
             ("'a\\b' LIKE 'a\\\\b' ESCAPE '\\'", 1), ("'(a*)' LIKE '(a*)'", 1), ("'a\nb' LIKE 'a%'", 1),
             ("NULL LIKE 'a'", None)]
    for expr, expected in cases:
        assert conn.execute(f"SELECT {expr}").fetchone()[0] == expected, expr
    conn.close()


def _hide_mlplat_tables(db: Database, url: str, hidden: bool) -> None:
    """Make mlplat's tables disappear (and come back), as a dropped schema or a reset database would."""
    if db.dialect == "postgresql":
        schema = url.split("search_path%3D", 1)[1]
        old, new = (schema, f"{schema}_gone") if hidden else (f"{schema}_gone", schema)
        with db.connect(write=True) as conn:
            conn.exec_driver_sql(f'ALTER SCHEMA "{old}" RENAME TO "{new}"')
        return
    with db.connect(write=True) as conn:
        for table in ("runs", "run_params", "run_tags", "run_metric_chunks"):
            old, new = (table, f"{table}_gone") if hidden else (f"{table}_gone", table)
            conn.exec_driver_sql(f'ALTER TABLE "{old}" RENAME TO "{new}"')


def test_tables_gone_mid_run_are_a_store_error_saying_so_and_buffered_points_wait(database_url, tmp_path):
    p = mp.Platform(tmp_path / "home", database_url=database_url)
    try:
        run = p.runs.start("gone")
        run.log_metric("loss", 1.0)
        run.flush()
        _hide_mlplat_tables(p.db, database_url, hidden=True)
        run.log_metric("loss", 2.0)
        message = r"(does not exist|no such table).*mlplat's tables are gone \(was the schema dropped or the " \
                  r"database reset\?\); nothing was written: re-open the platform"
        for call in (run.flush, lambda: run.log_param("a", 1), lambda: run.set_tag("a", 1),
                     lambda: p.runs.search("gone", filter="tags.a = '1'"), lambda: p.runs.get(run.id)):
            with pytest.raises(mp.StoreError, match=message):
                call()
        _hide_mlplat_tables(p.db, database_url, hidden=False)
        run.end()
        assert [pt.value for pt in p.runs.metric_history(run.id, "loss")] == [1.0, 2.0]
        assert p.runs.get(run.id).status == "finished"
    finally:
        p.close()


@pytest.mark.postgres
def test_a_genuine_programming_error_keeps_its_sqlalchemy_error(pg_url):
    db = Database(pg_url)
    with pytest.raises(sa.exc.ProgrammingError, match="syntax error"):
        with db.connect() as conn:
            conn.execute(sa.text("SELEC 1"))
    db.dispose()


def test_a_file_that_is_not_a_sqlite_database_is_a_store_error_naming_it(tmp_path):
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("not a database\n" * 100)
    with pytest.raises(mp.StoreError, match=f"database {not_a_database}: the file is not a SQLite database, so "
                                            "not an mlplat database .*nothing was read or written"):
        mp.Platform(tmp_path / "home", database_url=f"sqlite:///{not_a_database}")  # was sqlalchemy's DatabaseError
    assert not_a_database.read_text() == "not a database\n" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "notes.db"]  # no -wal or -shm beside it


# ------------------------------------------------ embedding in a service: pools, forks, folders, closing
@pytest.mark.postgres
def test_more_threads_than_the_pool_holds_is_a_store_error_naming_the_pool_settings(pg_url):
    # was sqlalchemy.exc.TimeoutError ("QueuePool limit of size 1 overflow 0 reached"), not an mlplat error
    db = Database(pg_url, pool_size=1, max_overflow=1, pool_timeout=0.3)
    with db.connect(), db.connect():
        with pytest.raises(mp.StoreError, match=r"no free connection: all 2 connections of the pool \(db_pool_size 1 "
                                                r"\+ db_max_overflow 1\) stayed in use for the db_pool_timeout of "
                                                r"0\.3 s.*MLPLAT_DB_POOL_SIZE"):
            with db.connect():
                pass
    with db.connect() as conn:  # the pool works again once connections come back
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    db.dispose()


@pytest.mark.postgres
def test_connections_killed_by_the_server_are_replaced(pg_url, pg_admin_url):
    """A database restart (or an idle-connection reaper) ends every pooled connection: pre-ping replaces them."""
    import psycopg

    db = Database(pg_url, pool_size=2)
    with db.connect() as a, db.connect() as b:
        pids = [c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in (a, b)]
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    for _ in range(3):
        with db.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() not in pids
    db.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_an_in_memory_database_used_before_a_fork_keeps_its_tables_in_the_child(tmp_path):
    """The fork handler dropped the in-memory database's one connection in the child: the child got an empty
    database ("mlplat's tables are gone"). A turn a parent's thread held at the fork hung the child for ever."""
    import threading

    from workers import in_forked_child

    with mp.Platform(tmp_path / "home", database_url="sqlite://") as p:
        with p.runs.start("memory"):
            pass

        def child() -> None:
            assert len(p.runs.search("memory")) == 1
            with p.runs.start("memory"):
                pass
            assert len(p.runs.search("memory")) == 2

        assert in_forked_child(child) == 0
        inside, leave = threading.Event(), threading.Event()

        def hold_a_transaction() -> None:
            with p.db.connect(write=True) as conn:
                conn.exec_driver_sql("UPDATE runs SET name = 'uncommitted'")
                inside.set()
                leave.wait(10)

        holder = threading.Thread(target=hold_a_transaction)
        holder.start()
        inside.wait(10)
        try:
            assert in_forked_child(child) == 0  # was: hung on the turn lock the parent's thread held
        finally:
            leave.set()
            holder.join()
        assert len(p.runs.search("memory")) == 1  # the children's runs were their own


def test_an_in_memory_database_used_after_close_says_it_is_closed(tmp_path):
    p = mp.Platform(tmp_path / "home", database_url="sqlite://")
    p.close()
    with pytest.raises(mp.StoreError, match=r"sqlite:// \(in memory\) is closed: its platform was closed"):
        p.runs.search("x")  # was: "mlplat's tables are gone ... re-open the platform to create them again"
    p.close()  # closing again is harmless


def test_a_database_folder_that_cannot_be_created_is_a_config_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    url = f"sqlite:///{tmp_path / 'a-file' / 'sub' / 'x.db'}"
    with pytest.raises(mp.ConfigError, match=r"cannot create the database's folder .*a-file/sub \(Not a directory"):
        Database(url)  # was a raw NotADirectoryError
    with pytest.raises(mp.ConfigError, match="cannot create the database's folder"):
        mp.Platform(tmp_path / "home", database_url=url)


_HOLD_THE_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(30)
"""


def test_a_writer_waiting_past_the_busy_timeout_gets_a_store_error_saying_why(tmp_path, monkeypatch):
    import subprocess
    import sys

    import mlplat.db.engine as engine_module

    path = tmp_path / "x.db"
    _open_database(path)  # a table t
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    db = Database(f"sqlite:///{path}")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_WRITE_LOCK, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(mp.StoreError, match=r"database is locked: another connection \(in this or another "
                                                r"process\) held the database's lock longer than the busy timeout "
                                                r"of 0\.2 s; .*nothing was written"):  # was only "database is locked"
            with db.connect(write=True) as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    finally:
        holder.kill()
        holder.wait()
    with db.connect(write=True) as conn:  # the lock is free again: writes go through
        conn.exec_driver_sql("INSERT INTO t VALUES (3)")
        assert conn.exec_driver_sql("SELECT x FROM t").scalars().all() == [1, 3]
    db.dispose()


def test_a_relative_sqlite_path_stays_put_when_the_current_folder_changes(tmp_path, monkeypatch):
    """SQLite opens each new connection by its path: after an os.chdir (a notebook), the pool's next connection
    opened another, empty file ("mlplat's tables are gone")."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    db = Database("sqlite:///rel.db")
    ensure_schema(db)
    monkeypatch.chdir(tmp_path / "second")
    db.dispose()  # the next use opens a new connection, as a second thread or a forked worker would
    with db.connect() as conn:
        assert current_revision(conn) == head_revision()
    db.dispose()
    assert not (tmp_path / "second" / "rel.db").exists()
    assert normalize_url("sqlite:///rel.db").database == str(tmp_path / "second" / "rel.db")


def _open_files(path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_platform_that_fails_to_open_leaves_nothing_open(tmp_path):
    """A notebook keeps the failed cell's traceback (and so the half-made platform): its pooled SQLite
    connection stayed open, holding the database files."""
    home = tmp_path / "home"
    mp.Platform(home).close()
    db = Database(f"sqlite:///{home / 'mlplat.db'}")
    with db.connect(write=True) as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    db.dispose()
    assert _open_files(home) == []
    with pytest.raises(mp.SchemaVersionError) as failed:
        mp.Platform(home)
    assert failed.value.__traceback__ is not None  # the traceback (and the platform in its frames) is alive
    assert _open_files(home) == []


def test_a_failure_to_close_does_not_hide_the_error_that_ended_the_with_block(tmp_path):
    p = mp.Platform(tmp_path / "home")
    run = p.runs.start("closing")
    try:
        with pytest.raises(ValueError, match="the body's own error") as raised:  # was: the StoreError of close()
            with p:
                run.log_metric("loss", 1.0)
                _hide_mlplat_tables(p.db, p.settings.database_url, hidden=True)  # close() cannot write the point
                raise ValueError("the body's own error")
        if hasattr(raised.value, "__notes__"):
            assert "closing the platform failed: StoreError" in raised.value.__notes__[0]
    finally:
        _hide_mlplat_tables(p.db, p.settings.database_url, hidden=False)
        run.end()
        p.close()
    with mp.Platform(tmp_path / "home") as again:
        assert [pt.value for pt in again.runs.metric_history(run.id, "loss")] == [1.0]


def test_urls_in_errors_never_show_the_password():
    with pytest.raises(mp.ConfigError) as raised:
        normalize_url("mysql://app:s3cret@h/db")
    assert "s3cret" not in str(raised.value) and "app:***@h" in str(raised.value)
    with pytest.raises(mp.ConfigError, match="is not a valid URL") as raised:  # was a raw ValueError
        normalize_url("postgresql://app:s3cret@h:notaport/db")
    assert "s3cret" not in str(raised.value)
    assert normalize_url(" postgresql://u@h/db\n").database == "db"  # a URL read from a file, newline and all


@pytest.mark.postgres
def test_a_postgresql_server_that_never_answers_is_a_store_error_not_a_hang(pg_admin_url, monkeypatch):
    """libpq waits for ever by default: a host dropping packets, or a port that accepts and stays silent (a
    stuck proxy), hung Platform(...) and every thread asking the pool."""
    import socket
    import threading

    import mlplat.db.engine as engine_module

    monkeypatch.setattr(engine_module, "PG_CONNECT_TIMEOUT_S", 2, raising=False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nothing ever answers
    outcome: list[BaseException] = []

    def connect() -> None:
        db = Database(f"postgresql://app:s3cret@127.0.0.1:{silent.getsockname()[1]}/db")
        try:
            with db.connect():
                pass
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)
        db.dispose()

    try:
        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "connecting to a silent server hung"
    finally:
        silent.close()
    assert isinstance(outcome[0], mp.StoreError) and "s3cret" not in str(outcome[0]), outcome
    for url, seconds in ((pg_admin_url, "2"), (f"{pg_admin_url}?connect_timeout=3", "3")):  # the URL's wins
        db = Database(url)
        with db.connect() as conn:
            assert conn.connection.dbapi_connection.info.get_parameters().get("connect_timeout") == seconds
        db.dispose()
