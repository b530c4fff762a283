"""Private Arrow helpers shared by the parts: table input, timestamps as int64 UTC nanoseconds."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.types as pat

from ._time import as_utc
from .errors import DataError

__all__ = ["to_table", "timestamps_ns_into", "timestamps_ns", "datetime_ns", "timedelta_ns", "is_numeric",
           "INT64_MIN", "INT64_MAX", "NS_PER_UNIT"]

INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_table(data: Any, what: str) -> pa.Table:
    """A pyarrow Table from a pandas DataFrame, polars DataFrame, pyarrow Table or RecordBatch; a column name
    given twice is a DataError (which one a lookup by name finds is undefined)."""
    table = _table(data, what)
    names = table.column_names
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{what}: column {twice!r} appears {names.count(twice)} times; give each column its own name")
    return table


def _table(data: Any, what: str) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    module = type(data).__module__.split(".")[0]
    if module == "pandas":
        try:
            return pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise DataError(f"{what}: a column cannot be converted to Arrow: {exc}") from None
    if module == "polars" and hasattr(data, "to_arrow"):
        return data.to_arrow()
    raise DataError(f"{what} must be a pandas DataFrame, a pyarrow Table or a polars DataFrame, "
                    f"got {type(data).__name__}")


#: nanoseconds in one tick of each Arrow timestamp unit
NS_PER_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def is_numeric(t: pa.DataType) -> bool:
    """Whether an Arrow type holds numbers (integers or floats)."""
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _timestamp_values(arr: pa.Array) -> tuple[np.ndarray, int]:
    """The raw int64 values of a timestamp/date array (zero-copy) and the factor to nanoseconds."""
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pat.is_date(arr.type):
        arr = arr.cast(pa.timestamp("s"))
    if not pat.is_timestamp(arr.type):
        raise TypeError(arr.type)
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(len(arr), dtype=np.int64), 1
    return np.frombuffer(buf, dtype=np.int64, count=len(arr), offset=arr.offset * 8), NS_PER_UNIT[arr.type.unit]


def timestamps_ns_into(column: pa.Array | pa.ChunkedArray, out: np.ndarray, null_value: int) -> int:
    """Write a timestamp column as int64 UTC ns into ``out`` in one pass; nulls become ``null_value``.

    Naive timestamps are taken as UTC (Arrow stores zoned ones in UTC already).
    Returns the null count; a value that does not fit in int64 nanoseconds
    (before 1677 or after 2262) raises ``pyarrow.ArrowInvalid``.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    start = 0
    nulls = 0
    for chunk in chunks:
        n = len(chunk)
        values, scale = _timestamp_values(chunk)
        dest = out[start : start + n]
        valid = None if chunk.null_count == 0 else chunk.is_valid().to_numpy(zero_copy_only=False)
        if scale != 1 and n:
            present = values if valid is None else values[valid]
            if len(present) and (present.min() < INT64_MIN // scale or present.max() > INT64_MAX // scale):
                raise pa.ArrowInvalid(f"a timestamp in {chunk.type} is out of the nanosecond range (1677-2262)")
            np.multiply(values, scale, out=dest)
        else:
            dest[:] = values
        if valid is not None:
            nulls += n - int(valid.sum())
            dest[~valid] = null_value
        start += n
    return nulls


def timestamps_ns(column: pa.Array | pa.ChunkedArray, null_value: int = INT64_MIN) -> np.ndarray:
    out = np.empty(len(column), dtype=np.int64)
    timestamps_ns_into(column, out, null_value)
    return out


def is_timestamp_type(t: pa.DataType) -> bool:
    if pat.is_dictionary(t):
        t = t.value_type
    return pat.is_timestamp(t) or pat.is_date(t)


def datetime_ns(value: datetime) -> int:
    """UTC nanoseconds of a datetime (naive is UTC)."""
    return timedelta_ns(as_utc(value) - _EPOCH)


def timedelta_ns(value: timedelta) -> int:
    return (value.days * 86_400 + value.seconds) * 1_000_000_000 + value.microseconds * 1_000
