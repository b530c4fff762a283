"""``mlplat demo``: the fintech story on embedded defaults, in a fresh folder.

Today it covers the feature store: generate a transactions data set (the 90
days up to today), define user and merchant feature views over Parquet, apply
them, build a point-in-time correct training set for a fraud model, then
materialize the views and read them back online, checking that the online
answer equals the offline one at the same moment.

Usage::

    from mlplat.demo import run_demo
    summary = run_demo("./mlplat-demo")
"""
from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError

__all__ = ["run_demo", "generate_transactions"]

_MARKER = ".mlplat-demo"
DAY_US = 86_400 * 1_000_000
DAYS = 90


def _start() -> datetime:
    """Midnight UTC, DAYS days ago: the data always ends today, so online values are fresh."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=DAYS - 1)


def _fresh_home(home: Path) -> None:
    if home.exists() and any(home.iterdir()):
        if not (home / _MARKER).exists():
            raise ConfigError(f"{home} exists and is not a demo folder; pass an empty or new folder with --home")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / _MARKER).write_text("created by `mlplat demo`; the demo wipes this folder when it runs again\n")


def generate_transactions(n_users: int = 2_000, n_merchants: int = 200, n_txns: int = 200_000, days: int = DAYS,
                          seed: int = 7, start: datetime | None = None) -> pa.Table:
    """Card transactions with a learnable fraud signal: risky merchants, bursts, large amounts.

    >>> t = generate_transactions(50, 5, 1_000, 10)
    >>> t.num_rows, t.column_names[:3]
    (1000, ['txn_id', 'user_id', 'merchant_id'])
    """
    rng = np.random.default_rng(seed)
    start = start or _start()
    user = rng.integers(0, n_users, n_txns)
    merchant = rng.zipf(1.6, n_txns) % n_merchants
    ts = np.sort(rng.integers(0, days * DAY_US, n_txns))
    merchant_risk = rng.beta(1, 30, n_merchants)
    user_scale = rng.lognormal(3.5, 0.6, n_users)
    amount = np.round(rng.lognormal(0, 0.8, n_txns) * user_scale[user], 2)
    logit = -5.0 + 40 * merchant_risk[merchant] + 1.2 * (amount > 3 * user_scale[user])
    is_fraud = rng.random(n_txns) < 1 / (1 + np.exp(-logit))
    return pa.table({
        "txn_id": np.arange(n_txns),
        "user_id": user,
        "merchant_id": pa.array([f"m{m:04d}" for m in merchant]),
        "event_timestamp": pa.array(ts + int(start.timestamp() * 1e6), pa.timestamp("us", "UTC")),
        "amount": amount,
        "is_fraud": is_fraud,
    })


def _rolling_daily(keys: np.ndarray, day: np.ndarray, values: np.ndarray, n_keys: int, days: int,
                   window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per key and day: count and sum over the last ``window`` days (keys x days matrices)."""
    count = np.zeros((n_keys, days + 1))
    total = np.zeros((n_keys, days + 1))
    np.add.at(count, (keys, day + 1), 1)
    np.add.at(total, (keys, day + 1), values)
    count, total = count.cumsum(axis=1), total.cumsum(axis=1)
    lagged = lambda m: np.concatenate([np.zeros((n_keys, window)), m[:, :-window]], axis=1)  # noqa: E731
    return (count - lagged(count))[:, 1:], (total - lagged(total))[:, 1:]


def _write_daily(folder: Path, key_name: str, key_values, columns: dict[str, np.ndarray], active: np.ndarray,
                 dtypes: dict[str, pa.DataType], start: datetime) -> None:
    """One row per (key, day) where ``active``, stamped at the end of the day, one file per 30 days."""
    folder.mkdir(parents=True, exist_ok=True)
    k, d = np.nonzero(active)
    order = np.lexsort((k, d))
    k, d = k[order], d[order]
    ts = (d + 1) * DAY_US - 1 + int(start.timestamp() * 1e6)
    for part, lo in enumerate(range(0, int(d.max()) + 1, 30)):
        sel = (d >= lo) & (d < lo + 30)
        pq.write_table(pa.table({
            key_name: pa.array(np.asarray(key_values)[k[sel]]),
            "event_timestamp": pa.array(ts[sel], pa.timestamp("us", "UTC")),
            **{name: pa.array(values[k[sel], d[sel]], dtypes[name]) for name, values in columns.items()},
        }), folder / f"part-{part:03d}.parquet")


