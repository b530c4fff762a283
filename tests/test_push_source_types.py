"""push(to_offline=True) into a source whose columns are narrower than the view's types: online serves what the
source's file holds (a float32 column's rounding), or the push is refused (a date column would cut the time of
day); and records whose ttl ended before 1970 expire like any other. On SQLite, Redis and a Redis Cluster."""
from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

import mlplat as mp

UTC = timezone.utc
TS = pa.timestamp("us", tz="UTC")
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
KEY = mp.Entity("k", join_keys=["k"])


@pytest.fixture
def p(tmp_path, online_url):
    platform = mp.Platform(tmp_path / "home", online_store=online_url, threads=2)
    yield platform
    platform.close()


def _view(p, src: Path, schema, columns: dict, ttl=None) -> None:
    src.mkdir()
    pq.write_table(pa.table({"k": pa.array([1], pa.int64()), **columns}), src / "a.parquet")
    view = mp.FeatureView("v", entities=[KEY], ttl=ttl, schema=schema, source=mp.ParquetSource(src))
    p.features.apply([KEY, view])


def _offline_now(p, ref: str) -> list:
    rows = pa.table({"k": [1], "event_timestamp": pa.array([datetime.now(UTC)], TS)})
    return p.features.get_historical_features(rows, [ref]).column(ref.split(":")[1]).to_pylist()


def _files(src: Path) -> list[str]:
    return sorted(str(f.relative_to(src)) for f in src.rglob("*") if f.is_file())


def test_a_float_pushed_into_a_float32_column_is_served_as_the_file_holds_it(p, tmp_path):
    """Online kept 0.1 while the offline file held 0.10000000149011612: online != offline, with no error."""
    _view(p, tmp_path / "src", [mp.Field("x", mp.Float64)],
          {"event_timestamp": pa.array([NOW - timedelta(hours=1)], TS), "x": pa.array([0.5], pa.float32())})
    assert p.features.push("v", {"k": [1], "event_timestamp": [NOW], "x": [0.1]}, to_offline=True) == 1
    online = p.features.get_online_features(["v:x"], {"k": [1]})["x"]
    assert online == _offline_now(p, "v:x") == [float(pa.scalar(0.1, pa.float32()).as_py())] != [0.1]


@pytest.mark.parametrize("column", ["t", "event_timestamp"])
def test_a_time_a_date_column_would_cut_to_its_day_is_refused_and_nothing_is_written(p, tmp_path, column):
    """A date32 column (it backs a Timestamp, and may be the event time) kept only the day of a pushed time:
    offline had midnight where online had the time, and a row stamped now fell out of a 1-hour ttl offline."""
    day = (NOW - timedelta(days=1)).date()
    src = tmp_path / "src"
    columns = {"event_timestamp": pa.array([NOW - timedelta(minutes=30)], TS), "t": pa.array([NOW], TS)}
    columns[column] = pa.array([day], pa.date32())
    _view(p, src, [mp.Field("t", mp.Timestamp)], columns, ttl=timedelta(days=3))
    before = _files(src)
    at = NOW.replace(hour=12, minute=34) - timedelta(days=1)
    row = {"k": [1], "event_timestamp": [at], "t": [at]}
    with pytest.raises(mp.DataError, match=f"column '{column}' holds .* which the source's date32.* would keep as "
                                           ".*00:00:00"):
        p.features.push("v", row, to_offline=True)
    assert _files(src) == before and p.features.get_online_features(["v:t"], {"k": [1]})["t"] == [None]
    midnight = datetime.combine(at.date(), datetime.min.time(), UTC)
    assert p.features.push("v", {**row, column: [midnight]}, to_offline=True) == 1  # a time the column holds
    assert p.features.get_online_features(["v:t"], {"k": [1]})["t"] == _offline_now(p, "v:t")


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_record_whose_ttl_ended_before_1970_is_not_kept_forever(tmp_path, redis_url, store):
    """Its expiry came out <= 0, which both stores read as 'never expires': the key stayed for good."""
    url = f"sqlite:///{tmp_path / 'online.db'}" if store == "sqlite" else redis_url
    with mp.Platform(tmp_path / "home", online_store=url) as p:
        old = datetime(1969, 6, 1, tzinfo=UTC)
        _view(p, tmp_path / "src", [mp.Field("n", mp.Int64)],
              {"event_timestamp": pa.array([old - timedelta(hours=2)], TS), "n": pa.array([7], pa.int64())},
              ttl=timedelta(days=1))
        [result] = p.features.materialize(end_date=old, progress=False)
        assert result.written == 1  # the row is alive at end_date
        assert p.features.get_online_features(["v:n"], {"k": [1]})["n"] == [None]  # not now
        p.features.materialize(end_date=old + timedelta(hours=1), progress=False)  # sweeps expired SQLite rows
    if store == "redis":
        client = redis.Redis.from_url(url)
        left = [(k, client.pttl(k)) for k in client.scan_iter(count=1000)]
        assert left == [], left  # PTTL -1: kept forever
    else:
        with sqlite3.connect(tmp_path / "online.db") as conn:
            assert conn.execute("SELECT count(*) FROM online_records").fetchone()[0] == 0
