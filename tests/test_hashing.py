"""XXH64 in C++ against its published test vectors and a plain-Python implementation of the spec."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplat._native import _hashing
from reference import xxh64_python


@pytest.mark.parametrize(
    "data, seed, want",
    [  # published XXH64 vectors
        (b"", 0, 0xEF46DB3751D8E999),
        (b"a", 0, 0xD24EC4F1A98C6E5B),
        (b"abc", 0, 0x44BC2CF5AD770999),
        (b"message digest", 0, 0x066ED728FCEEB3BE),
        (b"abcdefghijklmnopqrstuvwxyz", 0, 0xCFE1F278FA89835C),
        (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", 0, 0xAAA46907D3047814),
        (b"12345678901234567890123456789012345678901234567890123456789012345678901234567890", 0,
         0xE04A477F19EE145D),
    ],
)
def test_published_vectors(data, seed, want):
    assert _hashing.xxh64(data, seed) == want
    assert xxh64_python(data, seed) == want


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_native_matches_the_python_reference(data, seed):
    assert _hashing.xxh64(data, seed) == xxh64_python(data, seed)


def test_batch_equals_one_by_one():
    items = [str(i).encode() * (i % 7) for i in range(1000)]
    assert _hashing.xxh64_many(items, 42).tolist() == [_hashing.xxh64(x, 42) for x in items]
