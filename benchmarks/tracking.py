#!/usr/bin/env python
"""Experiment tracking and model registry benchmark: metric logging, run search and lineage, SQLite and PostgreSQL.

Run from the repository root (PostgreSQL must be reachable when it is among
``--backends``; the benchmark creates its own schema and drops it at the end)::

    python benchmarks/tracking.py                          # 1M points, 10,000 runs, both backends
    python benchmarks/tracking.py --smoke                  # CI: 20,000 points, 500 runs, < 30 s
    python benchmarks/tracking.py --backends sqlite --points 2000000 --runs 20000
    python benchmarks/tracking.py --markdown --json tracking.json --profile

Where the data lives: SQLite in a fresh temporary home (``mlplat.db``, WAL,
``synchronous=NORMAL`` as mlplat configures it), removed at the end;
PostgreSQL in a schema ``mlplat_bench_tracking_<pid>_<hex>`` made with
``CREATE SCHEMA`` (the URL's ``search_path`` points there), dropped with
``DROP SCHEMA ... CASCADE`` at the end, also after a failure, Ctrl-C or
SIGTERM. The three measurements of one backend share that database and run in
this order, each in a fresh worker process (``_harness.run_worker``):

1. Metric logging (``--repeats`` workers, default 3; the table shows the run
   with the median total): ``run.log_metric(key, value, step=step)`` in a
   plain Python loop over ``--keys`` keys (default 10) x ``points / keys``
   steps, then the ``with`` block ends, which flushes
   and marks the run finished. Timed: the loop ("loop s") and from the loop's
   start until the ``with`` block has returned, i.e. every point committed
   ("total s"). The background flusher writes while the loop runs, so the
   loop time includes what that thread takes from it (GIL). Not timed:
   ``Platform(...)`` (schema migration), ``runs.start`` (system tags, git).
   Verified afterwards, per key, in ``run_metric_chunks``: point count, min/max/sum of
   the steps and the sum of the (integer-valued) values; in
   ``run_latest_metrics``: one row per key holding the last step; the run is
   ``finished``. A lost or duplicated point is a correctness failure.
2. Search: ``--runs`` runs (default 10,000) with 20 metrics, 5 params and 3
   tags each in experiment ``bench-search``, plus ``--noise-runs`` (default
   runs / 5) in ``bench-noise``, interleaved in time, 2% of the metric values
   missing. Populated with bulk SQLAlchemy Core executemany inserts into
   ``runs``, ``run_params``, ``run_tags``, ``run_latest_metrics`` and
   ``run_metric_chunks`` (one point per metric), deterministic random values: this
   is setup, not timed (its duration is shown for information). PostgreSQL
   then gets ``VACUUM ANALYZE`` (what autovacuum does after a bulk load:
   statistics for the planner, and the visibility map that lets it read run
   ids from the covering indexes alone); ``--no-analyze`` skips it. Timed: ``p.runs.search("bench-search", filter=F,
   order_by=["metrics.m7 desc"], max_results=100)`` for three filters, round
   robin (the order rotates every round), ``--search-warmup`` rounds then
   ``--search-calls`` timed rounds; each call includes loading the 100 runs'
   params, metrics and tags (what search returns). The filters:

   * main (the target): ``metrics.m3 > 0.5 and params.lr = '0.001'``
   * or: ``(metrics.m1 > 0.9 or metrics.m2 < 0.05) and params.optimizer = 'adam'``
   * tags: ``tags.team = 'risk' and tags.env = 'prod'``

   Checked for every filter against a pure-Python evaluation over the
   generated values: the first page (same ids, same order; ties and missing
   values ordered as mlplat documents: missing last, then newest start time,
   then id), the second page through ``page_token``, every match in order
   (``max_results=50000``), and the params/metrics of the first page.
3. Lineage: one run with 20 params, 20 metrics, one input
   (``run.log_input(pyarrow_table, name="train")``, 10,000 rows x 5 columns)
   and a ``torch.nn.Linear(4, 2)`` logged with ``run.log_model``, registered
   and promoted to staging, then production (approved by "alice"). Timed:
   ``p.models.lineage(name, stage="production")``, ``--lineage-warmup``
   calls then ``--lineage-calls`` timed calls; every answer is checked
   against what was logged.

Latency percentiles use the nearest rank (every value was measured); with 50
samples p99 is the slowest call. GC stays enabled everywhere.

Targets (from the issue), printed with PASS/FAIL (a FAIL does not change the
exit status): 1,000,000 points logged and committed in under 5 s on SQLite and
10 s on PostgreSQL (judged at ``--points`` >= 1,000,000, scaled linearly above);
search p50 under 50 ms (judged at ``--runs`` >= 10,000); lineage p50 under 20 ms.

Exit status: 0 when everything ran and every check passed; 1 on a correctness
failure (lost points, wrong search results, wrong lineage); 2 on an error
(PostgreSQL unreachable, a worker crashed, bad options).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402 - after the sys.path line above

BACKENDS = ("sqlite", "postgresql")
LABEL = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
SEED = 20240607

SEARCH_EXPERIMENT = "bench-search"
NOISE_EXPERIMENT = "bench-noise"
N_METRICS = 20
MISSING_METRIC = 0.02  # share of (run, metric) pairs with no value at all
ORDER_BY = ["metrics.m7 desc"]
ORDER_KEY = "m7"
PAGE = 100
FILTERS = {  # name -> (filter string, the same predicate in Python over (params, metrics, tags))
    "main": ("metrics.m3 > 0.5 and params.lr = '0.001'",
             lambda p, m, t: "m3" in m and m["m3"] > 0.5 and p["lr"] == "0.001"),
    "or": ("(metrics.m1 > 0.9 or metrics.m2 < 0.05) and params.optimizer = 'adam'",
           lambda p, m, t: (("m1" in m and m["m1"] > 0.9) or ("m2" in m and m["m2"] < 0.05))
           and p["optimizer"] == "adam"),
    "tags": ("tags.team = 'risk' and tags.env = 'prod'",
             lambda p, m, t: t["team"] == "risk" and t["env"] == "prod"),
}
PARAM_CHOICES = {"lr": ("0.001", "0.01", "0.1"), "batch_size": ("32", "64", "128", "256"),
                 "optimizer": ("adam", "sgd", "adamw")}
TAG_CHOICES = {"team": ("risk", "growth", "platform"), "env": ("dev", "prod")}

LINEAGE_MODEL = "bench-fraud"
LINEAGE_PARAMS = 20
LINEAGE_METRICS = 20
LINEAGE_INPUT_ROWS = 10_000

# issue targets
TARGET_METRIC_POINTS = 1_000_000
TARGET_METRIC_S = {"sqlite": 5.0, "postgresql": 10.0}
TARGET_SEARCH_RUNS = 10_000
TARGET_SEARCH_P50_MS = 50.0
TARGET_LINEAGE_P50_MS = 20.0

SMOKE = {"points": 20_000, "runs": 500, "noise_runs": 100, "search_calls": 10, "search_warmup": 2,
         "lineage_calls": 20, "lineage_warmup": 5, "repeats": 1}


# =========================================================================== helpers (worker side)

def _platform(args: argparse.Namespace):
    import mlplat as mp

    return mp.Platform(args.home, database_url=args.database_url)


class _SqlTimer:
    """Wall time per SQL statement text (SQLAlchemy cursor events; COPY through the raw driver is not seen)."""

    def __init__(self, engine) -> None:
        from sqlalchemy import event

        self.engine = engine
        self.stats: dict[str, list[float]] = {}
        self._event = event
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info.setdefault("_bench_t0", []).append(time.perf_counter())

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        dt = time.perf_counter() - conn.info["_bench_t0"].pop()
        key = " ".join(statement.split())
        key = key if len(key) <= 160 else key[:157] + "..."
        s = self.stats.setdefault(key, [0, 0.0])
        s[0] += 1
        s[1] += dt

    def close(self) -> None:
        self._event.remove(self.engine, "before_cursor_execute", self._before)
        self._event.remove(self.engine, "after_cursor_execute", self._after)

    def text(self, total_s: float, top: int = 8) -> str:
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1][1])[:top]
        spent = sum(v[1] for v in self.stats.values())
        out = [f"SQL statements (cursor execute wall time; {spent:.3f} s of {total_s:.3f} s profiled):"]
        out += [f"  {n:>6} x {t * 1000:9.1f} ms total {t / n * 1e6:9.1f} us each  {sql}" for sql, (n, t) in rows]
        return "\n".join(out)


def _profile(fn, label: str, *, engine=None, top: int = 18) -> str:
    """Run ``fn()`` under cProfile (and per-statement SQL timing); the text of the top functions."""
    timer = _SqlTimer(engine) if engine is not None else None
    try:
        text, wall = h.profile(fn, label, top)
    finally:
        if timer is not None:
            timer.close()
    return text if timer is None else text + "\n" + timer.text(wall)


# =========================================================================== worker: metric logging

def _expected_metric_sums(steps: int) -> tuple[int, int]:
    return steps * (steps - 1) // 2, sum(s % 997 for s in range(steps))


def worker_metrics(args: argparse.Namespace) -> dict[str, Any]:
    import sqlalchemy as sa

    p = _platform(args)
    keys = [f"metric_{i}" for i in range(args.keys)]
    steps = args.points // len(keys)
    points = steps * len(keys)
    run = p.runs.start("bench-metrics", params={"points": points, "repeat": args.repeat},
                       tags={"benchmark": "tracking"})
    log = run.log_metric
    region = h.TimedRegion()
    with region:
        t0 = time.perf_counter()
        with run:
            for step in range(steps):
                value = float(step % 997)
                for key in keys:
                    log(key, value, step=step)
            loop_s = time.perf_counter() - t0
        total_s = time.perf_counter() - t0

    # ---- verification (not timed)
    problems: list[str] = []
    sum_steps, sum_values = _expected_metric_sums(steps)
    from mlplat.runs.metrics import read_history

    with p.db.connect() as conn:
        stored_keys = conn.scalars(sa.text("SELECT DISTINCT key FROM run_metric_chunks WHERE run_id = :r "
                                           "ORDER BY key"), {"r": run.id}).all()
        latest = conn.execute(sa.text("SELECT key, step, value FROM run_latest_metrics WHERE run_id = :r"),
                              {"r": run.id}).all()
        status = conn.execute(sa.text("SELECT status FROM runs WHERE id = :r"), {"r": run.id}).scalar()
    rows = []  # per key, from the stored chunks: (key, count, min step, max step, sum steps, sum values, non-NaN)
    for key in stored_keys:
        st, _, vals = read_history(p.db, run.id, key)
        rows.append((key, len(st), int(st.min()), int(st.max()), int(st.sum()), float(vals.sum()),
                     int((vals == vals).sum())))
    stored = sum(int(r[1]) for r in rows)
    if stored != points:
        problems.append(f"run_metric_chunks hold {stored:,} points of run {run.id}, {points:,} were logged "
                        f"({points - stored:+,} lost)" if stored < points else
                        f"run_metric_chunks hold {stored:,} points of run {run.id}, only {points:,} were logged")
    seen = {r[0] for r in rows}
    if seen != set(keys):
        problems.append(f"keys in run_metric_chunks {sorted(seen)[:5]}... != logged keys")
    for key, n, lo, hi, s_step, s_value, n_value in rows:
        got = (int(n), int(lo), int(hi), int(s_step), float(s_value), int(n_value))
        want = (steps, 0, steps - 1, sum_steps, float(sum_values), steps)
        if got != want:
            problems.append(f"key {key}: (count, min step, max step, sum steps, sum values, non-null) = {got}, "
                            f"expected {want}")
    want_latest = {k: (steps - 1, float((steps - 1) % 997)) for k in keys}
    got_latest = {k: (int(s), v) for k, s, v in latest}
    if got_latest != want_latest:
        problems.append(f"run_latest_metrics: {len(got_latest)} rows, e.g. {sorted(got_latest.items())[:2]}, "
                        f"expected {len(want_latest)} rows with the last step {steps - 1}")
    if status != "finished":
        problems.append(f"run status is {status!r}, expected 'finished'")

    report: dict[str, Any] = {
        "points": points, "keys": len(keys), "steps": steps, "loop_s": loop_s, "total_s": total_s,
        "end_s": total_s - loop_s, "points_per_s": points / total_s, "us_per_call": loop_s / points * 1e6,
        "stored": stored, "ok": not problems, "problems": problems, "run_id": run.id,
        "peak_above_baseline_mb": region.as_dict()["peak_above_baseline_mb"],
    }
    if args.profile:
        report["profiles"] = _profile_metrics(p, keys, min(steps, 100_000 // len(keys) or 1))
    p.close()
    return report


def _profile_metrics(p, keys: list[str], steps: int) -> dict[str, str]:
    """The loop (main thread only: the flusher thread is not seen) and one write of a batch in this thread."""
    from mlplat.runs.metrics import _Points, write_chunks

    out = {}
    with p.runs.start("bench-metrics-profile") as run:
        def loop() -> None:
            log = run.log_metric
            for step in range(steps):
                value = float(step % 997)
                for key in keys:
                    log(key, value, step=step)
        out["loop"] = _profile(loop, f"log_metric loop, {steps * len(keys):,} points (main thread)")
        run.flush()
    run_id = run.id
    now = int(time.time() * 1000)
    batch = {k: _Points(steps=list(range(steps, 2 * steps)), values=[float(s % 997) for s in range(steps)],
                        timestamps=[now] * steps) for k in keys}
    out["write"] = _profile(lambda: write_chunks(p.db, run_id, batch),
                            f"one flush (mlplat.runs.metrics.write_chunks) of {steps * len(keys):,} points",
                            engine=p.db.engine)
    return out


# =========================================================================== worker: search

def generate_runs(n_runs: int, n_noise: int, seed: int = SEED) -> list[dict[str, Any]]:
    """Deterministic runs: id, experiment (main or noise), start time (s), params, tags, metrics."""
    import random

    rng = random.Random(seed)
    kinds = [True] * n_runs + [False] * n_noise
    rng.shuffle(kinds)
    out = []
    for i, main in enumerate(kinds):
        params = {k: rng.choice(v) for k, v in PARAM_CHOICES.items()}
        params["layers"] = str(rng.randint(1, 8))
        params["dropout"] = f"{rng.random() * 0.5:.2f}"
        tags = {k: rng.choice(v) for k, v in TAG_CHOICES.items()}
        tags["owner"] = f"user{rng.randrange(50)}"
        metrics = {}
        for m in range(N_METRICS):
            value = rng.random()
            if rng.random() >= MISSING_METRIC:
                metrics[f"m{m}"] = value
        out.append({"id": f"{rng.getrandbits(128):032x}", "main": main, "start_s": i, "params": params,
                    "tags": tags, "metrics": metrics})
    return out


def reference_search(runs: list[dict[str, Any]], predicate) -> list[str]:
    """Matching ids of the main experiment in mlplat's order: m7 desc with missing last, newest first, id."""
    hits = [r for r in runs if r["main"] and predicate(r["params"], r["metrics"], r["tags"])]
    hits.sort(key=lambda r: (ORDER_KEY not in r["metrics"], -r["metrics"].get(ORDER_KEY, 0.0), -r["start_s"],
                             r["id"]))
    return [r["id"] for r in hits]


