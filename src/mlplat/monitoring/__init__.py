"""Monitoring: training-serving skew, drift, and whether the platform is being used."""
from __future__ import annotations

from .drift import DriftReport, FeatureDrift
from .service import Monitoring
from .skew import FeatureSkew, Mismatch, SkewReport

__all__ = ["DriftReport", "FeatureDrift", "FeatureSkew", "Mismatch", "Monitoring", "SkewReport"]
