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
    # version 2 drops 'amount'; version 1 stays retrievable by reference
    v2 = mp.FeatureView("user_txn", entities=[USER], ttl=timedelta(days=30),
                        schema=[mp.Field("txn_count", mp.Int64)], source=v1.source)
    assert p.features.apply([v2])[0].version == 2
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
