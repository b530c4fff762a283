"""The C++ online-record codec against the pure-Python reference in reference.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplat._native import _codec
from mlplat._native.codec import RecordBuffers, encode_records, entity_key_buffers
from reference import bucket, decode_record, encode_record, entity_key, redis_key

I64 = st.integers(-(2**63), 2**63 - 1)
ARROW = {0: pa.int64(), 1: pa.float32(), 2: pa.float64(), 3: pa.bool_(), 4: pa.string(), 5: pa.binary(),
         6: pa.timestamp("ns", "UTC")}


def values_for(kind: int):
    return {
        0: I64,
        1: st.floats(width=32, allow_nan=False),
        2: st.floats(allow_nan=False),
        3: st.booleans(),
        4: st.text(max_size=300),
        5: st.binary(max_size=200),
        6: st.integers(-(2**62), 2**62),
    }[kind]


@st.composite
def tables(draw):
    kinds = draw(st.lists(st.integers(0, 6), min_size=1, max_size=12))
    n = draw(st.integers(0, 20))
    cols = [draw(st.lists(st.one_of(st.none(), values_for(k)), min_size=n, max_size=n)) for k in kinds]
    events = draw(st.lists(I64, min_size=n, max_size=n))
    created = draw(st.one_of(st.none(), st.lists(I64, min_size=n, max_size=n)))
    return kinds, cols, events, created


def arrow_column(kind: int, values: list) -> pa.Array:
    if kind == 6:
        return pa.array(values, pa.int64()).cast(ARROW[6])
    return pa.array(values, ARROW[kind])


@settings(max_examples=400, deadline=None)
@given(tables())
def test_encode_matches_the_reference_bytes_and_decodes_back(case):
    kinds, cols, events, created = case
    n = len(events)
    data, offsets = encode_records(kinds, [arrow_column(k, c) for k, c in zip(kinds, cols)],
                                   np.array(events, np.int64), np.array(created or [], np.int64))
    records = [bytes(data[offsets[i] : offsets[i + 1]]) for i in range(n)]
    for i, rec in enumerate(records):
        row = [c[i] for c in cols]
        assert rec == encode_record(kinds, row, events[i], created[i] if created else None)
        event, back = decode_record(kinds, rec)
        assert event == events[i]
    decoded, event_ts = _codec.decode_records(records + [None], 0, n + 1, kinds, -(2**63))
    assert event_ts.tolist()[:n] == events
    for k, col, got in zip(kinds, cols, decoded):
        want = [None if v is None else (float(np.float32(v)) if k == 1 else v) for v in col] + [None]
        assert got == want


def test_rank_bytes_order_like_event_then_created():
    pairs = [(-(2**63) + 1, 5), (-1, 0), (0, -(2**63)), (0, 0), (0, 1), (1, -5), (2**63 - 1, 2**63 - 1)]
    ranks = [encode_record([0], [1], e, c)[1:17] for e, c in pairs]
    assert ranks == sorted(ranks)


def test_decode_applies_ttl_duplicates_and_missing_rows():
    records = [encode_record([0], [7], 100, None), encode_record([0], [8], 50, None), None]
    cols, ev = _codec.decode_records(records, 0, 3, [0], 60, np.array([0, 1, 2, -1, 0], np.int64))
    assert cols == [[7, None, None, None, 7]]  # record 1 is older than 60: None
    assert ev.tolist() == [100, -(2**63), -(2**63)]
    cols, _ = _codec.decode_records(["x", *records], 1, 2, [0], -(2**63))
    assert cols == [[7, 8]]


@pytest.mark.parametrize(
    "record, message",
    [(b"\x02" + b"\x00" * 17, "record 0 is malformed"), (b"\x01" + b"\x00" * 10, "record 0 is malformed"),
     (encode_record([4], ["abc"], 1, 1)[:-1], "record 0 is malformed")],
)
def test_malformed_records_are_refused(record, message):
    with pytest.raises(ValueError, match=message):
        _codec.decode_records([record], 0, 1, [4], -(2**63))


def _in_a_subprocess(code: str) -> subprocess.CompletedProcess:
    """Run code that overran a buffer before the fix: a crash must fail the test, not end the run."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_string_offsets_that_go_backwards_are_refused_not_overrun():
    done = _in_a_subprocess("""
        import numpy as np, pyarrow as pa
        from mlplat._native.codec import STRING, encode_records
        # passes pyarrow's cheap validation (first and last offset), as arrays from the C data interface do
        bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 4096, 3], np.int32).tobytes()),
                                                     pa.py_buffer(b"abc")])
        try:
            encode_records([STRING], [bad], np.zeros(2, np.int64), np.empty(0, np.int64))
        except ValueError as exc:
            print(exc)
    """)
    assert done.returncode == 0 and "string offsets go backwards" in done.stdout, done


