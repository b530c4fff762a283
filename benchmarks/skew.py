#!/usr/bin/env python
"""Training-serving skew benchmark: ``p.monitoring.skew`` over served-feature logs of 10k, 100k and 1M rows.

The skew check reads the served-feature log that ``p.serving.predict`` wrote,
recomputes every logged feature value with ONE batched offline point-in-time
retrieval (``p.features.get_historical_features`` at the logged request times,
with the pinned definition versions) and compares them per feature. This
benchmark shows what that costs as the log grows, against recomputing one
served row at a time, and checks the answer against a skew planted on purpose.

Run from the repository root::

    python benchmarks/skew.py                       # 200k users x 30 days; logs of 10k, 100k, 1M rows; 5 repeats
    python benchmarks/skew.py --smoke               # CI: tiny sizes, well under 60 s
    python benchmarks/skew.py --markdown --json skew.json --profile
    python benchmarks/skew.py --data-dir /tmp/skew-data   # keep (and reuse) the built world

What it builds (setup, one worker process, not timed except for information;
in a temporary folder removed at the end, or in ``--data-dir``, kept and
reused when its ``manifest.json`` matches the options):

* a Parquet source for feature view ``user_profile`` (entity ``user``, join
  key ``user_id``, ttl 2 days): ``--users`` users (200,000) x ``--days`` daily
  snapshots (30), four numeric features ``score`` (float64, normal),
  ``visits`` (int64, Poisson), ``spend`` (float64, log-normal, cents) and
  ``tenure_days`` (int64); ten files of consecutive days, time ordered, rows
  sorted by (event_timestamp, user_id), row groups of ``--row-group`` rows
  (65,536), so a single user's lookup can skip row groups by key statistics;
* a model trained on it: a point-in-time training set of 50,000 labelled
  requests (``get_historical_features``), a torch ``Linear(4, 1) + Sigmoid``
  fitted for 200 Adam steps, logged with ``run.log_input(train,
  feature_refs=...)`` and ``run.log_model(columns=FEATURES)``; registered once
  per log size (``scorer-<rows>``, all from the same run), each promoted to
  production with an approval;
* ``p.features.materialize()`` into the embedded SQLite online store;
* the planted skew: online-only pushes (``p.features.push``) of changed values
  for a seeded random 6% of the users in ``score`` (+10.0) and an independent
  2% in ``visits`` (+100); ``spend`` and ``tenure_days`` are never changed;
* the served log: ``p.serving.predict("scorer-<rows>", {"user_id": [...]})``
  on the local backend in calls of ``--batch`` (10,000) uniformly random
  users, until the model's log holds ``rows`` rows (sample rate 1.0).

So the right answer is known exactly: for ``score`` (and ``visits``) the
mismatches are the served rows of the users planted in that feature, no
other; ``spend`` and ``tenure_days`` have none; ``score`` (6% > the 5%
threshold) is skewed, ``visits`` (2%) is not.

What is timed (each measurement in a fresh worker process, the OS page cache
warm; ``--repeats`` runs, sizes interleaved; the tables show medians):

1. mlplat: ``p.monitoring.skew("scorer-<rows>")`` with the defaults
   (tolerance 1%, threshold 5%, every logged row, at most 1,000 mismatches per feature
   listed). One call per process, from the call to the returned report:
   flushing and reading the log (``ServedLog.read``: a pyarrow dataset of the
   model's files, sorted by request time), the one batched retrieval, the
   vectorized comparison and the list of mismatches. The breakdown is measured
   inside those same calls by wrapping, on the instances, ``served_log.read``
   and ``served_log.groups`` where it exists ("read log"),
   ``features.get_historical_features`` ("PIT retrieval") and
   ``mlplat.monitoring.skew._mismatched`` ("compare"); "other" is the rest
   (the log's refs, the entity table, resolving refs, building the listed
   ``Mismatch`` objects). Peak RSS is the process's high-water mark; "above
   baseline" subtracts the RSS right before the call.
2. Peer (a), row at a time: for ``--row-sample`` served rows (200) of the
   largest log, ``get_historical_features`` of that one row (a one-row entity
   table at its request time, same pinned refs) and a Python comparison of
   its four values; the mean per row times the log size is shown as
   EXTRAPOLATED seconds (nobody waits 1M x that). Its values are checked to
   equal one batched retrieval of the same rows.
3. Peer (b), pandas: read the log (pyarrow) and the source rows in the ttl
   window of the logged times (``pyarrow.parquet.read_table`` with an
   ``event_timestamp >=`` filter: the same pruning mlplat gets), to pandas,
   ``pd.merge_asof(by="user_id", direction="backward", tolerance=ttl)``, then
   the same vectorized comparison. Timed end to end, fresh process per run.

Correctness, every run (exit status 1 when wrong): the log holds exactly the
rows served; per feature, the check's mismatch count equals the planted served
rows exactly; unplanted features have 0; ``skewed`` is exactly ``["score"]``;
every listed mismatch is a planted user of its feature with the recomputed
value equal to that user's last snapshot and the served value the changed
one; and once per size (first repeat) the same check function
(``mlplat.monitoring.skew.skew_check``) run without the listing cap must name
exactly the planted users that were served, per feature. The pandas peer's
counts and users must agree too.

Exit status: 0 when everything ran and every check passed; 1 on a wrong
answer; 2 on an error (a worker crashed or timed out, bad options).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402

GENERATOR_VERSION = 1
SEED = 20240615
VIEW = "user_profile"
FEATURES = ["score", "visits", "spend", "tenure_days"]
REFS = [f"{VIEW}:{f}" for f in FEATURES]
TTL_DAYS = 2
N_FILES = 10
PLANTED = {"score": 0.06, "visits": 0.02}  # share of users whose online value is changed
DELTA = {"score": 10.0, "visits": 100}  # what the push adds
TOLERANCE = 0.01  # p.monitoring.skew's defaults, repeated for the reference computations
THRESHOLD = 0.05
MAX_LISTED = 1_000  # skew_check's default max_mismatches, per feature
TRAIN_ROWS = 50_000

FULL = {"users": 200_000, "days": 30, "sizes": "10000,100000,1000000", "batch": 10_000, "repeats": 5,
        "row_sample": 200, "row_group": 65_536}
SMOKE = {"users": 5_000, "days": 5, "sizes": "500,2000,10000", "batch": 1_000, "repeats": 1,
         "row_sample": 20, "row_group": 4_096}


def model_name(rows: int) -> str:
    return f"scorer-{rows}"


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {"generator": GENERATOR_VERSION, "users": args.users, "days": args.days, "sizes": args.size_list,
            "batch": args.batch, "row_group": args.row_group, "planted": PLANTED, "delta": DELTA,
            "ttl_days": TTL_DAYS, "seed": SEED}


def _load_manifest(data: str) -> dict[str, Any]:
    with open(os.path.join(data, "manifest.json")) as f:
        return json.load(f)


# =========================================================================== worker: setup

def worker_setup(args: argparse.Namespace) -> dict[str, Any]:
    """Source data, definitions, trained model(s) in production, materialization, planted skew, served logs."""
    from datetime import datetime, timedelta, timezone

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import mlplat as mp

    h.limit_pyarrow_threads(args.threads)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if data.exists():
        shutil.rmtree(data)
    (data / "source").mkdir(parents=True)
    timings: list[list[Any]] = []  # [what, seconds] in order (reports are written with sorted keys)
    rng = np.random.default_rng(SEED)
    n_users, n_days = args.users, args.days
    now = datetime.now(timezone.utc).replace(microsecond=0)
    last = now - timedelta(hours=1)  # the newest snapshot; requests come after `now`
    first = last - timedelta(days=n_days - 1)

    # ---- source: daily snapshots
    t0 = time.perf_counter()
    users = np.arange(n_users, dtype=np.int64)
    base_score = rng.normal(0.0, 1.0, n_users)
    base_rate = rng.gamma(2.0, 2.5, n_users)
    base_spend = rng.normal(8.0, 1.0, n_users)
    tenure0 = rng.integers(0, 2000, n_users)
    last_values: dict[str, Any] = {}
    rows_written = 0
    day_groups = np.array_split(np.arange(n_days), min(N_FILES, n_days))
    for i, days in enumerate(day_groups):
        parts = []
        for d in days:
            at = first + timedelta(days=int(d))
            values = {"score": base_score + rng.normal(0.0, 0.3, n_users),
                      "visits": rng.poisson(base_rate).astype(np.int64),
                      "spend": np.round(np.exp(base_spend + rng.normal(0.0, 0.5, n_users))),
                      "tenure_days": (tenure0 + d).astype(np.int64)}
            parts.append(pa.table({"user_id": users, "event_timestamp": pa.array(
                np.full(n_users, int(at.timestamp() * 1_000_000)), pa.timestamp("us", "UTC")), **values}))
            if d == n_days - 1:
                last_values = values
        table = pa.concat_tables(parts)
        pq.write_table(table, data / "source" / f"part-{i:03d}.parquet", row_group_size=args.row_group)
        rows_written += table.num_rows
    np.savez(data / "last_values.npz", **last_values)
    timings.append(["generate source", time.perf_counter() - t0])

    # ---- definitions, training, registry
    t0 = time.perf_counter()
    p = mp.Platform(data / "home")
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView(VIEW, entities=[user], ttl=timedelta(days=TTL_DAYS),
                          schema=[mp.Field("score", mp.Float64), mp.Field("visits", mp.Int64),
                                  mp.Field("spend", mp.Float64), mp.Field("tenure_days", mp.Int64)],
                          source=mp.ParquetSource(data / "source"))
    p.features.apply([user, view])
    span_us = int((now - first).total_seconds() * 1_000_000)
    times = int(first.timestamp() * 1_000_000) + rng.integers(0, span_us, TRAIN_ROWS)
    entity = pa.table({"user_id": rng.integers(0, n_users, TRAIN_ROWS),
                       "event_timestamp": pa.array(np.sort(times), pa.timestamp("us", "UTC"))})
    train = p.features.get_historical_features(entity, REFS)
    x = np.column_stack([train.column(f).cast(pa.float64()).fill_null(0.0).to_numpy() for f in FEATURES])
    label = (x[:, 0] + 0.1 * x[:, 1] + rng.normal(0.0, 0.5, len(x)) > 1.0).astype(np.float32)
    train = train.append_column("label", pa.array(label))
    scale = np.maximum(x.std(axis=0), 1e-9)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.zero_()
    xt = torch.from_numpy((x / scale).astype(np.float32))
    yt = torch.from_numpy(label).reshape(-1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    with torch.no_grad():  # trained on standardized inputs: fold the scaling into the layer for raw ones
        model[0].weight.div_(torch.from_numpy(scale.astype(np.float32)))
    with p.runs.start("skew-bench", params={"users": n_users, "days": n_days}) as run:
        run.log_input(train, "train", feature_refs=REFS)
        run.log_metric("train_bce", float(loss))
        run.log_model(model, "model", example_input=torch.zeros(2, 4), columns=FEATURES)
    for rows in args.size_list:
        name = model_name(rows)
        p.models.register(name, run.id, registered_by="bench")
        p.models.promote(name, 1, "production", approved_by="bench-approver")
    timings.append(["apply + train + register", time.perf_counter() - t0])

    t0 = time.perf_counter()
    materialized = p.features.materialize(end_date=now, progress=False)
    timings.append(["materialize", time.perf_counter() - t0])

    # ---- the planted skew: online-only pushes
    t0 = time.perf_counter()
    planted = {f: np.sort(rng.choice(n_users, int(round(share * n_users)), replace=False))
               for f, share in PLANTED.items()}
    changed = np.union1d(*planted.values()) if len(planted) > 1 else next(iter(planted.values()))
    cur = p.features.get_online_features(REFS, {"user_id": changed.tolist()}).to_arrow()
    cols = {"user_id": cur.column("user_id"),
            "event_timestamp": pa.array([datetime.now(timezone.utc)] * len(changed), pa.timestamp("us", "UTC"))}
    for f in FEATURES:
        col = cur.column(f)
        if f in planted:
            hit = np.isin(changed, planted[f])
            vals = col.to_numpy()
            col = pa.array(np.where(hit, vals + DELTA[f], vals), col.type)
        cols[f] = col
    pushed = p.features.push(VIEW, pa.table(cols))
    timings.append(["push planted", time.perf_counter() - t0])

    # ---- serving: fill each model's log
    serve: dict[str, Any] = {}
    for rows in args.size_list:
        name = model_name(rows)
        served = rng.integers(0, n_users, rows)
        np.save(data / f"served-{rows}.npy", served)
        t0 = time.perf_counter()
        for lo in range(0, rows, args.batch):
            p.serving.predict(name, {"user_id": served[lo:lo + args.batch].tolist()})
        p.serving.served_log.flush()
        dt = time.perf_counter() - t0
        serve[str(rows)] = {"seconds": dt, "rows_per_s": rows / dt, "calls": math.ceil(rows / args.batch)}
        timings.append([f"serve {rows:,} rows", dt])
    p.close()
    files = {str(rows): len(list((data / "home" / "served" / model_name(rows)).glob("*.parquet")))
             for rows in args.size_list}
    manifest = {"config": _config(args), "now": now.isoformat(), "first_snapshot": first.isoformat(),
                "last_snapshot": last.isoformat(), "source_rows": rows_written, "source_files": len(day_groups),
                "planted": {f: v.tolist() for f, v in planted.items()}, "pushed": pushed,
                "materialized": sum(m.rows for m in materialized), "timings": timings, "serve": serve,
                "log_files": files, "train_bce": float(loss)}
    with open(data / "manifest.json", "w") as f:
        json.dump(manifest, f)
    return {k: v for k, v in manifest.items() if k != "planted"}


# =========================================================================== expected answers

def expected(data: str, man: dict[str, Any], rows: int) -> dict[str, Any]:
    """Per feature: the served rows that must mismatch (count) and the users behind them (set)."""
    import numpy as np

    served = np.load(os.path.join(data, f"served-{rows}.npy"))
    out = {}
    for f in FEATURES:
        planted = np.asarray(man["planted"].get(f, []), dtype=np.int64)
        hit = np.isin(served, planted)
        out[f] = {"count": int(hit.sum()), "users": set(np.unique(served[hit]).tolist())}
    return out


def check_report(report, data: str, man: dict[str, Any], rows: int, *, capped: bool) -> list[str]:
    """Problems with a SkewReport against the planted answer (empty when right)."""
    import numpy as np

    want = expected(data, man, rows)
    with np.load(os.path.join(data, "last_values.npz")) as npz:  # an NpzFile re-reads an array at every [f]
        last = {f: npz[f] for f in npz.files}
    planted = {f: set(v) for f, v in man["planted"].items()}
    problems = []
    where = f"{rows:,} rows{' (listing capped)' if capped else ' (uncapped)'}"
    if report.rows != rows:
        problems.append(f"{where}: the report compared {report.rows:,} rows, {rows:,} were served")
    if set(report.features) != set(FEATURES):
        problems.append(f"{where}: features {sorted(report.features)} != {sorted(FEATURES)}")
        return problems
    for f in FEATURES:
        got = report.features[f]
        if got.mismatched != want[f]["count"] or got.compared != rows:
            problems.append(f"{where}: {f}: {got.mismatched:,} of {got.compared:,} mismatched, expected "
                            f"{want[f]['count']:,} of {rows:,}")
    want_skewed = [f for f in FEATURES if want[f]["count"] / rows > THRESHOLD]
    if report.skewed != want_skewed:
        problems.append(f"{where}: skewed {report.skewed} != {want_skewed}")
    total = sum(min(w["count"], MAX_LISTED) if capped else w["count"] for w in want.values())
    if len(report.mismatches) != total:
        problems.append(f"{where}: {len(report.mismatches):,} mismatches listed, expected {total:,}")
    listed: dict[str, set] = {f: set() for f in FEATURES}
    bad_values, unplanted = 0, []
    for m in report.mismatches:
        u = m.entity.get("user_id")
        listed.setdefault(m.feature, set()).add(u)
        if m.feature not in planted or u not in planted[m.feature]:
            unplanted.append(m)
            continue
        rec = float(last[m.feature][u])
        if m.recomputed is None or m.served is None or not math.isclose(m.recomputed, rec, rel_tol=1e-12) \
                or not math.isclose(m.served, rec + DELTA[m.feature], rel_tol=1e-12, abs_tol=1e-9):
            bad_values += 1
    if unplanted:
        problems.append(f"{where}: {len(unplanted)} listed mismatches of unplanted users/features, e.g. {unplanted[0]}")
    if bad_values:
        problems.append(f"{where}: {bad_values} listed mismatches with other served/recomputed values than planted")
    if not capped:
        for f in FEATURES:
            if listed[f] != want[f]["users"]:
                miss, extra = want[f]["users"] - listed[f], listed[f] - want[f]["users"]
                problems.append(f"{where}: {f}: mismatching users differ from the planted served users "
                                f"({len(miss)} missing, e.g. {sorted(miss)[:3]}; {len(extra)} extra, "
                                f"e.g. {sorted(extra)[:3]})")
    return problems


# =========================================================================== worker: mlplat skew

def worker_skew(args: argparse.Namespace) -> dict[str, Any]:
    h.limit_pyarrow_threads(args.threads)
    import pyarrow as pa

    import mlplat as mp
    import mlplat.monitoring.skew as skew_mod

    man = _load_manifest(args.data)
    rows = args.rows
    name = model_name(rows)
    # pyarrow's first compute call in a process imports pandas when it is installed (0.2 s to 0.6 s): a
    # one-time cost the pandas peer pays before its timing too (import pandas), shown apart, not timed
    t = time.perf_counter()
    pa.table({"x": [2, 1]}).sort_by("x")
    import pyarrow.dataset  # noqa: F401 - the served-log read's first import, as the pandas peer's (untimed)
    first_compute_s = time.perf_counter() - t
    p = mp.Platform(os.path.join(args.data, "home"))
    spent = {"read": 0.0, "retrieval": 0.0, "compare": 0.0}
    calls = {"read": 0, "retrieval": 0, "compare": 0}
    depth = {"read": 0, "retrieval": 0, "compare": 0}

    def timed(key, fn):
        def wrapper(*a, **k):
            depth[key] += 1  # a wrapped method calling another wrapped one (read -> groups) counts once
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[key] -= 1
                if not depth[key]:
                    spent[key] += time.perf_counter() - t
                    calls[key] += 1
        return wrapper

    # the log is read through ServedLog.read or, where the service groups files by their pinned refs,
    # ServedLog.groups: wrap whichever of them this mlplat has, on the instance
    log = p.serving.served_log
    log_methods = [m for m in ("read", "groups") if hasattr(log, m)]
    for m in log_methods:
        setattr(log, m, timed("read", getattr(log, m)))
    orig_mismatched = skew_mod._mismatched
    p.features.get_historical_features = timed("retrieval", p.features.get_historical_features)
    skew_mod._mismatched = timed("compare", orig_mismatched)
    region = h.TimedRegion()
    try:
        with region:
            report = p.monitoring.skew(name)
    finally:
        for m in log_methods:
            delattr(log, m)
        del p.features.get_historical_features
        skew_mod._mismatched = orig_mismatched
    mem = region.as_dict()
    arrow_peak = pa.default_memory_pool().max_memory() / 2**20  # Arrow buffers only, process-wide
    problems = check_report(report, args.data, man, rows, capped=True)
    out: dict[str, Any] = {
        "rows": rows, "wall_s": region.wall_s, "rows_per_s": rows / region.wall_s, "first_compute_s": first_compute_s,
        # a piece the call never went through (another mlplat version) is NaN, shown as "-"
        **{f"{k}_s": v if calls[k] else float("nan") for k, v in spent.items()},
        "other_s": region.wall_s - sum(spent.values()), "calls": calls,
        "peak_rss_mb": mem["peak_rss_mb"], "peak_above_baseline_mb": mem["peak_above_baseline_mb"],
        "arrow_peak_mb": arrow_peak, "mismatched": {f: s.mismatched for f, s in report.features.items()},
        "skewed": report.skewed,
        "listed": len(report.mismatches), "log_files": len(list((log.root / name).glob("*.parquet"))),
    }
    if args.exact:  # the same check function without the listing cap: every mismatching user, per feature
        refs, keys = log.refs(name)
        table = log.read(name)
        t = time.perf_counter()
        full = skew_mod.skew_check(p.features, table, refs, keys, model=name,
                                   max_mismatches=max(1, table.num_rows * len(FEATURES)))
        out["uncapped_s"] = time.perf_counter() - t
        out["uncapped_listed"] = len(full.mismatches)
        problems += check_report(full, args.data, man, rows, capped=False)
    if args.profile:
        out["profile"] = h.profile(lambda: p.monitoring.skew(name), f"p.monitoring.skew({name!r})")[0]
    p.close()
    out["problems"] = problems
    return out


# =========================================================================== worker: row at a time

def _far(a, b) -> bool:
    """skew's rule for one pair of values: null vs value, NaN vs number, or beyond the relative tolerance."""
    if a is None or b is None:
        return (a is None) != (b is None)
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) != math.isnan(b)
    return abs(a - b) > TOLERANCE * max(abs(a), abs(b), 1e-12)