def populate(p, runs: list[dict[str, Any]], *, chunk: int = 1000) -> None:
    """Bulk-insert the generated runs with SQLAlchemy Core executemany (one transaction per chunk)."""
    from datetime import datetime, timedelta, timezone

    import numpy as np
    import sqlalchemy as sa

    from mlplat.db.models import (
        Experiment,
        LatestMetric,
        Run,
        MetricChunk,
        RunParam,
        RunTag,
    )

    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    base_ms = int(base.timestamp() * 1000)
    with p.db.connect(write=True) as conn:
        exp = {True: conn.scalar(sa.insert(Experiment).values(name=SEARCH_EXPERIMENT).returning(Experiment.id)),
               False: conn.scalar(sa.insert(Experiment).values(name=NOISE_EXPERIMENT).returning(Experiment.id))}
    for lo in range(0, len(runs), chunk):
        part = runs[lo:lo + chunk]
        run_rows, param_rows, tag_rows, latest_rows, point_rows = [], [], [], [], []
        for r in part:
            ts = base_ms + r["start_s"] * 1000
            run_rows.append({"id": r["id"], "experiment_id": exp[r["main"]], "name": f"run-{r['start_s']}",
                             "status": "finished", "start_time": base + timedelta(seconds=r["start_s"]),
                             "end_time": base + timedelta(seconds=r["start_s"] + 60), "user": "bench",
                             "artifact_uri": ""})
            param_rows += [{"run_id": r["id"], "key": k, "value": v} for k, v in r["params"].items()]
            tag_rows += [{"run_id": r["id"], "key": k, "value": v} for k, v in r["tags"].items()]
            for k, v in r["metrics"].items():
                latest_rows.append({"run_id": r["id"], "key": k, "value": v, "step": 0, "timestamp": ts})
                point_rows.append({"run_id": r["id"], "key": k, "count": 1, "first_step": 0, "last_step": 0,
                                   "steps": np.zeros(1, "<i8").tobytes(), "values": np.array([v], "<f8").tobytes(),
                                   "timestamps": np.array([ts], "<i8").tobytes()})
        with p.db.connect(write=True) as conn:
            conn.execute(sa.insert(Run), run_rows)
            conn.execute(sa.insert(RunParam), param_rows)
            conn.execute(sa.insert(RunTag), tag_rows)
            conn.execute(sa.insert(LatestMetric), latest_rows)
            conn.execute(sa.insert(MetricChunk), point_rows)


