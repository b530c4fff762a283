"""The demo's data: card transactions with a learnable fraud signal, and daily feature snapshots.

``generate_transactions`` draws users, merchants (Zipf-popular), amounts
(log-normal, scaled per user) and fraud labels (risky merchants, unusually
large amounts) over the 90 days up to today. ``write_feature_data`` turns
them into two Parquet feature sources stamped at the end of each day: per
user, the count and sum of the last 7 days' transactions; per merchant, the
fraud rate and count over the last 30 days.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError

__all__ = ["generate_transactions", "write_feature_data", "fresh_home", "data_start", "DAYS"]

_MARKER = ".mlplat-demo"
DAY_US = 86_400 * 1_000_000
DAYS = 90


def data_start() -> datetime:
    """Midnight UTC, DAYS days ago: the data always ends today, so online values are fresh."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=DAYS - 1)


def check_home(home: Path) -> None:
    """ConfigError unless ``home`` is new, empty or a folder an earlier demo made (the demo wipes it)."""
    if home.exists() and any(home.iterdir()) and not (home / _MARKER).exists():
        raise ConfigError(f"{home} exists and is not a demo folder; pass an empty or new folder with --home")


def fresh_home(home: Path) -> None:
    check_home(home)
    if home.exists() and any(home.iterdir()):
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
    start = start or data_start()
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


def write_feature_data(txns: pa.Table, data: Path, days: int, start: datetime) -> None:
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
