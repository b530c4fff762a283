"""Rows push cannot read are a DataError naming what is wrong, and nothing is written (a raw AttributeError or
UnicodeEncodeError escaped before)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlplat as mp


def test_rows_push_cannot_read_are_data_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    pq.write_table(pa.table({"u": pa.array([1], pa.int64()),
                             "event_timestamp": pa.array([at], pa.timestamp("us", "UTC")), "s": ["a"]}),
                   src / "a.parquet")
    user = mp.Entity("user", join_keys=["u"])
    view = mp.FeatureView("v", entities=[user], ttl=timedelta(days=1), schema=[mp.Field("s", mp.String)],
                          source=mp.ParquetSource(src))
    with mp.Platform(tmp_path / "home") as p:
        p.features.apply([user, view])
        p.features.materialize(progress=False)
        cases = {"a lone surrogate": ({"u": [1], "event_timestamp": [at], "s": ["\ud800"]}, "not valid Unicode"),
                 "rows that are not dicts": ([1, 2], "one dict per row, got int 1"),
                 "a dict among tuples": ([{"u": 1}, (1, at, "x")], "one dict per row, got tuple")}
        for rows, message in cases.values():
            with pytest.raises(mp.DataError, match=message):
                p.features.push("v", rows)
        assert p.features.get_online_features(["v:s"], {"u": [1]})["s"] == ["a"]
