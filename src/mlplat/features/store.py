"""``p.features``: the feature store's public face.

It delegates: definitions to :class:`~mlplat.features.catalog.Catalog`,
point-in-time retrieval to :mod:`mlplat.features.offline`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from .. import _arrow
from ..db import Database
from ..errors import DataError, DefinitionError
from ..settings import Settings
from .catalog import ApplyResult, Catalog, CatalogEntry
from .definitions import Entity, FeatureService, FeatureView, _Definition, parse_ref
from .materialize import Materializer, MaterializeResult
from .offline import ViewRequest, historical_features
from .online import OnlineStore, open_online_store
from .online_read import OnlineReader, OnlineResponse

__all__ = ["FeatureStore"]


class FeatureStore:
    """Define, discover and retrieve features. Reach it as ``Platform(...).features``."""

    def __init__(self, db: Database, settings: Settings,
                 in_use: Callable[[], Iterable[tuple[str, int]]] = tuple) -> None:
        """``in_use``: the (view, version) pairs that models in service read (the platform asks its registry),
        which :meth:`materialize` keeps fresh by default besides each view's latest version."""
        self._settings = settings
        self.catalog = Catalog(db, settings.threads)
        self._online: OnlineStore | None = None
        self._online_lock = threading.Lock()  # threads racing on first use open one store, not one each
        self._reader = OnlineReader(self._online_store, self.resolve)
        self._materializer = Materializer(db, self.catalog, self._online_store, settings.threads, in_use)

    def _online_store(self) -> OnlineStore:
        store = self._online
        if store is None:
            with self._online_lock:
                if self._online is None:
                    self._online = open_online_store(self._settings.online_store)
                store = self._online
        return store

    @property
    def online_store(self) -> OnlineStore:
        """The online store (opened on first use) from ``online_store=`` / MLPLAT_ONLINE_STORE."""
        return self._online_store()

    def close(self) -> None:
        """Close the online store's connections (a later use opens it again)."""
        with self._online_lock:
            store, self._online = self._online, None
        if store is not None:
            store.close()

    # ------------------------------------------------------------ definitions
    def apply(self, objects: Iterable[_Definition] | _Definition) -> list[ApplyResult]:
        """Store definitions; unchanged ones keep their version, changed ones get the next.

        Every view is checked against its source first (columns present, types
        readable as declared); nothing is stored unless all pass.

        Usage::

            p.features.apply([user, txn])   # -> [ApplyResult('entity', 'user', 1, True), ...]
        """
        results = self.catalog.apply(objects)
        self._reader.invalidate()
        return results

    def get_entity(self, name: str, version: int | None = None) -> Entity:
        """An applied entity (latest version unless ``version`` is given)."""
        return self.catalog.get("entity", name, version)  # type: ignore[return-value]

    def get_feature_view(self, name: str, version: int | None = None) -> FeatureView:
        """An applied feature view (latest version unless ``version`` is given)."""
        return self.catalog.get("feature_view", name, version)  # type: ignore[return-value]

    def get_feature_service(self, name: str, version: int | None = None) -> FeatureService:
        """An applied feature service (latest version unless ``version`` is given)."""
        return self.catalog.get("feature_service", name, version)  # type: ignore[return-value]

    def list(self, kind: str | None = None, *, tags: Mapping[str, str] | None = None) -> list[CatalogEntry]:
        """Latest definitions, of one ``kind`` ("entity", "feature_view", "feature_service") and ``tags``."""
        return self.catalog.list(kind, tags=tags)

    def search(
        self, text: str | None = None, *, tags: Mapping[str, str] | None = None, kind: str | None = None
    ) -> list[CatalogEntry]:
        """Latest definitions matching ``text`` in name, description, feature names or tags."""
        return self.catalog.search(text, tags=tags, kind=kind)

    def versions(self, kind: str, name: str) -> list[CatalogEntry]:
        """All versions of one definition, oldest first."""
        return self.catalog.versions(kind, name)

    # -------------------------------------------------------------- retrieval
    def get_historical_features(
        self,
        entity_df: Any,
        features: Sequence[str] | FeatureService,
        *,
        timestamp_column: str = "event_timestamp",
        full_feature_names: bool = False,
    ) -> pa.Table:
        """A point-in-time correct training set.

        Every row of ``entity_df`` (pandas, pyarrow or polars) comes back once, in
        order, with all its columns, followed by the features in the order asked
        for. A view's value for a row with keys k at time t comes from the
        source row with keys k and the greatest event time e with
        ``t - ttl <= e <= t`` (ties: greatest created time, then the row read
        last); no such row gives nulls.

        Usage::

            train = p.features.get_historical_features(
                entity_df, ["user_txn:txn_count_7d", "user_txn:amount_sum_7d"])
        """
        table = _arrow.to_table(entity_df, "entity_df")
        requests, order = self.resolve(features, full_feature_names=full_feature_names)
        return historical_features(
            table, requests, order, timestamp_column=timestamp_column, threads=self._settings.threads
        )

    # ----------------------------------------------------------------- online
    def get_online_features(
        self,
        features: Sequence[str] | FeatureService,
        entity_rows: Any,
        *,
        full_feature_names: bool = False,
    ) -> OnlineResponse:
        """Feature values for entity rows from the online store, in one round trip.

        ``entity_rows`` is a list of dicts, a dict of columns, or a pandas/pyarrow
        table holding the join keys. The result maps each join key and feature
        to a list with one entry per entity row (a dict with ``to_arrow()`` and
        ``to_pandas()``). An unknown entity, or a value older than the view's ttl
        (relative to now), gives None. Duplicate entity rows are fetched once.

        Usage::

            p.features.get_online_features(["user_txn:txn_count_7d"], [{"user_id": 42}])
            # -> {"user_id": [42], "txn_count_7d": [7]}
        """
        return self._reader.read(features, entity_rows, full_feature_names=full_feature_names)

    def materialize(
        self,
        end_date: datetime | None = None,
        start_date: datetime | None = None,
        views: Sequence[str] | None = None,
        *,
        progress: bool | None = None,
    ) -> list[MaterializeResult]:
        """Write, per entity, the row the offline rule picks at ``end_date`` (default now) online.

        Without ``start_date`` each view continues from where its last
        materialization into this online store ended, so re-running changes
        nothing; an older row never overwrites a newer one (the store compares
        them itself). ``views`` limits it to some views (default: the latest version of every view
        applied with ``online=True``, and every online version a model in staging or production, or
        with an alias, was trained on: what predict reads for it; ``"name@3"`` materializes definition
        version 3). A progress bar shows on a terminal.

        Usage::

            p.features.materialize()                       # up to now, incrementally
            p.features.materialize(end_date=datetime(2026, 3, 1, tzinfo=timezone.utc), views=["user_txn"])
        """
        return self._materializer.materialize(end_date, start_date, views, progress=progress)

    def last_materialized(self, view: str, version: int | None = None) -> datetime | None:
        """Where the last materialization of a view (latest version unless given) into this store ended."""
        return self._materializer.last_end(self.catalog.get("feature_view", view, version))

    def push(self, view: str, rows: Any, *, to_offline: bool = False) -> int:
        """Write fresh rows of a view to the online store; returns how many the store took.

        ``rows`` (list of dicts, dict of columns, pandas/pyarrow table) holds the
        join keys, the event timestamp and every feature; an older row never
        overwrites a newer one. ``to_offline=True`` also appends them to the
        view's Parquet source (``<source>/pushed/``), so training sees them too.

        Usage::

            p.features.push("user_txn", [{"user_id": 42, "event_timestamp": now, "txn_count_7d": 8, ...}])
        """
        return self._materializer.push(view, rows, to_offline=to_offline)

    def resolve(
        self, features: Sequence[str] | FeatureService | str, *, full_feature_names: bool = False
    ) -> tuple[list[ViewRequest], list[str]]:
        """Feature references -> per-view requests and the output column names in order."""
        if isinstance(features, FeatureService):
            refs = features.features
        elif isinstance(features, (str, bytes)) or not isinstance(features, Iterable):
            raise DefinitionError(f"features must be a list of 'view:feature' references or a FeatureService, got "
                                  f"{type(features).__name__} {features!r:.100}")
        else:
            refs = list(features)
        if not refs:
            raise DefinitionError("no features asked for")
        by_view: dict[tuple[str, int | None], ViewRequest] = {}
        order: list[str] = []
        origin: dict[str, str] = {}
        for raw in refs:
            ref = parse_ref(raw)
            key = (ref.view, ref.version)
            if key not in by_view:
                by_view[key] = ViewRequest(self.catalog.get("feature_view", ref.view, ref.version), [], [])
            req = by_view[key]
            req.view.field(ref.feature)  # NotFoundError names an unknown feature
            name = ref.column(full_feature_names)
            if name in origin:
                if origin[name] == str(ref):
                    raise DataError(f"feature {str(ref)!r} is asked for twice")
                fix = ("ask for one version of the view per call (the columns would carry the same name)"
                       if full_feature_names else "pass full_feature_names=True to name them view__feature")
                raise DataError(f"{origin[name]!r} and {str(ref)!r} both give a column {name!r}; {fix}")
            origin[name] = str(ref)
            req.features.append(ref.feature)
            req.output_names.append(name)
            order.append(name)
        return list(by_view.values()), order
