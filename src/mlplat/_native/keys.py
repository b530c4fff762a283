"""Arrow columns in, dense int64 key codes out: a thin wrapper over ``_keys``.

A :class:`KeyFactorizer` is built from the entity side's join-key columns
(one or several: composite keys) and then looks up chunks of the feature
side, writing codes into a caller's array. Integer keys of any width go
through the int64 factorizer, string and binary keys through the binary one;
null keys get -1 on both sides and so never match.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.types as pat

from . import _keys

__all__ = ["KeyFactorizer"]


class KeyFactorizer:
    """Dense codes for (composite) join keys, built from the entity side.

    >>> f = KeyFactorizer([pa.array([7, 3, 7, None])])
    >>> f.codes.tolist(), f.size
    ([0, 1, 0, -1], 2)
    >>> out = np.empty(3, dtype=np.int64)
    >>> f.lookup([pa.array([3, 9, 7])], out)
    >>> out.tolist()
    [1, -1, 0]
    """

    def __init__(self, columns: Sequence[pa.Array]) -> None:
        if not columns:
            raise ValueError("a key needs at least one column")
        self._kinds = [_kind(c.type) for c in columns]
        self._columns = [_new_factorizer(k) for k in self._kinds]
        codes = [_build(f, k, c) for f, k, c in zip(self._columns, self._kinds, columns)]
        # composite keys: pair codes column by column, re-densifying after each pair
        self._pairs: list[_keys.Int64Factorizer] = []
        combined = codes[0]
        for f, c in zip(self._columns[1:], codes[1:]):
            pair = _keys.Int64Factorizer()
            paired = _keys.combine_codes(combined, c, f.size)
            combined = pair.build(paired, paired >= 0)
            self._pairs.append(pair)
        self.codes: np.ndarray = combined
        self.size: int = (self._pairs[-1] if self._pairs else self._columns[0]).size

    def lookup(self, columns: Sequence[pa.Array], out: np.ndarray) -> None:
        """Write the code of each row's key, or -1 (unknown or null key), into ``out``.

        Each column must be of the kind (integer or string) its build column was: a ``TypeError`` otherwise;
        a column of Arrow's null type (all null) gives -1 everywhere."""
        if len(columns) != len(self._columns):
            raise ValueError(f"expected {len(self._columns)} key columns, got {len(columns)}")
        if not (isinstance(out, np.ndarray) and out.dtype == np.int64 and out.ndim == 1
                and out.flags.c_contiguous):
            got = (f"a {out.ndim}-d {out.dtype} array{'' if out.flags.c_contiguous else ', not contiguous'}"
                   if isinstance(out, np.ndarray) else type(out).__name__)
            raise TypeError(f"out must be a 1-d contiguous int64 numpy array, got {got}")
        if not out.flags.writeable:
            raise ValueError("out must be writeable")
        if not self._pairs:
            _lookup(self._columns[0], self._kinds[0], columns[0], out)
            return
        n = len(out)
        codes = []
        for f, k, c in zip(self._columns, self._kinds, columns):
            part = np.empty(n, dtype=np.int64)
            _lookup(f, k, c, part)
            codes.append(part)
        combined = codes[0]
        for f, pair, c in zip(self._columns[1:], self._pairs, codes[1:]):
            combined_next = np.empty(n, dtype=np.int64)
            pair.lookup(_keys.combine_codes(combined, c, f.size), None, combined_next)
            combined = combined_next
        out[:] = combined


def _kind(t: pa.DataType) -> str:
    if pat.is_dictionary(t):
        t = t.value_type
    if pat.is_integer(t):
        return "int"
    if pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t):
        return "string"
    if pat.is_binary(t) or pat.is_large_binary(t) or pat.is_binary_view(t):
        return "string"
    raise TypeError(f"join keys must be integers or strings, got {t}")


def _new_factorizer(kind: str):
    return _keys.Int64Factorizer() if kind == "int" else _keys.BinaryFactorizer()


def valid_mask(arr: pa.Array) -> np.ndarray | None:
    """The validity of each value as a bool array, or None when nothing is null."""
    if arr.null_count == 0:
        return None
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _as_int64(arr: pa.Array) -> pa.Array:
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.type != pa.int64():
        arr = arr.cast(pa.int64())  # safe: an out-of-range uint64 raises
    return arr


def _int_values(arr: pa.Array) -> np.ndarray:
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(len(arr), dtype=np.int64)
    return np.frombuffer(buf, dtype=np.int64, count=len(arr), offset=arr.offset * 8)


def binary_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) of a string or binary array (dictionary and view types included), zero-copy where Arrow
    allows."""
    t = arr.type
    if pat.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pat.is_string_view(t):
        arr = arr.cast(pa.large_string())
    elif pat.is_binary_view(t):
        arr = arr.cast(pa.large_binary())
    off_type = np.int64 if (pat.is_large_string(arr.type) or pat.is_large_binary(arr.type)) else np.int32
    _, off_buf, data_buf = arr.buffers()
    width = np.dtype(off_type).itemsize
    offsets = np.frombuffer(off_buf, dtype=off_type, count=len(arr) + 1, offset=arr.offset * width)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return offsets, data


def _chunks(column) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _build(f, kind: str, column) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if kind == "int":
        arr = _as_int64(arr)
        return f.build(_int_values(arr), valid_mask(arr))
    offsets, data = binary_buffers(arr)
    return f.build(offsets, data, valid_mask(arr))


def _lookup(f, kind: str, column, out: np.ndarray) -> None:
    start = 0
    for arr in _chunks(column):
        part = out[start : start + len(arr)]
        if pat.is_null(arr.type):  # nothing but nulls: no key
            part[:] = -1
            start += len(arr)
            continue
        if _kind(arr.type) != kind:  # a cast would match the string "7" to the integer 7
            raise TypeError(f"the factorizer was built from {kind} keys, this key column is {arr.type}")
        if kind == "int":
            arr = _as_int64(arr)
            f.lookup(_int_values(arr), valid_mask(arr), part)
        else:
            offsets, data = binary_buffers(arr)
            f.lookup(offsets, data, valid_mask(arr), part)
        start += len(arr)
    if start != len(out):
        raise ValueError(f"key column has {start} rows, out has {len(out)}")
