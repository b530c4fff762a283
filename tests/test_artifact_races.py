"""Artifacts a run may no longer change, on SQLite and PostgreSQL: the entity rows an input keeps (the evidence
lineage's verify rebuilds the training data from) cannot be logged over, and a log_model racing a registration
of the same artifact either comes first (the version records the files it stored) or is refused with nothing
changed."""
from __future__ import annotations

import hashlib
import os
import random
import re
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import torch
from test_registry import lineage_setup  # noqa: F401 - a fixture: model 'fraud' v1 trained with an input
from test_registry_frozen import Scorer
from workers import fork, wait

import mlplat as mp
from mlplat.db.models import RunArtifact

ENTITY_ROWS = "inputs/train/entity_rows.parquet"
TS = pa.timestamp("us", "UTC")


@pytest.fixture
def p(platform):
    return platform


@pytest.fixture
def train(lineage_setup):  # noqa: F811
    """A training table retrieved with ``user_txn:txn_count`` (and model 'fraud' v1 trained on it, in production)."""
    return lineage_setup[1]


def _row(p, run_id: str, name: str):
    with p.db.connect() as conn:
        return conn.execute(sa.select(RunArtifact.kind, RunArtifact.size, RunArtifact.sha256, RunArtifact.meta)
                            .where(RunArtifact.run_id == run_id, RunArtifact.path == name)).first()


def _leftovers(p, run_id: str) -> list[str]:
    """Hidden staging names left in the run's folder (a refused or finished call leaves none)."""
    return [f.name for f in Path(p.artifacts.path(run_id)).rglob(".*")]


def _file(tmp_path: Path) -> Path:
    file = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"user_id": [9], "event_timestamp": pa.array([10], TS), "label": [1]}), file)
    return file


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": [9], "event_timestamp": pa.array([10], TS), "label": [1]}),
                   folder / "train" / "entity_rows.parquet")
    (folder / "entity_rows.parquet").write_bytes(b"not the rows")
    return folder


# what each call logs, and how the refusal says it stands to the kept rows
OVER_THE_ROWS = [
    ("log_artifact", "file", ENTITY_ROWS, "is the entity rows kept for input 'train'"),
    ("log_artifact", "folder", ENTITY_ROWS, "is the entity rows kept for input 'train'"),
    ("log_artifact", "file", ENTITY_ROWS + "/x.parquet",
     f"lies inside artifact '{ENTITY_ROWS}', which is the entity rows kept for input 'train'"),
    ("log_artifact", "folder", "inputs/train", f"holds artifact '{ENTITY_ROWS}', which is the entity rows kept"),
    ("log_artifact", "folder", "inputs", f"holds artifact '{ENTITY_ROWS}', which is the entity rows kept"),
    ("log_model", None, ENTITY_ROWS, "is the entity rows kept for input 'train'"),
    ("log_model", None, ENTITY_ROWS + "/model", f"lies inside artifact '{ENTITY_ROWS}', which is the entity rows"),
    ("log_model", None, "inputs/train", f"holds artifact '{ENTITY_ROWS}', which is the entity rows kept"),
    ("log_model", None, "inputs", f"holds artifact '{ENTITY_ROWS}', which is the entity rows kept"),
]


def _log(run, call: str, what: str | None, name: str, tmp_path: Path) -> None:
    if call == "log_model":
        run.log_model(Scorer(9.0), name, example_input=torch.zeros(2, 3))
    else:
        run.log_artifact(_file(tmp_path) if what == "file" else _folder(tmp_path), name)


@pytest.mark.parametrize("call, what, name, where", OVER_THE_ROWS)
def test_the_entity_rows_a_registered_models_input_keeps_cannot_be_logged_over(p, lineage_setup, tmp_path,  # noqa: F811
                                                                                call, what, name, where):
    run_id = lineage_setup[2]
    stored, row = Path(p.artifacts.path(run_id, ENTITY_ROWS)).read_bytes(), _row(p, run_id, ENTITY_ROWS)
    assert p.models.lineage("fraud", verify=True)["data"][0]["verification"]["matches"] is True

    resumed = p.runs.resume(run_id)
    with pytest.raises(mp.DataError, match=rf"{call}: artifact '{name}' of run \w+ {where}.*lineage's verify "
                                           r"rebuilds.*nothing was written: log the new files under another name"):
        _log(resumed, call, what, name, tmp_path)
    resumed.end()
    assert Path(p.artifacts.path(run_id, ENTITY_ROWS)).read_bytes() == stored and _row(p, run_id, ENTITY_ROWS) == row
    assert _row(p, run_id, name) is None or name == ENTITY_ROWS
    assert _leftovers(p, run_id) == []
    check = p.models.lineage("fraud", verify=True)["data"][0]["verification"]
    assert check["checked"] and check["matches"] and check["rows"] == 4


