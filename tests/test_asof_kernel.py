"""The Cython as-of kernel against the pure-Python and NumPy references."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplat._native import _asof, asof_backward_on_ts_by_key
from reference import asof_numpy, asof_python

I64 = np.iinfo(np.int64)


@st.composite
def asof_cases(draw):
    """Small key and time domains so that ties, window edges and unknown keys are the norm."""
    n_keys = draw(st.integers(1, 6))
    n_right = draw(st.integers(0, 40))
    n_left = draw(st.integers(0, 25))
    t_max = draw(st.sampled_from([3, 10, 1000]))
    keys = st.integers(-1, n_keys - 1)  # -1: unknown or null key
    times = st.integers(0, t_max)
    right_key = draw(st.lists(keys, min_size=n_right, max_size=n_right))
    right_ts = draw(st.lists(times, min_size=n_right, max_size=n_right))
    with_created = draw(st.booleans())
    right_created = draw(st.lists(st.integers(0, 3), min_size=n_right, max_size=n_right)) if with_created else []
    left_key = draw(st.lists(keys, min_size=n_left, max_size=n_left))
    left_hi = draw(st.lists(times, min_size=n_left, max_size=n_left))
    ttl = draw(st.one_of(st.none(), st.integers(0, t_max)))
    left_lo = [I64.min if ttl is None else h - ttl for h in left_hi]
    threads = draw(st.sampled_from([1, 2, 3]))
    arrays = [np.asarray(a, dtype=np.int64) for a in (right_key, right_ts, right_created, left_key, left_lo, left_hi)]
    return arrays, n_keys, threads


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(asof_cases())
def test_kernel_matches_python_reference(case):
    (rk, rt, rc, lk, lo, hi), n_keys, threads = case
    got = asof_backward_on_ts_by_key(rk, rt, rc, lk, lo, hi, n_keys, threads)
    assert got.dtype == np.intp
    assert got.tolist() == asof_python(rk, rt, rc, lk, lo, hi)


@settings(max_examples=300, deadline=None)
@given(asof_cases())
def test_numpy_reference_agrees_with_python_reference(case):
    (rk, rt, rc, lk, lo, hi), _, _ = case
    assert asof_numpy(rk, rt, rc, lk, lo, hi).tolist() == asof_python(rk, rt, rc, lk, lo, hi)


@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "all_equal_ts", "one_key"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_groups_and_adversarial_orders(layout, threads):
    """Groups far past the insertion-sort cutoff, in orders that break naive quicksorts."""
    rng = np.random.default_rng(7)
    n, n_keys = 60_000, (1 if layout == "one_key" else 50)
    rk = rng.integers(0, n_keys, n)
    rt = rng.integers(0, 500, n)
    rc = rng.integers(0, 5, n)
    if layout == "sorted":
        o = np.lexsort((rc, rt))
        rk, rt, rc = rk[o], rt[o], rc[o]
    elif layout == "reversed":
        o = np.lexsort((rc, rt))[::-1]
        rk, rt, rc = rk[o], rt[o], rc[o]
    elif layout == "all_equal_ts":
        rt = np.full(n, 42)
    lk = rng.integers(-1, n_keys, 3_000)
    hi = rng.integers(-10, 520, 3_000)
    lo = hi - rng.integers(0, 100, 3_000)
    got = asof_backward_on_ts_by_key(rk, rt, rc, lk, lo, hi, n_keys, threads)
    np.testing.assert_array_equal(got, asof_numpy(rk, rt, rc, lk, lo, hi))


def test_right_rows_split_in_chunks_across_threads_keep_read_order():
    """Past 131,072 right rows two threads count and scatter the right side in two chunks; ties on
    (ts, created) must still go to the row read last, as with one chunk."""
    rng = np.random.default_rng(11)
    n, n_keys = 200_000, 300
    rk, rt, rc = rng.integers(0, n_keys, n), rng.integers(0, 50, n), rng.integers(0, 2, n)  # many exact ties
    lk = rng.integers(-1, n_keys, 5_000)
    hi = rng.integers(0, 60, 5_000)
    lo = hi - rng.integers(0, 30, 5_000)
    got = asof_backward_on_ts_by_key(rk, rt, rc, lk, lo, hi, n_keys, 2)
    np.testing.assert_array_equal(got, asof_numpy(rk, rt, rc, lk, lo, hi))
    np.testing.assert_array_equal(got, asof_backward_on_ts_by_key(rk, rt, rc, lk, lo, hi, n_keys, 1))


def test_sort_helper_orders_by_ts_created_position():
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 15, 16, 17, 1000, 100_000):
        ts = rng.integers(0, max(n // 10, 1), n)
        created = rng.integers(0, 3, n)
        np.testing.assert_array_equal(_asof._sort_rows(ts, created), np.lexsort((np.arange(n), created, ts)))


def test_extreme_timestamps_and_unbounded_window():
    rk = np.array([0, 0, 0], dtype=np.int64)
    rt = np.array([I64.min + 1, 0, I64.max], dtype=np.int64)
    lk = np.array([0, 0, 0], dtype=np.int64)
    lo = np.full(3, I64.min, dtype=np.int64)
    hi = np.array([I64.min + 1, -1, I64.max], dtype=np.int64)
    got = asof_backward_on_ts_by_key(rk, rt, np.empty(0, np.int64), lk, lo, hi, 1)
    assert got.tolist() == [0, 0, 2]


def test_window_bounds_are_inclusive():
    rk = np.zeros(2, dtype=np.int64)
    rt = np.array([10, 20], dtype=np.int64)
    lk = np.zeros(4, dtype=np.int64)
    lo = np.array([10, 11, 20, 21], dtype=np.int64)
    hi = np.array([10, 19, 20, 30], dtype=np.int64)
    got = asof_backward_on_ts_by_key(rk, rt, np.empty(0, np.int64), lk, lo, hi, 1)
    assert got.tolist() == [0, -1, 1, -1]


def _arrays(n_right=3, n_left=2):
    z = lambda n: np.zeros(n, dtype=np.int64)  # noqa: E731
    return [z(n_right), z(n_right), z(0), z(n_left), z(n_left), z(n_left)]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(1, np.zeros(2, np.int64)), "right_ts has 2 rows"),
        (lambda a: a.__setitem__(2, np.zeros(1, np.int64)), "right_created has 1 rows"),
        (lambda a: a.__setitem__(4, np.zeros(1, np.int64)), "left_lo and left_hi"),
        (lambda a: a[0].__setitem__(0, 5), "key code 5 is not below n_keys=1"),
        (lambda a: a[3].__setitem__(0, 1), "key code 1 is not below n_keys=1"),
    ],
)
def test_bad_input_is_refused(change, message):
    arrays = _arrays()
    change(arrays)
    with pytest.raises(ValueError, match=message):
        asof_backward_on_ts_by_key(*arrays, 1)


def test_more_threads_than_cpus_give_the_same_answer_and_do_not_end_the_process():
    done = subprocess.run([sys.executable, "-c", (
        "import numpy as np\n"
        "from mlplat._native import asof_backward_on_ts_by_key as k\n"
        "n = 40000\n"
        "key = np.arange(n, dtype=np.int64) % 7; ts = np.arange(n, dtype=np.int64)\n"
        "args = (key, ts, np.empty(0, np.int64), np.arange(7, dtype=np.int64), np.full(7, -1, np.int64), "
        "np.full(7, n, np.int64), 7)\n"
        "print(k(*args, 50000).tolist() == k(*args, 1).tolist())\n")],
        capture_output=True, text=True, timeout=120)  # OpenMP ended the process at 50,000 threads
    assert done.returncode == 0 and done.stdout.strip() == "True", done


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_threads"):
        asof_backward_on_ts_by_key(*_arrays(), 1, 0)
    with pytest.raises(ValueError, match="n_keys"):
        asof_backward_on_ts_by_key(*_arrays(), -1)
    with pytest.raises((ValueError, TypeError)):  # wrong dtype: typed memoryviews refuse it
        asof_backward_on_ts_by_key(np.zeros(3, np.int32), *_arrays()[1:], 1)
