"""The demo's fraud model: a small MLP with its input scaling built in (scriptable, so it serves as is)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["FraudNet"]


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
