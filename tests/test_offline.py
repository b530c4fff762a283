"""get_historical_features: the contract of DESIGN.md, its error cases, and a reference check."""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlplat as mp
from reference import historical_python, read_rows

UTC = timezone.utc
D = lambda day, hour=0: datetime(2024, 1, day, hour, tzinfo=UTC)  # noqa: E731
TS = pa.timestamp("us", tz="UTC")


def write(path: Path, rows: dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, **kwargs)
    return path


def txn_rows(user_id, ts, created=None, count=None, amount=None):
    rows = {"user_id": pa.array(user_id, pa.int64()), "event_timestamp": pa.array(ts, TS)}
    if created is not None:
        rows["created_timestamp"] = pa.array(created, TS)
    rows["txn_count"] = pa.array(count if count is not None else list(range(len(user_id))), pa.int64())
    rows["amount"] = pa.array(amount if amount is not None else [float(i) for i in range(len(user_id))], pa.float64())
    return rows


USER = mp.Entity("user", join_keys=["user_id"])


def txn_view(src: Path, ttl=timedelta(days=30), created=True, name="user_txn"):
    return mp.FeatureView(
        name, entities=[USER], ttl=ttl,
        schema=[mp.Field("txn_count", mp.Int64), mp.Field("amount", mp.Float64)],
        source=mp.ParquetSource(src, created_timestamp_field="created_timestamp" if created else None),
    )


def entities(user_id, ts, **extra) -> pa.Table:
    return pa.table({"user_id": pa.array(user_id, pa.int64()), "event_timestamp": pa.array(ts, TS), **extra})


REFS = ["user_txn:txn_count", "user_txn:amount"]


@pytest.fixture
def p(sqlite_platform):
    return sqlite_platform


# ------------------------------------------------------------------ semantics
def test_picks_latest_row_within_ttl_and_keeps_entity_rows(p, tmp_path):
    src = write(tmp_path / "txn" / "a.parquet", txn_rows(
        [1, 1, 2, 3], [D(1), D(5), D(2), D(1)], [D(1), D(5), D(2), D(1)], [10, 11, 20, 30]))
    p.features.apply([USER, txn_view(src.parent, ttl=timedelta(days=2))])
    edf = entities([1, 1, 2, 3, 9, 1], [D(3), D(6), D(3), D(4), D(4), D(3)], label=pa.array([1, 0, 1, 0, 1, 1]))
    out = p.features.get_historical_features(edf, REFS)
    assert out.column_names == ["user_id", "event_timestamp", "label", "txn_count", "amount"]
    assert out.column("txn_count").to_pylist() == [10, 11, 20, None, None, 10]
    assert out.column("label").to_pylist() == [1, 0, 1, 0, 1, 1]
    assert out.schema.field("txn_count").type == pa.int64()


def test_ttl_bounds_are_inclusive_and_none_means_unbounded(p, tmp_path):
    src = write(tmp_path / "t" / "a.parquet", txn_rows([1], [D(10)], [D(10)], [5]))
    p.features.apply([USER, txn_view(src.parent, ttl=timedelta(days=2))])
    just_in = D(12)
    just_out = D(12) + timedelta(microseconds=1)
    edf = entities([1, 1, 1, 1], [D(10), just_in, just_out, D(10) - timedelta(microseconds=1)])
    assert p.features.get_historical_features(edf, ["user_txn:txn_count"]).column("txn_count").to_pylist() == [
        5, 5, None, None]
    p.features.apply([txn_view(src.parent, ttl=None)])
    assert p.features.get_historical_features(edf, ["user_txn:txn_count"]).column("txn_count").to_pylist() == [
        5, 5, 5, None]


def test_equal_event_times_break_by_created_then_read_order(p, tmp_path):
    folder = tmp_path / "ties"
    # file b is read after file a (path order); inside a file, later rows are read later
    write(folder / "a.parquet", txn_rows([1, 1, 2, 2], [D(1)] * 4, [D(2), D(3), D(5), D(5)], [1, 2, 3, 4]))
    write(folder / "b.parquet", txn_rows([1, 2, 3, 3], [D(1)] * 4, [D(3), D(4), None, None], [5, 6, 7, 8]))
    p.features.apply([USER, txn_view(folder)])
    out = p.features.get_historical_features(entities([1, 2, 3], [D(2)] * 3), ["user_txn:txn_count"])
    # user 1: created D(3) twice -> the one read last (file b); user 2: greatest created D(5) -> last in file a
    # user 3: both created null -> read last
    assert out.column("txn_count").to_pylist() == [5, 4, 8]


def test_null_created_loses_ties_to_any_created(p, tmp_path):
    write(tmp_path / "s" / "a.parquet", txn_rows([1, 1], [D(1), D(1)], [D(1), None], [1, 2]))
    p.features.apply([USER, txn_view(tmp_path / "s")])
    assert p.features.get_historical_features(entities([1], [D(2)]), ["user_txn:txn_count"]).column(
        "txn_count").to_pylist() == [1]


