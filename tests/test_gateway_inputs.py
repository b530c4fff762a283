"""User ids and times the A/B decision log cannot store are refused when given, on SQLite and PostgreSQL: on
PostgreSQL a 300-character or NUL-holding id failed its batch in the background and, the batch going back to the
front of the queue, every later write of the experiment with it. p.close() writes what gateways made on the
platform buffered (a multiprocessing worker may exit without exit handlers: its rows were lost)."""
from __future__ import annotations

import multiprocessing
import os
from datetime import datetime, timedelta, timezone

import pytest

import mlplat as mp
from mlplat.db.models import ABDecision, ABOutcome
from test_gateway_routing import COLUMNS, _rows
from test_serving import Scorer, _register


@pytest.fixture
def p(platform):
    _register(platform, "m", Scorer(0.0), columns=COLUMNS)
    _register(platform, "m", Scorer(1.0), columns=COLUMNS, stage="staging")
    return platform


def test_ids_and_values_the_log_cannot_store_are_refused_and_the_rest_is_written(p):
    gateway = p.serving.ab_gateway("m", "m@staging", 0.5, "inputs")
    for user in range(10):
        gateway.route(user)
    bad = [("u" * 256, "at most 255 characters"), (1e300, "at most 255 characters"), (10**5000, "integer of"),
           ("a\x00b", "NUL"), ("user-\ud800", "lone surrogate")]
    for user, message in bad:
        with pytest.raises(mp.DataError, match=message):
            gateway.route(user)
        with pytest.raises(mp.DataError, match=message):
            gateway.record_outcome(user, 1.0)
    assert gateway.route("u" * 255).user_id == "u" * 255  # the longest id stored
    with pytest.raises(mp.DataError, match="finite number"):
        gateway.record_outcome(1, 10**400)  # a raw OverflowError
    for at in (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
               datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))):
        with pytest.raises(mp.DataError, match="outside the years 1 to 9999 in UTC"):
            gateway.record_outcome(1, 1.0, at=at)
    for user in range(10, 20):
        gateway.route(user)
        gateway.record_outcome(user, 1.0)
    gateway.close()
    assert (_rows(p, ABDecision, "inputs"), _rows(p, ABOutcome, "inputs")) == (21, 10)
    with pytest.raises(mp.DataError, match="NUL"):
        p.serving.ab_gateway("m", "m@staging", 0.5, "exp\x00")


def _worker(home: str, database_url: str, first: int) -> None:
    worker = mp.Platform(home, database_url=database_url)
    gateway = worker.serving.ab_gateway("m", "m@staging", 0.5, "workers")
    for user in range(first, first + 50):
        gateway.route(user)
        gateway.record_outcome(user, 1.0)
    worker.close()  # as docs/operations.md says for a multiprocessing child
    os._exit(0)  # no exit handlers, as a multiprocessing child may end


def test_p_close_writes_the_gateways_made_on_it_in_a_worker(p):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(str(p.settings.home), p.settings.database_url, first))
               for first in (0, 1000)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    assert (_rows(p, ABDecision, "workers"), _rows(p, ABOutcome, "workers")) == (100, 100)  # 0 and 0 before
