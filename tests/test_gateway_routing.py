"""The A/B gateway's split between experiments, what it counts and accepts, and its summary's plan on
PostgreSQL; on SQLite and PostgreSQL, with the local backend (no Triton server)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import sqlalchemy as sa

import mlplat as mp
from mlplat.db.models import ABDecision, ABOutcome
from mlplat.serving.gateway import _outcome_stats, _user_stats, parse_model_ref
from test_serving import Scorer, _register, served  # noqa: F401 - served: a fixture

COLUMNS = ["a", "b", "c"]


@pytest.fixture
def p(platform):
    _register(platform, "m", Scorer(0.0), columns=COLUMNS)
    _register(platform, "m", Scorer(1.0), columns=COLUMNS, stage="staging")
    return platform


def _rows(p, table, experiment: str) -> int:
    with p.db.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(table).where(table.experiment_id == experiment))


def test_experiments_with_the_default_salt_split_users_independently(p):
    """The default salt was '' for every experiment: every experiment's challengers were the same users."""
    a = mp.ABGateway("m", "m@staging", 0.1, "fraud-v2", platform=p)
    b = mp.ABGateway("m", "m@staging", 0.1, "churn-v9", platform=p)
    assert (a.salt, b.salt) == ("fraud-v2", "churn-v9")
    users = range(20_000)
    in_a = {u for u in users if a.variant(u) == "challenger"}
    in_b = {u for u in users if b.variant(u) == "challenger"}
    assert 1800 < len(in_a) < 2200 and 1800 < len(in_b) < 2200
    assert len(in_a & in_b) / len(in_a) < 0.2  # about 10 % when independent; 100 % before
    same = mp.ABGateway("m", "m@staging", 0.1, "churn-v9", salt="fraud-v2", platform=p)
    assert {u for u in users if same.variant(u) == "challenger"} == in_a  # a salt given is the salt used
    assert p.serving.ab_gateway("m", "m@staging", 0.1, "fraud-v2").bucket(42) == a.bucket(42)
    for bad in (5, b"x", ["s"]):
        with pytest.raises(mp.DataError, match="salt must be a string"):
            mp.ABGateway("m", "m@staging", 0.1, "e", salt=bad, platform=p)  # None became the salt 'None'


def test_numpy_numbers_are_numbers_and_text_or_bools_are_not_outcomes(p):
    gateway = mp.ABGateway("m", "m@staging", np.float32(0.5), "types", platform=p)  # was refused
    assert gateway.challenger_fraction == pytest.approx(0.5)
    for bad in ("1.5", True, np.bool_(True), b"1", None):
        with pytest.raises(mp.DataError, match="an outcome must be a number"):  # '1.5' was stored as 1.5
            gateway.record_outcome(1, bad)
    for good in (1, 2.5, np.float32(0.25), np.int64(3)):
        gateway.record_outcome(1, good)
    gateway.flush()
    with p.db.connect() as conn:
        stored = conn.scalars(sa.select(ABOutcome.outcome).where(ABOutcome.experiment_id == "types")
                              .order_by(ABOutcome.id)).all()
    assert stored == [1.0, 2.5, 0.25, 3.0]
    gateway.close()


def test_a_request_of_no_rows_is_not_counted_as_a_decision(served):  # noqa: F811
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "empty-request", platform=served)
    backend = served.serving.local_backend()
    result = gateway.predict(7, [], backend=backend)
    assert all(len(column) == 0 for column in result.values())
    gateway.predict(8, [{"user_id": 1, "basket": 1.0}], backend=backend)
    gateway.flush()
    assert _rows(served, ABDecision, "empty-request") == 1  # was 2: user 7 counted as served
    summary = gateway.summary()["variants"]
    assert sum(v["decisions"] for v in summary.values()) == sum(v["users"] for v in summary.values()) == 1
    gateway.close()