def worker_rows(args: argparse.Namespace) -> dict[str, Any]:
    h.limit_pyarrow_threads(args.threads)
    import numpy as np
    import pyarrow as pa

    import mlplat as mp

    man = _load_manifest(args.data)
    rows = args.rows
    name = model_name(rows)
    p = mp.Platform(os.path.join(args.data, "home"))
    log = p.serving.served_log
    refs, keys = log.refs(name)
    table = log.read(name)
    rng = np.random.default_rng(SEED + 7)
    n = min(args.row_sample, table.num_rows)
    picks = np.sort(rng.choice(table.num_rows, n, replace=False))
    sample = table.take(pa.array(picks))
    users = sample.column("user_id").to_pylist()
    times = sample.column("request_time")
    served = {f: sample.column(f).to_pylist() for f in FEATURES}
    ts_type = times.type
    times = times.to_pylist()

    def one(i: int) -> tuple[dict[str, Any], dict[str, bool]]:
        entity = pa.table({"user_id": pa.array([users[i]], pa.int64()),
                           "event_timestamp": pa.array([times[i]], ts_type)})
        rec = p.features.get_historical_features(entity, refs)
        values = {f: rec.column(f)[0].as_py() for f in FEATURES}
        return values, {f: _far(served[f][i], values[f]) for f in FEATURES}

    for i in range(min(3, n)):  # warm-up: catalog lookups, Parquet footers
        one(i)
    per_row: list[float] = []
    got: list[dict[str, Any]] = []
    verdicts: list[dict[str, bool]] = []
    t_all = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        values, verdict = one(i)
        per_row.append(time.perf_counter() - t)
        got.append(values)
        verdicts.append(verdict)
    total = time.perf_counter() - t_all

    problems = []
    batched = p.features.get_historical_features(
        pa.table({"user_id": sample.column("user_id"), "event_timestamp": sample.column("request_time")}), refs)
    for f in FEATURES:
        if [g[f] for g in got] != batched.column(f).to_pylist():
            problems.append(f"row at a time: {f} values differ from the batched retrieval of the same rows")
    planted = {f: set(v) for f, v in man["planted"].items()}
    for f in FEATURES:
        want = [u in planted.get(f, set()) for u in users]
        if [v[f] for v in verdicts] != want:
            problems.append(f"row at a time: {f} mismatch verdicts differ from the planted users")
    p.close()
    return {"rows": n, "total_s": total, "mean_s": total / n, "median_s": h.median(per_row),
            "p90_s": sorted(per_row)[int(0.9 * (n - 1))], "problems": problems}


