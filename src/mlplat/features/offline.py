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

__all__ = ["ViewRequest", "historical_features", "join_view", "entity_timestamps", "as_declared", "ScanTimes"]


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
    out = np.empty(len(col), dtype=np.int64)
    try:
        nulls = _arrow.timestamps_ns_into(col, out)  # also a null among a dictionary's values, which null_count misses
    except pa.ArrowInvalid as exc:
        raise DataError(f"entity_df column {column!r}: {exc}") from None
    if nulls is not None and nulls.any():
        raise DataError(
            f"entity_df column {column!r} has {int(nulls.sum())} null timestamps (first at row "
            f"{int(np.argmax(nulls))}); every entity row needs a time"
        )
    return out


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
    src = view.source
    files = ParquetFiles(src, threads)
    check_source(view, files, features, error=StoreError, applied_key_types=view.key_types)
    types = _served_types(fields, files)
    if not valid.any():
        return [pa.nulls(n, t) for t in types]
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
    return _gather_features(view, files, scan, picked, fields, types, threads)


def _scan_arrays(
    view: FeatureView, scan: Scan, factorizer: KeyFactorizer, threads: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Key codes, event times and created-time tie-breaks (int64) of every scanned row, in read order."""
    codes = np.empty(scan.n_rows, dtype=np.int64)
    times = ScanTimes(view, scan)

    def consume(table: pa.Table, start: int) -> None:
        try:  # an unsigned key above int64 is the source's problem
            factorizer.lookup([table.column(k) for k in view.join_keys], codes[start : start + table.num_rows])
        except pa.ArrowInvalid as exc:
            raise StoreError(f"feature view {view.name!r}: {exc}") from None
        times.consume(table, start)

    scan.read(view.join_keys + times.columns, consume, threads)
    times.drop_untimed(codes)
    return codes, times.ts, times.tie_breaks()


class ScanTimes:
    """Event and created times (int64 UTC ns) of a scan's rows in read order, with their nulls kept apart.

    Every int64 is a real time, INT64_MIN (1677-09-21 00:12:43.145224192) included, so a null is known by
    its mask, not by the value in its slot: a row without an event time never matches
    (:meth:`drop_untimed`), and a row without a created time loses every tie (:meth:`tie_breaks`).
    :meth:`consume` may run in several threads at once, on disjoint row ranges.
    """

    def __init__(self, view: FeatureView, scan: Scan) -> None:
        src = view.source
        self.view = view
        self.columns = [src.timestamp_field] + ([src.created_timestamp_field] if src.created_timestamp_field else [])
        self.ts = np.empty(scan.n_rows, dtype=np.int64)
        #: created times, a null as INT64_MIN (the online record's "none"); empty when the source has none
        self.created = np.empty(scan.n_rows if src.created_timestamp_field else 0, dtype=np.int64)
        self._ts_nulls: list[tuple[int, np.ndarray]] = []
        self._created_nulls: list[tuple[int, np.ndarray]] = []
        self._paths = [(part.start, scan.files.paths[part.file]) for part in scan.parts]

    def consume(self, table: pa.Table, start: int) -> None:
        """Convert the time columns of the rows read at ``start``; a time outside int64 ns is a StoreError."""
        stop = start + table.num_rows
        for name, out, nulls in zip(self.columns, (self.ts, self.created), (self._ts_nulls, self._created_nulls)):
            try:
                mask = _arrow.timestamps_ns_into(table.column(name), out[start:stop])
            except pa.ArrowInvalid as exc:
                path = next((p for s, p in reversed(self._paths) if s <= start), "?")
                raise StoreError(f"feature view {self.view.name!r}: {exc}, in column {name!r} of {path}; "
                                 "write such times as null, or within that range") from None
            if mask is not None:
                nulls.append((start, mask))

    def drop_untimed(self, codes: np.ndarray) -> None:
        """Give rows without an event time the key code -1, which never matches."""
        for start, mask in self._ts_nulls:
            codes[start : start + len(mask)][mask] = -1

    def tie_breaks(self) -> np.ndarray:
        """Created times for the kernel, ordered as the rule orders them: a null below every time.

        Nulls hold INT64_MIN. Only when a real created time is INT64_MIN as well do the values become
        dense ranks (nulls -1, times 0, 1, ... in time order), which the kernel compares the same way.
        """
        if not self._created_nulls:
            return self.created
        null = np.zeros(len(self.created), dtype=bool)
        for start, mask in self._created_nulls:
            null[start : start + len(mask)] = mask
        at_floor = self.created == _arrow.INT64_MIN
        if not (at_floor & ~null).any():
            return self.created
        ranks = np.full(len(self.created), -1, dtype=np.int64)
        ranks[~null] = np.unique(self.created[~null], return_inverse=True)[1]
        return ranks


def _gather_features(view: FeatureView, files: ParquetFiles, scan: Scan, picked: np.ndarray, fields,
                     types: list[pa.DataType], threads: int) -> list[pa.Array]:
    hit = picked >= 0
    if not hit.any():
        return [pa.nulls(len(picked), t) for t in types]
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
    out = []
    for f, t in zip(fields, types):
        try:
            out.append(as_declared(table.column(f.name).take(index), f, t))
        except pa.ArrowInvalid:  # a far time of a coarser file in a finer unit: 9999-12-31 has no nanoseconds
            raise StoreError(f"feature view {view.name!r}: feature {f.name!r} holds a time outside what {t} holds, "
                             "the finest of the units its source's files hold it in, which retrieval gives; write "
                             "the files in one unit, or such 'no end' times as null") from None
    return out


_UNITS = ("s", "ms", "us", "ns")


def _served_types(fields: list, files: ParquetFiles) -> list[pa.DataType]:
    """The type retrieval gives each field: its declared type, a timestamp in the finest unit the source's files
    hold it in (UTC; microseconds where none holds a timestamp), so that every retrieval from the same files
    has one type, whichever rows matched and whichever file they came from."""
    finest = {f.name: -1 for f in fields if f.dtype.kind == "timestamp"}
    if finest:
        for _, schema in files.schemas():
            for name in finest:
                i = schema.get_field_index(name)
                t = schema.field(i).type if i >= 0 else None
                if t is not None and pat.is_timestamp(t):
                    finest[name] = max(finest[name], _UNITS.index(t.unit))
    return [pa.timestamp(_UNITS[finest[f.name]] if finest[f.name] >= 0 else "us", "UTC") if f.name in finest
            else f.dtype.arrow for f in fields]


def as_declared(column: Any, field, target: pa.DataType | None = None) -> pa.Array:
    """A source column as ``target``, by default its field's declared type (a timestamp keeping its unit, in
    UTC)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if target is None:
        target = field.dtype.arrow
        if field.dtype.kind == "timestamp":
            target = pa.timestamp(arr.type.unit if pat.is_timestamp(arr.type) else "us", "UTC")
    return arr if arr.type == target else arr.cast(target)
