"""One check of a feature view against its source files, used at apply and at retrieval.

At ``apply`` it finds the join key types and raises DefinitionError; at
retrieval it compares against the key types recorded by ``apply`` and raises
StoreError, since then the files changed after the view was accepted.
"""
from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from .. import _arrow, dtypes
from ..errors import MlplatError
from .definitions import FeatureView
from .parquet import ParquetFiles

__all__ = ["check_source"]


def check_source(
    view: FeatureView,
    files: ParquetFiles,
    features: Sequence[str],
    *,
    error: type[MlplatError],
    applied_key_types: dict[str, str] | None = None,
) -> dict[str, str]:
    """Check every file holds the view's keys, timestamps and ``features`` readably; return key types."""
    where = f"feature view {view.name!r}"
    src = view.source
    key_types: dict[str, str] = dict(applied_key_types or {})
    for path, schema in files.schemas():
        def column(name: str, what: str, schema: pa.Schema = schema, path: str = path) -> pa.DataType:
            idx = schema.get_field_index(name)
            if idx < 0:
                raise error(f"{where}: {what} {name!r} is missing from the source {path} "
                            f"(its columns: {', '.join(schema.names)})")
            return schema.field(idx).type

        for k in view.join_keys:
            t = column(k, "join key")
            kind = dtypes.key_kind(t)
            if kind is None:
                raise error(f"{where}: join key {k!r} is {t} in {path}; keys must be integers or strings")
            expected = key_types.setdefault(k, kind)
            if expected != kind:
                applied = " but the view was applied with" if applied_key_types else " in another file, and"
                raise error(f"{where}: join key {k!r} is {kind} in {path},{applied} {expected} keys")
        for name in filter(None, (src.timestamp_field, src.created_timestamp_field)):
            t = column(name, "timestamp field")
            if not _arrow.is_timestamp_type(t):
                raise error(f"{where}: timestamp field {name!r} is {t} in {path}, not a timestamp")
        for f in features:
            t = column(f, "field")
            declared = view.field(f).dtype
            if not declared.accepts(t):
                raise error(f"{where}: field {f!r} is declared {declared.name} but the source {path} holds {t}")
    return key_types