# =========================================================================== worker: pandas merge_asof

def worker_pandas(args: argparse.Namespace) -> dict[str, Any]:
    h.limit_pyarrow_threads(args.threads)
    from datetime import timedelta

    import numpy as np
    import pandas as pd
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    man = _load_manifest(args.data)
    rows = args.rows
    folder = Path(args.data) / "home" / "served" / model_name(rows)
    source = Path(args.data) / "source"
    region = h.TimedRegion()
    with region:
        t0 = time.perf_counter()
        files = [str(f) for f in sorted(folder.glob("*.parquet"))]
        log = pads.dataset(files, format="parquet").to_table(columns=["request_time", "user_id", *FEATURES])
        lo = pc.min(log.column("request_time")).as_py() - timedelta(days=TTL_DAYS)
        left = log.to_pandas()
        right = pq.read_table(source, columns=["user_id", "event_timestamp", *FEATURES],
                              filters=[("event_timestamp", ">=", lo)]).to_pandas()
        t1 = time.perf_counter()
        left = left.sort_values("request_time", kind="stable")
        right = right.sort_values("event_timestamp", kind="stable")
        merged = pd.merge_asof(left, right, left_on="request_time", right_on="event_timestamp", by="user_id",
                               direction="backward", tolerance=pd.Timedelta(days=TTL_DAYS),
                               allow_exact_matches=True, suffixes=("", "_offline"))
        t2 = time.perf_counter()
        counts, users = {}, {}
        ids = merged["user_id"].to_numpy()
        for f in FEATURES:
            a = merged[f].to_numpy(dtype="float64", na_value=np.nan)
            b = merged[f + "_offline"].to_numpy(dtype="float64", na_value=np.nan)
            a_nan, b_nan = np.isnan(a), np.isnan(b)
            with np.errstate(invalid="ignore"):
                far = np.abs(a - b) > TOLERANCE * np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-12)
            bad = (a_nan != b_nan) | (~a_nan & ~b_nan & far)
            counts[f] = int(bad.sum())
            users[f] = np.unique(ids[bad])
        t3 = time.perf_counter()
    want = expected(args.data, man, rows)
    problems = []
    for f in FEATURES:
        if counts[f] != want[f]["count"] or set(users[f].tolist()) != want[f]["users"]:
            problems.append(f"pandas merge_asof, {rows:,} rows: {f}: {counts[f]:,} mismatches over "
                            f"{len(users[f]):,} users, expected {want[f]['count']:,} over {len(want[f]['users']):,}")
    mem = region.as_dict()
    return {"rows": rows, "wall_s": region.wall_s, "read_s": t1 - t0, "merge_s": t2 - t1, "compare_s": t3 - t2,
            "source_rows": len(right), "peak_rss_mb": mem["peak_rss_mb"],
            "peak_above_baseline_mb": mem["peak_above_baseline_mb"], "problems": problems}


