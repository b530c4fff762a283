"""Search pages resume after the last run of the page before (keyset paging), on SQLite and PostgreSQL.

An offset token repeated a run when one was started, or skipped one when one was deleted, before the
cursor between two page requests; a token now carries the last run's sort values and continues after them.
"""
from __future__ import annotations

import base64
import json
import math
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

import mlplat as mp
from mlplat.db.models import Run

UP = math.nextafter(0.1, 1.0)
UP2 = math.nextafter(UP, 1.0)


@pytest.fixture
def p(platform):
    return platform


def ids(page) -> list[str]:
    return [r.id for r in page]


def all_pages(p, experiments="pages", *, size: int, **kwargs) -> list[list[str]]:
    pages, token = [], None
    while True:
        page = p.runs.search(experiments, max_results=size, page_token=token, **kwargs)
        pages.append(ids(page))
        token = page.next_page_token
        if token is None:
            return pages
        assert len(pages) < 1000


def execute(p, statement) -> None:
    with p.runs._db.connect(write=True) as conn:
        conn.execute(statement)


def delete_run(p, run_id: str) -> None:
    execute(p, sa.delete(Run).where(Run.id == run_id))


# ------------------------------------------------------------ pages = one shot
ROWS = [  # name, param lr, tag team, latest metric auc (None: not logged; NaN is stored as NULL), status
    ("a", "0.1", "risk", 0.5, "finished"),
    ("a", "0.01", None, 0.5, "finished"),
    ("b", None, "ml", float("nan"), "failed"),
    ("b", "0.1", "ml", None, "finished"),
    ("c", "0.001", "risk", 0.1, "finished"),
    ("c", "0.001", None, UP, "failed"),
    ("d", "0.01", "ml", UP2, "finished"),
    ("e", None, None, float("inf"), "finished"),
    ("e", "0.1", "risk", float("-inf"), "killed"),
    ("f", "0.001", "ml", -0.0, "finished"),
    ("f", "0.01", None, 0.0, "finished"),
    ("g", "0.1", "ml", None, "finished"),
    ("h", "1e-05", "risk", 1e300, "finished"),
    ("", None, None, 0.5, "finished"),
    ("a", "0.1", "risk", 0.5, "finished"),
]
TIE = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.fixture
def many(p):
    """Runs with ties on every field (name, param, metric, start time), missing and NaN metrics, missing
    params and tags, infinities, -0.0, metrics one bit apart, and no end time on some."""
    out = []
    for name, lr, team, auc, status in ROWS:
        params = {} if lr is None else {"lr": lr}
        tags = {} if team is None else {"team": team}
        run = p.runs.start("pages", name=name, params=params, tags=tags)
        if auc is not None:
            run.log_metric("auc", auc)
        run.end(status)
        out.append(run.id)
    for i, run_id in enumerate(out):  # start-time ties: five runs at one instant, four at another
        if i < 5 or 7 <= i < 11:
            execute(p, sa.update(Run).where(Run.id == run_id).values(
                start_time=TIE if i < 5 else TIE + timedelta(microseconds=1)))
        if i % 4 == 1:
            execute(p, sa.update(Run).where(Run.id == run_id).values(end_time=None))
    for name in ("x", "a"):
        with p.runs.start("pages2", name=name, params={"lr": "0.1"}) as run:
            run.log_metric("auc", 0.5)
    return out


ORDERS = [
    ["metrics.auc desc"],
    ["metrics.auc"],
    ['metrics."auc" desc', "attributes.name"],
    ["params.lr"],
    ["params.lr desc", "metrics.auc"],
    ["tags.team", "attributes.name desc"],
    ["attributes.name"],
    ["attributes.name desc"],
    ["attributes.start_time"],
    [],
    ["attributes.end_time desc"],
    ["attributes.end_time"],
    ["attributes.status", "metrics.auc desc", "params.lr"],
    ["attributes.user", "attributes.experiment desc", "tags.team desc"],
    ["attributes.run_id desc"],
    ["attributes.name", "attributes.run_name desc", "attributes.id", "metrics.auc"],  # repeats, then past the id
    ["metrics.missing", "params.missing desc", "attributes.name"],  # every value NULL
]


