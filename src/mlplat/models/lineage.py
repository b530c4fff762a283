"""Lineage: which model version is this, and what was it trained on, in one dict.

``verify=True`` rebuilds every input that was logged with feature references:
it reads the kept entity rows, retrieves the same features at the pinned
definition versions from the offline store, hashes the result the same way
``log_input`` did, and says whether it still matches; it also hashes the model
artifact's stored files and compares them with the sha256 registered.

The artifact entry always says whether its record still holds the sha256
registered (``matches_registration``: None where none was recorded).
"""
from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import MlplatError, StoreError
from ..runs.artifacts import ArtifactStore, folder_sha256
from ..runs.datahash import table_hash
from ..runs.tracking import RunStore

__all__ = ["build_lineage", "rebuild_input", "verify_input", "verify_artifact"]


def build_lineage(registry, runs: RunStore, features, artifacts: ArtifactStore, info, *,
                  verify: bool = False) -> dict[str, Any]:
    run = runs.get(info.run_id)
    history = registry.history(info.name, version=info.version)
    approvals = [{"stage": t.to_stage, "approved_by": t.approved_by, "by": t.actor, "at": t.at.isoformat(),
                  "notes": t.notes} for t in history if t.to_stage == "production" and t.approved_by]
    data, later = [], []
    for inp in run.inputs:
        refs = inp["feature_refs"].get("refs", [])
        views: dict[str, list[int]] = {}  # every version used: an input may take features of two versions
        for ref in refs:
            view, _, _ = ref.partition(":")
            view_name, _, view_version = view.partition("@")
            views.setdefault(view_name, []).append(int(view_version))
        views = {name: sorted(set(versions)) for name, versions in views.items()}
        entry = {"name": inp["name"], "content_hash": inp["content_hash"], "row_count": inp["row_count"],
                 "schema": inp["schema"], "feature_refs": refs, "feature_views": views,
                 "logged_at": inp["created_at"].isoformat()}
        if verify:
            entry["verification"] = verify_input(features, artifacts, run.id, inp)
        # an input a resumed run logged after the registration was not what this version was trained on
        (later if inp["created_at"] > info.created_at else data).append(entry)
    metrics, later_metrics = _metrics_at_registration(runs, run, info)
    return {
        "model": info.name,
        "version": info.version,
        "stage": info.stage,
        "aliases": list(info.aliases),
        "registered_by": info.registered_by,
        "registered_at": info.created_at.isoformat(),
        "artifact": _artifact(registry, artifacts, info, verify),
        "run": {"id": run.id, "name": run.name, "experiment": run.experiment, "status": run.status,
                "user": run.user, "start_time": run.start_time.isoformat(),
                "end_time": run.end_time.isoformat() if run.end_time else None,
                "entry_point": run.tags.get("mlplat.entry_point", "")},
        "git": {"commit": run.tags.get("mlplat.git.commit", ""), "dirty": run.tags.get("mlplat.git.dirty", "")},
        "params": run.params,
        "metrics": metrics,
        "metrics_after_registration": later_metrics,
        "data": data,
        "data_after_registration": later,
        "approvals": approvals,
        "policy": registry.policy(info.name),
        "history": [{"version": t.version, "from": t.from_stage, "to": t.to_stage, "by": t.actor,
                     "approved_by": t.approved_by, "notes": t.notes, "at": t.at.isoformat()} for t in history],
    }


def _metrics_at_registration(runs: RunStore, run, info) -> tuple[dict[str, float], dict[str, float]]:
    """(each metric's latest value when the version was registered, the latest value now of each metric logged
    again since). The latest is the point of greatest step, then time, then logged last, among the points
    stamped at or before the registration (by their ``timestamp_ms``); a metric first logged after it is only
    in the second dict. Only metrics whose latest point is newer than the registration read their history."""
    at_ms = int(info.created_at.timestamp() * 1000)
    then: dict[str, float] = {}
    since: dict[str, float] = {}
    for key, point in runs.latest_points(run.id).items():
        if point.timestamp_ms <= at_ms:
            then[key] = point.value
            continue
        since[key] = point.value
        before = [(p.step, p.timestamp_ms, i, p.value)
                  for i, p in enumerate(runs.metric_history(run.id, key)) if p.timestamp_ms <= at_ms]
        if before:
            then[key] = max(before)[3]
    return then, since