WORKERS = {"setup": worker_setup, "skew": worker_skew, "rows": worker_rows, "pandas": worker_pandas}


# =========================================================================== parent

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for CI (well under 60 s)")
    ap.add_argument("--users", type=int, help=f"users (default {FULL['users']:,}; smoke {SMOKE['users']:,})")
    ap.add_argument("--days", type=int, help=f"daily snapshots (default {FULL['days']}; smoke {SMOKE['days']})")
    ap.add_argument("--sizes", help=f"served-log sizes, comma separated (default {FULL['sizes']})")
    ap.add_argument("--batch", type=int, help=f"entity rows per predict call (default {FULL['batch']:,})")
    ap.add_argument("--repeats", type=int, help=f"runs per measurement (default {FULL['repeats']})")
    ap.add_argument("--row-sample", type=int, help=f"rows timed one at a time (default {FULL['row_sample']})")
    ap.add_argument("--row-group", type=int,
                    help=f"Parquet row group size of the source (default {FULL['row_group']:,})")
    ap.add_argument("--threads", type=int, default=None, help="threads for mlplat/pyarrow (default: usable CPUs)")
    ap.add_argument("--data-dir", help="build the world here and keep it (reused when its manifest matches)")
    ap.add_argument("--no-pandas", action="store_true", help="leave out the pandas merge_asof peer")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra skew call at the largest size")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    ap.add_argument("--json", help="write every worker report to this JSON file")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker (default 3600)")
    # worker side
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = h.machine_info()["usable_cpus"] or 1
    args.size_list = sorted({int(s) for s in str(args.sizes).split(",") if s.strip()})
    return args


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--users", str(args.users), "--days", str(args.days), "--sizes", ",".join(map(str, args.size_list)),
            "--batch", str(args.batch), "--row-sample", str(args.row_sample), "--row-group", str(args.row_group),
            "--threads", str(args.threads)]