@pytest.mark.parametrize("experiments", ["pages", None])
def test_pages_put_together_are_the_one_shot_order(p, many, experiments):
    # every order in one test: the runs are made once (a setup per order took most of a minute)
    for order in ORDERS:
        whole = ids(p.runs.search(experiments, order_by=order, max_results=1000))
        assert len(whole) == len(set(whole)) == (15 if experiments else 17), order
        for size in (1, 2, 4, 7):
            pages = all_pages(p, experiments, size=size, order_by=order)
            assert [i for page in pages for i in page] == whole, (order, size)
            assert all(len(page) == size for page in pages[:-1]) and 1 <= len(pages[-1]) <= size, (order, size)


def test_the_order_is_the_documented_one(p, many):
    """Metrics by value, NULLs (missing or NaN) last in both directions, then newest first, then run id."""
    infos = {r.id: r for r in p.runs.search("pages", max_results=1000)}

    def expected(desc: bool) -> list[str]:
        order = sorted(infos, key=lambda i: i)  # the run id, ascending
        order.sort(key=lambda i: infos[i].start_time, reverse=True)
        with_auc = [i for i in order if not math.isnan(infos[i].metrics.get("auc", math.nan))]
        with_auc.sort(key=lambda i: infos[i].metrics["auc"], reverse=desc)
        return with_auc + [i for i in order if i not in with_auc]

    for desc in (True, False):
        pages = all_pages(p, size=1, order_by=[f"metrics.auc {'desc' if desc else 'asc'}"])
        assert [i for page in pages for i in page] == expected(desc)
    tied = [i for i in infos if infos[i].start_time == TIE]
    assert len(tied) == 5
    default = [i for page in all_pages(p, size=1) for i in page]
    assert [i for i in default if i in tied] == sorted(tied)  # ties on start time: by run id


def test_metrics_one_bit_apart_page_one_by_one(p):
    values = [0.1, UP, UP2, math.nextafter(UP2, 1.0), 1 / 3, math.nextafter(1 / 3, 0.0), 5e-324, -5e-324,
              1.7976931348623157e308]
    by_value = {}
    for v in values:
        with p.runs.start("bits", name=repr(v)) as run:
            run.log_metric("auc", v)
        by_value[v] = run.id
    for desc in (False, True):
        pages = all_pages(p, "bits", size=1, order_by=[f"metrics.auc {'desc' if desc else 'asc'}"])
        assert [page[0] for page in pages] == [by_value[v] for v in sorted(values, reverse=desc)]


# ------------------------------------------------- changes between two pages
@pytest.fixture
def eight(p):
    """r0..r7 with auc 0.0 .. 0.7."""
    out = []
    for i in range(8):
        with p.runs.start("live", name=f"r{i}") as run:
            run.log_metric("auc", i / 10)
        out.append(run.id)
    return out


def rest(p, token, order, size=3) -> list[str]:
    seen = []
    while token is not None:
        page = p.runs.search("live", order_by=order, max_results=size, page_token=token)
        seen += ids(page)
        token = page.next_page_token
    return seen


@pytest.mark.parametrize("order", [["attributes.name"], ["metrics.auc"]])
def test_a_run_started_before_the_cursor_repeats_no_run(p, eight, order):
    first = p.runs.search("live", order_by=order, max_results=3)
    assert ids(first) == eight[:3]
    with p.runs.start("live", name="r0a") as run:  # sorts between r0 and r1: before the cursor (r2)
        run.log_metric("auc", 0.05)
    later = rest(p, first.next_page_token, order)
    assert later == eight[3:]  # with an offset, r2 came again
    assert run.id not in later  # it sorts before the cursor


@pytest.mark.parametrize("order", [["attributes.name"], ["metrics.auc"]])
def test_a_run_deleted_before_the_cursor_skips_no_run(p, eight, order):
    first = p.runs.search("live", order_by=order, max_results=3)
    delete_run(p, eight[0])
    assert rest(p, first.next_page_token, order) == eight[3:]  # with an offset, r3 was skipped


def test_a_run_started_after_the_cursor_is_listed(p, eight):
    first = p.runs.search("live", order_by=["metrics.auc"], max_results=3)
    with p.runs.start("live", name="late") as run:
        run.log_metric("auc", 0.45)
    assert rest(p, first.next_page_token, ["metrics.auc"]) == eight[3:5] + [run.id] + eight[5:]