def _check_search(p, runs_by_id: dict[str, dict], name: str, flt: str, expected: list[str],
                  page) -> list[str]:
    problems = []
    got = [r.id for r in page]
    if got != expected[:PAGE]:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        problems.append(f"search {name!r} ({flt}): first page has {len(got)} runs, expected "
                        f"{len(expected[:PAGE])}; first difference at position {first}")
    if (page.next_page_token is None) != (len(expected) <= PAGE):
        problems.append(f"search {name!r}: next_page_token is {page.next_page_token!r} with "
                        f"{len(expected)} matches")
    for r in page:
        ref = runs_by_id.get(r.id)
        if ref is None:
            continue
        if r.params != ref["params"] or r.tags != ref["tags"] or r.metrics != ref["metrics"]:
            problems.append(f"search {name!r}: run {r.id} came back with other params/tags/metrics than stored")
            break
    if page.next_page_token is not None:
        second = p.runs.search(SEARCH_EXPERIMENT, filter=flt, order_by=ORDER_BY, max_results=PAGE,
                               page_token=page.next_page_token)
        if [r.id for r in second] != expected[PAGE:2 * PAGE]:
            problems.append(f"search {name!r}: the second page (page_token) differs from the reference")
    full = p.runs.search(SEARCH_EXPERIMENT, filter=flt, order_by=ORDER_BY, max_results=50_000)
    if [r.id for r in full] != expected:
        problems.append(f"search {name!r}: all matches (max_results=50000): {len(full)} runs, expected "
                        f"{len(expected)}, or another order")
    return problems