def _s(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b <= 0:
        return "-"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def _med(reports: list[dict[str, Any]], key: str) -> float:
    return h.median(r[key] for r in reports)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        h.write_report(args.result_file, WORKERS[args.worker](args))
        return 0
    if not args.size_list or min(args.size_list) < 1 or min(args.users, args.days, args.batch, args.repeats,
                                                            args.row_sample, args.row_group, args.threads) < 1:
        print("bad options: sizes and counts must be positive", file=sys.stderr)
        return 2
    if args.days < 2:
        print("bad options: --days must be at least 2", file=sys.stderr)
        return 2

    fingerprint = h.package_fingerprint("mlplat")
    env = h.thread_env(args.threads)
    owned = args.data_dir is None
    data = tempfile.mkdtemp(prefix="mlplat-skew-bench-") if owned else os.path.abspath(args.data_dir)
    common = ["--data", data] + _forward(args)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    setup: dict[str, Any] = {}
    skew: dict[int, list[dict[str, Any]]] = {n: [] for n in args.size_list}
    pandas: dict[int, list[dict[str, Any]]] = {n: [] for n in args.size_list}
    rows_peer: dict[str, Any] = {}
    try:
        reuse = False
        if not owned and os.path.exists(os.path.join(data, "manifest.json")):
            man = _load_manifest(data)
            reuse = man.get("config") == json.loads(json.dumps(_config(args)))
        if reuse:
            say(f"reusing the world in {data}")
            setup = {k: v for k, v in man.items() if k != "planted"}
            setup["reused"] = True
        else:
            say(f"setup: {args.users:,} users x {args.days} days, logs of "
                f"{', '.join(f'{n:,}' for n in args.size_list)} rows ...")
            setup = h.run_worker(__file__, ["--worker", "setup", *common], env=env, timeout=args.timeout)
            say("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in setup["timings"]))
        largest = max(args.size_list)
        for r in range(args.repeats):
            for n in args.size_list:
                extra = ["--exact"] if r == 0 else []
                if args.profile and r == args.repeats - 1 and n == largest:
                    extra.append("--profile")
                rep = h.run_worker(__file__, ["--worker", "skew", "--rows", str(n), *extra, *common], env=env,
                                   timeout=args.timeout)
                skew[n].append(rep)
                say(f"mlplat skew {n:,} rows, run {r + 1}/{args.repeats}: {rep['wall_s']:.3f} s "
                    f"(read {rep['read_s']:.3f}, retrieval {rep['retrieval_s']:.3f}, compare "
                    f"{rep['compare_s']:.3f}), peak RSS {rep['peak_rss_mb']:.0f} MB"
                    + (f", uncapped {rep['uncapped_s']:.3f} s" if "uncapped_s" in rep else ""))
                if not args.no_pandas:
                    rep = h.run_worker(__file__, ["--worker", "pandas", "--rows", str(n), *common], env=env,
                                       timeout=args.timeout)
                    pandas[n].append(rep)
                    say(f"pandas merge_asof {n:,} rows, run {r + 1}/{args.repeats}: {rep['wall_s']:.3f} s")
        say(f"row at a time: {args.row_sample} rows ...")
        rows_peer = h.run_worker(__file__, ["--worker", "rows", "--rows", str(largest), *common], env=env,
                                 timeout=args.timeout)
        say(f"row at a time: {rows_peer['mean_s'] * 1000:.1f} ms per row")
    except h.WorkerError as exc:
        print(f"\n!!! a worker failed:\n{exc}", file=sys.stderr)
        return 2
    finally:
        if owned:
            shutil.rmtree(data, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    fingerprint_after = h.package_fingerprint("mlplat")

    # ---------------- header
    machine = h.machine_info()
    versions = h.library_versions(["mlplat", "pyarrow", "numpy", "pandas", "torch"])
    t = setup.get("timings", [])
    header = [
        "mlplat training-serving skew check benchmark" + (" (smoke sizes)" if args.smoke else ""),
        (f"world: feature view {VIEW!r}, {args.users:,} users x {args.days} daily snapshots = "
         f"{setup.get('source_rows', 0):,} source rows in {setup.get('source_files', 0)} Parquet files (row groups "
         f"of {args.row_group:,}), 4 numeric features, ttl {TTL_DAYS} days; SQLite online store "
         f"({setup.get('materialized', 0):,} users materialized); planted online-only: score +{DELTA['score']} for "
         f"{PLANTED['score']:.0%} of users, visits +{DELTA['visits']} for {PLANTED['visits']:.0%}"),
        ("served logs written by p.serving.predict (local backend, " f"{args.batch:,} users per call): "
         + ", ".join(f"{n:,} rows in {v['calls']} calls {v['seconds']:.2f} s ({v['rows_per_s']:,.0f} rows/s)"
                     for n in args.size_list for v in [setup.get("serve", {}).get(str(n))] if v)
         + ("; world reused from --data-dir" if setup.get("reused") else "")),
        "setup (not timed): " + ", ".join(f"{k} {v:.1f} s" for k, v in t if not k.startswith("serve")),
        (f"each measurement in a fresh process, {args.threads} thread(s) for mlplat/pyarrow, OS page cache warm; "
         f"medians of {args.repeats} run(s), sizes interleaved"),
        h.machine_line(machine),
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f" (mlplat source fingerprint {fingerprint})",
        f"wall time of the whole benchmark: {elapsed:.1f} s",
    ]

    # ---------------- table 1: mlplat
    h1 = ["served rows", "skew s", "rows/s", "read log s", "PIT retrieval s", "compare s", "other s",
          "peak RSS MB", "above baseline MB", "Arrow peak MB", "log files",
          "mismatches score / visits / spend / tenure", "check"]
    rows1 = []
    for n in args.size_list:
        reps = skew[n]
        # the median run (lower middle for an even count): its breakdown numbers belong together
        m = sorted(reps, key=lambda r: r["wall_s"])[(len(reps) - 1) // 2]
        ok = not any(r["problems"] for r in reps)
        rows1.append([f"{n:,}", _s(_med(reps, "wall_s")), f"{n / _med(reps, 'wall_s'):,.0f}", _s(m["read_s"]),
                      _s(m["retrieval_s"]), _s(m["compare_s"]), _s(m["other_s"]), f"{_med(reps, 'peak_rss_mb'):.0f}",
                      f"{_med(reps, 'peak_above_baseline_mb'):.0f}", f"{_med(reps, 'arrow_peak_mb'):.0f}",
                      str(m["log_files"]),
                      " / ".join(f"{m['mismatched'][f]:,}" for f in FEATURES), "OK" if ok else "WRONG"])
    align1 = ["r"] * (len(h1) - 2) + ["l", "l"]

    # ---------------- table 2: peers
    h2 = ["served rows", "mlplat skew s", "row at a time s (EXTRAPOLATED)", "row at a time / mlplat"]
    if not args.no_pandas:
        h2 += ["pandas merge_asof s", "pandas / mlplat", "pandas read / merge / compare s", "pandas peak RSS MB",
               "pandas check"]
    rows2 = []
    for n in args.size_list:
        ours = _med(skew[n], "wall_s")
        row_s = rows_peer["mean_s"] * n
        row = [f"{n:,}", _s(ours), _s(row_s), _ratio(row_s, ours)]
        if not args.no_pandas:
            reps = pandas[n]
            m = sorted(reps, key=lambda r: r["wall_s"])[(len(reps) - 1) // 2]
            row += [_s(_med(reps, "wall_s")), _ratio(_med(reps, "wall_s"), ours),
                    f"{m['read_s']:.3f} / {m['merge_s']:.3f} / {m['compare_s']:.3f}",
                    f"{_med(reps, 'peak_rss_mb'):.0f}", "OK" if not any(r["problems"] for r in reps) else "WRONG"]
        rows2.append(row)
    align2 = ["r"] * len(h2)
    if not args.no_pandas:
        align2[-1] = "l"

    notes = [
        "skew s: p.monitoring.skew(model) with defaults (every logged row, tolerance 1%, threshold 5%, at most "
        "1,000 mismatches listed per feature), from the call to the report; read log / PIT retrieval / compare: time inside "
        "that same call in ServedLog.read/groups, features.get_historical_features (one call) and "
        "skew._mismatched (once per feature); other: the rest (refs, entity table, resolve, listed Mismatch "
        "objects). Not timed: pyarrow's first compute call in the fresh process, which imports pandas (median "
        f"{_med([r for n in args.size_list for r in skew[n]], 'first_compute_s'):.3f} s; a one-time process cost the "
        "pandas peer also pays before its timing)",
        "peak RSS: the worker process's high-water mark (interpreter and imports included); above baseline: minus "
        "the RSS right before the call; Arrow peak: the most the process's Arrow memory pool held at once",
        (f"row at a time: get_historical_features of one served row (a one-row entity table at its request time) + "
         f"a Python comparison, {rows_peer.get('rows', 0)} rows of the {max(args.size_list):,}-row log after 3 "
         f"warm-up rows: mean {rows_peer.get('mean_s', float('nan')) * 1000:.1f} ms, median "
         f"{rows_peer.get('median_s', float('nan')) * 1000:.1f} ms, p90 "
         f"{rows_peer.get('p90_s', float('nan')) * 1000:.1f} ms per row; the seconds shown are that mean x the "
         "log size, EXTRAPOLATED, not run; values checked equal to one batched retrieval of the same rows: "
         + ("OK" if not rows_peer.get("problems") else "WRONG")),
        "check: per-feature mismatch counts equal the planted served rows, 0 for spend and tenure_days, skewed == "
        "['score'], every listed mismatch a planted user with the planted values; first run per size also the "
        "uncapped skew_check: the mismatching users per feature equal the planted users served "
        + "(" + ", ".join(f"{n:,} rows: {skew[n][0].get('uncapped_s', float('nan')):.3f} s, "
                          f"{skew[n][0].get('uncapped_listed', 0):,} listed" for n in args.size_list) + ")",
    ]
    if not args.no_pandas:
        notes.append("pandas merge_asof: read the log (pyarrow dataset) and the source rows with event_timestamp >= "
                     f"first request - ttl (pyarrow filter), to pandas, sort, merge_asof(by='user_id', backward, "
                     f"tolerance={TTL_DAYS} days), vectorized compare; timed end to end")
    print("\n".join(header))
    print()
    print(h.format_table(h1, rows1, align=align1))
    print()
    print(h.format_table(h2, rows2, align=align2))
    print("\n" + "\n".join(f"* {line}" for line in notes))
    if args.markdown:
        print("\n" + "\n".join(f"- {line}" for line in header) + "\n")
        print(h.format_table(h1, rows1, markdown=True, align=align1))
        print()
        print(h.format_table(h2, rows2, markdown=True, align=align2))
        print("\n" + "\n".join(f"- {line}" for line in notes))
    for n in args.size_list:
        for rep in skew[n]:
            if rep.get("profile"):
                print(f"\n===== profile, {n:,} rows: {rep['profile']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "result_file"}, "machine": machine,
                       "versions": versions, "mlplat_fingerprint": [fingerprint, fingerprint_after], "setup": setup,
                       "skew": {str(k): v for k, v in skew.items()}, "pandas": {str(k): v for k, v in pandas.items()},
                       "row_at_a_time": rows_peer}, f, indent=1, default=str)
    if fingerprint_after != fingerprint:
        print(f"\nWARNING: mlplat's files changed during the run (fingerprint {fingerprint} -> {fingerprint_after}); "
              "rerun.", file=sys.stderr)
    problems = [p for n in args.size_list for r in skew[n] + pandas[n] for p in r["problems"]]
    problems += rows_peer.get("problems", [])
    if problems:
        bar = "!" * 78
        print(f"\n{bar}\nCORRECTNESS CHECK FAILED\n" + "\n".join(problems[:40]) + f"\n{bar}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
