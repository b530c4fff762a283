"""Online reads: feature references and entity rows in, column lists out, one round trip.

The first call for a list of references builds a plan (views, record layouts,
output names) from the catalog; later calls reuse it for ``cache_seconds``, so
the hot path touches no database. Each call encodes the entity keys natively,
fetches each distinct key once for every view in a single MGET, and decodes
the records straight into one Python list per feature.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import _arrow
from .._expiring import Expiring
from .._native import _codec
from .._native.codec import kind_of
from ..dtypes import DType
from ..errors import DataError, DefinitionError, OnlineStoreError
from .definitions import FeatureService, FeatureView
from .offline import ViewRequest
from .online.store import OnlineStore

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["OnlineReader", "OnlineResponse", "view_tag"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def view_tag(view: FeatureView) -> str:
    """Where a view version's records live in the online store: ``name@version``."""
    return f"{view.name}@{view.version}"


class OnlineResponse(dict):
    """Feature values as column lists (join keys first, then features in the order asked for).

    A plain ``dict[str, list]``, plus :meth:`to_arrow` and :meth:`to_pandas`. Timestamp features are
    ``datetime`` values, which hold microseconds: :meth:`to_arrow` gives them to the nanosecond, as stored.
    """

    def __init__(self, columns: dict[str, list], types: Mapping[str, pa.DataType],
                 nanoseconds: Mapping[str, list] | None = None) -> None:
        super().__init__(columns)
        self._types = dict(types)
        # timestamp columns as stored (ns since the epoch), used while the column is the list handed out
        self._ns = {k: (columns[k], v) for k, v in (nanoseconds or {}).items()}

    def to_arrow(self) -> pa.Table:
        """The columns as a pyarrow Table, features typed as declared."""
        def column(name: str, values: list) -> pa.Array:
            exact = self._ns.get(name)
            if exact is not None and exact[0] is values:
                return pa.array(exact[1], pa.int64()).cast(self._types[name])
            return pa.array(values, type=self._types.get(name))

        return pa.table({k: column(k, v) for k, v in self.items()})

    def to_pandas(self) -> pd.DataFrame:
        """The columns as a pandas DataFrame (via Arrow)."""
        return self.to_arrow().to_pandas()


@dataclass
class _ViewPlan:
    view: FeatureView
    tag: str
    kinds: list[int]  # the record layout: every feature of the view
    picks: list[tuple[int, str]]  # (position in the view's schema, output name)
    ttl_ns: int | None
    timestamps: list[int] = field(default_factory=list)  # picks holding timestamps


@dataclass
class _Plan:
    groups: list[tuple[tuple[str, ...], list[_ViewPlan]]]  # views by join keys
    join_keys: list[str]
    key_kinds: dict[str, str]
    order: list[str]
    types: dict[str, pa.DataType]


