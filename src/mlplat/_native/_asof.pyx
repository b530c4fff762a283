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

The algorithm groups the right side by key code with a stable counting sort
that writes (ts, position) pairs straight into their group (in parallel:
each thread scatters its chunk of rows into its own slice of every group),
dropping rows no left row of their key could see. Each group is then sorted
by (ts, created, position), reading created times only for rows that tie on
ts, with an insertion sort when the group is nearly in order (data written in
time order) and an introsort otherwise. A left row is answered with one
binary search: the last row with ts <= hi is the winner, because the
tie-break is the sort order itself. Groups are independent, so they run in
parallel without the GIL.
"""
from cython.parallel cimport prange
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t
from libc.stdlib cimport free, malloc

import os

import numpy as np

ctypedef Py_ssize_t intp_t

#: CPUs this process may run on: the most threads the kernel starts
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
#: below this many rows (left + right) the kernel runs on one thread
_SMALL = 16384


cdef struct _Row:
    int64_t ts
    intp_t pos


cdef inline bint _less(const _Row* a, const _Row* b, const int64_t* created) noexcept nogil:
    """(ts, created, pos) order; created is read only on a tie in ts (NULL: no created times)."""
    if a.ts != b.ts:
        return a.ts < b.ts
    if created != NULL and created[a.pos] != created[b.pos]:
        return created[a.pos] < created[b.pos]
    return a.pos < b.pos


cdef inline void _swap(_Row* a, intp_t i, intp_t j) noexcept nogil:
    cdef _Row t = a[i]
    a[i] = a[j]
    a[j] = t


cdef bint _insertion_sort(_Row* a, intp_t n, const int64_t* c, intp_t max_moves) noexcept nogil:
    """Insertion sort; gives up (returning False, a[] still a permutation) past max_moves moves."""
    cdef intp_t i, j, moves = 0
    cdef _Row x
    for i in range(1, n):
        x = a[i]
        j = i - 1
        while j >= 0 and _less(&x, &a[j], c):
            a[j + 1] = a[j]
            j -= 1
            moves += 1
        a[j + 1] = x
        if moves > max_moves:
            return False
    return True


cdef void _sift_down(_Row* a, intp_t root, intp_t n, const int64_t* c) noexcept nogil:
    cdef intp_t child
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and _less(&a[child], &a[child + 1], c):
            child += 1
        if not _less(&a[root], &a[child], c):
            return
        _swap(a, root, child)
        root = child


cdef void _heapsort(_Row* a, intp_t n, const int64_t* c) noexcept nogil:
    cdef intp_t i
    i = n // 2 - 1
    while i >= 0:
        _sift_down(a, i, n, c)
        i -= 1
    i = n - 1
    while i > 0:
        _swap(a, 0, i)
        _sift_down(a, 0, i, c)
        i -= 1


cdef void _introsort(_Row* a, intp_t n, int depth, const int64_t* c) noexcept nogil:
    """Sort a[0:n] by (ts, created, pos): quicksort, heapsort past ``depth``."""
    cdef intp_t i, j, mid
    cdef _Row pivot
    while n > 16:
        if depth == 0:
            _heapsort(a, n, c)
            return
        depth -= 1
        mid = n // 2
        # median of three into a[mid], then use it as the pivot
        if _less(&a[mid], &a[0], c):
            _swap(a, mid, 0)
        if _less(&a[n - 1], &a[0], c):
            _swap(a, n - 1, 0)
        if _less(&a[n - 1], &a[mid], c):
            _swap(a, n - 1, mid)
        pivot = a[mid]
        i = 0
        j = n - 1
        while True:  # Hoare partition; positions are unique, so no two rows are equal
            while _less(&a[i], &pivot, c):
                i += 1
            while _less(&pivot, &a[j], c):
                j -= 1
            if i >= j:
                break
            _swap(a, i, j)
            i += 1
            j -= 1
        # a[0:j+1] <= pivot <= a[j+1:n]; recurse on the smaller side
        if j + 1 < n - j - 1:
            _introsort(a, j + 1, depth, c)
            a = a + j + 1
            n = n - j - 1
        else:
            _introsort(a + j + 1, n - j - 1, depth, c)
            n = j + 1
    _insertion_sort(a, n, c, n * n)


cdef inline int _depth_limit(intp_t n) noexcept nogil:
    cdef int d = 0
    while n > 1:
        n >>= 1
        d += 1
    return 2 * d


cdef void _sort_group(_Row* a, intp_t n, const int64_t* c) noexcept nogil:
    """Sort one key's rows: nothing if in order, insertion sort if nearly, else introsort."""
    cdef intp_t q, descents = 0
    for q in range(1, n):
        if _less(&a[q], &a[q - 1], c):
            descents += 1
    if descents == 0:
        return
    if descents * 8 <= n and _insertion_sort(a, n, c, 8 * n):
        return
    _introsort(a, n, _depth_limit(n), c)


