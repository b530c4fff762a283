"""A run open while its database is reset and created again: each write is an mlplat error naming the problem (a
raw sqlalchemy IntegrityError, FOREIGN KEY constraint failed, escaped before) and end() does not report an end
it did not record."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

import mlplat as mp


def _reset(p: mp.Platform) -> None:
    """Every mlplat table dropped, then made again by a new platform on the same database (as the docs advise)."""
    with p.db.engine.begin() as conn:
        if p.db.dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        tables = sa.MetaData()
        tables.reflect(conn)
        tables.drop_all(conn)
    mp.Platform(p.settings.home, database_url=p.settings.database_url).close()


def test_writes_of_a_run_whose_database_was_reset_are_store_errors(tmp_path, database_url):
    p = mp.Platform(tmp_path / "home", database_url=database_url)
    run = p.runs.start("e")
    run.log_metric("m", 1.0)
    run.flush()
    _reset(p)
    gone = "is no longer in the database"
    for call in (lambda: run.log_param("b", 2), lambda: run.set_tag("t", "v")):
        with pytest.raises(mp.StoreError, match=gone):
            call()
    with pytest.raises((mp.StoreError, mp.NotFoundError), match=gone):
        run.end()
    assert p.runs.search("e") == []  # nothing was written into the new tables
    p.close()


def test_ending_a_run_whose_row_is_gone_is_not_found(tmp_path):
    with mp.Platform(tmp_path / "home") as p:
        run = p.runs.start("e")
        _reset(p)
        with pytest.raises(mp.NotFoundError, match=f"run {run.id} is no longer in the database"):
            run.end()  # reported it ended (an UPDATE of no rows) before
