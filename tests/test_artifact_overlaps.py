"""Artifacts logged into or over one another: each row of ``run.artifacts`` describes the files the store holds.

Logging a file into a logged folder (a README into the model's folder) left the folder's row with the sha256 of
its old files, so a version registered on it was refused by load ("changed after registration"); logging a folder
over earlier artifacts inside it left their rows describing files that were gone."""
from __future__ import annotations

import hashlib

import pytest
import torch

import mlplat as mp
from mlplat.runs.artifacts import folder_sha256


def _artifacts(p: mp.Platform, run_id: str) -> dict[str, dict]:
    return {a["path"]: a for a in p.runs.get(run_id).artifacts}


@pytest.fixture
def p(tmp_path, database_url):
    platform = mp.Platform(tmp_path / "home", database_url=database_url)
    yield platform
    platform.close()


def test_a_file_logged_into_a_model_folder_keeps_the_folder_row_true_and_the_version_loadable(p, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("trained on March data\n")
    with p.runs.start("fraud") as run:
        run.log_model(torch.nn.Linear(3, 1), "model", example_input=torch.zeros(2, 3))
        run.log_artifact(notes, "model/notes.txt")
    rows = _artifacts(p, run.id)
    stored = p.artifacts.get_dir(run.id, "model", tmp_path / "fetched")
    assert rows["model"]["sha256"] == folder_sha256(stored)  # the folder now holds notes.txt too
    assert rows["model"]["size"] == sum(f.stat().st_size for f in stored.rglob("*") if f.is_file())
    assert rows["model/notes.txt"]["sha256"] == hashlib.sha256(notes.read_bytes()).hexdigest()
    v = p.models.register("fraud", run.id)
    assert p.models.load("fraud", version=v.version)(torch.ones(1, 3)).shape == (1, 1)  # StoreError before
    assert (p.models.fetch(v, tmp_path / "dest") / "notes.txt").read_text() == "trained on March data\n"


def test_a_folder_logged_over_earlier_artifacts_inside_it_drops_their_rows(p, tmp_path):
    (tmp_path / "one.txt").write_text("one")
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "summary.txt").write_text("the new summary")
    with p.runs.start("fraud") as run:
        run.log_artifact(tmp_path / "one.txt", "report/old.txt")
        run.log_artifact(tmp_path / "one.txt", "report/summary.txt")
        run.log_artifact(folder, "report")  # replaces the folder whole: old.txt is gone
        assert not p.artifacts.fs.get_file_info(p.artifacts.path(run.id, "report/old.txt")).is_file
    rows = _artifacts(p, run.id)
    assert sorted(rows) == ["report"]  # report/old.txt and report/summary.txt described files no longer there
    assert rows["report"]["sha256"] == folder_sha256(folder)


def test_nested_holders_are_all_measured_again(p, tmp_path):
    outer = tmp_path / "out"
    (outer / "in").mkdir(parents=True)
    (outer / "in" / "a.txt").write_text("a")
    with p.runs.start("fraud") as run:
        run.log_artifact(outer, "out")
        run.log_artifact(outer / "in", "out/in")
        (tmp_path / "b.txt").write_text("bb")
        run.log_artifact(tmp_path / "b.txt", "out/in/b.txt")
    rows = _artifacts(p, run.id)
    for name in ("out", "out/in"):
        stored = p.artifacts.get_dir(run.id, name, tmp_path / f"fetched-{name.replace('/', '-')}")
        assert rows[name]["sha256"] == folder_sha256(stored), name
        assert rows[name]["size"] == 3, name  # a.txt and b.txt
