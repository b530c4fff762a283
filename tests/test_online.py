"""The online store on SQLite, one Redis node and a real Redis Cluster: consistency, CAS, ttl, errors."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

import mlplat as mp
from mlplat.features.online import redis as redis_store
from ports import free_port
from workers import after_parent_closes

UTC = timezone.utc
TS = pa.timestamp("us", tz="UTC")
NOW = datetime.now(UTC).replace(microsecond=0)
USER = mp.Entity("user", join_keys=["user_id"])
REFS = ["txn:count", "txn:amount", "txn:note"]


def txn_view(src: Path, ttl=timedelta(days=7), **kw) -> mp.FeatureView:
    return mp.FeatureView(
        "txn", entities=[USER], ttl=ttl,
        schema=[mp.Field("count", mp.Int64), mp.Field("amount", mp.Float32), mp.Field("note", mp.String)],
        source=mp.ParquetSource(src, created_timestamp_field="created"), **kw)


def write(path: Path, users, ages, counts, created_ages=None, amounts=None, notes=None) -> None:
    """Rows stamped NOW - age (ages in hours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created_ages = ages if created_ages is None else created_ages
    pq.write_table(pa.table({
        "user_id": pa.array(users, pa.int64()),
        "event_timestamp": pa.array([NOW - timedelta(hours=int(a)) for a in ages], TS),
        "created": pa.array([NOW - timedelta(hours=int(a)) for a in created_ages], TS),
        "count": pa.array(counts, pa.int64()),
        "amount": pa.array(amounts if amounts is not None else [float(c) / 4 for c in counts], pa.float32()),
        "note": pa.array(notes if notes is not None else [f"n{c}" for c in counts], pa.string()),
    }), path)


@pytest.fixture
def p(tmp_path, online_url):
    platform = mp.Platform(tmp_path / "home", online_store=online_url, threads=2)
    yield platform
    platform.close()


def offline_now(p, users, refs=REFS, now=NOW) -> dict:
    edf = pa.table({"user_id": pa.array(users, pa.int64()), "event_timestamp": pa.array([now] * len(users), TS)})
    out = p.features.get_historical_features(edf, refs)
    return {name: out.column(name).to_pylist() for name in out.column_names[2:]}


# ----------------------------------------------------------- consistency
def test_online_equals_offline_for_random_data(p, tmp_path):
    rng = np.random.default_rng(11)
    n = 3000
    users = rng.integers(0, 400, n)
    ages = rng.integers(-5, 24 * 10, n)  # some rows are in the future: never served before their time
    created = ages - rng.integers(0, 3, n)
    counts = rng.integers(-50, 50, n)
    notes = [None if i % 17 == 0 else f"note-{i}" for i in range(n)]
    amounts = [None if i % 13 == 0 else float(v) for i, v in enumerate(rng.normal(size=n))]
    half = n // 2
    write(tmp_path / "src" / "a.parquet", users[:half], ages[:half], counts[:half], created[:half],
          amounts[:half], notes[:half])
    write(tmp_path / "src" / "b.parquet", users[half:], ages[half:], counts[half:], created[half:],
          amounts[half:], notes[half:])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    [result] = p.features.materialize(end_date=NOW, progress=False)
    assert result.rows > 300 and result.written == result.rows
    asked = list(range(-3, 410))
    online = p.features.get_online_features(REFS, [{"user_id": u} for u in asked])
    offline = offline_now(p, asked)
    assert online["user_id"] == asked
    for name in ("count", "amount", "note"):
        assert online[name] == offline[name], name
    assert sum(v is not None for v in online["count"]) == result.rows  # every materialized entity is served


def test_composite_and_string_keys_across_two_views(p, tmp_path):
    merchant = mp.Entity("merchant", join_keys=["merchant_id"])
    src = tmp_path / "um"
    src.mkdir()
    pq.write_table(pa.table({
        "user_id": pa.array([1, 1, 2], pa.int64()), "merchant_id": ["acme", "bob", "acme"],
        "event_timestamp": pa.array([NOW - timedelta(hours=1)] * 3, TS), "visits": [3, 4, 5]}), src / "a.parquet")
    msrc = tmp_path / "m"
    msrc.mkdir()
    pq.write_table(pa.table({"merchant_id": ["acme", "bob"], "event_timestamp": pa.array([NOW] * 2, TS),
                             "risk": [0.5, 0.25]}), msrc / "a.parquet")
    um = mp.FeatureView("um", entities=[USER, merchant], ttl=None, schema=[mp.Field("visits", mp.Int64)],
                        source=mp.ParquetSource(src))
    mr = mp.FeatureView("mr", entities=[merchant], ttl=None, schema=[mp.Field("risk", mp.Float64)],
                        source=mp.ParquetSource(msrc))
    p.features.apply([USER, merchant, um, mr])
    p.features.materialize(end_date=NOW, progress=False)
    rows = {"user_id": [1, 2, 1, 3], "merchant_id": ["bob", "acme", "bob", "acme"]}
    got = p.features.get_online_features(["mr:risk", "um:visits"], rows)
    assert list(got) == ["merchant_id", "user_id", "risk", "visits"]  # keys in the order the views need them
    assert got["visits"] == [4, 5, 4, None] and got["risk"] == [0.25, 0.5, 0.25, 0.5]


def test_a_feature_named_as_a_join_key_of_the_request_is_refused_not_written_over_the_key(p, tmp_path):
    """The profile's 'merchant_id' feature replaced the merchant_id key column in the answer (offline refuses)."""
    merchant = mp.Entity("merchant", join_keys=["merchant_id"])
    for name, table in (("profile", {"user_id": [1, 2], "merchant_id": [777, 888]}),
                        ("risk", {"merchant_id": [10, 20], "fraud_rate": [0.1, 0.2]})):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({**table, "event_timestamp": pa.array([NOW - timedelta(hours=1)] * 2, TS)}),
                       tmp_path / name / "a.parquet")
    profile = mp.FeatureView("profile", entities=[USER], ttl=None, schema=[mp.Field("merchant_id", mp.Int64)],
                             source=mp.ParquetSource(tmp_path / "profile"))
    risk = mp.FeatureView("risk", entities=[merchant], ttl=None, schema=[mp.Field("fraud_rate", mp.Float64)],
                          source=mp.ParquetSource(tmp_path / "risk"))
    p.features.apply([USER, merchant, profile, risk])
    p.features.materialize(end_date=NOW, progress=False)
    refs, rows = ["profile:merchant_id", "risk:fraud_rate"], {"user_id": [1, 2], "merchant_id": [10, 20]}
    with pytest.raises(mp.DataError, match="feature 'merchant_id' has the name of a join key .*full_feature_names"):
        p.features.get_online_features(refs, rows)
    got = p.features.get_online_features(refs, rows, full_feature_names=True)
    assert got == {"user_id": [1, 2], "merchant_id": [10, 20], "profile__merchant_id": [777, 888],
                   "risk__fraud_rate": [0.1, 0.2]}


def test_threads_that_ended_do_not_keep_their_sqlite_online_connections(tmp_path):
    """A thread-per-request server: each thread's connection (2 files) stayed open until close(), so a few
    hundred requests ran the process out of file descriptors ("unable to open database file")."""
    from mlplat.features.online.sqlite import SQLiteOnlineStore

    store = SQLiteOnlineStore(f"sqlite:///{tmp_path / 'online.db'}")
    store.read([])

    def request() -> None:
        assert store.read([(["v@1"], [b"k"])]) == [None]

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    for _ in range(5):  # warm-up: the first threads' connections
        worker = threading.Thread(target=request)
        worker.start()
        worker.join()
    before = open_files()
    for _ in range(100):
        worker = threading.Thread(target=request)
        worker.start()
        worker.join()
    assert open_files() <= before + 2  # 200 more before
    store.close()


# ---------------------------------------------------- materialize and CAS
def test_materialize_is_incremental_and_rerunning_changes_nothing(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1, 2], [48, 30], [10, 20])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    first = p.features.materialize(end_date=NOW - timedelta(hours=40), progress=False)[0]
    assert (first.start, first.rows) == (None, 1)  # only user 1's row is old enough
    assert p.features.get_online_features(["txn:count"], {"user_id": [1, 2, 3]})["count"] == [10, None, None]
    second = p.features.materialize(end_date=NOW, progress=False)[0]
    assert second.start == NOW - timedelta(hours=40) and second.rows == 1  # continues where the first ended
    again = p.features.materialize(end_date=NOW, progress=False)[0]
    assert again.rows == 0 and again.written == 0
    assert p.features.get_online_features(["txn:count"], {"user_id": [1, 2]})["count"] == [10, 20]
    # an explicit start re-reads the window; the store keeps what it has (same rows)
    redo = p.features.materialize(end_date=NOW, start_date=NOW - timedelta(days=3), progress=False)[0]
    assert redo.rows == 2
    assert p.features.get_online_features(["txn:count"], {"user_id": [1, 2]})["count"] == [10, 20]
    with pytest.raises(mp.DataError, match="is after end_date"):
        p.features.materialize(end_date=NOW, start_date=NOW + timedelta(days=1), progress=False)
    with pytest.raises(mp.DataError, match="is in the future"):  # online would serve values before their time
        p.features.materialize(end_date=datetime.now(timezone.utc) + timedelta(hours=3), progress=False)
    for arg in ("end_date", "start_date"):
        with pytest.raises(mp.DataError, match=f"{arg} must be a datetime \\(naive means UTC\\), got '2026-01-01'"):
            p.features.materialize(**{arg: "2026-01-01"}, progress=False)
    assert p.features.materialize(end_date=NOW, progress=False)[0].start == NOW  # the recorded end did not move


def test_an_older_row_never_overwrites_a_newer_one(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1, 2], [10, 10], [1, 2])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    newer = {"user_id": [1], "event_timestamp": [NOW - timedelta(hours=1)], "count": [100], "amount": [1.0],
             "note": ["pushed"]}
    assert p.features.push("txn", newer) == 1
    p.features.materialize(end_date=NOW, progress=False)
    got = p.features.get_online_features(["txn:count", "txn:note"], {"user_id": [1, 2]})
    assert got["count"] == [100, 2] and got["note"] == ["pushed", "n2"]
    older = dict(newer, event_timestamp=[NOW - timedelta(hours=5)], count=[7])
    assert p.features.push("txn", older) == 0
    assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [100]


