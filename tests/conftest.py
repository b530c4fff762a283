"""Shared fixtures: real PostgreSQL and Redis servers, no mocks.

* ``database_url`` runs a test twice, on SQLite (a file under tmp_path) and on
  PostgreSQL (a schema of its own, dropped afterwards).
* ``pg_url`` / ``redis_url`` give the servers directly; Redis tests use a
  database number of their own (MLPLAT_TEST_REDIS_DB, default 13), flushed
  before and after.
* With CI=true a PostgreSQL or Redis test that would be skipped fails instead.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_HOST = os.environ.get("MLPLAT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MLPLAT_TEST_PG_PORT", "5432"))
PG_DB = os.environ.get("MLPLAT_TEST_PG_DB", "test")
REDIS_URL = os.environ.get("MLPLAT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("MLPLAT_TEST_REDIS_DB", "13"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str, why: object) -> None:
    msg = f"{what} is not reachable: {why}"
    if IN_CI:
        pytest.fail(f"CI=true and {msg}; PostgreSQL and Redis tests must not be skipped in CI", pytrace=False)
    pytest.skip(msg)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and (item.get_closest_marker("postgres") or item.get_closest_marker("redis")):
        report.outcome = "failed"
        report.longrepr = f"CI=true: {item.nodeid} needs PostgreSQL/Redis and was skipped ({report.longrepr})"


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("database_url") == "postgresql":
            item.add_marker(pytest.mark.postgres)


# ---------------------------------------------------------------- PostgreSQL
def _pg_admin_url() -> str:
    import psycopg

    errors = []
    for user in ("postgres", "root"):
        url = f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{PG_DB}"
        try:
            with psycopg.connect(url, connect_timeout=3):
                return url
        except psycopg.Error as exc:
            errors.append(f"{user}: {exc}")
    raise ConnectionError("; ".join(errors))


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    try:
        return _pg_admin_url()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        _unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT}", exc)
        raise


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    import psycopg

    schema = f"mlplat_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{pg_admin_url}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlplat.db'}"
    return request.getfixturevalue("pg_url")


# --------------------------------------------------------------------- Redis
@pytest.fixture(scope="session")
def redis_server_url() -> str:
    import redis

    url = f"{REDIS_URL}/{REDIS_DB}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001
        _unavailable(f"Redis at {REDIS_URL}", exc)
    return url


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """A Redis URL on the test database number, empty before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    try:
        yield redis_server_url
    finally:
        client.flushdb()
        client.close()


# ------------------------------------------------------------------ platform
@pytest.fixture
def platform(tmp_path: Path, database_url: str):
    import mlplat as mp

    p = mp.Platform(tmp_path / "home", database_url=database_url, threads=2)
    yield p
    p.close()


@pytest.fixture
def sqlite_platform(tmp_path: Path):
    import mlplat as mp

    p = mp.Platform(tmp_path / "home", threads=2)
    yield p
    p.close()
