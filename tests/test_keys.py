"""The C++ key factorizer against a dictionary reference."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplat._native import KeyFactorizer, _keys


def reference_codes(build_rows, probe_rows):
    """Codes by first appearance on the build side; a None anywhere in a key gives -1."""
    codes: dict = {}
    build = []
    for row in build_rows:
        if None in row:
            build.append(-1)
            continue
        build.append(codes.setdefault(row, len(codes)))
    probe = [-1 if None in row else codes.get(row, -1) for row in probe_rows]
    return build, probe, len(codes)


def run(build_cols, probe_cols, chunks=1):
    f = KeyFactorizer([pa.array(c[0], type=c[1]) for c in build_cols])
    out = np.full(len(probe_cols[0][0]), -7, dtype=np.int64)
    arrays = []
    for values, typ in probe_cols:
        n = len(values)
        step = max(1, -(-n // chunks))
        arrays.append(pa.chunked_array([values[i : i + step] for i in range(0, n, step)] or [[]], type=typ))
    f.lookup(arrays, out)
    return f.codes.tolist(), out.tolist(), f.size


ints_dense = st.integers(-5, 20)
ints_sparse = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1, 0, -1]))
texts = st.text(alphabet=st.sampled_from(["a", "b", "é", "\u0000", "日"]), max_size=4)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(st.none(), ints_dense), max_size=30),
    st.lists(st.one_of(st.none(), ints_dense), max_size=30),
    st.integers(1, 4),
)
def test_int_keys_dense_range(build, probe, chunks):
    got = run([(build, pa.int64())], [(probe, pa.int64())], chunks)
    assert got == tuple(reference_codes([(b,) for b in build], [(p,) for p in probe]))


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(st.none(), ints_sparse), max_size=30),
    st.lists(st.one_of(st.none(), ints_sparse), max_size=30),
)
def test_int_keys_sparse_range_use_the_hash_table(build, probe):
    got = run([(build, pa.int64())], [(probe, pa.int64())])
    assert got == tuple(reference_codes([(b,) for b in build], [(p,) for p in probe]))


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.one_of(st.none(), texts), max_size=30),
    st.lists(st.one_of(st.none(), texts), max_size=30),
    st.sampled_from([pa.string(), pa.large_string(), pa.binary(), pa.string_view()]),
    st.integers(1, 3),
)
def test_string_keys(build, probe, typ, chunks):
    if typ == pa.binary():
        build = [None if b is None else b.encode() for b in build]
        probe = [None if p is None else p.encode() for p in probe]
    got = run([(build, typ)], [(probe, typ)], chunks)
    assert got == tuple(reference_codes([(b,) for b in build], [(p,) for p in probe]))


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_composite_keys(data):
    n_b, n_p = data.draw(st.integers(0, 25)), data.draw(st.integers(0, 25))
    small_ints = st.one_of(st.none(), st.integers(0, 3))
    small_texts = st.one_of(st.none(), st.sampled_from(["x", "y", ""]))
    b1 = data.draw(st.lists(small_ints, min_size=n_b, max_size=n_b))
    b2 = data.draw(st.lists(small_texts, min_size=n_b, max_size=n_b))
    b3 = data.draw(st.lists(small_ints, min_size=n_b, max_size=n_b))
    p1 = data.draw(st.lists(small_ints, min_size=n_p, max_size=n_p))
    p2 = data.draw(st.lists(small_texts, min_size=n_p, max_size=n_p))
    p3 = data.draw(st.lists(small_ints, min_size=n_p, max_size=n_p))
    got = run(
        [(b1, pa.int64()), (b2, pa.string()), (b3, pa.int32())],
        [(p1, pa.int64()), (p2, pa.large_string()), (p3, pa.int8())],
        chunks=data.draw(st.integers(1, 3)),
    )
    assert got == tuple(reference_codes(list(zip(b1, b2, b3)), list(zip(p1, p2, p3))))


def test_sliced_and_dictionary_arrays():
    base = pa.array(["q", "a", "b", "a", "c"])
    f = KeyFactorizer([base.slice(1, 3)])  # a, b, a
    assert f.codes.tolist() == [0, 1, 0]
    out = np.empty(4, dtype=np.int64)
    f.lookup([pa.array(["b", "c", "a", "zz"]).dictionary_encode()], out)
    assert out.tolist() == [1, -1, 0, -1]
    ints = pa.array([9, 8, 7, 8], type=pa.int16()).slice(1)
    g = KeyFactorizer([ints])
    assert g.codes.tolist() == [0, 1, 0]


def test_unsigned_keys_beyond_int64_are_refused():
    with pytest.raises(pa.ArrowInvalid):
        KeyFactorizer([pa.array([2**64 - 1], type=pa.uint64())])


def test_native_layer_refuses_silent_copies_and_bad_buffers():
    f = _keys.Int64Factorizer()
    with pytest.raises(TypeError):  # int32 would need a copy: noconvert refuses
        f.build(np.arange(3, dtype=np.int32))
    f.build(np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="already built"):
        f.build(np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="as long as the keys"):
        f.lookup(np.arange(3, dtype=np.int64), None, np.empty(2, dtype=np.int64))
    b = _keys.BinaryFactorizer()
    with pytest.raises(ValueError, match="outside the data buffer"):
        b.build(np.array([0, 10], dtype=np.int32), np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="decrease"):
        b.build(np.array([0, 2, 1], dtype=np.int32), np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="not built"):
        _keys.Int64Factorizer().lookup(np.arange(1, dtype=np.int64), None, np.empty(1, dtype=np.int64))


def test_combine_codes_overflow_is_an_error():
    big = np.array([2**62], dtype=np.int64)
    with pytest.raises(OverflowError):
        _keys.combine_codes(big, np.array([0], dtype=np.int64), 4)
    assert _keys.combine_codes(np.array([1, -1]), np.array([2, 0]), 3).tolist() == [5, -1]


def test_many_keys_dense_and_hashed_agree():
    rng = np.random.default_rng(3)
    build = rng.integers(0, 50_000, 200_000)
    probe = rng.integers(-1000, 60_000, 500_000)
    dense = KeyFactorizer([pa.array(build)])
    hashed = KeyFactorizer([pa.array(build * 1_000_003 + 7)])
    assert dense._columns[0].dense and not hashed._columns[0].dense
    a, b = np.empty(len(probe), np.int64), np.empty(len(probe), np.int64)
    dense.lookup([pa.array(probe)], a)
    hashed.lookup([pa.array(probe * 1_000_003 + 7)], b)
    np.testing.assert_array_equal(dense.codes, hashed.codes)
    np.testing.assert_array_equal(a, b)
    _, first = np.unique(build, return_index=True)
    assert dense.size == len(first)


def _in_a_subprocess(code: str) -> subprocess.CompletedProcess:
    """Run code that crashed the interpreter before the fix: a crash must fail the test, not end the run."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["int", "binary"])