def test_ttl_is_enforced_on_read_relative_to_now(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1, 2], [24 * 3, 1], [1, 2])
    p.features.apply([USER, txn_view(tmp_path / "src", ttl=timedelta(days=2))])
    # materialized as of 2.5 days ago, user 1's row (3 days old now) was only 0.5 days old then
    p.features.materialize(end_date=NOW - timedelta(days=2, hours=12), progress=False)
    p.features.materialize(end_date=NOW, progress=False)
    got = p.features.get_online_features(["txn:count"], {"user_id": [1, 2]})
    assert got["count"] == [None, 2]
    assert offline_now(p, [1, 2], ["txn:count"])["count"] == [None, 2]


def test_views_not_online_are_skipped_and_refused(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1], [1], [1])
    p.features.apply([USER, txn_view(tmp_path / "src", online=False)])
    assert p.features.materialize(end_date=NOW, progress=False) == []
    with pytest.raises(mp.DefinitionError, match="not served online"):
        p.features.get_online_features(["txn:count"], {"user_id": [1]})
    with pytest.raises(mp.DefinitionError, match="not served online"):
        p.features.materialize(views=["txn"], progress=False)


def test_a_push_to_a_view_not_served_online_is_refused_unless_it_goes_offline(p, tmp_path):
    # it returned 0 and the rows went nowhere
    write(tmp_path / "src" / "a.parquet", [1], [1], [1])
    p.features.apply([USER, txn_view(tmp_path / "src", online=False)])
    row = {"user_id": [2], "event_timestamp": [NOW], "count": [7], "amount": [1.0], "note": ["x"]}
    with pytest.raises(mp.DefinitionError, match="'txn' is not served online .*to_offline=True"):
        p.features.push("txn", row)
    assert sorted(os.listdir(tmp_path / "src")) == ["a.parquet"]
    assert p.features.push("txn", row, to_offline=True) == 0
    assert offline_now(p, [2], ["txn:count"])["count"] == [7]


def test_features_given_as_one_string_are_refused_by_name_online(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1], [1], [1])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    with pytest.raises(mp.DefinitionError, match="must be a list of 'view:feature' references"):
        p.features.get_online_features("txn:count", {"user_id": [1]})


def test_a_dict_of_columns_holding_one_string_is_not_read_as_one_row_per_character(tmp_path):
    # {"m": "ab"} was read as two entity rows, 'a' and 'b', and answered for them
    merchant = mp.Entity("merchant", join_keys=["m"])
    path = tmp_path / "src" / "a.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"m": ["a", "b", "ab"], "event_timestamp": pa.array([NOW] * 3, TS),
                             "r": [1.0, 2.0, 3.0]}), path)
    view = mp.FeatureView("mv", entities=[merchant], ttl=None, schema=[mp.Field("r", mp.Float64)],
                          source=mp.ParquetSource(tmp_path / "src"))
    with mp.Platform(tmp_path / "h") as p:
        p.features.apply([merchant, view])
        p.features.materialize(end_date=NOW, progress=False)
        assert p.features.get_online_features(["mv:r"], {"m": ["ab"]})["r"] == [3.0]
        with pytest.raises(mp.DataError, match="column 'm' must be a list of values, one per entity row, got str"):
            p.features.get_online_features(["mv:r"], {"m": "ab"})


def test_a_new_definition_version_starts_empty_and_is_seen_at_once(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1], [1], [5])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    p.features.materialize(end_date=NOW, progress=False)
    assert p.features.get_online_features(["txn:count"], [{"user_id": 1}])["count"] == [5]
    p.features.apply([txn_view(tmp_path / "src", ttl=timedelta(days=8))])  # version 2
    assert p.features.get_online_features(["txn:count"], [{"user_id": 1}])["count"] == [None]
    p.features.materialize(end_date=NOW, progress=False)
    assert p.features.get_online_features(["txn:count"], [{"user_id": 1}])["count"] == [5]


# ------------------------------------------------------------ entity rows
def test_entity_row_forms_duplicates_unknown_and_result_forms(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1, 2], [1, 1], [10, 20])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    p.features.materialize(end_date=NOW, progress=False)
    want = [10, 20, 10, None]
    forms = [
        [{"user_id": 1}, {"user_id": 2}, {"user_id": 1}, {"user_id": 99}],
        {"user_id": [1, 2, 1, 99]},
        {"user_id": np.array([1, 2, 1, 99])},
        pd.DataFrame({"user_id": [1, 2, 1, 99]}),
        pa.table({"user_id": [1, 2, 1, 99]}),
    ]
    for rows in forms:
        assert p.features.get_online_features(["txn:count"], rows)["count"] == want
    got = p.features.get_online_features(REFS, {"user_id": [1, None]}, full_feature_names=True)
    assert list(got) == ["user_id", "txn__count", "txn__amount", "txn__note"]
    assert got["txn__count"] == [10, None]
    table = got.to_arrow()
    assert table.schema.field("txn__amount").type == pa.float32() and table.num_rows == 2
    notes = got.to_pandas()["txn__note"]
    assert notes[0] == "n10" and pd.isna(notes[1])
    assert p.features.get_online_features(["txn:count"], {"user_id": []})["count"] == []


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"uid": [1]}, "no column 'user_id'"),
        ([{"uid": 1}], "entity row 0 has no join key 'user_id'"),
        ([1, 2], "entity row 0 must be a dict"),
        ({"user_id": ["1"]}, "entity row 0: join key 'user_id' must be int: expected an integer, got str"),
        ({"user_id": [1.5]}, "join key 'user_id' must be int: expected an integer, got float"),
        ("users", "pandas DataFrame, a pyarrow Table or a polars DataFrame"),
        ({"user_id": 1}, "column 'user_id' must be a list of values, one per entity row, got int 1"),
        ({"user_id": "12"}, "column 'user_id' must be a list of values, one per entity row, got str '12'"),
    ],
)
def test_bad_entity_rows_name_the_problem(p, tmp_path, rows, message):
    write(tmp_path / "src" / "a.parquet", [1], [1], [10])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    with pytest.raises(mp.DataError, match=message):
        p.features.get_online_features(["txn:count"], rows)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"user_id": 1, "event_timestamp": NOW, "count": 1, "amount": 1.0}], "no feature 'note'"),
        ([{"user_id": 1, "count": 1, "amount": 1.0, "note": "x"}], "no timestamp column 'event_timestamp'"),
        ([{"user_id": "1", "event_timestamp": NOW, "count": 1, "amount": 1.0, "note": "x"}],
         "join key 'user_id' is string"),
        ([{"user_id": 1, "event_timestamp": NOW, "count": "many", "amount": 1.0, "note": "x"}],
         "feature 'count' is string"),
        ([{"user_id": None, "event_timestamp": NOW, "count": 1, "amount": 1.0, "note": "x"}],
         "join key 'user_id' has nulls"),
        ([{"user_id": 1, "event_timestamp": None, "count": 1, "amount": 1.0, "note": "x"}],
         "every row needs a 'event_timestamp' time"),
        ([{"user_id": 1, "event_timestamp": datetime(2300, 1, 1, tzinfo=UTC), "count": 1, "amount": 1.0,
           "note": "x"}], "push to 'txn': a timestamp .* is out of the nanosecond range"),
        ([{"user_id": 1, "event_timestamp": NOW + timedelta(hours=1), "count": 1, "amount": 1.0, "note": "x"}],
         "push to 'txn': a row's 'event_timestamp' is in the future"),
        (pa.table({"user_id": pa.array([2**63], pa.uint64()), "event_timestamp": pa.array([NOW], TS),
                   "count": [1], "amount": [1.0], "note": ["x"]}),
         "join key 'user_id' holds 9223372036854775808, above the largest int64 key"),
        ([{"user_id": 1, "event_timestamp": NOW, "count": 1, "amount": 1.5, "note": "x"},
          {"user_id": 1, "event_timestamp": NOW, "count": 1, "amount": 1e40, "note": "x"}],
         r"feature 'amount' holds 1e\+40 \(row 1\), beyond the range of Float32"),
        ([{"user_id": 1, "event_timestamp": NOW, "count": 2**70, "amount": 1.0, "note": "x"}],
         "push: rows hold an integer that does not fit in 64 bits"),  # was a bare OverflowError
        ({"user_id": [1], "event_timestamp": [NOW], "count": [-(2**64)], "amount": [1.0], "note": ["x"]},
         "push: rows hold an integer that does not fit in 64 bits"),
    ],
)
def test_bad_pushes_are_refused_and_store_unchanged(p, tmp_path, rows, message):
    write(tmp_path / "src" / "a.parquet", [1], [1], [10])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    p.features.materialize(end_date=NOW, progress=False)
    with pytest.raises(mp.DataError, match=message):
        p.features.push("txn", rows)
    assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [10]


def test_a_source_time_beyond_nanoseconds_is_a_store_error_naming_the_view(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1], [1], [10])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    p.features.materialize(end_date=NOW, progress=False)
    times = pa.array([NOW - timedelta(hours=1), datetime(2300, 1, 1, tzinfo=UTC)], TS)  # one row group
    pq.write_table(pa.table({"user_id": pa.array([2, 3], pa.int64()), "event_timestamp": times, "created": times,
                             "count": pa.array([5, 6], pa.int64()), "amount": pa.array([1.0, 2.0], pa.float32()),
                             "note": ["near", "far"]}), tmp_path / "src" / "b.parquet")
    with pytest.raises(mp.StoreError, match="feature view 'txn': a timestamp .* out of the nanosecond range"):
        p.features.materialize(end_date=NOW, start_date=NOW - timedelta(days=1), progress=False)
    assert p.features.get_online_features(["txn:count"], {"user_id": [1, 2]})["count"] == [10, None]


def test_push_to_offline_appends_a_file_training_sees(p, tmp_path):
    write(tmp_path / "src" / "a.parquet", [1], [10], [1])
    p.features.apply([USER, txn_view(tmp_path / "src")])
    row = {"user_id": [1], "event_timestamp": [NOW - timedelta(hours=1)], "count": [42], "amount": [0.5],
           "note": ["fresh"]}
    assert p.features.push("txn", row, to_offline=True) == 1
    pushed = list((tmp_path / "src" / "pushed").glob("*.parquet"))
    assert len(pushed) == 1 and not list((tmp_path / "src" / "pushed").glob(".*"))
    assert offline_now(p, [1])["count"] == [42]
    assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [42]


