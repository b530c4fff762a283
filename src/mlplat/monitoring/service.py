"""``p.monitoring``: training-serving skew, drift, platform adoption."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import pyarrow as pa

from ..errors import NotFoundError
from ..models.lineage import rebuild_input
from .._checks import plain, require_number
from .._time import as_utc, utc_argument
from ..serving.served_log import check_log_name
from .adoption import adoption_metrics
from .drift import DriftReport, check_drift_limits, drift_check
from .skew import SkewReport, check_limits, merge_reports, skew_check

__all__ = ["Monitoring"]


class Monitoring:
    """Checks over what was served. Reach it as ``Platform(...).monitoring``."""

    def __init__(self, platform: Any) -> None:
        self._p = platform

    def skew(self, model_or_view: str, *, since: datetime | None = None, sample: int | None = None,
             tolerance: float = 0.01, threshold: float = 0.05) -> SkewReport:
        """Served vs recomputed feature values for a model's served-feature log (or every model serving a view,
        its features named ``model:feature`` even when one model serves it).

        Usage::

            report = p.monitoring.skew("fraud", since=yesterday, sample=10_000)
            report.skewed          # features whose mismatch share exceeds threshold
            report.mismatches[:5]  # entity, request time, served, recomputed
        """
        sample, tolerance, threshold = map(plain, (sample, tolerance, threshold))  # np.int64(100) too
        check_limits(tolerance, threshold)
        since = None if since is None else utc_argument("since", since)  # before any work, whatever the name
        if sample is not None:
            require_number("sample", sample, low=1, integer=True, meaning="a positive number of rows")
        check_log_name(model_or_view, "model_or_view")
        log = self._p.serving.served_log
        log.flush()
        by_model = (model_or_view,) if (log.root / model_or_view).is_dir() else self._models_serving(model_or_view)
        if not by_model:
            raise NotFoundError(f"no served features are logged for a model or view named {model_or_view!r}")
        # one group per set of pinned references: versions trained on other definitions are recomputed with theirs
        work = []
        for model in by_model:
            view = None if model == model_or_view else model_or_view  # by view: only that view's features
            for group in log.groups(model, since, features_only=True):  # a file predict did not write: StoreError
                if group.rows.num_rows and (view is None or any(r.partition("@")[0] == view for r in group.refs)):
                    work.append((model, group, view))
        total = sum(g.rows.num_rows for _, g, _ in work)
        if not total:
            raise NotFoundError(f"no served rows of {model_or_view!r}{_since(since)}: nothing to check")
        shares = [None] * len(work) if sample is None else _apportion(sample, [g.rows.num_rows for _, g, _ in work])
        reports = [skew_check(self._p.features, g.rows, g.refs, g.keys, model=model,
                              full_feature_names=g.full_feature_names, sample=share, tolerance=tolerance,
                              threshold=threshold, view=view)
                   for (model, g, view), share in zip(work, shares) if share != 0]
        return merge_reports(model_or_view, reports, prefix_model=model_or_view not in by_model)

    def _models_serving(self, view: str) -> tuple[str, ...]:
        log = self._p.serving.served_log
        if not log.root.exists():
            return ()
        return tuple(d.name for d in sorted(log.root.iterdir())
                     if d.is_dir() and any(r.partition("@")[0] == view for refs, _ in log.ref_sets(d.name)
                                           for r in refs))

    def drift(self, model: str, *, version: int | None = None, since: datetime | None = None, bins: int = 10,
              psi_threshold: float = 0.2, alpha: float = 0.01) -> DriftReport:
        """Training data of a model version (default: production) against what it was served: its features
        and the request-time inputs predict logged.

        Usage::

            report = p.monitoring.drift("fraud", since=last_week)
            report.drifted                      # e.g. ['amount']
            report.features["amount"].psi
        """
        bins, psi_threshold, alpha = map(plain, (bins, psi_threshold, alpha))
        check_drift_limits(bins, psi_threshold, alpha)
        since = None if since is None else utc_argument("since", since)  # before the training data is rebuilt
        info = self._p.models.resolve(model, version=version)
        run = self._p.runs.get(info.run_id)
        # the input predict serves the features of (the run's first logged with feature refs), not a later one
        inp = next((i for i in run.inputs if i["feature_refs"].get("refs")), None)
        if inp is None:
            raise NotFoundError(f"{model} v{info.version} was trained on no input logged with feature_refs: "
                                "nothing to compare the served features with")
        if not inp["feature_refs"].get("entity_rows"):
            raise NotFoundError(f"{model} v{info.version}'s training input {inp['name']!r} was logged with "
                                "keep_entity_rows=False: its training data cannot be rebuilt to compare the "
                                "served features with; log it with its entity rows kept (the default)")
        training = rebuild_input(self._p.features, self._p.artifacts, run.id, inp)
        served = self._p.serving.served_log.version_rows(model, info.version, since)
        if not served.num_rows:  # an empty window is not calm
            raise NotFoundError(f"no served features are logged for {model!r} v{info.version}{_since(since)}: "
                                "nothing to compare its training data with")
        # the features as the training table named them, which is how predict serves and logs them
        requests, names = self._p.features.resolve(
            inp["feature_refs"]["refs"], full_feature_names=bool(inp["feature_refs"].get("full_feature_names")))
        # and the version's request-time inputs (its input columns that are neither features nor join keys, which
        # predict logs as input.amount), where the training table has them: one served only as nulls is in the
        # report (drifted), where the inputs of other versions, null in this version's rows, are not
        keys = {k for req in requests for k in req.view.join_keys}
        columns = self._p.models.artifact_meta(info).get("columns") or names
        inputs = [c for c in columns if c not in names and c not in keys and c in training.column_names
                  and f"input.{c}" in served.column_names]
        # just those columns, under the training table's names: another version's feature may bear an input's name
        served = pa.table({**{n: served.column(n) for n in names if n in served.column_names},
                           **{c: served.column(f"input.{c}") for c in inputs}})
        return drift_check(training, served, [*names, *inputs], model=model, version=info.version, bins=bins,
                           psi_threshold=psi_threshold, alpha=alpha)

    def adoption(self) -> dict[str, Any]:
        """Runs per week, tracking and lineage coverage, time to production, reused feature views."""
        return adoption_metrics(self._p.db)


def _since(since: Any) -> str:
    """`` since <UTC time>`` for a message about rows read since then; empty without ``since``."""
    return f" since {as_utc(since).isoformat()}" if since is not None else ""


def _apportion(sample: int, sizes: list[int]) -> list[int]:
    """``sample`` rows split over groups of ``sizes`` rows in proportion (largest remainders), at most each
    group's size and ``sample`` in all.

    >>> _apportion(3, [200, 200]), _apportion(5, [1, 999]), _apportion(10, [3, 4])
    ([2, 1], [0, 5], [3, 4])
    """
    total = sum(sizes)
    if sample >= total:
        return list(sizes)
    shares = [sample * n // total for n in sizes]  # integers: float rounding could give more than sample
    by_remainder = sorted(range(len(sizes)), key=lambda i: -(sample * sizes[i] % total))
    for i in by_remainder[: sample - sum(shares)]:
        shares[i] += 1
    return shares