@pytest.mark.parametrize("call, what, name, where", [OVER_THE_ROWS[0], OVER_THE_ROWS[3], OVER_THE_ROWS[5]])
def test_the_entity_rows_are_kept_as_logged_with_no_model_registered(p, train, tmp_path, call, what, name, where):
    with p.runs.start("fraud") as run:
        run.log_input(train, "train", feature_refs=["user_txn:txn_count"])
        stored = Path(p.artifacts.path(run.id, ENTITY_ROWS)).read_bytes()
        with pytest.raises(mp.DataError, match=f"{call}: artifact '{name}' of run .* {where}"):
            _log(run, call, what, name, tmp_path)
        assert Path(p.artifacts.path(run.id, ENTITY_ROWS)).read_bytes() == stored
        # names beside the rows, or that only start with the same letters, are free
        assert run.log_artifact(_file(tmp_path), "inputs/train/other.parquet") == "inputs/train/other.parquet"
        assert run.log_artifact(_file(tmp_path), ENTITY_ROWS + "2") == ENTITY_ROWS + "2"
        run.log_model(Scorer(), "model", example_input=torch.zeros(2, 3))
    assert _leftovers(p, run.id) == []
    assert p.runs.get(run.id).status == "finished"


@pytest.mark.parametrize("call", ["log_model", "log_artifact"])
def test_a_registration_while_the_files_are_staged_refuses_them_and_changes_nothing(p, tmp_path, monkeypatch, call):
    """The registration commits after the call's first check, while its files are being staged: the check in
    the transaction that would swap them in sees it, so the registered files and their record stay as they were."""
    with p.runs.start("fraud") as run:
        run.log_model(Scorer(0.5), "model", example_input=torch.zeros(2, 3))
    before = _row(p, run.id, "model")
    staging = p.artifacts.stage_dir

    def staged_while_registered(*args):
        p.models.register("fraud", run_id=run.id, registered_by="dana")
        return staging(*args)

    monkeypatch.setattr(p.artifacts, "stage_dir", staged_while_registered)
    with p.runs.resume(run.id) as resumed, pytest.raises(mp.DataError, match=f"{call}: artifact 'model' of run "
                                                         ".* is registered as model 'fraud' v1; .*nothing was written"):
        _log(resumed, call, "folder", "model", tmp_path)
    assert _row(p, run.id, "model") == before and p.models.get("fraud", version=1).artifact_sha256 == before.sha256
    assert p.models.load("fraud", version=1)(torch.ones(1, 3)).item() == pytest.approx(1.5)
    assert _leftovers(p, run.id) == []


def _log_until_refused(home: Path, url: str, run_id: str, pipe: int) -> None:
    """In a child process: log_model over "model" again and again until a registration refuses it; writes
    b"x" to ``pipe`` once it logged, then b"=" if the refusal says nothing was written (else b"!")."""
    with mp.Platform(home, database_url=url) as child:
        run = child.runs.resume(run_id)
        deadline = time.monotonic() + 8
        logged = 0
        while time.monotonic() < deadline:
            try:
                run.log_model(Scorer(float(logged)), "model", example_input=torch.zeros(2, 3))
            except mp.DataError as exc:
                assert "is registered as model 'fraud'" in str(exc), exc
                os.write(pipe, b"=" if "so nothing was written" in str(exc) else b"!")
                return
            logged += 1
            if logged == 1:
                os.write(pipe, b"x")
        raise AssertionError("the registration was never seen")


def test_log_model_racing_a_registration_leaves_a_version_whose_files_are_the_ones_it_recorded(p, database_url):
    home, url = Path(p.settings.home), database_url
    draw = random.Random(7)
    failed = []
    for round_ in range(6):
        with p.runs.start("fraud") as run:
            run.log_model(Scorer(0.5), "model", example_input=torch.zeros(2, 3))
        read, write = os.pipe()
        pid = fork(partial(_log_until_refused, home, url, run.id, write))
        os.close(write)
        assert os.read(read, 1) == b"x", "the logging process failed before it logged once"
        time.sleep(draw.uniform(0, 0.1))  # somewhere in a log_model call
        version = p.models.register("fraud", run_id=run.id, registered_by="dana").version
        assert wait(pid, timeout=20) == 0, f"round {round_}: the logging process failed"
        refusal = os.read(read, 1)
        os.close(read)
        info = p.models.get("fraud", version=version)
        artifact = p.models.lineage("fraud", version=version, verify=True)["artifact"]
        try:
            p.models.load("fraud", version=version)  # the files hash to what was registered
        except mp.StoreError as exc:
            failed.append(f"round {round_}: {exc}")
            continue
        assert info.artifact_sha256 == _row(p, run.id, "model").sha256, f"round {round_}"
        assert artifact["matches_registration"] is True, f"round {round_}"
        assert artifact["verification"]["checked"] and artifact["verification"]["matches"], f"round {round_}"
        assert refusal == b"=", f"round {round_}: the refusal did not say that nothing was written"
        assert _leftovers(p, run.id) == [], f"round {round_}"
    assert not failed, f"{len(failed)} of 6 rounds left a version that does not load:\n" + "\n".join(failed)


