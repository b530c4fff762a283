"""Materialization progress is kept per store, not per way of connecting to it: a Redis URL given another timeout
or retry count (or a password) lost the record of where the last run ended, and the next run read the whole ttl
window again. A different database or key prefix is another store."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq

import mlplat as mp


def test_progress_survives_a_changed_timeout_but_not_another_prefix(tmp_path, redis_url):
    src = tmp_path / "src"
    src.mkdir()
    now = datetime.now(timezone.utc)
    pq.write_table(pa.table({"k": pa.array([1, 2], pa.int64()),
                             "event_timestamp": pa.array([now - timedelta(hours=2)] * 2, pa.timestamp("us", "UTC")),
                             "x": [1.0, 2.0]}), src / "a.parquet")
    entity = mp.Entity("e", join_keys=["k"])
    view = mp.FeatureView("v", entities=[entity], ttl=timedelta(days=1), schema=[mp.Field("x", mp.Float64)],
                          source=mp.ParquetSource(src))
    end = now - timedelta(hours=1)
    with mp.Platform(tmp_path / "home", online_store=f"{redis_url}?timeout=2") as p:
        p.features.apply([entity, view])
        assert p.features.materialize(end_date=end, progress=False)[0].rows == 2
    with mp.Platform(tmp_path / "home", online_store=f"{redis_url}?timeout=3&retries=4&batch=100") as p:
        assert p.features.last_materialized("v") == end  # None before: the URL differed
        again = p.features.materialize(progress=False)[0]
        assert (again.start, again.rows) == (end, 0)  # from where it ended, not the whole ttl
    with mp.Platform(tmp_path / "home", online_store=f"{redis_url}?prefix=other:") as p:
        assert p.features.last_materialized("v") is None  # other keys: another store
        assert p.features.get_online_features(["v:x"], {"k": [1]})["x"] == [None]
    db = redis_url.rsplit("/", 1)[1]  # redis-py takes a db= parameter over the path: another database, another store
    with mp.Platform(tmp_path / "home", online_store=f"{redis_url}?db={int(db) + 1}&timeout=2") as p:
        assert p.features.last_materialized("v") is None  # was `end`: the next run skipped what the db never got
    with mp.Platform(tmp_path / "home", online_store=f"{redis_url}?db=0{db}") as p:
        assert p.features.last_materialized("v") == again.end  # the same database, spelt otherwise
