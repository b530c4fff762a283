"""Private Arrow helpers shared by the parts: table input, timestamps as int64 UTC nanoseconds."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.types as pat

from ._time import as_utc
from .errors import DataError

__all__ = ["to_table", "timestamps_ns_into", "datetime_ns", "timedelta_ns", "is_numeric",
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
    if module in ("pandas", "polars") and type(data).__name__ == "Series":  # a column, not a table
        raise DataError(f"{what} must be a table, got a {module} Series: make it a frame (series.to_frame())")
    if module == "pandas":
        try:
            return pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise DataError(f"{what}: a column cannot be converted to Arrow: {exc}") from None
    if module == "polars" and hasattr(data, "to_arrow"):
        table = data.to_arrow()
        if isinstance(table, pa.Table):
            return table
    raise DataError(f"{what} must be a pandas DataFrame, a pyarrow Table or a polars DataFrame, "
                    f"got {type(data).__name__}")


#: nanoseconds in one tick of each Arrow timestamp unit
NS_PER_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def is_numeric(t: pa.DataType) -> bool:
    """Whether an Arrow type holds numbers (integers or floats)."""
    return pa.types.is_integer(t) or pa.types.is_floating(t)


#: the int64 nanosecond range as (first, last) tick of each unit: ceil(INT64_MIN / scale), floor(INT64_MAX / scale)
_TICK_RANGE = {unit: (-(-INT64_MIN // scale), INT64_MAX // scale)
               for unit, scale in NS_PER_UNIT.items()}


def timestamps_ns_into(column: pa.Array | pa.ChunkedArray, out: np.ndarray) -> np.ndarray | None:
    """Write a timestamp (or date) column as int64 UTC ns into ``out``; return its null mask (None: no nulls).

    A null's slot in ``out`` holds INT64_MIN, which is also a real time (1677-09-21 00:12:43.145224192):
    callers tell them apart by the mask, never by the value. Naive times are UTC. A value outside int64
    nanoseconds raises ``pyarrow.ArrowInvalid`` saying which value.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    nulls = None
    start = 0
    for chunk in chunks:
        n = len(chunk)
        if pat.is_dictionary(chunk.type):
            chunk = chunk.dictionary_decode()  # a null in the dictionary is a null value too
        if pat.is_date(chunk.type) or pat.is_null(chunk.type):  # null: None in every row of a pandas file
            chunk = chunk.cast(pa.timestamp("s"))
        dest = out[start : start + n]
        valid = None
        if chunk.null_count:
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            if nulls is None:
                nulls = np.zeros(len(out), dtype=bool)
            nulls[start : start + n] = ~valid
        buf = chunk.buffers()[1] if n else None
        if buf is None:  # an all-null (or empty) chunk may come without a values buffer
            dest[:] = INT64_MIN
            start += n
            continue
        values = np.frombuffer(buf, dtype=np.int64, count=n, offset=chunk.offset * 8)
        unit = chunk.type.unit
        if unit == "ns":
            dest[:] = values
        else:
            present = values if valid is None else values[valid]
            first, last = _TICK_RANGE[unit]
            if len(present) and (present.min() < first or present.max() > last):
                raise pa.ArrowInvalid(_out_of_range(present[(present < first) | (present > last)][0], chunk.type))
            np.multiply(values, NS_PER_UNIT[unit], out=dest)
        if valid is not None:
            dest[~valid] = INT64_MIN
        start += n
    return nulls


def _out_of_range(value: int, type_: pa.DataType) -> str:
    try:
        shown = f"{pa.scalar(int(value), pa.timestamp(type_.unit)).as_py()} UTC"
    except (ValueError, OverflowError, pa.ArrowException):  # beyond datetime's years 1..9999
        shown = f"{int(value)} {type_.unit} from 1970"
    return f"a timestamp in {type_} is out of the nanosecond range (1677-09-21 .. 2262-04-11): {shown}"


def is_timestamp_type(t: pa.DataType) -> bool:
    if pat.is_dictionary(t):
        t = t.value_type
    return pat.is_timestamp(t) or pat.is_date(t)


def datetime_ns(value: datetime) -> int:
    """UTC nanoseconds of a datetime (naive is UTC); a pandas Timestamp keeps its nanoseconds.

    >>> import pandas as pd
    >>> datetime_ns(pd.Timestamp("1970-01-01 00:00:01.000000501"))
    1000000501
    """
    return timedelta_ns(as_utc(value) - _EPOCH)  # a pandas Timestamp minus a datetime is a pandas Timedelta


def timedelta_ns(value: timedelta) -> int:
    """Nanoseconds of a timedelta; a pandas Timedelta keeps its part below a microsecond (``.nanoseconds``)."""
    ns = (value.days * 86_400 + value.seconds) * 1_000_000_000 + value.microseconds * 1_000
    return ns + getattr(value, "nanoseconds", 0)