def test_a_pushed_row_wins_a_tie_offline_as_online(p, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    at = NOW - timedelta(hours=1)
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()), "event_timestamp": pa.array([at], TS),
                             "count": pa.array([1], pa.int64())}), src / "txn.parquet")  # sorts after "pushed/"
    view = mp.FeatureView("ties", entities=[USER], ttl=None, schema=[mp.Field("count", mp.Int64)],
                          source=mp.ParquetSource(src))  # no created time: ties go to the row read last
    p.features.apply([USER, view])
    p.features.materialize(end_date=NOW, progress=False)
    assert p.features.push("ties", {"user_id": [1], "event_timestamp": [at], "count": [2]}, to_offline=True) == 1
    assert p.features.get_online_features(["ties:count"], {"user_id": [1]})["count"] == [2]
    assert offline_now(p, [1], ["ties:count"]) == {"count": [2]}


def test_the_later_of_two_quick_pushes_wins_a_tie_offline_as_online(p, tmp_path):
    """Pushed files were named by their second and a random uuid: two pushes of one second were read offline
    in random order, and offline kept the earlier row of a tie where online kept the later (about half the keys)."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([0], pa.int64()), "event_timestamp": pa.array([NOW], TS),
                             "count": pa.array([0], pa.int64())}), src / "a.parquet")
    view = mp.FeatureView("quick", entities=[USER], ttl=None, schema=[mp.Field("count", mp.Int64)],
                          source=mp.ParquetSource(src))  # no created time: the later push wins a tie
    p.features.apply([USER, view])
    users = list(range(1, 21))
    for user in users:  # a value, then its correction at once, for the same event time
        at = NOW - timedelta(minutes=user)
        for count in (100, 200):
            p.features.push("quick", {"user_id": [user], "event_timestamp": [at], "count": [count]}, to_offline=True)
    assert p.features.get_online_features(["quick:count"], {"user_id": users})["count"] == [200] * 20
    assert offline_now(p, users, ["quick:count"]) == {"count": [200] * 20}
    names = sorted(f.name for f in (src / "pushed").iterdir())
    assert len(names) == 40 and all(re.fullmatch(r"\d{8}T\d{6}\.\d{9}-[0-9a-f]{32}\.parquet", n) for n in names)


def test_a_push_to_offline_fills_its_created_time_in_the_unit_the_source_stores(p, tmp_path):
    """Rows pushed without a created time get now: stored in a source of millisecond created times, it was
    refused ("column 'created' cannot be written ... would lose data"), naming a column the user never gave."""
    src = tmp_path / "src"
    src.mkdir()
    at = NOW - timedelta(hours=1)
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()), "event_timestamp": pa.array([at], TS),
                             "created": pa.array([at], pa.timestamp("ms", "UTC")),
                             "count": pa.array([1], pa.int64())}), src / "a.parquet")
    view = mp.FeatureView("ms", entities=[USER], ttl=None, schema=[mp.Field("count", mp.Int64)],
                          source=mp.ParquetSource(src, created_timestamp_field="created"))
    p.features.apply([USER, view])
    p.features.materialize(end_date=NOW, progress=False)
    assert p.features.push("ms", {"user_id": [1], "event_timestamp": [at], "count": [2]}, to_offline=True) == 1
    (pushed,) = (src / "pushed").glob("*.parquet")
    created = pq.read_table(pushed).column("created")
    assert created.type == pa.timestamp("ms", "UTC") and created[0].as_py() > at
    assert p.features.get_online_features(["ms:count"], {"user_id": [1]})["count"] == [2]
    assert offline_now(p, [1], ["ms:count"]) == {"count": [2]}


def test_timestamp_features_keep_their_nanoseconds_online(p, tmp_path):
    """Online values are datetimes (microseconds); to_arrow() gave the column cut to microseconds while
    offline retrieval, and the store, hold nanoseconds."""
    src = tmp_path / "src"
    src.mkdir()
    stamps = [1_700_000_000_123_456_789, -1]
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()),
                             "event_timestamp": pa.array([NOW - timedelta(hours=1)] * 2, TS),
                             "seen": pa.array(stamps, pa.timestamp("ns", "UTC"))}), src / "a.parquet")
    view = mp.FeatureView("acct", entities=[USER], ttl=None, schema=[mp.Field("seen", mp.Timestamp)],
                          source=mp.ParquetSource(src))
    p.features.apply([USER, view])
    p.features.materialize(end_date=NOW, progress=False)
    online = p.features.get_online_features(["acct:seen"], {"user_id": [1, 2, 3]})
    assert online["seen"][:2] == [datetime(2023, 11, 14, 22, 13, 20, 123456, UTC),
                                  datetime(1969, 12, 31, 23, 59, 59, 999999, UTC)] and online["seen"][2] is None
    assert online.to_arrow().column("seen").cast(pa.int64()).to_pylist() == stamps + [None]
    assert offline_now(p, [1, 2], ["acct:seen"])["seen"] == pa.array(stamps, pa.timestamp("ns", "UTC")).to_pylist()
    online["seen"] = [None, None, None]  # a column the caller replaced is taken as it is now
    assert online.to_arrow().column("seen").to_pylist() == [None, None, None]


def test_a_failed_push_to_offline_leaves_the_source_as_it_was(p, tmp_path):
    src = tmp_path / "src"
    write(src / "a.parquet", [1], [10], [1])
    p.features.apply([USER, txn_view(src)])
    p.features.materialize(end_date=NOW, progress=False)
    row = {"user_id": [1], "event_timestamp": [NOW - timedelta(hours=1)], "count": [42], "amount": [0.5],
           "note": ["fresh"]}
    narrow = pq.read_table(src / "a.parquet")
    narrow = narrow.set_column(narrow.schema.get_field_index("count"), "count", narrow.column("count").cast(pa.int32()))
    pq.write_table(narrow, src / "a.parquet")  # the files fix the type pushed rows are written as
    with pytest.raises(mp.DataError, match="column 'count' cannot be written as the source's int32"):
        p.features.push("txn", dict(row, count=[2**40]), to_offline=True)
    required = pa.schema(list(narrow.schema) + [pa.field("region", pa.string(), nullable=False)])
    pq.write_table(narrow.append_column(required.field("region"), pa.array(["eu"])).cast(required), src / "a.parquet")
    with pytest.raises(mp.DataError, match="column 'region' that may not be null; include it"):
        p.features.push("txn", row, to_offline=True)
    assert sorted(f.name for f in src.rglob("*") if f.is_file()) == ["a.parquet"]  # no pushed file, no hidden leftover
    assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [1]
    assert p.features.push("txn", dict(row, region=["us"]), to_offline=True) == 1
    assert offline_now(p, [1])["count"] == [42]


def test_a_push_whose_online_write_fails_adds_nothing_offline(tmp_path):
    src = tmp_path / "src"
    write(src / "a.parquet", [1], [10], [1])
    row = {"user_id": [1], "event_timestamp": [NOW - timedelta(hours=1)], "count": [42], "amount": [0.5],
           "note": ["fresh"]}
    with mp.Platform(tmp_path / "home", online_store="redis://127.0.0.1:1/0?timeout=0.2&retries=0") as dead:
        dead.features.apply([USER, txn_view(src)])
        for _ in range(2):  # the retry does not add the rows twice either
            with pytest.raises(mp.OnlineStoreError, match="cannot connect"):
                dead.features.push("txn", row, to_offline=True)
        assert sorted(f.name for f in src.rglob("*") if f.is_file()) == ["a.parquet"]
        assert offline_now(dead, [1])["count"] == [1]


def test_files_that_differ_in_width_or_encoding_materialize_as_offline_reads_them(p, tmp_path):
    src = tmp_path / "src"
    write(src / "a.parquet", [1, 2], [5, 4], [10, 20])
    b = pq.read_table(src / "a.parquet").slice(0, 0)  # a second file: int32 keys, ms times, dictionary strings
    b = pa.table({"user_id": pa.array([2, 3], pa.int32()),
                  "event_timestamp": pa.array([NOW - timedelta(hours=1)] * 2, pa.timestamp("ms")),
                  "created": pa.array([NOW - timedelta(hours=1)] * 2, pa.timestamp("ms", "UTC")),
                  "count": pa.array([21, 30], pa.int64()), "amount": pa.array([1.0, 2.0], pa.float32()),
                  "note": pa.array(["later", "new"]).dictionary_encode()})
    pq.write_table(b, src / "b.parquet")
    p.features.apply([USER, txn_view(src)])
    p.features.materialize(end_date=NOW, progress=False)
    online = p.features.get_online_features(REFS, {"user_id": [1, 2, 3]})
    assert {k: online[k] for k in ("count", "note")} == {"count": [10, 21, 30], "note": ["n10", "later", "new"]}
    assert {k: v for k, v in offline_now(p, [1, 2, 3]).items() if k != "amount"} == \
        {"count": [10, 21, 30], "note": ["n10", "later", "new"]}


def test_a_time_feature_beyond_nanoseconds_is_refused_by_name_at_materialize(p, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    until = pa.array([datetime(9999, 12, 31, tzinfo=UTC), NOW], TS)  # a "no end" sentinel, and a time
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()),
                             "event_timestamp": pa.array([NOW - timedelta(hours=1)] * 2, TS),
                             "valid_until": until}), src / "a.parquet")
    view = mp.FeatureView("acct", entities=[USER], ttl=None, schema=[mp.Field("valid_until", mp.Timestamp)],
                          source=mp.ParquetSource(src))
    p.features.apply([USER, view])
    with pytest.raises(mp.StoreError, match="feature view 'acct': feature 'valid_until' holds a time outside 1677"):
        p.features.materialize(end_date=NOW, progress=False)
    assert p.features.get_online_features(["acct:valid_until"], {"user_id": [2]})["valid_until"] == [None]


# ----------------------------------------------------------- concurrency
def test_racing_materializations_and_pushes_end_with_the_newest_row(p, tmp_path, online_url):
    rng = np.random.default_rng(3)
    n = 4000
    users = rng.integers(0, 300, n)
    ages = rng.integers(2, 24 * 5, n)  # hours; created = event time
    write(tmp_path / "src" / "a.parquet", users, ages, np.arange(n))
    p.features.apply([USER, txn_view(tmp_path / "src")])
    # distinct (user, minute) pairs: a push's created time is when it ran, so two pushes of one user at
    # the same event time would race; a push beats a file row of the same event time (created later)
    combos = rng.choice(300 * 600, size=200, replace=False)
    pushes = [{"user_id": [int(c // 600)], "event_timestamp": [NOW - timedelta(minutes=int(c % 600))],
               "count": [10_000 + i], "amount": [1.0], "note": ["push"]} for i, c in enumerate(combos)]
    errors = []

    def run(fn) -> None:
        try:
            with mp.Platform(tmp_path / "home", online_store=online_url, threads=1) as other:
                fn(other)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def materializer(other) -> None:
        other.features.materialize(end_date=NOW, start_date=NOW - timedelta(days=6), progress=False)

    def pusher(part):
        def go(other) -> None:
            for row in part:
                other.features.push("txn", row)
        return go

    threads = [threading.Thread(target=run, args=(materializer,)) for _ in range(2)]
    threads += [threading.Thread(target=run, args=(pusher(pushes[i::2]),)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # the newest row per user by (event time, created time, read order)
    best: dict[int, tuple] = {}
    for pos, (u, a) in enumerate(zip(users.tolist(), ages.tolist())):
        rank = (NOW - timedelta(hours=a), 0, pos)
        if u not in best or rank > best[u][0]:
            best[u] = (rank, pos)
    for row in pushes:
        u, rank = row["user_id"][0], (row["event_timestamp"][0], 1, 0)
        if u not in best or rank > best[u][0]:
            best[u] = (rank, row["count"][0])
    got = p.features.get_online_features(["txn:count"], {"user_id": sorted(best)})
    assert got["count"] == [best[u][1] for u in sorted(best)]


@pytest.fixture
def private_redis(tmp_path) -> Iterator:
    """``start(*args, port=None, bus=False, env=None, password=None) -> (process, port)``: a redis-server of the
    test's own on 127.0.0.1 (no persistence; files under tmp_path/redis), answering, killed after the test. Without
    ``port`` it takes a free one (``bus``: a cluster node's too); a port taken between being found free and being
    bound (the server exits saying the address is in use) is tried again on another, up to five times."""
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("needs the redis-server binary")
    folder = tmp_path / "redis"
    folder.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(*args: str, port: int | None = None, bus: bool = False, env=None,
              password: str | None = None) -> tuple[subprocess.Popen, int]:
        for _ in range(5 if port is None else 1):
            at = free_port(bus) if port is None else port
            log = folder / f"{at}-{len(procs)}.log"
            proc = subprocess.Popen([server, "--port", str(at), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                     "no", "--dir", str(folder), "--logfile", str(log), *args],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            client = redis.Redis(port=at, password=password, socket_timeout=5)
            deadline = time.monotonic() + 20
            try:
                while proc.poll() is None:
                    try:
                        if client.info("server")["process_id"] == proc.pid:  # ours, not another on the port
                            return proc, at
                    except redis.RedisError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {at} did not answer within 20 s; see {log}")
                    time.sleep(0.02)
            finally:
                client.close()
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Address already in use" not in text:
                raise RuntimeError(f"redis-server on port {at} exited ({proc.returncode}): {text[-2000:]}")
        raise RuntimeError(f"redis-server found its port taken {'once' if port else 'five times'}; see {folder}")

    yield start
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


@pytest.fixture
def collating_redis(tmp_path, redis_server_url, private_redis) -> Iterator[redis.Redis]:
    """A redis-server of its own running under en_US.UTF-8, where Lua compares strings by that locale."""
    localedef = shutil.which("localedef")
    if not localedef:
        pytest.skip("needs the localedef binary")
    subprocess.run([localedef, "-i", "en_US", "-f", "UTF-8", str(tmp_path / "en_US.UTF-8")], check=True,
                   capture_output=True, timeout=120)
    _, port = private_redis(env=dict(os.environ, LOCPATH=str(tmp_path), LC_ALL="en_US.UTF-8"))
    client = redis.Redis(port=port, socket_timeout=5)
    assert client.eval("return tostring('a' < 'B')", 0) == b"true"  # collates by locale, not by bytes
    yield client
    client.close()


def test_newer_rows_win_on_a_redis_whose_locale_orders_strings_otherwise(tmp_path, collating_redis):
    def rank(t: datetime) -> bytes:  # a record's bytes 2..17: event and created ns, big-endian, sign bit flipped
        ns = (int(t.timestamp()) * 1_000_000 + t.microsecond) * 1000 + 2**63
        return ns.to_bytes(8, "big") * 2

    older = NOW - timedelta(hours=1)
    for step in range(1, 5000):  # a pair the server's locale orders backwards (about 4 in 10 here)
        newer = older + timedelta(microseconds=997 * step)
        if collating_redis.eval("return tostring(ARGV[2] < ARGV[1])", 0, rank(older), rank(newer)) == b"true":
            break
    else:
        pytest.fail("no pair of times the locale orders backwards: the test would not show anything")
    port = collating_redis.connection_pool.connection_kwargs["port"]
    write(tmp_path / "src" / "a.parquet", [1], [30], [1])
    with mp.Platform(tmp_path / "home", online_store=f"redis://127.0.0.1:{port}/0") as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        row = {"user_id": [1], "count": [1], "amount": [1.0], "note": ["x"]}
        assert p.features.push("txn", dict(row, event_timestamp=[older], created=[older], count=[1])) == 1
        assert p.features.push("txn", dict(row, event_timestamp=[newer], created=[newer], count=[2])) == 1
        assert p.features.push("txn", dict(row, event_timestamp=[older], created=[older], count=[1])) == 0
        assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [2]


# ---------------------------------------------------------------- errors
@pytest.mark.redis
def test_unreachable_redis_is_an_online_store_error(tmp_path, redis_url):
    url = "redis://:secret@127.0.0.1:1/0?timeout=0.2&retries=1"
    with mp.Platform(tmp_path / "h", online_store=url) as p:
        write(tmp_path / "src" / "a.parquet", [1], [1], [1])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        with pytest.raises(mp.OnlineStoreError, match=r"online store redis://:\*\*\*@127.0.0.1:1/0.*cannot connect"):
            p.features.get_online_features(["txn:count"], {"user_id": [1]})
        with pytest.raises(mp.OnlineStoreError, match="cannot connect"):
            p.features.materialize(end_date=NOW, progress=False)
        assert "secret" not in p.features.online_store.name


@pytest.mark.redis
@pytest.mark.parametrize("where", ["closed port", "node without cluster mode"])
def test_an_unusable_redis_cluster_is_an_online_store_error(tmp_path, redis_server_url, where):
    # redis-py's RedisClusterException is no RedisError: it came out as it was, not as an mlplat error
    port = 1 if where == "closed port" else redis.Redis.from_url(redis_server_url).connection_pool.connection_kwargs[
        "port"]
    url = f"redis+cluster://:secret@127.0.0.1:{port}?timeout=0.5"
    with mp.Platform(tmp_path / "h", online_store=url) as p:
        write(tmp_path / "src" / "a.parquet", [1], [1], [1])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        message = "Connection refused" if where == "closed port" else "Cluster mode is not enabled"
        with pytest.raises(mp.OnlineStoreError, match=rf"online store redis\+cluster://:\*\*\*@127.0.0.1:{port}.*"
                                                      rf"cannot use the cluster .*{message}"):
            p.features.get_online_features(["txn:count"], {"user_id": [1]})
        with pytest.raises(mp.OnlineStoreError, match="cannot use the cluster"):
            p.features.materialize(end_date=NOW, progress=False)


def _in_threads(calls: dict) -> dict:
    """Start each call in a thread of its own and return once every thread is about to make its call: a dict that
    gets each call's result (or exception) by name when it ends, and the threads as ``_threads``."""
    out: dict = {}
    ready = threading.Barrier(len(calls) + 1)
    threads = []

    def run(name, fn) -> None:
        ready.wait()
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001
            out[name] = exc

    for name, fn in calls.items():
        threads.append(threading.Thread(target=run, args=(name, fn), daemon=True))
        threads[-1].start()
    ready.wait()
    out["_threads"] = threads
    return out


@pytest.mark.redis
def test_reads_and_writes_wait_out_a_redis_restart_within_their_retries(tmp_path, private_redis):
    # the connection was taken from the pool outside the retry loop: a refused connection (a server restarting,
    # a failover under way) failed at once whatever retries= said; only a connection lost once made was retried
    args = ("--requirepass", "s3cret", "--dbfilename", "restart.rdb")
    proc, port = private_redis(*args, password="s3cret")
    base = f"redis://:s3cret@127.0.0.1:{port}/0?timeout=0.5"
    write(tmp_path / "src" / "a.parquet", [1, 2], [2, 2], [1, 2])
    row = {"user_id": [3], "event_timestamp": [NOW - timedelta(hours=1)], "count": [30], "amount": [1.0],
           "note": ["x"]}
    with mp.Platform(tmp_path / "home", online_store=base + "&retries=0") as impatient, \
            mp.Platform(tmp_path / "home", online_store=base + "&retries=30") as reader, \
            mp.Platform(tmp_path / "home", online_store=base + "&retries=30") as pusher:
        reader.features.apply([USER, txn_view(tmp_path / "src")])
        reader.features.materialize(end_date=NOW, progress=False)
        assert pusher.features.push("txn", dict(row, user_id=[2], count=[20])) == 1  # the write script is loaded
        assert reader.features.get_online_features(["txn:count"], {"user_id": [1, 2]})["count"] == [1, 20]
        redis.Redis(port=port, password="s3cret").shutdown(save=True)  # pooled connections go stale
        proc.wait(timeout=10)
        with pytest.raises(mp.OnlineStoreError, match=rf"^online store redis://:\*\*\*@127\.0\.0\.1:{port}/0"
                                                      r"\?timeout=0\.5&retries=0: reading: cannot connect \(.*refused"):
            impatient.features.get_online_features(["txn:count"], {"user_id": [1]})
        read = lambda: reader.features.get_online_features(["txn:count"], {"user_id": [1, 2]})
        out = _in_threads({"read": read, "push": lambda: pusher.features.push("txn", row)})
        time.sleep(0.3)
        assert all(t.is_alive() for t in out["_threads"]), out  # retrying: refused 30 times, 0.05 .. 0.5 s apart
        private_redis(*args, port=port, password="s3cret")  # the same port, the data saved at shutdown
        for t in out["_threads"]:
            t.join(timeout=30)
        assert out["read"] == {"user_id": [1, 2], "count": [1, 20]}
        assert out["push"] == 1  # the server lost the loaded script at restart: loaded again
        assert impatient.features.get_online_features(["txn:count"], {"user_id": [1, 2, 3]})["count"] == [1, 20, 30]


@pytest.mark.redis
@pytest.mark.parametrize("refused_info", [False, True], ids=["default user", "user refused INFO"])
def test_a_materialize_that_outlives_a_redis_restart_writes_everything_again(tmp_path, private_redis, monkeypatch,
                                                                           refused_info):
    """The batches a server without persistence acknowledged before it restarted were lost, yet materialize counted
    them written and recorded its progress: online served nothing for them, and later runs never wrote them again.
    Another writer reaches the new server first (its push loads the write script again, the pool replaces the
    materializing connection unseen): only the server's run_id tells, or for a user refused INFO (ACL -@dangerous),
    the key the write set with its first window."""
    from mlplat.features import materialize as materializing

    args = ("--user", "app", "on", ">pw", "+@all", "-@dangerous", "~*", "&*") if refused_info else ()
    proc, port = private_redis(*args)
    users = list(range(3000))
    write(tmp_path / "src" / "a.parquet", users, [1] * len(users), users)
    url = f"redis://{'app:pw@' if refused_info else ''}127.0.0.1:{port}/0?batch=50&retries=20"
    restarted = []

    class RestartAfterTheFirstWindow:  # the progress bar's callback, told once a window of batches is applied
        def __init__(self, *args) -> None:
            pass

        def __enter__(self):
            def advance(count: int) -> None:
                if not restarted:
                    proc.kill()
                    proc.wait()
                    restarted.append(private_redis(*args, port=port))
                    other.features.push("txn", {"user_id": [9999], "event_timestamp": [NOW], "created": [NOW],
                                                "count": [7], "amount": [1.0], "note": ["x"]})
                restarted.append(count)
            return advance

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(materializing, "_progress", RestartAfterTheFirstWindow)
    if refused_info:
        with pytest.raises(redis.ResponseError, match="no permissions to run the .info. command"):
            redis.Redis(port=port, username="app", password="pw").info("server")
    with mp.Platform(tmp_path / "h", online_store=url) as p, mp.Platform(tmp_path / "h", online_store=url) as other:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        assert p.features.materialize(end_date=NOW)[0].written == len(users)
        assert sum(restarted[1:]) == len(users)  # each record told once
        assert redis.Redis(port=port).dbsize() == len(users) + 1
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users


@pytest.mark.redis
def test_a_materialize_whose_batches_time_out_on_a_live_server_goes_on_without_info(tmp_path, private_redis,
                                                                                   monkeypatch):
    """A user refused INFO (ACL -@dangerous, a common setting), whose write cannot ask the server's run_id: a
    time-out retried on the same server must not count as a restart (each one started the write again, and the
    fourth failed it)."""
    from mlplat.features import materialize as materializing

    _, port = private_redis("--enable-debug-command", "yes")
    admin = redis.Redis(port=port)
    admin.acl_setuser("app", enabled=True, passwords=["+pw"], commands=["+@all", "-@dangerous"], keys=["*"],
                      channels=["*"])
    users = list(range(3000))
    write(tmp_path / "src" / "a.parquet", users, [1] * len(users), users)
    stalls: list[threading.Thread] = []

    class StallAfterEachOfTheFirstWindows:
        def __init__(self, *args) -> None:
            pass

        def __enter__(self):
            def advance(count: int) -> None:
                if len(stalls) < 5:  # the server busy for 0.6 s as the next window goes out (its time-out: 0.3 s)
                    stalls.append(threading.Thread(target=lambda: redis.Redis(port=port).execute_command(
                        "DEBUG", "SLEEP", "0.6")))
                    stalls[-1].start()
                    time.sleep(0.05)
            return advance

        def __exit__(self, *exc) -> None:
            pass

    monkeypatch.setattr(materializing, "_progress", StallAfterEachOfTheFirstWindows)
    url = f"redis://app:pw@127.0.0.1:{port}/0?batch=50&retries=20&timeout=0.3"
    with mp.Platform(tmp_path / "h", online_store=url) as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        with pytest.raises(redis.ResponseError, match="no permissions to run the .info. command"):
            redis.Redis(port=port, username="app", password="pw").info("server")
        assert p.features.materialize(end_date=NOW)[0].written == len(users)
        for t in stalls:
            t.join()
        assert len(stalls) == 5 and admin.dbsize() == len(users)
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users


@pytest.mark.redis
def test_a_cluster_store_follows_a_failover_it_learns_of_from_a_connection_error(tmp_path, private_redis):
    # the slot layout was read anew only after a MOVED reply; a node that died answers nothing, so once a replica
    # took its slots over every read and write of them failed (connection refused) until the process restarted
    from mlplat._native import _codec

    node_args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000", "--repl-diskless-sync-delay", "0")
    procs, ports, clients = {}, {}, {}
    for name in ("a", "b", "replica"):
        procs[name], ports[name] = private_redis(*node_args, "--cluster-config-file", f"nodes-{name}.conf",
                                                 "--dbfilename", f"{name}.rdb", bus=True)
        clients[name] = redis.Redis(port=ports[name], socket_timeout=5)
    a, b, replica = clients["a"], clients["b"], clients["replica"]
    for epoch, client in enumerate(clients.values(), 1):  # distinct epochs: the replica's take-over must outrank b's
        client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)  # (equal ones are only told apart between primaries)
    a.execute_command("CLUSTER ADDSLOTSRANGE", 0, 8191)
    b.execute_command("CLUSTER ADDSLOTSRANGE", 8192, 16383)
    for name in ("b", "replica"):
        a.execute_command("CLUSTER MEET", "127.0.0.1", ports[name])
    b_id = b.execute_command("CLUSTER MYID").decode()

    def until(what: str, ok, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not ok():
            assert time.monotonic() < deadline, f"the test cluster: {what} within {seconds} s"
            time.sleep(0.05)

    until("the replica knows b", lambda: b_id in str(replica.execute_command("CLUSTER NODES")))
    replica.execute_command("CLUSTER REPLICATE", b_id)
    until("cluster_state:ok and the replica in sync",
          lambda: all(c.cluster("info")["cluster_state"] == "ok" for c in clients.values())
          and replica.info("replication")["master_link_status"] == "up")

    def owner(user: int) -> int:
        [key] = _codec.redis_keys("mlplat:", "txn@1", _codec.entity_keys([[user]], [0]))
        return ports["a"] if a.cluster("keyslot", key) <= 8191 else ports["b"]

    users = list(range(40))
    on_b = [u for u in users if owner(u) == ports["b"]]
    assert 5 <= len(on_b) <= 35
    write(tmp_path / "src" / "a.parquet", users, [2] * 40, users)
    url = f"redis+cluster://127.0.0.1:{ports['a']}?timeout=0.5&retries=5"
    with mp.Platform(tmp_path / "home", online_store=url) as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW, progress=False)
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users  # layout read
        assert b.execute_command("WAIT", 1, 5000) == 1  # the replica holds b's records
        procs["b"].kill()
        procs["b"].wait(timeout=10)
        replica.execute_command("CLUSTER FAILOVER", "TAKEOVER")
        until("a sees the replica serve b's slots", lambda: any(
            int(node[1]) == ports["replica"] for lo, hi, node, *_ in a.cluster("slots") if lo <= 8192 <= hi))
        until("the replica is ok as a primary", lambda: replica.cluster("info")["cluster_state"] == "ok")
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users
        row = {"user_id": [on_b[0]], "event_timestamp": [NOW - timedelta(hours=1)], "count": [-1], "amount": [1.0],
               "note": ["x"]}
        assert p.features.push("txn", row) == 1
        assert replica.dbsize() == len(on_b)
        assert p.features.get_online_features(["txn:count"], {"user_id": on_b[:1]})["count"] == [-1]
        procs["replica"].kill()  # b's slots now have no node at all: still unusable after the retries
        procs["replica"].wait(timeout=10)
        with pytest.raises(mp.OnlineStoreError, match=rf"^online store redis\+cluster://127\.0\.0\.1:{ports['a']}"
                                                      r"\?timeout=0\.5&retries=5: reading: cannot connect \(.*"
                                                      r"refused.*; tried 6 times$"):
            p.features.get_online_features(["txn:count"], {"user_id": on_b})
        with pytest.raises(mp.OnlineStoreError, match="writing txn@1: cannot connect"):
            p.features.push("txn", row)