def test_null_feature_values_come_back_as_null(p, tmp_path):
    write(tmp_path / "n" / "a.parquet", txn_rows([1, 1], [D(1), D(2)], [D(1), D(2)], [7, None], [None, 2.5]))
    p.features.apply([USER, txn_view(tmp_path / "n")])
    out = p.features.get_historical_features(entities([1, 1], [D(1), D(3)]), REFS)
    assert out.column("txn_count").to_pylist() == [7, None]  # the newest row's null, not an older value
    assert out.column("amount").to_pylist() == [None, 2.5]


def test_source_rows_without_event_time_never_match(p, tmp_path):
    write(tmp_path / "nt" / "a.parquet", txn_rows([1, 1], [D(1), None], [D(1), D(2)], [1, 2]))
    p.features.apply([USER, txn_view(tmp_path / "nt")])
    assert p.features.get_historical_features(entities([1], [D(3)]), ["user_txn:txn_count"]).column(
        "txn_count").to_pylist() == [1]


def test_null_entity_key_gives_nulls_and_duplicates_are_kept(p, tmp_path):
    write(tmp_path / "k" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [3]))
    p.features.apply([USER, txn_view(tmp_path / "k")])
    edf = entities([1, None, 1, 1], [D(2), D(2), D(2), D(2)])
    assert p.features.get_historical_features(edf, ["user_txn:txn_count"]).column("txn_count").to_pylist() == [
        3, None, 3, 3]


def test_all_entity_keys_null_or_unknown(p, tmp_path):
    write(tmp_path / "u" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [3]))
    p.features.apply([USER, txn_view(tmp_path / "u")])
    edf = pa.table({"user_id": pa.array([None, None], pa.int64()), "event_timestamp": pa.array([D(2), D(2)], TS)})
    out = p.features.get_historical_features(edf, REFS)
    assert out.column("txn_count").to_pylist() == [None, None] and out.schema.field("amount").type == pa.float64()
    out = p.features.get_historical_features(entities([5, 6], [D(2), D(2)]), REFS)
    assert out.column("amount").to_pylist() == [None, None]


def test_a_timestamp_feature_has_one_type_whichever_rows_match(p, tmp_path):
    """The finest unit the source's files hold it in: it was the unit of the file a match came from (ms for
    user 1, ns for user 2, us for no match), so batches of one training set did not concatenate."""
    times = {"user_id": [1], "event_timestamp": pa.array([D(1)], TS)}
    write(tmp_path / "t" / "a.parquet", {**times, "seen": pa.array([D(1, 5)], pa.timestamp("ms", "UTC"))})
    write(tmp_path / "t" / "b.parquet", {**times, "user_id": [2], "seen": pa.array([D(1, 6)], pa.timestamp("ns"))})
    view = mp.FeatureView("seen", entities=[USER], schema=[mp.Field("seen", mp.Timestamp)],
                          source=mp.ParquetSource(tmp_path / "t"))
    p.features.apply([USER, view])
    outs = [p.features.get_historical_features(entities(users, [D(2)] * len(users)), ["seen:seen"])
            for users in ([1], [2], [1, 2], [3], [None])]
    assert {out.schema.field("seen").type for out in outs} == {pa.timestamp("ns", "UTC")}
    assert pa.concat_tables(outs).column("seen").to_pylist() == [D(1, 5), D(1, 6), D(1, 5), D(1, 6), None, None]


def test_a_far_time_that_the_finest_unit_cannot_hold_is_a_store_error_naming_the_feature(p, tmp_path):
    """One file in us with a 9999-12-31 "no end" time, another in ns (pandas' unit): the feature comes out in ns,
    which cannot hold 9999 (a raw ArrowInvalid); materialize refuses such a source as well."""
    times = {"user_id": [1], "event_timestamp": pa.array([D(1)], TS)}
    write(tmp_path / "t" / "a.parquet", {**times, "until": pa.array([datetime(9999, 12, 31, tzinfo=UTC)], TS)})
    write(tmp_path / "t" / "b.parquet", {**times, "user_id": [2], "until": pa.array([D(9)], pa.timestamp("ns", "UTC"))})
    view = mp.FeatureView("acct", entities=[USER], schema=[mp.Field("until", mp.Timestamp)],
                          source=mp.ParquetSource(tmp_path / "t"))
    p.features.apply([USER, view])
    assert p.features.get_historical_features(entities([2], [D(2)]), ["acct:until"]).column("until").to_pylist() \
        == [D(9)]
    with pytest.raises(mp.StoreError, match=r"feature view 'acct': feature 'until' holds a time outside what "
                                            r"timestamp\[ns, tz=UTC\] holds, .* write the files in one unit"):
        p.features.get_historical_features(entities([1], [D(2)]), ["acct:until"])


@pytest.mark.parametrize("column, expected", [("created_timestamp", 5), ("user_id", 5), ("event_timestamp", 5),
                                              ("n", None)])
