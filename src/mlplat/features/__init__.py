"""The feature store: definitions, catalog, offline point-in-time retrieval."""
from __future__ import annotations

from .catalog import ApplyResult, CatalogEntry
from .definitions import Entity, FeatureService, FeatureView, Field, ParquetSource, parse_ref
from .store import FeatureStore

__all__ = [
    "ApplyResult",
    "CatalogEntry",
    "Entity",
    "FeatureService",
    "FeatureStore",
    "FeatureView",
    "Field",
    "ParquetSource",
    "parse_ref",
]
