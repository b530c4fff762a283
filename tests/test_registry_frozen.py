"""A registered model version's artifact is frozen: the run cannot log over it, its sha256 is recorded at
registration and checked where it is loaded; and the distinct-approver rule sees through every invisible
(default-ignorable) character. On SQLite and PostgreSQL."""
from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

import mlplat as mp
from mlplat.db.models import ModelVersion, RunArtifact
from mlplat.models.registry import _person_key


class Scorer(torch.nn.Module):
    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.linear.weight.fill_(weight)
            self.linear.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


X = torch.ones(1, 3)


@pytest.fixture
def p(platform):
    return platform


def _files(p, run_id: str, name: str) -> dict[str, bytes]:
    """Every stored file of an artifact (a folder or a file), by relative name, with its bytes."""
    root = Path(p.artifacts.path(run_id, name))
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _row(p, run_id: str, name: str):
    with p.db.connect() as conn:
        return conn.execute(sa.select(RunArtifact.kind, RunArtifact.size, RunArtifact.sha256, RunArtifact.meta)
                            .where(RunArtifact.run_id == run_id, RunArtifact.path == name)).first()


def _approved(p, name: str = "fraud", artifact: str = "model") -> str:
    """A run whose model is registered as ``name`` v1 and approved for production; its id."""
    with p.runs.start(name) as run:
        run.log_model(Scorer(0.5), artifact, example_input=torch.zeros(2, 3))
    v = p.models.register(name, run_id=run.id, artifact=artifact, registered_by="dana")
    p.models.promote(name, v.version, "production", approved_by="alice", notes="reviewed")
    return run.id


def test_logging_over_a_registered_model_is_refused_and_changes_nothing(p, tmp_path):
    run_id = _approved(p)
    files, row = _files(p, run_id, "model"), _row(p, run_id, "model")
    output = p.models.load("fraud", stage="production")(X).item()
    sha = p.models.lineage("fraud")["artifact"]["sha256"]
    file = tmp_path / "x.txt"
    file.write_text("not a model")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.pt").write_text("not weights either")

    resumed = p.runs.resume(run_id)  # anyone may resume a finished run
    with pytest.raises(mp.DataError, match=r"log_model: artifact 'model' of run \w+ is registered as model 'fraud' "
                                           r"v1; .*nothing was written: log the new files under another name, or "
                                           r"in a new run, and register that"):
        resumed.log_model(Scorer(100.0), "model", example_input=torch.zeros(2, 3))
    with pytest.raises(mp.DataError, match="log_artifact: artifact 'model' of run .* registered as model 'fraud' v1"):
        resumed.log_artifact(file, name="model")
    with pytest.raises(mp.DataError, match="log_artifact: artifact 'model' of run .* registered as model 'fraud' v1"):
        resumed.log_artifact(folder, name="model")
    with pytest.raises(mp.DataError, match="'model/model.ts' of run .* lies inside artifact 'model', which is "
                                           "registered as model 'fraud' v1"):
        resumed.log_artifact(file, name="model/model.ts")  # one file of the registered folder
    with pytest.raises(mp.DataError, match="'model/extra.txt' of run .* lies inside artifact 'model'"):
        resumed.log_artifact(file, name="model/extra.txt")  # a file added to it

    assert _files(p, run_id, "model") == files and _row(p, run_id, "model") == row
    assert p.models.load("fraud", stage="production")(X).item() == output
    assert p.models.lineage("fraud")["artifact"]["sha256"] == sha
    assert not Path(p.artifacts.path(run_id, "model/extra.txt")).exists()

    # another name is fine, and registers as a new version that needs its own approval
    resumed.log_model(Scorer(100.0), "model-2", example_input=torch.zeros(2, 3))
    resumed.end()
    v2 = p.models.register("fraud", run_id=run_id, artifact="model-2", registered_by="dana")
    assert (v2.version, p.models.get("fraud", stage="production").version) == (2, 1)
    assert p.models.load("fraud", version=2)(X).item() == pytest.approx(300.0)
    assert p.models.load("fraud", stage="production")(X).item() == output


def test_a_folder_holding_a_registered_artifact_and_names_beside_it(p, tmp_path):
    run_id = _approved(p, artifact="models/fraud")
    files = _files(p, run_id, "models/fraud")
    folder = tmp_path / "folder"
    folder.mkdir()
    file = folder / "x.txt"
    file.write_text("x")
    resumed = p.runs.resume(run_id)
    with pytest.raises(mp.DataError, match="'models' of run .* holds artifact 'models/fraud', which is registered as "
                                           "model 'fraud' v1"):
        resumed.log_artifact(folder, name="models")  # would replace the folder the model is in
    assert _files(p, run_id, "models/fraud") == files
    # names that only start alike, and artifacts no version points to, are logged (and re-logged) as before
    for name in ("models/fraud-notes.txt", "models/fraudster", "notes.txt", "notes.txt"):
        assert resumed.log_artifact(file, name=name) == name
    resumed.log_model(Scorer(2.0), "candidate", example_input=torch.zeros(2, 3))
    resumed.log_model(Scorer(3.0), "candidate", example_input=torch.zeros(2, 3))
    resumed.end()
    assert p.models.load("fraud", stage="production")(X).item() == pytest.approx(1.5)


