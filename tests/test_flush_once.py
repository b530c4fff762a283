"""Buffered writes (metric points, A/B decisions and outcomes) are stored exactly once.

A flush interrupted (Ctrl-C) inside SQLAlchemy's commit, after the database had committed but before the
writer learned so, put its batch back, and the next flush wrote it a second time: duplicated metric points
and A/B decisions. Each batch now carries an id, written as a marker row in its transaction, and a retried
batch whose marker is there is dropped (mlplat.db.batches).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa

import mlplat as mp
from mlplat import _background
from mlplat.db import Database
from mlplat.db.migrate import current_revision, ensure_schema, head_revision, upgrade
from mlplat.db.models import ABDecision, ABOutcome, LatestMetric, MetricChunk
from workers import in_threads


class Faults:
    """Fails the next commit of each armed thread, at the DBAPI: ``after`` raises KeyboardInterrupt once the
    database committed (the interrupt landing as the commit returns), ``before`` raises it instead of
    committing, ``error`` rolls back and raises an ordinary exception (a commit the database refused)."""

    def __init__(self, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self._real = db.engine.dialect.do_commit
        self._armed: dict[int, str] = {}
        self.fired = 0
        monkeypatch.setattr(db.engine.dialect, "do_commit", self._do_commit)

    def arm(self, when: str) -> None:
        self._armed[threading.get_ident()] = when

    def _do_commit(self, dbapi_conn) -> None:
        when = self._armed.pop(threading.get_ident(), None)
        if when is not None:
            self.fired += 1
        if when == "before":
            raise KeyboardInterrupt
        if when == "error":  # as a commit the database refuses: the transaction is rolled back
            dbapi_conn.rollback()
            raise RuntimeError("the commit failed")
        self._real(dbapi_conn)
        if when == "after":
            raise KeyboardInterrupt


def _failing(faults: Faults, when: str, flush: Callable[[], None]) -> None:
    faults.arm(when)
    with pytest.raises(RuntimeError if when == "error" else KeyboardInterrupt):
        flush()


def _history(p, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(pt.step, pt.value) for pt in p.runs.metric_history(run_id, key)]


def _stored_points(p, run_id: str) -> int:
    with p.db.connect() as conn:
        return conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(MetricChunk.count), 0))
                           .where(MetricChunk.run_id == run_id))


def _latest(p, run_id: str, key: str = "loss") -> tuple[int, float]:
    with p.db.connect() as conn:
        return tuple(conn.execute(sa.select(LatestMetric.step, LatestMetric.value).where(
            LatestMetric.run_id == run_id, LatestMetric.key == key)).one())


def _marks(p) -> int:
    with p.db.connect() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM flush_marks").scalar()


def _start(p, name: str = "once"):
    run = p.runs.start(name)
    _background.unregister(run._metrics)  # flushed by the test only, in this thread (where the faults are)
    return run


def _log(run, steps: range) -> None:
    for step in steps:
        run.log_metric("loss", step / 10, step=step)


def _want(steps: range) -> list[tuple[int, float]]:
    return [(step, step / 10) for step in steps]


# ------------------------------------------------------------------ metrics
def test_metric_points_interrupted_as_their_commit_returns_are_written_once(platform, monkeypatch):
    faults = Faults(platform.db, monkeypatch)
    run = _start(platform)
    _log(run, range(5))
    _failing(faults, "after", run.flush)
    assert len(run._metrics) == 5  # kept: the writer cannot tell that they committed
    _log(run, range(5, 8))
    run.flush()  # finds the first batch's marker: writes the new points only
    assert _history(platform, run.id) == _want(range(8))
    _log(run, range(8, 10))
    _failing(faults, "after", run.flush)
    run.end()  # the run's last flush finds the marker
    assert faults.fired == 2
    assert _history(platform, run.id) == _want(range(10))
    assert _stored_points(platform, run.id) == 10
    assert _latest(platform, run.id) == (9, 0.9)
    assert platform.runs.get(run.id).status == "finished"
    assert _marks(platform) == 0  # the run's markers went when it ended


@pytest.mark.parametrize("when", ["before", "error"])
def test_metric_points_whose_commit_never_happened_are_written_once_by_the_next_flush(platform, monkeypatch, when):
    faults = Faults(platform.db, monkeypatch)
    run = _start(platform)
    _log(run, range(5))
    _failing(faults, when, run.flush)
    assert _history(platform, run.id) == []
    run.end()
    assert _history(platform, run.id) == _want(range(5))
    assert _stored_points(platform, run.id) == 5


@pytest.mark.parametrize("when", ["before", "error"])
def test_a_retried_batch_that_fails_again_is_kept_and_written_once(platform, monkeypatch, when):
    faults = Faults(platform.db, monkeypatch)
    run = _start(platform)
    _log(run, range(4))
    _failing(faults, "after", run.flush)  # committed, but kept: its outcome is unknown
    _log(run, range(4, 6))
    _failing(faults, when, run.flush)  # the retry fails: both batches are kept, each with its id
    assert len(run._metrics) == 6
    _log(run, range(6, 9))
    _failing(faults, "after", run.flush)  # the third try commits the new ones, the interrupt hides it
    run.end()
    assert _history(platform, run.id) == _want(range(9))
    assert _stored_points(platform, run.id) == 9
    assert _latest(platform, run.id) == (8, 0.8)


def test_a_run_flushing_meanwhile_keeps_the_marker_of_another_runs_unknown_batch(platform, monkeypatch):
    faults = Faults(platform.db, monkeypatch)
    first, second = _start(platform, "a"), _start(platform, "b")
    _log(first, range(3))
    _failing(faults, "after", first.flush)
    for turn in range(3):  # each flush deletes the markers the second run knows are committed: its own only
        _log(second, range(turn * 2, turn * 2 + 2))
        second.flush()
    second.end()
    first.end()
    assert _history(platform, first.id) == _want(range(3))
    assert _history(platform, second.id) == _want(range(6))
    assert _marks(platform) == 0


def test_runs_flushing_at_once_in_threads_write_every_point_once(platform, monkeypatch):
    faults = Faults(platform.db, monkeypatch)
    runs = [_start(platform, f"t{i}") for i in range(4)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        run = runs[i]
        try:
            for turn in range(6):
                _log(run, range(turn * 10, turn * 10 + 10))
                faults.arm(("after", "before", "")[(turn + i) % 3])
                try:
                    run.flush()
                except KeyboardInterrupt:
                    pass
            run.end()
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)

    in_threads(work, len(runs))
    assert errors == []
    assert faults.fired >= 16
    for run in runs:
        assert _history(platform, run.id) == _want(range(60))
        assert _stored_points(platform, run.id) == 60
    assert _marks(platform) == 0


# ------------------------------------------------------------------ A/B gateway
def _gateway(p, monkeypatch, experiment: str) -> mp.ABGateway:
    gateway = mp.ABGateway("m", "m@staging", 0.5, experiment, salt="s", platform=p)
    monkeypatch.setattr(gateway, "_version", lambda variant: ("m", 1))  # no registered model needed
    _background.unregister(gateway._writes)  # flushed by the test only, in this thread (where the faults are)
    return gateway


def _log_users(gateway: mp.ABGateway, users: range) -> None:
    for user in users:
        gateway.route(user)
        gateway.record_outcome(user, float(user))


def _rows(p, experiment: str) -> tuple[list[str], list[tuple[str, float]]]:
    with p.db.connect() as conn:
        decisions = conn.scalars(sa.select(ABDecision.user_id).where(ABDecision.experiment_id == experiment)
                                 .order_by(ABDecision.id)).all()
        outcomes = conn.execute(sa.select(ABOutcome.user_id, ABOutcome.outcome)
                                .where(ABOutcome.experiment_id == experiment).order_by(ABOutcome.id)).all()
    return list(decisions), [tuple(row) for row in outcomes]


def _want_rows(users: range) -> tuple[list[str], list[tuple[str, float]]]:
    return [str(u) for u in users], [(str(u), float(u)) for u in users]


@pytest.mark.parametrize("when", ["after", "before", "error"])
def test_gateway_rows_of_an_interrupted_flush_are_written_once(platform, monkeypatch, when):
    faults = Faults(platform.db, monkeypatch)
    gateway = _gateway(platform, monkeypatch, f"exp-{when}")
    _log_users(gateway, range(5))
    _failing(faults, when, gateway.flush)
    assert len(gateway._writes) == 10  # five decisions and five outcomes wait for the next flush
    _log_users(gateway, range(5, 8))
    gateway.flush()
    _log_users(gateway, range(8, 10))
    _failing(faults, "after", gateway.close)  # the last flush, as the gateway closes
    gateway.close()  # closing again writes what the failed close kept
    assert _rows(platform, f"exp-{when}") == _want_rows(range(10))
    summary = gateway.summary()["variants"]
    assert sum(v["decisions"] for v in summary.values()) == 10
    assert _marks(platform) == 0


def test_gateways_flushing_meanwhile_do_not_drop_each_others_rows(platform, monkeypatch):
    faults = Faults(platform.db, monkeypatch)
    first, second = _gateway(platform, monkeypatch, "g1"), _gateway(platform, monkeypatch, "g2")
    _log_users(first, range(3))
    _failing(faults, "after", first.flush)
    _log_users(second, range(4))
    _failing(faults, "before", second.flush)
    for turn in range(3):
        _log_users(second, range(4 + turn, 5 + turn))
        second.flush()
    _log_users(first, range(3, 5))
    first.close()
    second.close()
    assert _rows(platform, "g1") == _want_rows(range(5))
    assert _rows(platform, "g2") == _want_rows(range(7))
    assert _marks(platform) == 0


# ------------------------------------------------------------------ schema
def test_a_database_at_0006_upgrades_to_the_flush_marks_and_keeps_its_rows(database_url):
    db = Database(database_url)
    try:
        upgrade(db, "0006_model_version_sha256")
        with db.connect(write=True) as conn:
            assert not sa.inspect(conn).has_table("flush_marks")
            conn.execute(sa.insert(ABDecision), [{"experiment_id": "old", "user_id": "1", "variant": "champion",
                                                  "model": "m", "model_version": 1}])
        ensure_schema(db)
        with db.connect() as conn:
            assert current_revision(conn) == head_revision() == "0007_flush_marks"
            assert sa.inspect(conn).has_table("flush_marks")
            assert conn.scalar(sa.select(sa.func.count()).select_from(ABDecision)) == 1
            assert [c["name"] for c in sa.inspect(conn).get_columns("flush_marks")] == ["id", "at"]
    finally:
        db.dispose()


def test_a_failing_background_write_is_logged_once_until_it_succeeds_again(platform, monkeypatch, caplog):
    """The flusher kept the error in a list nobody read: a database refusing every write went unseen until
    an explicit flush."""
    faults = Faults(platform.db, monkeypatch)
    run = _start(platform, "background")
    _background.register(run._metrics)  # flushed by _pass() below, in this thread (where the faults are)
    _log(run, range(3))
    with caplog.at_level("WARNING", logger="mlplat"):
        for _ in range(2):
            faults.arm("error")
            _background._pass()
        assert [r.getMessage() for r in caplog.records if "background write" in r.getMessage()] == [
            f"a background write of the metrics of run {run.id} failed (it is retried every "
            f"{_background.interval:g} s; an explicit flush() or close() raises the error): the commit failed"]
        _background._pass()
        assert caplog.records[-1].getMessage() == f"the background write of the metrics of run {run.id} succeeded again"
    assert _history(platform, run.id) == _want(range(3))
    run.end()
