"""The feature store: definitions, catalog, offline point-in-time retrieval, online store, materialization."""
from __future__ import annotations

from .catalog import ApplyResult, CatalogEntry
from .definitions import Entity, FeatureService, FeatureView, Field, ParquetSource, parse_ref
from .materialize import MaterializeResult
from .online_read import OnlineResponse
from .store import FeatureStore

__all__ = [
    "ApplyResult",
    "CatalogEntry",
    "Entity",
    "FeatureService",
    "FeatureStore",
    "FeatureView",
    "Field",
    "MaterializeResult",
    "OnlineResponse",
    "ParquetSource",
    "parse_ref",
]
