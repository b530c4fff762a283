# cython: language_level=3
"""Point-in-time (as-of, backward) join kernel.

``asof_backward_on_ts_by_key`` answers, for every left (entity) row, which
right (feature) row the offline rule of DESIGN.md picks:

    among right rows j with right_key[j] == left_key[i] and
    left_lo[i] <= right_ts[j] <= left_hi[i]   (both ends inclusive),
    the j with the greatest (right_ts[j], right_created[j], j).

It works on positions only (int64 key codes, int64 timestamps); the caller
factorizes keys, converts timestamps and gathers feature values with the
returned indexer, as pandas' ``asof_join_backward_on_X_by_Y`` does.

The algorithm groups both sides by key code with a counting sort (stable, so
rows keep their read order inside a group), drops right rows that no left row
of their key could see, sorts each right group by (ts, created, position) and
answers each left row of the group with one binary search: the last right row
with ts <= hi is the winner, because the tie-break is the sort order itself.
Groups are independent, so they run in parallel without the GIL.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t
from libc.stdlib cimport free, malloc

import numpy as np

ctypedef Py_ssize_t intp_t


cdef struct _Row:
    int64_t ts
    int64_t created
    intp_t pos


cdef inline bint _less(const _Row* a, const _Row* b) noexcept nogil:
    if a.ts != b.ts:
        return a.ts < b.ts
    if a.created != b.created:
        return a.created < b.created
    return a.pos < b.pos


cdef inline void _swap(_Row* a, intp_t i, intp_t j) noexcept nogil:
    cdef _Row t = a[i]
    a[i] = a[j]
    a[j] = t


cdef void _insertion_sort(_Row* a, intp_t n) noexcept nogil:
    cdef intp_t i, j
    cdef _Row x
    for i in range(1, n):
        x = a[i]
        j = i - 1
        while j >= 0 and _less(&x, &a[j]):
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


cdef void _sift_down(_Row* a, intp_t root, intp_t n) noexcept nogil:
    cdef intp_t child
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and _less(&a[child], &a[child + 1]):
            child += 1
        if not _less(&a[root], &a[child]):
            return
        _swap(a, root, child)
        root = child


cdef void _heapsort(_Row* a, intp_t n) noexcept nogil:
    cdef intp_t i
    i = n // 2 - 1
    while i >= 0:
        _sift_down(a, i, n)
        i -= 1
    i = n - 1
    while i > 0:
        _swap(a, 0, i)
        _sift_down(a, 0, i)
        i -= 1


cdef void _introsort(_Row* a, intp_t n, int depth) noexcept nogil:
    """Sort a[0:n] by (ts, created, pos): quicksort, heapsort past ``depth``."""
    cdef intp_t i, j, mid
    cdef _Row pivot
    while n > 16:
        if depth == 0:
            _heapsort(a, n)
            return
        depth -= 1
        mid = n // 2
        # median of three into a[mid], then use it as the pivot
        if _less(&a[mid], &a[0]):
            _swap(a, mid, 0)
        if _less(&a[n - 1], &a[0]):
            _swap(a, n - 1, 0)
        if _less(&a[n - 1], &a[mid]):
            _swap(a, n - 1, mid)
        pivot = a[mid]
        i = 0
        j = n - 1
        while True:  # Hoare partition; positions are unique, so no equal keys
            while _less(&a[i], &pivot):
                i += 1
            while _less(&pivot, &a[j]):
                j -= 1
            if i >= j:
                break
            _swap(a, i, j)
            i += 1
            j -= 1
        # a[0:j+1] <= pivot <= a[j+1:n]; recurse on the smaller side
        if j + 1 < n - j - 1:
            _introsort(a, j + 1, depth)
            a = a + j + 1
            n = n - j - 1
        else:
            _introsort(a + j + 1, n - j - 1, depth)
            n = j + 1
    _insertion_sort(a, n)


cdef inline int _depth_limit(intp_t n) noexcept nogil:
    cdef int d = 0
    while n > 1:
        n >>= 1
        d += 1
    return 2 * d


def _sort_rows(const int64_t[::1] ts, const int64_t[::1] created):
    """Testing hook: the permutation the kernel's sort gives (ts, created, position)."""
    cdef intp_t n = ts.shape[0], i
    if created.shape[0] != n:
        raise ValueError("ts and created must have the same length")
    out = np.empty(n, dtype=np.intp)
    cdef intp_t[::1] out_v = out
    cdef _Row* buf = <_Row*> malloc(max(n, 1) * sizeof(_Row))
    if buf == NULL:
        raise MemoryError()
    with nogil:
        for i in range(n):
            buf[i].ts = ts[i]
            buf[i].created = created[i]
            buf[i].pos = i
        _introsort(buf, n, _depth_limit(n))
        for i in range(n):
            out_v[i] = buf[i].pos
    free(buf)
    return out


