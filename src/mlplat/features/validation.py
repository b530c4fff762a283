"""One check of a feature view against its source files, used at apply and at retrieval.

At ``apply`` it finds the join key types and raises DefinitionError; at
retrieval it compares against the key types recorded by ``apply`` and raises
StoreError, since then the files changed after the view was accepted.
"""
from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from .. import _arrow, dtypes
from ..errors import DataError, MlplatError
from .definitions import FeatureView
from .parquet import ParquetFiles

__all__ = ["check_source", "key_values"]


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
            if pa.types.is_null(t):  # None in every row of this file (pandas): its rows match nothing
                continue
            kind = dtypes.key_kind(t)
            if kind is None:
                raise error(f"{where}: join key {k!r} is {t} in {path}; keys must be integers or strings")
            expected = key_types.setdefault(k, kind)
            if expected != kind:
                applied = " but the view was applied with" if applied_key_types else " in another file, and"
                raise error(f"{where}: join key {k!r} is {kind} in {path},{applied} {expected} keys")
        for name in filter(None, (src.timestamp_field, src.created_timestamp_field)):
            t = column(name, "timestamp field")
            if not (_arrow.is_timestamp_type(t) or pa.types.is_null(t)):  # null: untimed rows, as a null time
                raise error(f"{where}: timestamp field {name!r} is {t} in {path}, not a timestamp")
        for f in features:
            t = column(f, "field")
            declared = view.field(f).dtype
            if not (declared.accepts(t) or pa.types.is_null(t)):  # an all-null column (pandas' None) is any type
                raise error(f"{where}: field {f!r} is declared {declared.name} but the source {path} holds {t}")
    untyped = [k for k in view.join_keys if k not in key_types]
    if untyped and files.paths:
        raise error(f"{where}: join key {untyped[0]!r} is null in every row of every file of its source (Arrow's "
                    "null type, as pandas writes a column of None), so whether its keys are integers or strings "
                    "is unknown; add a file that holds them")
    return key_types


def key_values(column: pa.Array | pa.ChunkedArray, name: str, where: str) -> pa.Array:
    """A given join key column (entity rows, pushed rows) as one array: a dictionary (pandas category) column
    decoded, and unsigned keys above the int64 range, which keys are stored as, refused with a DataError.

    >>> key_values(pa.chunked_array([pa.array([7, 3]).dictionary_encode()]), "user_id", "entity_df").type
    DataType(int64)
    >>> key_values(pa.array([2**63], pa.uint64()), "user_id", "entity_df")
    Traceback (most recent call last):
    mlplat.DataError: entity_df: join key 'user_id' holds 9223372036854775808, above the largest int64 key (2**63 - 1)
    """
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(col.type):
        values = col.type.value_type
        if pa.types.is_string_view(values) or pa.types.is_binary_view(values):  # no take kernel for views
            wide = pa.large_string() if pa.types.is_string_view(values) else pa.large_binary()
            col = col.cast(pa.dictionary(col.type.index_type, wide))
        col = col.dictionary_decode()
    if pa.types.is_uint64(col.type) and len(col) > col.null_count:
        top = pc.max(col).as_py()
        if top > _arrow.INT64_MAX:
            raise DataError(f"{where}: join key {name!r} holds {top}, above the largest int64 key (2**63 - 1)")
    return col
