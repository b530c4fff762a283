"""``p.monitoring``: training-serving skew, drift, platform adoption."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from ..errors import NotFoundError
from ..models.lineage import rebuild_input
from .adoption import adoption_metrics
from .drift import DriftReport, drift_check
from .skew import SkewReport, skew_check

__all__ = ["Monitoring"]


class Monitoring:
    """Checks over what was served. Reach it as ``Platform(...).monitoring``."""

    def __init__(self, platform: Any) -> None:
        self._p = platform

    def skew(self, model_or_view: str, *, since: datetime | None = None, sample: int | None = None,
             tolerance: float = 0.01, threshold: float = 0.05) -> SkewReport:
        """Served vs recomputed feature values for a model's served-feature log (or every model serving a view).

        Usage::

            report = p.monitoring.skew("fraud", since=yesterday, sample=10_000)
            report.skewed          # features whose mismatch share exceeds threshold
            report.mismatches[:5]  # entity, request time, served, recomputed
        """
        log = self._p.serving.served_log
        log.flush()
        models = [model_or_view] if (log.root / model_or_view).exists() else self._models_serving(model_or_view)
        if not models:
            raise NotFoundError(f"no served features are logged for a model or view named {model_or_view!r}")
        reports = []
        for model in models:
            refs, keys = log.refs(model)
            only = None if model == model_or_view else [r.partition(":")[2] for r in refs
                                                        if r.partition("@")[0] == model_or_view]
            reports.append(skew_check(self._p.features, log.read(model), refs, keys, model=model, since=since,
                                      sample=sample, tolerance=tolerance, threshold=threshold, only=only))
        if len(reports) == 1:
            return reports[0]
        merged = SkewReport(model_or_view, sum(r.rows for r in reports), tolerance, threshold)
        for r in reports:
            for name, s in r.features.items():
                merged.features[f"{r.model}:{name}"] = s
            merged.mismatches += r.mismatches
        return merged

    def _models_serving(self, view: str) -> list[str]:
        log = self._p.serving.served_log
        if not log.root.exists():
            return []
        return [d.name for d in sorted(log.root.iterdir())
                if d.is_dir() and any(r.partition("@")[0] == view for r in log.refs(d.name)[0])]

    def drift(self, model: str, *, version: int | None = None, since: datetime | None = None, bins: int = 10,
              psi_threshold: float = 0.2, alpha: float = 0.01) -> DriftReport:
        """Training data of a model version (default: production) against its served features."""
        info = (self._p.models.get(model, version=version) if version is not None
                else self._p.models.get(model, stage="production"))
        run = self._p.runs.get(info.run_id)
        inp = next((i for i in run.inputs if i["feature_refs"].get("entity_rows")), None)
        training = rebuild_input(self._p.features, self._p.artifacts, run.id, inp) if inp else None
        if training is None:
            raise NotFoundError(f"{model} v{info.version} was trained on no input logged with feature_refs: "
                                "nothing to compare the served features with")
        served = self._p.serving.served_features(model, since)
        if served.num_rows:
            served = served.filter(served.column("model_version").to_numpy() == info.version)
        names = [r.partition(":")[2] for r in inp["feature_refs"]["refs"]]
        return drift_check(training, served, names, model=model, version=info.version, bins=bins,
                           psi_threshold=psi_threshold, alpha=alpha)

    def adoption(self) -> dict[str, Any]:
        """Runs per week, tracking and lineage coverage, time to production, reused feature views."""
        return adoption_metrics(self._p.db)