def test_registration_records_the_sha256_and_load_refuses_files_changed_after_it(p):
    run_id = _approved(p)
    row = _row(p, run_id, "model")
    info = p.models.get("fraud", stage="production")
    assert info.artifact_sha256 == row.sha256 and len(row.sha256) == 64
    lineage = p.models.lineage("fraud", verify=True)["artifact"]
    assert (lineage["sha256"], lineage["registered_sha256"], lineage["matches_registration"]) == \
        (row.sha256, row.sha256, True)
    assert lineage["verification"] == {"checked": True, "matches": True, "recomputed_hash": row.sha256}

    # the stored weights changed out of band (the store edited by hand, a sync gone wrong)
    weights = sorted(Path(p.artifacts.path(run_id, "model")).rglob("*"))
    target = next(f for f in weights if f.is_file() and f.name.endswith((".ts", ".pt")))
    original = target.read_bytes()
    target.write_bytes(original + b"\0")
    with pytest.raises(mp.StoreError, match=r"model 'fraud' v1: artifact 'model' of run \w+ changed after "
                                            r"registration \(its files have sha256 .*registered "
                                            rf"{row.sha256[:16]}\.\.\.\).*register the run's current artifact as a "
                                            r"new version"):
        p.models.load("fraud", stage="production")
    repository = Path(p.artifacts.path(run_id)).parent / "triton"
    with pytest.raises(mp.StoreError, match="changed after registration"):  # nor exported for a server
        p.serving.export_triton("fraud", repository=repository, stage="production")
    assert not repository.exists()
    lineage = p.models.lineage("fraud", verify=True)["artifact"]
    assert lineage["verification"]["matches"] is False and lineage["verification"]["recomputed_hash"] != row.sha256
    target.write_bytes(original)
    assert p.models.load("fraud", stage="production")(X).item() == pytest.approx(1.5)


def test_a_record_changed_after_registration_is_refused_by_serving_and_flagged_by_lineage(p):
    run_id = _approved(p)
    registered = _row(p, run_id, "model").sha256
    with p.db.connect(write=True) as conn:  # as a log_model racing the registration would have left it
        conn.execute(sa.update(RunArtifact).where(RunArtifact.run_id == run_id, RunArtifact.path == "model")
                     .values(sha256="0" * 64))
    info = p.models.get("fraud", stage="production")
    with pytest.raises(mp.StoreError, match="changed after registration \\(its record has sha256 0000"):
        p.models.artifact_meta(info)  # what predict and export read the model's columns and fill rule from
    artifact = p.models.lineage("fraud")["artifact"]
    assert (artifact["sha256"], artifact["registered_sha256"], artifact["matches_registration"]) == \
        ("0" * 64, registered, False)


def test_versions_registered_before_get_the_sha256_their_artifact_row_holds(p):
    from alembic import command

    from mlplat.db.migrate import alembic_config, ensure_schema

    run_id = _approved(p)
    with p.runs.start("other") as run:
        run.log_model(Scorer(1.0), "model", example_input=torch.zeros(2, 3))
    p.models.register("other", run_id=run.id, registered_by="dana")
    sha = _row(p, run_id, "model").sha256
    with p.db.connect(write=True) as conn:
        command.downgrade(alembic_config(conn), "0005_model_policy_changes")
        conn.execute(sa.text("DELETE FROM run_artifacts WHERE run_id = :r"), {"r": run.id})  # a row long gone
    ensure_schema(p.db)
    with p.db.connect() as conn:
        assert dict(conn.execute(sa.select(ModelVersion.run_id, ModelVersion.artifact_sha256)).all()) == \
            {run_id: sha, run.id: None}
    assert p.models.get("fraud", version=1).artifact_sha256 == sha
    assert p.models.load("other", version=1)(X).item() == pytest.approx(3.0)  # unknown: not checked
    lineage = p.models.lineage("other", version=1, verify=True)["artifact"]
    assert lineage["matches_registration"] is None and lineage["verification"]["checked"] is False
    with pytest.raises(mp.DataError, match="registered as model 'fraud' v1"):
        p.runs.resume(run_id).log_model(Scorer(9.0), "model", example_input=torch.zeros(2, 3))


INVISIBLE = ["\u00ad", "\u034f", "\u061c", "\u115f", "\u1160", "\u17b4", "\u180b", "\u180e", "\u180f", "\u200b",
             "\u200d", "\u202e", "\u2060", "\u2066", "\u3164", "\ufe0f", "\ufeff", "\uffa0", "\U0001bca0",
             "\U0001d173", "\U000e0001", "\U000e0041", "\U000e0100"]


@pytest.mark.parametrize("ch", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_names_are_compared_ignoring_every_default_ignorable_character(ch):
    assert _person_key(f"dan{ch}a") == _person_key("dana") == _person_key(f"{ch}Dana{ch}")


def test_a_dropped_character_does_not_keep_an_accent_apart_and_visible_differences_count():
    assert _person_key("rene\u034f\u0301") == _person_key("ren\u00e9") == _person_key("RENE\u0301")
    for other in ("danb", "dana\u0301", "d\u0430na"):  # another letter, an accent, a Cyrillic a
        assert _person_key(other) != _person_key("dana")


def test_the_distinct_approver_rule_refuses_the_registrant_hidden_by_any_invisible_character(p):
    with p.runs.start("fraud") as run:
        run.log_model(Scorer(), "model", example_input=torch.zeros(2, 3))
    p.models.create("fraud", require_distinct_approver=True)
    v = p.models.register("fraud", run_id=run.id, registered_by="dana")
    for ch in ("\u034f", "\ufe0f", "\u3164", "\u115f", "\uffa0", "\U000e0061"):
        with pytest.raises(mp.DataError, match="requires an approver other than the registrant"):
            p.models.promote("fraud", v.version, "production", approved_by=f"dan{ch}a")
    assert p.models.get("fraud", version=v.version).stage == "none"
    assert [t.to_stage for t in p.models.history("fraud")] == ["none"]
    p.models.promote("fraud", v.version, "production", approved_by="alice")
