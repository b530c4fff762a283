"""Feature definitions in Python: Entity, Field, ParquetSource, FeatureView, FeatureService.

Usage::

    >>> from datetime import timedelta
    >>> import mlplat as mp
    >>> user = mp.Entity("user", join_keys=["user_id"])
    >>> txn = mp.FeatureView(
    ...     "user_txn", entities=[user], ttl=timedelta(days=30),
    ...     schema=[mp.Field("txn_count_7d", mp.Int64), mp.Field("amount_sum_7d", mp.Float64)],
    ...     source=mp.ParquetSource("data/txn/", timestamp_field="event_timestamp"),
    ... )
    >>> txn.join_keys, txn.feature_names
    (['user_id'], ['txn_count_7d', 'amount_sum_7d'])

Definitions are plain values: they are checked for shape when built, checked
against their source's data by ``p.features.apply``, and stored there as a
JSON spec with a version number. ``to_spec``/``from_spec`` convert both ways.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from .. import dtypes
from .._checks import storable
from ..errors import DefinitionError

__all__ = ["Entity", "Field", "ParquetSource", "FeatureView", "FeatureService", "FeatureRef", "parse_ref"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]*")  # always fullmatch: "$" would let a trailing newline through
MAX_NAME = 255  # the database's name, owner and tag key columns
MAX_TAG_VALUE = 1024  # the database's tag value column
MAX_TTL = timedelta(days=36_525)  # 100 years: times are int64 nanoseconds (1677-2262), and ts - ttl must fit


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise DefinitionError(
            f"{what} name {name!r} is invalid: use letters, digits, '_', '-' and '.', starting with a letter or '_'"
        )
    return name


def _check_tags(tags: Mapping[str, str] | None, owner: str) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise DefinitionError(f"{owner}: tags must be a dict of str to str, got {tags!r}")
    for key, value in tags.items():
        _check_length(key, MAX_NAME, f"{owner}: tag key {_preview(key)}")
        _check_length(value, MAX_TAG_VALUE, f"{owner}: the value of tag {_preview(key)}")
    return dict(tags)


def _check_length(text: str, limit: int, what: str) -> None:
    """Refuse ``text`` longer than the database column that stores it (PostgreSQL would refuse it at apply), or
    holding what a database cannot store."""
    storable(text, what, error=DefinitionError)
    if len(text) > limit:
        raise DefinitionError(f"{what} is {len(text)} characters long; at most {limit} are allowed, shorten it")


def _preview(text: str, limit: int = 40) -> str:
    """``text`` quoted, cut to ``limit`` characters: long values make unreadable messages."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _check_description(description: Any, what: str) -> str:
    if not isinstance(description, str):
        raise DefinitionError(
            f"{what}: description must be a string, got {type(description).__name__} {description!r}"
        )
    storable(description, f"{what}: description", error=DefinitionError)
    return description


def _stored_text(value: Any) -> str:
    """A description read back from the catalog as text: rows stored before descriptions were checked
    may hold None or a number."""
    return "" if value is None else str(value)


def _as_list(items: Any, what: str) -> list[Any]:
    """``items`` (a list, tuple, generator or other iterable) as a list, read exactly once."""
    if isinstance(items, (str, bytes, Mapping)):
        raise DefinitionError(f"{what}, got {type(items).__name__} {items!r}")
    try:
        return list(items)
    except TypeError:
        raise DefinitionError(f"{what}, got {type(items).__name__} {items!r}") from None


def _check_ttl(ttl: Any, where: str) -> timedelta | None:
    """``ttl`` as a plain ``datetime.timedelta`` (a ``pandas.Timedelta`` is converted), or None."""
    if ttl is None:
        return None
    if not isinstance(ttl, timedelta) or ttl < timedelta(0):
        raise DefinitionError(f"{where}: ttl must be a non-negative timedelta or None, got {ttl!r}")
    if getattr(ttl, "nanoseconds", 0):  # pandas.Timedelta: datetime.timedelta holds whole microseconds only
        raise DefinitionError(f"{where}: ttl {ttl!r} has a part below one microsecond, which mlplat cannot store; "
                              "round it first, e.g. ttl.round('us')")
    if ttl > MAX_TTL:
        raise DefinitionError(f"{where}: ttl {ttl!r} is longer than {MAX_TTL.days} days (100 years), beyond "
                              "what times in nanoseconds can subtract; for rows that never expire use ttl=None")
    return timedelta(days=ttl.days, seconds=ttl.seconds, microseconds=ttl.microseconds)