def test_a_file_with_a_key_or_time_column_of_none_in_every_row(p, tmp_path, column, expected):
    """pandas writes such a column as Arrow's null type; a key or time of that type was a StoreError for every
    retrieval (and materialize) of the view, where null values have defined meanings."""
    (tmp_path / "v").mkdir()
    pd.DataFrame({"user_id": [1], "event_timestamp": pd.to_datetime(["2024-01-01"], utc=True),
                  "created_timestamp": pd.to_datetime(["2024-01-01"], utc=True), "n": [5]}
                 ).to_parquet(tmp_path / "v" / "day1.parquet")
    view = mp.FeatureView("v", entities=[USER], schema=[mp.Field("n", mp.Int64)],
                          source=mp.ParquetSource(tmp_path / "v", created_timestamp_field="created_timestamp"))
    p.features.apply([USER, view])
    day2 = {"user_id": [1], "event_timestamp": pd.to_datetime(["2024-01-01"], utc=True),  # a tie with day 1's row
            "created_timestamp": pd.to_datetime(["2024-01-02"], utc=True), "n": [6], column: [None]}
    pd.DataFrame(day2).to_parquet(tmp_path / "v" / "day2.parquet")
    assert pq.read_schema(tmp_path / "v" / "day2.parquet").field(column).type == pa.null()
    offline = p.features.get_historical_features(entities([1], [D(3)]), ["v:n"]).column("n").to_pylist()
    p.features.materialize(end_date=D(3))
    assert offline == [expected] == p.features.get_online_features(["v:n"], {"user_id": [1]})["n"]


def test_a_view_whose_every_file_has_a_key_of_none_is_refused(p, tmp_path):
    (tmp_path / "k").mkdir()
    pd.DataFrame({"user_id": [None], "event_timestamp": pd.to_datetime(["2024-01-01"], utc=True), "n": [5]}
                 ).to_parquet(tmp_path / "k" / "a.parquet")
    view = mp.FeatureView("k", entities=[USER], schema=[mp.Field("n", mp.Int64)],
                          source=mp.ParquetSource(tmp_path / "k"))
    with pytest.raises(mp.DefinitionError, match="join key 'user_id' is null in every row of every file"):
        p.features.apply([USER, view])


def test_empty_entity_df(p, tmp_path):
    write(tmp_path / "e" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [3]))
    p.features.apply([USER, txn_view(tmp_path / "e")])
    out = p.features.get_historical_features(entities([], []), REFS)
    assert out.num_rows == 0 and out.column_names[-2:] == ["txn_count", "amount"]


def test_pandas_polars_and_arrow_inputs_agree(p, tmp_path):
    write(tmp_path / "i" / "a.parquet", txn_rows([1, 2], [D(1), D(1)], [D(1), D(1)], [1, 2]))
    p.features.apply([USER, txn_view(tmp_path / "i")])
    naive = [datetime(2024, 1, 2), datetime(2024, 1, 2)]
    pdf = pd.DataFrame({"user_id": [2, 1], "event_timestamp": pd.to_datetime(naive)})
    plf = pl.DataFrame({"user_id": [2, 1], "event_timestamp": naive})
    arrow = entities([2, 1], [D(2), D(2)])
    results = [p.features.get_historical_features(df, REFS).column("txn_count").to_pylist() for df in (pdf, plf, arrow)]
    assert results == [[2, 1]] * 3


def test_timezones_are_converted_and_naive_means_utc(p, tmp_path):
    write(tmp_path / "tz" / "a.parquet", txn_rows([1], [D(1, 12)], [D(1, 12)], [1]))
    p.features.apply([USER, txn_view(tmp_path / "tz", ttl=timedelta(0))])
    # 13:00 in UTC+1 is 12:00 UTC: exactly the event time
    paris = pa.array([datetime(2024, 1, 1, 13, tzinfo=timezone(timedelta(hours=1)))], pa.timestamp("ns", "Europe/Paris"))
    millis = pa.array([datetime(2024, 1, 1, 12, tzinfo=UTC)], pa.timestamp("ms", "UTC"))
    for ts in (paris, millis):
        edf = pa.table({"user_id": [1], "event_timestamp": ts})
        assert p.features.get_historical_features(edf, ["user_txn:txn_count"]).column("txn_count").to_pylist() == [1]
    naive = pa.table({"user_id": [1], "event_timestamp": pa.array([datetime(2024, 1, 1, 12)], pa.timestamp("s"))})
    assert p.features.get_historical_features(naive, ["user_txn:txn_count"]).column("txn_count").to_pylist() == [1]