def test_newest_first_is_not_shifted_by_new_runs(p, eight):
    first = p.runs.search("live", max_results=3)
    assert ids(first) == eight[::-1][:3]
    for _ in range(2):
        p.runs.start("live", name="new").end()
    assert rest(p, first.next_page_token, None) == eight[::-1][3:]  # new runs sort before the cursor


def test_a_run_whose_metric_moves_shifts_no_other_run(p, eight):
    order = ["metrics.auc desc"]
    first = p.runs.search("live", order_by=order, max_results=2)
    assert ids(first) == [eight[7], eight[6]]
    run = p.runs.resume(eight[7])  # r7 drops from the top to the bottom
    run.log_metric("auc", -1.0, step=5)
    run.flush()
    later = rest(p, first.next_page_token, order, size=2)
    assert later == eight[5::-1] + [eight[7]]  # with an offset, r5 was skipped; r7 changed, so comes again


def test_a_renamed_run_shifts_no_other_run(p, eight):
    order = ["attributes.name"]
    first = p.runs.search("live", order_by=order, max_results=2)
    execute(p, sa.update(Run).where(Run.id == eight[0]).values(name="r9"))
    assert rest(p, first.next_page_token, order, size=2) == eight[2:] + [eight[0]]


def test_the_cursor_run_itself_deleted_or_changed(p, eight):
    first = p.runs.search("live", order_by=["metrics.auc"], max_results=3)
    delete_run(p, eight[2])  # the run the token points after is gone: its values still place the cursor
    assert rest(p, first.next_page_token, ["metrics.auc"]) == eight[3:]


# ----------------------------------------------------------- token checks
def test_a_token_continues_only_its_own_search(p, eight):
    token = p.runs.search("live", order_by=["attributes.name"], filter="metrics.auc >= 0.1",
                          max_results=2).next_page_token
    assert token
    for kwargs in ({"order_by": ["attributes.name desc"], "filter": "metrics.auc >= 0.1"},
                   {"order_by": ["metrics.auc"], "filter": "metrics.auc >= 0.1"},
                   {"order_by": ["attributes.name"], "filter": "metrics.auc >= 0.2"},
                   {"order_by": ["attributes.name"]},
                   {"order_by": ["attributes.name", "metrics.auc"], "filter": "metrics.auc >= 0.1"}):
        with pytest.raises(mp.DataError, match="page_token belongs to another search .*; start from the first "
                                               r"page \(page_token=None; on the command line, leave out "
                                               r"--page-token\)"):
            p.runs.search("live", page_token=token, **kwargs)
    with pytest.raises(mp.DataError, match="belongs to another search"):
        p.runs.search(["live", "other"], order_by=["attributes.name"], filter="metrics.auc >= 0.1",
                      page_token=token)
    with pytest.raises(mp.DataError, match="belongs to another search"):
        p.runs.search(None, order_by=["attributes.name"], filter="metrics.auc >= 0.1", page_token=token)
    # the same search written another way, and another page size, continue it
    same = p.runs.search(["live", "live"], order_by="attributes.name asc", filter="metrics.auc  >=  0.1",
                         max_results=3, page_token=token)
    assert ids(same) == eight[3:6]


@pytest.mark.parametrize("first, again", [
    ("metrics.auc >= 0.1", "metric.auc >= 1e-1"),
    ("metrics.auc >= 0", "metrics.\"auc\" >= 0.0"),
    ("attributes.status = 'finished' and metrics.auc > 0", "attributes.STATUS = 'finished' and metrics.auc > 0.0"),
    ("attributes.id != 'x'", "attributes.run_id != 'x'"),
    ("attributes.start_time > 0", "attributes.start_time > '1970-01-01T00:00:00+00:00'"),
    ("params.n is null or params.n in (1, 2)", "params.n is null or params.n in (1.0, 2e0)"),
    ("metrics.auc >= 0", "metrics.auc >= -0.0"),
])
def test_a_token_continues_the_same_filter_written_another_way(p, eight, first, again):
    """The filter was bound by its parsed form's repr: 1 and 1.0, STATUS and status, id and run_id differed."""
    order = ["attributes.name"]
    token = p.runs.search("live", filter=first, order_by=order, max_results=2).next_page_token
    assert token is not None
    whole = ids(p.runs.search("live", filter=first, order_by=order, max_results=100))
    assert ids(p.runs.search("live", filter=again, order_by=order, max_results=100, page_token=token)) == whole[2:]
    with pytest.raises(mp.DataError, match="belongs to another search"):
        p.runs.search("live", filter=f"{first} and metrics.auc < 0.6", order_by=order, page_token=token)