@pytest.mark.redis
def test_a_write_after_the_server_lost_its_scripts_loads_the_script_again(tmp_path, redis_url):
    # redis-py reads a NOSCRIPT reply as NoScriptError whose text lacks the word: the reload never happened, and
    # every write after a restart or SCRIPT FLUSH failed with "answered with an error: No matching script"
    with mp.Platform(tmp_path / "h", online_store=redis_url) as p:
        write(tmp_path / "src" / "a.parquet", [1], [2], [1])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        assert p.features.materialize(end_date=NOW, progress=False)[0].written == 1
        redis.Redis.from_url(redis_url).script_flush()
        row = {"user_id": [1], "event_timestamp": [NOW - timedelta(hours=1)], "count": [5], "amount": [1.0],
               "note": ["x"]}
        assert p.features.push("txn", row) == 1
        assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [5]


@pytest.mark.redis
def test_a_server_that_stops_answering_times_out(tmp_path, redis_url):
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/0?timeout=0.2&retries=0"
        with mp.Platform(tmp_path / "h", online_store=url) as p:
            write(tmp_path / "src" / "a.parquet", [1], [1], [1])
            p.features.apply([USER, txn_view(tmp_path / "src")])
            with pytest.raises(mp.OnlineStoreError, match="timed out after 0.2 s"):
                p.features.get_online_features(["txn:count"], {"user_id": [1]})


