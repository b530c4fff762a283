"""The feature catalog: versioned definitions in the SQL database.

``apply`` checks every definition against its source and the rest of the
catalog, then stores each one whose spec changed as a new version (1, 2, ...)
in one transaction; applying the same definitions again changes nothing.
Reads return definition objects with ``version`` and ``created_at`` set.
``apply`` sets them (and a view's ``key_types``) on the caller's objects only
after its transaction commits: a failed apply leaves them as they were.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import aliased

from .._checks import check_version, close_names, storable
from ..db import Database
from ..db.models import FeatureDefinition, FeatureDefinitionTag
from ..errors import DataError, DefinitionError, NotFoundError, StoreError
from .definitions import Entity, FeatureService, FeatureView, _Definition, _stored_text, parse_ref
from .parquet import ParquetFiles
from .validation import check_source

__all__ = ["Catalog", "CatalogEntry", "ApplyResult"]

_KINDS: dict[str, type[_Definition]] = {"entity": Entity, "feature_view": FeatureView,
                                         "feature_service": FeatureService}
_APPLY_ORDER = ("entity", "feature_view", "feature_service")
_PG_LOCK_KEY = 0x6D6C63617461  # serializes apply on PostgreSQL


def _storable(text: str) -> bool:
    """Whether a database can hold ``text`` as given (see :func:`mlplat._checks.storable`)."""
    try:
        storable(text, "")
    except DataError:
        return False
    return True


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did with one definition."""

    kind: str
    name: str
    version: int
    changed: bool


@dataclass(frozen=True)
class CatalogEntry:
    """One stored definition version, as listed and searched."""

    kind: str
    name: str
    version: int
    description: str
    tags: dict[str, str]
    owner: str | None
    created_at: datetime
    spec: dict[str, Any]

    def definition(self) -> _Definition:
        """The Entity, FeatureView or FeatureService this entry holds."""
        obj = _KINDS[self.kind].from_spec(self.spec)
        obj.version, obj.created_at = self.version, self.created_at
        return obj


def _adopt(original: _Definition, stored: _Definition) -> None:
    """Give the caller's object what its committed copy learned: version, creation time, key types."""
    original.version, original.created_at = stored.version, stored.created_at
    if isinstance(original, FeatureView) and isinstance(stored, FeatureView):
        original.key_types = dict(stored.key_types)


def spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Catalog:
    """Versioned feature definitions stored in the shared database."""

    def __init__(self, db: Database, threads: int = 1) -> None:
        self._db = db
        self._threads = threads

    # ------------------------------------------------------------------ apply
    def apply(self, objects: Iterable[_Definition]) -> list[ApplyResult]:
        """Check and store ``objects`` in one transaction; see the module docstring."""
        batch = self._batch(objects)
        staged = {key: self._staged(obj) for key, obj in batch.items()}  # copies: the caller's stay untouched
        self._check_references(staged)
        stored: list[tuple[_Definition, _Definition, ApplyResult]] = []
        with self._db.session(write=True) as s:
            if self._db.dialect == "postgresql":
                s.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            for kind in _APPLY_ORDER:
                for key in (key for key in staged if key[0] == kind):
                    stored.append((batch[key], staged[key], self._store(s, staged[key])))
        for original, copied, _ in stored:  # committed: now the caller's objects learn their versions
            _adopt(original, copied)
        return [result for _, _, result in stored]

    def _staged(self, obj: _Definition) -> _Definition:
        """A copy of ``obj`` to check and store; a view's copy gets its source's join key types."""
        staged = copy.copy(obj)
        if isinstance(staged, FeatureView):
            staged.key_types = self._resolve_source(staged)
        return staged

    def _batch(self, objects: Iterable[_Definition]) -> dict[tuple[str, str], _Definition]:
        if isinstance(objects, _Definition):
            objects = [objects]
        if not isinstance(objects, Iterable) or isinstance(objects, (str, bytes, Mapping)):
            raise DefinitionError(f"apply takes an mp.Entity, mp.FeatureView or mp.FeatureService, or a list of them, "
                                  f"got {type(objects).__name__} {objects!r}")
        batch: dict[tuple[str, str], _Definition] = {}
        for obj in objects:
            if not isinstance(obj, _Definition):
                raise DefinitionError(
                    f"apply takes mp.Entity, mp.FeatureView and mp.FeatureService objects, got {type(obj).__name__}"
                )
            key = (obj.kind, obj.name)
            if key in batch and batch[key].to_spec() != obj.to_spec():
                raise DefinitionError(f"two different definitions of {obj.kind} {obj.name!r} in one apply")
            batch[key] = obj
        return batch

    def _resolve_source(self, view: FeatureView) -> dict[str, str]:
        """Check the view against its source's files; its join key types ("int" or "string" per key)."""
        try:
            files = ParquetFiles(view.source, self._threads)
        except StoreError as exc:
            raise DefinitionError(f"feature view {view.name!r}: {exc}") from None
        return check_source(view, files, view.feature_names, error=DefinitionError)

    def _check_references(self, batch: dict[tuple[str, str], _Definition]) -> None:
        def entity(name: str) -> Entity | None:
            found = batch.get(("entity", name))
            return found if found is not None else self._latest_or_none("entity", name)

        def view(name: str, version: int | None) -> FeatureView | None:
            found = batch.get(("feature_view", name))
            if found is not None and version is None:
                return found
            return self._get_or_none("feature_view", name, version)

        for obj in batch.values():
            if isinstance(obj, FeatureView):
                for e in obj.entities:
                    stored = entity(e.name)
                    if stored is None:
                        raise DefinitionError(
                            f"feature view {obj.name!r} uses entity {e.name!r}, which is not applied; "
                            "apply it in the same call"
                        )
                    if stored.join_keys != e.join_keys:
                        raise DefinitionError(
                            f"feature view {obj.name!r} uses entity {e.name!r} with join keys {e.join_keys}, "
                            f"but the applied entity has {stored.join_keys}; apply the entity too"
                        )
            elif isinstance(obj, FeatureService):
                for ref in map(parse_ref, obj.features):
                    v = view(ref.view, ref.version)
                    if v is None:
                        raise DefinitionError(
                            f"feature service {obj.name!r} refers to feature view {str(ref).split(':')[0]!r}, "
                            "which is not applied"
                        )
                    if ref.feature not in v.feature_names:
                        raise DefinitionError(
                            f"feature service {obj.name!r}: feature view {ref.view!r} has no feature "
                            f"{ref.feature!r}"
                        )
        self._check_services_kept(batch)

    def _check_services_kept(self, batch: dict[tuple[str, str], _Definition]) -> None:
        """A view of the batch must keep every feature an applied service (not in the batch) takes from it
        unpinned: dropping one was accepted, and every later use of the service failed."""
        views = {name: obj for (kind, name), obj in batch.items() if kind == "feature_view"}
        if not views:
            return
        for entry in self.list("feature_service"):
            if ("feature_service", entry.name) in batch:
                continue  # the batch's own version of it was checked above
            for ref in map(parse_ref, entry.definition().features):
                view = views.get(ref.view)
                if view is not None and ref.version is None and ref.feature not in view.feature_names:
                    raise DefinitionError(
                        f"feature view {ref.view!r} would no longer have feature {ref.feature!r}, which the applied "
                        f"feature service {entry.name!r} uses: apply the service without it in the same call, or "
                        f"pin the service to the view version that has it ('{ref.view}@N:{ref.feature}')")

    def _store(self, s, obj: _Definition) -> ApplyResult:
        spec = obj.to_spec()
        digest = spec_hash(spec)
        latest = s.scalars(
            sa.select(FeatureDefinition)
            .where(FeatureDefinition.kind == obj.kind, FeatureDefinition.name == obj.name)
            .order_by(FeatureDefinition.version.desc())
            .limit(1)
        ).first()
        if latest is not None and latest.spec_hash == digest:
            obj.version, obj.created_at = latest.version, latest.created_at
            return ApplyResult(obj.kind, obj.name, latest.version, False)
        row = FeatureDefinition(
            kind=obj.kind, name=obj.name, version=(latest.version + 1 if latest else 1), spec=spec,
            spec_hash=digest, description=obj.description, owner=obj.owner,
        )
        s.add(row)
        s.flush()
        s.add_all(FeatureDefinitionTag(definition_id=row.id, key=k, value=v) for k, v in obj.tags.items())
        obj.version, obj.created_at = row.version, row.created_at
        return ApplyResult(obj.kind, obj.name, row.version, True)

    # ------------------------------------------------------------------- read
    def get(self, kind: str, name: str, version: int | None = None) -> _Definition:
        """The definition ``name`` of ``kind`` at ``version`` (default: the latest)."""
        found = self._get_or_none(kind, name, version)
        if found is not None:
            return found
        if version is not None and self._get_or_none(kind, name, None) is not None:
            raise NotFoundError(f"{kind.replace('_', ' ')} {name!r} has no version {version}")
        known = [e.name for e in self.list(kind)]
        hint = close_names(name, known, "nothing of that kind is applied yet")
        raise NotFoundError(f"unknown {kind.replace('_', ' ')} {name!r}{hint}")

    def _latest_or_none(self, kind: str, name: str):
        return self._get_or_none(kind, name, None)

    def _get_or_none(self, kind: str, name: str, version: int | None):
        if not isinstance(name, str):
            raise DefinitionError(f"a {kind.replace('_', ' ')} name is a string, got {type(name).__name__} {name!r}")
        if version is not None:  # 10**30 overflowed the query (a raw database error), 'x' or 2.0 reached it
            version = check_version(version)
        if not _storable(name):  # no definition is named so (names are checked); PostgreSQL refused the query
            return None
        q = sa.select(FeatureDefinition).where(FeatureDefinition.kind == kind, FeatureDefinition.name == name)
        q = q.where(FeatureDefinition.version == version) if version is not None else q.order_by(
            FeatureDefinition.version.desc()
        )
        with self._db.session() as s:
            row = s.scalars(q.limit(1)).first()
            return None if row is None else self._entry(row, s).definition()

    def _entry(self, row: FeatureDefinition, s, tags: dict[str, str] | None = None) -> CatalogEntry:
        if tags is None:
            tags = dict(
                s.execute(
                    sa.select(FeatureDefinitionTag.key, FeatureDefinitionTag.value).where(
                        FeatureDefinitionTag.definition_id == row.id
                    )
                ).all()
            )
        return CatalogEntry(row.kind, row.name, row.version, row.description, tags, row.owner, row.created_at,
                            row.spec)

    def list(self, kind: str | None = None, *, tags: Mapping[str, str] | None = None) -> list[CatalogEntry]:
        """The latest version of every definition, optionally of one kind and carrying all ``tags``."""
        if kind is not None and kind not in _KINDS:
            raise DefinitionError(f"unknown kind {kind!r}; use one of {', '.join(_KINDS)}")
        if tags is not None and (not isinstance(tags, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items())):
            raise DefinitionError(f"tags must be a dict of str to str, got {tags!r}")
        if tags and not all(_storable(k) and _storable(v) for k, v in tags.items()):
            return []  # no definition carries such a tag (tags are checked); PostgreSQL refused the query
        d = FeatureDefinition
        latest = (
            sa.select(d.kind, d.name, sa.func.max(d.version).label("version")).group_by(d.kind, d.name).subquery()
        )
        q = sa.select(d).join(
            latest, sa.and_(d.kind == latest.c.kind, d.name == latest.c.name, d.version == latest.c.version)
        )
        if kind is not None:
            q = q.where(d.kind == kind)
        for key, value in (tags or {}).items():
            t = aliased(FeatureDefinitionTag)
            q = q.join(t, sa.and_(t.definition_id == d.id, t.key == key, t.value == value))
        q = q.order_by(d.kind, d.name)
        with self._db.session() as s:
            rows = s.scalars(q).all()
            all_tags: dict[int, dict[str, str]] = {r.id: {} for r in rows}
            if rows:
                for def_id, k, v in s.execute(
                    sa.select(FeatureDefinitionTag.definition_id, FeatureDefinitionTag.key, FeatureDefinitionTag.value)
                    .where(FeatureDefinitionTag.definition_id.in_(list(all_tags)))
                ):
                    all_tags[def_id][k] = v
            return [self._entry(r, s, all_tags[r.id]) for r in rows]

    def versions(self, kind: str, name: str) -> list[CatalogEntry]:
        """Every stored version of one definition, oldest first."""
        if self._get_or_none(kind, name, None) is None:
            self.get(kind, name)  # NotFoundError with suggestions; DefinitionError for a name of a wrong type
        with self._db.session() as s:
            rows = s.scalars(
                sa.select(FeatureDefinition)
                .where(FeatureDefinition.kind == kind, FeatureDefinition.name == name)
                .order_by(FeatureDefinition.version)
            ).all()
            return [self._entry(r, s) for r in rows]

    def search(
        self, text: str | None = None, *, tags: Mapping[str, str] | None = None, kind: str | None = None
    ) -> list[CatalogEntry]:
        """Latest definitions whose name, description, feature names or tags contain ``text`` (any case)."""
        entries = self.list(kind, tags=tags)
        if not text:
            return entries
        needle = text.lower()

        def haystack(e: CatalogEntry) -> str:
            parts = [e.name, e.description, *e.tags.keys(), *e.tags.values()]
            for f in e.spec.get("schema", []):
                parts += [f["name"], f.get("description")]
            parts += e.spec.get("features", [])
            return "\n".join(map(_stored_text, parts)).lower()  # rows stored long ago may hold None or numbers

        return [e for e in entries if needle in haystack(e)]
