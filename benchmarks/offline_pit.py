#!/usr/bin/env python
"""End-to-end benchmark: point-in-time correct ("as-of") feature retrieval from Parquet.

mlplat's ``get_historical_features`` against pandas ``merge_asof``, polars
``join_asof`` and DuckDB's ``ASOF JOIN``. Every engine reads the same Parquet
files (8 feature files, one entity file) and produces an in-memory table with
the entity rows in their original order, their columns, then five features.

Run from the repository root::

    python benchmarks/offline_pit.py --size XS                 # CI smoke test, < 30 s
    python benchmarks/offline_pit.py --size S --markdown       # table to paste into docs
    python benchmarks/offline_pit.py --size L --order shuffled --threads 1,2 --repeats 3
    python benchmarks/offline_pit.py --size S --engines mlplat,duckdb --json results.json

Exit status: 0 only when every run of every engine returned the same table
(order-sensitive checksum of every column, see ``_harness.table_checksum``);
1 on a disagreement (printed loudly); 2 when a worker failed.

The rule every engine implements (mlplat's contract): an entity row with key
k at time t takes the source row with key k and the greatest event time e with
``t - ttl <= e <= t`` (both inclusive); among equal e the greatest created
time; among those the row read last (files in path order, rows in file
order); no such row gives nulls. ttl is 30 days.

What is timed (per run, one fresh subprocess per engine x threads x repeat):
from reading the first Parquet byte to the final in-memory table
(mlplat: ``pyarrow.Table``; pandas: ``DataFrame``; polars: ``DataFrame``;
DuckDB: ``pyarrow.Table``). Not timed: interpreter start and imports, for
mlplat ``Platform(...)`` construction and ``features.apply`` (SQLite catalog
in a fresh temporary home), for DuckDB ``connect()`` and ``SET threads``, and
converting the pandas/polars result to Arrow for the checksum. The data files
were just written or read by an earlier run, so they are normally in the OS
page cache for every engine alike: this measures compute, not disk.

Memory: "peak RSS" is the process's high-water mark (``ru_maxrss``), so it
includes the interpreter and imported libraries; "above baseline" subtracts
the RSS measured right before the timed region.

Data (``benchmarks/data/<size>/<order>/``, generated once, git-ignored,
regenerated when ``_meta.json`` shows another generator version): see
:func:`generate`. ``--order shuffled`` stores the same rows shuffled within
each file; the read-order tie rule then picks other winners among exact
duplicates, so the two layouts have different (but each engine-agreed) answers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402

GENERATOR_VERSION = 2
ENGINES = ("mlplat", "pandas", "polars", "duckdb")
SIZES = {  # entities, feature rows, entity rows
    "XS": (1_000, 50_000, 5_000),
    "S": (10_000, 1_000_000, 100_000),
    "L": (100_000, 10_000_000, 1_000_000),
}
N_FILES = 8
ROW_GROUP_SIZE = 131_072
TTL_DAYS = 30
FEATURES = ["f_int", "f_f32", "f_f64", "f_bool", "f_str"]
ENTITY_COLUMNS = ["user_id", "event_timestamp", "label"]
VIEW = "user_txn"
US = 1
SECOND = 1_000_000 * US
HOUR = 3600 * SECOND
DAY = 24 * HOUR
TTL_US = TTL_DAYS * DAY
T0_US = 1_704_067_200 * SECOND  # 2024-01-01T00:00:00Z
SLICE_US = int(6.5 * 7 * DAY)  # 8 slices of 6.5 weeks: 364 days
N_CATEGORIES = 300


# =========================================================================== data

def data_dir_for(root: Path, size: str, order: str) -> Path:
    return root / size / order


def feature_files(data_dir: Path) -> list[str]:
    """The feature files in path order: the order mlplat reads them (sorted absolute paths)."""
    return sorted(str(p) for p in (data_dir / "features").glob("*.parquet"))


def entity_file(data_dir: Path) -> str:
    return str(data_dir / "entities.parquet")


def _meta_ok(data_dir: Path, size: str, order: str) -> bool:
    try:
        meta = json.loads((data_dir / "_meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("generator_version") == GENERATOR_VERSION
        and meta.get("size") == size
        and meta.get("order") == order
        and len(feature_files(data_dir)) == N_FILES
        and Path(entity_file(data_dir)).is_file()
    )


def ensure_data(root: Path, size: str, order: str) -> tuple[Path, dict[str, Any], float | None]:
    """The data folder for (size, order), generated when missing or stale; (dir, meta, seconds spent generating)."""
    data_dir = data_dir_for(root, size, order)
    if _meta_ok(data_dir, size, order):
        return data_dir, json.loads((data_dir / "_meta.json").read_text()), None
    meta, seconds = h.generate_into(data_dir, {"generator_version": GENERATOR_VERSION, "size": size, "order": order},
                                    lambda tmp: generate(tmp, size, order))
    return data_dir, meta, seconds


def _log_uniform(rng, lo: float, hi: float, n: int):
    import numpy as np

    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def generate(out: Path, size: str, order: str) -> dict[str, Any]:
    """Write the feature files and the entity file for one size and layout into ``out``.

    Deterministic (numpy seed per size). Feature rows:

    * file i holds event times of the i-th of 8 consecutive 6.5-week slices
      of 2024, in event-time order, except ~2% late arrivals whose event
      time lies up to 7 days before their position (possibly in an earlier
      slice), written out of order; user activity is log-normally skewed;
    * created_timestamp = arrival + a delay of 1 s to 6 h (log-uniform),
      where arrival is the event time (late rows: their position's time);
    * ~5% of rows repeat the (user_id, event_timestamp) of an earlier row
      (80% a nearby row of the same file, 20% a row of an earlier file) with
      a created time up to 2 days later (60%) or earlier (40%);
    * ~0.1% repeat (user_id, event_timestamp, created_timestamp) of an
      earlier row exactly (half nearby, half in an earlier file), so only
      read order separates them;
    * every feature is null in ~1% of rows (independently); f_str is
      "cat_<k>" with k Zipf-like over 300 values.

    Entity rows: user_id uniform in [0, 1.05 * entities) (~5% unknown
    keys), event time uniform over the year, label int8; plus edge cases,
    ~1% each: t equal to an event time of the user (upper bound, inclusive),
    t = e + 30 days exactly and t = e + 30 days + 1 us where e is the
    user's latest event (lower bound: matches, then just misses), t at or
    up to an hour after an exactly duplicated event (read-order rule), and
    ~1% exact duplicate rows. ``order="shuffled"`` then shuffles rows within each
    feature file (same rows, other read order).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_entities, n_rows, n_entity_rows = SIZES[size]
    rng = np.random.default_rng(20240101 + list(SIZES).index(size))
    ts_type = pa.timestamp("us", tz="UTC")

    # ---------------- feature rows, file by file (positions are global read positions)
    activity = rng.lognormal(0.0, 1.0, n_entities)
    activity /= activity.sum()
    counts = [n_rows // N_FILES] * N_FILES
    counts[-1] += n_rows - sum(counts)
    starts = np.concatenate(([0], np.cumsum(counts)))
    file_of = np.repeat(np.arange(N_FILES), counts)
    uid = np.empty(n_rows, dtype=np.int64)
    ts = np.empty(n_rows, dtype=np.int64)
    created = np.empty(n_rows, dtype=np.int64)
    n_late = 0
    for i, m in enumerate(counts):
        s = slice(starts[i], starts[i + 1])
        lo = T0_US + i * SLICE_US
        uid[s] = rng.choice(n_entities, size=m, p=activity)
        arrival = np.sort(rng.integers(lo, lo + SLICE_US, m))
        late = rng.random(m) < 0.02
        n_late += int(late.sum())
        lateness = np.where(late, _log_uniform(rng, 60 * SECOND, 7 * DAY, m).astype(np.int64), 0)
        ts[s] = arrival - lateness
        created[s] = arrival + _log_uniform(rng, SECOND, 6 * HOUR, m).astype(np.int64)

    taken = np.zeros(n_rows, dtype=bool)  # a row already used as a duplicate target or source

    def pick_pairs(fraction: float, near_share: float) -> tuple[np.ndarray, np.ndarray]:
        """(target, source) pairs, each target read after its source, all rows distinct and not used before.

        A share ``near_share`` of sources lie 1-199 rows before the target in
        the same file, the others anywhere in an earlier file.
        """
        want = int(round(n_rows * fraction))
        target = rng.choice(n_rows, size=min(n_rows, 2 * want + 10), replace=False)
        near = rng.random(len(target)) < near_share
        f = file_of[target]
        near_src = target - rng.integers(1, 200, len(target))
        far_src = (rng.random(len(target)) * starts[f]).astype(np.int64)  # a row in [0, start of file f)
        source = np.where(near, near_src, np.where(f > 0, far_src, -1))
        ok = (source >= 0) & (source < target)
        ok &= np.where(near, file_of[np.maximum(source, 0)] == f, True)
        target, source = target[ok], source[ok]
        # distinct and unused, greedily in the random order
        keep = []
        for t, sidx in zip(target.tolist(), source.tolist()):
            if taken[t] or taken[sidx]:
                continue
            taken[t] = taken[sidx] = True
            keep.append((t, sidx))
            if len(keep) == want:
                break
        arr = np.array(keep, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    # ~5%: same (user, event time), other created time
    t5, s5 = pick_pairs(0.05, 0.8)
    uid[t5] = uid[s5]
    ts[t5] = ts[s5]
    sign = np.where(rng.random(len(t5)) < 0.6, 1, -1)
    created[t5] = created[s5] + sign * np.maximum(_log_uniform(rng, SECOND, 2 * DAY, len(t5)).astype(np.int64), 1)
    # ~0.1%: exact (user, event time, created time) duplicates
    t01, s01 = pick_pairs(0.001, 0.5)
    uid[t01] = uid[s01]
    ts[t01] = ts[s01]
    created[t01] = created[s01]

    def with_nulls(values, pa_type):
        mask = rng.random(n_rows) < 0.01
        return pa.array(values, type=pa_type, mask=mask)

    f_int = with_nulls(rng.integers(-(10**12), 10**12, n_rows), pa.int64())
    f_f32 = with_nulls((rng.standard_normal(n_rows) * 100).astype(np.float32), pa.float32())
    f_f64 = with_nulls(rng.standard_normal(n_rows) * 1e3, pa.float64())
    f_bool = with_nulls(rng.random(n_rows) < 0.3, pa.bool_())
    zipf = 1.0 / np.arange(1, N_CATEGORIES + 1)
    cat = rng.choice(N_CATEGORIES, size=n_rows, p=zipf / zipf.sum()).astype(np.int32)
    cat_mask = rng.random(n_rows) < 0.01
    f_str = pa.DictionaryArray.from_arrays(
        pa.array(cat, mask=cat_mask), pa.array([f"cat_{k}" for k in range(N_CATEGORIES)])
    ).dictionary_decode()

    table = pa.table({
        "user_id": pa.array(uid, type=pa.int64()),
        "event_timestamp": pa.array(ts, type=pa.int64()).cast(ts_type),
        "created_timestamp": pa.array(created, type=pa.int64()).cast(ts_type),
        "f_int": f_int, "f_f32": f_f32, "f_f64": f_f64, "f_bool": f_bool, "f_str": f_str,
    })

    # ---------------- entity rows
    n_edge = max(1, n_entity_rows // 100)
    n_base = n_entity_rows - 5 * n_edge
    e_uid = rng.integers(0, int(round(1.05 * n_entities)), n_base)
    e_ts = rng.integers(T0_US, T0_US + N_FILES * SLICE_US, n_base)
    # upper edge: t == an event time of the user
    r = rng.integers(0, n_rows, n_edge)
    up_uid, up_ts = uid[r], ts[r]
    # lower edge: t - ttl == the user's latest event time (matches) / misses it by 1 us
    srt = np.lexsort((ts, uid))
    last = srt[np.r_[uid[srt][1:] != uid[srt][:-1], True]]  # latest row of each user
    r = rng.choice(last, size=n_edge)
    lo_uid, lo_ts = uid[r], ts[r] + TTL_US
    r = rng.choice(last, size=n_edge)
    miss_uid, miss_ts = uid[r], ts[r] + TTL_US + 1
    # read-order ties: at or up to an hour after an exactly duplicated event of the user
    r = rng.choice(t01, size=n_edge) if len(t01) else rng.integers(0, n_rows, n_edge)
    rd_uid, rd_ts = uid[r], ts[r] + np.where(rng.random(n_edge) < 0.5, 0, rng.integers(0, HOUR, n_edge))
    e_uid = np.concatenate([e_uid, up_uid, lo_uid, miss_uid, rd_uid])
    e_ts = np.concatenate([e_ts, up_ts, lo_ts, miss_ts, rd_ts])
    label = rng.integers(0, 2, len(e_uid)).astype(np.int8)
    # exact duplicate entity rows
    dup = rng.integers(0, len(e_uid), n_entity_rows - len(e_uid))
    e_uid = np.concatenate([e_uid, e_uid[dup]])
    e_ts = np.concatenate([e_ts, e_ts[dup]])
    label = np.concatenate([label, label[dup]])
    perm = rng.permutation(len(e_uid))
    entities = pa.table({
        "user_id": pa.array(e_uid[perm], type=pa.int64()),
        "event_timestamp": pa.array(e_ts[perm], type=pa.int64()).cast(ts_type),
        "label": pa.array(label[perm], type=pa.int8()),
    })

    # ---------------- write
    (out / "features").mkdir(parents=True)
    shuffle_rng = np.random.default_rng(777 + list(SIZES).index(size))
    for i in range(N_FILES):
        part = table.slice(starts[i], counts[i])
        if order == "shuffled":
            part = part.take(pa.array(shuffle_rng.permutation(counts[i])))
        pq.write_table(part, out / "features" / f"part-{i:02d}.parquet", row_group_size=ROW_GROUP_SIZE)
    pq.write_table(entities, out / "entities.parquet", row_group_size=ROW_GROUP_SIZE)
    return {
        "entities": n_entities, "feature_rows": n_rows, "files": N_FILES, "entity_rows": int(entities.num_rows),
        "late_rows": n_late, "dup_key_ts_rows": int(len(t5)), "exact_dup_rows": int(len(t01)),
    }


# =========================================================================== engines
# Each engine: prepare(files, entity_path, threads) -> run; run() is the timed region and
# returns the engine's native in-memory result; to_arrow(result) happens after the timer.

def engine_mlplat(files: list[str], entity_path: str, threads: int):
    import tempfile
    from datetime import timedelta

    import pyarrow.dataset  # noqa: F401  (pq.read_table imports it, and it imports pandas: ~0.4 s, not timed)
    import pyarrow.parquet as pq

    import mlplat as mp

    home = tempfile.mkdtemp(prefix="mlplat-bench-")
    p = mp.Platform(home, threads=threads)
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView(
        VIEW, entities=[user], ttl=timedelta(days=TTL_DAYS),
        schema=[mp.Field("f_int", mp.Int64), mp.Field("f_f32", mp.Float32), mp.Field("f_f64", mp.Float64),
                mp.Field("f_bool", mp.Bool), mp.Field("f_str", mp.String)],
        source=mp.ParquetSource(os.path.dirname(files[0]), timestamp_field="event_timestamp",
                                created_timestamp_field="created_timestamp"),
    )
    p.features.apply([user, view])
    refs = [f"{VIEW}:{f}" for f in FEATURES]

    def run():
        entity_table = pq.read_table(entity_path)
        return p.features.get_historical_features(entity_table, refs)

    def cleanup():
        p.close()
        shutil.rmtree(home, ignore_errors=True)

    return run, (lambda t: t), cleanup


def engine_pandas(files: list[str], entity_path: str, threads: int):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset  # noqa: F401  (imported by pq.read_table on first use; not timed)
    import pyarrow.parquet as pq

    # nullable pandas dtypes so that nulls stay nulls (no int -> float with NaN)
    mapping = {pa.int64(): pd.Int64Dtype(), pa.float32(): pd.Float32Dtype(), pa.float64(): pd.Float64Dtype(),
               pa.bool_(): pd.BooleanDtype(), pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype()}

    def run():
        entities = pq.read_table(entity_path).to_pandas()  # numpy dtypes: no nulls on the entity side
        # files concatenated in path order, rows in file order: the index is the read position
        feats = pq.read_table(files, columns=["user_id", "event_timestamp", "created_timestamp", *FEATURES])
        feats = feats.to_pandas(types_mapper=mapping.get)
        feats["user_id"] = feats["user_id"].to_numpy(dtype="int64")  # 'by' keys must have the same dtype
        feats["_read"] = range(len(feats))
        # merge_asof (backward) takes the LAST right row among equal 'on' values of a key
        # (checked in _check_pandas_ties), so order ties by (created, read position)
        feats = feats.sort_values(["event_timestamp", "created_timestamp", "_read"], ignore_index=True)
        feats = feats.drop(columns=["created_timestamp", "_read"])
        entities["_pos"] = range(len(entities))
        left = entities.sort_values("event_timestamp", kind="stable")
        out = pd.merge_asof(left, feats, by="user_id", on="event_timestamp", direction="backward",
                            tolerance=pd.Timedelta(days=TTL_DAYS), allow_exact_matches=True)
        out = out.sort_values("_pos", ignore_index=True).drop(columns="_pos")
        return out

    def to_arrow(df):
        return pa.Table.from_pandas(df, preserve_index=False)

    return run, to_arrow, None


def engine_polars(files: list[str], entity_path: str, threads: int):
    import polars as pl

    def run():
        ent = pl.scan_parquet(entity_path).with_row_index("_pos").sort("event_timestamp")
        feats = (
            pl.scan_parquet(files, row_index_name="_read")  # one index over the files in path order
            .select("user_id", "event_timestamp", "created_timestamp", *FEATURES, "_read")
            # join_asof (backward) takes the LAST right row among equal 'on' values of a key
            # (checked in _check_polars_ties), so order ties by (created, read position)
            .sort(["event_timestamp", "created_timestamp", "_read"])
            .drop("created_timestamp", "_read")
        )
        out = ent.join_asof(
            feats, on="event_timestamp", by="user_id", strategy="backward",
            tolerance=f"{TTL_DAYS}d", allow_exact_matches=True, check_sortedness=False,
        )
        return out.sort("_pos").drop("_pos").collect()

    return run, (lambda df: df.to_arrow()), None


def engine_duckdb(files: list[str], entity_path: str, threads: int):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={int(threads)}")
    con.execute("SET TimeZone='UTC'")
    file_list = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    feature_cols = ", ".join(FEATURES)
    cases = ",\n  ".join(
        f"CASE WHEN epoch_us(f.event_timestamp) >= epoch_us(e.event_timestamp) - {TTL_US} THEN f.{c} END AS {c}"
        for c in FEATURES
    )
    sql = f"""
WITH f AS (
  SELECT user_id, event_timestamp, {feature_cols}
  FROM read_parquet({file_list}, filename=true, file_row_number=true)
  QUALIFY row_number() OVER (
    PARTITION BY user_id, event_timestamp
    ORDER BY created_timestamp DESC, filename DESC, file_row_number DESC) = 1
),
e AS (
  SELECT user_id, event_timestamp, label, file_row_number AS _pos
  FROM read_parquet('{entity_path.replace("'", "''")}', file_row_number=true)
)
SELECT e.user_id, e.event_timestamp, e.label,
  {cases}
FROM e ASOF LEFT JOIN f
  ON e.user_id = f.user_id AND e.event_timestamp >= f.event_timestamp
ORDER BY e._pos
"""

    def run():
        rel = con.sql(sql)
        for name in ("to_arrow_table", "fetch_arrow_table"):
            if hasattr(rel, name):
                return getattr(rel, name)()
        return rel.arrow().read_all()

    return run, (lambda t: t), con.close


ENGINE_FUNCS: dict[str, Callable] = {
    "mlplat": engine_mlplat, "pandas": engine_pandas, "polars": engine_polars, "duckdb": engine_duckdb,
}


# =========================================================================== tie checks
# Small, fast checks run inside the worker (outside the timed region) that the
# library picks the last right row among equal 'on' values, inclusive tolerance
# at exactly 30 days, and nothing at 30 days + 1 us. The benchmark's checksum
# comparison guards the full-size answer; these name the cause if it breaks.

def _tie_case():
    base = T0_US
    right = {  # user 1: three rows at the same time, in the order a correct sort leaves them
        "user_id": [1, 1, 1, 1, 2],
        "event_timestamp": [base, base + DAY, base + DAY, base + DAY, base + 5 * DAY],
        "v": [10, 20, 21, 22, 30],
    }
    left = {
        "user_id": [1, 1, 1, 2, 1],
        "event_timestamp": [base + DAY, base + DAY + TTL_US, base + DAY + TTL_US + 1, base + 4 * DAY, base + 2 * DAY],
    }
    want = [22, 22, None, None, 22]
    return right, left, want


def _check_pandas_ties() -> None:
    import pandas as pd

    right, left, want = _tie_case()
    r = pd.DataFrame(right).assign(event_timestamp=lambda d: pd.to_datetime(d.event_timestamp, unit="us", utc=True))
    r["v"] = r["v"].astype("Int64")
    lf = pd.DataFrame(left).assign(event_timestamp=lambda d: pd.to_datetime(d.event_timestamp, unit="us", utc=True))
    lf["_pos"] = range(len(lf))
    out = pd.merge_asof(lf.sort_values("event_timestamp", kind="stable"), r, by="user_id", on="event_timestamp",
                        direction="backward", tolerance=pd.Timedelta(days=TTL_DAYS), allow_exact_matches=True)
    got = [None if pd.isna(v) else int(v) for v in out.sort_values("_pos")["v"]]
    if got != want:
        raise AssertionError(f"pandas merge_asof tie/tolerance behaviour changed: got {got}, want {want}")


def _check_polars_ties() -> None:
    import polars as pl

    right, left, want = _tie_case()
    dt = pl.Datetime("us", "UTC")
    r = pl.DataFrame(right).with_columns(pl.col("event_timestamp").cast(dt))
    lf = pl.DataFrame(left).with_columns(pl.col("event_timestamp").cast(dt)).with_row_index("_pos")
    out = lf.sort("event_timestamp").join_asof(
        r, on="event_timestamp", by="user_id", strategy="backward", tolerance=f"{TTL_DAYS}d",
        allow_exact_matches=True, check_sortedness=False,
    ).sort("_pos")
    got = out["v"].to_list()
    if got != want:
        raise AssertionError(f"polars join_asof tie/tolerance behaviour changed: got {got}, want {want}")


TIE_CHECKS = {"pandas": _check_pandas_ties, "polars": _check_polars_ties}


# =========================================================================== worker

def worker_main(args: argparse.Namespace) -> None:
    threads = args.threads_one
    h.limit_pyarrow_threads(threads)
    data_dir = Path(args.data_dir_resolved)
    files = feature_files(data_dir)
    ent = entity_file(data_dir)
    warnings.simplefilter("ignore")
    if args.worker in TIE_CHECKS:
        TIE_CHECKS[args.worker]()
    run, to_arrow, cleanup = ENGINE_FUNCS[args.worker](files, ent, threads)
    modules_before = set(sys.modules)  # a module first imported while timed is reported (its import is timed)
    region = h.TimedRegion()
    with region:
        result = run()
    imported = sorted(m for m in set(sys.modules) - modules_before if "." not in m)
    table = to_arrow(result)
    del result
    checksum = h.table_checksum(table)
    matched = _rows_with_a_feature(table)
    if args.dump:
        import pyarrow.parquet as pq

        Path(args.dump).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, Path(args.dump) / f"{args.worker}-t{threads}.parquet")
    if cleanup:
        cleanup()
    h.write_report(args.result_file, {
        "engine": args.worker, "threads": threads, **region.as_dict(),
        "rows": table.num_rows, "rows_with_a_feature": matched, "checksum": checksum,
        "imported_while_timed": imported,
    })


def _rows_with_a_feature(table) -> int:
    import numpy as np

    any_valid = np.zeros(table.num_rows, dtype=bool)
    for f in FEATURES:
        if f in table.column_names:
            any_valid |= table.column(f).is_valid().to_numpy(zero_copy_only=False)
    return int(any_valid.sum())


# =========================================================================== parent

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="XS")
    ap.add_argument("--order", choices=["time", "shuffled"], default="time",
                    help="row layout inside each feature file (default: time)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per engine and thread count (default: 1 for XS, else 3)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--data-dir", default=None,
                    help="data root instead of benchmarks/data (files go to <root>/<size>/<order>/)")
    ap.add_argument("--json", default=None, help="write every run's raw report to this JSON file")
    ap.add_argument("--dump", default=None, help="write each engine's result (first repeat) as Parquet into this folder")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a worker is killed")
    # worker mode (internal)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--threads-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir-resolved", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        print(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    threads_list = [int(t) for t in args.threads.split(",") if t.strip()]
    repeats = args.repeats or (1 if args.size == "XS" else 3)
    root = Path(args.data_dir).resolve() if args.data_dir else HERE / "data"

    data_dir, meta, gen_s = ensure_data(root, args.size, args.order)
    if gen_s is not None:
        print(f"generated {args.size}/{args.order} data in {gen_s:.1f} s -> {data_dir}", file=sys.stderr)

    fingerprint = h.package_fingerprint("mlplat")
    runs: list[dict[str, Any]] = []
    # repeats outermost so that slow drifts of a shared machine hit every engine alike
    for rep in range(repeats):
        for threads in threads_list:
            for engine in engines:
                worker_args = ["--worker", engine, "--threads-one", str(threads),
                               "--data-dir-resolved", str(data_dir)]
                if args.dump and rep == 0:
                    worker_args += ["--dump", args.dump]
                try:
                    rep_json = h.run_worker(__file__, worker_args, env=h.thread_env(threads), timeout=args.timeout)
                except h.WorkerError as exc:
                    print(f"\n!!! {engine} (threads={threads}) failed:\n{exc}", file=sys.stderr)
                    return 2
                rep_json["repeat"] = rep
                runs.append(rep_json)
                print(f"  {engine:<7} threads={threads} repeat={rep + 1}/{repeats}: {rep_json['wall_s']:.3f} s, "
                      f"peak {rep_json['peak_rss_mb']:.0f} MB", file=sys.stderr)

    fingerprint_after = h.package_fingerprint("mlplat")

    # ---------------- agreement
    ref_run = next((r for r in runs if r["engine"] == "mlplat"), runs[0])
    ref = ref_run["checksum"]
    disagreements: list[str] = []
    agree: dict[tuple[str, int], bool] = {}
    for r in runs:
        diffs = h.checksum_differences(ref, r["checksum"])
        key = (r["engine"], r["threads"])
        agree[key] = agree.get(key, True) and not diffs
        if diffs:
            disagreements.append(f"{r['engine']} threads={r['threads']} repeat={r['repeat'] + 1} vs "
                                 f"{ref_run['engine']} threads={ref_run['threads']}: " + "; ".join(diffs))

    # ---------------- table
    summary: dict[tuple[str, int], dict[str, float]] = {}
    for engine in engines:
        for threads in threads_list:
            rs = [r for r in runs if r["engine"] == engine and r["threads"] == threads]
            summary[(engine, threads)] = {
                "median": h.median(r["wall_s"] for r in rs),
                "min": min(r["wall_s"] for r in rs),
                "peak": max(r["peak_rss_mb"] for r in rs),
                "above": max(r["peak_above_baseline_mb"] for r in rs),
            }
    rows = []
    for threads in threads_list:
        base = summary.get(("mlplat", threads), {}).get("median")
        for engine in engines:
            s = summary[(engine, threads)]
            ratio = s["median"] / base if base else float("nan")
            rows.append([engine, threads, f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['peak']:.0f}", f"{s['above']:.0f}",
                         f"{ratio:.2f}x" if ratio == ratio else "-", "yes" if agree[(engine, threads)] else "NO"])
    headers = ["engine", "threads", "median wall s", "min wall s", "peak RSS MB", "peak above baseline MB",
               "time / mlplat", "agree"]
    align = ["l", "r", "r", "r", "r", "r", "r", "l"]

    machine = h.machine_info()
    versions = h.library_versions(["mlplat", "numpy", "pyarrow", "pandas", "polars", "duckdb"])
    header_lines = [
        f"offline point-in-time retrieval, size {args.size}: {meta['feature_rows']:,} feature rows in "
        f"{meta['files']} files ({meta['entities']:,} entities), {meta['entity_rows']:,} entity rows, "
        f"5 features, ttl {TTL_DAYS} d",
        f"order: {args.order}; repeats: {repeats} (median wall, max peak RSS); result rows: {ref['rows']:,}, "
        f"rows with a feature: {ref_run['rows_with_a_feature']:,}",
        f"machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), {machine['cpu_model']}, "
        f"{machine['mem_gib']} GiB, {machine['os']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f" (mlplat source fingerprint {fingerprint})",
    ]
    if gen_s is not None:
        header_lines.append(f"data generated in this run: {gen_s:.1f} s")
    print("\n".join(header_lines))
    print()
    print(h.format_table(headers, rows, align=align))
    if args.markdown:
        print()
        print("\n".join(f"- {line}" for line in header_lines))
        print()
        print(h.format_table(headers, rows, markdown=True, align=align))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "order": args.order, "meta": meta, "machine": machine,
                       "mlplat_fingerprint": [fingerprint, fingerprint_after],
                       "versions": versions, "generate_seconds": gen_s, "runs": runs}, f, indent=1)

    types = {r["engine"]: r["checksum"]["types"] for r in runs}
    notes = sorted({f"{e}: " + ", ".join(f"{c}={t}" for c, t in ts.items() if ref["types"].get(c) != t)
                    for e, ts in types.items() if ts != ref["types"]})
    if notes:
        print("\nArrow types that differ from " + ref_run["engine"] + " (values compared canonically): "
              + "; ".join(notes))

    late_imports = sorted({f"{r['engine']}: {', '.join(r['imported_while_timed'])}"
                           for r in runs if r.get("imported_while_timed")})
    if late_imports:
        print("\nnote: packages first imported inside the timed region (their import time is included): "
              + "; ".join(late_imports), file=sys.stderr)

    if fingerprint_after != fingerprint:
        print(f"\nWARNING: mlplat's files changed during the runs (fingerprint {fingerprint} -> "
              f"{fingerprint_after}): the mlplat rows mix code versions; rerun.", file=sys.stderr)

    if disagreements:
        bar = "!" * 78
        print(f"\n{bar}\nRESULTS DISAGREE ({len(disagreements)} run(s)); reference: {ref_run['engine']} "
              f"threads={ref_run['threads']}", file=sys.stderr)
        for d in disagreements:
            print("  " + d, file=sys.stderr)
        print("rerun with --dump DIR to write each engine's table for a row-by-row diff\n" + bar, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
