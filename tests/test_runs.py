"""Experiment tracking on SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import collections
import json
import math
import multiprocessing as mpr
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import torch

import mlplat as mp
from mlplat.db.models import MetricChunk, RunParam
from workers import fork, wait


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


@pytest.fixture
def p(platform):
    return platform


# --------------------------------------------------------------- lifecycle
def test_run_lifecycle_and_system_tags(p):
    with p.runs.start("fraud", name="baseline", params={"lr": 1e-3, "layers": 2}, tags={"team": "risk"}) as run:
        run.log_metric("loss", 0.5)
        assert p.runs.get(run.id).status == "running"
    info = p.runs.get(run.id)
    assert (info.status, info.experiment, info.name) == ("finished", "fraud", "baseline")
    assert info.params == {"lr": "0.001", "layers": "2"} and info.tags["team"] == "risk"
    assert info.end_time >= info.start_time and info.user
    for key in ("mlplat.host", "mlplat.user", "mlplat.python", "mlplat.version.mlplat", "mlplat.version.torch",
                "mlplat.entry_point", "mlplat.git.commit", "mlplat.git.dirty"):
        assert key in info.tags
    assert p.runs.experiments() == ["fraud"]


@pytest.mark.parametrize("code, status", [(None, "finished"), (0, "finished"), (1, "failed"),
                                          ("bad input", "failed"), (False, "finished")])
def test_sys_exit_leaving_a_with_block_ends_the_run_by_its_status(p, code, status):
    """sys.exit() / sys.exit(0) inside the block is a program that succeeded: the run was marked failed."""
    with pytest.raises(SystemExit):
        with p.runs.start("fraud") as run:
            run.log_metric("loss", 0.5)
            sys.exit(code)
    info = p.runs.get(run.id)
    assert info.status == status and info.metrics == {"loss": 0.5}
    assert ("mlplat.error" in info.tags) == (status == "failed")


def test_an_exception_marks_the_run_failed(p):
    with pytest.raises(ZeroDivisionError):
        with p.runs.start("fraud") as run:
            1 / 0  # noqa: B018
    info = p.runs.get(run.id)
    assert info.status == "failed" and info.tags["mlplat.error"].startswith("ZeroDivisionError")
    child = p.runs.start("fraud", parent=run)
    child.end("killed")
    assert p.runs.get(child.id).parent_run_id == run.id and p.runs.get(child.id).status == "killed"
    with pytest.raises(mp.DataError, match="ends as one of"):
        p.runs.start("fraud").end("done")
    with pytest.raises(mp.NotFoundError, match="unknown run 'nope'"):
        p.runs.get("nope")


@contextmanager
def _tables_gone(database_url: str, *tables: str):
    """``tables`` renamed away (as a database reset or a dropped schema leaves them) until the block ends."""
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            for table in tables:
                conn.execute(sa.text(f"ALTER TABLE {table} RENAME TO {table}_gone"))
        yield
    finally:
        with engine.begin() as conn:
            for table in tables:
                conn.execute(sa.text(f"ALTER TABLE {table}_gone RENAME TO {table}"))
        engine.dispose()


def test_end_raises_the_metrics_failure_and_notes_the_failed_tag_when_the_database_is_gone(p, database_url):
    """Setting the mlplat.error tag failed too, and its error replaced the metrics failure (the cause)."""
    run = p.runs.start("fraud")
    with _tables_gone(database_url, "run_metric_chunks", "run_tags"):
        run.log_metric("loss", 0.5)
        with pytest.raises(mp.StoreError, match="run_metric_chunks") as failed:
            run.end()
    notes = getattr(failed.value, "__notes__", [])
    assert len(notes) == 1 and "setting the mlplat.error tag" in notes[0] and "run_tags" in notes[0]
    info = p.runs.get(run.id)
    assert info.status == "failed" and "mlplat.error" not in info.tags  # the status it could write
    run.end()  # ended: nothing more to do


def test_a_run_whose_end_cannot_write_anything_stays_open_and_ends_on_a_later_try(p, database_url):
    """The status update failed too: its error hid both others; the run must not count as ended while
    its row says running."""
    run = p.runs.start("fraud")
    # the point stays buffered and the background flusher retries it once the tables are back (as it should):
    # held off until the rows are read, else the check below raced it
    flush_lock, held = run._metrics._flush_lock, False
    try:
        with _tables_gone(database_url, "run_metric_chunks", "run_tags", "runs"):
            run.log_metric("loss", 0.5)
            with pytest.raises(mp.StoreError, match="run_metric_chunks") as failed:
                run.end()
            held = flush_lock.acquire()
        info = p.runs.get(run.id)
    finally:
        if held:
            flush_lock.release()
    notes = getattr(failed.value, "__notes__", [])
    assert [n.split(" ")[0] for n in notes] == ["setting", "marking"]
    assert "marking run" in notes[1] and "still open (running): call run.end() again" in notes[1]
    assert (info.status, info.end_time, info.metrics) == ("running", None, {})  # as its row was
    assert "mlplat.error" not in info.tags
    run.end()  # the database is back: the buffered point is written and the run ends
    info = p.runs.get(run.id)
    assert info.status == "finished" and info.metrics == {"loss": 0.5} and info.end_time is not None


def test_a_failing_block_raises_its_own_error_when_the_run_cannot_be_recorded(p, database_url):
    """The block raised and the database was gone: the StoreError of recording the failure replaced the
    block's own exception, so a training crash showed up as a database error."""
    run = p.runs.start("fraud")
    with _tables_gone(database_url, "run_metric_chunks", "run_tags", "runs"):
        with pytest.raises(ValueError, match="diverged") as failed:
            with run:
                run.log_metric("loss", 0.5)
                raise ValueError("diverged")
    notes = getattr(failed.value, "__notes__", [])
    assert [n.split(" (run")[0] for n in notes] == ["mlplat could not tag it with the error",
                                                    "mlplat could not end it as failed"]
    assert all("StoreError" in n for n in notes)
    assert p.runs.get(run.id).status == "running"  # nothing could be written: a later end() finishes it
    run.end("failed")
    info = p.runs.get(run.id)
    assert info.status == "failed" and info.metrics == {"loss": 0.5}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"params": {"lr": 0.1, "": 2}}, mp.DataError, "param name '' is invalid"),
    ({"params": [("lr", 0.1)]}, mp.DataError, "start\\(params=...\\) takes a mapping"),
    ({"tags": {"team": "risk", "bad\nkey": 1}}, mp.DataError, "tag name 'bad.nkey' is invalid"),
    ({"parent": "nope"}, mp.NotFoundError, "unknown run 'nope'"),
    ({"parent": 5}, mp.DataError, "parent run id must be a string"),
    ({"name": "n" * 256}, mp.DataError, "run name must be a string of at most 255 characters"),
])
def test_a_refused_start_writes_nothing(p, kwargs, error, message):
    with pytest.raises(error, match=message):
        p.runs.start("fraud", **kwargs)
    assert p.runs.experiments() == [] and list(p.runs.search()) == []


def test_git_commit_and_dirty_flag_of_the_calling_script(tmp_path, database_url):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    git("init", "-q")
    script = repo / "train.py"
    script.write_text(textwrap.dedent(f"""
        import mlplat as mp
        p = mp.Platform({str(tmp_path / 'home')!r}, database_url={database_url!r})
        with p.runs.start("git") as run:
            print(run.id)
    """))
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    commit = git("rev-parse", "HEAD")
    runs = []
    for change in (False, True):
        if change:
            script.write_text(script.read_text() + "\n# edited\n")
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=True)
        runs.append(out.stdout.strip())
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        clean, dirty = (p.runs.get(r).tags for r in runs)
    assert clean["mlplat.git.commit"] == commit and clean["mlplat.git.dirty"] == "false"
    assert dirty["mlplat.git.commit"] == commit and dirty["mlplat.git.dirty"] == "true"
    assert clean["mlplat.entry_point"].endswith("train.py")
    # a script outside any repository (a console script in a virtualenv): the working directory's repository
    outside = tmp_path / "bin" / "tool.py"
    outside.parent.mkdir()
    outside.write_text(script.read_text())
    out = subprocess.run([sys.executable, str(outside)], cwd=repo, capture_output=True, text=True, check=True)
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        assert p.runs.get(out.stdout.strip()).tags["mlplat.git.commit"] == commit