class _Held:
    """The local backend, holding each inference until ``go`` is set (a slow model), and saying when one started."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.started, self.go = threading.Event(), threading.Event()

    def infer(self, *args, **kwargs):
        self.started.set()
        assert self.go.wait(10)
        return self._backend.infer(*args, **kwargs)


def _predicting(served, gateway):  # noqa: F811 - the platform, not the fixture
    """A thread inside gateway.predict, its backend holding the inference: (backend, results, thread)."""
    backend = _Held(served.serving.local_backend())
    got: list = []
    caller = threading.Thread(target=lambda: got.append(gateway.predict(3, [{"user_id": 1, "basket": 1.0}],
                                                                         backend=backend)))
    caller.start()
    assert backend.started.wait(10)
    return backend, got, caller


def test_close_waits_for_a_prediction_under_way_and_writes_its_decision(served):  # noqa: F811
    """A close meanwhile failed the caller with "nothing was logged or served" after the model had served it
    (its features logged as served), and the decision was lost."""
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "close-race", platform=served)
    backend, got, caller = _predicting(served, gateway)
    closer = threading.Thread(target=gateway.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting for the prediction
    backend.go.set()
    caller.join(10)
    closer.join(10)
    assert not closer.is_alive() and len(got) == 1 and len(got[0]["output__0"]) == 1
    assert _rows(served, ABDecision, "close-race") == 1
    with pytest.raises(mp.ServingError, match="is closed"):
        gateway.predict(3, [{"user_id": 1, "basket": 1.0}], backend=served.serving.local_backend())


def test_a_close_from_inside_a_prediction_does_not_wait_for_it_and_its_decision_is_written(served):  # noqa: F811
    """A signal handler closing the gateway runs on the thread that is predicting: close() waited for that
    prediction, which could never end."""
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "close-inside", platform=served)
    local = served.serving.local_backend()

    class Closing:
        def infer(self, *args, **kwargs):
            gateway.close()  # as a SIGTERM handler would, on this thread
            return local.infer(*args, **kwargs)

    done = threading.Thread(target=lambda: gateway.predict(3, [{"user_id": 1, "basket": 1.0}], backend=Closing()))
    done.start()
    done.join(10)
    assert not done.is_alive()
    assert _rows(served, ABDecision, "close-inside") == 1  # written once the prediction ended


def test_a_close_from_inside_a_flush_on_the_same_thread_finishes_when_the_flush_ends(served):  # noqa: F811
    """A signal handler closing the gateway while its thread flushed: close() took the flush lock the thread
    held, for ever."""
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "close-in-flush", platform=served)
    gateway.route(1)
    once = gateway._writes._once
    write = once._write

    def closing_write(conn, rows):  # as a signal landing during the INSERT
        once._write = write
        gateway.route(2)  # buffered meanwhile
        gateway.flush()  # p.close() in a handler flushes: the flush under way writes (a nested one lost rows)
        gateway.close()
        write(conn, rows)

    once._write = closing_write
    done = threading.Thread(target=gateway.flush, daemon=True)  # (it hung for ever)
    done.start()
    done.join(10)
    assert not done.is_alive()
    assert _rows(served, ABDecision, "close-in-flush") == 2
    with pytest.raises(mp.ServingError, match="is closed"):
        gateway.route(3)


def test_a_prediction_another_thread_closes_under_returns_what_it_served(served, monkeypatch):  # noqa: F811
    """The predicting thread wrote the buffer too when a close on another thread waited for it, so a database
    down made the served prediction raise; close() reports it, the prediction returns."""
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "close-down", platform=served)
    backend, got, caller = _predicting(served, gateway)
    monkeypatch.setattr(gateway._writes._once, "flush", lambda take: (_ for _ in ()).throw(RuntimeError("db down")))
    errors: list = []
    closer = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, gateway.close)))
    closer.start()
    backend.go.set()
    caller.join(10)
    closer.join(10)
    assert len(got) == 1 and len(got[0]["output__0"]) == 1 and len(errors) == 1


def test_a_close_pending_on_one_thread_is_finished_by_that_thread_only(served, monkeypatch):  # noqa: F811
    """A close() a prediction's thread made (a signal handler) was finished by whichever other prediction
    ended first: that one then waited for the first and raised the flush's error, although served."""
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "close-owner", platform=served)
    local = served.serving.local_backend()
    held = _Held(local)
    closed, other_done = threading.Event(), threading.Event()

    class Closing:
        def infer(self, *args, **kwargs):
            gateway.close()  # as a signal handler on this thread
            closed.set()
            assert other_done.wait(10)
            return local.infer(*args, **kwargs)

    got: dict = {}

    def predict(name, backend) -> None:
        try:
            got[name] = gateway.predict(3, [{"user_id": 1, "basket": 1.0}], backend=backend)
        except Exception as exc:  # noqa: BLE001 - looked at below
            got[name] = exc

    other = threading.Thread(target=predict, args=("other", held), daemon=True)
    other.start()
    assert held.started.wait(10)
    closer = threading.Thread(target=predict, args=("closer", Closing()), daemon=True)
    closer.start()
    assert closed.wait(10)
    monkeypatch.setattr(gateway._writes._once, "flush", lambda take: (_ for _ in ()).throw(RuntimeError("db down")))
    held.go.set()
    other.join(10)
    assert not other.is_alive() and len(got["other"]["output__0"]) == 1  # served, not the flush's error
    other_done.set()
    closer.join(10)
    assert not closer.is_alive() and isinstance(got["closer"], RuntimeError)  # its close's flush failed


