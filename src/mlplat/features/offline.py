"""Point-in-time correct retrieval from the offline (Parquet) store.

For each view asked for, :func:`join_view` factorizes the join keys (C++),
reads only the row groups that can match (:mod:`.parquet`), runs the as-of
kernel (Cython) to pick one source row per entity row, and gathers the
feature values of the picked rows. :func:`historical_features` validates the
request, runs one join per view and assembles the result in the order the
contract of DESIGN.md fixes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat

from .. import _arrow, dtypes
from .._native import KeyFactorizer, asof_backward_on_ts_by_key
from ..errors import DataError, StoreError
from .definitions import FeatureView
from .parquet import ParquetFiles, Scan, gather, plan_scan
from .validation import check_source, key_values

__all__ = ["ViewRequest", "historical_features", "join_view", "entity_timestamps", "as_declared"]


@dataclass
class ViewRequest:
    """Features of one view to retrieve, and the names they get in the output."""

    view: FeatureView
    features: list[str]
    output_names: list[str]


def entity_timestamps(table: pa.Table, column: str) -> np.ndarray:
    """The entity rows' timestamps as int64 UTC ns; a missing, mistyped or null column is a DataError."""
    if column not in table.column_names:
        raise DataError(
            f"entity_df has no timestamp column {column!r} (columns: {', '.join(table.column_names)}); "
            "pass timestamp_column= to name it"
        )
    col = table.column(column)
    if not _arrow.is_timestamp_type(col.type):
        raise DataError(f"entity_df column {column!r} must hold timestamps, found {col.type}")
    if col.null_count:
        first = int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(
            f"entity_df column {column!r} has {col.null_count} null timestamps (first at row {first}); "
            "every entity row needs a time"
        )
    try:
        return _arrow.timestamps_ns(col)
    except pa.ArrowInvalid as exc:
        raise DataError(f"entity_df column {column!r}: {exc}") from None


def historical_features(
    entity_table: pa.Table,
    requests: Sequence[ViewRequest],
    order: Sequence[str],
    *,
    timestamp_column: str,
    threads: int,
) -> pa.Table:
    """Entity rows in order with all their columns, then the features named ``order``."""
    clash = [n for n in order if n in entity_table.column_names]
    if clash:
        raise DataError(
            f"feature {clash[0]!r} has the name of an entity_df column; rename the column or pass "
            "full_feature_names=True"
        )
    ts = entity_timestamps(entity_table, timestamp_column)
    columns: dict[str, pa.Array] = {}
    for req in requests:
        columns.update(zip(req.output_names, join_view(req.view, req.features, entity_table, ts, threads)))
    out = entity_table
    for name in order:
        out = out.append_column(name, columns[name])
    return out


def _entity_keys(view: FeatureView, table: pa.Table) -> list[pa.Array]:
    keys = []
    for k in view.join_keys:
        if k not in table.column_names:
            raise DataError(
                f"entity_df has no column {k!r}, a join key of feature view {view.name!r} "
                f"(columns: {', '.join(table.column_names)})"
            )
        col = key_values(table.column(k), k, "entity_df")
        kind = dtypes.key_kind(col.type)
        want = view.key_types.get(k)
        if pat.is_null(col.type):
            col = pa.nulls(len(col), pa.int64() if want == "int" else pa.string())
        elif kind != want:
            hint = " (pandas turns an int column with missing values into float: use .astype('Int64'))" \
                if pat.is_floating(col.type) and want == "int" else ""
            raise DataError(
                f"join key {k!r} is {col.type} in entity_df but {want} in feature view {view.name!r}{hint}"
            )
        keys.append(col)
    return keys