@pytest.mark.parametrize("call", [
    "_codec.buckets(np.frombuffer(b'abc', np.uint8), np.array([0, 1 << 20, 3], np.int64))",
    "_codec.pack_evalsha('s', 'p:', 't', np.frombuffer(b'abc', np.uint8), np.array([0, 1 << 20, 3], np.int64), "
    "np.frombuffer(b'xyz', np.uint8), np.array([0, 1, 3], np.int64), np.zeros(2, np.int64), np.array([0, 1]))",
    "_codec.pack_evalsha('s', 'p:', 't', np.frombuffer(b'abc', np.uint8), np.array([-4096, 1, 3], np.int64), "
    "np.frombuffer(b'xyz', np.uint8), np.array([0, 1, 3], np.int64), np.zeros(2, np.int64), np.array([0, 1]))",
])
def test_key_and_record_offsets_are_checked_whole(call):
    done = _in_a_subprocess(f"""
        import numpy as np
        from mlplat._native import _codec
        try:
            {call}
        except ValueError as exc:
            print(exc)
    """)
    assert done.returncode == 0 and "offsets" in done.stdout, done  # buckets crashed, pack_evalsha sent heap


def test_an_offset_past_the_records_is_refused_however_large():
    for offset in (1, 2, 2**62):  # offset + count wrapped to a negative number and passed the check
        with pytest.raises(ValueError, match="outside the records"):
            _codec.decode_records([None], offset, 2**62, [0], 0)


def test_a_stored_string_that_is_not_utf8_is_a_malformed_record():
    record = bytearray(encode_record([4], ["ab"], 1, 1))
    record[-1] = 0xFF
    with pytest.raises(ValueError, match="record 0 is malformed: string feature 0 is not UTF-8"):
        _codec.decode_records([bytes(record)], 0, 1, [4], -(2**63))


def test_mget_keys_given_as_a_tuple_are_packed_as_given():
    keys = tuple(f"key-{i:02d}-".encode() + b"x" * 30 for i in range(50))
    assert _codec.pack_mget("p:", [(["t"], keys)]) == _codec.pack_mget("p:", [(["t"], list(keys))])


def test_wrong_reply_types_are_refused():
    with pytest.raises(TypeError, match="record 0 is str, not bytes"):
        _codec.decode_records(["oops"], 0, 1, [0], 0)
    with pytest.raises(ValueError, match="outside the records"):
        _codec.decode_records([None], 0, 2, [0], 0)
    with pytest.raises(ValueError, match="unknown kind 9"):
        _codec.decode_records([None], 0, 1, [9], 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), I64), st.one_of(st.none(), st.text(max_size=40))), max_size=20))
def test_entity_keys_from_python_values_and_from_arrow_agree_with_reference(rows):
    ints, strs = [r[0] for r in rows], [r[1] for r in rows]
    want = [entity_key([i, s], ["int", "string"]) for i, s in rows]
    assert _codec.entity_keys([ints, strs], [0, 1]) == want
    data, offsets = entity_key_buffers([pa.array(ints, pa.int64()), pa.array(strs, pa.large_string())],
                                       ["int", "string"])
    got = [bytes(data[offsets[i] : offsets[i + 1]]) for i in range(len(rows))]
    assert got == [w or b"" for w in want]  # a null key gives an empty key in buffers
    assert _codec.buckets(data, offsets).tolist() == [bucket(g) for g in got]
    present = [w for w in want if w is not None]
    assert _codec.redis_keys("p:", "view@3", present) == [redis_key("p:", "view@3", w) for w in present]


def test_entity_key_type_errors_name_the_column_and_row():
    with pytest.raises(TypeError, match="key column 0 row 1: expected an integer, got str"):
        _codec.entity_keys([[1, "2"]], [0])
    with pytest.raises(TypeError, match="key column 1 row 0: expected a string, got int"):
        _codec.entity_keys([[1], [2]], [0, 1])
    with pytest.raises(ValueError, match="does not fit in int64"):
        _codec.entity_keys([[2**64]], [0])
    with pytest.raises(TypeError, match="expected an integer, got bool"):
        _codec.entity_keys([[True]], [0])
    assert _codec.entity_keys([[np.int64(5)]], [0]) == [entity_key([5], ["int"])]