# ------------------------------------------------------------------ params
def test_params_are_write_once_and_all_or_nothing(p):
    with p.runs.start("fraud", params={"lr": 0.001}) as run:
        run.log_param("lr", 0.001)  # the same value again is fine
        with pytest.raises(mp.DataError, match="param 'lr' of run .* is already '0.001'.*write-once"):
            run.log_param("lr", 0.01)
        with pytest.raises(mp.DataError, match="param 'lr'"):
            run.log_params({"epochs": 5, "lr": 0.5})
        with pytest.raises(mp.DataError, match="param name '' is invalid"):
            run.log_param("", 1)
    assert p.runs.get(run.id).params == {"lr": "0.001"}  # 'epochs' was rolled back with the clash


class _Shifty:
    """An object whose text changes from one call to the next (as a default repr's address does per process)."""

    calls = 0

    def __str__(self) -> str:
        _Shifty.calls += 1
        return f"<shifty {_Shifty.calls}>"


@pytest.mark.parametrize("value, shown, hint", [
    ({"name": "sgd"}, "dict", r"params of their own \('opt.<name>'\), or pass json.dumps"),
    ({"relu", "tanh"}, "set", r"pass sorted\(value\)"),
    (b"adam", "bytes", r"value.decode\(\)"),
    (np.arange(3), "ndarray", r"value.tolist\(\)"),
    (_Shifty(), "_Shifty", r"pass str\(value\) if its text is the same in every process, or json.dumps"),
    (torch.tensor(0.1), "Tensor", "pass str"),
    ([64, {"a": 1}], r"list \(holding a dict\)", "json.dumps"),
])
def test_params_of_a_kind_whose_text_is_not_stable_are_refused_and_nothing_is_written(p, value, shown, hint):
    """Every value became str(value): a set's order, an object's address or a large array's '...' was stored,
    and a resumed run logging the same value again clashed with it (params are write-once)."""
    message = f"param 'opt' is of type {shown}, which a param cannot hold: it takes .*{hint}"
    with p.runs.start("fraud", params={"lr": 0.1}) as run:
        with pytest.raises(mp.DataError, match=message):
            run.log_param("opt", value)
        with pytest.raises(mp.DataError, match=message):
            run.log_params({"epochs": 5, "opt": value})  # refused whole: 'epochs' is not written either
    assert p.runs.get(run.id).params == {"lr": "0.1"}
    with pytest.raises(mp.DataError, match=message):
        p.runs.start("fraud", params={"opt": value})
    assert [r.id for r in p.runs.search("fraud")] == [run.id]  # the refused start wrote no run


def test_params_take_numbers_strings_none_paths_and_lists_of_them_as_text(p):
    values = {"lr": 1e-3, "epochs": np.int64(5), "dropout": np.float32(0.25), "amp": np.bool_(True), "bn": False,
              "name": "baseline", "scheduler": None, "out": PurePosixPath("runs/a"), "hidden": [64, 32],
              "betas": (0.9, 0.999), "acts": ["relu", ("tanh", None)]}
    with p.runs.start("fraud", params=values) as run:
        run.log_params(values)  # the same values again: the same text, no clash
    assert p.runs.get(run.id).params == {
        "lr": "0.001", "epochs": "5", "dropout": "0.25", "amp": "True", "bn": "False", "name": "baseline",
        "scheduler": "None", "out": "runs/a", "hidden": "[64, 32]", "betas": "(0.9, 0.999)",
        "acts": "['relu', ('tanh', None)]"}


def test_lists_of_numpy_numbers_and_paths_are_stored_as_their_numbers_and_text(p):
    """A list's str() writes each item's repr(): [np.int64(64)] was stored as '[np.int64(64), ...]' (numpy 2),
    which no search for '[64, 32]' found and a resume logging [64, 32] clashed with."""
    values = {"hidden": [np.int64(64), np.int32(32)], "lrs": (np.float32(0.25),), "flags": [np.bool_(True)],
              "paths": [PurePosixPath("data/x"), ("y", np.float64(0.5))]}
    with p.runs.start("numpy-lists", params=values) as run:
        pass
    assert p.runs.get(run.id).params == {"hidden": "[64, 32]", "lrs": "(0.25,)", "flags": "[True]",
                                         "paths": "['data/x', ('y', 0.5)]"}
    assert [r.id for r in p.runs.search("numpy-lists", filter="params.hidden = '[64, 32]'")] == [run.id]
    with p.runs.resume(run.id) as again:
        again.log_params({"hidden": [64, 32], "lrs": (0.25,)})  # the same values as plain numbers: no clash
    point = collections.namedtuple("Point", "x y")
    with p.runs.start("numpy-lists", params={"words": [np.str_("a"), "b"], "at": point(1, 2),
                                             "pts": [point(1, 2)]}) as run:
        pass
    assert p.runs.get(run.id).params == {"words": "['a', 'b']", "at": "Point(x=1, y=2)", "pts": "[Point(x=1, y=2)]"}


def test_a_list_param_stored_as_its_numpy_repr_before_is_the_same_value_on_resume(p):
    """Runs stored '[np.int64(64), np.int64(32)]' before such lists were written as numbers: a resumed script
    logging the same value must not clash with it."""
    with p.runs.start("legacy") as run:
        pass
    with p.db.connect(write=True) as conn:
        conn.execute(sa.insert(RunParam).values(run_id=run.id, key="hidden", value=str([np.int64(64), np.int64(32)])))
    with p.runs.resume(run.id) as again:
        again.log_param("hidden", [np.int64(64), np.int64(32)])
        with pytest.raises(mp.DataError, match="params are write-once"):
            again.log_param("hidden", [np.int64(64), np.int64(33)])


# ----------------------------------------------------------------- metrics
def test_metric_history_keeps_nan_and_infinities(p):
    with p.runs.start("fraud") as run:
        for v in (1.0, float("nan"), float("inf"), float("-inf"), 2.5):
            run.log_metric("m", v)  # steps 0..4
        run.log_metric("late", 1.0, step=10)
        run.log_metric("late", 2.0, step=3)  # an earlier step later: not the latest
        run.log_metrics({"a": np.float32(0.25), "b": torch.tensor(0.5)}, step=7)
    history = p.runs.metric_history(run.id, "m")
    assert [pt.step for pt in history] == [0, 1, 2, 3, 4]
    values = [pt.value for pt in history]
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2:] == [math.inf, -math.inf, 2.5]
    info = p.runs.get(run.id)
    assert info.metrics == {"m": 2.5, "late": 1.0, "a": 0.25, "b": 0.5}
    with p.runs.start("fraud") as nan_run:
        nan_run.log_metric("x", float("nan"))
    assert math.isnan(p.runs.get(nan_run.id).metrics["x"])


@pytest.mark.parametrize("key", ["k" * 256, "", "a\nb", 3])
def test_bad_metric_keys_are_refused_before_they_reach_the_buffer(p, key):
    with p.runs.start("fraud") as run:
        run.log_metric("loss", 0.5)
        with pytest.raises(mp.DataError, match="metric name .* is invalid"):
            run.log_metric(key, 1.0)
    info = p.runs.get(run.id)
    assert info.status == "finished" and info.metrics == {"loss": 0.5}  # the good point was written


def test_values_and_arguments_of_the_wrong_kind_are_refused(p):
    with p.runs.start("fraud") as run:
        run.log_metric("loss", 0.5)
        with pytest.raises(mp.DataError, match="metric 'loss' must be a number, got 'abc'"):
            run.log_metric("loss", "abc")
        for call in (run.log_metrics, run.log_params, run.set_tags):
            with pytest.raises(mp.DataError, match="takes a mapping of names to values, got NoneType"):
                call(None)
    assert p.runs.get(run.id).metrics == {"loss": 0.5}


