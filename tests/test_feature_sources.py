"""Sources in the Arrow layouts writers give (view types), and materialize's time bounds to the nanosecond."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mlplat as mp
from mlplat import _arrow

UTC = timezone.utc
NOW = datetime.now(UTC).replace(microsecond=0)
TS = pa.timestamp("us", tz="UTC")
TS_NS = pa.timestamp("ns", tz="UTC")
USER = mp.Entity("user", join_keys=["user_id"])
MERCHANT = mp.Entity("merchant", join_keys=["merchant_id"])


@pytest.fixture
def p(sqlite_platform):
    return sqlite_platform


def hours_ago(*hours) -> list[datetime]:
    return [NOW - timedelta(hours=h) for h in hours]


def write_newest(path: Path, frame: pl.DataFrame) -> None:
    """As a polars user writes a frame with pyarrow: views for strings and binaries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(frame.to_arrow(compat_level=pl.CompatLevel.newest()), path)


def online_and_offline(p, key: str, keys: list, refs: list[str]) -> tuple[dict, pa.Table]:
    online = p.features.get_online_features(refs, {key: keys})
    entity_df = pa.table({key: keys, "event_timestamp": pa.array([NOW] * len(keys), TS)})
    return online, p.features.get_historical_features(entity_df, refs)


# ------------------------------------------------------------- view types
def test_string_and_binary_view_features_are_retrieved_and_materialized(p, tmp_path):
    write_newest(tmp_path / "src" / "a.parquet", pl.DataFrame({
        "user_id": [1, 1, 2, 3],
        "event_timestamp": hours_ago(5, 1, 2, 3),
        "city": ["paris", "rome", None, "oslo"],
        "avatar": [b"\x00old", b"\x01new", b"\x02", None],
    }))
    schema = pq.read_schema(tmp_path / "src" / "a.parquet")
    assert (schema.field("city").type, schema.field("avatar").type) == (pa.string_view(), pa.binary_view())
    view = mp.FeatureView("profile", entities=[USER], ttl=timedelta(days=1),
                          schema=[mp.Field("city", mp.String), mp.Field("avatar", mp.Bytes)],
                          source=mp.ParquetSource(tmp_path / "src"))
    p.features.apply([USER, view])
    refs = ["profile:city", "profile:avatar"]
    [result] = p.features.materialize(end_date=NOW, progress=False)
    assert result.rows == 3

    online, offline = online_and_offline(p, "user_id", [1, 2, 3, 4], refs)
    assert offline.schema.field("city").type == pa.string() and offline.schema.field("avatar").type == pa.binary()
    assert offline.column("city").to_pylist() == ["rome", None, "oslo", None]
    assert offline.column("avatar").to_pylist() == [b"\x01new", b"\x02", None, None]
    assert online["city"] == offline.column("city").to_pylist()
    assert online["avatar"] == offline.column("avatar").to_pylist()


def test_a_string_view_join_key_works_offline_and_online_beside_files_with_plain_strings(p, tmp_path):
    src = tmp_path / "src"
    write_newest(src / "a.parquet", pl.DataFrame({
        "merchant_id": ["acme", "bob", "acme"], "event_timestamp": hours_ago(4, 4, 3),
        "risk": [0.1, 0.2, 0.3], "tag": [b"a0", b"b0", b"a1"],
    }))
    pq.write_table(pa.table({  # a later file of the same source, in the plain layout
        "merchant_id": ["bob", "cid"], "event_timestamp": pa.array(hours_ago(1, 2), TS),
        "risk": [0.5, 0.6], "tag": pa.array([b"b1", b"c0"], pa.binary()),
    }), src / "b.parquet")
    view = mp.FeatureView("risk", entities=[MERCHANT], ttl=timedelta(days=1),
                          schema=[mp.Field("risk", mp.Float64), mp.Field("tag", mp.Bytes)],
                          source=mp.ParquetSource(src))
    p.features.apply([MERCHANT, view])
    [result] = p.features.materialize(end_date=NOW, progress=False)
    assert (result.rows, result.written) == (3, 3)

    keys = ["acme", "bob", "cid", "dan", None]
    online, offline = online_and_offline(p, "merchant_id", keys, ["risk:risk", "risk:tag"])
    assert offline.column("risk").to_pylist() == [0.3, 0.5, 0.6, None, None]
    assert offline.column("tag").to_pylist() == [b"a1", b"b1", b"c0", None, None]
    assert online["risk"] == offline.column("risk").to_pylist()
    assert online["tag"] == offline.column("tag").to_pylist()

    # entity keys given as string views too (a polars entity frame exported the newest way)
    entity_df = pl.DataFrame({"merchant_id": keys[:4], "event_timestamp": [NOW] * 4})
    polars_out = p.features.get_historical_features(entity_df.to_arrow(compat_level=pl.CompatLevel.newest()),
                                                    ["risk:tag"])
    assert polars_out.column("tag").to_pylist() == [b"a1", b"b1", b"c0", None]