def test_a_like_pattern_is_text_for_its_page_token(p, eight):
    """'tags.t like 5' and 'tags.t like 5.0' match other runs ('5', '5.0'), yet the first one's token continued
    the second (its 5 was bound as the float 5.0)."""
    token = p.runs.search("live", filter="tags.t like 1 or attributes.name like 'r%'", order_by=["attributes.name"],
                          max_results=2).next_page_token
    with pytest.raises(mp.DataError, match="belongs to another search"):
        p.runs.search("live", filter="tags.t like 1.0 or attributes.name like 'r%'", order_by=["attributes.name"],
                      page_token=token)


def forged(body) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def test_changed_or_foreign_tokens_are_refused(p, eight):
    token = p.runs.search("live", order_by=["metrics.auc"], max_results=2).next_page_token
    body = json.loads(base64.urlsafe_b64decode(token))
    changed = list(body)
    changed[2] = [["f", (0.7).hex()], *body[2][1:]]  # seek elsewhere without fixing the check
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[10:]
    bad = ["garbage", "", "é", token[:-4], token + "AAAA", flipped, forged(changed), forged(body[:3]),
           base64.urlsafe_b64encode(b"o:2").decode(), forged(["k1", body[1], body[2], "0" * 16]),
           forged({"a": 1}), forged([[[[[]]]]] * 3), token.replace("=", "") + "$"]
    for text in bad:
        with pytest.raises(mp.DataError, match=r"is not one mlplat gave \(it is changed, cut short, or from an older "
                                               r"mlplat\): start from the first page \(page_token=None;"):
            p.runs.search("live", order_by=["metrics.auc"], page_token=text)
    with pytest.raises(mp.DataError, match="page_token 'garbage' is not one mlplat gave"):
        p.runs.search("live", page_token="garbage")
    with pytest.raises(mp.DataError, match="page_token must be the next_page_token of a page"):
        p.runs.search("live", order_by=["metrics.auc"], page_token=b"o:2")


def test_a_token_whose_values_do_not_fit_its_search_is_refused(p, eight):
    """Even with a valid check (someone wrote one by hand): the values must have the order's types."""
    from mlplat.runs import tracking

    token = p.runs.search("live", order_by=["metrics.auc"], max_results=2).next_page_token
    _, query, values, _ = json.loads(base64.urlsafe_b64decode(token))
    for changed in (values[:-1], values + [["s", "x"]], [["s", "0.1"], *values[1:]],
                    [values[0], values[1], ["n"]],  # the run id is never NULL
                    [values[0], ["t", "2024-01-01T00:00:00"], values[2]],  # a time without its offset
                    [["f", "0x1p+99999"], *values[1:]], [["f", "nope"], *values[1:]], [["f", 1.5], *values[1:]]):
        body = ["k1", query, changed]
        text = forged([*body, tracking._digest(body)])
        with pytest.raises(mp.DataError, match="is not one mlplat gave"):
            p.runs.search("live", order_by=["metrics.auc"], page_token=text)


def test_a_token_is_reusable_and_pages_use_no_offset(p, eight):
    statements = []
    engine = p.runs._db.engine
    listen = lambda conn, cursor, statement, parameters, *args: statements.append((statement, parameters))
    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        pages = all_pages(p, "live", size=3, order_by=["metrics.auc desc"])
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)
    assert [i for page in pages for i in page] == eight[::-1]
    searches = [(s, args) for s, args in statements if "ORDER BY" in s.upper()]
    assert len(searches) == len(pages) == 3
    for statement, args in searches:  # SQLite's dialect writes "LIMIT ? OFFSET ?" always: with 0
        assert "OFFSET" not in statement.upper() or (statement.rstrip().endswith("OFFSET ?") and args[-1] == 0)
    token = p.runs.search("live", order_by=["metrics.auc desc"], max_results=3).next_page_token
    again = [ids(p.runs.search("live", order_by=["metrics.auc desc"], max_results=3, page_token=token))
             for _ in range(2)]
    assert again[0] == again[1] == eight[4:1:-1]
