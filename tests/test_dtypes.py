"""dtypes: names, Arrow mapping, which source types a declared type reads without loss."""
from __future__ import annotations

import pyarrow as pa
import pytest

import mlplat as mp
from mlplat import dtypes


@pytest.mark.parametrize("t", [mp.Int8, mp.Int16, mp.Int32, mp.Int64, mp.Float32, mp.Float64, mp.Bool, mp.String,
                               mp.Bytes, mp.Timestamp])
def test_names_and_arrow_types_round_trip(t):
    assert dtypes.from_name(t.name) is t
    assert dtypes.from_name(t.name.upper()) is t
    assert dtypes.from_arrow(t.arrow) is t


@pytest.mark.parametrize(
    "declared, source, ok",
    [
        (mp.Int64, pa.int32(), True), (mp.Int64, pa.uint32(), True), (mp.Int64, pa.uint64(), False),
        (mp.Int32, pa.int64(), False), (mp.Int8, pa.uint8(), False), (mp.Int16, pa.uint8(), True),
        (mp.Float64, pa.float32(), True), (mp.Float32, pa.float64(), False), (mp.Float64, pa.int32(), True),
        (mp.Float64, pa.int64(), False), (mp.Float32, pa.int16(), True),
        (mp.String, pa.large_string(), True), (mp.String, pa.string_view(), True), (mp.String, pa.int64(), False),
        (mp.String, pa.dictionary(pa.int32(), pa.string()), True), (mp.Bytes, pa.large_binary(), True),
        (mp.Bool, pa.bool_(), True), (mp.Bool, pa.int8(), False),
        (mp.Timestamp, pa.timestamp("ns"), True), (mp.Timestamp, pa.date32(), True), (mp.Timestamp, pa.int64(), False),
    ],
)
def test_accepts_only_lossless_reads(declared, source, ok):
    assert declared.accepts(source) is ok


def test_key_kinds_and_unknown_types():
    assert dtypes.key_kind(pa.uint16()) == "int"
    assert dtypes.key_kind(pa.large_string()) == "string"
    assert dtypes.key_kind(pa.float64()) is None
    with pytest.raises(mp.DefinitionError, match="unknown dtype 'decimal'.*Int64"):
        dtypes.from_name("decimal")
    with pytest.raises(mp.DefinitionError, match="has no mlplat dtype"):
        dtypes.from_arrow(pa.list_(pa.int64()))