def worker_search(args: argparse.Namespace) -> dict[str, Any]:
    import sqlalchemy as sa

    p = _platform(args)
    t0 = time.perf_counter()
    runs = generate_runs(args.runs, args.noise_runs)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    populate(p, runs)
    populate_s = time.perf_counter() - t0
    analyze_s = None
    if p.db.dialect == "postgresql" and not args.no_analyze:
        t0 = time.perf_counter()
        with p.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # VACUUM: no transaction
            for table in ("experiments", "runs", "run_params", "run_tags", "run_latest_metrics", "run_metric_chunks"):
                conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        analyze_s = time.perf_counter() - t0
    runs_by_id = {r["id"]: r for r in runs if r["main"]}
    expected = {name: reference_search(runs, pred) for name, (_, pred) in FILTERS.items()}

    with p.db.connect() as conn:
        counts = {t: conn.scalar(sa.text(f"SELECT COUNT(*) FROM {t}")) for t in
                  ("runs", "run_params", "run_tags", "run_latest_metrics", "run_metric_chunks")}

    names = list(FILTERS)
    samples: dict[str, list[int]] = {n: [] for n in names}
    pages: dict[str, Any] = {}

    def call(name: str):
        return p.runs.search(SEARCH_EXPERIMENT, filter=FILTERS[name][0], order_by=ORDER_BY, max_results=PAGE)

    for i in range(args.search_warmup):
        for name in names[i % 3:] + names[:i % 3]:
            pages[name] = call(name)
    perf = time.perf_counter_ns
    for i in range(args.search_calls):
        for name in names[i % 3:] + names[:i % 3]:
            t = perf()
            page = call(name)
            samples[name].append(perf() - t)
            pages[name] = page

    problems: list[str] = []
    for name in names:
        problems += _check_search(p, runs_by_id, name, FILTERS[name][0], expected[name], pages[name])

    cells = {}
    for name in names:
        p50, p99 = h.latency_percentiles(samples[name], (50, 99))
        cells[name] = {"filter": FILTERS[name][0], "p50_ms": p50, "p99_ms": p99,
                       "mean_ms": sum(samples[name]) / len(samples[name]) / 1e6, "samples": len(samples[name]),
                       "matches": len(expected[name]), "returned": len(pages[name])}
    report: dict[str, Any] = {"runs": args.runs, "noise_runs": args.noise_runs, "generate_s": gen_s,
                              "populate_s": populate_s, "analyze_s": analyze_s, "row_counts": counts,
                              "cells": cells, "ok": not problems, "problems": problems}
    if args.profile:
        report["profiles"] = {"main": _profile(
            lambda: [call("main") for _ in range(20)], f"20 x search {FILTERS['main'][0]!r}",
            engine=p.db.engine)}
        with p.db.connect() as conn:
            q = _search_sql(p, FILTERS["main"][0])
            plan_sql = ("EXPLAIN QUERY PLAN " if p.db.dialect == "sqlite" else "EXPLAIN ANALYZE ") + q
            report["profiles"]["plan"] = "plan of the id query:\n" + q + "\n" + "\n".join(
                " | ".join(str(c) for c in row) for row in conn.exec_driver_sql(plan_sql))
    p.close()
    return report