def test_a_build_from_another_thread_while_one_runs_is_refused_not_run_at_the_same_time(kind):
    """Both builds passed the 'already built' check, released the GIL and wrote the same tables: a segfault,
    or 3,081,080 codes for 3,000,000 distinct keys."""
    done = _in_a_subprocess(f"""
        import sys, threading
        import numpy as np
        from mlplat._native import _keys
        kind = {kind!r}
        n = 3_000_000 if kind == "int" else 1_000_000
        if kind == "int":
            f, args = _keys.Int64Factorizer(), (np.arange(n, dtype=np.int64) * 1_000_003,)  # the hash table path
        else:
            data = np.frombuffer(b"".join(b"%08d" % i for i in range(n)), np.uint8)
            f, args = _keys.BinaryFactorizer(), (np.arange(0, 8 * n + 1, 8, dtype=np.int64), data)
        sys.setswitchinterval(10.0)  # this thread keeps the GIL until the build releases it
        go, result = threading.Event(), {{}}
        def other():
            go.wait()  # wakes now, but gets the GIL only once the main thread's build releases it
            try:
                result["other"] = f.build(*args).max()
            except ValueError as exc:
                result["other"] = str(exc)
        t = threading.Thread(target=other)
        t.start()
        go.set()
        codes = f.build(*args)
        t.join()
        print(result["other"], "|", f.size == n and codes.tolist() == list(range(n)))
    """)
    assert done.returncode == 0, done
    assert done.stdout.strip() == "factorizer is already being built (in another thread) | True", done


def test_keys_must_be_one_dimensional():
    with pytest.raises(ValueError, match="keys must be a 1-d array"):
        _keys.Int64Factorizer().build(np.zeros((2, 3), dtype=np.int64))  # took 2 codes of 6 keys
    f = _keys.Int64Factorizer()
    f.build(np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="keys must be a 1-d array"):
        f.lookup(np.zeros((2, 1), dtype=np.int64), None, np.empty(2, dtype=np.int64))
    with pytest.raises(ValueError, match="1-d"):
        _keys.combine_codes(np.zeros((1, 2), dtype=np.int64), np.zeros(1, dtype=np.int64), 2)


def test_a_probe_column_of_another_kind_is_refused_not_cast():
    ints = KeyFactorizer([pa.array([7, 3])])
    out = np.full(2, -7, dtype=np.int64)
    with pytest.raises(TypeError, match="built from int keys, this key column is string"):
        ints.lookup([pa.array(["7", "3"])], out)  # the cast matched the string "7" to the integer 7: [0, 1]
    with pytest.raises(TypeError, match="integers or strings, got double"):
        ints.lookup([pa.array([7.0, 3.0])], out)
    strings = KeyFactorizer([pa.array(["a"])])
    with pytest.raises(TypeError, match="built from string keys, this key column is int64"):
        strings.lookup([pa.array([1, 2])], out)  # was "not enough values to unpack (expected 3, got 2)"
    for f in (ints, strings):  # an all-null column of Arrow's null type: no key, as any null
        f.lookup([pa.nulls(2)], out)
        assert out.tolist() == [-1, -1]
        f.lookup([pa.chunked_array([pa.nulls(1), pa.nulls(1)])], out)
        assert out.tolist() == [-1, -1]
    composite = KeyFactorizer([pa.array([1, 2]), pa.array(["x", "y"])])
    composite.lookup([pa.array([2, 1]), pa.nulls(2)], out)
    assert out.tolist() == [-1, -1]


def test_out_of_the_wrong_type_is_refused_with_a_clear_error():
    f = KeyFactorizer([pa.array(["a", "b"])])
    with pytest.raises(TypeError, match="out must be a 1-d contiguous int64 numpy array, got a 1-d int32 array"):
        f.lookup([pa.array(["b", "a"])], np.empty(2, dtype=np.int32))
    with pytest.raises(TypeError, match="got a 1-d int64 array, not contiguous"):
        f.lookup([pa.array(["b", "a"])], np.empty(4, dtype=np.int64)[::2])
    with pytest.raises(TypeError, match="got list"):
        f.lookup([pa.array(["b", "a"])], [0, 0])
    read_only = np.empty(2, dtype=np.int64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        f.lookup([pa.array(["b", "a"])], read_only)
