"""Arrow columns in, online-store records out: a thin wrapper over ``_codec``.

Record layout, entity keys and Redis keys are described in ``_codec.cpp`` and
in docs/online.md. :func:`kind_of` maps an mlplat dtype to the codec's kind.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat

from . import _codec
from .keys import binary_buffers, valid_mask

__all__ = ["KEY_KINDS", "kind_of", "encode_records", "entity_key_buffers", "column_spec", "RecordBuffers"]

INT, FLOAT32, FLOAT64, BOOL, STRING, BYTES, TIMESTAMP = range(7)
KEY_KINDS = {"int": 0, "string": 1}
_NULL_AS = {INT: pa.int64(), FLOAT32: pa.float32(), FLOAT64: pa.float64(), BOOL: pa.bool_(), STRING: pa.string(),
            BYTES: pa.binary(), TIMESTAMP: pa.timestamp("ns")}


def kind_of(dtype) -> int:
    """The codec kind of an mlplat dtype."""
    if dtype.kind == "int":
        return INT
    if dtype.kind == "float":
        return FLOAT32 if dtype.arrow == pa.float32() else FLOAT64
    return {"bool": BOOL, "string": STRING, "bytes": BYTES, "timestamp": TIMESTAMP}[dtype.kind]



def column_spec(arr: pa.Array | pa.ChunkedArray, kind: int) -> tuple:
    """The buffers ``_codec`` reads for one column: (values, valid) or (offsets, data, valid)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pat.is_null(arr.type):  # nothing but nulls (pa.nulls, an all-None list): the kind's own type
        arr = pa.nulls(len(arr), _NULL_AS[kind])
    valid = valid_mask(arr)
    if kind in (STRING, BYTES):
        return (*binary_buffers(arr), valid)
    if kind == TIMESTAMP:
        arr = pc.cast(arr, pa.timestamp("ns", getattr(arr.type, "tz", None))).cast(pa.int64())
    elif kind == INT and arr.type != pa.int64():
        arr = arr.cast(pa.int64())
    target = {INT: np.int64, TIMESTAMP: np.int64, FLOAT32: np.float32, FLOAT64: np.float64, BOOL: np.bool_}[kind]
    if arr.null_count:
        arr = arr.fill_null(False if kind == BOOL else 0)
    return np.ascontiguousarray(arr.to_numpy(zero_copy_only=False), dtype=target), valid


class RecordBuffers:
    """Encoded records and their entity keys, as flat buffers with offsets."""

    __slots__ = ("key_data", "key_offsets", "rec_data", "rec_offsets", "expire_at_ms")

    def __init__(self, key_data, key_offsets, rec_data, rec_offsets, expire_at_ms) -> None:
        self.key_data, self.key_offsets = key_data, key_offsets
        self.rec_data, self.rec_offsets = rec_data, rec_offsets
        self.expire_at_ms = expire_at_ms

    def __len__(self) -> int:
        return len(self.key_offsets) - 1

    def buckets(self) -> np.ndarray:
        """Each key's hash-tag bucket (the Redis Cluster slot group its records go to); computed on demand,
        since only cluster writes need it."""
        return _codec.buckets(self.key_data, self.key_offsets)

    def key(self, i: int) -> bytes:
        return bytes(self.key_data[self.key_offsets[i] : self.key_offsets[i + 1]])

    def record(self, i: int) -> bytes:
        return bytes(self.rec_data[self.rec_offsets[i] : self.rec_offsets[i + 1]])


def encode_records(kinds: Sequence[int], columns: Sequence[pa.Array], event_ns: np.ndarray,
                   created_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Records for n rows: (data, offsets)."""
    specs = [column_spec(c, k) for c, k in zip(columns, kinds)]
    return _codec.encode_records(list(kinds), specs, np.ascontiguousarray(event_ns, np.int64),
                                 np.ascontiguousarray(created_ns, np.int64))


def entity_key_buffers(columns: Sequence[pa.Array], key_kinds: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Entity keys of n rows from Arrow key columns: (data, offsets); a null key gives an empty key."""
    kinds = [KEY_KINDS[k] for k in key_kinds]
    specs = [column_spec(c, INT if k == 0 else STRING) for c, k in zip(columns, kinds)]
    n = len(columns[0])
    return _codec.entity_keys_buffers(specs, kinds, n)
