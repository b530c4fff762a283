"""``run_demo``: from raw transactions to a served, routed, monitored model, in one call.

Steps, each timed:

1. data: 200,000 card transactions over 90 days, daily user and merchant snapshots (Parquet);
2. features: entities, two feature views and a feature service, applied to the catalog;
3. training set: one point-in-time retrieval for the labelled transactions of the last 60 days;
4. models: a champion and a challenger trained as tracked runs, registered; the champion
   promoted to production with an approval, the challenger to staging;
5. materialize: the views into the online store (SQLite, or Redis with ``online_store``), and an
   online lookup checked against offline retrieval at the same moment;
6. serve: today's card requests through an A/B gateway (the same user always gets the same
   variant) and ``p.serving.predict`` on the local backend, or on a Triton server when
   ``triton_url`` is given (the versions are exported and sent to the server);
7. monitor: a streaming job pushes some users' ``amount_sum_7d`` online only, in cents: the
   skew check recomputes the served features offline and names exactly those users;
8. lineage of the production model.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._console import as_text
from ..errors import ConfigError
from ..settings import hide_password
from . import report
from .data import DAYS, check_home, data_start, fresh_home, generate_transactions, write_feature_data

__all__ = ["run_demo"]

CHAMPION = {"lr": 0.01, "epochs": 8, "batch_size": 2048, "hidden": 16, "seed": 7}
CHALLENGER = {"lr": 0.02, "epochs": 5, "batch_size": 2048, "hidden": 32, "seed": 11}
REQUESTS = 500
SKEWED_USERS = 40


class _Steps:
    """Timed steps under a rich spinner, each reported with a check mark when done."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str, doing: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.console.status(doing):
            yield
        self.timings[key] = time.perf_counter() - t0
        self.console.print(f"[green]\u2713[/] {doing} [dim]({self.timings[key]:.1f} s)[/]")


def _definitions(mp: Any, home: Path) -> list:
    user = mp.Entity("user", join_keys=["user_id"], description="a card holder")
    merchant = mp.Entity("merchant", join_keys=["merchant_id"], description="a card acceptor")
    user_txn = mp.FeatureView(
        "user_txn_7d", entities=[user], ttl=timedelta(days=7),
        schema=[mp.Field("txn_count_7d", mp.Int64), mp.Field("amount_sum_7d", mp.Float64)],
        source=mp.ParquetSource(home / "data" / "user_txn_7d"),
        description="card holder activity over the last 7 days", tags={"team": "risk"}, owner="demo",
    )
    merchant_risk = mp.FeatureView(
        "merchant_30d", entities=[merchant], ttl=timedelta(days=30),
        schema=[mp.Field("fraud_rate_30d", mp.Float32), mp.Field("txn_count_30d", mp.Int64)],
        source=mp.ParquetSource(home / "data" / "merchant_30d"),
        description="merchant fraud rate over the last 30 days", tags={"team": "risk"}, owner="demo",
    )
    service = mp.FeatureService("fraud_model", features=[user_txn, merchant_risk],
                                description="inputs of the fraud model")
    return [user, merchant, user_txn, merchant_risk, service]


