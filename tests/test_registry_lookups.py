"""Registry answers that must hold on SQLite and PostgreSQL: which input a model was trained on, who counts as
the registrant, unknown versions, bad destinations and artifact names, and `lineage --verify`'s exit status."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import mlplat as mp
from mlplat.cli import CHECK_FAILED, cli
from test_registry import Scorer, trained_run


@pytest.fixture
def p(platform):
    return platform


@pytest.fixture
def two_inputs(p, tmp_path):
    """A run that logged 'train' (txn_count) and then 'eval' (amount), each with its feature refs."""
    src = tmp_path / "src"
    src.mkdir()
    ts = pa.timestamp("us", "UTC")
    pq.write_table(pa.table({"user_id": [1, 2], "event_timestamp": pa.array([0, 0], ts), "txn_count": [5, 6],
                             "amount": [1.0, 2.0]}), src / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView("user_txn", entities=[user], ttl=timedelta(days=1), source=mp.ParquetSource(src),
                          schema=[mp.Field("txn_count", mp.Int64), mp.Field("amount", mp.Float64)])
    p.features.apply([user, view])
    rows = pa.table({"user_id": [1, 2], "event_timestamp": pa.array([10, 10], ts)})
    with p.runs.start("fraud") as run:
        run.log_input(p.features.get_historical_features(rows, ["user_txn:txn_count"]), name="train",
                      feature_refs=["user_txn:txn_count"])
        run.log_input(p.features.get_historical_features(rows, ["user_txn:amount"]), name="eval",
                      feature_refs=["user_txn:amount"])
        run.log_model(Scorer(), "model", example_input=torch.zeros(1, 3))
    return src, run.id


def test_the_first_input_logged_is_the_training_data_whatever_its_name(p, two_inputs):
    """Inputs came back sorted by name, so 'eval' (logged second) was taken as what the model was trained on:
    predict would have served the model the wrong features."""
    _, run_id = two_inputs
    assert [i["name"] for i in p.runs.get(run_id).inputs] == ["train", "eval"]
    v = p.models.register("fraud", run_id)
    assert p.models.training_features(v) == (["user_txn@1:txn_count"], False)
    assert [d["name"] for d in p.models.lineage("fraud", version=1)["data"]] == ["train", "eval"]


def test_lineage_verify_exits_with_the_check_status_when_the_training_data_changed(p, two_inputs, database_url):
    src, run_id = two_inputs
    p.models.register("fraud", run_id)
    home = str(p.settings.home)
    args = ["--home", home, "--database-url", database_url, "models", "lineage", "fraud", "--version", "1"]
    runner = CliRunner()
    for extra in ([], ["--json"]):
        ok = runner.invoke(cli, [*args, "--verify", *extra], env={"COLUMNS": "200"})
        assert ok.exit_code == 0, ok.output
    pq.write_table(pa.table({"user_id": [2], "event_timestamp": pa.array([5], pa.timestamp("us", "UTC")),
                             "txn_count": [60], "amount": [9.0]}), src / "b.parquet")  # a backfill under the model
    for extra in ([], ["--json"]):
        changed = runner.invoke(cli, [*args, "--verify", *extra], env={"COLUMNS": "200"})
        assert changed.exit_code == CHECK_FAILED, changed.output
        assert ("MISMATCH" in changed.output) if not extra else ('"matches": false' in changed.output)
    assert runner.invoke(cli, args).exit_code == 0  # without --verify nothing is checked


def test_lineage_verify_reports_kept_entity_rows_that_are_no_longer_parquet(p, two_inputs, database_url):
    """A truncated entity_rows.parquet (a partial restore) was a raw ArrowInvalid from lineage(verify=True) and
    'unexpected ArrowInvalid ... a bug in mlplat' from the command line, not a failed check."""
    _, run_id = two_inputs
    p.models.register("fraud", run_id)
    kept = p.runs.get(run_id).inputs[0]["feature_refs"]["entity_rows"]
    path = Path(p.artifacts.path(run_id, kept))
    path.write_bytes(path.read_bytes()[:50])
    check = p.models.lineage("fraud", version=1, verify=True)["data"][0]["verification"]
    assert check["checked"] and not check["matches"]
    assert "cannot be read as Parquet" in check["reason"] and kept in check["reason"]
    result = CliRunner().invoke(cli, ["--home", str(p.settings.home), "--database-url", database_url, "models",
                                      "lineage", "fraud", "--version", "1", "--verify"], env={"COLUMNS": "200"})
    assert result.exit_code == CHECK_FAILED, result.output


@pytest.mark.parametrize("approver", ["DanaSmith", "dana smith", "Dana\u2800Smith", "D a n a S m i t h",
                                      "Dana\u3000Smith"])
def test_the_registrant_with_blanks_dropped_or_changed_is_still_the_registrant(p, approver):
    p.models.create("fraud", require_distinct_approver=True)
    p.models.register("fraud", trained_run(p), registered_by="Dana Smith")
    with pytest.raises(mp.DataError, match="names the same person"):
        p.models.promote("fraud", 1, "production", approved_by=approver)
    assert p.models.get("fraud", version=1).stage == "none" and len(p.models.history("fraud")) == 1
    assert p.models.promote("fraud", 1, "production", approved_by="Dan Smith").stage == "production"


def test_the_history_of_a_version_that_does_not_exist_is_not_found(p):
    p.models.register("fraud", trained_run(p))
    assert [t.to_stage for t in p.models.history("fraud", version=1)] == ["none"]
    with pytest.raises(mp.NotFoundError, match="model 'fraud' has no version 99"):
        p.models.history("fraud", version=99)  # was [], as for a version with no transitions


def test_an_artifact_name_no_database_stores_is_a_data_error_naming_it(p):
    run_id = trained_run(p)
    for name in ("\udcff", "model\x00"):
        with pytest.raises(mp.DataError, match="artifact name"):  # was a raw UnicodeEncodeError from the driver
            p.models.register("fraud", run_id, artifact=name)
    with pytest.raises(mp.NotFoundError):
        p.models.get("fraud")


@pytest.mark.parametrize("dest, message", [
    (None, "dest must be a folder path"), (1, "dest must be a folder path"), (b"/tmp/x", "dest must be a folder path"),
    ("", "dest must be a folder path"), ("/tmp/a\x00b", "NUL"),
])
def test_fetch_names_a_bad_destination(p, dest, message):
    info = p.models.register("fraud", trained_run(p))
    with pytest.raises(mp.DataError, match=message):
        p.models.fetch(info, dest)


def test_fetch_writes_into_a_new_or_empty_folder_only(p, tmp_path):
    info = p.models.register("fraud", trained_run(p))
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for dest, message in ((a_file, "is not a folder"), (busy, "holds files already")):
        with pytest.raises(mp.DataError, match=message):
            p.models.fetch(info, dest)
    assert a_file.read_text() == "mine" and os.listdir(busy) == ["notes.txt"]  # left as they were
    empty = tmp_path / "empty"
    empty.mkdir()
    for dest in (empty, tmp_path / "new" / "model"):
        folder = p.models.fetch(info, dest)
        assert Path(folder) == dest and any(Path(folder).iterdir())
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(mp.StoreError, match="cannot write model 'fraud' v1"):
            p.models.fetch(info, locked / "model")


@pytest.mark.parametrize("dest_exists", [False, True])
def test_a_refused_fetch_leaves_its_destination_as_it_was(p, tmp_path, dest_exists):
    """fetch copied into dest and then refused the files, leaving the unapproved files there for a deploy script
    that caught the error (and refusing a retry into that folder: 'holds files already')."""
    info = p.models.register("fraud", trained_run(p))
    stored = Path(p.artifacts.path(info.run_id, info.artifact))
    meta = stored / "mlmodel.json"
    kept = meta.read_text()
    meta.write_text(kept + " ")  # an edit after registration
    dest = tmp_path / "deploy" / "model"
    if dest_exists:
        dest.mkdir(parents=True)
    with pytest.raises(mp.StoreError, match="changed after registration"):
        p.models.fetch(info, dest)
    assert (sorted(os.listdir(dest)) == []) if dest_exists else not (tmp_path / "deploy").exists()
    meta.write_text(kept)
    assert p.models.fetch(info, dest) == dest
    assert "mlmodel.json" in os.listdir(dest) and not [n for n in os.listdir(dest) if n.startswith(".")]


def test_lineage_is_the_version_as_registered_whatever_the_run_logs_later(p, two_inputs, database_url):
    """A resumed run logging an input and val_auc after the registration changed what lineage said the version
    was trained on and approved with: the later input was listed first, and val_auc showed the later value."""
    _, run_id = two_inputs
    with p.runs.resume(run_id) as run:
        run.log_metric("val_auc", 0.91, step=3)
        run.log_metric("loss", 0.2, step=3)
    p.models.register("fraud", run_id)
    with p.runs.resume(run_id) as run:
        run.log_metric("val_auc", 0.5, step=4)
        run.log_metric("val_auc", 0.4, step=2)  # an earlier step: not the latest now or then
        run.log_metric("new_metric", 1.0)
        run.log_input(pa.table({"a": [1, 2]}), name="after_registration")
    info = p.models.lineage("fraud", version=1)
    assert info["metrics"] == {"val_auc": 0.91, "loss": 0.2}
    assert info["metrics_after_registration"] == {"val_auc": 0.5, "new_metric": 1.0}
    assert [d["name"] for d in info["data"]] == ["train", "eval"]
    assert [d["name"] for d in info["data_after_registration"]] == ["after_registration"]
    assert all(d["logged_at"] <= info["registered_at"] for d in info["data"])
    assert p.runs.get(run_id).metrics["val_auc"] == 0.5  # the run itself reports its latest, as before
    human = CliRunner().invoke(cli, ["--home", str(p.settings.home), "--database-url", database_url, "models",
                                     "lineage", "fraud", "--version", "1"], env={"COLUMNS": "200"})
    assert human.exit_code == 0, human.output
    assert "val_auc=0.91 (as registered)" in human.output and "val_auc=0.5" in human.output
    assert "after_registration" in human.output.split("inputs logged after registration")[1]


@pytest.mark.parametrize("alias", ["Production", "STAGING", "None", "Archived"])
def test_an_alias_named_as_a_stage_in_another_case_is_refused(p, alias):
    """'fraud@Production' read as an alias would serve the alias's version where a reader sees production."""
    p.models.register("fraud", trained_run(p))
    with pytest.raises(mp.DataError, match="not a stage name"):
        p.models.set_alias("fraud", alias, 1)
    assert p.models.get("fraud", version=1).aliases == () and len(p.models.history("fraud")) == 1


