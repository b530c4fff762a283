"""Pure-Python and NumPy references for the native code, used only by the tests.

They follow the words of the contract, not the kernels' algorithms:
``asof_python`` loops over every pair of rows; ``asof_numpy`` does a global
lexsort and a binary search per row; ``historical_python`` reads the Parquet
files row by row and applies DESIGN.md's rule to each entity row.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq


def asof_python(right_key, right_ts, right_created, left_key, left_lo, left_hi) -> list[int]:
    """For each left row: the right row with the same key and lo <= ts <= hi maximizing (ts, created, index)."""
    has_created = len(right_created) > 0
    out = []
    for i in range(len(left_key)):
        best, best_rank = -1, None
        if left_key[i] >= 0:
            for j in range(len(right_key)):
                if right_key[j] != left_key[i] or not (left_lo[i] <= right_ts[j] <= left_hi[i]):
                    continue
                rank = (right_ts[j], right_created[j] if has_created else 0, j)
                if best_rank is None or rank > best_rank:
                    best, best_rank = j, rank
        out.append(best)
    return out


def asof_numpy(right_key, right_ts, right_created, left_key, left_lo, left_hi) -> np.ndarray:
    """The same answer by one lexsort of the right side and binary searches (for large inputs)."""
    right_key = np.asarray(right_key, dtype=np.int64)
    right_ts = np.asarray(right_ts, dtype=np.int64)
    created = np.asarray(right_created, dtype=np.int64) if len(right_created) else np.zeros_like(right_ts)
    pos = np.arange(len(right_key))
    order = np.lexsort((pos, created, right_ts, right_key))
    k_sorted, ts_sorted = right_key[order], right_ts[order]
    out = np.full(len(left_key), -1, dtype=np.intp)
    for i, (k, lo, hi) in enumerate(zip(left_key, left_lo, left_hi)):
        if k < 0:
            continue
        a, b = np.searchsorted(k_sorted, k, "left"), np.searchsorted(k_sorted, k, "right")
        p = a + np.searchsorted(ts_sorted[a:b], hi, "right") - 1
        if p >= a and ts_sorted[p] >= lo:
            out[i] = order[p]
    return out


def _utc(value):
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value


def read_rows(paths: Sequence[str]) -> list[dict]:
    """All rows of the files, files in the given order, rows in file order."""
    rows = []
    for path in paths:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def historical_python(
    source_rows: list[dict],
    entity_rows: list[dict],
    *,
    join_keys: Sequence[str],
    features: Sequence[str],
    ttl: timedelta | None,
    ts_field: str = "event_timestamp",
    created_field: str | None = None,
    entity_ts: str = "event_timestamp",
) -> list[dict]:
    """DESIGN.md's rule, row by row: {feature: value} for every entity row."""
    out = []
    for erow in entity_rows:
        t = _utc(erow[entity_ts])
        keys = tuple(erow[k] for k in join_keys)
        best, best_rank = None, None
        if None not in keys:
            for j, row in enumerate(source_rows):
                e = _utc(row[ts_field])
                if e is None or tuple(row[k] for k in join_keys) != keys:
                    continue
                if e > t or (ttl is not None and e < t - ttl):
                    continue
                c = _utc(row[created_field]) if created_field else None
                rank = (e, c is not None, c or datetime.min.replace(tzinfo=timezone.utc), j)
                if best_rank is None or rank > best_rank:
                    best, best_rank = row, rank
        out.append({f: (best[f] if best is not None else None) for f in features})
    return out


# ------------------------------------------------- the rule on int nanoseconds
_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def read_rows_ns(paths: Sequence[str], time_fields: Sequence[str]) -> list[dict]:
    """As ``read_rows``, with the timestamp columns ``time_fields`` as Python int nanoseconds since 1970 (None
    for null): exact where datetime (whole microseconds) and pandas (NaT at -2**63) are not, beyond the int64
    nanosecond range too."""
    import pyarrow as pa

    rows = []
    for path in paths:
        table = pq.read_table(path)
        columns = {}
        for name in table.column_names:
            col = table.column(name)
            if name in time_fields:
                scale = _NS[col.type.unit]
                columns[name] = [None if v is None else v * scale for v in col.cast(pa.int64()).to_pylist()]
            else:
                columns[name] = col.to_pylist()
        rows.extend(dict(zip(columns, values)) for values in zip(*columns.values()))
    return rows


def historical_python_ns(
    source_rows: list[dict],
    entity_rows: list[dict],
    *,
    join_keys: Sequence[str],
    features: Sequence[str],
    ttl_ns: int | None,
    ts_field: str = "event_timestamp",
    created_field: str | None = None,
    entity_ts: str = "event_timestamp",
) -> list[dict]:
    """``historical_python`` on int nanoseconds (``read_rows_ns``): the same rule, with no sentinel anywhere.

    A row without an event time never matches; a row without a created time loses every tie to one with a
    created time, whatever that time is; then the row read last wins."""
    out = []
    for erow in entity_rows:
        t = erow[entity_ts]
        keys = tuple(erow[k] for k in join_keys)
        best, best_rank = None, None
        if None not in keys:
            for j, row in enumerate(source_rows):
                e = row[ts_field]
                if e is None or tuple(row[k] for k in join_keys) != keys:
                    continue
                if e > t or (ttl_ns is not None and e < t - ttl_ns):
                    continue
                c = row[created_field] if created_field else None
                rank = (e, c is not None, c if c is not None else 0, j)
                if best_rank is None or rank > best_rank:
                    best, best_rank = row, rank
        out.append({f: (best[f] if best is not None else None) for f in features})
    return out


# ------------------------------------------------------- online record codec
import struct  # noqa: E402

