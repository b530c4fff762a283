#!/usr/bin/env python
"""Online feature store benchmark: mlplat's get_online_features against the raw Redis floor, plus materialization.

Run from the repository root (Redis must be reachable; the benchmark owns the
db in ``--redis-url`` and FLUSHDBs it at start and at the end)::

    python benchmarks/online_latency.py                        # 1M entities, full sample counts
    python benchmarks/online_latency.py --smoke                # CI: 20k entities, 2% of the samples, < 30 s
    python benchmarks/online_latency.py --entities 20000 --scale 0.02
    python benchmarks/online_latency.py --markdown --json online.json --profile

What it does:

1. Data (``benchmarks/data/online/<entities>/``, generated once, git-ignored;
   see :func:`generate`): two feature views ``user_a`` and ``user_b`` of five
   features each (int64, float32, float64, bool, 8-char string, ~1% nulls
   each), every entity with two rows per view (an older and a newer one), 8
   Parquet files per view.
2. Materialization, each in a fresh worker process: ``p.features.materialize()``
   into Redis, then into the SQLite online store; timed end to end (reading
   Parquet, picking the newest row per entity, encoding, writing).
3. Latency, in one fresh worker process: first a correctness check (on ~1000
   random entities plus a few unknown ones, mlplat's online values must equal
   ``get_historical_features`` at "now", value for value, for both stores;
   a mismatch exits 1), then for 1, 10, 100 and 1000 entities per request,
   the three Redis engines interleaved round robin per request (the order
   rotates every request) so that the drift of a shared machine hits all
   alike, then mlplat on SQLite in its own block (interleaved, its slow reads
   would disturb the others):

   * ``mlplat redis``: ``p.features.get_online_features(10 refs, [{"user_id": id}, ...])``,
     Python values out, GC enabled;
   * ``redis pipeline`` (the floor): redis-py ``pipeline(transaction=False)``, one
     ``GET`` per (entity, view), ``execute()``, raw bytes (``decode_responses=False``);
   * ``redis MGET`` (informative): one ``r.mget(keys)`` of the same keys, raw bytes;
   * ``mlplat sqlite``: the same mlplat call against the SQLite online store.

   Entity ids are distinct within a request, uniform over the existing
   entities; building the request (the dicts, the floor's key bytes) is not
   timed; every request is timed with ``time.perf_counter_ns``. Percentiles use
   the nearest rank (each reported value was measured). An engine whose
   measured time in one batch size passes ``--cell-budget`` seconds stops
   early (marked ``*``; keeps at least 10 samples; never the floor).
   ``--profile`` adds a cProfile of mlplat's Redis reads per batch size.

Targets (from the issue) are printed with PASS/FAIL; a FAIL does not change the
exit status. Exit status: 0 when everything ran and the correctness check
passed; 1 on a correctness mismatch; 2 when something failed (Redis
unreachable, a worker crashed, bad options).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402

GENERATOR_VERSION = 1
N_FILES = 8
TTL_DAYS = 3650  # long, so data generated once stays servable: its rows span the 10 days before generation
SPAN_DAYS = 10
VIEWS = {"user_a": "a", "user_b": "b"}  # view name -> feature prefix
KINDS = ("int", "f32", "f64", "bool", "str")
REFS = [f"{view}:{p}_{k}" for view, p in VIEWS.items() for k in KINDS]
OUT_NAMES = [r.split(":", 1)[1] for r in REFS]
BATCHES = (1, 10, 100, 1000)
SAMPLES = {1: 20_000, 10: 10_000, 100: 3_000, 1000: 1_000}
ENGINES = ("mlplat redis", "redis pipeline", "redis MGET", "mlplat sqlite")
FLOOR = "redis pipeline"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
RESERVED_DBS = {13: "the Redis test suite's db"}
MLPLAT_URL_PARAMS = ("prefix", "timeout", "retries", "batch")  # mlplat's own query parameters (not redis-py's)
CHECK_ENTITIES = 1000
CHECK_UNKNOWN = 16
SEED = 20240601
US = 1
SECOND = 1_000_000 * US
DAY = 86_400 * SECOND

# issue targets
TARGET_P99_MS = {100: 1.5, 1: 0.4}
TARGET_FLOOR_RATIO = 1.5
TARGET_MATERIALIZE_S = 20.0
TARGET_MATERIALIZE_ENTITIES = 1_000_000


# =========================================================================== data

def data_dir_for(root: Path, entities: int) -> Path:
    return root / "online" / str(entities)


def view_files(data_dir: Path, view: str) -> list[Path]:
    return sorted((data_dir / view).glob("*.parquet"))


def _meta_ok(data_dir: Path, entities: int) -> dict[str, Any] | None:
    try:
        meta = json.loads((data_dir / "_meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("generator_version") != GENERATOR_VERSION or meta.get("entities") != entities:
        return None
    if any(len(view_files(data_dir, v)) != N_FILES for v in VIEWS):
        return None
    # every row must still be inside the ttl, with a day to spare
    oldest_us = meta["anchor_us"] - SPAN_DAYS * DAY
    if time.time() * SECOND - oldest_us > (TTL_DAYS - 1) * DAY:
        return None
    return meta


def ensure_data(root: Path, entities: int) -> tuple[Path, dict[str, Any], float | None]:
    """The data folder for ``entities``, generated when missing or stale; (dir, meta, seconds spent generating)."""
    data_dir = data_dir_for(root, entities)
    meta = _meta_ok(data_dir, entities)
    if meta is not None:
        return data_dir, meta, None
    anchor_us = int(time.time()) * SECOND
    head = {"generator_version": GENERATOR_VERSION, "entities": entities, "anchor_us": anchor_us,
            "anchor": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(anchor_us // SECOND))}
    meta, seconds = h.generate_into(data_dir, head, lambda tmp: generate(tmp, entities, anchor_us))
    return data_dir, meta, seconds


def entity_ids(entities: int):
    """The entity ids (int64, sorted, distinct, spread over [0, 2**40)); deterministic."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids = np.unique(rng.integers(0, 2**40, int(entities * 1.01) + 16))
    while len(ids) < entities:  # practically never
        ids = np.unique(np.concatenate([ids, rng.integers(0, 2**40, entities)]))
    return np.sort(rng.choice(ids, entities, replace=False))