def _feature_data(txns: pa.Table, data: Path, days: int, start: datetime) -> None:
    user = txns.column("user_id").to_numpy()
    merchant_codes = txns.column("merchant_id").dictionary_encode().combine_chunks()
    merchant = merchant_codes.indices.to_numpy()
    day = (txns.column("event_timestamp").cast(pa.int64()).to_numpy() - int(start.timestamp() * 1e6)) // DAY_US
    amount = txns.column("amount").to_numpy()
    fraud = txns.column("is_fraud").to_numpy(zero_copy_only=False).astype(float)
    n_users = int(user.max()) + 1
    cnt, amt = _rolling_daily(user, day, amount, n_users, days, 7)
    _write_daily(data / "user_txn_7d", "user_id", np.arange(n_users),
                 {"txn_count_7d": cnt.astype(np.int64), "amount_sum_7d": amt}, cnt > 0,
                 {"txn_count_7d": pa.int64(), "amount_sum_7d": pa.float64()}, start)
    n_m = len(merchant_codes.dictionary)
    m_cnt, m_fraud = _rolling_daily(merchant, day, fraud, n_m, days, 30)
    rate = np.divide(m_fraud, m_cnt, out=np.zeros_like(m_fraud), where=m_cnt > 0)
    _write_daily(data / "merchant_30d", "merchant_id", merchant_codes.dictionary.to_pylist(),
                 {"fraud_rate_30d": rate, "txn_count_30d": m_cnt.astype(np.int64)}, m_cnt > 0,
                 {"fraud_rate_30d": pa.float32(), "txn_count_30d": pa.int64()}, start)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def run_demo(home: str | Path = "mlplat-demo", *, console: Any = None, online_store: str | None = None) -> dict:
    """Run the demo in ``home`` (wiped if it holds an earlier demo) and return a summary dict."""
    import mlplat as mp

    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    home = Path(home).expanduser().resolve()
    _fresh_home(home)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    with console.status("generating 200,000 card transactions and daily feature snapshots"):
        start = _start()
        txns = generate_transactions(start=start)
        _feature_data(txns, home / "data", DAYS, start)
    timings["data"] = time.perf_counter() - t0

    p = mp.Platform(home, online_store=online_store)
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
    applied = p.features.apply([user, merchant, user_txn, merchant_risk, service])

    t1 = time.perf_counter()
    labels = txns.select(["user_id", "merchant_id", "event_timestamp", "amount", "is_fraud"]).slice(20_000)
    train = p.features.get_historical_features(labels, service)
    timings["training_set"] = time.perf_counter() - t1

    t_model = time.perf_counter()
    model_summary = _train_and_register(p, train, service, console)
    timings["model"] = time.perf_counter() - t_model

    t2 = time.perf_counter()
    now = datetime.now(timezone.utc)
    materialized = p.features.materialize(end_date=now, progress=False)
    timings["materialize"] = time.perf_counter() - t2
    probe = {"user_id": [1, 2, 3, 5000], "merchant_id": ["m0001", "m0002", "m0003", "m0004"]}
    for attempt in ("online_first_read", "online_read"):  # the first read also loads the definitions
        t3 = time.perf_counter()
        online = p.features.get_online_features(service, probe)
        timings[attempt] = time.perf_counter() - t3
    stamped = pa.table({**probe, "event_timestamp": pa.array([now] * 4, pa.timestamp("us", "UTC"))})
    offline = p.features.get_historical_features(stamped, service)
    consistent = all(online[c] == offline.column(c).to_pylist() for c in train.column_names[-4:])
    p.close()

    console.rule("[bold]mlplat demo: features")
    defs = Table("kind", "name", "version", "description")
    for r, obj in zip(applied, [user, merchant, user_txn, merchant_risk, service]):
        defs.add_row(r.kind, r.name, str(r.version), obj.description)
    console.print(defs)
    shown = ["user_id", "merchant_id", "event_timestamp", "is_fraud", "txn_count_7d", "amount_sum_7d",
             "fraud_rate_30d"]
    head = Table(*shown, title="point-in-time training set (first rows)")
    for row in train.select(shown).slice(0, 5).to_pylist():
        head.add_row(*[_cell(v) for v in row.values()])
    console.print(head)
    matched = train.num_rows - train.column("txn_count_7d").null_count
    console.print(
        f"training set: {train.num_rows:,} rows x {train.num_columns} columns in {timings['training_set']:.2f} s; "
        f"{matched:,} rows have user features"
        + (" (the others had no card activity in the 7 days before)" if matched < train.num_rows else "")
    )
    rows = sum(m.rows for m in materialized)
    console.print(f"materialized {rows:,} entities into {p.settings.online_store} in {timings['materialize']:.2f} s")
    look = Table(*online.keys(), title="online lookup (user 5000 does not exist: None)")
    for values in zip(*online.values()):
        look.add_row(*[_cell(v) for v in values])
    console.print(look)
    console.print(f"online read of 4 entities x 2 views: {timings['online_read'] * 1000:.2f} ms "
                  f"(first read, loading the definitions: {timings['online_first_read'] * 1000:.2f} ms); "
                  f"equals offline retrieval at the same moment: {'yes' if consistent else 'NO'}")
    if model_summary:
        _print_model(console, model_summary)
    console.print(f"home: {home}  (database {p.settings.database_url})")
    if model_summary:
        console.print(f"next: mlplat --home {home} models lineage fraud --verify")
    return {"home": str(home), "rows": train.num_rows, "columns": train.column_names, "matched": matched,
            "timings": timings, "applied": [(r.kind, r.name, r.version) for r in applied],
            "materialized": rows, "online": dict(online), "consistent": consistent, "model": model_summary}


