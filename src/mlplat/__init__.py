"""mlplat: from idea to production model, with one answer to "what is in production, trained on what?".

Usage::

    import mlplat as mp
    p = mp.Platform("./mlplat-home")
    user = mp.Entity("user", join_keys=["user_id"])
    ...
    train = p.features.get_historical_features(entity_df, ["user_txn:txn_count_7d"])
"""
from __future__ import annotations

from . import _native  # noqa: F401  (fails loudly if the extensions were not built)
from . import dtypes, errors
from .dtypes import Bool, Bytes, DType, Float32, Float64, Int8, Int16, Int32, Int64, String, Timestamp
from .errors import (
    ConfigError,
    DataError,
    DefinitionError,
    MlplatError,
    NativeExtensionError,
    InferenceTimeoutError,
    ModelNotReadyError,
    NotFoundError,
    OnlineStoreError,
    QueueFullError,
    SchemaVersionError,
    ServingError,
    StoreError,
)
from .features import (
    ApplyResult,
    CatalogEntry,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    MaterializeResult,
    OnlineResponse,
    ParquetSource,
)
from .models import ModelVersionInfo
from .monitoring import DriftReport, SkewReport
from .platform import Platform
from .runs import RunInfo, Signature, TensorSpec, table_hash
from .serving import (
    ABGateway,
    AsyncTritonClient,
    DynamicBatching,
    LocalBackend,
    Prediction,
    QueuePolicy,
    TritonClient,
    TritonServer,
)
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "Platform",
    "Settings",
    # feature definitions
    "Entity",
    "Field",
    "FeatureView",
    "FeatureService",
    "ParquetSource",
    "ApplyResult",
    "CatalogEntry",
    "MaterializeResult",
    "OnlineResponse",
    # runs and models
    "RunInfo",
    "ModelVersionInfo",
    "Signature",
    "TensorSpec",
    "table_hash",
    # serving
    "TritonClient",
    "AsyncTritonClient",
    "TritonServer",
    "LocalBackend",
    "DynamicBatching",
    "QueuePolicy",
    "ABGateway",
    "Prediction",
    # monitoring
    "SkewReport",
    "DriftReport",
    # dtypes
    "DType",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "Float32",
    "Float64",
    "Bool",
    "String",
    "Bytes",
    "Timestamp",
    # errors
    "MlplatError",
    "ConfigError",
    "DefinitionError",
    "NotFoundError",
    "DataError",
    "StoreError",
    "SchemaVersionError",
    "OnlineStoreError",
    "ServingError",
    "ModelNotReadyError",
    "QueueFullError",
    "InferenceTimeoutError",
    "NativeExtensionError",
    "dtypes",
    "errors",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        _obj.__module__ = "mlplat"
del _name, _obj
