"""Retrieval's inputs at their edges: uint64 keys in a source's statistics, a polars Categorical key exported with
string views, a null time hidden in a dictionary, a column where a table was expected, an all-null feature column."""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlplat as mp

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
LATER = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _platform(tmp_path, first: pa.Table, dtype=mp.Int64) -> mp.Platform:
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(first, src / "a.parquet")
    p = mp.Platform(tmp_path / "home")
    entity = mp.Entity("e", join_keys=["k"])
    p.features.apply([entity, mp.FeatureView("v", entities=[entity], ttl=None, schema=[mp.Field("x", dtype)],
                                             source=mp.ParquetSource(src))])
    return p


def test_uint64_key_statistics_do_not_prune_a_row_group_holding_the_key(tmp_path):
    """Read as signed, a max of 2**63 + 1 was negative: the row group holding key 5 was skipped, and key 5 got
    null. Now it is read, and its key above int64 is the StoreError reading it gives."""
    p = _platform(tmp_path, pa.table({"k": pa.array([1], pa.uint64()), "event_timestamp": [T0], "x": [1]}))
    pq.write_table(pa.table({"k": pa.array([5, 7], pa.uint64()), "event_timestamp": [T0] * 2, "x": [55, 77]}),
                   tmp_path / "src" / "b.parquet")
    entity = pa.table({"k": [1, 5], "event_timestamp": [LATER] * 2})
    assert p.features.get_historical_features(entity, ["v:x"]).column("x").to_pylist() == [1, 55]
    pq.write_table(pa.table({"k": pa.array([5, 2**63 + 1], pa.uint64()), "event_timestamp": [T0] * 2, "x": [55, 66]}),
                   tmp_path / "src" / "b.parquet")
    with pytest.raises(mp.StoreError, match="9223372036854775809"):
        p.features.get_historical_features(entity, ["v:x"])
    p.close()


def test_a_polars_categorical_key_with_string_views_is_read(tmp_path):
    first = pa.table({"k": ["a", "b"], "event_timestamp": [T0] * 2, "x": [1, 2]})
    p = _platform(tmp_path, first)
    frame = pl.DataFrame({"k": ["b", "a"], "event_timestamp": [LATER] * 2})
    frame = frame.with_columns(pl.col("k").cast(pl.Categorical))
    entity = frame.to_arrow(compat_level=pl.CompatLevel.newest())
    assert pa.types.is_string_view(entity.schema.field("k").type.value_type)  # what made pyarrow's take fail
    assert p.features.get_historical_features(entity, ["v:x"]).column("x").to_pylist() == [2, 1]
    p.close()


def test_a_null_time_among_a_dictionary_s_values_is_refused(tmp_path):
    p = _platform(tmp_path, pa.table({"k": [1], "event_timestamp": [T0], "x": [4]}))
    times = pa.array([LATER, None], pa.timestamp("us", "UTC")).dictionary_encode(null_encoding="encode")
    assert times.null_count == 0  # the null is a dictionary value: null_count does not see it
    with pytest.raises(mp.DataError, match=r"1 null timestamps \(first at row 1\)"):
        p.features.get_historical_features(pa.table({"k": [1, 1], "event_timestamp": times}), ["v:x"])
    p.close()


def test_a_column_or_nothing_where_a_table_or_features_belong_is_named(tmp_path):
    p = _platform(tmp_path, pa.table({"k": [1], "event_timestamp": [T0], "x": [4]}))
    for series in (pd.Series([1, 2], name="k"), pl.Series("k", [1, 2])):
        with pytest.raises(mp.DataError, match="must be a table, got a (pandas|polars) Series"):
            p.features.get_historical_features(series, ["v:x"])
    for features in (None, 7):
        with pytest.raises(mp.DefinitionError, match="features must be a list"):
            p.features.get_historical_features(pa.table({"k": [1], "event_timestamp": [LATER]}), features)
    p.close()


def test_an_all_null_feature_column_reads_as_nulls_offline_and_online(tmp_path):
    """pandas writes an all-None column as Arrow's null type: apply refused it, and a file of it added later made
    every retrieval of the view a StoreError."""
    p = _platform(tmp_path, pa.table({"k": [1], "event_timestamp": [T0], "x": [5]}))
    pd.DataFrame({"k": [2], "event_timestamp": [T0], "x": [None]}).to_parquet(tmp_path / "src" / "b.parquet",
                                                                              index=False)
    assert pa.types.is_null(pq.read_schema(tmp_path / "src" / "b.parquet").field("x").type)
    entity = pa.table({"k": [1, 2], "event_timestamp": [LATER] * 2})
    assert p.features.get_historical_features(entity, ["v:x"]).column("x").to_pylist() == [5, None]
    p.features.materialize(progress=False)
    assert p.features.get_online_features(["v:x"], {"k": [1, 2]})["x"] == [5, None]
    p.close()