def test_a_resumed_run_continues_each_keys_default_step(p):
    with p.runs.start("fraud") as run:
        for v in (0.9, 0.8, 0.7):
            run.log_metric("loss", v)  # steps 0, 1, 2
    resumed = p.runs.resume(run.id)
    resumed.log_metric("loss", 0.1)
    resumed.log_metric("new", 5.0)
    resumed.end()
    assert [(pt.step, pt.value) for pt in p.runs.metric_history(run.id, "loss")] == \
        [(0, 0.9), (1, 0.8), (2, 0.7), (3, 0.1)]
    assert p.runs.get(run.id).metrics == {"loss": 0.1, "new": 5.0}
    assert [pt.step for pt in p.runs.metric_history(run.id, "new")] == [0]
    assert [r.id for r in p.runs.search("fraud", filter="metrics.loss < 0.5")] == [run.id]


def test_a_value_too_large_for_a_float_is_refused_when_logged(p):
    with p.runs.start("fraud") as run:
        with pytest.raises(mp.DataError, match=r"metric 'k': 1000.*\.\.\. \(401 characters\) is too large for a float"):
            run.log_metric("k", 10**400)
        with pytest.raises(mp.DataError, match="metric 'k': step must be .* got <int too large to show>"):
            run.log_metric("k", 1.0, step=10**5000)
        run.log_metric("k", 2.0)
    assert p.runs.get(run.id).metrics == {"k": 2.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"timestamp_ms": "yesterday"}, "timestamp_ms must be whole milliseconds since the epoch"),
    ({"timestamp_ms": 1.5e12}, "timestamp_ms must be"),
    ({"step": 2**63}, "step must be a whole step number"),
    ({"step": 1.5}, "step must be a whole step number"),
    ({"step": "4"}, "step must be a whole step number"),
    ({"step": True}, "step must be a whole step number"),
])
def test_bad_steps_and_times_are_refused_when_logged_not_at_flush(p, kwargs, message):
    with p.runs.start("fraud") as run:
        run.log_metric("good", 1.0)
        with pytest.raises(mp.DataError, match=f"metric 'x': {message}"):
            run.log_metric("x", 1.0, **kwargs)
        run.log_metric("x", 2.0)
        run.log_metric("x", 3.0, step=np.int64(5), timestamp_ms=np.int64(1_700_000_000_000))
        run.flush()
    info = p.runs.get(run.id)
    assert info.status == "finished" and info.metrics == {"good": 1.0, "x": 3.0}
    assert [(pt.step, pt.value) for pt in p.runs.metric_history(run.id, "x")] == [(0, 2.0), (5, 3.0)]


def _log_from_process(args):
    url, home, run_id, worker = args
    with mp.Platform(home, database_url=url) as p:
        run = p.runs.resume(run_id)
        for i in range(2000):
            run.log_metric(f"w{worker}", float(i), step=i)
            if i % 500 == 0:
                run.log_metric("shared", float(worker * 10_000 + i), step=worker * 10_000 + i)
        run.flush()
    return worker


def test_eight_processes_log_to_one_run_and_nothing_is_lost(database_url, tmp_path):
    home = str(tmp_path / "home")
    with mp.Platform(home, database_url=database_url) as p:
        run = p.runs.start("concurrent")
        with mpr.get_context("spawn").Pool(8) as pool:
            assert sorted(pool.map(_log_from_process, [(database_url, home, run.id, w) for w in range(8)])) == \
                list(range(8))
        run.end()
        with p.db.connect() as conn:
            count = conn.scalar(sa.select(sa.func.sum(MetricChunk.count)).where(MetricChunk.run_id == run.id))
        assert count == 8 * 2000 + 8 * 4
        assert [pt.step for pt in p.runs.metric_history(run.id, "w3")] == list(range(2000))
        info = p.runs.get(run.id)
        assert all(info.metrics[f"w{w}"] == 1999.0 for w in range(8))
        assert info.metrics["shared"] == 71500.0  # the greatest step wins, whatever order the writes landed in


_SHARED_KEYS = [f"k{i:02d}" for i in range(30)]


def _write_one_run_in_key_order(args):
    """Params, tags and metrics of one resumed run, the keys in this worker's order (every other one reversed)."""
    url, home, run_id, worker = args
    keys = _SHARED_KEYS if worker % 2 == 0 else _SHARED_KEYS[::-1]
    with mp.Platform(home, database_url=url) as p:
        with p.runs.resume(run_id) as run:
            run.log_params({k: "same" for k in keys})
            for i in range(25):
                run.set_tags({k: f"{worker}-{i}" for k in keys})
                for k in keys:
                    run.log_metric(k, float(i), step=worker * 100 + i)
                run.flush()
    return worker


def test_processes_writing_one_runs_keys_in_different_orders_do_not_deadlock(database_url, tmp_path):
    """Each upsert takes the run's rows in sorted key order: in the order given, PostgreSQL deadlocked
    (a failed set_tags, a flush whose points were lost at the block's end)."""
    home = str(tmp_path / "home")
    with mp.Platform(home, database_url=database_url) as p:
        run = p.runs.start("deadlock")
        with mpr.get_context("spawn").Pool(4) as pool:  # a worker's error fails the map
            assert sorted(pool.map(_write_one_run_in_key_order,
                                   [(database_url, home, run.id, w) for w in range(4)])) == list(range(4))
        info = p.runs.get(run.id)
        assert "mlplat.error" not in info.tags and info.status == "finished"  # the last block ended it
        assert {info.params[k] for k in _SHARED_KEYS} == {"same"}
        assert all(info.tags[k].endswith("-24") for k in _SHARED_KEYS)  # each worker's last set_tags
        for k in _SHARED_KEYS:
            assert sorted(pt.step for pt in p.runs.metric_history(run.id, k)) == \
                [w * 100 + i for w in range(4) for i in range(25)]
            assert info.metrics[k] == 24.0  # worker 3's step 324, the greatest


def _log_then_close_platform(args):
    """A multiprocessing worker as docs/operations.md has it: log to a resumed run, p.close(), return."""
    import mlplat._background as background

    url, home, run_id = args
    background.interval = 3600  # the flusher would not write them before the pool ends this process
    p = mp.Platform(home, database_url=url)
    run = p.runs.resume(run_id)
    for step in range(100):
        run.log_metric("loss", float(step), step=step)
    p.close()
    return "closed"


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_closing_the_platform_writes_what_its_runs_buffered_and_leaves_them_open(database_url, tmp_path, context):
    home = str(tmp_path / "home")
    with mp.Platform(home, database_url=database_url) as p:
        run = p.runs.start("pool")
        with mpr.get_context(context).Pool(1) as pool:
            assert pool.map(_log_then_close_platform, [(database_url, home, run.id)]) == ["closed"]
        assert [pt.step for pt in p.runs.metric_history(run.id, "loss")] == list(range(100))
        assert p.runs.get(run.id).status == "running"  # flushed, not ended: the parent's run goes on
        run.log_metric("acc", 0.5)
    with mp.Platform(home, database_url=database_url) as again:  # the parent's close flushed its run too
        info = again.runs.get(run.id)
        assert info.metrics == {"loss": 99.0, "acc": 0.5} and info.status == "running"
    run.end()
    with mp.Platform(home, database_url=database_url) as again:
        assert again.runs.get(run.id).status == "finished"