def test_several_views_with_composite_and_string_keys(p, tmp_path):
    merchant = mp.Entity("merchant", join_keys=["merchant"])
    write(tmp_path / "u" / "a.parquet", txn_rows([1, 2], [D(1), D(1)], [D(1), D(1)], [1, 2]))
    write(tmp_path / "m" / "a.parquet", {
        "merchant": ["acme", "bob", "acme"], "event_timestamp": pa.array([D(1), D(1), D(3)], TS),
        "risk": pa.array([0.1, 0.2, 0.3], pa.float32())})
    write(tmp_path / "um" / "a.parquet", {
        "user_id": [1, 1, 2], "merchant": ["acme", "bob", "acme"], "event_timestamp": pa.array([D(1)] * 3, TS),
        "visits": [10, 20, 30]})
    m_view = mp.FeatureView("merchant_risk", entities=[merchant], ttl=None, schema=[mp.Field("risk", mp.Float32)],
                            source=mp.ParquetSource(tmp_path / "m"))
    um_view = mp.FeatureView("user_merchant", entities=[USER, merchant], ttl=timedelta(hours=1),
                             schema=[mp.Field("visits", mp.Int64)], source=mp.ParquetSource(tmp_path / "um"))
    p.features.apply([USER, merchant, txn_view(tmp_path / "u"), m_view, um_view])
    edf = pa.table({"user_id": [1, 1, 2, 2], "merchant": ["bob", "acme", "acme", None],
                    "event_timestamp": pa.array([D(1), D(4), D(1), D(1)], TS)})
    out = p.features.get_historical_features(
        edf, ["user_merchant:visits", "merchant_risk:risk", "user_txn:txn_count"])
    assert out.column_names[-3:] == ["visits", "risk", "txn_count"]  # the order asked for
    assert out.column("visits").to_pylist() == [20, None, 30, None]  # D(4) is past the 1h ttl
    risk = out.column("risk").to_pylist()
    assert risk[:3] == pytest.approx([0.2, 0.3, 0.1]) and risk[3] is None  # null merchant key: null
    assert out.schema.field("risk").type == pa.float32()
    assert out.column("txn_count").to_pylist() == [1, 1, 2, 2]


def test_full_feature_names_and_name_clashes(p, tmp_path):
    write(tmp_path / "a" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [1]))
    p.features.apply([USER, txn_view(tmp_path / "a"), txn_view(tmp_path / "a", name="other")])
    edf = entities([1], [D(2)])
    with pytest.raises(mp.DataError, match="full_feature_names=True"):
        p.features.get_historical_features(edf, ["user_txn:txn_count", "other:txn_count"])
    out = p.features.get_historical_features(edf, ["user_txn:txn_count", "other:txn_count"], full_feature_names=True)
    assert out.column_names[-2:] == ["user_txn__txn_count", "other__txn_count"]
    with pytest.raises(mp.DataError, match="both give a column 'user_txn__txn_count'; ask for one version of the view"):
        # it advised passing full_feature_names=True, which was passed and cannot part two versions of one view
        p.features.get_historical_features(edf, ["user_txn@1:txn_count", "user_txn:txn_count"], full_feature_names=True)
    with pytest.raises(mp.DataError, match="asked for twice"):
        p.features.get_historical_features(edf, ["user_txn:txn_count", "user_txn:txn_count"])
    clash = entities([1], [D(2)], txn_count=pa.array([0]))
    with pytest.raises(mp.DataError, match="name of an entity_df column"):
        p.features.get_historical_features(clash, ["user_txn:txn_count"])


def test_feature_service_and_versioned_refs(p, tmp_path):
    write(tmp_path / "v" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [1], [2.0]))
    v1 = txn_view(tmp_path / "v")
    p.features.apply([USER, v1])
    svc = mp.FeatureService("fraud", features=["user_txn:amount", "user_txn:txn_count"])
    p.features.apply([svc])
    edf = entities([1], [D(2)])
    out = p.features.get_historical_features(edf, p.features.get_feature_service("fraud"))
    assert out.column_names[-2:] == ["amount", "txn_count"]
    # version 2 drops 'amount' (the service, pinned to version 1 for it in the same apply, keeps it); version 1
    # stays retrievable by reference
    v2 = mp.FeatureView("user_txn", entities=[USER], ttl=timedelta(days=30),
                        schema=[mp.Field("txn_count", mp.Int64)], source=v1.source)
    pinned = mp.FeatureService("fraud", features=["user_txn@1:amount", "user_txn:txn_count"])
    assert p.features.apply([v2, pinned])[0].version == 2
    with pytest.raises(mp.NotFoundError, match="no feature 'amount'"):
        p.features.get_historical_features(edf, ["user_txn:amount"])
    assert p.features.get_historical_features(edf, ["user_txn@1:amount"]).column("amount").to_pylist() == [2.0]


