"""Is the platform being used? Answers from the database alone.

* runs per ISO week;
* the share of runs that logged an input and recorded a git commit;
* the share of production models with complete lineage (a logged input with
  feature references, a git commit, and an approval on record);
* per model, the time from its first run to its first production promotion;
* feature views used by more than one registered model.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..db.models import ModelTransition, ModelVersion, RegisteredModel, Run, RunInput, RunTag

__all__ = ["adoption_metrics"]


def _view_of(ref: str) -> str:
    return ref.partition(":")[0].partition("@")[0]


def adoption_metrics(db) -> dict[str, Any]:
    with db.connect() as conn:
        runs = conn.execute(sa.select(Run.id, Run.start_time)).all()
        with_commit = set(conn.scalars(sa.select(RunTag.run_id).where(RunTag.key == "mlplat.git.commit",
                                                                      RunTag.value != "")))
        inputs = defaultdict(list)
        for run_id, refs in conn.execute(sa.select(RunInput.run_id, RunInput.feature_refs)):
            inputs[run_id].append(refs or {})
        with_input = set(inputs)
        versions = conn.execute(sa.select(RegisteredModel.name, ModelVersion.id, ModelVersion.version,
                                          ModelVersion.run_id, ModelVersion.stage)
                                .join(ModelVersion, ModelVersion.model_id == RegisteredModel.id)).all()
        promotions = conn.execute(sa.select(ModelTransition.version_id, ModelTransition.at,
                                            ModelTransition.approved_by)
                                  .where(ModelTransition.to_stage == "production")).all()
    start = {r.id: r.start_time for r in runs}
    weeks: dict[str, int] = defaultdict(int)
    for r in runs:
        iso = r.start_time.isocalendar()
        weeks[f"{iso.year}-W{iso.week:02d}"] += 1
    approved = {p.version_id for p in promotions if p.approved_by}
    first_promotion: dict[int, datetime] = {}
    for p in promotions:
        if p.version_id not in first_promotion or p.at < first_promotion[p.version_id]:
            first_promotion[p.version_id] = p.at
    production, complete = [], []
    model_runs: dict[str, list[datetime]] = defaultdict(list)
    model_prod: dict[str, datetime] = {}
    view_models: dict[str, set[str]] = defaultdict(set)
    for v in versions:
        if v.run_id in start:
            model_runs[v.name].append(start[v.run_id])
        if v.id in first_promotion:
            at = first_promotion[v.id]
            model_prod[v.name] = min(at, model_prod.get(v.name, at))
        for info in inputs.get(v.run_id, []):
            for ref in info.get("refs", []):
                view_models[_view_of(ref)].add(v.name)
        if v.stage == "production":
            production.append(v.name)
            has_refs = any(info.get("refs") for info in inputs.get(v.run_id, []))
            if has_refs and v.run_id in with_commit and v.id in approved:
                complete.append(v.name)
    to_production = {}
    for name, at in model_prod.items():
        first = min(model_runs.get(name, [at]))
        to_production[name] = {"first_run": first.isoformat(), "production": at.isoformat(),
                               "days": round((at - first).total_seconds() / 86_400, 3)}
    total = len(runs)
    return {
        "runs": total,
        "runs_per_week": dict(sorted(weeks.items())),
        "share_runs_with_input_and_commit": (sum(1 for r in runs if r.id in with_input and r.id in with_commit)
                                             / total if total else None),
        "production_models": len(production),
        "share_production_with_complete_lineage": len(complete) / len(production) if production else None,
        "incomplete_lineage": sorted(set(production) - set(complete)),
        "time_to_production": to_production,
        "reused_feature_views": {v: sorted(m) for v, m in sorted(view_models.items()) if len(m) > 1},
    }