def test_two_writers_of_one_new_artifact_name_leave_a_row_that_describes_the_files(p, tmp_path, monkeypatch):
    """The first writer's files are swapped in and its row not yet written when the second writes: on PostgreSQL
    nothing locked a name with no row, so the second swapped and recorded its files in between, and the first's
    row then described files the store no longer held (a version registered on it refused to load)."""
    import threading

    swapping = p.artifacts.swap_in
    first_swapped, go_on = threading.Event(), threading.Event()

    def swap_in(*args):
        swapping(*args)
        if threading.current_thread().name == "first":
            first_swapped.set()
            go_on.wait(1.0)  # the second writer's turn, until it is done or has waited a second for the lock

    monkeypatch.setattr(p.artifacts, "swap_in", swap_in)
    files = []
    for i in range(2):
        files.append(tmp_path / f"src{i}.txt")
        files[-1].write_text(f"the writer {i}'s bytes")
    with p.runs.start("art") as run:
        first = threading.Thread(target=run.log_artifact, args=(files[0], "shared.txt"), name="first")
        first.start()
        assert first_swapped.wait(10)
        second = threading.Thread(target=lambda: (run.log_artifact(files[1], "shared.txt"), go_on.set()))
        second.start()
        second.join(10)
        go_on.set()
        first.join(10)
        second.join(10)
    stored = Path(p.artifacts.path(run.id)) / "shared.txt"
    row = _row(p, run.id, "shared.txt")
    assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert stored.read_text() == "the writer 1's bytes"  # the second writer, after the first was done


def test_a_write_in_a_run_folder_removes_the_copies_killed_writes_staged_once_an_hour_old(p, tmp_path):
    """A log_artifact or log_model killed mid-copy leaves its .staging-<id> copy, as large as the artifact, and
    nothing removed it (the docs said re-logging did). A copy counts as old by the newest file in it: a folder's
    own time stays put while files go into its subfolders, and a live copy of a big folder looked old."""
    with p.runs.start("art") as run:
        run.log_artifact(_file(tmp_path), "rows.parquet")
        folder = Path(p.artifacts.path(run.id))
        old_copy, young_copy, old_aside = folder / ".staging-old", folder / ".staging-young", folder / ".replaced-old"
        (old_copy / "train").mkdir(parents=True)
        (old_copy / "train" / "rows.parquet").write_bytes(b"half")
        old_aside.write_bytes(b"replaced")
        young_copy.write_bytes(b"another process's copy in progress")
        for f, age in ((old_copy, 7200), (old_copy / "train", 7200), (old_copy / "train" / "rows.parquet", 7200),
                       (old_aside, 7200), (young_copy, 3000)):
            os.utime(f, (time.time() - age, time.time() - age))
        p.artifacts._sweeper._swept.clear()  # the first log swept this folder less than an hour ago
        run.log_artifact(_folder(tmp_path), "folder")
    assert _leftovers(p, run.id) == [".staging-young"]


def test_a_copy_being_staged_is_not_swept_by_another_write_and_names_of_staged_copies_are_refused(p, tmp_path):
    """A staged folder whose own time is old but whose files are new is another process's copy in progress."""
    with p.runs.start("art") as run:
        run.log_artifact(_file(tmp_path), "rows.parquet")
        live = Path(p.artifacts.path(run.id)) / ".staging-live"
        (live / "weights").mkdir(parents=True)
        (live / "weights" / "shard-0.bin").write_bytes(b"just copied")
        os.utime(live, (time.time() - 7200, time.time() - 7200))
        p.artifacts._sweeper._swept.clear()
        run.log_artifact(_file(tmp_path), "again.parquet")
        assert (live / "weights" / "shard-0.bin").exists()
        for name in (".staging-notes.txt", ".replaced-x/y"):  # the sweeper would remove them an hour later
            with pytest.raises(mp.DataError, match=f"artifact name {re.escape(repr(name))} starts with"):
                run.log_artifact(_file(tmp_path), name)


def test_a_staged_folder_that_lost_files_while_it_was_copied_is_refused(p, tmp_path, monkeypatch):
    """Removed half-way (by anything), the rest of the copy recreated its folder, and the artifact was recorded
    with a size and sha256 over files it did not hold."""
    import shutil

    source = tmp_path / "model"
    (source / "weights").mkdir(parents=True)
    for i in range(3):
        (source / "weights" / f"shard-{i}.bin").write_bytes(bytes([i]) * 10)
    copy = p.artifacts._copy_in

    def copy_then_lose_the_first(src, dest):
        out = copy(src, dest)
        if dest.endswith("shard-0.bin"):
            shutil.rmtree(dest.rsplit("/weights/", 1)[0])
        return out

    monkeypatch.setattr(p.artifacts, "_copy_in", copy_then_lose_the_first)
    with p.runs.start("art") as run:
        with pytest.raises(mp.StoreError, match=r"writing 'model' failed: the staged copy holds 2 of the 3 files"):
            run.log_artifact(source, "model")
    assert _row(p, run.id, "model") is None and _leftovers(p, run.id) == []