def test_commands_are_valid_resp():
    keys = [entity_key([1], ["int"]), entity_key([2], ["int"])]
    cmd = _codec.pack_mget("p:", [(["a@1", "b@1"], keys)])
    parts = cmd.split(b"\r\n")
    assert parts[0] == b"*5" and parts[2] == b"MGET"
    assert parts[4] == redis_key("p:", "a@1", keys[0]) and parts[10] == redis_key("p:", "b@1", keys[1])
    kd, ko = entity_key_buffers([pa.array([1, 2])], ["int"])
    recs = [encode_record([0], [9], 1, None), encode_record([0], [8], 2, None)]
    rd = np.frombuffer(b"".join(recs), np.uint8)
    ro = np.array([0, len(recs[0]), len(recs[0]) + len(recs[1])], np.int64)
    cmd = _codec.pack_evalsha("abc", "p:", "t@1", kd, ko, rd, ro, np.array([0, 77], np.int64), np.array([1], np.int64))
    assert cmd.startswith(b"*6\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n")
    assert cmd.endswith(b"$" + str(len(recs[1])).encode() + b"\r\n" + recs[1] + b"\r\n$2\r\n77\r\n")
    with pytest.raises(ValueError, match="row index past the keys"):
        _codec.pack_evalsha("abc", "p:", "t@1", kd, ko, rd, ro, np.zeros(2, np.int64), np.array([5], np.int64))
    rb = RecordBuffers(kd, ko, rd, ro, np.zeros(2, np.int64))
    assert len(rb) == 2 and rb.record(1) == recs[1] and rb.key(0) == keys[0]


def test_records_emptied_by_another_thread_during_a_decode_stay_alive_until_it_ends():
    """The parse ran without the GIL on pointers into the caller's list; another thread clearing the list freed
    the records under it (a segfault)."""
    done = _in_a_subprocess(f"""
        import sys, threading
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from reference import encode_record
        from mlplat._native import _codec
        kinds = [0] * 20_000 + [4]
        records = [encode_record(kinds, [i] * 20_000 + ["x" * 300_000], i, None) for i in range(30)]
        sys.setswitchinterval(10.0)  # this thread keeps the GIL until the decode releases it
        go = threading.Event()
        def other():
            go.wait()  # wakes now, but gets the GIL only once the decode releases it
            records.clear()
        t = threading.Thread(target=other)
        t.start()
        go.set()
        columns, events = _codec.decode_records(records, 0, 30, kinds, -(2**63))
        t.join()
        print(len(records), events.tolist() == list(range(30)), columns[0] == list(range(30)),
              columns[-1] == ["x" * 300_000] * 30)
    """)
    assert done.returncode == 0 and done.stdout.split() == ["0", "True", "True", "True"], done


def test_a_key_whose_index_raises_gives_that_error():
    class Broken:
        def __index__(self):
            raise RuntimeError("no index today")

    with pytest.raises(RuntimeError, match="no index today"):  # was SystemError: "returned a result with an
        _codec.entity_keys([[Broken()]], [0])                   # exception set"


def test_a_column_of_arrows_null_type_encodes_as_nulls_for_every_kind():
    """pa.nulls / an all-None list: int and timestamp columns encoded, the others raised ArrowInvalid or
    'not enough values to unpack'."""
    kinds = list(range(7))
    data, offsets = encode_records(kinds, [pa.nulls(2)] * 7, np.array([5, 6], np.int64), np.empty(0, np.int64))
    for i in range(2):
        assert bytes(data[offsets[i] : offsets[i + 1]]) == encode_record(kinds, [None] * 7, 5 + i, None)
    for key_kind in ("int", "string"):
        data, offsets = entity_key_buffers([pa.nulls(2)], [key_kind])
        assert offsets.tolist() == [0, 0, 0]  # a null key gives an empty key


def test_a_negative_row_count_is_refused():
    empty_string_column = (np.zeros(0, np.int64), np.zeros(0, np.uint8), None)
    with pytest.raises(ValueError, match="n must be >= 0"):  # returned 0 offsets for -1 rows
        _codec.entity_keys_buffers([empty_string_column], [1], -1)
