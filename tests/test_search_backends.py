"""A filter matches the same runs on SQLite and PostgreSQL: each case runs on both and compares.

Found by review: ``ilike`` lowered Greek capital sigma and dotted capital I differently on the two
(SQLite used Python's context-sensitive str.lower()), a param compared with a number was a double on
SQLite (not even correctly rounded) and an exact numeric on PostgreSQL, and an ``in`` list of more than
65,535 values raised a StoreError on PostgreSQL only.
"""
from __future__ import annotations

from datetime import timedelta

import pytest

import mlplat as mp


@pytest.fixture
def both(tmp_path, pg_url):
    ps = [mp.Platform(tmp_path / "sqlite", threads=2),
          mp.Platform(tmp_path / "postgresql", database_url=pg_url, threads=2)]
    yield ps
    for p in ps:
        p.close()


def start(ps, experiment: str, **kwargs) -> None:
    for p in ps:
        with p.runs.start(experiment, **kwargs):
            pass


def matches(ps, experiment: str, flt: str, field: str) -> list[str]:
    """The sorted values of ``field`` ("tags.city") of the runs ``flt`` matches, the same on both backends."""
    kind, key = field.split(".", 1)
    found = [sorted(getattr(r, kind)[key] for r in p.runs.search(experiment, filter=flt, max_results=1000))
             for p in ps]
    assert found[0] == found[1], f"{flt}: SQLite {found[0]} != PostgreSQL {found[1]}"
    return found[0]


# ------------------------------------------------------------------ ilike
def test_ilike_lowers_one_character_at_a_time(both):
    for city in ("ΟΔΟΣ", "οδος", "İzmir", "ÄRGER", "Straße"):
        start(both, "c", tags={"city": city})

    def ilike(pattern: str) -> list[str]:
        return matches(both, "c", f"tags.city ilike '{pattern}'", "tags.city")

    assert ilike("οδοσ") == ["ΟΔΟΣ"]  # Σ is σ, wherever it stands (not ς at a word's end)
    assert ilike("οδος") == ["οδος"]
    assert ilike("ΟΔΟΣ") == ["ΟΔΟΣ"]
    assert ilike("οδο_") == ["ΟΔΟΣ", "οδος"]
    assert ilike("izmir") == ["İzmir"]  # İ is i (not i and a combining dot)
    assert ilike("i\u0307zmir") == []
    assert ilike("İZMIR") == ["İzmir"]
    assert ilike("ärger") == ["ÄRGER"]
    assert ilike("STRAßE") == ["Straße"]
    assert matches(both, "c", "tags.city like 'οδοσ'", "tags.city") == []


# ------------------------------------------------------------------ params compared with numbers
NUMBER_TEXTS = ["12345678901234567890", "0.1", "0.10000000000000001", "1e400", "-1e400", "1e-400", "1", "1E2",
                " 5", "5 ", "21257.20696277559", "9007199254740993", "abc", "0x10", "+1", ".5", "5.", "1e99999",
                "1" * 600]
NUMBER_CASES = [  # filter, the params.x it matches
    # compared as 64-bit floats: texts that round to the same double are equal
    ("params.x = 12345678901234567891", ["12345678901234567890"]),
    ("params.x = 0.1", ["0.1", "0.10000000000000001"]),
    ("params.x = 9007199254740992", ["9007199254740993"]),
    # correctly rounded (SQLite's own text-to-real conversion is not)
    ("params.x = 21257.20696277559", ["21257.20696277559"]),
    # past a double's range: +-infinity, and 0 below its least value
    ("params.x = 1e400", ["1e400"]),
    ("params.x = inf", ["1e400"]),
    ("params.x < inf", [" 5", "-1e400", "0.1", "0.10000000000000001", "1", "12345678901234567890", "1E2",
                        "1e-400", "21257.20696277559", "5 ", "9007199254740993"]),
    ("params.x > -inf", [" 5", "0.1", "0.10000000000000001", "1", "12345678901234567890", "1E2", "1e-400",
                         "1e400", "21257.20696277559", "5 ", "9007199254740993"]),
    ("params.x = -inf", ["-1e400"]),
    ("params.x = 0", ["1e-400"]),
    ("params.x in (0, 100, 'abc')", ["1E2", "1e-400", "abc"]),
    ("params.x not in (1, 0.1, 5, inf, -inf, 0)", ["12345678901234567890", "1E2", "21257.20696277559",
                                                  "9007199254740993"]),
    ("params.x = 5", [" 5", "5 "]),
]