def test_a_killed_process_loses_nothing_before_its_last_flush(database_url, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import mlplat as mp
        p = mp.Platform({str(tmp_path / 'home')!r}, database_url={database_url!r})
        run = p.runs.start("crash")
        print(run.id, flush=True)
        for i in range(5000):
            run.log_metric("loss", i / 10, step=i)
        run.flush()
        for i in range(5000, 5100):
            run.log_metric("loss", i / 10, step=i)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9
    run_id = proc.stdout.split()[0]
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        steps = {pt.step for pt in p.runs.metric_history(run_id, "loss")}
        assert set(range(5000)) <= steps  # everything before the flush survived the kill
        assert p.runs.get(run_id).status == "running"  # nobody could mark it: it was killed


# ------------------------------------------------------------------ search
@pytest.fixture
def searchable(p):
    ids = {}
    rows = [("a", 0.001, 0.91, "risk"), ("b", 0.01, 0.95, "risk"), ("c", 0.001, 0.85, "ml"), ("d", 0.1, 0.5, "ml"),
            ("e", 0.001, float("nan"), "growth")]
    for name, lr, auc, team in rows:
        with p.runs.start("fraud", name=name, params={"lr": lr}, tags={"team": team}) as run:
            run.log_metric("val_auc", auc)
            if name != "e":
                run.log_metric("loss", 1 - auc)
        ids[name] = run.id
    with p.runs.start("other", name="z", params={"lr": 0.001}) as run:
        run.log_metric("val_auc", 0.99)
    with pytest.raises(RuntimeError):
        with p.runs.start("fraud", name="f", params={"lr": 0.001}):
            raise RuntimeError
    return ids


def names(page):
    return [r.name for r in page]


@pytest.mark.parametrize(
    "flt, order, expected",
    [
        ("metrics.val_auc > 0.9 and params.lr = '0.001'", None, ["a"]),
        ("metrics.val_auc > 0.9 or params.lr = '0.1'", ["attributes.name"], ["a", "b", "d"]),
        ("(metrics.val_auc > 0.9 or tags.team = 'ml') and not params.lr = '0.1'", ["attributes.name"], ["a", "b", "c"]),
        ("params.lr in ('0.01', '0.1')", ["metrics.val_auc desc"], ["b", "d"]),
        ("tags.team not in ('risk')", ["attributes.name asc"], ["c", "d", "e"]),  # no tag: no match
        ("tags.team like 'r%' and metrics.loss < 0.07", None, ["b"]),
        ("tags.team ilike 'ML'", ["attributes.name"], ["c", "d"]),
        ("metrics.loss is null", ["attributes.name"], ["e", "f"]),
        ("metrics.val_auc is not null", ["attributes.name"], ["a", "b", "c", "d", "e"]),  # e's latest is NaN
        ("metrics.val_auc is null", None, ["f"]),
        ("not metrics.val_auc is not null", None, ["f"]),
        ("attributes.status = 'failed'", None, ["f"]),
        ("attributes.status != 'failed' and attributes.name >= 'c'", ["attributes.name"], ["c", "d", "e"]),
        ("metrics.val_auc >= 0.91 AND params.lr <> '0.01'", None, ["a"]),
        (None, ["metrics.val_auc desc", "attributes.name"], ["b", "a", "c", "d", "e", "f"]),  # NaN/None last
        (None, ["params.lr desc", "attributes.name desc"], ["d", "b", "f", "e", "c", "a"]),
    ],
)
def test_filter_language(p, searchable, flt, order, expected):
    assert names(p.runs.search("fraud", filter=flt, order_by=order)) == expected


def test_metric_names_with_dots_and_digits_are_read_whole(p):
    with p.runs.start("layers", name="deep") as run:
        run.log_metrics({"layer.0.norm": 2.5, "layer.0": 1.0, "grad/layer-1:max": 3.0})
    for flt in ("metrics.layer.0.norm > 2", "metrics.layer.0 = 1 and metrics.grad/layer-1:max >= 3",
                'metrics."layer.0.norm" > 2'):  # unquoted, "layer.0" was read as "layer" then the number .0
        assert names(p.runs.search("layers", filter=flt, order_by=["metrics.layer.0.norm desc"])) == ["deep"]
    assert names(p.runs.search("layers", filter="metrics.layer.0.norm > 3")) == []


def test_search_across_experiments_and_pages(p, searchable):
    assert set(names(p.runs.search(filter="params.lr = '0.001' and metrics.val_auc > 0.9"))) == {"a", "z"}
    assert names(p.runs.search(["fraud", "other"], filter="metrics.val_auc > 0.94")) in (["z", "b"], ["b", "z"])
    seen, token = [], None
    while True:
        page = p.runs.search("fraud", order_by=["attributes.name"], max_results=2, page_token=token)
        seen += names(page)
        token = page.next_page_token
        if token is None:
            break
    assert seen == ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(mp.DataError, match="page_token 'garbage' is not one mlplat gave"):
        p.runs.search("fraud", page_token="garbage")
    with pytest.raises(mp.DataError, match="max_results"):
        p.runs.search("fraud", max_results=0)


@pytest.mark.parametrize(
    "flt",
    [
        "params.lr = '0.001'' or ''1''=''1'",
        "params.lr = '0.001; drop table runs; --'",
        "tags.team = \"x\\\" or 1=1 --\"",
        "metrics.\"val_auc'; drop table runs; --\" > 0",
        "params.\"lr) or (1=1\" = 'x'",
    ],
)
def test_injection_attempts_are_just_values(p, searchable, flt):
    assert names(p.runs.search("fraud", filter=flt)) == []
    assert len(p.runs.search("fraud")) == 6  # every table still there, every run still found


def test_injection_in_names_is_stored_verbatim(p):
    evil = "x'); DROP TABLE runs; --"
    with p.runs.start("fraud", params={evil: "1"}, tags={evil: evil}) as run:
        run.log_metric(evil, 1.0)
    assert p.runs.search("fraud", filter=f'params."{evil}" = \'1\'')[0].id == run.id
    assert p.runs.get(run.id).params == {evil: "1"}


@pytest.mark.parametrize(
    "flt, message",
    [
        ("metrics.val_auc >", "expected a value"),
        ("metrics.val_auc > 'high'", "compares with numbers"),
        ("metrics.val_auc like '9%'", "'like' compares strings"),
        ("val_auc > 1", "expected a field"),
        ("params.lr = '1' and", "expected a field"),
        ("(params.lr = '1'", "expected '\\)'"),
        ("params.lr = '1' params.x = '2'", "expected 'and', 'or' or the end"),
        ("attributes.color = 'red'", "unknown attribute 'color'"),
        ("params.lr ~ '1'", "cannot read"),
        ("attributes.start_time > 'yesterday'", "is not a time"),
        ("attributes.start_time > 1e20", "1e\\+20 is not a time between the years 1 and 9999"),
        ("attributes.end_time < -1e300", "is not a time"),
        ("metrics.val_auc > " + "9" * 400, "too large to compare with a metric"),
    ],
)
def test_bad_filters_name_the_problem(p, searchable, flt, message):
    with pytest.raises(mp.DataError, match=message):
        p.runs.search("fraud", filter=flt)


@pytest.mark.parametrize("flt, message", [
    (" and ".join(["params.lr = '0.001'"] * 5000), "filter: holds more than 200 comparisons"),
    (" or ".join(["params.lr = '0.001'"] * 201), "filter: holds more than 200 comparisons"),
    ("(" * 51 + "params.lr = '0.001'" + ")" * 51, "filter: nests parentheses and 'not' more than 50 deep"),
    ("not " * 5000 + "params.lr = '0.001'", "filter: nests parentheses and 'not' more than 50 deep"),
    ("(" * 5000, "nests parentheses and 'not' more than 50 deep"),
])
def test_a_filter_too_long_or_too_deep_is_a_data_error_stating_the_limits(p, searchable, flt, message):
    # 5,000 'and' clauses (or 500 nested parentheses) raised RecursionError
    with pytest.raises(mp.DataError, match=message + "; a filter may hold at most 200 comparisons and nest "
                                                     "parentheses and 'not' at most 50 deep"):
        p.runs.search("fraud", filter=flt)


def test_a_filter_at_the_limits_is_searched(p, searchable):
    term = "params.lr = '0.001'"
    nested = term
    for i in range(25):  # 50 levels of parentheses, alternating 'and' and 'or'
        nested = f"(({nested}) {'and' if i % 2 else 'or'} {term})"
    flt = " and ".join([nested] + [term] * (200 - 26))
    assert flt.count("params.") == 200
    assert names(p.runs.search("fraud", filter=flt, order_by=["attributes.name"])) == ["a", "c", "e", "f"]
    by_name = ["attributes.name"]
    assert names(p.runs.search("fraud", filter="not " * 50 + term, order_by=by_name)) == ["a", "c", "e", "f"]
    assert names(p.runs.search("fraud", filter="not " * 49 + term, order_by=by_name)) == ["b", "d"]


@pytest.mark.parametrize("text", [b"o:99999999999999999999999", b"o:9223372036854775808", b"o:-1", b"x:1"])
def test_a_page_token_past_any_offset_is_a_data_error(p, searchable, text):
    # an offset past 64 bits overflowed the query (OverflowError on SQLite, a database error on PostgreSQL)
    token = base64.urlsafe_b64encode(text).decode()
    with pytest.raises(mp.DataError, match=f"page_token {token!r} is not one mlplat gave"):
        p.runs.search("fraud", page_token=token)


@pytest.mark.parametrize("flt, expected", [
    ("tags.team like 'risk'", ["r1"]),  # case-sensitive on SQLite too (its own LIKE ignores ASCII case)
    ("tags.team like 'r%'", ["r1"]),
    ("tags.team like 'RI_K'", ["r2"]),
    ("tags.team ilike 'RISK'", ["r1", "r2"]),
    ("tags.u ilike 'ÄRGER'", ["r1", "r2"]),  # every letter folds, not only ASCII ones (SQLite's lower())
    ("tags.u like 'Ä%'", ["r1"]),
    ("tags.path like 'a_b'", ["r1", "r2", "r3"]),
    ("tags.path like 'a\\\\_b'", ["r1"]),  # filter text 'a\\_b' is the pattern a\_b: a literal _
    ("tags.path like 'a\\\\%b'", ["r3"]),
    ("tags.path ilike 'A\\\\%%'", ["r3"]),
    ("tags.bs like '%\\\\\\\\%'", ["r1"]),  # a literal backslash
    ("attributes.name like 'R%'", []),
    ("attributes.name ilike 'R%'", ["r1", "r2", "r3"]),
])
def test_like_and_ilike_match_the_same_on_every_backend(p, flt, expected):
    for name, tags in [("r1", {"team": "risk", "path": "a_b", "u": "Ärger", "bs": "a\\b"}),
                       ("r2", {"team": "RISK", "path": "axb", "u": "ärger"}),
                       ("r3", {"team": "ml", "path": "a%b", "u": "zebra"})]:
        p.runs.start("like", name=name, tags=tags).end()
    assert names(p.runs.search("like", filter=flt, order_by=["attributes.name"])) == expected


@pytest.fixture
def numbered(p):
    """Runs whose param ``x`` (and tag ``x``) is a number's text, or not."""
    values = {"a": 9, "b": 10, "c": "abc", "d": 0.12345678901234568, "e": "007", "f": -2.5, "g": "1.2.3",
              "h": 1e-05, "i": "10.0"}
    for name, value in values.items():
        with p.runs.start("numbers", name=name, params={"x": value}, tags={"x": value}):
            pass


@pytest.mark.parametrize("flt, expected", [
    ("params.x > 9", "bi"),  # as text, '10' < '9': no run matched
    ("params.x >= 10", "bi"),  # as text, every run from '10' on, 'abc' and '9' too
    ("params.x = 10.0", "bi"),
    ("params.x = 10", "bi"),
    ("params.x < 0", "f"),
    ("params.x != 10", "adfh"),  # a text that is not a number does not compare with one
    ("params.x = 0.12345678901234568", "d"),  # every digit of a float's text counts
    ("params.x in (9, 'abc', 1e-5)", "ach"),
    ("params.x not in (9, 'abc')", "bdfhi"),
    ("params.x < inf", "abdfhi"),
    ("params.x = 7", ""),  # '007' is not a number's text
    ("params.x = '007' or params.x = '10'", "be"),  # quoted: compared as text, as before
    ("params.x like 1", ""),
    ("tags.x > 9.5", "bi"),
])
def test_params_and_tags_compared_with_a_number_compare_as_numbers(p, numbered, flt, expected):
    """An unquoted number compared with a param compared the texts: params.epochs > 9 missed '10'."""
    found = p.runs.search("numbers", filter=flt, order_by="attributes.name")
    assert "".join(names(found)) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"max_results": "5"}, "search: max_results must be an int between 1 and 50000, got '5'"),
    ({"max_results": True}, "max_results must be an int between 1 and 50000, got True"),
    ({"max_results": 2.0}, "max_results must be an int"),
    ({"filter": 123}, "search: filter must be a string .* got int 123"),
    ({"filter": ["tags.team = 'ml'"]}, "search: filter must be a string"),
    ({"order_by": [1]}, "search: order_by must be a list of strings"),
    ({"order_by": 5}, "search: order_by must be a list of strings"),
    ({"page_token": 4}, "page_token must be the next_page_token of a page"),
    ({"page_token": "garbage"}, r"is not one mlplat gave .*\(page_token=None; on the command line, leave out "
                                "--page-token\\)"),
    ({"order_by": "bogus"}, "^order_by 'bogus': expected a field such as metrics.x"),
    ({"order_by": "metrics. desc"}, "^order_by 'metrics. desc': "),
    ({"filter": "tags.team = 'a\x00b'"}, "holds a NUL character"),
    ({"filter": "tags.team like 'ml\\\\'"}, "ends with the escape character"),
])
def test_bad_search_arguments_are_data_errors_naming_them(p, searchable, kwargs, message):
    with pytest.raises(mp.DataError, match=message):
        p.runs.search("fraud", **kwargs)