def _sort_rows(const int64_t[::1] ts, const int64_t[::1] created):
    """Testing hook: the permutation the kernel's group sort gives (ts, created, position)."""
    cdef intp_t n = ts.shape[0], i
    if created.shape[0] != n:
        raise ValueError("ts and created must have the same length")
    out = np.empty(n, dtype=np.intp)
    cdef intp_t[::1] out_v = out
    cdef _Row* buf = <_Row*> malloc(max(n, 1) * sizeof(_Row))
    cdef const int64_t* c = &created[0] if n else NULL
    if buf == NULL:
        raise MemoryError()
    with nogil:
        for i in range(n):
            buf[i].ts = ts[i]
            buf[i].pos = i
        _sort_group(buf, n, c)
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
    n_threads: worker threads.

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
    # no more threads than CPUs (OpenMP ends the process when it cannot start thousands), and one for
    # small joins, where starting threads costs more than the join (3 rows: 0.016 ms on 1, 22 ms on 512)
    n_threads = 1 if n_left + n_right < _SMALL else min(n_threads, _CPUS)

    out = np.full(n_left, -1, dtype=np.intp)
    cdef intp_t[::1] out_v = out
    cdef intp_t[::1] l_start = np.zeros(n_keys + 1, dtype=np.intp)
    cdef int64_t[::1] key_lo = np.full(n_keys, INT64_MAX, dtype=np.int64)
    cdef int64_t[::1] key_hi = np.full(n_keys, INT64_MIN, dtype=np.int64)
    cdef intp_t i, k, c
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
    if bad_key >= 0:
        raise ValueError(f"key code {bad_key} is not below n_keys={n_keys}")

    # right: chunks counted and scattered in parallel; chunk c's rows of key k
    # land after chunk c-1's, so every group keeps read order (a stable sort)
    cdef intp_t n_chunks = max(1, min(n_threads, n_right // 65536, (1 << 25) // (n_keys + 1)))
    cdef intp_t[:, ::1] fill = np.zeros((n_chunks, n_keys + 1), dtype=np.intp)
    cdef intp_t[::1] bad = np.full(n_chunks, -1, dtype=np.intp)
    _count_right(right_key, right_ts, key_lo, key_hi, fill, bad, min(n_threads, n_chunks))
    for c in range(n_chunks):
        if bad[c] >= 0:
            raise ValueError(f"key code {bad[c]} is not below n_keys={n_keys}")

    cdef intp_t[::1] r_start = np.empty(n_keys + 1, dtype=np.intp)
    cdef intp_t total = 0, count
    with nogil:
        for k in range(n_keys):  # fill[c, k] <- where chunk c writes its first row of key k
            r_start[k] = total
            for c in range(n_chunks):
                count = fill[c, k + 1]
                fill[c, k] = total
                total += count
            l_start[k + 1] += l_start[k]
        r_start[n_keys] = total

    rows_arr = np.empty(total * sizeof(_Row), dtype=np.uint8)
    cdef _Row* rows = NULL
    cdef unsigned char[::1] rows_bytes = rows_arr
    if total:
        rows = <_Row*> &rows_bytes[0]
    _scatter_right(right_key, right_ts, key_lo, key_hi, fill, rows, min(n_threads, n_chunks))

    cdef intp_t[::1] l_order = np.empty(l_start[n_keys], dtype=np.intp)
    cdef intp_t[::1] l_fill = np.array(l_start[:n_keys], dtype=np.intp)
    with nogil:
        for i in range(n_left):
            k = left_key[i]
            if k >= 0:
                l_order[l_fill[k]] = i
                l_fill[k] += 1

    _per_key(r_start, rows, &right_created[0] if has_created else NULL, l_start, l_order,
             left_lo, left_hi, out_v, n_keys, n_threads)
    return out


cdef void _count_right(
    const int64_t[::1] right_key, const int64_t[::1] right_ts,
    const int64_t[::1] key_lo, const int64_t[::1] key_hi,
    intp_t[:, ::1] counts, intp_t[::1] bad, int n_threads,
) noexcept nogil:
    """counts[c, k + 1] = rows of chunk c with key k inside the key's window."""
    cdef intp_t n_chunks = counts.shape[0], n_keys = key_lo.shape[0], n = right_key.shape[0]
    cdef intp_t c, j, k
    cdef int64_t t
    for c in prange(n_chunks, schedule="static", num_threads=n_threads):
        for j in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            k = right_key[j]
            if k < 0:
                continue
            if k >= n_keys:
                bad[c] = k
                break
            t = right_ts[j]
            if t >= key_lo[k] and t <= key_hi[k]:
                counts[c, k + 1] += 1


cdef void _scatter_right(
    const int64_t[::1] right_key, const int64_t[::1] right_ts,
    const int64_t[::1] key_lo, const int64_t[::1] key_hi,
    intp_t[:, ::1] fill, _Row* rows, int n_threads,
) noexcept nogil:
    """Write (ts, position) of each kept row into its group, chunk by chunk in parallel."""
    cdef intp_t n_chunks = fill.shape[0], n = right_key.shape[0]
    cdef intp_t c, j, k, slot
    cdef int64_t t
    for c in prange(n_chunks, schedule="static", num_threads=n_threads):
        for j in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            k = right_key[j]
            if k < 0:
                continue
            t = right_ts[j]
            if t >= key_lo[k] and t <= key_hi[k]:
                slot = fill[c, k]
                rows[slot].ts = t
                rows[slot].pos = j
                fill[c, k] = slot + 1


cdef void _per_key(
    const intp_t[::1] r_start, _Row* rows, const int64_t* created,
    const intp_t[::1] l_start, const intp_t[::1] l_order,
    const int64_t[::1] left_lo, const int64_t[::1] left_hi,
    intp_t[::1] out, intp_t n_keys, int n_threads,
) noexcept nogil:
    cdef intp_t k, m, q, lo, hi, mid, i
    cdef int64_t bound
    cdef _Row* g
    for k in prange(n_keys, schedule="guided", num_threads=n_threads):
        m = r_start[k + 1] - r_start[k]
        if m == 0:
            continue
        g = rows + r_start[k]
        _sort_group(g, m, created)
        for q in range(l_start[k], l_start[k + 1]):
            i = l_order[q]
            bound = left_hi[i]
            lo = 0
            hi = m
            while lo < hi:  # first row with ts > bound
                mid = (lo + hi) >> 1
                if g[mid].ts <= bound:
                    lo = mid + 1
                else:
                    hi = mid
            if lo > 0 and g[lo - 1].ts >= left_lo[i]:
                out[i] = g[lo - 1].pos