def _search_sql(p, flt: str) -> str:
    """The id query search() runs, with literal values (for EXPLAIN)."""
    import sqlalchemy as sa

    from mlplat.db.models import Experiment, Run
    from mlplat.runs.search import page_query, parse_filter, sort_keys, to_sql

    q = sa.select(Run.id).join(Experiment).where(Experiment.name.in_([SEARCH_EXPERIMENT]))
    q = page_query(*sort_keys(q.where(to_sql(parse_filter(flt))), ORDER_BY), None, PAGE + 1)
    return str(q.compile(p.db.engine, compile_kwargs={"literal_binds": True}))


# =========================================================================== worker: lineage

def worker_lineage(args: argparse.Namespace) -> dict[str, Any]:
    import random

    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    p = _platform(args)
    rng = random.Random(SEED + 1)
    params = {f"param_{i}": rng.choice(["0.001", "64", "adam", "relu", str(i)]) for i in range(LINEAGE_PARAMS)}
    metrics = {f"metric_{i}": rng.random() for i in range(LINEAGE_METRICS)}
    n = LINEAGE_INPUT_ROWS
    table = pa.table({"user_id": pa.array(range(n), pa.int64()),
                      "amount": pa.array([rng.random() * 100 for _ in range(n)], pa.float64()),
                      "country": pa.array([rng.choice(["DE", "FR", "US"]) for _ in range(n)]),
                      "is_fraud": pa.array([rng.random() < 0.02 for _ in range(n)]),
                      "score": pa.array([rng.random() for _ in range(n)], pa.float32())})
    with p.runs.start("bench-lineage", params=params, tags={"team": "risk"}) as run:
        for step in range(3):
            run.log_metrics({k: v + step for k, v in metrics.items()}, step=step)
        run.log_metrics(metrics, step=3)
        logged = run.log_input(table, name="train")
        meta = run.log_model(torch.nn.Linear(4, 2), "model", example_input=torch.zeros(2, 4))
    v = p.models.register(LINEAGE_MODEL, run_id=run.id, artifact="model", registered_by="bob")
    p.models.promote(LINEAGE_MODEL, v.version, stage="staging")
    p.models.promote(LINEAGE_MODEL, v.version, stage="production", approved_by="alice", notes="benchmark")

    def call():
        return p.models.lineage(LINEAGE_MODEL, stage="production")

    for _ in range(args.lineage_warmup):
        call()
    perf = time.perf_counter_ns
    samples = []
    answers = []
    for _ in range(args.lineage_calls):
        t = perf()
        answer = call()
        samples.append(perf() - t)
        answers.append(answer)

    first = answers[0]  # --lineage-warmup 0 is allowed: the first timed answer is checked, and the rest with it
    problems = []
    want = {"model": LINEAGE_MODEL, "version": v.version, "stage": "production", "params": params,
            "metrics": metrics}
    got = {k: first.get(k) for k in want}
    if got != want:
        problems.append(f"lineage: {[k for k in want if got[k] != want[k]]} differ from what was logged")
    data = first.get("data") or [{}]
    if len(first.get("data", [])) != 1 or data[0].get("content_hash") != logged.content_hash \
            or data[0].get("row_count") != n:
        problems.append(f"lineage: data {data!r:.200} does not hold the logged input {logged}")
    if first.get("run", {}).get("id") != run.id:
        problems.append("lineage: wrong run")
    if [a.get("approved_by") for a in first.get("approvals", [])] != ["alice"]:
        problems.append(f"lineage: approvals {first.get('approvals')!r}")
    if first.get("artifact", {}).get("torch_version", meta.get("torch_version")) != meta.get("torch_version"):
        problems.append("lineage: artifact metadata differs from log_model's")
    if any(a != first for a in answers):
        problems.append("lineage: the answers of the timed calls differ from each other")
    p50, p99 = h.latency_percentiles(samples, (50, 99))
    report: dict[str, Any] = {"calls": len(samples), "p50_ms": p50, "p99_ms": p99,
                              "mean_ms": sum(samples) / len(samples) / 1e6,
                              "answer_bytes": len(json.dumps(first, default=str)),
                              "ok": not problems, "problems": problems}
    if args.profile:
        report["profiles"] = {"lineage": _profile(lambda: [call() for _ in range(100)],
                                                  "100 x models.lineage", engine=p.db.engine)}
    p.close()
    return report


WORKERS = {"metrics": worker_metrics, "search": worker_search, "lineage": worker_lineage}


# =========================================================================== PostgreSQL schema

def pg_schema_url(admin_url: str, schema: str) -> str:
    return f"{admin_url}{'&' if '?' in admin_url else '?'}options=-csearch_path%3D{schema}"