def test_search_takes_one_order_by_string_and_any_iterable_of_experiments(p, searchable):
    assert names(p.runs.search("fraud", order_by="attributes.name desc", max_results=np.int64(2))) == ["f", "e"]
    assert len(p.runs.search(iter(["fraud", "other"]))) == 7
    with pytest.raises(mp.DataError, match="search: experiments must be an experiment name or a list"):
        p.runs.search(5)


@pytest.mark.parametrize("flt, expected", [
    ("metrics.val_auc > 99999999999999999999", []),  # beyond int64: compared as a float
    ("metrics.val_auc < 99999999999999999999", ["a", "b", "c", "d"]),
    ("attributes.status = 1", []),  # numbers compare with string attributes as strings, on both backends
    ("attributes.name in (1, 'b', 2)", ["b"]),
    ("attributes.run_id like 5", []),
    ("attributes.user != 0 and attributes.experiment = 'fraud' and attributes.name <= 'b'", ["a", "b"]),
])
def test_number_values_for_string_attributes_and_huge_metrics_just_compare(p, searchable, flt, expected):
    assert names(p.runs.search("fraud", filter=flt, order_by=["attributes.name"])) == expected


def test_compare_runs(p, searchable):
    table = p.runs.compare([searchable["a"], searchable["d"]])
    assert table.column("params.lr").to_pylist() == ["0.001", "0.1"]
    assert table.column("metrics.val_auc").to_pylist() == [0.91, 0.5]
    assert table.column_names[:4] == ["run_id", "experiment", "name", "status"]
    with pytest.raises(mp.NotFoundError, match="unknown run 'nope'"):
        p.runs.compare([searchable["a"], "nope"])
    for bad, message in (([[searchable["a"]]], "run id must be a string"), ([None], "run id must be a string"),
                         (searchable["a"], "run_ids must be a list of run ids"), (5, "run_ids must be a list"),
                         (["a\x00"], "NUL")):  # a list inside was a raw ProgrammingError / TypeError
        with pytest.raises(mp.DataError, match=message):
            p.runs.compare(bad)


# --------------------------------------------------------------- artifacts
def test_names_too_long_for_their_columns_are_refused_before_anything_is_written(p, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    with p.runs.start("fraud") as run:
        with pytest.raises(mp.DataError, match="artifact name 'x+'... is 1110 characters long; use at most 1024"):
            run.log_artifact(f, "/".join(["x" * 100] * 11))
        with pytest.raises(mp.DataError, match="input name 'i{256}' is invalid"):
            run.log_input(pa.table({"a": [1]}), "i" * 256)
    info = p.runs.get(run.id)
    assert info.artifacts == [] and info.inputs == [] and not Path(info.artifact_uri).exists()


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "./a", "a/.",
                                  "C:/x", "a\x00b"])