def test_row_group_pruning_keeps_answers_exact(p, tmp_path):
    rng = np.random.default_rng(5)
    n = 20_000
    users = rng.integers(0, 300, n)
    ts = np.sort(rng.integers(0, 10**6, n)) * 1_000_000  # sorted in time: row groups cover time slices
    created = ts + rng.integers(0, 3, n) * 1_000_000
    rows = {"user_id": pa.array(users), "event_timestamp": pa.array(ts, pa.timestamp("us", "UTC")),
            "created_timestamp": pa.array(created, pa.timestamp("us", "UTC")),
            "txn_count": pa.array(np.arange(n)), "amount": pa.array(rng.random(n))}
    write(tmp_path / "rg" / "a.parquet", rows, row_group_size=1000)
    p.features.apply([USER, txn_view(tmp_path / "rg", ttl=timedelta(minutes=5))])
    e_users = rng.integers(0, 320, 500)
    e_ts = rng.integers(4 * 10**5, 5 * 10**5, 500) * 1_000_000  # a narrow slice of time
    edf = pa.table({"user_id": e_users, "event_timestamp": pa.array(e_ts, pa.timestamp("us", "UTC"))})
    out = p.features.get_historical_features(edf, REFS)
    expected = historical_python(read_rows([str(tmp_path / "rg" / "a.parquet")]), edf.to_pylist(),
                                 join_keys=["user_id"], features=["txn_count", "amount"],
                                 ttl=timedelta(minutes=5), created_field="created_timestamp")
    assert out.select(["txn_count", "amount"]).to_pylist() == expected
    assert any(r["txn_count"] is not None for r in expected)


# --------------------------------------------------------------- error cases
@pytest.fixture
def applied(p, tmp_path):
    write(tmp_path / "err" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [1]))
    p.features.apply([USER, txn_view(tmp_path / "err")])
    return p


@pytest.mark.parametrize(
    "edf, refs, kwargs, error, message",
    [
        (entities([1], [D(2)]), ["nope:x"], {}, mp.NotFoundError, "unknown feature view 'nope'"),
        (entities([1], [D(2)]), ["user_txn:nope"], {}, mp.NotFoundError, "no feature 'nope'"),
        (entities([1], [D(2)]), ["user_txn@9:amount"], {}, mp.NotFoundError, "has no version 9"),
        (entities([1], [D(2)]), ["user_txn"], {}, mp.DefinitionError, "'view:feature'"),
        (entities([1], [D(2)]), [], {}, mp.DefinitionError, "no features"),
        (entities([1], [D(2)]), REFS, {"timestamp_column": "ts"}, mp.DataError, "no timestamp column 'ts'"),
        (pa.table({"event_timestamp": pa.array([D(2)], TS)}), REFS, {}, mp.DataError, "no column 'user_id'"),
        (pa.table({"user_id": ["1"], "event_timestamp": pa.array([D(2)], TS)}), REFS, {}, mp.DataError,
         "join key 'user_id' is string in entity_df but int"),
        (pa.table({"user_id": [1.0], "event_timestamp": pa.array([D(2)], TS)}), REFS, {}, mp.DataError,
         "astype\\('Int64'\\)"),
        (pa.table({"user_id": [1], "event_timestamp": ["2024-01-02"]}), REFS, {}, mp.DataError,
         "must hold timestamps, found string"),
        (entities([1, 1, 1], [D(2), None, None]), REFS, {}, mp.DataError, "2 null timestamps \\(first at row 1\\)"),
        ({"user_id": [1]}, REFS, {}, mp.DataError, "pandas DataFrame, a pyarrow Table or a polars DataFrame"),
        (pa.table([pa.array([1]), pa.array([1]), pa.array([D(2)], TS)],
                  names=["user_id", "user_id", "event_timestamp"]), REFS, {}, mp.DataError, "entity_df: column 'user_id' appears 2 times"),
        (pa.table({"user_id": pa.array([2**63], pa.uint64()), "event_timestamp": pa.array([D(2)], TS)}), REFS, {},
         mp.DataError, "entity_df: join key 'user_id' holds 9223372036854775808, above the largest int64 key"),
    ],
)
def test_bad_requests_name_the_problem(applied, edf, refs, kwargs, error, message):
    with pytest.raises(error, match=message):
        applied.features.get_historical_features(edf, refs, **kwargs)
    assert isinstance(error("x"), mp.MlplatError)


def test_category_and_unsigned_key_columns_match_as_plain_ints(applied):
    want = applied.features.get_historical_features(entities([1, 2], [D(2), D(2)]), REFS).column("amount")
    frame = entities([1, 2], [D(2), D(2)]).to_pandas()
    frame["user_id"] = frame["user_id"].astype("category")  # arrives as dictionary<int64>
    assert applied.features.get_historical_features(frame, REFS).column("amount").equals(want)
    unsigned = entities([1, 2], [D(2), D(2)]).cast(pa.schema([("user_id", pa.uint64()), ("event_timestamp", TS)]))
    assert applied.features.get_historical_features(unsigned, REFS).column("amount").equals(want)