def pg_server_info(admin_url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        return {k: conn.execute(f"SHOW {k}").fetchone()[0]
                for k in ("server_version", "synchronous_commit", "fsync", "shared_buffers")}


# =========================================================================== parent

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: sqlite,postgresql")
    ap.add_argument("--points", type=int, default=1_000_000, help="metric points per logging run (default 1,000,000)")
    ap.add_argument("--keys", type=int, default=10, help="metric keys the points spread over (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="metric logging runs per backend, each in a fresh "
                    "process; the table shows the run with the median total (default 3)")
    ap.add_argument("--runs", type=int, default=10_000, help="runs in the searched experiment (default 10,000)")
    ap.add_argument("--noise-runs", type=int, default=None, help="runs in another experiment (default runs / 5)")
    ap.add_argument("--search-calls", type=int, default=50, help="timed calls per search filter (default 50)")
    ap.add_argument("--search-warmup", type=int, default=5, help="untimed calls per filter first (default 5)")
    ap.add_argument("--lineage-calls", type=int, default=200, help="timed lineage calls (default 200)")
    ap.add_argument("--lineage-warmup", type=int, default=20, help="untimed lineage calls first (default 20)")
    ap.add_argument("--smoke", action="store_true",
                    help="CI size: 20,000 points, 500 + 100 runs, 10 search and 20 lineage calls, 1 repeat")
    ap.add_argument("--pg-url", default=os.environ.get("MLPLAT_BENCH_PG_URL"),
                    help="PostgreSQL URL to create the schema in (default: postgres, then root, at "
                         "127.0.0.1:5432/test; or $MLPLAT_BENCH_PG_URL)")
    ap.add_argument("--no-analyze", action="store_true", help="skip VACUUM ANALYZE after populating PostgreSQL")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--json", default=None, help="write the raw reports to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="add cProfile + per-SQL-statement timings of each measurement (untimed, after it)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is killed (default 1800)")
    # worker-only
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    ap.add_argument("--database-url", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.noise_runs is None:
        args.noise_runs = args.runs // 5
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--points", str(args.points), "--keys", str(args.keys), "--runs", str(args.runs),
            "--noise-runs", str(args.noise_runs), "--search-calls", str(args.search_calls),
            "--search-warmup", str(args.search_warmup), "--lineage-calls", str(args.lineage_calls),
            "--lineage-warmup", str(args.lineage_warmup)] + \
        (["--profile"] if args.profile else []) + (["--no-analyze"] if args.no_analyze else [])


def find_pg_url(explicit: str | None) -> str:
    import psycopg

    candidates = [explicit] if explicit else [f"postgresql://{u}@127.0.0.1:5432/test" for u in ("postgres", "root")]
    errors = []
    for url in candidates:
        try:
            with psycopg.connect(url, connect_timeout=5):
                return url
        except psycopg.Error as exc:
            errors.append(f"{url}: {str(exc).strip()}")
    raise ConnectionError("; ".join(errors))


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _int(n: float) -> str:
    return f"{n:,.0f}"