def _window(view: FeatureView, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive [lo, hi] of source event times each entity row may see."""
    if view.ttl is None:
        return np.full(len(ts), _arrow.INT64_MIN, dtype=np.int64), ts
    ttl = _arrow.timedelta_ns(view.ttl)
    lo = ts - ttl
    lo[ts < _arrow.INT64_MIN + ttl] = _arrow.INT64_MIN  # no wrap-around near the int64 floor
    return lo, ts


def join_view(
    view: FeatureView, features: Sequence[str], entity_table: pa.Table, ts: np.ndarray, threads: int
) -> list[pa.Array]:
    """The values of ``features`` for every entity row, by the point-in-time rule."""
    n = entity_table.num_rows
    fields = [view.field(f) for f in features]  # NotFoundError names an unknown feature
    keys = _entity_keys(view, entity_table)
    factorizer = KeyFactorizer(keys)
    valid = factorizer.codes >= 0
    lo, hi = _window(view, ts)
    if not valid.any():
        return [pa.nulls(n, f.dtype.arrow) for f in fields]

    src = view.source
    files = ParquetFiles(src, threads)
    check_source(view, files, features, error=StoreError, applied_key_types=view.key_types)
    int_key = None
    if len(keys) == 1 and view.key_types[view.join_keys[0]] == "int":
        mm = pc.min_max(keys[0]).as_py()
        int_key = (view.join_keys[0], mm["min"], mm["max"])
    scan = plan_scan(files, ts_field=src.timestamp_field, ts_range=(int(lo[valid].min()), int(hi[valid].max())),
                     int_key=int_key)
    right_key, right_ts, right_created = _scan_arrays(view, scan, factorizer, threads)
    picked = asof_backward_on_ts_by_key(
        right_key, right_ts, right_created, factorizer.codes, lo, hi, factorizer.size, threads
    )
    del right_key, right_ts, right_created
    return _gather_features(files, scan, picked, fields, threads)


def _scan_arrays(
    view: FeatureView, scan: Scan, factorizer: KeyFactorizer, threads: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Key codes, event times and created times (int64 ns) of every scanned row, in read order."""
    src = view.source
    codes = np.empty(scan.n_rows, dtype=np.int64)
    ts = np.empty(scan.n_rows, dtype=np.int64)
    created = np.empty(scan.n_rows if src.created_timestamp_field else 0, dtype=np.int64)
    ts_cols = [src.timestamp_field] + ([src.created_timestamp_field] if src.created_timestamp_field else [])
    null_ts = []

    def consume(table: pa.Table, start: int) -> None:
        stop = start + table.num_rows
        try:  # an unsigned key above int64 or a time outside int64 ns is the source's problem
            factorizer.lookup([table.column(k) for k in view.join_keys], codes[start:stop])
            null_ts.append(
                _arrow.timestamps_ns_into(table.column(src.timestamp_field), ts[start:stop], _arrow.INT64_MIN)
            )
            if src.created_timestamp_field:  # a null created time loses every tie
                _arrow.timestamps_ns_into(table.column(src.created_timestamp_field), created[start:stop],
                                          _arrow.INT64_MIN)
        except pa.ArrowInvalid as exc:
            raise StoreError(f"feature view {view.name!r}: {exc}") from None

    scan.read(view.join_keys + ts_cols, consume, threads)
    if sum(null_ts):
        codes[ts == _arrow.INT64_MIN] = -1  # a row without an event time never matches
    return codes, ts, created


def _gather_features(files: ParquetFiles, scan: Scan, picked: np.ndarray, fields, threads: int) -> list[pa.Array]:
    hit = picked >= 0
    if not hit.any():
        return [pa.nulls(len(picked), f.dtype.arrow) for f in fields]
    mark = np.zeros(scan.n_rows, dtype=bool)
    mark[picked[hit]] = True
    selected = np.flatnonzero(mark)
    rank_type = np.int32 if scan.n_rows < 2**31 else np.int64
    rank = np.cumsum(mark, dtype=rank_type) - 1  # picked position -> row of the gathered table
    del mark
    table = gather(files, scan, selected, [f.name for f in fields], threads)
    rows = np.zeros(len(picked), dtype=np.int64)
    rows[hit] = rank[picked[hit]]
    del rank
    index = pa.array(rows, mask=~hit)
    return [as_declared(table.column(f.name).take(index), f) for f in fields]


def as_declared(column: Any, field) -> pa.Array:
    """A source column as its field's declared type (timestamps keep their unit, in UTC)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    target = field.dtype.arrow
    if field.dtype.kind == "timestamp":
        target = pa.timestamp(arr.type.unit if pat.is_timestamp(arr.type) else "us", "UTC")
    return arr if arr.type == target else arr.cast(target)
