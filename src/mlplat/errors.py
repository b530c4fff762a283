"""mlplat's exceptions: one tree, rooted at :class:`MlplatError`.

::

    MlplatError
     ├── ConfigError            settings, URLs, environment variables
     ├── DefinitionError        an invalid Entity / FeatureView / source / service
     ├── NotFoundError          an unknown view, feature, entity, service (also a KeyError)
     ├── DataError              input data with a missing column, wrong type, null timestamp
     ├── StoreError             a backend failed: database, Parquet files, online store
     │    ├── SchemaVersionError   the database schema is newer than this mlplat
     │    └── OnlineStoreError     the online store is unreachable, timed out or answered wrongly
     ├── ServingError           a model server failed a request
     │    ├── ModelNotReadyError    the model (or the server) is not loaded, not ready or unknown
     │    ├── QueueFullError        the server's queue for the model is full
     │    └── InferenceTimeoutError the request waited or ran past its time-out
     └── NativeExtensionError   a native extension is missing (also an ImportError)

Every message says what was wrong and, where it can, what to do about it.
Catch :class:`MlplatError` to handle anything mlplat raises on purpose.
"""
from __future__ import annotations

__all__ = [
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
]


class MlplatError(Exception):
    """Base class of every error mlplat raises on purpose."""


class ConfigError(MlplatError, ValueError):
    """A setting, URL or environment variable is invalid."""


class DefinitionError(MlplatError, ValueError):
    """A feature definition is invalid (unknown dtype, duplicate field, field missing from its source, ...)."""


class NotFoundError(MlplatError, KeyError):
    """Something asked for by name does not exist (a view, a feature, an entity, a service)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(MlplatError, ValueError):
    """Input data does not fit: a missing column, a wrong type, a null timestamp."""


class StoreError(MlplatError):
    """A storage backend failed or holds something unreadable (database, Parquet files, online store)."""


class SchemaVersionError(StoreError):
    """The database was migrated by a newer mlplat than this one."""


class OnlineStoreError(StoreError):
    """The online store (Redis, Redis Cluster, SQLite) failed; the message names the store."""


class ServingError(MlplatError):
    """A model server (Triton, or the local backend) failed a request; the message names model and server."""


class ModelNotReadyError(ServingError):
    """The model is unknown, not loaded or not ready, or the server cannot be reached."""


class QueueFullError(ServingError):
    """The server refused the request: the model's queue is full."""


class InferenceTimeoutError(ServingError):
    """The request waited in the queue or ran longer than its time-out."""


class NativeExtensionError(MlplatError, ImportError):
    """A compiled extension under ``mlplat._native`` could not be imported."""