def test_gateway_predict_refuses_choosing_the_version_or_variant_itself(served):  # noqa: F811
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "chosen", platform=served)
    for kwargs in ({"version": 1}, {"variant": "x"}, {"stage": "production"}):  # a raw TypeError
        with pytest.raises(mp.DataError, match=f"leave out {next(iter(kwargs))}"):
            gateway.predict(3, [{"user_id": 1, "basket": 1.0}], backend=served.serving.local_backend(), **kwargs)
    gateway.close()
    assert _rows(served, ABDecision, "chosen") == 0


def test_the_summary_aggregates_each_once_on_postgresql(p):
    """The planner nested the per-variant means inside a loop over users (its estimate: 1 row), so summary()
    re-ran them per user: 10 s for 3,000 users, minutes for 20,000. Every aggregate must run once."""
    if p.db.dialect != "postgresql":
        assert _outcome_stats("x").compile(dialect=sa.dialects.sqlite.dialect()) is not None
        return  # SQLite computes a subquery once either way; the plan below is PostgreSQL's
    gateway = mp.ABGateway("m", "m@staging", 0.5, "plan", platform=p)
    for user in range(300):
        gateway.route(user)
        gateway.record_outcome(user, float(user % 3))
    gateway.flush()
    with p.db.connect() as conn:
        for query in (_outcome_stats("plan"), _user_stats("plan")):
            plan = conn.execute(sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + str(query.compile(
                dialect=conn.dialect, compile_kwargs={"literal_binds": True})))).scalar()
            plan = plan if isinstance(plan, list) else json.loads(plan)
            loops = []

            def walk(node, loops=loops):
                if node["Node Type"] == "Aggregate":
                    loops.append(node["Actual Loops"])
                for child in node.get("Plans", []):
                    walk(child)

            walk(plan[0]["Plan"])
            assert loops and max(loops) == 1, loops
    summary = gateway.summary()
    assert sum(v["outcome_users"] for v in summary["variants"].values()) == 300
    gateway.close()


def test_a_stage_in_a_model_reference_is_read_in_any_case():
    assert parse_model_ref("m@Production") == ("m", {"stage": "production"})  # was the alias 'Production'
    assert parse_model_ref("m@STAGING") == ("m", {"stage": "staging"})
    assert parse_model_ref("m@champion") == ("m", {"alias": "champion"})