FEATURES = ["amount", "txn_count_7d", "amount_sum_7d", "fraud_rate_30d", "txn_count_30d"]


def _matrix(table: pa.Table) -> np.ndarray:
    cols = [table.column(c).cast(pa.float64()).fill_null(0.0).to_numpy() for c in FEATURES]
    return np.column_stack(cols).astype(np.float32)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties averaged)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    pos = labels.sum()
    neg = len(labels) - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)) if pos and neg else float("nan")


def _train_and_register(p, train: pa.Table, service, console) -> dict | None:
    """Train a small fraud model on the training set with the tracking helper, register and approve it."""
    try:
        import torch

        from ._demo_model import FraudNet
    except ImportError:
        console.print("[yellow]torch is not installed: skipping the model (pip install 'mlplat[torch]')")
        return None
    x = _matrix(train)
    y = train.column("is_fraud").to_numpy(zero_copy_only=False).astype(np.float32)
    cut = int(len(y) * 0.8)  # rows are in time order: validate on the last fifth
    cfg = {"lr": 0.01, "epochs": 8, "batch_size": 2048, "hidden": 16, "seed": 7}
    torch.manual_seed(cfg["seed"])
    model = FraudNet(x[:cut], hidden=cfg["hidden"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    xt, yt = torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut])
    xv = torch.from_numpy(x[cut:])
    with console.status("training a fraud model (tracked run)"), p.runs.training(
        "fraud-demo", config=cfg, data=train, features=service, model=model, example_input=xv[:2],
        columns=FEATURES,
    ) as t:
        for _ in range(cfg["epochs"]):
            perm = torch.randperm(len(xt))
            total = 0.0
            for i in range(0, len(xt), cfg["batch_size"]):
                idx = perm[i : i + cfg["batch_size"]]
                optimizer.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy(model(xt[idx]).squeeze(1), yt[idx])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            with torch.no_grad():
                val_auc = _auc(model(xv).squeeze(1).numpy(), y[cut:])
            t.epoch(loss=total / len(xt), val_auc=val_auc)
    version = p.models.register("fraud", t.id, registered_by="data-scientist", description="demo fraud model")
    p.models.promote("fraud", version.version, "production", approved_by="risk-lead",
                     notes="validation AUC reviewed in the demo")
    lineage = p.models.lineage("fraud", stage="production")
    return {"run_id": t.id, "version": version.version, "val_auc": val_auc, "lineage": lineage}


def _print_model(console, summary: dict) -> None:
    lin = summary["lineage"]
    data = lin["data"][0]
    console.rule("[bold]mlplat demo: model")
    console.print(f"trained in run {lin['run']['id']} (experiment {lin['run']['experiment']!r}), "
                  f"validation AUC {summary['val_auc']:.3f}")
    console.print(f"registered as fraud v{lin['version']} by {lin['registered_by']}; in production, approved by "
                  f"{lin['approvals'][-1]['approved_by']}")
    console.print(f"git commit: {lin['git']['commit'] or 'not in a git repository'}"
                  + (" (uncommitted changes)" if lin["git"]["dirty"] == "true" else ""))
    console.print(f"training data: {data['row_count']:,} rows, hash {data['content_hash']}")
    console.print("feature refs: " + ", ".join(data["feature_refs"]))