@pytest.mark.redis
def test_garbage_in_the_store_is_reported_not_served(tmp_path, redis_url):
    with mp.Platform(tmp_path / "h", online_store=redis_url) as p:
        write(tmp_path / "src" / "a.parquet", [1], [1], [1])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW, progress=False)
        client = redis.Redis.from_url(redis_url)
        [key] = client.keys("mlplat:*")
        client.set(key, b"not a record")
        with pytest.raises(mp.OnlineStoreError, match="txn@1 holds a record mlplat cannot read"):
            p.features.get_online_features(["txn:count"], {"user_id": [1]})


@pytest.mark.redis
def test_a_failed_write_batch_leaves_each_key_old_or_new(tmp_path, redis_url):
    with mp.Platform(tmp_path / "h", online_store=redis_url + "?batch=50") as p:
        users = list(range(200))
        write(tmp_path / "src" / "a.parquet", users, [30] * 200, users)
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW - timedelta(hours=20), progress=False)  # "old" values: count = user
        write(tmp_path / "src" / "a.parquet", users, [10] * 200, [1000 + u for u in users])
        client = redis.Redis.from_url(redis_url)
        from mlplat._native import _codec

        [blocker] = _codec.redis_keys("mlplat:", "txn@1", _codec.entity_keys([[120]], [0]))
        client.delete(blocker)
        client.hset(blocker, "x", "1")  # a hash where a record should be: the script fails on it
        with pytest.raises(mp.OnlineStoreError, match="writing txn@1: answered with an error: .*WRONGTYPE"):
            p.features.materialize(end_date=NOW, progress=False)
        client.delete(blocker)
        got = p.features.get_online_features(["txn:count"], {"user_id": users})["count"]
        assert all(c in (u, 1000 + u) for u, c in zip(users, got) if u != 120)
        assert {c >= 1000 for c in got if c is not None} == {True, False}  # the failure was mid-way