def _artifact(registry, artifacts: ArtifactStore, info, verify: bool) -> dict[str, Any]:
    """The artifact as recorded, with the sha256 registered and whether the record still holds it (a change
    after registration is reported here, not raised: lineage is where one looks into it)."""
    meta = registry.artifact_meta(info, check=False)
    entry = {"path": info.artifact, **meta, "registered_sha256": info.artifact_sha256,
             "matches_registration": (None if info.artifact_sha256 is None
                                      else meta.get("sha256") == info.artifact_sha256)}
    if verify:
        entry["verification"] = verify_artifact(artifacts, info)
    return entry


def verify_artifact(artifacts: ArtifactStore, info) -> dict[str, Any]:
    """Hash the version's stored artifact files and compare with the sha256 registered."""
    if info.artifact_sha256 is None:
        return {"checked": False, "reason": "registered before mlplat recorded the artifact's sha256"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = artifacts.get_dir(info.run_id, info.artifact, Path(tmp) / "model")
        except StoreError as exc:
            return {"checked": True, "matches": False, "reason": f"could not read the files: {exc}"}
        recomputed = folder_sha256(folder)
    return {"checked": True, "matches": recomputed == info.artifact_sha256, "recomputed_hash": recomputed}


def rebuild_input(features, artifacts: ArtifactStore, run_id: str, inp: dict[str, Any]) -> pa.Table | None:
    """A logged input rebuilt from the offline store (kept entity rows + pinned refs); None if not kept."""
    info = inp["feature_refs"]
    if not info.get("refs") or not info.get("entity_rows"):
        return None
    with artifacts.open(run_id, info["entity_rows"]) as f:
        try:
            entity = pq.read_table(f)
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"run {run_id}: the kept entity rows {info['entity_rows']!r} cannot be read as "
                             f"Parquet ({exc}); the file was changed or cut short after it was logged") from None
    rebuilt = features.get_historical_features(
        entity, info["refs"], timestamp_column=info.get("timestamp_column", "event_timestamp"),
        full_feature_names=info.get("full_feature_names", False))
    return _as_logged(rebuilt, inp)


def _as_logged(rebuilt: pa.Table, inp: dict[str, Any]) -> pa.Table:
    """The rebuilt table in the logged table's column order and types: retrieval puts the entity columns
    first (a label appended after the features moved), and Parquet keeps no timestamp[s] (it reads back as
    [ms]). Inputs logged before mlplat kept the Arrow schema get the logged order only. A table that cannot
    take that layout is returned as rebuilt: its hash then differs, as its content does."""
    names = [f["name"] for f in (inp.get("schema") or {}).get("fields", [])]
    if sorted(names) != sorted(rebuilt.column_names):
        return rebuilt
    rebuilt = rebuilt.select(names)
    stored = inp["feature_refs"].get("arrow_schema")
    if stored is None:
        return rebuilt
    try:
        return rebuilt.cast(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(stored))))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        return rebuilt


def verify_input(features, artifacts: ArtifactStore, run_id: str, inp: dict[str, Any]) -> dict[str, Any]:
    """Rebuild one logged input from the offline store and compare hashes."""
    try:
        rebuilt = rebuild_input(features, artifacts, run_id, inp)
    except MlplatError as exc:
        return {"checked": True, "matches": False, "reason": f"could not rebuild: {exc}"}
    if rebuilt is None:
        refs = inp["feature_refs"].get("refs")
        kept = "with feature_refs but keep_entity_rows=False" if refs else "without feature_refs"
        return {"checked": False, "reason": f"logged {kept}: nothing to rebuild from"}
    recomputed = table_hash(rebuilt)
    return {"checked": True, "matches": recomputed == inp["content_hash"], "recomputed_hash": recomputed,
            "rows": rebuilt.num_rows}