def asof_backward_on_ts_by_key(
    const int64_t[::1] right_key,
    const int64_t[::1] right_ts,
    const int64_t[::1] right_created,
    const int64_t[::1] left_key,
    const int64_t[::1] left_lo,
    const int64_t[::1] left_hi,
    intp_t n_keys,
    int n_threads=1,
):
    """Index of the right row each left row takes, or -1.

    right_key, left_key: dense key codes in [0, n_keys); a negative code never
        matches (unknown key, null key, or a row the caller filtered out).
    right_ts: event time of each right row (any int64 unit, same as the bounds).
    right_created: tie-break for equal right_ts; an empty array means none.
    left_lo, left_hi: inclusive bounds on right_ts for each left row
        (INT64_MIN for no lower bound).
    n_threads: worker threads for the per-key phase.

    Returns an intp array of len(left_key).
    """
    cdef intp_t n_right = right_key.shape[0]
    cdef intp_t n_left = left_key.shape[0]
    cdef bint has_created = right_created.shape[0] != 0
    if right_ts.shape[0] != n_right:
        raise ValueError(f"right_ts has {right_ts.shape[0]} rows, right_key has {n_right}")
    if has_created and right_created.shape[0] != n_right:
        raise ValueError(f"right_created has {right_created.shape[0]} rows, right_key has {n_right}")
    if left_lo.shape[0] != n_left or left_hi.shape[0] != n_left:
        raise ValueError("left_lo and left_hi must have as many rows as left_key")
    if n_keys < 0:
        raise ValueError("n_keys must be >= 0")
    if n_threads < 1:
        raise ValueError("n_threads must be >= 1")

    out = np.full(n_left, -1, dtype=np.intp)
    cdef intp_t[::1] out_v = out
    cdef intp_t[::1] l_start = np.zeros(n_keys + 1, dtype=np.intp)
    cdef intp_t[::1] r_start = np.zeros(n_keys + 1, dtype=np.intp)
    cdef int64_t[::1] key_lo = np.full(n_keys, INT64_MAX, dtype=np.int64)
    cdef int64_t[::1] key_hi = np.full(n_keys, INT64_MIN, dtype=np.int64)
    cdef intp_t i, j, k, p, total, c, max_group = 0
    cdef int64_t t
    cdef intp_t bad_key = -1

    with nogil:
        # left: count per key and the widest window any row of the key asks for
        for i in range(n_left):
            k = left_key[i]
            if k < 0:
                continue
            if k >= n_keys:
                bad_key = k
                break
            l_start[k + 1] += 1
            if left_lo[i] < key_lo[k]:
                key_lo[k] = left_lo[i]
            if left_hi[i] > key_hi[k]:
                key_hi[k] = left_hi[i]
        if bad_key < 0:
            # right: count the rows some left row of their key could see
            for j in range(n_right):
                k = right_key[j]
                if k < 0:
                    continue
                if k >= n_keys:
                    bad_key = k
                    break
                t = right_ts[j]
                if t >= key_lo[k] and t <= key_hi[k]:
                    r_start[k + 1] += 1
    if bad_key >= 0:
        raise ValueError(f"key code {bad_key} is not below n_keys={n_keys}")

    with nogil:
        for k in range(n_keys):
            c = r_start[k + 1]
            if c > max_group:
                max_group = c
            r_start[k + 1] += r_start[k]
            l_start[k + 1] += l_start[k]

    cdef intp_t[::1] l_order = np.empty(l_start[n_keys], dtype=np.intp)
    cdef intp_t[::1] r_order = np.empty(r_start[n_keys], dtype=np.intp)
    cdef intp_t[::1] l_fill = np.array(l_start[:n_keys], dtype=np.intp)
    cdef intp_t[::1] r_fill = np.array(r_start[:n_keys], dtype=np.intp)
    cdef int[::1] failed = np.zeros(1, dtype=np.intc)

    with nogil:
        # stable scatter: each group keeps read order
        for i in range(n_left):
            k = left_key[i]
            if k >= 0:
                l_order[l_fill[k]] = i
                l_fill[k] += 1
        for j in range(n_right):
            k = right_key[j]
            if k >= 0:
                t = right_ts[j]
                if t >= key_lo[k] and t <= key_hi[k]:
                    r_order[r_fill[k]] = j
                    r_fill[k] += 1

    _per_key(r_start, r_order, l_start, l_order, right_ts, right_created, has_created,
             left_lo, left_hi, out_v, n_keys, max_group, n_threads, failed)
    if failed[0]:
        raise MemoryError("as-of join: could not allocate a per-thread sort buffer")
    return out


cdef void _per_key(
    const intp_t[::1] r_start, const intp_t[::1] r_order,
    const intp_t[::1] l_start, const intp_t[::1] l_order,
    const int64_t[::1] right_ts, const int64_t[::1] right_created, bint has_created,
    const int64_t[::1] left_lo, const int64_t[::1] left_hi,
    intp_t[::1] out, intp_t n_keys, intp_t max_group, int n_threads, int[::1] failed,
) noexcept nogil:
    cdef intp_t k, m, q, lo, hi, mid, i, rs
    cdef bint ordered
    cdef int64_t bound
    cdef _Row* buf
    with parallel(num_threads=n_threads):
        buf = <_Row*> malloc(max(max_group, 1) * sizeof(_Row))
        if buf == NULL:
            failed[0] = 1
        for k in prange(n_keys, schedule="guided"):
            m = r_start[k + 1] - r_start[k]
            if m == 0 or buf == NULL:
                continue
            rs = r_start[k]
            ordered = True
            for q in range(m):
                buf[q].pos = r_order[rs + q]
                buf[q].ts = right_ts[buf[q].pos]
                buf[q].created = right_created[buf[q].pos] if has_created else 0
                if q > 0 and _less(&buf[q], &buf[q - 1]):
                    ordered = False
            if not ordered:
                _introsort(buf, m, _depth_limit(m))
            for q in range(l_start[k], l_start[k + 1]):
                i = l_order[q]
                bound = left_hi[i]
                lo = 0
                hi = m
                while lo < hi:  # first row with ts > bound
                    mid = (lo + hi) >> 1
                    if buf[mid].ts <= bound:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo > 0 and buf[lo - 1].ts >= left_lo[i]:
                    out[i] = buf[lo - 1].pos
        free(buf)