def _count_roundtrips(monkeypatch) -> list[int]:
    """From now on, the number of commands in each Redis round trip, appended to the list returned."""
    calls: list[int] = []
    original = redis_store._roundtrip
    monkeypatch.setattr(redis_store, "_roundtrip", lambda pool, cmds, retries: calls.append(len(cmds))
                        or original(pool, cmds, retries))
    return calls


def test_cluster_reads_take_one_round_trip_per_node(tmp_path, redis_cluster_url, monkeypatch):
    with mp.Platform(tmp_path / "h", online_store=redis_cluster_url) as p:
        users = list(range(300))
        write(tmp_path / "src" / "a.parquet", users, [1] * 300, users)
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW, progress=False)
        calls = _count_roundtrips(monkeypatch)
        got = p.features.get_online_features(REFS, {"user_id": users})
        assert got["count"] == users
        assert len(calls) == 3 and sum(calls) > 3  # three nodes, several slots pipelined on each


def test_a_cluster_slot_moved_to_another_node_is_followed_and_one_being_moved_is_served(
        tmp_path, redis_cluster_url, redis_cluster_session):
    # redis-py reads a MOVED/ASK reply as MovedError/AskError whose text lacks the word, so the check of the text
    # never matched: after a reshard every read and write failed with "answered with an error: 9189 127.0.0.1:...";
    # then a slot half-way through a move (ASK) was an error until the move ended
    from mlplat._native import _codec

    with mp.Platform(tmp_path / "h", online_store=redis_cluster_url) as p:
        write(tmp_path / "src" / "a.parquet", [1], [1], [1])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [None]  # layout read
        [key] = _codec.redis_keys("mlplat:", "txn@1", _codec.entity_keys([[1]], [0]))
        nodes = {port: redis.Redis(port=port) for port in redis_cluster_session}
        slot = nodes[redis_cluster_session[0]].cluster("keyslot", key)
        owner = next(int(node[1]) for lo, hi, node, *_ in nodes[redis_cluster_session[0]].cluster("slots")
                     if lo <= slot <= hi)
        target = next(port for port in nodes if port != owner)
        ids = {port: c.cluster("myid") for port, c in nodes.items()}

        def give_slot_to(port: int) -> None:
            for c in [nodes[port]] + [c for q, c in nodes.items() if q != port]:
                c.cluster("setslot", slot, "node", ids[port])
            deadline = time.monotonic() + 10
            while any(int(n[1]) != port for c in nodes.values() for lo, hi, n, *_ in c.cluster("slots")
                      if lo <= slot <= hi):
                assert time.monotonic() < deadline, "the nodes did not agree on the slot's owner"
                time.sleep(0.05)

        try:
            give_slot_to(target)  # a finished reshard: the old owner answers MOVED
            p.features.materialize(end_date=NOW, progress=False)
            assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [1]
            assert nodes[target].get(key) is not None
            nodes[target].delete(key)
            nodes[owner].cluster("setslot", slot, "importing", ids[target])  # half-way back: the key on neither
            nodes[target].cluster("setslot", slot, "migrating", ids[owner])
            assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [None]  # ASK
            assert p.features.materialize(end_date=NOW, start_date=NOW - timedelta(days=1),
                                          progress=False)[0].written == 1
            assert nodes[owner].keys("*") == [key] and nodes[target].dbsize() == 0  # a new key: where ASK says
            assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [1]
            give_slot_to(owner)  # the move back ends: MOVED again
            assert p.features.get_online_features(["txn:count"], {"user_id": [1]})["count"] == [1]
        finally:
            for c in nodes.values():
                c.cluster("setslot", slot, "stable")
            give_slot_to(owner)


PW = "s3cret"


@pytest.fixture
def growing_cluster(private_redis):
    """A private two-node cluster behind a password, as one is grown: ``a`` serves every slot, ``b`` none (yet), so
    a store's cluster client has no connection pool for ``b`` until a slot's move sends it there. Gives ``a``, ``b``
    (clients), ``ports``, ``ids`` and ``url``."""
    args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000", "--requirepass", PW, "--masterauth", PW)
    ports, clients = {}, {}
    for name in ("a", "b"):
        _, ports[name] = private_redis(*args, "--cluster-config-file", f"nodes-{name}.conf", bus=True, password=PW)
        clients[name] = redis.Redis(port=ports[name], password=PW, socket_timeout=5)
    a, b = clients["a"], clients["b"]
    a.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
    a.execute_command("CLUSTER MEET", "127.0.0.1", ports["b"])
    ids = {name: c.cluster("myid").decode() for name, c in clients.items()}
    deadline = time.monotonic() + 20
    while not (all(c.cluster("info")["cluster_state"] == "ok" for c in clients.values())
               and ids["b"] in str(a.execute_command("CLUSTER NODES"))
               and ids["a"] in str(b.execute_command("CLUSTER NODES"))):
        assert time.monotonic() < deadline, "the test cluster: both nodes ok and met within 20 s"
        time.sleep(0.05)
    yield SimpleNamespace(a=a, b=b, ports=ports, ids=ids, url=f"redis+cluster://:{PW}@127.0.0.1:{ports['a']}?timeout=2")
    for c in clients.values():
        c.close()


def _key(user: int) -> bytes:
    from mlplat._native import _codec

    [key] = _codec.redis_keys("mlplat:", "txn@1", _codec.entity_keys([[user]], [0]))
    return key


def _users_of_one_slot(n: int) -> tuple[int, list[int], list[int]]:
    """A slot, ``n`` users whose keys hash to it, and 30 users whose keys hash elsewhere."""
    from mlplat._native import _codec

    users = np.arange(100_000)
    slots = redis_store._slot_of_bucket()[[_codec.bucket_of(k) for k in _codec.entity_keys([users.tolist()], [0])]]
    slot = int(np.flatnonzero(np.bincount(slots) >= n)[0])
    return slot, users[slots == slot][:n].tolist(), users[slots != slot][:30].tolist()


def _migrate(cluster, keys) -> None:
    cluster.a.execute_command("MIGRATE", "127.0.0.1", cluster.ports["b"], "", 0, 5000, "AUTH", PW, "KEYS", *keys)


def _start_moving(cluster, slot: int) -> None:
    cluster.b.cluster("setslot", slot, "importing", cluster.ids["a"])
    cluster.a.cluster("setslot", slot, "migrating", cluster.ids["b"])


def _finish_moving(cluster, slot: int) -> None:
    """The rest of a reshard of ``slot`` from a to b: its remaining keys migrated, then b made its owner."""
    while keys := cluster.a.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):  # (cluster() decodes them)
        _migrate(cluster, keys)
    for c in (cluster.b, cluster.a):
        c.cluster("setslot", slot, "node", cluster.ids["b"])


def test_reads_and_writes_of_a_slot_half_way_through_a_move_go_where_redis_says(tmp_path, growing_cluster):
    # an ASK reply (or TRYAGAIN) made the store read the slot layout anew and try once more, which got ASK again:
    # every read and write of a slot being moved (an online reshard takes minutes) failed until the move ended
    c = growing_cluster
    slot, mine, others = _users_of_one_slot(8)
    moved, stay, absent, new = mine[:3], mine[3:6], mine[6], mine[7]
    users = moved + stay + others
    write(tmp_path / "src" / "a.parquet", users, [2] * len(users), users)
    with mp.Platform(tmp_path / "h", online_store=c.url + "&retries=0&batch=2") as p:  # no waiting needed
        p.features.apply([USER, txn_view(tmp_path / "src")])
        assert p.features.materialize(end_date=NOW, progress=False)[0].written == len(users)
        primaries = p.features.online_store._cluster.get_primaries()
        assert [n.name for n in primaries] == [f"127.0.0.1:{c.ports['a']}"]  # no pool for b
        _start_moving(c, slot)
        _migrate(c, [_key(u) for u in moved])  # half-way: some of the slot's keys on b, some still on a
        assert set(c.b.keys("*")) == {_key(u) for u in moved}
        online = lambda who: p.features.get_online_features(["txn:count", "txn:note"], {"user_id": who})
        # MGET of keys on both nodes: a answers TRYAGAIN, then key by key: a serves its own, ASK sends the rest to b
        everyone = [others[0], *moved, absent, *stay, *others[1:]]
        got = online(everyone)
        assert got["count"] == [others[0], *moved, None, *stay, *others[1:]]
        assert got["note"] == [f"n{u}" for u in [others[0], *moved]] + [None] + [f"n{u}" for u in stay + others[1:]]
        assert online(moved)["count"] == moved  # none on a: ASK, and b has every key
        assert online([absent])["count"] == [None]  # on neither: ASK, b has none
        assert online([absent, moved[0]])["count"] == [None, moved[0]]  # ASK, then b: TRYAGAIN (one missing)
        assert c.b.cluster("countkeysinslot", slot) == 3 and c.a.cluster("countkeysinslot", slot) == 3
        # a write of the slot's keys: a key still on a is set there, a moved or new one on b (ASK), counted once
        row = lambda u, count: {"user_id": u, "event_timestamp": NOW - timedelta(hours=1), "count": count,
                                "amount": 1.0, "note": "pushed"}
        pushed = [row(moved[0], -1), row(stay[0], -2), row(new, -3), row(others[0], -4), row(stay[1], -5),
                  row(stay[2], -6), row(moved[1], -7), row(stay[2], -8)]  # stay[2] twice, equal times: the later wins
        assert p.features.push("txn", pushed) == len(pushed)
        assert set(c.b.keys("*")) == {_key(u) for u in moved + [new]}
        assert set(c.a.keys("*")) == {_key(u) for u in stay + others}
        expected = {u: u for u in users} | {r["user_id"]: r["count"] for r in pushed}
        assert online(users + [new, absent])["count"] == [expected[u] for u in users] + [-3, None]
        assert p.features.push("txn", pushed[:3]) == 3  # equal times: applied again, where they are
        _finish_moving(c, slot)  # MOVED for the slot now: the layout is read anew
        assert online(users + [new, absent])["count"] == [expected[u] for u in users] + [-3, None]
        assert c.b.cluster("countkeysinslot", slot) == 7 and c.a.cluster("countkeysinslot", slot) == 0
        assert p.features.push("txn", [row(stay[0], -20)]) == 1
        assert online([stay[0]])["count"] == [-20]


