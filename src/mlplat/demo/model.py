"""The demo's fraud model: a small MLP with its input scaling built in, trained with the tracking helper.

The network takes raw features (log1p and standardization happen inside, so
it is scriptable and serves as is, on the local backend or on Triton).
``train`` is an ordinary torch loop made a tracked run by ``p.runs.training``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

__all__ = ["FEATURES", "FraudNet", "auc", "features_matrix", "train"]

#: input columns in order: the request's amount, then the four served features
FEATURES = ["amount", "txn_count_7d", "amount_sum_7d", "fraud_rate_30d", "txn_count_30d"]


class FraudNet(torch.nn.Module):
    """Raw features in, fraud probability out; log1p and standardization happen inside."""

    def __init__(self, sample: np.ndarray, hidden: int = 16) -> None:
        super().__init__()
        logged = np.log1p(np.clip(sample, 0, None))
        self.register_buffer("mean", torch.tensor(logged.mean(axis=0), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(logged.std(axis=0) + 1e-6, dtype=torch.float32))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(sample.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (torch.log1p(torch.clamp(x, min=0.0)) - self.mean) / self.std
        return torch.sigmoid(self.net(z))


def features_matrix(table: pa.Table) -> np.ndarray:
    """The FEATURES columns of a training set as float32, nulls (no recent activity) as 0."""
    cols = [table.column(c).cast(pa.float64()).fill_null(0.0).to_numpy() for c in FEATURES]
    return np.column_stack(cols).astype(np.float32)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties averaged).

    >>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    pos = labels.sum()
    neg = len(labels) - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg)) if pos and neg else float("nan")


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the block, the caller's setting back after it (the demo may run in a notebook):
    a net this small in batches of 2,048 trains faster on one, and steadily on a busy machine (2 threads
    spent 10-16 s against 3-6 s on one when 2 other processes kept the 2 cores busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(p: Any, train_set: pa.Table, service: Any, cfg: dict[str, Any], name: str = "") -> tuple[str, float]:
    """Train FraudNet on ``train_set`` (rows in time order; the last fifth validates) as a tracked run.

    Returns the run id and the final validation AUC.
    """
    x = features_matrix(train_set)
    y = train_set.column("is_fraud").to_numpy(zero_copy_only=False).astype(np.float32)
    cut = int(len(y) * 0.8)
    torch.manual_seed(cfg["seed"])
    model = FraudNet(x[:cut], hidden=cfg["hidden"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    xt, yt, xv = torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut]), torch.from_numpy(x[cut:])
    val_auc = float("nan")
    with _one_torch_thread(), p.runs.training(  # the three lines that track a loop
            "fraud-demo", config=cfg, data=train_set, features=service, model=model, example_input=xv[:2],
            columns=FEATURES, name=name) as t:
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
                val_auc = auc(model(xv).squeeze(1).numpy(), y[cut:])
            t.epoch(loss=total / len(xt), val_auc=val_auc)
    return t.id, val_auc