def test_artifact_meta_takes_a_bool_check(p):
    info = p.models.register("fraud", trained_run(p))
    with pytest.raises(mp.DataError, match="check"):
        p.models.artifact_meta(info, check="no")  # a truthy string: checked, as if True
    assert p.models.artifact_meta(info, check=False)["sha256"] == info.artifact_sha256


@pytest.mark.parametrize("name", ["fraud\n", "a" * 255 + "\n"])
def test_a_name_or_alias_ending_in_a_newline_is_refused(p, tmp_path, name):
    """``$`` matched before a final newline: 'fraud\\n' became a second model beside 'fraud' (and, at 255 + 1
    characters, a raw 'value too long' from PostgreSQL while SQLite kept it)."""
    run_id = trained_run(p)
    with pytest.raises(mp.DataError, match="model name .* is invalid"):
        p.models.register(name, run_id)
    assert p.models.list() == []
    p.models.register("fraud", run_id)
    with pytest.raises(mp.DataError, match="alias .* is invalid"):
        p.models.set_alias("fraud", name, 1)
    with pytest.raises(mp.DataError, match="Triton model name .* is invalid"):
        p.serving.export_triton("fraud", version=1, repository=tmp_path / "repo", triton_name=name)
    assert p.models.get("fraud", version=1).aliases == () and not (tmp_path / "repo").exists()