def unknown_ids(count: int) -> list[int]:
    """``count`` ids that are not entities (all entity ids are below 2**40), for the correctness check."""
    return list(range(2**40, 2**40 + count))


def generate(out: Path, entities: int, anchor_us: int) -> dict[str, Any]:
    """Write ``<out>/<view>/part-XX.parquet`` for both views; deterministic given ``anchor_us``.

    Per view, every entity has two rows: the newer one with event time in
    (anchor - 5 days, anchor], the older one 1 s to 5 days before it (so all
    lie in the 10 days before the anchor, the generation time). Every feature
    is null in ~1% of rows, independently; values are random (int64 in
    +-10**12, float32 and float64 normal, bool 30% true, 8-char strings from a
    vocabulary of 100k). The 2 x entities rows are shuffled and split into 8
    files, so the newer row of an entity is as often read before the older one
    as after it.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = entity_ids(entities)
    n = 2 * entities
    ts_type = pa.timestamp("us", tz="UTC")
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
    stats: dict[str, Any] = {"files_per_view": N_FILES, "rows_per_view": n}
    for v, (view, prefix) in enumerate(VIEWS.items()):
        rng = np.random.default_rng(SEED + 1 + v)
        newer = anchor_us - rng.integers(0, 5 * DAY, entities)
        older = newer - rng.integers(SECOND, 5 * DAY, entities)
        uid = np.concatenate([ids, ids])
        ts = np.concatenate([newer, older])

        def masked(values, pa_type, rng=rng):
            return pa.array(values, type=pa_type, mask=rng.random(n) < 0.01)

        vocab = alphabet[rng.integers(0, len(alphabet), (100_000, 8))].copy().view("S8").ravel()
        vocab_arr = pa.array(vocab.astype("U8"), type=pa.string())
        words = pa.DictionaryArray.from_arrays(
            pa.array(rng.integers(0, len(vocab), n).astype(np.int32), mask=rng.random(n) < 0.01), vocab_arr
        ).dictionary_decode()
        table = pa.table({
            "user_id": pa.array(uid, type=pa.int64()),
            "event_timestamp": pa.array(ts, type=pa.int64()).cast(ts_type),
            f"{prefix}_int": masked(rng.integers(-(10**12), 10**12, n), pa.int64()),
            f"{prefix}_f32": masked((rng.standard_normal(n) * 100).astype(np.float32), pa.float32()),
            f"{prefix}_f64": masked(rng.standard_normal(n) * 1e3, pa.float64()),
            f"{prefix}_bool": masked(rng.random(n) < 0.3, pa.bool_()),
            f"{prefix}_str": words,
        })
        table = table.take(pa.array(rng.permutation(n)))
        (out / view).mkdir(parents=True)
        bounds = np.linspace(0, n, N_FILES + 1).astype(np.int64)
        for i in range(N_FILES):
            pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), out / view / f"part-{i:02d}.parquet")
        stats[f"{view}_nulls"] = {c: table.column(c).null_count for c in table.column_names[2:]}
    return stats


def warm_page_cache(data_dir: Path) -> None:
    """Read every data file once, so that both materializations find them in the page cache."""
    for view in VIEWS:
        for f in view_files(data_dir, view):
            with open(f, "rb") as fh:
                while fh.read(1 << 22):
                    pass


# =========================================================================== Redis URL (the floor and the flushes)

def parse_redis_url(url: str) -> tuple[str, int, str]:
    """(redis-py URL without mlplat's parameters, db number, key prefix).

    Raises ValueError for a URL the benchmark may not use: not a single node,
    no explicit db, or a reserved db.
    """
    db = h.owned_redis_db(url, RESERVED_DBS, default=15)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    prefix = query.get("prefix", "mlplat:")
    plain = {k: v for k, v in query.items() if k not in MLPLAT_URL_PARAMS}
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(plain), "")), db, prefix


def redis_client(url: str):
    return h.redis_client(parse_redis_url(url)[0])


# =========================================================================== mlplat setup (workers)

def definitions(data_dir: Path):
    from datetime import timedelta

    import mlplat as mp

    user = mp.Entity("user", join_keys=["user_id"])
    views = []
    for view, p in VIEWS.items():
        views.append(mp.FeatureView(
            view, entities=[user], ttl=timedelta(days=TTL_DAYS),
            schema=[mp.Field(f"{p}_int", mp.Int64), mp.Field(f"{p}_f32", mp.Float32),
                    mp.Field(f"{p}_f64", mp.Float64), mp.Field(f"{p}_bool", mp.Bool), mp.Field(f"{p}_str", mp.String)],
            source=mp.ParquetSource(str(data_dir / view), timestamp_field="event_timestamp"),
        ))
    return [user, *views]


def sqlite_url(home: str) -> str:
    return f"sqlite:///{Path(home) / 'online.db'}"


def open_platform(home: str, online_store: str, data_dir: Path):
    """A Platform on ``home`` with both views applied (applying again keeps version 1)."""
    import mlplat as mp

    p = mp.Platform(home, online_store=online_store)
    p.features.apply(definitions(data_dir))
    return p


def worker_materialize(args: argparse.Namespace) -> dict[str, Any]:
    url = args.redis_url if args.worker == "materialize-redis" else sqlite_url(args.home)
    p = open_platform(args.home, url, Path(args.data_dir_resolved))
    region = h.TimedRegion()
    with region:
        results = p.features.materialize(progress=False)
    p.close()
    return {
        "store": "redis" if args.worker == "materialize-redis" else "sqlite",
        **region.as_dict(),
        "views": [{"view": r.view, "version": r.version, "rows": r.rows, "written": r.written, "seconds": r.seconds}
                  for r in results],
        "threads": p.settings.threads,
    }


# =========================================================================== correctness

def _same(a: Any, b: Any) -> bool:
    """Equal values of the same Python type (so True != 1, 1.0 != 1); None only equals None."""
    return a is None and b is None or (type(a) is type(b) and a == b)


def check_correctness(p, label: str, ids: list[int], unknown: list[int], problems: list[str]) -> dict[str, Any]:
    """Online values of ``ids + unknown`` must equal the historical values at now; appends to ``problems``."""
    from datetime import datetime, timezone

    import pyarrow as pa

    all_ids = ids + unknown
    now = datetime.now(timezone.utc)
    entity_table = pa.table({"user_id": pa.array(all_ids, pa.int64()),
                             "event_timestamp": pa.array([now] * len(all_ids), pa.timestamp("us", "UTC"))})
    hist = p.features.get_historical_features(entity_table, REFS)
    online = p.features.get_online_features(REFS, [{"user_id": i} for i in all_ids])
    bad = []
    if online.get("user_id") != all_ids:
        bad.append(f"{label}: user_id column differs from the ids asked for")
    non_null = 0
    for name in OUT_NAMES:
        want = hist.column(name).to_pylist()
        got = online.get(name)
        if got is None or len(got) != len(want):
            bad.append(f"{label}: feature {name}: {0 if got is None else len(got)} values, want {len(want)}")
            continue
        for i, (g, w) in enumerate(zip(got, want)):
            if not _same(g, w):
                bad.append(f"{label}: user_id {all_ids[i]} feature {name}: online {g!r} ({type(g).__name__}), "
                           f"historical {w!r} ({type(w).__name__})")
        non_null += sum(v is not None for v in got[: len(ids)])
        if any(v is not None for v in got[len(ids):]):
            bad.append(f"{label}: feature {name}: an unknown entity got a value")
    share = non_null / max(1, len(ids) * len(OUT_NAMES))
    if share < 0.9:  # ~1% nulls per feature: far fewer values means nothing was materialized
        bad.append(f"{label}: only {share:.1%} of the values are non-null (expected ~99%)")
    problems.extend(bad[:20] + ([f"{label}: ... {len(bad) - 20} more mismatches"] if len(bad) > 20 else []))
    return {"store": label, "entities": len(ids), "unknown": len(unknown), "non_null_share": share,
            "mismatches": len(bad)}


# =========================================================================== latency

def worker_latency(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from mlplat._native import _codec

    data_dir = Path(args.data_dir_resolved)
    _, _, prefix = parse_redis_url(args.redis_url)
    p_redis = open_platform(args.home, args.redis_url, data_dir)
    p_sqlite = open_platform(args.home, sqlite_url(args.home), data_dir)
    tags = [f"{v.name}@{v.version}" for v in (p_redis.features.get_feature_view(name) for name in VIEWS)]
    r = redis_client(args.redis_url)
    ids_all = entity_ids(args.entities)
    n_entities = len(ids_all)

    # ---------------- correctness, before anything is timed
    rng = np.random.default_rng(SEED + 100)
    sample = ids_all[rng.choice(n_entities, min(CHECK_ENTITIES, n_entities), replace=False)].tolist()
    unknown = unknown_ids(CHECK_UNKNOWN)
    problems: list[str] = []
    checks = [check_correctness(p_redis, "redis", sample, unknown, problems),
              check_correctness(p_sqlite, "sqlite", sample, unknown, problems)]
    # the floor reads the keys mlplat wrote: every one must exist
    ekeys = _codec.entity_keys([sample], [0])
    floor_keys = [k for tag in tags for k in _codec.redis_keys(prefix, tag, ekeys)]
    missing = sum(v is None for v in r.mget(floor_keys))
    if missing:
        problems.append(f"floor: {missing} of {len(floor_keys)} Redis keys built with _codec.redis_keys do not exist")
    if problems:
        return {"ok": False, "problems": problems, "checks": checks}

    # ---------------- engines
    get_redis = p_redis.features.get_online_features
    get_sqlite = p_sqlite.features.get_online_features
    refs = list(REFS)

    def mlplat_redis(req):
        return get_redis(refs, req[0])

    def mlplat_sqlite(req):
        return get_sqlite(refs, req[0])

    def pipeline(req):
        pipe = r.pipeline(transaction=False)
        for key in req[1]:
            pipe.get(key)
        return pipe.execute()

    def mget(req):
        return r.mget(req[1])

    funcs = {"mlplat redis": mlplat_redis, "redis pipeline": pipeline, "redis MGET": mget,
             "mlplat sqlite": mlplat_sqlite}
    engines = [e for e in ENGINES if e in args.engine_list]

    def request(batch: int, rng) -> tuple[list[dict], list[bytes]]:
        uids = ids_all[rng.choice(n_entities, batch, replace=False)].tolist()
        ek = _codec.entity_keys([uids], [0])
        keys = [k for tag in tags for k in _codec.redis_keys(prefix, tag, ek)]
        return [{"user_id": u} for u in uids], keys

    def check(engine: str, out: Any, batch: int) -> None:
        if engine.startswith("mlplat"):
            if len(out["a_int"]) != batch:
                raise AssertionError(f"{engine}: {len(out['a_int'])} values for {batch} entities")
        elif len(out) != 2 * batch or any(v is None for v in out):
            raise AssertionError(f"{engine}: a key was missing or a reply was short")

    perf = time.perf_counter_ns
    budget_ns = int(args.cell_budget * 1e9)

    def block(batch: int, group: list[str], n: int, warm: int, rng) -> None:
        """``n`` timed requests (after ``warm`` untimed ones), the engines of ``group`` round robin per request."""
        samples = {e: np.empty(n, dtype=np.int64) for e in group}
        count = dict.fromkeys(group, 0)
        spent = dict.fromkeys(group, 0)  # measured ns per engine in this block (the budget)
        active = list(group)
        gc.collect()
        t_block = time.perf_counter()
        for i in range(-warm, n):
            if not active:
                break
            req = request(batch, rng)
            k = i % len(active)
            for engine in active[k:] + active[:k]:  # rotate the order every request
                fn = funcs[engine]
                t0 = perf()
                out = fn(req)
                dt = perf() - t0
                if i >= 0:
                    samples[engine][count[engine]] = dt
                    count[engine] += 1
                    spent[engine] += dt
                check(engine, out, batch)
                del out
            if i >= 0:  # an engine over its time budget leaves the rotation (kept >= 10 samples; never the floor)
                active = [e for e in active if spent[e] < budget_ns or count[e] < 10 or e == FLOOR]
        block_s = time.perf_counter() - t_block
        for engine in group:
            got = samples[engine][: count[engine]]
            p50, p99, p999 = h.latency_percentiles(got)
            cells.append({"engine": engine, "batch": batch, "samples": int(count[engine]), "planned": n,
                          "warmup": warm, "p50_ms": p50, "p99_ms": p99, "p999_ms": p999,
                          "mean_ms": float(got.mean()) / 1e6 if len(got) else float("nan"),
                          "max_ms": float(got.max()) / 1e6 if len(got) else float("nan"),
                          "block_s": block_s})
        cut = [f"{e} {count[e]}" for e in group if count[e] < n]
        print(f"  {batch:>4} entities/request, {' / '.join(group)}: {n} samples in {block_s:.1f} s"
              + (f" (over the {args.cell_budget:g} s budget, stopped early: {', '.join(cut)})" if cut else ""),
              file=sys.stderr, flush=True)

    rng = np.random.default_rng(SEED + 200)
    cells: list[dict[str, Any]] = []
    batches = [b for b in BATCHES if b <= n_entities and b in args.batch_list]
    # Redis engines interleaved with each other; SQLite alone (its reads would disturb theirs: caches, CPU time)
    groups = [[e for e in engines if e != "mlplat sqlite"], [e for e in engines if e == "mlplat sqlite"]]
    for batch in batches:
        n = max(args.min_samples, round(SAMPLES[batch] * args.scale))
        warm = max(10, min(500, n // 10))
        for group in groups:
            if group:
                block(batch, group, n, warm if group != ["mlplat sqlite"] else min(warm, 20), rng)

    profiles = {}
    if args.profile:
        profiles = profile_mlplat(mlplat_redis, request, batches, args.scale)
    p_redis.close()
    p_sqlite.close()
    r.close()
    return {"ok": True, "checks": checks, "cells": cells, "profiles": profiles, "tags": tags,
            "gc_enabled": gc.isenabled()}


def profile_mlplat(fn, request, batches: list[int], scale: float) -> dict[str, str]:
    """cProfile of mlplat's Redis reads per batch size: the top functions by own time, as text."""
    import cProfile
    import io
    import pstats

    import numpy as np

    rng = np.random.default_rng(SEED + 300)
    out = {}
    for batch in batches:
        n = max(50, round({1: 5000, 10: 3000, 100: 1000, 1000: 200}[batch] * max(scale, 0.1)))
        reqs = [request(batch, rng) for _ in range(n)]
        prof = cProfile.Profile()
        prof.enable()
        for req in reqs:
            fn(req)
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(14)
        text = buf.getvalue()
        out[str(batch)] = (f"{n} calls of get_online_features with {batch} entities, top functions by own time\n"
                           + text[text.find("   ncalls"):].rstrip())
    return out


# =========================================================================== parent

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=1_000_000, help="number of entities (default 1,000,000)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the sample counts (20k/10k/3k/1k for 1/10/100/1000 entities) by this")
    ap.add_argument("--smoke", action="store_true", help="CI size: --entities 20000 --scale 0.02")
    ap.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                    help=f"Redis db the benchmark owns and FLUSHDBs (default {DEFAULT_REDIS_URL}; never db 13)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)),
                    help="entities per request (subset of 1,10,100,1000)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset of: " + ", ".join(ENGINES) + f" (the floor, {FLOOR!r}, is needed "
                         "for the ratios)")
    ap.add_argument("--min-samples", type=int, default=20, help="at least this many samples per cell (default 20)")
    ap.add_argument("--cell-budget", type=float, default=30.0,
                    help="seconds of measured time per engine and batch size; an engine past it stops early "
                         "(at least 10 samples; the floor never stops) (default 30)")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    ap.add_argument("--json", default=None, help="write the raw reports to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, cProfile mlplat's Redis reads per batch size and print the top functions")
    ap.add_argument("--data-dir", default=None, help="data root instead of benchmarks/data (files go to "
                                                      "<root>/online/<entities>/)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a worker is killed")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["materialize-redis", "materialize-sqlite", "latency"], help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir-resolved", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.entities, args.scale = 20_000, 0.02
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    return args


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--entities", str(args.entities), "--scale", str(args.scale), "--redis-url", args.redis_url,
            "--batches", args.batches, "--engines", args.engines, "--min-samples", str(args.min_samples),
            "--cell-budget", str(args.cell_budget)] + \
        (["--profile"] if args.profile else [])


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == "latency":
            report = worker_latency(args)
        else:
            report = worker_materialize(args)
        h.write_report(args.result_file, report)
        return 0

    bad = [e for e in args.engine_list if e not in ENGINES] + [str(b) for b in args.batch_list if b not in BATCHES]
    if bad or not args.engine_list or not args.batch_list or args.entities < 1 or args.scale <= 0:
        print(f"bad options: {bad or 'empty --engines/--batches, --entities < 1 or --scale <= 0'}", file=sys.stderr)
        return 2
    try:
        _, db, prefix = parse_redis_url(args.redis_url)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        r = redis_client(args.redis_url)
        r.ping()
        redis_version = r.info("server").get("redis_version", "?")
    except Exception as exc:  # noqa: BLE001  (any failure to reach Redis ends the run)
        print(f"cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 2

    root = Path(args.data_dir).resolve() if args.data_dir else HERE / "data"
    data_dir, meta, gen_s = ensure_data(root, args.entities)
    if gen_s is not None:
        print(f"generated data for {args.entities:,} entities in {gen_s:.1f} s -> {data_dir}", file=sys.stderr)
    warm_page_cache(data_dir)
    fingerprint = h.package_fingerprint("mlplat")

    home = tempfile.mkdtemp(prefix="mlplat-online-bench-")
    common = ["--home", home, "--data-dir-resolved", str(data_dir)] + _forward(args)
    reports: dict[str, dict[str, Any]] = {}
    flushed = 0
    try:
        flushed = r.dbsize()
        r.flushdb()
        for worker in ("materialize-redis", "materialize-sqlite"):
            print(f"  {worker} ...", file=sys.stderr, flush=True)
            reports[worker] = h.run_worker(__file__, ["--worker", worker, *common], timeout=args.timeout)
            print(f"  {worker}: {reports[worker]['wall_s']:.2f} s", file=sys.stderr, flush=True)
        keys_in_db = r.dbsize()
        print("  latency ...", file=sys.stderr, flush=True)
        reports["latency"] = h.run_worker(__file__, ["--worker", "latency", *common], timeout=args.timeout)
    except h.WorkerError as exc:
        print(f"\n!!! a worker failed:\n{exc}", file=sys.stderr)
        return 2
    finally:
        h.release_redis_db(r, db)
        shutil.rmtree(home, ignore_errors=True)
    fingerprint_after = h.package_fingerprint("mlplat")

    lat = reports["latency"]
    if not lat["ok"]:
        bar = "!" * 78
        print(f"{bar}\nCORRECTNESS CHECK FAILED: online values differ from get_historical_features at now\n"
              + "\n".join(lat["problems"]) + f"\n{bar}", file=sys.stderr)
        return 1

    # ---------------- header
    machine = h.machine_info()
    versions = h.library_versions(["mlplat", "numpy", "pyarrow", "redis", "hiredis"])
    versions["redis-server"] = redis_version
    sqlite_version = __import__("sqlite3").sqlite_version
    versions["sqlite"] = sqlite_version
    n_ent = args.entities
    header = [
        f"online feature store: {n_ent:,} entities, 2 views x 5 features (int64, float32, float64, bool, "
        f"8-char string; ~1% nulls), 2 rows per entity per view in {N_FILES} Parquet files per view, ttl {TTL_DAYS} d",
        f"Redis: {args.redis_url} (db {db}, key prefix {prefix!r}; flushed at start ({flushed:,} keys) and end); "
        f"keys after materialization: {keys_in_db:,} (expected {2 * n_ent:,})",
        f"latency: {', '.join(map(str, sorted({c['batch'] for c in lat['cells']})))}"
        f" entities/request x all 10 features, distinct uniform random ids; Redis engines interleaved round robin "
        f"per request, SQLite in its own block; scale {args.scale:g}; GC enabled; one client, sequential requests; "
        f"client and Redis server on the same machine",
        f"correctness: {min(CHECK_ENTITIES, n_ent)} random + {CHECK_UNKNOWN} unknown "
        f"entities, online == get_historical_features at now, Redis and SQLite: OK",
        h.machine_line(machine),
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f" (mlplat source fingerprint {fingerprint})",
    ]
    if gen_s is not None:
        header.append(f"data generated in this run: {gen_s:.1f} s")

    # ---------------- materialization table
    mat_rows = []
    mat_total: dict[str, float] = {}
    for key, label in (("materialize-redis", "redis"), ("materialize-sqlite", "sqlite")):
        rep = reports[key]
        records = sum(v["rows"] for v in rep["views"])
        written = sum(v["written"] for v in rep["views"])
        source_rows = sum(meta["rows_per_view"] for _ in rep["views"])
        wall = rep["wall_s"]
        mat_total[label] = wall
        mat_rows.append([label, len(rep["views"]), f"{records:,}", f"{written:,}", f"{source_rows:,}", f"{wall:.2f}",
                         " + ".join(f"{v['seconds']:.2f}" for v in rep["views"]), f"{records / wall:,.0f}",
                         f"{source_rows / wall:,.0f}", f"{rep['peak_above_baseline_mb']:.0f}"])
    mat_headers = ["online store", "views", "records", "written", "source rows", "total s", "per view s",
                   "records/s", "source rows/s", "peak above baseline MB"]
    mat_align = ["l"] + ["r"] * (len(mat_headers) - 1)

    # ---------------- latency tables
    cells = {(c["engine"], c["batch"]): c for c in lat["cells"]}

    def ratio(c: dict[str, Any], engine: str) -> str:
        ref = cells.get((engine, c["batch"]))
        if not ref or c["engine"] == engine or not ref["p99_ms"] > 0:
            return "-"
        return f"{c['p99_ms'] / ref['p99_ms']:.2f}x"

    lat_rows: dict[str, list] = {"redis": [], "sqlite": []}
    for (engine, batch), c in cells.items():
        samples = f"{c['samples']:,}" + ("*" if c["samples"] < c.get("planned", c["samples"]) else "")
        row = [engine, batch, samples, _ms(c["p50_ms"]), _ms(c["p99_ms"]), _ms(c["p999_ms"]), _ms(c["mean_ms"])]
        if engine == "mlplat sqlite":
            lat_rows["sqlite"].append(row)
        else:
            lat_rows["redis"].append(row + [ratio(c, FLOOR), ratio(c, "redis MGET")])
    order = {e: i for i, e in enumerate(ENGINES)}
    for rows in lat_rows.values():
        rows.sort(key=lambda row: (row[1], order[row[0]]))
    lat_headers = ["engine", "entities", "samples", "p50 ms", "p99 ms", "p99.9 ms", "mean ms"]
    redis_headers = lat_headers + ["p99 / pipeline p99", "p99 / MGET p99"]

    # ---------------- targets
    target_rows = []
    for batch in (100, 1):
        c = cells.get(("mlplat redis", batch))
        floor = cells.get((FLOOR, batch))
        limit = TARGET_P99_MS[batch]
        if c:
            target_rows.append([f"p99, {batch} entit{'y' if batch == 1 else 'ies'} x 2 views x 5 features",
                                f"{c['p99_ms']:.3f} ms", f"<= {limit} ms", _verdict(c["p99_ms"] <= limit)])
        if c and floor:
            ratio = c["p99_ms"] / floor["p99_ms"]
            target_rows.append([f"p99 vs raw pipeline floor p99, {batch} entit{'y' if batch == 1 else 'ies'}",
                                f"{ratio:.2f}x ({c['p99_ms']:.3f} / {floor['p99_ms']:.3f} ms)",
                                f"<= {TARGET_FLOOR_RATIO}x", _verdict(ratio <= TARGET_FLOOR_RATIO)])
    if n_ent >= TARGET_MATERIALIZE_ENTITIES:
        scaled = mat_total["redis"] * TARGET_MATERIALIZE_ENTITIES / n_ent
        target_rows.append([f"materialize {TARGET_MATERIALIZE_ENTITIES:,} entities x 2 views into Redis",
                            f"{mat_total['redis']:.2f} s" + ("" if n_ent == TARGET_MATERIALIZE_ENTITIES
                                                            else f" ({scaled:.2f} s per 1M)"),
                            f"< {TARGET_MATERIALIZE_S:.0f} s", _verdict(scaled < TARGET_MATERIALIZE_S)])
    else:
        target_rows.append([f"materialize {TARGET_MATERIALIZE_ENTITIES:,} entities x 2 views into Redis",
                            f"{mat_total['redis']:.2f} s for {n_ent:,}", f"< {TARGET_MATERIALIZE_S:.0f} s",
                            _verdict(None) + f" (needs --entities >= {TARGET_MATERIALIZE_ENTITIES:,})"])
    target_headers = ["target", "measured", "limit", "verdict"]
    target_align = ["l", "l", "l", "l"]

    sections = [
        ("Materialization (p.features.materialize(), fresh process, Parquet -> online store)",
         mat_headers, mat_rows, mat_align),
        ("Latency, Redis online store (ms per request; the floor is 'redis pipeline'; engines interleaved)",
         redis_headers, lat_rows["redis"], ["l"] + ["r"] * (len(redis_headers) - 1)),
        ("Latency, SQLite online store (mlplat only, measured in its own block after the Redis engines)",
         lat_headers, lat_rows["sqlite"], ["l"] + ["r"] * (len(lat_headers) - 1)),
        ("Issue targets", target_headers, target_rows, target_align),
    ]
    early = [c for c in lat["cells"] if c["samples"] < c.get("planned", c["samples"])]
    notes = [f"* stopped early: over the {args.cell_budget:g} s measured-time budget per engine and batch size "
             "(--cell-budget); the percentiles cover the samples taken"] if early else []
    h.print_report(header, sections, notes, markdown=args.markdown)
    for text in lat.get("profiles", {}).values():
        print(f"\ncProfile, mlplat redis, {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"entities": n_ent, "scale": args.scale, "meta": meta, "machine": machine, "versions": versions,
                       "mlplat_fingerprint": [fingerprint, fingerprint_after], "generate_seconds": gen_s,
                       "keys_in_db": keys_in_db, "reports": reports}, f, indent=1)
    if fingerprint_after != fingerprint:
        print(f"\nWARNING: mlplat's files changed during the run (fingerprint {fingerprint} -> {fingerprint_after}); "
              "rerun.", file=sys.stderr)
    if keys_in_db != 2 * n_ent:
        print(f"\nnote: {keys_in_db:,} keys in the db after materialization, expected {2 * n_ent:,}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
