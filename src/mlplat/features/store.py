"""``p.features``: the feature store's public face.

It delegates: definitions to :class:`~mlplat.features.catalog.Catalog`,
point-in-time retrieval to :mod:`mlplat.features.offline`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from .. import _arrow
from ..db import Database
from ..errors import DataError, DefinitionError
from ..settings import Settings
from .catalog import ApplyResult, Catalog, CatalogEntry
from .definitions import Entity, FeatureService, FeatureView, _Definition, parse_ref
from .offline import ViewRequest, historical_features

__all__ = ["FeatureStore"]


class FeatureStore:
    """Define, discover and retrieve features. Reach it as ``Platform(...).features``."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self._settings = settings
        self.catalog = Catalog(db, settings.threads)

    # ------------------------------------------------------------ definitions
    def apply(self, objects: Iterable[_Definition] | _Definition) -> list[ApplyResult]:
        """Store definitions; unchanged ones keep their version, changed ones get the next.

        Every view is checked against its source first (columns present, types
        readable as declared); nothing is stored unless all pass.

        Usage::

            p.features.apply([user, txn])   # -> [ApplyResult('entity', 'user', 1, True), ...]
        """
        return self.catalog.apply(objects)

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

    def resolve(
        self, features: Sequence[str] | FeatureService | str, *, full_feature_names: bool = False
    ) -> tuple[list[ViewRequest], list[str]]:
        """Feature references -> per-view requests and the output column names in order."""
        if isinstance(features, FeatureService):
            refs = features.features
        elif isinstance(features, str):
            raise DefinitionError("features must be a list of 'view:feature' references or a FeatureService")
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
            name = f"{ref.view}__{ref.feature}" if full_feature_names else ref.feature
            if name in origin:
                if origin[name] == str(ref):
                    raise DataError(f"feature {str(ref)!r} is asked for twice")
                raise DataError(
                    f"{origin[name]!r} and {str(ref)!r} both give a column {name!r}; "
                    "pass full_feature_names=True to name them view__feature"
                )
            origin[name] = str(ref)
            req.features.append(ref.feature)
            req.output_names.append(name)
            order.append(name)
        return list(by_view.values()), order