class OnlineReader:
    """Reads feature values from an online store for entity rows."""

    def __init__(
        self,
        store: Callable[[], OnlineStore],
        resolve: Callable[..., tuple[list[ViewRequest], list[str]]],
        cache_seconds: float = 10.0,
    ) -> None:
        self._store = store
        self._resolve = resolve
        self._plans: Expiring[_Plan] = Expiring(cache_seconds)

    def invalidate(self) -> None:
        """Forget cached plans (after ``apply`` in this process)."""
        self._plans.clear()

    def _plan(self, features: Sequence[str] | FeatureService, full_feature_names: bool) -> _Plan:
        if isinstance(features, str):  # tuple("v:f") would be its characters, each a bad reference
            raise DefinitionError("features must be a list of 'view:feature' references or a FeatureService")
        refs = tuple(features.features if isinstance(features, FeatureService) else features)
        return self._plans.get((refs, full_feature_names), lambda: self._make_plan(refs, full_feature_names))

    def _make_plan(self, refs: tuple[str, ...], full_feature_names: bool) -> _Plan:
        requests, order = self._resolve(list(refs), full_feature_names=full_feature_names)
        groups: dict[tuple[str, ...], list[_ViewPlan]] = {}
        key_kinds: dict[str, str] = {}
        types: dict[str, pa.DataType] = {}
        for req in requests:
            view = req.view
            if not view.online:
                raise DefinitionError(f"feature view {view.name!r} is not served online (it was applied with "
                                      "online=False)")
            names = view.feature_names
            vp = _ViewPlan(view, view_tag(view), [kind_of(f.dtype) for f in view.schema],
                           [(names.index(f), out) for f, out in zip(req.features, req.output_names)],
                           None if view.ttl is None else _arrow.timedelta_ns(view.ttl))
            vp.timestamps = [i for i, (pos, _) in enumerate(vp.picks) if view.schema[pos].dtype.kind == "timestamp"]
            groups.setdefault(tuple(view.join_keys), []).append(vp)
            for k in view.join_keys:
                if key_kinds.setdefault(k, view.key_types[k]) != view.key_types[k]:
                    raise DefinitionError(f"join key {k!r} is {key_kinds[k]} in one view and "
                                          f"{view.key_types[k]} in {view.name!r}")
            for pos, out in vp.picks:
                types[out] = _arrow_type(view.schema[pos].dtype)
        clash = [name for name in order if name in key_kinds]
        if clash:  # the answer holds the join keys, then the features: one would overwrite the other
            raise DataError(f"feature {clash[0]!r} has the name of a join key of these features; pass "
                            "full_feature_names=True (or rename the feature)")
        return _Plan(list(groups.items()), list(key_kinds), key_kinds, order, types)

    def read(self, features, entity_rows: Any, *, full_feature_names: bool = False,
             now: datetime | None = None) -> OnlineResponse:
        plan = self._plan(features, full_feature_names)
        columns = _key_columns(entity_rows, plan.join_keys)
        n = len(columns[plan.join_keys[0]]) if plan.join_keys else 0
        now_ns = time.time_ns() if now is None else _arrow.datetime_ns(now)
        read_groups, rows_of = [], []
        for keys, views in plan.groups:
            kinds = [0 if plan.key_kinds[k] == "int" else 1 for k in keys]
            try:
                encoded = _codec.entity_keys([columns[k] for k in keys], kinds)
            except (TypeError, ValueError) as exc:
                raise DataError(_key_error(str(exc), keys, plan.key_kinds)) from None
            unique: dict[bytes, int] = {}
            rows = np.fromiter((-1 if e is None else unique.setdefault(e, len(unique)) for e in encoded),
                               dtype=np.int64, count=n)
            read_groups.append(([vp.tag for vp in views], list(unique)))
            rows_of.append(rows)
        records = self._store().read(read_groups)
        values: dict[str, list] = {}
        nanoseconds: dict[str, list] = {}
        offset = 0
        for (_, views), (_, unique), rows in zip(plan.groups, read_groups, rows_of):
            for vp in views:
                min_ts = _arrow.INT64_MIN if vp.ttl_ns is None else now_ns - vp.ttl_ns
                try:
                    decoded, _ = _codec.decode_records(records, offset, len(unique), vp.kinds, min_ts, rows)
                except (TypeError, ValueError) as exc:
                    raise OnlineStoreError(f"online store {self._store().name}: {vp.tag} holds a record mlplat "
                                           f"cannot read ({exc}); re-materialize the view") from None
                for i, (pos, out) in enumerate(vp.picks):
                    if i in vp.timestamps:
                        values[out], nanoseconds[out] = _timestamps(decoded[pos]), decoded[pos]
                    else:
                        values[out] = decoded[pos]
                offset += len(unique)
        result = {k: columns[k] for k in plan.join_keys}
        result.update((name, values[name]) for name in plan.order)
        return OnlineResponse(result, plan.types, nanoseconds)


def _arrow_type(dtype: DType) -> pa.DataType:
    return pa.timestamp("ns", "UTC") if dtype.kind == "timestamp" else dtype.arrow


def _timestamps(values: list) -> list:
    return [None if v is None else _EPOCH + timedelta(microseconds=v // 1000) for v in values]


def _key_error(message: str, keys: Sequence[str], kinds: Mapping[str, str]) -> str:
    # "key column J row I: ..." from the codec -> name the join key
    if message.startswith("key column "):
        head, _, rest = message.partition(": ")
        j, row = head.removeprefix("key column ").split(" row ")
        key = keys[int(j)]
        return f"entity row {row}: join key {key!r} must be {kinds[key]}: {rest}"
    return message


def _column_values(values: Any, key: str) -> list:
    """One column of entity rows given as a dict of columns, as a list (numpy ints and strs are read as ints
    and strs); a single value (a str would otherwise be read as one row per character) is a DataError."""
    if not isinstance(values, (str, bytes, bytearray, Mapping)):
        try:
            return list(values)
        except TypeError:
            pass
    raise DataError(f"entity rows given as a dict of columns: column {key!r} must be a list of values, one per "
                    f"entity row, got {type(values).__name__} {values!r:.60}; write {{{key!r}: [...]}} or a list "
                    "of dicts")


def _key_columns(entity_rows: Any, join_keys: Sequence[str]) -> dict[str, list]:
    """Join key columns of the entity rows as Python lists."""
    if isinstance(entity_rows, Mapping):
        missing = [k for k in join_keys if k not in entity_rows]
        if missing:
            raise DataError(f"entity rows have no column {missing[0]!r}, a join key of the features asked for "
                            f"(columns: {', '.join(map(str, entity_rows))})")
        cols = {k: _column_values(entity_rows[k], k) for k in join_keys}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise DataError(f"entity row columns differ in length: {sorted(lengths)}")
        return cols
    if isinstance(entity_rows, (list, tuple)):
        cols = {k: [] for k in join_keys}
        for i, row in enumerate(entity_rows):
            if type(row) is not dict and not isinstance(row, Mapping):  # the exact check first: it is cheap
                raise DataError(f"entity row {i} must be a dict of join key values, got {type(row).__name__}")
            for k in join_keys:
                try:
                    cols[k].append(row[k])
                except KeyError:
                    raise DataError(f"entity row {i} has no join key {k!r}") from None
        return cols
    table = _arrow.to_table(entity_rows, "entity rows")
    missing = [k for k in join_keys if k not in table.column_names]
    if missing:
        raise DataError(f"entity rows have no column {missing[0]!r}, a join key of the features asked for "
                        f"(columns: {', '.join(table.column_names)})")
    return {k: table.column(k).to_pylist() for k in join_keys}

