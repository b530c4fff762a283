"""The table content hash against a row-by-row reference; chunking, slicing and input kind do not matter."""
from __future__ import annotations

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplat.runs.datahash import table_hash
from reference import table_hash_python

COLUMNS = {
    "i64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "i16": (pa.int16(), st.integers(-(2**15), 2**15 - 1)),
    "u8": (pa.uint8(), st.integers(0, 255)),
    "f64": (pa.float64(), st.floats(allow_nan=False)),
    "f32": (pa.float32(), st.floats(width=32, allow_nan=False)),
    "b": (pa.bool_(), st.booleans()),
    "s": (pa.string(), st.text(max_size=12)),
    "ls": (pa.large_string(), st.text(max_size=5)),
    "bin": (pa.binary(), st.binary(max_size=6)),
    "ts": (pa.timestamp("us", "UTC"), st.integers(-(2**50), 2**50)),
}


@st.composite
def tables(draw):
    names = draw(st.lists(st.sampled_from(sorted(COLUMNS)), min_size=1, max_size=5, unique=True))
    n = draw(st.integers(0, 30))
    cols = {}
    for name in names:
        typ, values = COLUMNS[name]
        data = draw(st.lists(st.one_of(st.none(), values), min_size=n, max_size=n))
        cols[name] = pa.array(data, pa.int64()).cast(typ) if name == "ts" else pa.array(data, typ)
    return pa.table(cols)


@settings(max_examples=300, deadline=None)
@given(tables(), st.integers(1, 4), st.integers(0, 3))
def test_hash_matches_reference_and_ignores_chunks_and_slices(table, pieces, cut):
    want = table_hash_python(table)
    assert table_hash(table) == want
    n = table.num_rows
    bounds = sorted({0, n, *[min(n, (i + 1) * n // pieces) for i in range(pieces)]})
    chunked = pa.concat_tables([table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])] or [table])
    assert table_hash(chunked) == want
    if n > cut:  # a slice of a bigger table hashes like a fresh copy of the same rows
        part = table.slice(cut)
        assert table_hash(part) == table_hash(pa.Table.from_pylist(part.to_pylist(), schema=part.schema))


def test_content_changes_change_the_hash():
    base = pa.table({"a": [1, 2, 3], "s": ["x", "y", None]})
    variants = [
        pa.table({"a": [1, 2, 4], "s": ["x", "y", None]}),  # one value
        pa.table({"a": [1, 2, 3], "s": ["x", "y", ""]}),  # null vs empty string
        pa.table({"a": [2, 1, 3], "s": ["y", "x", None]}),  # row order
        pa.table({"b": [1, 2, 3], "s": ["x", "y", None]}),  # a column name
        pa.table({"a": pa.array([1, 2, 3], pa.int32()), "s": ["x", "y", None]}),  # a type
        pa.table({"a": [1, 2], "s": ["x", "y"]}),  # a row fewer
        pa.table({"a": [1, 2, 3], "s": ["xy", "", None]}),  # string boundaries
    ]
    hashes = {table_hash(base)} | {table_hash(v) for v in variants}
    assert len(hashes) == len(variants) + 1


def test_same_data_through_pandas_polars_and_dictionaries():
    base = pa.table({"a": [1, 2, 3], "s": ["x", "y", "x"]})
    assert table_hash(pa.table({"a": [1, 2, 3], "s": pa.array(["x", "y", "x"]).dictionary_encode()})) == \
        table_hash(base)
    assert table_hash(pl.DataFrame({"a": [1, 2, 3], "s": ["x", "y", "x"]})) == table_hash(base)  # string_view
    assert table_hash(pd.DataFrame({"a": [1, 2, 3], "s": ["x", "y", "x"]})) == table_hash(base)


def test_nested_types_hash_and_differ():
    a = pa.table({"l": [[1, 2], None, []]})
    b = pa.table({"l": [[1, 2], [], []]})
    assert table_hash(a) != table_hash(b) and table_hash(a) == table_hash(pa.table({"l": [[1, 2], None, []]}))


def test_non_tables_are_refused():
    import mlplat as mp

    with pytest.raises(mp.DataError, match="pandas DataFrame, a pyarrow Table or a polars DataFrame"):
        table_hash([1, 2, 3])