def test_artifact_names_that_escape_are_refused(p, tmp_path, name):
    f = tmp_path / "f.txt"
    f.write_text("x")
    with p.runs.start("fraud") as run:
        with pytest.raises(mp.DataError, match="artifact name"):
            run.log_artifact(f, name)
        with pytest.raises(mp.DataError, match="artifact name"):
            run.log_model(TinyNet(), name)
    assert not (tmp_path / "escape.txt").exists() and p.runs.get(run.id).artifacts == []


def test_files_and_folders_as_artifacts(p, tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "a.txt").write_text("hello")
    (tmp_path / "report" / "sub").mkdir()
    (tmp_path / "report" / "sub" / "b.txt").write_text("world")
    with p.runs.start("fraud") as run:
        run.log_artifact(tmp_path / "report" / "a.txt", "notes/a.txt")
        run.log_artifact(tmp_path / "report")
        with pytest.raises(mp.DataError, match="not a file or folder"):
            run.log_artifact(tmp_path / "missing")
    info = p.runs.get(run.id)
    assert sorted(a["path"] for a in info.artifacts) == ["notes/a.txt", "report"]
    root = Path(info.artifact_uri)
    assert (root / "notes" / "a.txt").read_text() == "hello" and (root / "report" / "sub" / "b.txt").exists()


def test_relogging_a_folder_replaces_it_whole(p, tmp_path):
    folder = tmp_path / "report"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one")
    (folder / "sub" / "b.txt").write_text("two")
    with p.runs.start("fraud") as run:
        run.log_artifact(folder)
        (folder / "sub" / "b.txt").unlink()
        (folder / "a.txt").write_text("three")
        run.log_artifact(folder)
    info = p.runs.get(run.id)
    stored = Path(info.artifact_uri) / "report"
    assert sorted(f.relative_to(stored).as_posix() for f in stored.rglob("*.txt")) == ["a.txt"]
    assert (stored / "a.txt").read_text() == "three"
    assert {a["path"]: a["size"] for a in info.artifacts}["report"] == 5


def test_a_folder_that_fails_half_way_leaves_the_one_logged_before(p, tmp_path, monkeypatch):
    """The files were copied into place one by one: a full disk at the second left a mix of old and new."""
    from mlplat.runs import artifacts

    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "a.txt").write_text("old a")
    (folder / "b.txt").write_text("old b")
    opened = []

    def full_disk(path, *args, **kwargs):
        opened.append(path)
        if len(opened) == 2:
            raise OSError(28, "No space left on device")
        return open(path, *args, **kwargs)

    with p.runs.start("fraud") as run:
        run.log_artifact(folder)
        before = p.runs.get(run.id).artifacts
        (folder / "a.txt").write_text("new a")
        (folder / "b.txt").write_text("new b")
        monkeypatch.setattr(artifacts, "open", full_disk, raising=False)
        with pytest.raises(mp.StoreError, match="writing 'report' failed: .*No space left on device"):
            run.log_artifact(folder)
        monkeypatch.undo()
        with pytest.raises(mp.StoreError, match="writing 'one.txt' failed"):
            monkeypatch.setattr(artifacts, "open", full_disk, raising=False)
            opened.clear()
            opened.append("first")
            run.log_artifact(folder / "a.txt", "one.txt")
        monkeypatch.undo()
    info = p.runs.get(run.id)
    assert info.artifacts == before
    root = Path(info.artifact_uri)
    assert {f.name: f.read_text() for f in (root / "report").iterdir()} == {"a.txt": "old a", "b.txt": "old b"}
    assert sorted(f.name for f in root.iterdir()) == ["report"]  # nothing staged is left behind


def test_folders_with_links_pipes_and_loops(p, tmp_path):
    """A linked folder's files were left out silently, and so were pipes and broken links."""
    folder, outside = tmp_path / "report", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "a b ä.txt").write_text("a")
    (outside / "o.txt").write_text("o")
    (folder / "linked").symlink_to(outside)
    (folder / "sub" / "file-link").symlink_to(outside / "o.txt")
    with p.runs.start("fraud") as run:
        run.log_artifact(folder)
        stored = Path(p.runs.get(run.id).artifact_uri) / "report"
        assert sorted(f.relative_to(stored).as_posix() for f in stored.rglob("*") if f.is_file()) == [
            "a b ä.txt", "linked/o.txt", "sub/file-link"]
        before = p.runs.get(run.id).artifacts
        bad = [("sub/loop", lambda path: path.symlink_to(folder), "links back to a folder that holds it"),
               ("broken", lambda path: path.symlink_to(tmp_path / "gone"), "is a broken link"),
               ("pipe", os.mkfifo, "is neither a file nor a folder")]
        for entry, make, message in bad:
            make(folder / entry)
            (folder / "a b ä.txt").write_text("changed")
            with pytest.raises(mp.DataError, match=message):
                run.log_artifact(folder)
            os.unlink(folder / entry)
        assert p.runs.get(run.id).artifacts == before and (stored / "a b ä.txt").read_text() == "a"


def test_a_file_uri_artifact_root_works_end_to_end(tmp_path, database_url):
    """A name logged as a folder could not be logged again as a file (and the staged copy was left behind)."""
    with mp.Platform(tmp_path / "home", database_url=database_url,
                     artifact_root=(tmp_path / "store").as_uri()) as p:
        folder = tmp_path / "my report"
        folder.mkdir()
        (folder / "a.txt").write_text("one")
        net, x = TinyNet(), torch.randn(3, 4)
        with p.runs.start("fraud") as run:
            run.log_model(net, "model", example_input=x)
            run.log_artifact(folder, "out")
            (tmp_path / "out.txt").write_text("file")
            run.log_artifact(tmp_path / "out.txt", "out")
            run.log_artifact(folder, "out")
        info = p.runs.get(run.id)
        assert info.artifact_uri.startswith("file://")
        root = tmp_path / "store" / run.id
        assert sorted(f.name for f in root.iterdir()) == ["model", "out"]
        assert (root / "out" / "a.txt").read_text() == "one"
        version = p.models.register("tiny-uri", run.id)
        torch.testing.assert_close(p.models.load("tiny-uri", version=version.version)(x), net(x))


