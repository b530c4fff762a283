"""The model registry: versions, stages and approvals, aliases, lineage."""
from __future__ import annotations

from .registry import STAGES, ModelRegistry, ModelVersionInfo, Transition

__all__ = ["STAGES", "ModelRegistry", "ModelVersionInfo", "Transition"]