def test_source_that_changed_after_apply_is_reported(p, tmp_path):
    src = tmp_path / "chg"
    write(src / "a.parquet", txn_rows([1], [D(1)], [D(1)], [1]))
    p.features.apply([USER, txn_view(src)])
    write(src / "b.parquet", {"user_id": ["x"], "event_timestamp": pa.array([D(1)], TS),
                              "created_timestamp": pa.array([D(1)], TS), "txn_count": [1], "amount": [1.0]})
    with pytest.raises(mp.StoreError, match="join key 'user_id' is string in .*b.parquet, but the view was applied with int keys"):
        p.features.get_historical_features(entities([1], [D(2)]), REFS)
    os.remove(src / "b.parquet")
    write(src / "c.parquet", {"user_id": [1], "event_timestamp": pa.array([D(1)], TS),
                              "created_timestamp": pa.array([D(1)], TS), "txn_count": ["many"], "amount": [1.0]})
    with pytest.raises(mp.StoreError, match="field 'txn_count' is declared Int64 but the source .*c.parquet holds string"):
        p.features.get_historical_features(entities([1], [D(2)]), REFS)
    os.remove(src / "c.parquet")
    (src / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(mp.StoreError, match="not a readable Parquet file"):
        p.features.get_historical_features(entities([1], [D(2)]), REFS)


# --------------------------------------------------- reference, end to end
@st.composite
def scenario(draw):
    n_files = draw(st.integers(1, 3))
    files = []
    for _ in range(n_files):
        n = draw(st.integers(0, 12))
        files.append({
            "user_id": draw(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=n, max_size=n)),
            "event_timestamp": draw(st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=n, max_size=n)),
            "created_timestamp": draw(st.lists(st.one_of(st.none(), st.integers(0, 2)), min_size=n, max_size=n)),
            "txn_count": draw(st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=n, max_size=n)),
        })
    m = draw(st.integers(1, 10))
    edf = {"user_id": draw(st.lists(st.one_of(st.none(), st.integers(0, 4)), min_size=m, max_size=m)),
           "event_timestamp": draw(st.lists(st.integers(0, 7), min_size=m, max_size=m))}
    ttl = draw(st.one_of(st.none(), st.integers(0, 4)))
    return files, edf, ttl, draw(st.integers(1, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(scenario())
def test_matches_row_by_row_reference(tmp_path_factory, case):
    files, edf_cols, ttl_days, row_group = case
    home = tmp_path_factory.mktemp("ref")
    day = lambda values: pa.array([None if v is None else D(1) + timedelta(days=v) for v in values], TS)  # noqa
    paths = []
    for i, cols in enumerate(files):
        if not cols["user_id"] and i > 0:
            continue
        rows = {"user_id": pa.array(cols["user_id"], pa.int64()), "event_timestamp": day(cols["event_timestamp"]),
                "created_timestamp": day(cols["created_timestamp"]), "txn_count": pa.array(cols["txn_count"], pa.int64()),
                "amount": pa.array([None if c is None else c / 2 for c in cols["txn_count"]], pa.float64())}
        paths.append(str(write(home / "src" / f"part-{i:02d}.parquet", rows, row_group_size=row_group)))
    ttl = None if ttl_days is None else timedelta(days=ttl_days)
    with mp.Platform(home / "p", threads=2) as p:
        p.features.apply([USER, txn_view(home / "src", ttl=ttl)])
        edf = pa.table({"user_id": pa.array(edf_cols["user_id"], pa.int64()),
                        "event_timestamp": day(edf_cols["event_timestamp"])})
        out = p.features.get_historical_features(edf, REFS)
    expected = historical_python(read_rows(sorted(paths)), edf.to_pylist(), join_keys=["user_id"],
                                 features=["txn_count", "amount"], ttl=ttl, created_field="created_timestamp")
    assert out.select(["txn_count", "amount"]).to_pylist() == expected
    assert out.select(["user_id", "event_timestamp"]).equals(edf)


def test_source_given_as_a_filesystem_uri(p, tmp_path):
    src = write(tmp_path / "uri" / "nested" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [4]))
    write(tmp_path / "uri" / "_SUCCESS" / "ignored.parquet", txn_rows([1], [D(1)], [D(1)], [99]))
    uri = (tmp_path / "uri").as_uri()
    assert uri.startswith("file:///")
    p.features.apply([USER, txn_view(uri)])
    assert p.features.get_feature_view("user_txn").source.path == uri
    out = p.features.get_historical_features(entities([1], [D(2)]), ["user_txn:txn_count"])
    assert out.column("txn_count").to_pylist() == [4]
    with pytest.raises(mp.DefinitionError, match="cannot open source 'nosuchfs://x'"):
        p.features.apply([txn_view("nosuchfs://x")])
    assert src.exists()


# ------------------------------------------- times at the int64 nanosecond limits
FLOOR = np.iinfo(np.int64).min  # a real time: 1677-09-21 00:12:43.145224192 UTC, not a null
NS = pa.timestamp("ns", tz="UTC")
NS_PER = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
NOW_NS = (datetime.now(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def ns_rows(user_id, ts, created, count, unit="ns"):
    t = pa.timestamp(unit, tz="UTC")
    return {"user_id": pa.array(user_id, pa.int64()), "event_timestamp": pa.array(ts, pa.int64()).cast(t),
            "created_timestamp": pa.array(created, pa.int64()).cast(t), "txn_count": pa.array(count, pa.int64()),
            "amount": pa.array([None if c is None else c / 2 for c in count], pa.float64())}


def check_against_reference(p, folder: Path, edf: pa.Table, ttl=None) -> list:
    """Offline answers for ``edf`` (times in ns), checked against the row-by-row reference on int ns."""
    from reference import historical_python_ns, read_rows_ns

    out = p.features.get_historical_features(edf, REFS)
    paths = sorted(str(f) for f in folder.glob("*.parquet"))
    entity_rows = [{"user_id": u, "event_timestamp": t} for u, t in
                   zip(edf.column("user_id").to_pylist(), edf.column("event_timestamp").cast(pa.int64()).to_pylist())]
    expected = historical_python_ns(read_rows_ns(paths, ["event_timestamp", "created_timestamp"]), entity_rows,
                                    join_keys=["user_id"], features=["txn_count", "amount"],
                                    ttl_ns=None if ttl is None else ttl // timedelta(microseconds=1) * 1000,
                                    created_field="created_timestamp")
    assert out.select(["txn_count", "amount"]).to_pylist() == expected
    return [r["txn_count"] for r in expected]


def test_an_event_time_at_the_int64_floor_is_a_time_not_a_missing_one(p, tmp_path):
    # user 1's only row is stamped at the floor; user 2 has a row without an event time after one at the floor
    write(tmp_path / "fl" / "a.parquet", ns_rows([1, 2, 2, 3], [FLOOR, FLOOR, None, FLOOR + 1],
                                                 [0, 0, 5, None], [10, 20, 21, 30]))
    p.features.apply([USER, txn_view(tmp_path / "fl", ttl=None)])
    edf = pa.table({"user_id": pa.array([1, 1, 2, 3, 3]),
                    "event_timestamp": pa.array([FLOOR, NOW_NS, NOW_NS, FLOOR, NOW_NS], pa.int64()).cast(NS)})
    assert check_against_reference(p, tmp_path / "fl", edf) == [10, 10, 20, None, 30]  # before: None, None, None
    p.features.apply([txn_view(tmp_path / "fl", ttl=timedelta(days=1))])  # the floor is far outside a day
    assert check_against_reference(p, tmp_path / "fl", edf[:1], ttl=timedelta(days=1)) == [10]


def test_a_created_time_at_the_int64_floor_beats_a_missing_one(p, tmp_path):
    e = 1_700_000_000 * 10**9
    # same event time for each user; the missing created time is read last (1), first (2), beside a later one (3)
    created = [FLOOR, None, None, FLOOR, FLOOR, e, None]
    write(tmp_path / "cf" / "a.parquet", ns_rows([1, 1, 2, 2, 3, 3, 3], [e] * 7, created, [10, 11, 20, 21, 30, 31, 32]))
    p.features.apply([USER, txn_view(tmp_path / "cf", ttl=None)])
    edf = pa.table({"user_id": pa.array([1, 2, 3]), "event_timestamp": pa.array([e] * 3, pa.int64()).cast(NS)})
    assert check_against_reference(p, tmp_path / "cf", edf) == [10, 21, 31]  # before: 11 for user 1


def test_materialize_gives_online_what_offline_gives_at_the_int64_floor(p, tmp_path):
    e = 1_700_000_000 * 10**9
    write(tmp_path / "mf" / "a.parquet", ns_rows([1, 2, 2, 3, 3], [FLOOR, e, e, e, None],
                                                 [None, FLOOR, None, 0, 0], [10, 20, 21, 30, 31]))
    p.features.apply([USER, txn_view(tmp_path / "mf", ttl=None)])
    edf = pa.table({"user_id": pa.array([1, 2, 3]), "event_timestamp": pa.array([NOW_NS] * 3, pa.int64()).cast(NS)})
    offline = check_against_reference(p, tmp_path / "mf", edf)
    assert offline == [10, 20, 30]
    [result] = p.features.materialize(progress=False)
    assert result.rows == 3
    online = p.features.get_online_features(["user_txn:txn_count"], {"user_id": [1, 2, 3]})
    assert online["txn_count"] == offline  # before: user 1 was not materialized, user 2 got 21


@pytest.mark.parametrize("column", ["event_timestamp", "created_timestamp"])
@pytest.mark.parametrize("unit, value, shown", [
    ("us", -9_223_372_036_854_776, "1677-09-21 00:12:43.145224"),  # 192 ns below the floor: wrapped to 2262 before
    ("us", int((datetime(1500, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1)),
     "1500-01-01"),
    ("ms", int((datetime(2300, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1)),
     "2300-01-01"),
    ("ms", -2**62, "-4611686018427387904 ms from 1970"),  # beyond datetime's years too
])
def test_a_source_time_outside_int64_nanoseconds_is_an_error_naming_it(p, tmp_path, column, unit, value, shown):
    e = 1_700_000_000 * 10**9 // NS_PER[unit]
    rows = ns_rows([1, 1], [e, e], [e, e], [1, 2], unit=unit)
    rows[column] = pa.array([e, value], pa.int64()).cast(pa.timestamp(unit, tz="UTC"))
    path = write(tmp_path / "oor" / "a.parquet", rows)
    p.features.apply([USER, txn_view(tmp_path / "oor", ttl=None)])
    message = (f"feature view 'user_txn': a timestamp in timestamp\\[{unit}, tz=UTC\\] is out of the nanosecond "
               f"range .*{shown}.*, in column '{column}' of {path}")
    with pytest.raises(mp.StoreError, match=message):
        p.features.get_historical_features(entities([1], [D(2)]), REFS)
    with pytest.raises(mp.StoreError, match=message):
        p.features.materialize(progress=False)


def test_times_at_the_edges_of_int64_nanoseconds_in_other_units(p, tmp_path):
    lowest_us = -9_223_372_036_854_775  # the first microsecond inside int64 ns (..775000 ns)
    highest_us = 9_223_372_036_854_775
    write(tmp_path / "edge" / "a.parquet", ns_rows([1, 1, 2, 2], [lowest_us, lowest_us, highest_us, lowest_us],
                                                   [None, lowest_us, lowest_us, None], [10, 11, 20, 21], unit="us"))
    p.features.apply([USER, txn_view(tmp_path / "edge", ttl=None)])
    edf = pa.table({"user_id": pa.array([1, 2, 2]),
                    "event_timestamp": pa.array([lowest_us * 1000, NOW_NS, highest_us * 1000], pa.int64()).cast(NS)})
    assert check_against_reference(p, tmp_path / "edge", edf) == [11, 21, 20]


def test_an_entity_time_outside_int64_nanoseconds_is_a_data_error(p, tmp_path):
    write(tmp_path / "ent" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [1]))
    p.features.apply([USER, txn_view(tmp_path / "ent", ttl=None)])
    edf = pa.table({"user_id": [1], "event_timestamp": pa.array([-9_223_372_036_854_776], pa.int64()).cast(TS)})
    with pytest.raises(mp.DataError, match="entity_df column 'event_timestamp': a timestamp in .* out of the "
                                           "nanosecond range .*1677-09-21 00:12:43.145224"):
        p.features.get_historical_features(edf, REFS)  # before: wrapped to 2262 and saw the row of 2024


def test_a_pushed_time_outside_int64_nanoseconds_is_a_data_error_naming_it(p, tmp_path):
    write(tmp_path / "push" / "a.parquet", txn_rows([1], [D(1)], [D(1)], [1]))
    p.features.apply([USER, txn_view(tmp_path / "push", ttl=None)])
    rows = pa.table({"user_id": [1], "event_timestamp": pa.array([D(2)], TS),
                     "created_timestamp": pa.array([-9_223_372_036_854_776], pa.int64()).cast(TS),
                     "txn_count": [5], "amount": [1.0]})
    with pytest.raises(mp.DataError, match="push to 'user_txn': a timestamp .* out of the nanosecond range .*"
                                           "in column 'created_timestamp'"):
        p.features.push("user_txn", rows)  # before: the created time wrapped to 2262 and won every tie online
    assert p.features.get_online_features(["user_txn:txn_count"], {"user_id": [1]})["txn_count"] == [None]


EDGE_NS = [FLOOR, FLOOR + 1, -1, 0, 1, np.iinfo(np.int64).max - 1, np.iinfo(np.int64).max]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(n=st.integers(1, 10), data=st.data())
def test_times_at_the_int64_limits_match_the_reference(tmp_path_factory, n, data):
    edge = st.sampled_from(EDGE_NS)
    time = st.one_of(st.none(), st.just(FLOOR), edge)  # null and the floor often, beside each other
    users = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    events = data.draw(st.lists(time, min_size=n, max_size=n))
    created = data.draw(st.lists(time, min_size=n, max_size=n))
    m = data.draw(st.integers(1, 6))
    e_users = data.draw(st.lists(st.integers(0, 2), min_size=m, max_size=m))
    e_times = data.draw(st.lists(edge, min_size=m, max_size=m))
    ttl = data.draw(st.sampled_from([None, timedelta(0), timedelta(microseconds=1)]))
    home = tmp_path_factory.mktemp("edge")
    write(home / "src" / "a.parquet", ns_rows(users, events, created, list(range(n))),
          row_group_size=data.draw(st.integers(1, 4)))
    with mp.Platform(home / "p", threads=2) as p:
        p.features.apply([USER, txn_view(home / "src", ttl=ttl)])
        edf = pa.table({"user_id": pa.array(e_users, pa.int64()),
                        "event_timestamp": pa.array(e_times, pa.int64()).cast(NS)})
        check_against_reference(p, home / "src", edf, ttl=ttl)