# ------------------------------------------------------------------ inputs
@pytest.fixture
def feature_table(p, tmp_path):
    """(a table retrieved with the feature ref "v:cnt", its entity rows)."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "event_timestamp": pa.array([0, 0], pa.timestamp("us", "UTC")),
                             "cnt": [3, 4]}), src / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView("v", entities=[user], schema=[mp.Field("cnt", mp.Int64)], source=mp.ParquetSource(src))
    p.features.apply([user, view])
    edf = pa.table({"user_id": [1, 2, 2], "event_timestamp": pa.array([1, 1, 2], pa.timestamp("us", "UTC")),
                    "label": [0, 1, 1]})
    return p.features.get_historical_features(edf, ["v:cnt"]), edf


def test_log_input_hashes_everything_and_pins_feature_versions(p, feature_table):
    train, edf = feature_table
    with p.runs.start("fraud") as run:
        logged = run.log_input(train, "train", feature_refs=["v:cnt"])
        again = run.log_input(train.to_pandas(), "train_pandas")
        with pytest.raises(mp.DataError, match="already logged an input named 'train'"):
            run.log_input(train, "train")
        with pytest.raises(mp.DataError, match="no column 'cnt'"):
            run.log_input(edf, "bad", feature_refs=["v:cnt"])
    assert logged.feature_refs == ["v@1:cnt"] and logged.row_count == 3
    assert logged.content_hash == again.content_hash
    [inp, _] = sorted(p.runs.get(run.id).inputs, key=lambda i: i["name"])
    assert inp["schema"]["fields"][-1] == {"name": "cnt", "type": "int64", "nullable": True}
    assert inp["feature_refs"]["entity_rows"] == "inputs/train/entity_rows.parquet"


@pytest.mark.parametrize("column", [
    pa.array([[1], [2, 3], None, [4, 5, 6]]),
    pa.array([{"x": 1, "y": "a"}, None, {"x": 3, "y": None}, {"x": 4, "y": "d"}]),
    pa.array([None, None, None, None], pa.null()),
    pa.array([{"k": [1.5]}, {"k": []}, {"k": None}, {"k": [2.0, 3.0]}]),
], ids=["list", "struct", "null", "struct-of-list"])
def test_nested_columns_hash_the_same_however_they_are_chunked(column):
    whole = pa.table({"c": column, "n": [1, 2, 3, 4]})
    pieces = pa.concat_tables([whole.slice(0, 1), whole.slice(1, 2), whole.slice(3)])
    assert pieces.column("c").num_chunks == 3 and pieces.equals(whole)
    assert mp.runs.table_hash(pieces) == mp.runs.table_hash(whole)
    assert mp.runs.table_hash(whole.slice(1, 2)) == mp.runs.table_hash(pa.table({"c": column[1:3], "n": [2, 3]}))
    assert mp.runs.table_hash(whole.slice(1, 2)) != mp.runs.table_hash(whole.slice(0, 2))


_NAN_NEG = np.frombuffer(np.array([0xFFF8000000000000], dtype="<u8").tobytes(), dtype="<f8")  # 0.0 / 0.0 on x86


@pytest.mark.parametrize("one, two", [
    (pa.array([float("nan"), 1.0]), pa.array(np.concatenate([_NAN_NEG, [1.0]]))),
    (pa.array([[1.0, float("nan")], None]), pa.array([[1.0, _NAN_NEG[0]], None], pa.large_list(pa.float64()))),
    (pa.array([[1], [2, 3]]), pa.array([[1], [2, 3]], pa.large_list(pa.int64()))),
    (pa.array([["x"], ["y"]]), pa.array([["x"], ["y"]], pa.list_(pa.field("element", pa.large_string())))),
    (pa.array([["x"], ["y"]]), pa.array([["x"], ["y"]], pa.list_(pa.dictionary(pa.int32(), pa.string())))),
    (pa.ListArray.from_arrays(pa.array([0, 2, 3], pa.int32()), pa.array([1, 2, 3]), mask=pa.array([False, True])),
     pa.array([[1, 2], None])),  # a null list with items hidden under it
    (pa.StructArray.from_arrays([pa.array([1, 99])], names=["x"], mask=pa.array([False, True])),
     pa.StructArray.from_arrays([pa.array([1, 0])], names=["x"], mask=pa.array([False, True]))),
    (pa.array([{"s": "a"}, {"s": None}]), pa.array([{"s": "a"}, {"s": None}], pa.struct([("s", pa.large_string())]))),
    (pa.array([[("a", 1)], None], pa.map_(pa.string(), pa.int64())),
     pa.array([[("a", 1)], None], pa.map_(pa.large_string(), pa.int64()))),
], ids=["nan-bits", "nan-in-list", "large-list", "list-item-name", "list-of-dictionary",
        "null-list-slot", "null-struct-slot", "struct-of-large-string", "map"])
def test_table_hash_is_equal_for_equal_content(one, two):
    """NaN bit patterns, list flavours and what sits under null slots changed the hash."""
    assert mp.runs.table_hash(pa.table({"c": one})) == mp.runs.table_hash(pa.table({"c": two}))
    chunked = pa.table({"c": pa.chunked_array([two.slice(0, 1), two.slice(1)])})
    assert mp.runs.table_hash(chunked) == mp.runs.table_hash(pa.table({"c": one}))


@pytest.mark.parametrize("one, two", [
    (pa.array([float("nan")]), pa.array([None], pa.float64())),
    (pa.array([0.0], pa.float32()), pa.array([-0.0], pa.float32())),  # equal as numbers, but 1 / x differs
    (pa.array([0], pa.timestamp("us", "UTC")), pa.array([0], pa.timestamp("us", "Europe/Paris"))),
    (pa.array([0], pa.timestamp("us")), pa.array([0], pa.timestamp("ns"))),
    (pa.array([1.0]), pa.array([1.0], pa.float32())),
    (pa.array([[1, 2], []]), pa.array([[1], [2]])),
    (pa.array([[]]), pa.array([None], pa.list_(pa.int64()))),
    (pa.array([{"x": 1}]), pa.array([{"y": 1}])),
], ids=["nan-vs-null", "negative-zero", "time-zone", "unit", "float-width", "list-bounds", "empty-vs-null-list", "field-name"])
def test_table_hash_tells_different_content_apart(one, two):
    assert mp.runs.table_hash(pa.table({"c": one})) != mp.runs.table_hash(pa.table({"c": two}))


def test_a_refused_duplicate_input_leaves_the_first_one_as_it_was(p, feature_table):
    train, _ = feature_table
    with p.runs.start("fraud") as run:
        run.log_input(train, "train", feature_refs=["v:cnt"])
        before = p.runs.get(run.id).artifacts
        with pytest.raises(mp.DataError, match="already logged an input named 'train'; log this one under"):
            run.log_input(train.slice(0, 1), "train", feature_refs=["v:cnt"])
    info = p.runs.get(run.id)
    assert info.artifacts == before and [i["row_count"] for i in info.inputs] == [3]
    folder = Path(info.artifact_uri) / "inputs" / "train"
    assert pq.read_table(folder / "entity_rows.parquet").num_rows == 3  # not the refused call's one row
    assert [f.name for f in folder.iterdir()] == ["entity_rows.parquet"]  # nothing staged is left behind


# ------------------------------------------------------------------ models
def test_log_model_and_load_it_back(p):
    net = TinyNet()
    x = torch.randn(5, 4)
    with p.runs.start("fraud") as run:
        meta = run.log_model(net, "model", example_input=x)
        with pytest.raises(mp.DataError, match="takes a torch.nn.Module"):
            run.log_model(object(), "other")
    assert meta["torchscript"] == "script" and meta["torch_version"] == torch.__version__
    assert meta["signature"] == {"inputs": [{"name": "input__0", "dtype": "float32", "shape": [-1, 4]}],
                                 "outputs": [{"name": "output__0", "dtype": "float32", "shape": [-1, 2]}]}
    version = p.models.register("tiny", run.id)
    loaded = p.models.load("tiny", version=version.version)
    torch.testing.assert_close(loaded(x), net(x))


def test_a_model_that_does_not_load_here_names_the_torch_versions(tmp_path):
    """TorchScript from another torch that failed to load raised torch's own error, which named neither
    version, and the pickled module was never tried."""
    from mlplat.runs.torch_io import load_torch_model, save_torch_model

    net, x = TinyNet(), torch.randn(2, 4)
    folder = tmp_path / "model"
    save_torch_model(net, folder, example_input=x)
    meta = json.loads((folder / "mlmodel.json").read_text())
    meta["torch_version"] = "9.9.0"
    (folder / "mlmodel.json").write_text(json.dumps(meta))
    (folder / "model.ts").write_bytes(b"not a TorchScript archive from this torch")
    torch.testing.assert_close(load_torch_model(folder)(x), net(x))  # the pickled module still loads
    (folder / "module.pt").write_bytes(b"nor a pickle")
    with pytest.raises(mp.StoreError, match=r"written by torch 9\.9\.0 and does not load in torch .*model\.ts: "
                                            r".*module\.pt: .*load it with torch 9\.9\.0"):
        load_torch_model(folder)


# ---------------------------------------------------------------- training
def test_training_config_values_with_stable_text_become_params(p):
    """A config's Enum member or torch device was refused by the params rule (its kind is not a param's)."""
    import enum

    class Optim(enum.Enum):
        ADAM = "adam"

    class Level(enum.IntEnum):
        HIGH = 3

    cfg = {"optim": Optim.ADAM, "level": Level.HIGH, "device": torch.device("cpu"), "dtype": torch.float32}
    with p.runs.training("fraud", config=cfg) as t:
        pass
    assert p.runs.get(t.id).params == {"optim": "Optim.ADAM", "level": "Level.HIGH", "device": "cpu",
                                       "dtype": "torch.float32"}
    with pytest.raises(mp.DataError, match="param 'fn' is of type function"):  # an address in its text
        with p.runs.training("fraud", config={"fn": lambda x: x}):
            pass


@pytest.mark.parametrize("config", [[1, 2], 5, "lr=0.1"])
def test_a_config_that_is_no_mapping_or_object_is_a_data_error_before_the_run(p, config):
    with pytest.raises(mp.DataError, match=f"config must be a dict, a dataclass or an object with attributes.*"
                                           f"got {type(config).__name__}"):  # a raw TypeError from vars()
        p.runs.training("no-config", config=config)
    assert "no-config" not in p.runs.experiments()


def test_metric_history_and_latest_points_of_an_unknown_run_are_not_found(p):
    with p.runs.start("fraud") as run:
        pass
    assert p.runs.metric_history(run.id, "loss") == [] and p.runs.latest_points(run.id) == {}  # no points yet
    for unknown in ("0" * 32, run.id[:8]):  # an empty answer for a mistyped or shortened id
        with pytest.raises(mp.NotFoundError, match=f"unknown run '{unknown}'"):
            p.runs.metric_history(unknown, "loss")
        with pytest.raises(mp.NotFoundError, match=f"unknown run '{unknown}'"):
            p.runs.latest_points(unknown)


def test_training_helper_tracks_a_real_loop(p):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    train = pd.DataFrame(x.numpy(), columns=["a", "b", "c", "d"]).assign(label=y.numpy())
    cfg = {"lr": 0.1, "epochs": 5, "optimizer": {"name": "sgd", "momentum": 0.9}}
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["optimizer"]["momentum"])
    with p.runs.training("fraud", config=cfg, data=train, model=model, example_input=x[:2]) as t:  # added line 1
        for _ in range(cfg["epochs"]):
            optimizer.zero_grad()
            loss = torch.nn.functional.nll_loss(torch.log(model(x)), y)
            loss.backward()
            optimizer.step()
            t.epoch(loss=loss.detach(), accuracy=(model(x).argmax(1) == y).float().mean())  # added line 2
    info = p.runs.get(t.id)
    assert info.status == "finished"
    assert info.params == {"lr": "0.1", "epochs": "5", "optimizer.name": "sgd", "optimizer.momentum": "0.9"}
    assert [pt.step for pt in p.runs.metric_history(t.id, "loss")] == [0, 1, 2, 3, 4]
    assert info.inputs[0]["name"] == "train" and info.inputs[0]["row_count"] == 256
    assert [a["path"] for a in info.artifacts] == ["model"]


def test_training_helper_marks_failures_and_skips_the_model(p):
    with pytest.raises(ValueError):
        with p.runs.training("fraud", config={"lr": 1}, model=TinyNet()) as t:
            t.epoch(loss=1.0)
            raise ValueError("diverged")
    info = p.runs.get(t.id)
    assert info.status == "failed" and info.artifacts == [] and "diverged" in info.tags["mlplat.error"]


def test_runs_left_open_end_at_exit(database_url, tmp_path):
    script = textwrap.dedent(f"""
        import mlplat as mp
        p = mp.Platform({str(tmp_path / 'home')!r}, database_url={database_url!r})
        ok = p.runs.start("exit")
        ok.log_metric("m", 1.0)
        print(ok.id, flush=True)

        def dropped():  # nothing refers to this run once it returns
            run = p.runs.start("exit")
            for step in range(3):
                run.log_metric("loss", 1 / (step + 1))
            return run.id

        print(dropped(), flush=True)
        __import__("gc").collect()
        if __import__("sys").argv[1] == "fail":
            raise SystemError("boom")
    """)
    outcomes = {}
    for mode in ("ok", "fail"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True)
        outcomes[mode], outcomes[f"{mode}-dropped"] = out.stdout.split()[:2]
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        assert p.runs.get(outcomes["ok"]).status == "finished"
        assert p.runs.get(outcomes["ok"]).metrics == {"m": 1.0}  # flushed at exit
        assert p.runs.get(outcomes["fail"]).status == "failed"
        for mode, status in (("ok", "finished"), ("fail", "failed")):
            dropped = outcomes[f"{mode}-dropped"]
            assert p.runs.get(dropped).status == status
            assert [pt.step for pt in p.runs.metric_history(dropped, "loss")] == [0, 1, 2]


def test_a_resumed_run_is_written_but_not_ended_when_the_resuming_process_exits(database_url, tmp_path):
    """A spawned pool worker that resumed its parent's run ended it at exit (when the pool's sentinel beat
    its terminate): the run's status flipped to finished, or failed, while its owner still logged."""
    home = str(tmp_path / "home")
    with mp.Platform(home, database_url=database_url) as p:
        owner = p.runs.start("resumed")
    script = textwrap.dedent(f"""
        import sys
        import mlplat as mp
        p = mp.Platform({home!r}, database_url={database_url!r})

        def log():  # nothing refers to the resumed run once it returns
            run = p.runs.resume({owner.id!r})
            for step in range(3):
                run.log_metric(sys.argv[1], float(step), step=step)

        log()
        if sys.argv[1] == "fail":
            raise SystemError("boom")
    """)
    for mode in ("ok", "fail"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True)
        assert out.returncode == (0 if mode == "ok" else 1), out.stderr
    with mp.Platform(home, database_url=database_url) as p:
        info = p.runs.get(owner.id)
        assert info.status == "running" and info.end_time is None  # its owner's to end
        for mode in ("ok", "fail"):
            assert [pt.step for pt in p.runs.metric_history(owner.id, mode)] == [0, 1, 2]  # flushed at exit
        owner.log_metric("ok", 9.0, step=3)
    owner.end()
    with mp.Platform(home, database_url=database_url) as p:
        info = p.runs.get(owner.id)
        assert info.status == "finished" and info.metrics == {"ok": 9.0, "fail": 2.0}


