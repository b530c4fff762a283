"""mlplat: from idea to production model, with one answer to "what is in production, trained on what?".

Usage::

    import mlplat as mp
    p = mp.Platform("./mlplat-home")
    user = mp.Entity("user", join_keys=["user_id"])
    ...
    train = p.features.get_historical_features(entity_df, ["user_txn:txn_count_7d"])
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _native  # noqa: F401  (fails loudly if the extensions were not built)
from . import errors
from .errors import (
    ConfigError,
    DataError,
    DefinitionError,
    InferenceTimeoutError,
    MlplatError,
    ModelNotReadyError,
    NativeExtensionError,
    NotFoundError,
    OnlineStoreError,
    QueueFullError,
    SchemaVersionError,
    ServingError,
    StoreError,
)

if TYPE_CHECKING:  # what the names below load when first used, for type checkers and editors
    from . import dtypes
    from .dtypes import Bool, Bytes, DType, Float32, Float64, Int8, Int16, Int32, Int64, String, Timestamp
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

#: public name -> the module that defines it, imported when the name is first used: ``import mlplat`` loads
#: the native extensions and the errors only, so the CLI starts (and answers --help or Ctrl-C) at once
_LAZY = {
    **dict.fromkeys(["Bool", "Bytes", "DType", "Float32", "Float64", "Int8", "Int16", "Int32", "Int64", "String",
                     "Timestamp"], "dtypes"),
    **dict.fromkeys(["ApplyResult", "CatalogEntry", "Entity", "FeatureService", "FeatureView", "Field",
                     "MaterializeResult", "OnlineResponse", "ParquetSource"], "features"),
    "ModelVersionInfo": "models",
    **dict.fromkeys(["DriftReport", "SkewReport"], "monitoring"),
    "Platform": "platform",
    **dict.fromkeys(["RunInfo", "Signature", "TensorSpec", "table_hash"], "runs"),
    **dict.fromkeys(["ABGateway", "AsyncTritonClient", "DynamicBatching", "LocalBackend", "Prediction", "QueuePolicy",
                     "TritonClient", "TritonServer"], "serving"),
    "Settings": "settings",
}
_SUBPACKAGES = frozenset({"cli", "db", "demo", "dtypes", "features", "models", "monitoring", "platform", "runs",
                          "serving", "settings"})


def _export(names: list[str]) -> None:
    """Bind ``names`` here, shown as ``mlplat.<name>`` (as users import them)."""
    for name in names:
        obj = globals()[name] if name in globals() else getattr(
            importlib.import_module(f".{_LAZY[name]}", __name__), name)
        if isinstance(obj, type) or callable(obj):
            obj.__module__ = "mlplat"
        globals()[name] = obj


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562); every name of that module is bound then."""
    module = _LAZY.get(name)
    if module is not None:
        _export([n for n, m in _LAZY.items() if m == module])
        return globals()[name]
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mlplat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_export([n for n in __all__ if n not in _LAZY and n not in ("dtypes", "errors")])
