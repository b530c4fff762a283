"""Feature value types and their Arrow equivalents.

Usage::

    >>> import mlplat as mp
    >>> mp.Int64.arrow
    DataType(int64)
    >>> mp.dtypes.from_name("float32") is mp.Float32
    True

A source column may be wider in storage than nothing but its declared type
allows only lossless reads: an int32 column can back an ``Int64`` field, a
float64 column cannot back a ``Float32`` one.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.types as pat

from .errors import DefinitionError

__all__ = [
    "DType",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "Float32",
    "Float64",
    "Bool",
    "String",
    "Bytes",
    "Timestamp",
    "from_name",
    "from_arrow",
    "key_kind",
]


@dataclass(frozen=True)
class DType:
    """A feature value type: a stable name and the Arrow type values come back as."""

    name: str
    arrow: pa.DataType
    kind: str  # "int", "float", "bool", "string", "bytes", "timestamp"

    def __repr__(self) -> str:
        return f"mlplat.{self.name}"

    def accepts(self, source: pa.DataType) -> bool:
        """Whether a source column of Arrow type ``source`` can be read as this type without loss."""
        source = _value_type(source)
        if source == self.arrow:
            return True
        k = _arrow_kind(source)
        if self.kind == "int":
            return k == "int" and _int_fits(source, self.arrow)
        if self.kind == "float":
            if k == "float":
                return source.bit_width <= self.arrow.bit_width
            return k == "int" and source.bit_width < self.arrow.bit_width  # exact in the mantissa
        if self.kind == "timestamp":
            return k == "timestamp"
        return k == self.kind


Int8 = DType("Int8", pa.int8(), "int")
Int16 = DType("Int16", pa.int16(), "int")
Int32 = DType("Int32", pa.int32(), "int")
Int64 = DType("Int64", pa.int64(), "int")
Float32 = DType("Float32", pa.float32(), "float")
Float64 = DType("Float64", pa.float64(), "float")
Bool = DType("Bool", pa.bool_(), "bool")
String = DType("String", pa.string(), "string")
Bytes = DType("Bytes", pa.binary(), "bytes")
Timestamp = DType("Timestamp", pa.timestamp("us", tz="UTC"), "timestamp")

_ALL = (Int8, Int16, Int32, Int64, Float32, Float64, Bool, String, Bytes, Timestamp)
_BY_NAME = {t.name.lower(): t for t in _ALL}


def from_name(name: str) -> DType:
    """The dtype called ``name`` (case-insensitive), e.g. ``"Int64"``.

    >>> from_name("string") is String
    True
    """
    try:
        return _BY_NAME[str(name).lower()]
    except KeyError:
        known = ", ".join(t.name for t in _ALL)
        raise DefinitionError(f"unknown dtype {name!r}; use one of {known}") from None


def from_arrow(arrow_type: pa.DataType) -> DType:
    """The dtype whose values best hold an Arrow type (the inverse of ``DType.arrow``).

    >>> from_arrow(pa.large_string()) is String
    True
    """
    t = _value_type(arrow_type)
    kind = _arrow_kind(t)
    if kind == "int":
        return {8: Int8, 16: Int16, 32: Int32}.get(t.bit_width, Int64)
    if kind == "float":
        return Float32 if t.bit_width <= 32 else Float64
    for candidate in (Bool, String, Bytes, Timestamp):
        if candidate.kind == kind:
            return candidate
    raise DefinitionError(f"Arrow type {arrow_type} has no mlplat dtype")


def key_kind(arrow_type: pa.DataType) -> str | None:
    """``"int"`` or ``"string"`` for a type that can hold a join key, else None."""
    kind = _arrow_kind(_value_type(arrow_type))
    if kind in ("int", "string"):
        return kind
    return None


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pat.is_dictionary(t) else t


def _arrow_kind(t: pa.DataType) -> str | None:
    if pat.is_integer(t):
        return "int"
    if pat.is_floating(t):
        return "float"
    if pat.is_boolean(t):
        return "bool"
    if pat.is_string(t) or pat.is_large_string(t) or pat.is_string_view(t):
        return "string"
    if pat.is_binary(t) or pat.is_large_binary(t) or pat.is_binary_view(t) or pat.is_fixed_size_binary(t):
        return "bytes"
    if pat.is_timestamp(t) or pat.is_date(t):
        return "timestamp"
    return None


def _int_fits(source: pa.DataType, target: pa.DataType) -> bool:
    s_signed, t_signed = pat.is_signed_integer(source), pat.is_signed_integer(target)
    if s_signed and not t_signed:
        return False
    if s_signed == t_signed:
        return source.bit_width <= target.bit_width
    return source.bit_width < target.bit_width  # unsigned into a wider signed type