def _requests(txns: pa.Table, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Today's card requests: transactions of the last two days, with their (later known) fraud label."""
    recent = txns.filter(pc.greater_equal(
        txns.column("event_timestamp"), pa.scalar(datetime.now(timezone.utc) - timedelta(days=2),
                                                  pa.timestamp("us", "UTC"))))
    picks = rng.choice(recent.num_rows, size=min(REQUESTS, recent.num_rows), replace=False)
    return recent.take(pa.array(np.sort(picks))).select(["user_id", "merchant_id", "amount", "is_fraud"]).to_pylist()


def _triton(triton_url: str) -> Any:
    """A client for the configured Triton server, checked before any work is done."""
    import mlplat as mp

    client = mp.TritonClient(triton_url)
    if not client.is_ready():
        client.close()
        raise ConfigError(f"no ready Triton server at {triton_url} (gRPC host:port); start one or leave "
                          "--triton-url out to serve on the local backend")
    return client


def _send_to_triton(p: Any, client: Any, home: Path) -> None:
    """Export both versions of 'fraud' and send them to the server (it needs no access to this disk)."""
    import mlplat as mp

    batching = mp.DynamicBatching(preferred_batch_sizes=[8, 16], max_queue_delay_us=200)
    for version in (1, 2):
        export = p.serving.export_triton("fraud", version=version, repository=home / "triton-repo",
                                         max_batch_size=64, dynamic_batching=batching)
    client.load_model("fraud", export.model_dir)


def _serve(p: Any, requests: list[dict[str, Any]], backend: Any) -> tuple[dict, list[float]]:
    gateway = p.serving.ab_gateway("fraud", "fraud@staging", challenger_fraction=0.2,
                                   experiment_id="fraud-challenger", salt="demo")
    latencies = []
    for r in requests:
        row = {"user_id": r["user_id"], "merchant_id": r["merchant_id"], "amount": r["amount"]}
        t0 = time.perf_counter()
        score = gateway.predict(r["user_id"], [row], backend=backend)["output__0"][0]
        latencies.append(time.perf_counter() - t0)
        gateway.record_outcome(r["user_id"], float((score >= 0.5) == r["is_fraud"]))  # the decision was right
    summary = gateway.summary()
    gateway.close()
    return summary, latencies


def _plant_skew(p: Any, requests: list[dict[str, Any]], rng: np.random.Generator, now: datetime) -> list[int]:
    """A streaming job with a unit bug: it pushes amount_sum_7d in cents, to the online store only."""
    users = sorted({r["user_id"] for r in requests})
    online = p.features.get_online_features(["user_txn_7d:txn_count_7d", "user_txn_7d:amount_sum_7d"],
                                            {"user_id": users})
    active = [(u, c, s) for u, c, s in zip(users, online["txn_count_7d"], online["amount_sum_7d"]) if c]
    picks = np.sort(rng.choice(len(active), size=min(SKEWED_USERS, len(active)), replace=False))
    rows = [{"user_id": active[i][0], "event_timestamp": now, "txn_count_7d": active[i][1],
             "amount_sum_7d": active[i][2] * 100} for i in picks]
    p.features.push("user_txn_7d", rows)
    return [r["user_id"] for r in rows]


def _reach(url: str, home: Path) -> None:
    """Open the online store at ``url`` and read from it once: its ConfigError or OnlineStoreError now, not after
    the last demo was wiped and the steps before materialization ran (a file store in the home opens in the fresh
    folder)."""
    from ..db.engine import sqlite_file
    from ..features.online import open_online_store

    file = sqlite_file(url) if url.lower().startswith("sqlite") else None
    if file is not None and file.expanduser().resolve().is_relative_to(home):
        return
    store = open_online_store(url)
    try:
        store.read([(["demo-probe@1"], [b"probe"])])
    finally:
        store.close()


def run_demo(home: str | Path = "mlplat-demo", *, console: Any = None, online_store: str | None = None,
             triton_url: str | None = None) -> dict[str, Any]:
    """Run the demo in ``home`` (wiped if it holds an earlier demo) and return a summary dict.

    Everything lives under ``home`` (SQLite database and online store, artifacts, data): MLPLAT_*
    environment variables are not used. ``online_store`` (e.g. ``redis://...``) and ``triton_url``
    (gRPC ``host:port`` of a server in explicit model-control mode) opt into those servers.

    Usage::

        from mlplat.demo import run_demo
        summary = run_demo("./mlplat-demo", online_store="redis://127.0.0.1:6379/0")
        summary["skew"]["skewed"]       # ['amount_sum_7d']: the planted bug, found
    """
    try:
        import torch  # noqa: F401 - checked first: the demo trains a torch model
    except ImportError as exc:
        raise ConfigError(f"the demo trains a torch model: pip install 'mlplat[torch]' ({exc})") from None
    import mlplat as mp

    from rich.console import Console

    console = console or Console()
    with ExitStack() as cleanup:
        triton = _triton(triton_url) if triton_url else None  # before anything is written: fail fast
        if triton is not None:
            cleanup.callback(triton.close)
        home = Path(home).expanduser().resolve()
        # settings from the arguments and defaults only: no MLPLAT_* variable points it elsewhere or thins the
        # served log (a sample rate below 1 would hide planted users from the skew check); resolved before the
        # folder is emptied, so a bad URL leaves the last demo as it was
        settings = mp.Settings.resolve(home, online_store=online_store, triton_url=triton_url, environ={})
        check_home(home)  # a folder it may not wipe is refused before anything is written, the store's file too
        _reach(settings.online_store, home)  # as the Triton server: a store it cannot use leaves the last demo be
        fresh_home(home)
        p = mp.Platform(settings=settings)
        cleanup.callback(p.close)
        return _journey(p, console, home, triton, triton_url)


def _journey(p: Any, console: Any, home: Path, triton: Any, triton_url: str | None) -> dict[str, Any]:
    import mlplat as mp

    from .model import FEATURES, train

    step = _Steps(console)
    rng = np.random.default_rng(2026)
    t_start = time.perf_counter()
    with step("data", "generating 200,000 card transactions and daily feature snapshots"):
        start = data_start()
        txns = generate_transactions(start=start)
        write_feature_data(txns, home / "data", DAYS, start)

    definitions = _definitions(mp, home)
    service = definitions[-1]
    with step("apply", "applying 2 entities, 2 feature views and a feature service"):
        applied = p.features.apply(definitions)
    report.definitions(console, applied, definitions)

    with step("training_set", "building a point-in-time correct training set"):
        # labels from day 31 on, once every 30-day window is full (else serving sees a drift of its own)
        labels = txns.select(["user_id", "merchant_id", "event_timestamp", "amount", "is_fraud"]).filter(
            pc.greater_equal(txns.column("event_timestamp"),
                             pa.scalar(start + timedelta(days=30), pa.timestamp("us", "UTC"))))
        train_set = p.features.get_historical_features(labels, service)
    report.training_set(console, train_set, step.timings["training_set"])

    with step("models", "training a champion and a challenger as tracked runs"):
        champion_run, champion_auc = train(p, train_set, service, CHAMPION, name="champion")
        challenger_run, challenger_auc = train(p, train_set, service, CHALLENGER, name="challenger")
        p.models.register("fraud", champion_run, registered_by="data-scientist", description="demo fraud model")
        p.models.register("fraud", challenger_run, registered_by="data-scientist",
                          description="wider network, fewer epochs")
        p.models.promote("fraud", 1, "production", approved_by="risk-lead",
                         notes="validation AUC reviewed in the demo")
        p.models.promote("fraud", 2, "staging", approved_by="risk-lead", notes="A/B test against v1")
    report.models(console, champion_auc, challenger_auc)

    with step("materialize", f"materializing the views into {as_text(hide_password(p.settings.online_store))}"):
        now = datetime.now(timezone.utc)
        materialized = p.features.materialize(end_date=now, progress=False)
        probe = {"user_id": [1, 2, 3, 5000], "merchant_id": ["m0001", "m0002", "m0003", "m0004"]}
        online = p.features.get_online_features(service, probe)
        stamped = pa.table({**probe, "event_timestamp": pa.array([now] * 4, pa.timestamp("us", "UTC"))})
        offline = p.features.get_historical_features(stamped, service)
        consistent = all(online[c] == offline.column(c).to_pylist() for c in FEATURES[1:])
    rows = sum(m.rows for m in materialized)
    report.online(console, rows, online, consistent)

    requests = _requests(txns, rng)
    skewed_users = _plant_skew(p, requests, rng, datetime.now(timezone.utc))
    if triton is not None:
        with step("triton_load", f"exporting fraud v1 and v2 and sending them to Triton at {as_text(triton_url)}"):
            _send_to_triton(p, triton, home)
        backend, where = triton, f"Triton at {as_text(triton_url)}"
    else:
        backend, where = p.serving.local_backend(), "local backend (in process)"
    with step("serve", f"serving {len(requests)} card requests through the A/B gateway on the {where}"):
        ab, latencies = _serve(p, requests, backend)
    report.serving(console, ab, latencies)

    with step("skew", "recomputing the served features offline: training-serving skew"):
        skew = p.monitoring.skew("fraud")
    report.skew(console, skew, skewed_users)

    lineage = p.models.lineage("fraud", stage="production")
    report.lineage(console, lineage)
    total = time.perf_counter() - t_start
    report.closing(console, step.timings, total, home, p.settings)
    found = sorted({m.entity["user_id"] for m in skew.mismatches})
    return {
        "home": str(home), "rows": train_set.num_rows, "columns": train_set.column_names,
        "matched": train_set.num_rows - train_set.column("txn_count_7d").null_count,
        "timings": {**step.timings, "total": total},
        "applied": [(r.kind, r.name, r.version) for r in applied], "materialized": rows, "online": dict(online),
        "consistent": consistent,
        "model": {"run_id": champion_run, "version": 1, "val_auc": champion_auc, "lineage": lineage,
                  "challenger_run_id": challenger_run, "challenger_val_auc": challenger_auc},
        "served": {"backend": where, "requests": len(requests), "p50_ms": float(np.median(latencies) * 1e3),
                   "p99_ms": float(np.percentile(latencies, 99) * 1e3), "ab": ab},
        "skew": {**skew.to_dict(), "planted_users": skewed_users, "found_users": found},
    }