# --------------------------------------------------------------- fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def _log_without_closing(home: str, run_id: str, gateway_experiment: str) -> None:
    worker = mp.Platform(home)
    with worker.runs.resume(run_id) as run:
        run.log_metric("before", 1.0)  # written by the with block's end
    run = worker.runs.resume(run_id)  # left open, as a worker's loop leaves it
    for step in range(10):
        run.log_metric("loss", float(step), step=step)
    gateway = worker.serving.ab_gateway("scorer", "scorer", 0.5, gateway_experiment)
    for user in range(7):
        gateway.route(user)


def test_a_forked_multiprocessing_child_writes_what_it_buffered_when_it_returns(tmp_path):
    """A multiprocessing child started by fork ends with os._exit, past atexit: the points and decisions it
    buffered were lost unless it called p.close() (only documented)."""
    from mlplat.db.models import ABDecision

    p = mp.Platform(tmp_path / "home")
    with p.runs.start("scorer") as trained:
        trained.log_model(torch.nn.Linear(3, 1), "model", example_input=torch.zeros(1, 3))
    p.models.register("scorer", trained.id)
    p.models.promote("scorer", 1, "production", approved_by="reviewer")
    with p.runs.start("forked-worker") as run:
        pass
    child = mpr.get_context("fork").Process(target=_log_without_closing, args=(str(tmp_path / "home"), run.id, "mp"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert [m.step for m in p.runs.metric_history(run.id, "loss")] == list(range(10))
    with p.db.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(ABDecision)) == 7
    p.close()


def test_a_run_used_before_a_fork_gets_each_point_once_and_stays_running_when_the_child_ends(tmp_path):
    """The child's copy of the run wrote the points pending at the fork a second time, and its exit
    (atexit ends open runs) marked the parent's run finished while the parent still logged to it."""
    p = mp.Platform(tmp_path / "home")
    run = p.runs.start("forked")
    for step in range(5):
        run.log_metric("loss", float(step), step=step)  # pending in the parent when it forks

    def child() -> None:
        run.log_metric("loss", 100.0, step=100)
        run.end()  # as the child's exit does for every open run

    with run._metrics._flush_lock:  # a flush running (the flusher thread's, say) when the process forks
        pid = fork(child)
    assert wait(pid) == 0
    assert p.runs.get(run.id).status == "running"
    run.log_metric("loss", 5.0, step=5)
    run.end()
    assert p.runs.get(run.id).status == "finished"
    assert [m.step for m in p.runs.metric_history(run.id, "loss")] == [0, 1, 2, 3, 4, 5, 100]
    p.close()