def test_a_tryagain_that_per_key_commands_do_not_settle_is_waited_out_within_the_retries(
        tmp_path, growing_cluster, monkeypatch):
    # Redis answers no one-key command TRYAGAIN; were it to (a command the store cannot split), the store waits
    # retries= times for the move to go on, then says the slot is being moved
    from mlplat._native import _codec

    c = growing_cluster
    slot, (moved, stay), others = _users_of_one_slot(2)
    write(tmp_path / "src" / "a.parquet", [moved, stay, others[0]], [2, 2, 2], [moved, stay, others[0]])
    whole = lambda unit: [(_codec.pack_command(unit[0]), unit)]  # a command over both keys, as it came
    monkeypatch.setattr(redis_store, "_mget_per_key", whole, raising=False)  # (raising: it is new)
    with mp.Platform(tmp_path / "h", online_store=c.url + "&retries=0") as impatient, \
            mp.Platform(tmp_path / "h", online_store=c.url + "&retries=10") as patient:
        patient.features.apply([USER, txn_view(tmp_path / "src")])
        patient.features.materialize(end_date=NOW, progress=False)
        _start_moving(c, slot)
        _migrate(c, [_key(moved)])
        read = lambda p: p.features.get_online_features(["txn:count"], {"user_id": [others[0], stay, moved]})
        with pytest.raises(mp.OnlineStoreError, match=rf"^online store redis\+cluster://:\*\*\*@127\.0\.0\.1:"
                                                      rf"{c.ports['a']}\?timeout=2&retries=0: reading: a slot is being"
                                                      rf" moved between nodes \(resharding\) .*: 127\.0\.0\.1:"
                                                      rf"{c.ports['a']} answered TRYAGAIN .* 1 time in a row; try "
                                                      r"again once the move is done"):
            read(impatient)
        mover = threading.Timer(0.3, lambda: _migrate(c, [_key(stay)]))  # the reshard goes on: all of them on b
        mover.start()
        try:
            t0 = time.monotonic()
            assert read(patient)["count"] == [others[0], stay, moved]  # a answers ASK now, and b has both
            assert time.monotonic() - t0 >= 0.25
        finally:
            mover.join()
        assert read(impatient)["count"] == [others[0], stay, moved]


def test_a_cluster_down_for_a_moment_is_waited_out_within_the_retries(tmp_path, growing_cluster):
    # while a primary is lost and no replica promoted yet, every node answers CLUSTERDOWN (for up to the node
    # timeout): that reply was raised at once, whatever retries= said, so a failover failed every read and write
    c = growing_cluster
    slot, mine, others = _users_of_one_slot(2)
    users = mine + others[:3]
    write(tmp_path / "src" / "a.parquet", users, [2] * len(users), users)
    row = {"user_id": [mine[0]], "event_timestamp": [NOW - timedelta(hours=1)], "count": [-1], "amount": [1.0],
           "note": ["x"]}

    def down_for_a_moment(then: float) -> threading.Timer:
        c.a.execute_command("CLUSTER", "DELSLOTS", slot)  # a slot without a node: the cluster is down
        deadline = time.monotonic() + 10
        while c.a.cluster("info")["cluster_state"] != "fail":
            assert time.monotonic() < deadline, "the test cluster: state fail within 10 s"
            time.sleep(0.02)
        timer = threading.Timer(then, c.a.execute_command, ("CLUSTER", "ADDSLOTS", slot))
        timer.start()
        return timer

    with mp.Platform(tmp_path / "h", online_store=c.url + "&retries=10") as patient, \
            mp.Platform(tmp_path / "h", online_store=c.url + "&retries=0") as impatient:
        patient.features.apply([USER, txn_view(tmp_path / "src")])
        patient.features.materialize(end_date=NOW, progress=False)
        assert impatient.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users
        down_for_a_moment(30).cancel()  # down until the slot is given back below
        with pytest.raises(mp.OnlineStoreError, match=r"reading: answered with an error: CLUSTERDOWN .*failover under "
                                                      r"way\? give retries= room"):
            impatient.features.get_online_features(["txn:count"], {"user_id": others[:1]})
        c.a.execute_command("CLUSTER", "ADDSLOTS", slot)
        timer = down_for_a_moment(0.3)
        assert patient.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users
        timer.join()
        timer = down_for_a_moment(0.3)
        assert patient.features.push("txn", row) == 1
        timer.join()
        assert impatient.features.get_online_features(["txn:count"], {"user_id": mine})["count"] == [-1, mine[1]]


