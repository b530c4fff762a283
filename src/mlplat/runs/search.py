"""The run filter language, parsed into parameterized SQL.

Grammar (keywords in any case)::

    filter     := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" or ")" | comparison
    comparison := field op value
                | field ["not"] "in" "(" value ("," value)* ")"
                | field "is" ["not"] "null"
    field      := ("metrics" | "params" | "tags" | "attributes") "." name
    op         := "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">=" | "like" | "ilike"
    value      := number | 'string' | "string"

``name`` is a run of letters, digits and ``_ - . / :``, or a quoted string
(``metrics."val auc"``). Metrics compare the latest value as numbers; params
and tags compare as strings; attributes are ``status``, ``name``, ``run_id``,
``user``, ``start_time`` and ``end_time`` (milliseconds since the epoch or an
ISO date string), ``experiment``. A param or tag compared with an unquoted number
(``params.epochs > 9``) compares as a number: only runs whose value is a number's
text (``10``, ``0.001``, ``1e-05``; JSON's number form, as ``str()`` writes ints and
floats, with an exponent of at most 4 digits, at most 512 characters) match, so ``'10'``
is greater than ``9`` and ``'10'`` equals ``10.0``; both sides are 64-bit floats, read as
Python's ``float()`` reads them (correctly rounded, ``'1e400'`` is infinity and ``'1e-400'``
is 0), on SQLite as on PostgreSQL. A quoted value compares as text. An ``in`` list of any
length is one bound parameter. Values always travel as bound parameters:
nothing from a filter string is ever pasted into SQL. ``like`` is case-sensitive
and ``ilike`` folds every letter's case, on SQLite as on PostgreSQL; in their
patterns a backslash makes the next character literal (``a\\_b`` matches
only ``a_b``).

Usage::

    >>> parse_filter("metrics.val_auc > 0.9 and (params.lr = '0.001' or tags.team in ('risk', 'ml'))")
    And(Cmp('metrics', 'val_auc', '>', 0.9), Or(Cmp('params', 'lr', '=', '0.001'), Cmp('tags', 'team', 'in', ('risk', 'ml'))))
"""
from __future__ import annotations

import decimal
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Union

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement

from .._checks import storable
from .._time import as_utc
from ..db.engine import NUMBER_TEXT
from ..db.models import SHORT_VALUE, Experiment, LatestMetric, Run, RunParam, RunTag
from ..errors import DataError

