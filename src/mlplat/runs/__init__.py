"""Experiment tracking: experiments, runs, params, metrics, inputs, artifacts, search."""
from __future__ import annotations

from .artifacts import ArtifactStore
from .datahash import table_hash
from .run import ActiveRun
from .torch_io import Signature, TensorSpec
from .tracking import MetricPoint, RunInfo, RunPage, RunStore
from .training import Training

__all__ = ["ActiveRun", "ArtifactStore", "MetricPoint", "RunInfo", "RunPage", "RunStore", "Signature",
           "TensorSpec", "Training", "table_hash"]