KINDS = {"int": 0, "float32": 1, "float64": 2, "bool": 3, "string": 4, "bytes": 5, "timestamp": 6}


def _be(v: int) -> bytes:
    return ((v + 2**63) % 2**64).to_bytes(8, "big")  # sign bit flipped, big-endian


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_record(kinds: list[int], values: list, event: int, created: int | None) -> bytes:
    """One record, written out from the format's description (not from the C++ code)."""
    out = bytearray([1]) + _be(event) + _be(-(2**63) if created is None else created)
    bitmap = bytearray((len(kinds) + 7) // 8)
    body = bytearray()
    for i, (k, v) in enumerate(zip(kinds, values)):
        if v is None:
            bitmap[i // 8] |= 1 << (i % 8)
        elif k in (0, 6):
            body += struct.pack("<q", v)
        elif k == 1:
            body += struct.pack("<f", v)
        elif k == 2:
            body += struct.pack("<d", v)
        elif k == 3:
            body += b"\x01" if v else b"\x00"
        else:
            raw = v.encode() if k == 4 else v
            body += _varint(len(raw)) + raw
    return bytes(out + bitmap + body)


def decode_record(kinds: list[int], record: bytes) -> tuple[int, list]:
    event = int.from_bytes(record[1:9], "big") - 2**63
    pos = 17
    n_bitmap = (len(kinds) + 7) // 8
    bitmap, pos = record[pos : pos + n_bitmap], pos + n_bitmap
    values = []
    for i, k in enumerate(kinds):
        if bitmap[i // 8] >> (i % 8) & 1:
            values.append(None)
            continue
        if k in (0, 6):
            values.append(struct.unpack_from("<q", record, pos)[0])
            pos += 8
        elif k == 1:
            values.append(struct.unpack_from("<f", record, pos)[0])
            pos += 4
        elif k == 2:
            values.append(struct.unpack_from("<d", record, pos)[0])
            pos += 8
        elif k == 3:
            values.append(record[pos] != 0)
            pos += 1
        else:
            n, shift = 0, 0
            while True:
                b = record[pos]
                pos += 1
                n |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            raw = record[pos : pos + n]
            pos += n
            values.append(raw.decode() if k == 4 else raw)
    return event, values


def entity_key(values: list, kinds: list[str]) -> bytes | None:
    out = b""
    for v, k in zip(values, kinds):
        if v is None:
            return None
        if k == "int":
            out += b"\x01" + _be(v)
        else:
            raw = v.encode()
            out += b"\x02" + _varint(len(raw)) + raw
    return out


def bucket(key: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in key:
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h % 16384


def redis_key(prefix: str, tag: str, key: bytes) -> bytes:
    return f"{prefix}{{{bucket(key)}}}:{tag}:".encode() + key


# ------------------------------------------------------------ table hash
import hashlib  # noqa: E402


def table_hash_python(table) -> str:
    """The canonical table hash computed row by row from Python values (see mlplat.runs.datahash)."""
    import pyarrow as pa
    import pyarrow.types as pat

    def canonical_type(t) -> str:
        if pat.is_dictionary(t):
            return canonical_type(t.value_type)
        if pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t):
            return "string"
        if pat.is_binary(t) or pat.is_large_binary(t) or pat.is_binary_view(t):
            return "binary"
        return str(t)

    top = hashlib.blake2b(digest_size=32)
    top.update(b"mlplat-table-v1\n" + str(table.num_rows).encode() + b"\n")
    for field in table.schema:
        top.update(field.name.encode() + b"\0" + canonical_type(field.type).encode() + b"\n")
        column = table.column(field.name)
        t = field.type.value_type if pat.is_dictionary(field.type) else field.type
        validity, values, lengths = (hashlib.blake2b(digest_size=32) for _ in range(3))
        raw_ints = column.cast(pa.int64()).to_pylist() if pat.is_timestamp(t) else None
        for i, v in enumerate(column.to_pylist()):
            validity.update(b"\x00" if v is None else b"\x01")
            if pat.is_boolean(t):
                values.update(b"\x01" if v else b"\x00")
            elif pat.is_string(t) or pat.is_large_string(t) or pat.is_binary(t) or pat.is_large_binary(t):
                raw = b"" if v is None else (v.encode() if isinstance(v, str) else v)
                lengths.update(len(raw).to_bytes(8, "little", signed=True))
                values.update(raw)
            elif pat.is_integer(t):
                values.update((0 if v is None else v).to_bytes(t.bit_width // 8, "little", signed=pat.is_signed_integer(t)))
            elif pat.is_floating(t):
                values.update(struct.pack("<d" if t.bit_width == 64 else "<f", 0.0 if v is None else v))
            elif pat.is_timestamp(t):
                values.update((0 if v is None else raw_ints[i]).to_bytes(8, "little", signed=True))
            else:
                raise NotImplementedError(t)
        top.update(validity.digest() + values.digest() + lengths.digest())
    return f"blake2b-256:{top.hexdigest()}"


# ------------------------------------------------------------------ XXH64
_M64 = 2**64 - 1
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                           0x27D4EB2F165667C5)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def xxh64_python(data: bytes, seed: int = 0) -> int:
    """XXH64 from its specification, in plain Python."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64]
        while i + 32 <= n:
            v = [_round(v[j], int.from_bytes(data[i + 8 * j : i + 8 * j + 8], "little")) for j in range(4)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for lane in v:
            h = (((h ^ _round(0, lane)) * _P1) + _P4) & _M64
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[i : i + 8], "little")), 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i : i + 4], "little") * _P1 & _M64), 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * _P5 & _M64), 11) * _P1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    return h ^ (h >> 32)