__all__ = ["parse_filter", "canonical", "to_sql", "parse_order", "SortKey", "sort_keys", "order_terms", "after",
           "page_query"]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<field>(?:metrics|metric|params|param|tags|tag|attributes|attribute|attr|run)
                  \.[A-Za-z0-9_][A-Za-z0-9_\-./:]*)
      | (?P<num>[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|inf|infinity)(?![\w.]))
      | (?P<str>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
      | (?P<op>==|!=|<>|<=|>=|=|<|>|\(|\)|,|\.)
      | (?P<word>[A-Za-z_][A-Za-z0-9_\-/:]*)
    )""",
    re.X | re.I,
)
_PREFIXES = {"metrics": "metrics", "metric": "metrics", "params": "params", "param": "params", "tags": "tags",
             "tag": "tags", "attributes": "attributes", "attribute": "attributes", "attr": "attributes",
             "run": "attributes"}
_ATTRIBUTES = {"status", "name", "run_name", "run_id", "id", "user", "start_time", "end_time", "experiment"}
_OPS = {"=", "==", "!=", "<>", "<", "<=", ">", ">=", "like", "ilike"}
#: in a like/ilike pattern, a backslash makes the next character literal (``\%``, ``\_``, ``\\``)
LIKE_ESCAPE = "\\"
#: the most comparisons one filter may hold, and the deepest it may nest parentheses and ``not``: each
#: comparison is a subquery, and a longer or deeper filter overflowed Python's stack (RecursionError)
MAX_FILTER_TERMS = 200
MAX_FILTER_DEPTH = 50


@dataclass(frozen=True)
class Cmp:
    kind: str
    name: str
    op: str
    value: Any

    def __repr__(self) -> str:
        return f"Cmp({self.kind!r}, {self.name!r}, {self.op!r}, {self.value!r})"


@dataclass(frozen=True)
class And:
    left: Node
    right: Node

    def __repr__(self) -> str:
        return f"And({self.left!r}, {self.right!r})"


@dataclass(frozen=True)
class Or:
    left: Node
    right: Node

    def __repr__(self) -> str:
        return f"Or({self.left!r}, {self.right!r})"


@dataclass(frozen=True)
class Not:
    inner: Node

    def __repr__(self) -> str:
        return f"Not({self.inner!r})"


Node = Union[Cmp, And, Or, Not]


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise DataError(f"filter: cannot read {text[pos:pos + 20]!r} at position {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


def _unquote(token: str) -> str:
    q = token[0]
    body = token[1:-1].replace(q + q, q)
    return re.sub(r"\\(.)", r"\1", body)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.terms = self.depth = 0

    def peek(self, offset: int = 0) -> tuple[str, str, int] | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def word(self, *options: str) -> bool:
        t = self.peek()
        if t and t[0] == "word" and t[1].lower() in options:
            self.i += 1
            return True
        return False

    def sym(self, s: str) -> bool:
        t = self.peek()
        if t and t[0] == "op" and t[1] == s:
            self.i += 1
            return True
        return False

    def fail(self, expected: str) -> DataError:
        t = self.peek()
        where = f"{t[1]!r} at position {t[2]}" if t else "the end of the filter"
        return DataError(f"filter: expected {expected} but found {where} in {self.text!r}")

    def parse(self) -> Node:
        if not self.toks:
            raise DataError("filter is empty")
        node = self.or_()
        if self.peek() is not None:
            raise self.fail("'and', 'or' or the end")
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.word("or"):
            node = Or(node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.word("and"):
            node = And(node, self.not_())
        return node

    def not_(self) -> Node:
        if self.peek() and self.peek()[1].lower() in ("not", "("):
            self.depth += 1
            if self.depth > MAX_FILTER_DEPTH:
                raise self.too_long(f"nests parentheses and 'not' more than {MAX_FILTER_DEPTH} deep")
        if self.word("not"):
            node: Node = Not(self.not_())
        elif self.sym("("):
            node = self.or_()
            if not self.sym(")"):
                raise self.fail("')'")
        else:
            self.terms += 1
            if self.terms > MAX_FILTER_TERMS:
                raise self.too_long(f"holds more than {MAX_FILTER_TERMS} comparisons")
            return self.comparison()
        self.depth -= 1
        return node

    def too_long(self, what: str) -> DataError:
        return DataError(f"filter: {what}; a filter may hold at most {MAX_FILTER_TERMS} comparisons and nest "
                         f"parentheses and 'not' at most {MAX_FILTER_DEPTH} deep: compare one field with many "
                         "values with 'in (...)', or split the search")

    def field(self) -> tuple[str, str]:
        t = self.peek()
        if t and t[0] == "field":  # an unquoted name, read whole: metrics.layer.0 is not metrics.layer then .0
            self.i += 1
            prefix, name = t[1].split(".", 1)
            return self._named(_PREFIXES[prefix.lower()], name)
        if not t or t[0] != "word" or t[1].lower() not in _PREFIXES:
            raise self.fail("a field such as metrics.x, params.x, tags.x or attributes.x")
        self.i += 1
        kind = _PREFIXES[t[1].lower()]
        if not self.sym("."):
            raise self.fail(f"'.' after {t[1]!r}")
        t = self.peek()
        if t and t[0] == "str":
            self.i += 1
            name = _unquote(t[1])
            storable(name, f"filter: the name {kind}.{name!r}")  # a raw UnicodeEncodeError; NUL matched on SQLite
            return kind, name
        parts = []
        while t and t[0] in ("word", "num") and (not parts or self.toks[self.i - 1][1] == "."):
            parts.append(t[1])
            self.i += 1
            if self.sym("."):
                parts.append(".")
                t = self.peek()
                continue
            break
        return self._named(kind, "".join(parts))

    def _named(self, kind: str, name: str) -> tuple[str, str]:
        if not name or name.endswith("."):
            raise self.fail(f"a name after {kind}.")
        storable(name, f"filter: the name {kind}.{name!r}")
        if kind == "attributes" and name.lower() not in _ATTRIBUTES:
            raise DataError(f"filter: unknown attribute {name!r}; use one of {', '.join(sorted(_ATTRIBUTES))}")
        return kind, name

    def value(self) -> Any:
        t = self.peek()
        if t is None:
            raise self.fail("a value")
        if t[0] == "num":
            self.i += 1
            return float(t[1]) if any(c in t[1].lower() for c in ".ei") else int(t[1])
        if t[0] == "str":
            self.i += 1
            return _unquote(t[1])
        raise self.fail("a number or a quoted string")

    def comparison(self) -> Node:
        kind, name = self.field()
        if self.word("is"):
            negate = self.word("not")
            if not self.word("null"):
                raise self.fail("'null'")
            return Cmp(kind, name, "is not null" if negate else "is null", None)
        negate = self.word("not")
        if self.word("in"):
            if not self.sym("("):
                raise self.fail("'(' after 'in'")
            values = [self.value()]
            while self.sym(","):
                values.append(self.value())
            if not self.sym(")"):
                raise self.fail("')' closing the 'in' list")
            return Cmp(kind, name, "not in" if negate else "in", tuple(values))
        if negate:
            raise self.fail("'in' after 'not'")
        t = self.peek()
        op = t[1].lower() if t and t[0] in ("op", "word") else ""
        if op not in _OPS:
            raise self.fail("a comparison (=, !=, <, <=, >, >=, like, ilike, in)")
        self.i += 1
        op = {"==": "=", "<>": "!="}.get(op, op)
        return Cmp(kind, name, op, self.value())


def parse_filter(text: str) -> Node:
    """Parse a filter string; a malformed one is a DataError saying where."""
    return _Parser(text).parse()


# ------------------------------------------------------------------ to SQL
def _compare(column, op: str, value: Any):
    if op == "is null":
        return column.is_(None)
    if op == "is not null":
        return column.is_not(None)
    if op in ("in", "not in"):
        clause = _InValues(column, list(value))
        return sa.not_(clause) if op == "not in" else clause
    if op == "like":  # case-sensitive on both backends (see db/engine.py for SQLite)
        return column.like(value, escape=LIKE_ESCAPE)
    if op == "ilike":  # lower() on both sides, Unicode-aware on both backends
        return column.ilike(value, escape=LIKE_ESCAPE)
    return {"=": column.__eq__, "!=": column.__ne__, "<": column.__lt__, "<=": column.__le__,
            ">": column.__gt__, ">=": column.__ge__}[op](value)


def _time_value(value: Any) -> datetime:
    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value / 1000, tz=timezone.utc)
        return as_utc(datetime.fromisoformat(str(value)))
    except (ValueError, OverflowError, OSError):
        raise DataError(f"filter: {value!r} is not a time between the years 1 and 9999 (use milliseconds since "
                        "the epoch or an ISO date)") from None


def _metric_value(value: Any) -> float:
    """A metric comparison value as the float the column holds (an int beyond int64 must not reach SQL)."""
    try:
        return float(value)
    except OverflowError:
        raise DataError(f"filter: {value} is too large to compare with a metric (a float); use inf") from None


_TIMES = ("start_time", "end_time")


def _attribute_name(name: str) -> str:
    """An attribute by its one name: ``ID`` is ``run_id``, ``run_name`` is ``name``."""
    return {"run_name": "name", "id": "run_id"}.get(name.lower(), name.lower())


def canonical(node: Node) -> Any:
    """A parsed filter as plain JSON that is the same for the same search written another way: attributes by
    their one name, numbers as the floats they compare as, times as the instants they name. (A page token is
    bound to it: ``metrics.a > 1`` continues the pages of ``metrics.a > 1.0``.)"""
    if isinstance(node, (And, Or)):
        return [type(node).__name__, canonical(node.left), canonical(node.right)]
    if isinstance(node, Not):
        return ["Not", canonical(node.inner)]
    name, value = node.name, node.value
    if node.kind == "attributes":
        name = _attribute_name(name)
        convert = (lambda v: _time_value(v).isoformat()) if name in _TIMES else str
    elif node.op in ("like", "ilike"):  # a pattern is text: 5 is '5', not 5.0
        convert = str
    else:
        def convert(v: Any) -> Any:
            if isinstance(v, str):
                return ["s", v]
            try:
                return ["n", float(v) + 0.0]  # -0.0 is 0.0
            except OverflowError:  # an int past the floats (metrics refuse it; a param compares it as inf)
                return ["n", str(v)]
    if value is not None:
        value = list(_each(convert, value)) if isinstance(value, tuple) else convert(value)
    return [node.kind, name, node.op, value]


def _attribute(name: str):
    return {"status": Run.status, "name": Run.name, "run_id": Run.id, "user": Run.user, "start_time": Run.start_time,
            "end_time": Run.end_time, "experiment": Experiment.name}[_attribute_name(name)]


def _check_value(node: Cmp) -> None:
    values = node.value if isinstance(node.value, tuple) else (node.value,)
    if node.op.endswith("null"):
        return
    for v in values:  # text no database holds (NUL; a lone surrogate, not UTF-8) matches nothing and fails a query
        if isinstance(v, str):
            storable(v, f"filter: the value {v!r} compared with {node.kind}.{node.name}")
    if node.op in ("like", "ilike") and isinstance(node.value, str) and _ends_with_escape(node.value):
        raise DataError(f"filter: the {node.op} pattern {node.value!r} ends with the escape character, a "
                        "backslash that escapes nothing: a literal backslash is two backslashes in the pattern")
    if node.kind == "metrics" and node.op in ("like", "ilike"):
        raise DataError(f"filter: metrics.{node.name} is a number; 'like' compares strings")
    if node.kind == "attributes" and node.name.lower() in _TIMES and node.op in ("like", "ilike"):
        raise DataError(f"filter: attributes.{node.name} is a time; '{node.op}' compares strings (use <, >= "
                        "with milliseconds since the epoch or an ISO date)")
    if node.kind == "metrics" and not all(isinstance(v, (int, float)) for v in values):
        raise DataError(f"filter: metrics.{node.name} compares with numbers, got {node.value!r}")


def _ends_with_escape(pattern: str) -> bool:
    """Whether a LIKE pattern ends with an escape character that escapes nothing."""
    trailing = len(pattern) - len(pattern.rstrip(LIKE_ESCAPE))
    return trailing % 2 == 1


def to_sql(node: Node):
    """A SQLAlchemy boolean expression over ``runs`` (joined to ``experiments``) with bound parameters."""
    if isinstance(node, And):
        return sa.and_(to_sql(node.left), to_sql(node.right))
    if isinstance(node, Or):
        return sa.or_(to_sql(node.left), to_sql(node.right))
    if isinstance(node, Not):
        return sa.not_(to_sql(node.inner))
    _check_value(node)
    if node.kind == "attributes":
        if not node.op.endswith("null"):  # times compare as times, every other attribute as a string
            convert = _time_value if node.name.lower() in _TIMES else str
            node = Cmp(node.kind, node.name, node.op, _each(convert, node.value))
        return _compare(_attribute(node.name), node.op, node.value)
    table, value_col = {"metrics": (LatestMetric, LatestMetric.value), "params": (RunParam, RunParam.value),
                        "tags": (RunTag, RunTag.value)}[node.kind]
    # Each term becomes "run id in (a materialized CTE of the runs whose key matches)": the CTE is read
    # once from a covering index and hash-joined. A correlated EXISTS (or an inlined IN, when the row
    # estimate is low) is probed once per run of the experiment instead: 2-3x slower on 10,000 runs.
    if node.op in ("is null", "is not null"):  # whether the run has the key (a NaN metric is stored as NULL)
        having = _ids(sa.select(table.run_id).where(table.key == node.name))
        return Run.id.not_in(having) if node.op == "is null" else Run.id.in_(having)
    conditions = [table.key == node.name]
    if node.kind == "metrics":
        conditions.append(_compare(value_col, node.op, _each(_metric_value, node.value)))
        return Run.id.in_(_ids(sa.select(table.run_id).where(*conditions)))
    values = node.value if isinstance(node.value, tuple) else (node.value,)
    texts = [str(v) for v in values if not _is_number(v)]
    numbers = node.op not in ("like", "ilike") and len(texts) < len(values)
    # Only short values can match (a number's text is short too): the partial index's WHERE term, literally,
    # so that the planners use the covering index
    if (numbers or node.op in ("=", "in")) and all(len(v) <= SHORT_VALUE for v in texts):
        conditions.append(sa.func.length(value_col) <= sa.literal_column(str(SHORT_VALUE)))
    if numbers:  # an unquoted number: compared with the values that are numbers' text, as numbers
        conditions.append(_compare_numbers(value_col, node.op, node.value))
    else:
        conditions.append(_compare(value_col, node.op, _each(str, node.value)))
    return Run.id.in_(_ids(sa.select(table.run_id).where(*conditions)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compare_numbers(column, op: str, value: Any):
    """A text column compared with a number (or an ``in`` list holding numbers and strings): the numbers
    with the rows whose text is a number, as 64-bit floats; strings as text."""
    number = _TextNumber(column)
    if op not in ("in", "not in"):
        return _compare(number, op, sa.literal(_metric_value(value), sa.Double))
    numbers = [_metric_value(v) for v in value if _is_number(v)]
    texts = [str(v) for v in value if not _is_number(v)]
    clause = sa.or_(_InValues(number, numbers), *([_InValues(column, texts)] if texts else []))
    return sa.not_(clause) if op == "not in" else clause


#: a number's text (mlplat.db.engine.NUMBER_TEXT: JSON's number form, which str() of an int or a float is)
_NUMBER_TEXT = f"^{NUMBER_TEXT}$"
#: on PostgreSQL, the numbers whose float8 would be 0 (at most half the least double) or +-infinity (at least
#: the greatest double and half a step beyond): PostgreSQL raises an error for those, Python's float() does not
_UNDERFLOW = decimal.Decimal((0, tuple(map(int, str(5 ** 1075))), -1075))  # 2 ** -1075, exactly
_OVERFLOW = decimal.Decimal(2 ** 1024 - 2 ** 970)


class _TextNumber(ColumnElement):
    """A text column's value as a 64-bit float where it is a number's text (at most SHORT_VALUE characters),
    else NULL: the float Python's float() reads from the text (correctly rounded; past a double's range,
    +-infinity or 0). On SQLite mlplat's ``mlplat_number()`` (SQLite's CAST is not correctly rounded); on
    PostgreSQL a CAST to float8, the text first read as a numeric to keep float8 from raising an error."""

    inherit_cache = True
    type = sa.Double()

    def __init__(self, column) -> None:
        self.column = column


@compiles(_TextNumber)
def _text_number_sqlite(element, compiler, **kw):
    return f"mlplat_number({compiler.process(element.column, **kw)})"


@compiles(_TextNumber, "postgresql")
def _text_number_postgresql(element, compiler, **kw):
    col = compiler.process(element.column, **kw)
    pattern, under, over = (compiler.process(sa.literal(v, t), **kw) for v, t in
                            ((_NUMBER_TEXT, sa.Text), (_UNDERFLOW, sa.Numeric), (_OVERFLOW, sa.Numeric)))
    exact = f"abs(CAST({col} AS NUMERIC))"
    return (f"(CASE WHEN length({col}) <= {SHORT_VALUE} AND {col} ~ {pattern} THEN CASE "
            f"WHEN {exact} <= {under} THEN CAST(0 AS FLOAT8) WHEN {exact} < {over} THEN CAST({col} AS FLOAT8) "
            f"WHEN CAST({col} AS NUMERIC) < 0 THEN CAST('-Infinity' AS FLOAT8) "
            f"ELSE CAST('Infinity' AS FLOAT8) END END)")


class _InValues(ColumnElement):
    """``column IN (values)`` with the values in one bound parameter, however many there are (a parameter
    each ran past PostgreSQL's 65,535 per statement). On PostgreSQL ``column = ANY(array)``; on SQLite
    ``column IN`` the values of a JSON array, as the column's type binds them (a :class:`_TextNumber`'s
    floats as their text, read back by ``mlplat_number()``: SQLite's JSON reader does not round correctly)."""

    inherit_cache = False  # the values are bound when compiled

    def __init__(self, column, values: list) -> None:
        self.column, self.values = column, values


@compiles(_InValues)
def _in_values_sqlite(element, compiler, **kw):
    col = compiler.process(element.column, **kw)
    if isinstance(element.column, _TextNumber):
        texts = [repr(v) if math.isfinite(v) else ("-1e9999" if v < 0 else "1e9999") for v in element.values]
        values = compiler.process(sa.literal(json.dumps(texts), sa.Text), **kw)
        return f"({col} IN (SELECT mlplat_number(value) FROM json_each({values})))"
    bind = element.column.type.dialect_impl(compiler.dialect).bind_processor(compiler.dialect) or (lambda v: v)
    values = compiler.process(sa.literal(json.dumps([bind(v) for v in element.values]), sa.Text), **kw)
    return f"({col} IN (SELECT value FROM json_each({values})))"


@compiles(_InValues, "postgresql")
def _in_values_postgresql(element, compiler, **kw):
    item = element.column.type
    item = sa.Text() if isinstance(item, sa.String) else item  # not VARCHAR(16)[]: a cast cuts a longer text short
    values = compiler.process(sa.literal(element.values, ARRAY(item)), **kw)
    return f"({compiler.process(element.column, **kw)} = ANY({values}))"


def _each(convert, value: Any) -> Any:
    """``convert`` applied to a value, or to each value of an ``in`` list."""
    return tuple(map(convert, value)) if isinstance(value, tuple) else convert(value)


def _ids(query):
    cte = query.cte().prefix_with("MATERIALIZED")
    return sa.select(cte.c.run_id)


# --------------------------------------------------------------- order by
_ORDER = re.compile(r"^\s*(?P<field>.+?)\s*(?:\s(?P<dir>asc|desc))?\s*$", re.I)


def parse_order(item: str) -> tuple[str, str, bool]:
    """``"metrics.val_auc desc"`` -> ("metrics", "val_auc", descending)."""
    m = _ORDER.match(item or "")
    if not m:
        raise DataError(f"order_by {item!r} is empty")
    p = _Parser(m.group("field"))
    try:
        kind, name = p.field()
    except DataError as exc:  # the parser speaks of a filter: this is an order
        raise DataError(f"order_by {item!r}: {str(exc).removeprefix('filter: ')}") from None
    if p.peek() is not None:
        raise DataError(f"order_by {item!r}: write 'field', 'field asc' or 'field desc'")
    return kind, name, (m.group("dir") or "asc").lower() == "desc"


@dataclass(frozen=True)
class SortKey:
    """One term of a search's order: the value a run is ordered by, its direction, whether it may be NULL
    (a run without the metric, param or tag, or no end time: those sort last in either direction), and what
    its values are (``float``, ``str`` or ``time``), which a page token records."""

    field: tuple[str, str]  # ("metrics", "val_auc"); attributes by their one name ("name", "run_id")
    column: Any
    desc: bool
    nullable: bool
    type: str


def sort_keys(query, order_by: list[str]):
    """``(query, keys)``: the query joined to what ``order_by`` orders by, and the whole order as
    :class:`SortKey` s: the terms asked for, then ``attributes.start_time desc`` (newest first), then
    ``attributes.run_id``, which is unique, so that the order is total and a page token can resume after
    any run. A term on a field already ordered by, and any term after the run id, breaks no tie: left out."""
    keys: list[SortKey] = []
    terms = [parse_order(item) for item in order_by]
    terms += [("attributes", "start_time", True), ("attributes", "run_id", False)]
    for i, (kind, name, desc) in enumerate(terms):
        if kind == "attributes":
            name = _attribute_name(name)
        if any(k.field == (kind, name) for k in keys) or (keys and keys[-1].field == ("attributes", "run_id")):
            continue
        if kind == "attributes":
            column, nullable = _attribute(name), name == "end_time"
            type_ = "time" if name in ("start_time", "end_time") else "str"
        else:
            table = {"metrics": LatestMetric, "params": RunParam, "tags": RunTag}[kind]
            alias = sa.orm.aliased(table, name=f"order_{i}")
            query = query.outerjoin(alias, sa.and_(alias.run_id == Run.id, alias.key == name))
            column, nullable, type_ = alias.value, True, "float" if kind == "metrics" else "str"
        keys.append(SortKey((kind, name), column, desc, nullable, type_))
    return query, keys


def order_terms(keys: list[SortKey]) -> list:
    """ORDER BY terms for ``keys``: NULLs last in either direction, on both backends (an ``is null`` term
    first, false before true, rather than each backend's own default, which differ)."""
    terms = []
    for key in keys:
        if key.nullable:
            terms.append(key.column.is_(None))
        terms.append(key.column.desc() if key.desc else key.column.asc())
    return terms


def page_query(query, keys: list[SortKey], cursor: list[Any] | None, limit: int):
    """A page of ``query`` (joined by :func:`sort_keys` to ``keys``): the run ids and their sort values, the runs
    after ``cursor`` (the sort values of the page before's last run; None: the first page), in order, ``limit``
    rows."""
    if cursor is not None:  # keyset paging: the runs that sort after the last one of the page before
        query = query.where(after(keys, cursor))
    return query.add_columns(*(k.column for k in keys)).order_by(*order_terms(keys)).limit(limit)


def after(keys: list[SortKey], values: list[Any]):
    """Whether a run sorts after the run whose sort values are ``values``, in the order :func:`order_terms`
    gives ``keys`` (the last key is unique: no other run is equal on every key).

    ``k1 after c1 or (k1 = c1 and (k2 after c2 or (k2 = c2 and ...)))``, where a NULL sorts after every
    value and equals NULL: after a value ``c`` are the values past it in the key's direction and NULL; after
    NULL, nothing. No term is negated, so a comparison with NULL (unknown) counts as false throughout. The
    first key's bound is repeated on its own (``start_time <= c``) for an index to start from."""
    condition = None
    for key, value in reversed(list(zip(keys, values))):
        column = key.column
        if value is None:
            beyond, equal = None, column.is_(None)
        else:
            beyond = column < value if key.desc else column > value
            if key.nullable:
                beyond = sa.or_(beyond, column.is_(None))
            equal = column == value
        if condition is None:  # the last key (the run id) is unique: equal is not after
            condition = beyond if beyond is not None else sa.false()
        elif beyond is None:
            condition = sa.and_(equal, condition)
        else:
            condition = sa.or_(beyond, sa.and_(equal, condition))
    first, value = keys[0], values[0]
    if value is None:
        return sa.and_(first.column.is_(None), condition)
    if not first.nullable:
        bound = first.column <= value if first.desc else first.column >= value
        return sa.and_(bound, condition)
    return condition