def build_table(args, reports: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str], list[str]]:
    """One row per quantity, one column per backend, then the target and a verdict per backend; plus notes."""
    bks = list(reports)
    headers = ["measurement", *[LABEL[b] for b in bks], "target", *[f"{LABEL[b]} verdict" for b in bks]]
    rows: list[list[str]] = []
    notes: list[str] = []

    def row(label: str, values: dict[str, str], target: str = "", verdicts: dict[str, str] | None = None) -> None:
        rows.append([label, *[values.get(b, "") for b in bks], target,
                     *[(verdicts or {}).get(b, "") for b in bks]])

    def ok(flag: bool) -> str:
        return "OK" if flag else "WRONG"

    # ---- metric logging
    # the run with the median total (lower middle for an even count): its numbers belong together
    med = {b: sorted(reports[b]["metrics"], key=lambda r: r["total_s"])[(len(reports[b]["metrics"]) - 1) // 2]
           for b in bks}
    any_rep = reports[bks[0]]["metrics"][0]
    n_rep = len(reports[bks[0]]["metrics"])
    points = any_rep["points"]
    row(f"1. metric logging, {points:,} points" + (f" (median run of {n_rep})" if n_rep > 1 else ""), {})
    notes.append(f"1. run.log_metric(key, value, step=step) in a Python loop, {any_rep['keys']} keys x "
                 f"{any_rep['steps']:,} steps, then the run's with block ends (flush + finished); 'total' runs "
                 "from the loop's start until the with block returned (every point committed); each run in a "
                 "fresh process, a new run in the same database")
    row("  logging loop s", {b: f"{med[b]['loop_s']:.2f}" for b in bks})
    row("  end of run (final flush) s", {b: f"{med[b]['end_s']:.2f}" for b in bks})
    verdicts = {}
    target_txt = " / ".join(f"< {TARGET_METRIC_S[b]:g} s" for b in bks) + " per 1M"
    for b in bks:
        if points >= TARGET_METRIC_POINTS:
            verdicts[b] = _verdict(med[b]["total_s"] * TARGET_METRIC_POINTS / points < TARGET_METRIC_S[b])
        else:
            verdicts[b] = "n/a (< 1M points)"
    row("  total s until committed", {b: f"{med[b]['total_s']:.2f}" for b in bks}, target_txt, verdicts)
    if points != TARGET_METRIC_POINTS:
        row("  total s scaled to 1M points", {b: f"{med[b]['total_s'] * TARGET_METRIC_POINTS / points:.2f}"
                                             for b in bks})
    if n_rep > 1:
        row("  total s, min - max", {b: f"{min(r['total_s'] for r in reports[b]['metrics']):.2f} - "
                                        f"{max(r['total_s'] for r in reports[b]['metrics']):.2f}" for b in bks})
    row("  points/s (total)", {b: _int(med[b]["points_per_s"]) for b in bks})
    row("  us per log_metric call (loop)", {b: f"{med[b]['us_per_call']:.2f}" for b in bks})
    good = {b: all(r["ok"] for r in reports[b]["metrics"]) for b in bks}
    row("  points stored (read back)", {b: "/".join(sorted({f"{r['stored']:,}" for r in reports[b]["metrics"]}))
                                           for b in bks}, "= logged", {b: ok(good[b]) for b in bks})
    row("  peak RSS above baseline MB", {b: f"{med[b]['peak_above_baseline_mb']:.0f}" for b in bks})

    # ---- search
    s0 = reports[bks[0]]["search"]
    calls = s0["cells"]["main"]["samples"]
    row(f"2. search, {s0['runs']:,} runs + {s0['noise_runs']:,} noise", {})
    notes.append(f"2. p.runs.search('{SEARCH_EXPERIMENT}', filter=F, order_by={ORDER_BY}, max_results={PAGE}); "
                 f"{s0['runs']:,} runs x ({N_METRICS} metrics, 5 params, 3 tags) + {s0['noise_runs']:,} runs in "
                 f"another experiment, bulk-inserted first (setup, not timed); {calls} timed calls per filter "
                 "(round robin) after warm-up; results checked against a pure-Python evaluation (every page, "
                 "same ids, same order)")
    row("  population s (setup, not timed)",
        {b: f"{reports[b]['search']['populate_s']:.1f}" + (
            f" + VACUUM ANALYZE {reports[b]['search']['analyze_s']:.1f}" if reports[b]["search"]["analyze_s"] else "")
         for b in bks})
    for name in FILTERS:
        cells = {b: reports[b]["search"]["cells"][name] for b in bks}
        notes.append(f"   {name} filter: {FILTERS[name][0]}" + ("" if name == "main" else " (information)"))
        if name == "main":
            size_ok = s0["runs"] >= TARGET_SEARCH_RUNS
            v = {b: _verdict(cells[b]["p50_ms"] < TARGET_SEARCH_P50_MS) if size_ok else "n/a (< 10,000 runs)"
                 for b in bks}
            row(f"  {name} filter p50 ms", {b: f"{cells[b]['p50_ms']:.1f}" for b in bks},
                f"< {TARGET_SEARCH_P50_MS:g} ms", v)
        else:
            row(f"  {name} filter p50 ms", {b: f"{cells[b]['p50_ms']:.1f}" for b in bks})
        row(f"  {name} filter p99 ms", {b: f"{cells[b]['p99_ms']:.1f}" for b in bks})
        row(f"  {name} filter matches", {b: f"{cells[b]['matches']:,}" for b in bks})
    row("  results vs reference", {b: ok(not reports[b]["search"]["problems"]) for b in bks},
        "same ids, same order", {b: ok(not reports[b]["search"]["problems"]) for b in bks})

    # ---- lineage
    l0 = reports[bks[0]]["lineage"]
    row(f"3. lineage, {l0['calls']} calls", {})
    notes.append(f"3. p.models.lineage(name, stage='production') of a version whose run has {LINEAGE_PARAMS} "
                 f"params, {LINEAGE_METRICS} metrics, 1 logged input ({LINEAGE_INPUT_ROWS:,} rows), a torch "
                 "Linear(4, 2); answers checked against what was logged")
    row("  p50 ms", {b: f"{reports[b]['lineage']['p50_ms']:.2f}" for b in bks}, f"< {TARGET_LINEAGE_P50_MS:g} ms",
        {b: _verdict(reports[b]["lineage"]["p50_ms"] < TARGET_LINEAGE_P50_MS) for b in bks})
    row("  p99 ms", {b: f"{reports[b]['lineage']['p99_ms']:.2f}" for b in bks})
    row("  answer vs what was logged", {b: ok(reports[b]["lineage"]["ok"]) for b in bks},
        "equal", {b: ok(reports[b]["lineage"]["ok"]) for b in bks})
    align = ["l"] + ["r"] * len(bks) + ["l"] * (1 + len(bks))
    return headers, rows, align, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        h.write_report(args.result_file, WORKERS[args.worker](args))
        return 0

    bad = [b for b in args.backend_list if b not in BACKENDS]
    if bad or not args.backend_list or len(set(args.backend_list)) != len(args.backend_list):
        print(f"bad --backends {args.backends!r}: choose from {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    if min(args.points, args.keys, args.runs, args.repeats, args.search_calls, args.lineage_calls) < 1 or \
            min(args.noise_runs, args.search_warmup, args.lineage_warmup) < 0 or args.points < args.keys:
        print("bad options: sizes and counts must be positive (and --points >= --keys)", file=sys.stderr)
        return 2

    pg_admin = None
    pg_info: dict[str, str] = {}
    if "postgresql" in args.backend_list:
        try:
            pg_admin = find_pg_url(args.pg_url)
            pg_info = pg_server_info(pg_admin)
        except Exception as exc:  # noqa: BLE001 - any failure to reach PostgreSQL ends the run
            print(f"cannot reach PostgreSQL ({exc}); pass --pg-url or leave it out with --backends sqlite",
                  file=sys.stderr)
            return 2

    fingerprint = h.package_fingerprint("mlplat")
    root = tempfile.mkdtemp(prefix="mlplat-tracking-bench-")
    schemas: list[str] = []
    reports: dict[str, dict[str, Any]] = {}
    previous_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` drops the schema
    t_start = time.perf_counter()
    try:
        for backend in args.backend_list:
            home = os.path.join(root, backend)
            if backend == "postgresql":
                import psycopg

                schema = f"mlplat_bench_tracking_{os.getpid()}_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(pg_admin, autocommit=True) as conn:
                    conn.execute(f'CREATE SCHEMA "{schema}"')
                schemas.append(schema)
                url = pg_schema_url(pg_admin, schema)
            else:
                url = f"sqlite:///{os.path.join(home, 'mlplat.db')}"
            common = ["--home", home, "--database-url", url] + _forward(args)
            rep: dict[str, Any] = {"metrics": []}
            for i in range(args.repeats):
                print(f"  {backend}: metric logging {i + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
                r = h.run_worker(__file__, ["--worker", "metrics", "--repeat", str(i), *common], timeout=args.timeout)
                print(f"  {backend}: {r['points']:,} points, loop {r['loop_s']:.2f} s, total {r['total_s']:.2f} s",
                      file=sys.stderr, flush=True)
                rep["metrics"].append(r)
            print(f"  {backend}: search ...", file=sys.stderr, flush=True)
            rep["search"] = h.run_worker(__file__, ["--worker", "search", *common], timeout=args.timeout)
            print(f"  {backend}: search p50 {rep['search']['cells']['main']['p50_ms']:.1f} ms "
                  f"(population {rep['search']['populate_s']:.1f} s)", file=sys.stderr, flush=True)
            print(f"  {backend}: lineage ...", file=sys.stderr, flush=True)
            rep["lineage"] = h.run_worker(__file__, ["--worker", "lineage", *common], timeout=args.timeout)
            reports[backend] = rep
    except h.WorkerError as exc:
        print(f"\n!!! a worker failed:\n{exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        for schema in schemas:
            try:
                import psycopg

                with psycopg.connect(pg_admin, autocommit=True) as conn:
                    conn.execute("SET lock_timeout = '60s'")
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except Exception as exc:  # noqa: BLE001
                print(f"warning: could not drop schema {schema!r}: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    fingerprint_after = h.package_fingerprint("mlplat")

    # ---------------- header
    machine = h.machine_info()
    versions = h.library_versions(["mlplat", "sqlalchemy", "psycopg", "alembic", "pyarrow", "torch"])
    versions["sqlite"] = __import__("sqlite3").sqlite_version
    if pg_info:
        versions["postgresql"] = pg_info["server_version"]
    header = [
        "mlplat experiment tracking and model registry benchmark"
        + (" (smoke sizes)" if args.smoke else ""),
        "SQLite: a fresh file in a temporary folder (WAL, synchronous=NORMAL, as mlplat sets it)"
        if "sqlite" in reports else "",
        (f"PostgreSQL: {pg_admin.rsplit('@', 1)[-1]}, a fresh schema per run, dropped at the end; "
         f"synchronous_commit={pg_info['synchronous_commit']}, fsync={pg_info['fsync']}, "
         f"shared_buffers={pg_info['shared_buffers']}; client and server on the same machine; "
         + ("no VACUUM ANALYZE" if args.no_analyze else "VACUUM ANALYZE after the search population"))
        if "postgresql" in reports else "",
        ("each measurement in a fresh process; search population is setup (bulk Core inserts), not timed; "
         "percentiles are nearest-rank; GC enabled"),
        h.machine_line(machine),
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f" (mlplat source fingerprint {fingerprint})",
        f"wall time of the whole benchmark: {elapsed:.1f} s",
    ]
    header = [line for line in header if line]
    headers, rows, align, notes = build_table(args, reports)
    print("\n".join(header))
    print()
    print(h.format_table(headers, rows, align=align))
    print("\n" + "\n".join(notes))
    if args.markdown:
        print("\n" + "\n".join(f"- {line}" for line in header) + "\n")
        print(h.format_table(headers, rows, markdown=True, align=align))
        print("\n" + "\n".join(f"- {line.strip()}" for line in notes))
    if args.profile:
        for backend, rep in reports.items():
            for what, r in [("metrics", rep["metrics"][0]), ("search", rep["search"]), ("lineage", rep["lineage"])]:
                for text in r.get("profiles", {}).values():
                    print(f"\n===== profile, {LABEL[backend]}, {what}: {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "backend_list"}, "machine": machine,
                       "versions": versions, "postgresql": pg_info, "mlplat_fingerprint": [fingerprint,
                                                                                           fingerprint_after],
                       "reports": reports}, f, indent=1, default=str)
    if fingerprint_after != fingerprint:
        print(f"\nWARNING: mlplat's files changed during the run (fingerprint {fingerprint} -> {fingerprint_after}); "
              "rerun.", file=sys.stderr)
    problems = [f"{LABEL[b]}: {p}" for b, rep in reports.items()
                for r in [*rep["metrics"], rep["search"], rep["lineage"]] for p in r["problems"]]
    if problems:
        bar = "!" * 78
        print(f"\n{bar}\nCORRECTNESS CHECK FAILED\n" + "\n".join(problems) + f"\n{bar}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