def test_param_compared_with_a_number_is_a_float_on_both(both):
    for text in NUMBER_TEXTS:
        start(both, "n", params={"x": text})
    wrong = []
    for flt, expected in NUMBER_CASES:
        try:
            found = matches(both, "n", flt, "params.x")
        except AssertionError as exc:  # SQLite and PostgreSQL differ
            found = str(exc)
        if found != expected:
            wrong.append(f"{flt}: {found}, expected {expected}")
    assert wrong == []

    # not JSON's number form, an exponent of 5 digits, longer than 512 characters: not numbers, on both
    found = matches(both, "n", "params.x != 0", "params.x")
    assert not {"abc", "0x10", "+1", ".5", "5.", "1e99999", "1" * 600} & set(found)
    assert matches(both, "n", "params.x = '1e99999'", "params.x") == ["1e99999"]


# ------------------------------------------------------------------ long in lists
def test_in_list_longer_than_postgresql_parameters(both):
    """70,000 values: one bound parameter each ran past PostgreSQL's 65,535 per statement."""
    start(both, "e", params={"x": "5"}, tags={"t": "v5"})
    start(both, "e", params={"x": "1e5"}, tags={"t": "w"})
    n = 70_000
    tags = ", ".join(f"'v{i}'" for i in range(n))
    nums = ", ".join(str(i) for i in range(n))
    assert matches(both, "e", f"tags.t in ({tags})", "tags.t") == ["v5"]
    assert matches(both, "e", f"tags.t not in ({tags})", "tags.t") == ["w"]
    assert matches(both, "e", f"params.x in ({nums})", "params.x") == ["5"]
    assert matches(both, "e", f"params.x not in ({nums}, 'w')", "params.x") == ["1e5"]
    assert matches(both, "e", f"params.x in ({nums}, 1e5, 'abc')", "params.x") == ["1e5", "5"]
    # a value longer than the column's type is not cut short to it (status is VARCHAR(16) on PostgreSQL)
    assert matches(both, "e", "attributes.status in ('finishedXXXXXXXXXX')", "tags.t") == []
    for p in both:
        run = p.runs.search("e", filter="tags.t = 'w'")[0]
        listed = ", ".join([f"'{i:032x}'" for i in range(n)] + [f"'{run.id}'"])
        assert [r.id for r in p.runs.search("e", filter=f"attributes.run_id in ({listed})")] == [run.id]
        started = p.runs.get(run.id).start_time
        # the run started last: these times are after both runs
        times = ", ".join(f"'{(started + timedelta(microseconds=i + 1)).isoformat()}'" for i in range(n))
        flt = f"attributes.start_time in ({times}, '{started.isoformat()}')"
        assert [r.id for r in p.runs.search("e", filter=flt)] == [run.id]
        assert len(p.runs.search("e", filter=f"attributes.start_time not in ({times})")) == 2


@pytest.mark.parametrize("flt", ["attributes.start_time like 1", "attributes.END_TIME ilike '2026-01-01'",
                                 "attributes.start_time like '2026%'"])
def test_like_on_a_time_is_refused_on_both(both, flt):
    """It was a raw 'function like_escape(timestamp with time zone, ...) does not exist' on PostgreSQL and
    silently no runs on SQLite."""
    start(both, "t")
    for p in both:
        with pytest.raises(mp.DataError, match=r"is a time; '(i)?like' compares strings"):
            p.runs.search("t", filter=flt)