class _Definition:
    """Common parts: a name, description, tags, owner, and the version the catalog gave it."""

    kind: ClassVar[str]

    name: str
    description: str
    tags: dict[str, str]
    owner: str | None
    version: int | None
    created_at: datetime | None

    def _init_common(self, name: str, description: str, tags: Mapping[str, str] | None, owner: str | None) -> None:
        self.name = _check_name(name, self.kind.replace("_", " "))
        where = f"{self.kind.replace('_', ' ')} {name!r}"
        self.description = _check_description(description, where)
        if owner is not None and not isinstance(owner, str):
            raise DefinitionError(f"{where}: owner must be a string")
        if owner is not None:
            _check_length(owner, MAX_NAME, f"{where}: owner")
        self.tags = _check_tags(tags, where)
        self.owner = owner
        self.version = None
        self.created_at = None

    def _common_spec(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "tags": dict(sorted(self.tags.items())),
                "owner": self.owner}

    def to_spec(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_spec() == self.to_spec()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __repr__(self) -> str:
        version = f", version={self.version}" if self.version is not None else ""
        return f"{type(self).__name__}({self.name!r}{version})"


class Entity(_Definition):
    """A thing features describe, identified by one or more join keys (int or string columns).

    >>> Entity("merchant", join_keys=["merchant_id"]).join_keys
    ['merchant_id']
    """

    kind = "entity"

    def __init__(
        self,
        name: str,
        join_keys: Sequence[str],
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        owner: str | None = None,
    ) -> None:
        self._init_common(name, description, tags, owner)
        join_keys = _as_list(join_keys, f"entity {name!r}: join_keys must be a non-empty list of column names")
        if not join_keys:
            raise DefinitionError(f"entity {name!r}: join_keys must be a non-empty list of column names")
        keys = [_check_name(k, f"entity {name!r} join key") for k in join_keys]
        if len(set(keys)) != len(keys):
            raise DefinitionError(f"entity {name!r}: join key listed twice in {keys}")
        self.join_keys = keys

    def to_spec(self) -> dict[str, Any]:
        """The definition as a JSON-able dict (what the catalog stores)."""
        return {**self._common_spec(), "join_keys": list(self.join_keys)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Entity:
        """The entity a :meth:`to_spec` dict describes."""
        return cls(spec["name"], spec["join_keys"], description=spec.get("description", ""),
                   tags=spec.get("tags"), owner=spec.get("owner"))


class Field:
    """A named, typed feature column.

    >>> Field("amount", "float64").dtype
    mlplat.Float64
    """

    def __init__(self, name: str, dtype: dtypes.DType | str, *, description: str = "") -> None:
        self.name = _check_name(name, "field")
        if isinstance(dtype, str):
            dtype = dtypes.from_name(dtype)
        if not isinstance(dtype, dtypes.DType):
            raise DefinitionError(f"field {name!r}: dtype must be an mlplat dtype such as mp.Int64, got {dtype!r}")
        self.dtype = dtype
        self.description = _check_description(description, f"field {name!r}")

    def to_spec(self) -> dict[str, Any]:
        """The field as a JSON-able dict."""
        return {"name": self.name, "dtype": self.dtype.name, "description": self.description}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Field:
        """The field a :meth:`to_spec` dict describes."""
        return cls(spec["name"], spec["dtype"], description=_stored_text(spec.get("description")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Field) and other.to_spec() == self.to_spec()

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.dtype!r})"


class ParquetSource:
    """Parquet files holding a view's history: a file, or a folder read recursively in path order.

    ``path`` is a local path (made absolute against the current directory) or
    any URI pyarrow's filesystems understand (``s3://bucket/prefix``,
    ``gs://...``, ``file:///...``).

    >>> ParquetSource("/data/txn", timestamp_field="ts").timestamp_field
    'ts'
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timestamp_field: str = "event_timestamp",
        created_timestamp_field: str | None = None,
    ) -> None:
        path = os.fspath(path)
        if not path:
            raise DefinitionError("ParquetSource needs a path")
        self.path = path if "://" in path else os.path.abspath(os.path.expanduser(path))
        self.timestamp_field = _check_name(timestamp_field, "timestamp field")
        self.created_timestamp_field = (
            None if created_timestamp_field is None else _check_name(created_timestamp_field, "created timestamp field")
        )
        if self.created_timestamp_field == self.timestamp_field:
            raise DefinitionError("created_timestamp_field must differ from timestamp_field")

    def to_spec(self) -> dict[str, Any]:
        """The source as a JSON-able dict."""
        return {"type": "parquet", "path": self.path, "timestamp_field": self.timestamp_field,
                "created_timestamp_field": self.created_timestamp_field}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> ParquetSource:
        """The source a :meth:`to_spec` dict describes."""
        if spec.get("type") != "parquet":
            raise DefinitionError(f"unknown source type {spec.get('type')!r}")
        return cls(spec["path"], timestamp_field=spec["timestamp_field"],
                   created_timestamp_field=spec.get("created_timestamp_field"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParquetSource) and other.to_spec() == self.to_spec()

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"ParquetSource({self.path!r}, timestamp_field={self.timestamp_field!r})"


class FeatureView(_Definition):
    """Features of one or more entities, read point-in-time correctly from a source.

    ``ttl`` bounds how old a value may be: an entity row at time t sees rows
    with ``t - ttl <= event_time <= t`` (None: no lower bound). ``online``
    says whether materialization copies the view to the online store.
    """

    kind = "feature_view"

    def __init__(
        self,
        name: str,
        *,
        entities: Sequence[Entity],
        schema: Sequence[Field],
        source: ParquetSource,
        ttl: timedelta | None = None,
        online: bool = True,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        owner: str | None = None,
    ) -> None:
        self._init_common(name, description, tags, owner)
        where = f"feature view {name!r}"
        entities_wanted = f"{where}: entities must be a non-empty list of mp.Entity"
        if isinstance(entities, Entity):
            raise DefinitionError(entities_wanted)
        entities = _as_list(entities, entities_wanted)  # a generator is read once, here
        if not entities or not all(isinstance(e, Entity) for e in entities):
            raise DefinitionError(entities_wanted)
        schema = _as_list(schema, f"{where}: schema must be a non-empty list of mp.Field")
        if not schema or not all(isinstance(f, Field) for f in schema):
            raise DefinitionError(f"{where}: schema must be a non-empty list of mp.Field")
        if not isinstance(source, ParquetSource):
            raise DefinitionError(f"{where}: source must be an mp.ParquetSource, got {type(source).__name__}")
        ttl = _check_ttl(ttl, where)
        if not isinstance(online, bool):
            raise DefinitionError(f"{where}: online must be True or False")
        keys: list[str] = []
        for e in entities:
            for k in e.join_keys:
                if k in keys:
                    raise DefinitionError(f"{where}: join key {k!r} comes from two entities")
                keys.append(k)
        names = [f.name for f in schema]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DefinitionError(f"{where}: duplicate field {', '.join(map(repr, dupes))} in schema")
        reserved = set(keys) | {source.timestamp_field, source.created_timestamp_field}
        clash = [n for n in names if n in reserved]
        if clash:
            raise DefinitionError(f"{where}: field {clash[0]!r} is also a join key or timestamp column")
        self.entities = entities
        self.schema = schema
        self.source = source
        self.ttl = ttl
        self.online = online
        self.key_types: dict[str, str] = {}  # "int" or "string" per join key, resolved by apply

    @property
    def join_keys(self) -> list[str]:
        """Join keys of all entities, in order."""
        return [k for e in self.entities for k in e.join_keys]

    @property
    def feature_names(self) -> list[str]:
        """The names of the view's features, in schema order."""
        return [f.name for f in self.schema]

    def field(self, name: str) -> Field:
        """The field called ``name``; NotFoundError names the view's features otherwise."""
        for f in self.schema:
            if f.name == name:
                return f
        from ..errors import NotFoundError

        raise NotFoundError(
            f"feature view {self.name!r} has no feature {name!r}; it has {', '.join(self.feature_names)}"
        )

    def to_spec(self) -> dict[str, Any]:
        """The definition as a JSON-able dict (what the catalog stores)."""
        return {
            **self._common_spec(),
            "entities": [{"name": e.name, "join_keys": list(e.join_keys)} for e in self.entities],
            "schema": [f.to_spec() for f in self.schema],
            "source": self.source.to_spec(),
            "ttl_seconds": None if self.ttl is None else self.ttl.total_seconds(),
            "online": self.online,
            "key_types": dict(self.key_types),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> FeatureView:
        """The view a :meth:`to_spec` dict describes."""
        ttl = spec.get("ttl_seconds")
        view = cls(
            spec["name"],
            entities=[Entity(e["name"], e["join_keys"]) for e in spec["entities"]],
            schema=[Field.from_spec(f) for f in spec["schema"]],
            source=ParquetSource.from_spec(spec["source"]),
            ttl=None if ttl is None else timedelta(seconds=ttl),
            online=spec.get("online", True),
            description=spec.get("description", ""),
            tags=spec.get("tags"),
            owner=spec.get("owner"),
        )
        view.key_types = dict(spec.get("key_types") or {})
        return view


class FeatureService(_Definition):
    """A named list of feature references that a model consumes.

    >>> FeatureService("fraud_v1", features=["user_txn:txn_count_7d"]).features
    ['user_txn:txn_count_7d']
    """

    kind = "feature_service"

    def __init__(
        self,
        name: str,
        *,
        features: Iterable[str | FeatureView],
        description: str = "",
        tags: Mapping[str, str] | None = None,
        owner: str | None = None,
    ) -> None:
        self._init_common(name, description, tags, owner)
        refs: list[str] = []
        for item in features:
            if isinstance(item, FeatureView):
                refs.extend(f"{item.name}:{f}" for f in item.feature_names)
            else:
                refs.append(str(parse_ref(item)))
        if not refs:
            raise DefinitionError(f"feature service {name!r} lists no features")
        if len(set(refs)) != len(refs):
            raise DefinitionError(f"feature service {name!r} lists a feature twice")
        self.features = refs

    def to_spec(self) -> dict[str, Any]:
        """The definition as a JSON-able dict (what the catalog stores)."""
        return {**self._common_spec(), "features": list(self.features)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> FeatureService:
        """The service a :meth:`to_spec` dict describes."""
        return cls(spec["name"], features=spec["features"], description=spec.get("description", ""),
                   tags=spec.get("tags"), owner=spec.get("owner"))


class FeatureRef:
    """A parsed ``"view:feature"`` or ``"view@version:feature"`` reference."""

    __slots__ = ("view", "feature", "version")

    def __init__(self, view: str, feature: str, version: int | None = None) -> None:
        self.view, self.feature, self.version = view, feature, version

    def __str__(self) -> str:
        at = f"@{self.version}" if self.version is not None else ""
        return f"{self.view}{at}:{self.feature}"

    def column(self, full_feature_names: bool) -> str:
        """The feature's column in a retrieved table: ``view__feature`` with ``full_feature_names``, else ``feature``.

        >>> parse_ref("user_txn@2:txn_count_7d").column(True)
        'user_txn__txn_count_7d'
        """
        return f"{self.view}__{self.feature}" if full_feature_names else self.feature

    def __repr__(self) -> str:
        return f"FeatureRef({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureRef) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))


_REF = re.compile(r"([A-Za-z_][A-Za-z0-9_\-.]*)(?:@([0-9]+))?:([A-Za-z_][A-Za-z0-9_\-.]*)")  # fullmatch only


def parse_ref(ref: str) -> FeatureRef:
    """Parse ``"view:feature"`` (latest definition) or ``"view@3:feature"`` (version 3).

    >>> parse_ref("user_txn@2:txn_count_7d").version
    2
    """
    m = _REF.fullmatch(ref) if isinstance(ref, str) else None
    if m is None:
        raise DefinitionError(f"feature reference {ref!r} is invalid: write 'view:feature' or 'view@version:feature'")
    return FeatureRef(m.group(1), m.group(3), int(m.group(2)) if m.group(2) else None)