def test_rows_pushed_to_a_source_in_view_types_are_read_back(p, tmp_path):
    write_newest(tmp_path / "src" / "a.parquet", pl.DataFrame({
        "merchant_id": ["acme"], "event_timestamp": hours_ago(3), "note": ["first"],
    }))
    view = mp.FeatureView("notes", entities=[MERCHANT], ttl=timedelta(days=1),
                          schema=[mp.Field("note", mp.String)], source=mp.ParquetSource(tmp_path / "src"))
    p.features.apply([MERCHANT, view])
    p.features.push("notes", pa.table({"merchant_id": ["acme", "bob"], "event_timestamp": pa.array(hours_ago(1, 1), TS),
                                       "note": ["second", "bob's"]}), to_offline=True)
    online, offline = online_and_offline(p, "merchant_id", ["acme", "bob"], ["notes:note"])
    assert offline.column("note").to_pylist() == ["second", "bob's"] == online["note"]


# ------------------------------------------------- nanosecond time bounds
def _ns_source(p, tmp_path: Path, users: list[int], times: list[int], values: list[int]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "event_timestamp": pa.array(times, TS_NS),
                             "f": pa.array(values, pa.int64())}), src / "a.parquet")
    view = mp.FeatureView("v", entities=[USER], ttl=timedelta(days=1), schema=[mp.Field("f", mp.Int64)],
                          source=mp.ParquetSource(src))
    p.features.apply([USER, view])


def test_materialize_end_date_keeps_its_nanoseconds(p, tmp_path):
    end = pd.Timestamp(NOW) - pd.Timedelta(minutes=5) + pd.Timedelta(nanoseconds=500)
    # the row at end itself is the one the offline rule picks at end; the row 1 ns later is not yet seen
    _ns_source(p, tmp_path, [1, 1, 1], [end.value - 3_600_000_000_000, end.value, end.value + 1], [1, 2, 3])
    p.features.materialize(end_date=end, progress=False)
    entity_df = pa.table({"user_id": [1], "event_timestamp": pa.array([end.value], TS_NS)})
    offline = p.features.get_historical_features(entity_df, ["v:f"]).column("f").to_pylist()
    assert offline == [2]
    assert p.features.get_online_features(["v:f"], {"user_id": [1]})["f"] == offline


def test_materialize_start_date_keeps_its_nanoseconds(p, tmp_path):
    start = pd.Timestamp(NOW) - pd.Timedelta(hours=1) + pd.Timedelta(nanoseconds=500)
    # user 1's only row is 1 ns before start (an earlier materialization's business), user 2's is at start
    _ns_source(p, tmp_path, [1, 2], [start.value - 1, start.value], [10, 20])
    [result] = p.features.materialize(start_date=start, end_date=NOW, progress=False)
    assert result.rows == 1
    assert p.features.get_online_features(["v:f"], {"user_id": [1, 2]})["f"] == [None, 20]


def test_a_nat_end_date_is_refused_by_name_and_nothing_is_recorded(p, tmp_path):
    _ns_source(p, tmp_path, [1], [pd.Timestamp(NOW).value], [1])
    with pytest.raises(mp.DataError, match="end_date must be a datetime.*NaT"):
        p.features.materialize(end_date=pd.NaT, progress=False)
    assert p.features.last_materialized("v") is None


@pytest.mark.parametrize("value", [
    pd.Timestamp("2026-03-01 12:00:00.000000501", tz="UTC"),
    pd.Timestamp("2026-03-01 12:00:00.000000999", tz="Europe/Paris"),
    pd.Timestamp("2026-03-01 12:00:00.000000001"),  # naive: UTC
    pd.Timestamp("1969-12-31 23:59:59.999999999", tz="UTC"),  # before the epoch
    pd.Timestamp("1677-09-21 00:12:43.145224193", tz="UTC"),  # one above the int64 floor
])
def test_datetime_ns_of_a_pandas_timestamp_is_exact(value):
    assert _arrow.datetime_ns(value) == value.value
    assert _arrow.timedelta_ns(pd.Timedelta(value.value, unit="ns")) == value.value


def test_timedelta_ns_counts_a_pandas_timedelta_to_the_nanosecond_and_a_plain_one_as_before():
    assert _arrow.timedelta_ns(pd.Timedelta(nanoseconds=-1)) == -1
    assert _arrow.timedelta_ns(pd.Timedelta(days=2, nanoseconds=1_001)) == 2 * 86_400_000_000_000 + 1_001
    assert _arrow.datetime_ns(datetime(2026, 3, 1, 12, 0, 0, 7)) == pd.Timestamp("2026-03-01 12:00:00.000007").value
    assert _arrow.timedelta_ns(timedelta(days=-1, microseconds=3)) == -86_400_000_000_000 + 3_000