def test_reads_and_writes_keep_working_through_an_online_reshard(tmp_path, growing_cluster):
    # what an operator runs to move slots onto a new node: a read or write that met ASK or TRYAGAIN (a slot being
    # moved), or MOVED again after the layout was read anew (another slot's move ended meanwhile), failed
    from mlplat._native import _codec

    c = growing_cluster
    cli = shutil.which("redis-cli")
    if not cli:
        pytest.skip("needs the redis-cli binary")
    every = np.arange(50_000)
    slots = redis_store._slot_of_bucket()[[_codec.bucket_of(k) for k in _codec.entity_keys([every.tolist()], [0])]]
    users = every[slots < 1500][:1200].tolist() + every[slots >= 1500][:300].tolist()  # it moves a's first slots
    write(tmp_path / "src" / "a.parquet", users, [2] * len(users), users)
    with mp.Platform(tmp_path / "h", online_store=c.url + "&batch=20") as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW, progress=False)
        expected = {u: u for u in users}
        reshard = subprocess.Popen(
            [cli, "-a", PW, "--no-auth-warning", "--cluster", "reshard", f"127.0.0.1:{c.ports['a']}", "--cluster-from",
             c.ids["a"], "--cluster-to", c.ids["b"], "--cluster-slots", "1500", "--cluster-yes", "--cluster-pipeline",
             "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rounds = 0
        try:
            while reshard.poll() is None or rounds < 2:
                rounds += 1
                created = NOW - timedelta(hours=1) + timedelta(seconds=rounds)
                count = [-(rounds * 100_000 + u) for u in users]
                assert p.features.push("txn", {"user_id": users, "event_timestamp": [NOW - timedelta(hours=1)] *
                                               len(users), "created": [created] * len(users), "count": count,
                                               "amount": [1.0] * len(users), "note": ["x"] * len(users)}) == len(users)
                expected = dict(zip(users, count))
                assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == count
        finally:
            _, err = reshard.communicate(timeout=120)
        assert reshard.returncode == 0, err
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == [
            expected[u] for u in users]
        assert c.b.dbsize() == 1200 and c.a.dbsize() == 300


def test_a_new_key_written_twice_while_its_slot_is_half_way_through_a_move_keeps_the_later_record(
        tmp_path, growing_cluster):
    # of a push's two records of a new key with equal times in batches of one slot being moved, the later one was
    # set first (a one-key batch: ASK, then b sets it) and the earlier one after it (a batch with a moved key too: ASK,
    # TRYAGAIN on b, key by key: ASK again, b sets it): the earlier record won
    c = growing_cluster
    slot, (moved, stay, new, newer), others = _users_of_one_slot(4)
    users = [moved, stay, others[0]]
    write(tmp_path / "src" / "a.parquet", users, [2] * len(users), users)
    with mp.Platform(tmp_path / "h", online_store=c.url + "&retries=0&batch=2") as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW, progress=False)
        _start_moving(c, slot)
        _migrate(c, [_key(moved)])
        at = NOW - timedelta(hours=1)
        rows = [{"user_id": u, "event_timestamp": at, "created": at, "count": n, "amount": 1.0, "note": "x"}
                for u, n in [(moved, -1), (new, -2), (new, -3)]]  # batches: [moved, new -2], [new -3]
        assert p.features.push("txn", rows) == 3
        assert p.features.get_online_features(["txn:count"], {"user_id": [moved, new]})["count"] == [-1, -3]
        # the later record older: not applied, nor counted (it was counted, set first and then overwritten)
        rows = [{"user_id": u, "event_timestamp": t, "created": t, "count": n, "amount": 1.0, "note": "x"}
                for u, n, t in [(moved, -4, NOW), (newer, -5, at), (newer, -6, at - timedelta(hours=1))]]
        assert p.features.push("txn", rows) == 2
        assert p.features.get_online_features(["txn:count"], {"user_id": [moved, newer]})["count"] == [-4, -5]


def test_a_node_left_without_slots_by_another_threads_layout_read_is_still_sent_to(tmp_path, growing_cluster):
    # a read or write planned on the layout it had, whose pools were then taken from the layout another thread had
    # read anew meanwhile (a MOVED reply), met a node that serves no slot now: KeyError, not an OnlineStoreError
    c = growing_cluster
    slot, (user,), others = _users_of_one_slot(1)
    users = [user, others[0]]
    write(tmp_path / "src" / "a.parquet", users, [2, 2], users)

    def give_slot_to(name: str) -> None:  # (a master left without slots becomes a replica: setslot there first)
        for n in (name, "a" if name == "b" else "b"):
            getattr(c, n).cluster("setslot", slot, "node", c.ids[name])
        deadline = time.monotonic() + 10
        while any(int(n[1]) != c.ports[name] for lo, hi, n, *_ in c.a.cluster("slots") if lo <= slot <= hi):
            assert time.monotonic() < deadline, "the nodes did not agree on the slot's owner"
            time.sleep(0.05)

    with mp.Platform(tmp_path / "h", online_store=c.url + "&retries=0") as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        store = p.features.online_store
        give_slot_to("b")
        store._cluster.nodes_manager.initialize()
        assert f"127.0.0.1:{c.ports['b']}" in [n.name for n in store._cluster.get_primaries()]  # b serves the slot
        plan = store._node_of_slots

        def meanwhile(*args):  # the plan on the layout as it was; then another thread reads it anew
            nodes = plan(*args)
            store._cluster.nodes_manager.initialize()
            return nodes

        give_slot_to("a")  # the slot goes back: b serves none
        store._node_of_slots = meanwhile
        p.features.materialize(end_date=NOW, progress=False)  # b answers MOVED
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users
        assert c.a.dbsize() == 2

@pytest.mark.redis
def test_single_node_reads_are_one_command(tmp_path, redis_url, monkeypatch):
    with mp.Platform(tmp_path / "h", online_store=redis_url) as p:
        write(tmp_path / "src" / "a.parquet", [1, 2], [1, 1], [1, 2])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        p.features.materialize(end_date=NOW, progress=False)
        calls = _count_roundtrips(monkeypatch)
        p.features.get_online_features(REFS, {"user_id": [1, 2, 1, 3] * 50})
        assert calls == [1]


@pytest.mark.parametrize(
    "url, message",
    [("redis://h:1/0?timeout=-1", "timeout must be a finite number > 0"), ("redis://h:1/0?retries=x", "bad parameter"),
     ("memcached://h", "use sqlite:///path"), ("sqlite://", "give a file"),
     # "unexpected ValueError / OverflowError / TypeError ... a bug in mlplat" before
     ("redis://h:1/0?timeout=nan", "timeout must be a finite number > 0"),
     ("redis://h:1/0?timeout=inf", "timeout must be a finite number > 0"),
     ("redis://h:1/0?tiemout=0.5", "a query parameter is wrong .*'tiemout'.* mlplat's are prefix, timeout"),
     # a Redis Cluster hashes a key by its first {...}: the prefix's braces took over from the bucket's tag
     ("redis+cluster://h:1/0?prefix=a{b}:", "prefix 'a{b}:' holds a brace"),
     ("rediss+cluster://h:1/0?prefix=x{", "brace"),
     ("redis://h:1/0?db=x", "db='x' is not a database number"),
     ("redis://:secret@h:1/0?socket_timeout=abc", r"online store redis://:\*\*\*@h:1/0\?socket_timeout=abc: a query "
                                                  "parameter is wrong .*socket_timeout"),
     # redis-py's cluster client dropped what it does not take, unseen: the time-out meant never applied
     ("redis+cluster://h:1?tiemout=0.5", "a query parameter is wrong .*cluster client ignores tiemout.* mlplat's are"),
     ("redis+cluster://h:1?socket_timeout=0.5&host=x&sockettimeout=1", "cluster client ignores host, sockettimeout"),
     # binary records decoded as text: every write worked and every read was a raw UnicodeDecodeError
     ("redis://h:1/0?decode_responses=true", "decode_responses=true would make redis-py decode the binary"),
     ("redis+cluster://h:1?decode_responses=Yes", "decode_responses=Yes would make"),
     ("redis://h:1/0?password=s3cret&decode_responses=1", r"redis://h:1/0\?password=\*\*\*&decode_responses=1")],
)
def test_bad_online_store_urls(url, message):
    from mlplat.features.online import open_online_store

    with pytest.raises(mp.ConfigError, match=message):
        open_online_store(url)


@pytest.mark.parametrize("decode", ["false", "0", "no"])
def test_online_store_urls_that_read(tmp_path, redis_url, redis_cluster_url, decode):
    """redis-py takes decode_responses's text as is ("false" is true): it is left out, and reads work."""
    cluster = f"{redis_cluster_url}?client_name=mlplat&socket_keepalive=true"  # redis-py's connection parameters
    for i, url in enumerate((redis_url, cluster)):  # still go through on a cluster
        url += f"{'&' if '?' in url else '?'}decode_responses={decode}"
        with mp.Platform(tmp_path / f"h{i}", online_store=url) as p:
            write(tmp_path / "src" / "a.parquet", [1], [1], [4])
            p.features.apply([USER, txn_view(tmp_path / "src")])
            p.features.materialize(end_date=NOW, progress=False)
            assert p.features.get_online_features(REFS, {"user_id": [1]})["count"] == [4]


def test_a_password_in_the_query_is_hidden(tmp_path):
    """redis-py logs in with ?password=; it was printed in every error and in the store's repr."""
    url = "redis://127.0.0.1:1/0?password=s3cret&timeout=0.2&retries=0"
    with mp.Platform(tmp_path / "h", online_store=url) as p:
        write(tmp_path / "src" / "a.parquet", [1], [1], [1])
        p.features.apply([USER, txn_view(tmp_path / "src")])
        with pytest.raises(mp.OnlineStoreError, match=r"\?password=\*\*\*&timeout=0.2&retries=0: reading: cannot "
                                                      "connect") as raised:
            p.features.get_online_features(REFS, {"user_id": [1]})
        assert "s3cret" not in str(raised.value)
    from mlplat.features.online import open_online_store
    from mlplat.settings import hide_password

    assert "s3cret" not in repr(open_online_store(url))
    assert hide_password("postgresql://h/db?sslmode=require&PassWord=x&y=1&sslpassword=z") == \
        "postgresql://h/db?sslmode=require&PassWord=***&y=1&sslpassword=***"
    with pytest.raises(mp.ConfigError) as raised:  # redis-py's TLS key password, and a "#" in a password
        open_online_store("rediss://h:1/0?tiemout=1&ssl_password=pa55#w0rd")
    assert "pa55" not in str(raised.value) and "w0rd" not in str(raised.value)


def test_an_sqlite_store_under_a_file_is_an_online_store_error(tmp_path):
    from mlplat.features.online import open_online_store

    (tmp_path / "afile").write_text("x")
    for path in ("afile/online.db", "afile/sub/online.db"):  # FileExistsError, NotADirectoryError: raw before
        with pytest.raises(mp.OnlineStoreError,
                           match=r"cannot make its folder .*afile(/sub)? \(a file is in the way\)"):
            open_online_store(f"sqlite:///{tmp_path / path}")


def test_a_full_sqlite_store_says_so_and_records_no_progress(tmp_path):
    """SQLite rolls a transaction back itself on a full disk; the ROLLBACK after it failed ("cannot rollback - no
    transaction is active") and its error replaced the one that said what was wrong."""
    users = list(range(5000))
    write(tmp_path / "src" / "a.parquet", users, [1] * len(users), users, notes=["x" * 200] * len(users))
    with mp.Platform(tmp_path / "h") as p:
        p.features.apply([USER, txn_view(tmp_path / "src")])
        conn = p.features._online_store()._conn()  # this thread's connection: a database of at most 50 pages
        conn.execute("PRAGMA max_page_count=50")
        with pytest.raises(mp.OnlineStoreError, match=r"online.db: writing txn@1: database or disk is full$"):
            p.features.materialize(end_date=NOW, progress=False)
        assert p.features.last_materialized("txn") is None
        conn.execute("PRAGMA max_page_count=1000000")
        p.features.materialize(end_date=NOW, progress=False)
        assert p.features.get_online_features(["txn:count"], {"user_id": users})["count"] == users


def test_a_string_key_with_a_lone_surrogate_names_the_key_and_row(tmp_path):
    view = mp.FeatureView("names", entities=[mp.Entity("person", join_keys=["name"])],
                          schema=[mp.Field("count", mp.Int64)], source=mp.ParquetSource(tmp_path / "n"))
    (tmp_path / "n").mkdir()
    pq.write_table(pa.table({"name": ["a"], "event_timestamp": pa.array([NOW], pa.timestamp("us", "UTC")),
                             "count": [1]}), tmp_path / "n" / "a.parquet")
    with mp.Platform(tmp_path / "h") as p:
        p.features.apply([view.entities[0], view])
        with pytest.raises(mp.DataError, match=r"entity row 1: join key 'name' must be string: got text that is "
                                               r"not valid UTF-8 \(it holds a lone surrogate\)"):
            p.features.get_online_features(["names:count"], {"name": ["a", "\udcff"]})


def test_sqlite_reads_search_the_whole_primary_key(tmp_path):
    """A read must not scan the view: its plan searches (tag, key), whatever the table holds."""
    from mlplat.features.online.sqlite import _SELECT, SQLiteOnlineStore

    store = SQLiteOnlineStore(f"sqlite:///{tmp_path / 'online.db'}")
    plan = " ".join(row[-1] for row in store._conn().execute(
        "EXPLAIN QUERY PLAN " + _SELECT.format("?,?"), ["v@1", b"a", b"b"]))
    store.close()
    assert "USING PRIMARY KEY (tag=? AND key=?)" in plan, plan


def test_a_sqlite_store_locked_past_its_busy_timeout_is_an_online_store_error(tmp_path, monkeypatch):
    import sqlite3

    from mlplat.features.online import sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "SQLITE_BUSY_TIMEOUT_MS", 50)  # wait 50 ms for the lock, not 30 s
    path = tmp_path / "online.db"
    store = sqlite_store.SQLiteOnlineStore(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the busy timeout
    try:
        with pytest.raises(mp.OnlineStoreError, match="dropping expired records of v@1: database is locked"):
            store.delete_expired("v@1")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.delete_expired("v@1") == 0
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_sqlite_store_opened_before_a_fork_keeps_what_the_child_writes_after_the_parent_closed(tmp_path):
    """The child used the parent's SQLite connection (SQLite forbids carrying one across fork): once the
    parent closed the store (checkpointing and deleting the WAL), the child's pushes went to the deleted
    WAL file and no other process ever saw them."""
    write(tmp_path / "src" / "a.parquet", [1], [2], [1])
    p = mp.Platform(tmp_path / "home", threads=2)
    p.features.apply([USER, txn_view(tmp_path / "src")])
    p.features.push("txn", [{"user_id": 1, "event_timestamp": NOW - timedelta(hours=1), "created": NOW,
                             "count": 1, "amount": 1.0, "note": "parent"}])  # the parent's connection is open
    after_parent_closes(p, lambda: p.features.push("txn", [
        {"user_id": u, "event_timestamp": NOW - timedelta(hours=1), "created": NOW, "count": u * 10, "amount": 2.0,
         "note": "child"} for u in range(2, 12)]))
    with mp.Platform(tmp_path / "home", threads=2) as again:
        got = again.features.get_online_features(["txn:count"], [{"user_id": u} for u in range(1, 12)])
    assert got["count"] == [1, *(u * 10 for u in range(2, 12))]
