"""Input that tracking must refuse when it is logged (or take as the user means it), on SQLite and PostgreSQL:
text no database stores, metrics after a run ended, values of the wrong kind, model columns, configs, git."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import mlplat as mp
from mlplat.runs.training import flatten_config

SURROGATE = "lr\udcff"  # what surrogateescape leaves for a byte that is not UTF-8


@pytest.fixture
def p(platform):
    return platform


@pytest.fixture
def lite(tmp_path):
    """A platform on SQLite, where the backend does not matter."""
    with mp.Platform(tmp_path / "lite") as platform:
        yield platform


def _nothing_stored(p) -> bool:
    return p.runs.experiments() == [] and list(p.runs.search()) == []


# ------------------------------------------------------ text no database stores
def test_a_metric_name_that_is_not_utf8_is_refused_and_the_runs_other_points_are_written(p):
    with p.runs.start("e") as run:
        for step in range(10):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        with pytest.raises(mp.DataError, match="metric name holds '\\\\udcff', a lone surrogate"):
            run.log_metric("acc\udcff", 0.5)
        with pytest.raises(mp.DataError, match="lone surrogate"):
            run.log_metrics({"ok": 1.0, "acc\udcff": 0.5})
        for step in range(10, 20):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
    info = p.runs.get(run.id)
    assert info.status == "finished" and "mlplat.error" not in info.tags
    assert set(info.metrics) == {"loss"} and len(p.runs.metric_history(run.id, "loss")) == 20


@pytest.mark.parametrize("call, message", [
    (lambda run: run.log_param("x", SURROGATE), "param 'x' holds '\\\\udcff'"),
    (lambda run: run.log_params({"a": 1, "x": "a\x00b"}), "param 'x' holds a NUL character"),
    (lambda run: run.log_params({SURROGATE: 1}), "param name holds '\\\\udcff'"),
    (lambda run: run.set_tag("t", "a\x00b"), "tag 't' holds a NUL character"),
    (lambda run: run.set_tags({"t": SURROGATE}), "tag 't' holds '\\\\udcff'"),
])
def test_params_and_tags_no_database_stores_are_refused_and_nothing_is_written(p, call, message):
    with p.runs.start("e", params={"lr": 0.1}, tags={"team": "risk"}) as run:
        with pytest.raises(mp.DataError, match=message):
            call(run)
    info = p.runs.get(run.id)
    assert info.status == "finished" and info.params == {"lr": "0.1"}
    assert {k: v for k, v in info.tags.items() if not k.startswith("mlplat.")} == {"team": "risk"}


@pytest.mark.parametrize("experiment, kwargs, message", [
    ("e", {"params": {"a": "x\x00y"}}, "param 'a' holds a NUL character"),
    ("e", {"tags": {"t": "x\x00y"}}, "tag 't' holds a NUL character"),
    ("e", {"name": "r\x00n"}, "run name holds a NUL character"),
    ("e\x00", {}, "experiment name holds a NUL character"),
    ("e", {"params": {"x": SURROGATE}}, "param 'x' holds '\\\\udcff'"),
    ("e", {"tags": {"t": SURROGATE}}, "tag 't' holds '\\\\udcff'"),
    ("e", {"name": SURROGATE}, "run name holds '\\\\udcff'"),
    (SURROGATE, {}, "experiment name holds '\\\\udcff'"),
])
def test_a_start_with_text_no_database_stores_is_refused_and_leaves_no_run(p, experiment, kwargs, message):
    with pytest.raises(mp.DataError, match=message):
        p.runs.start(experiment, **kwargs)
    assert _nothing_stored(p)
    with pytest.raises(mp.DataError, match="holds"):  # the training helper starts runs the same way
        p.runs.training(experiment, config=kwargs.get("params"), name=kwargs.get("name", ""),
                        tags=kwargs.get("tags"))
    assert _nothing_stored(p)


@pytest.mark.parametrize("text", ["a\udcffb", "a\x00b"], ids=["surrogate", "nul"])
@pytest.mark.parametrize("call, what", [
    (lambda p, t: p.runs.search(filter=f"tags.team = '{t}'"), "filter: the value .* compared with tags.team"),
    (lambda p, t: p.runs.search(filter=f"params.lr in ('x', '{t}')"), "filter: the value .* compared with params.lr"),
    # names, not only values (a raw UnicodeEncodeError; a NUL matched on SQLite and failed on PostgreSQL)
    (lambda p, t: p.runs.search(filter=f"params.\"{t}\" = 'x'"), "filter: the name params.*"),
    (lambda p, t: p.runs.search(filter=f"tags.'{t}' is null"), "filter: the name tags.*"),
    (lambda p, t: p.runs.search(t), "search: experiments"),
    (lambda p, t: p.runs.search(["e", t]), "search: experiments"),
    (lambda p, t: p.runs.get(t), "run id"),
    (lambda p, t: p.runs.metric_history(t, "loss"), "run id"),
    (lambda p, t: p.models.get("m", alias=t), "alias( .*)?"),
    (lambda p, t: p.models.register("m", p.runs.search()[0].id, description=t), "description"),
])
def test_lookups_with_text_no_database_stores_are_data_errors_on_both_backends(p, text, call, what):
    """A lone surrogate raised a raw UnicodeEncodeError from the driver; a run id with NUL was NotFoundError on
    SQLite and a database error on PostgreSQL."""
    with p.runs.start("e") as run:
        run.log_metric("loss", 1.0)
    with pytest.raises(mp.DataError, match=f"{what} holds"):
        call(p, text)
    assert p.models.list() == []  # nothing registered


def test_system_tags_escape_a_command_line_that_is_not_utf8(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import mlplat as mp
        with mp.Platform({str(tmp_path / 'home')!r}) as p:
            with p.runs.start("e") as run:
                print(run.id)
    """))
    out = subprocess.run([sys.executable, str(script), b"--data=\xff"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    with mp.Platform(tmp_path / "home") as p:
        info = p.runs.get(out.stdout.strip())
    assert info.status == "finished" and info.tags["mlplat.entry_point"].endswith("--data=\\udcff")


def test_system_tags_hide_a_password_on_the_command_line(monkeypatch):
    """`mlplat demo --online-store redis://:s3cret@host/0` stored the password in every run's entry point, which
    `runs show` and `models lineage` print to anyone who can read the database."""
    from mlplat.runs.system import system_tags

    monkeypatch.setattr(sys, "argv", ["train.py", "--online-store", "redis://:s3cret@127.0.0.1:6391/0",
                                      "--database-url=postgresql://app:pw2@db/mlplat", "--lr=0.1",
                                      "db.url=postgresql://app:pw3@db/x", "+db={url:redis://u:pw4@h/0}",
                                      "-Dpostgresql://app:pw5@db/x", "cache=redis://h/0?password=pw6&db=1",
                                      "--db=postgresql://app:pw 7@db/x", "postgresql://app:pw'8@db/x?sslmode=require",
                                      "redis://:19/ab@h:6379/0?ssl_cert_reqs=none", "+db={url:redis://:110/abc@h/0}",
                                      '+db={"url":"redis://app:pw9@cache:6379/0","owner":"ana@corp.com"}',
                                      '["http://mlflow:5000/api","redis://app:pw10@cache/0","ana@corp.com"]',
                                      "--notify=x,http://hook:8080/x,ana@corp.com",
                                      '--config={"tracking":"http://mlflow:5000/api","owner":"ana@corp.com"}'])
    entry = system_tags()["mlplat.entry_point"]
    assert not any(f"pw{i}" in entry for i in range(2, 7)) and "s3cret" not in entry, entry
    assert not any(secret in entry for secret in ("pw 7", "pw'8", "19/ab", "110/abc", "pw9", "pw10")), entry
    assert "--notify=x,http://hook:8080/x,ana@corp.com" in entry, entry  # a port and an address: no password
    assert "--db=postgresql://app:***@db/x" in entry and entry.endswith(
        '--config={"tracking":"http://mlflow:5000/api","owner":"ana@corp.com"}'), entry  # a port, another value's @
    assert ("--online-store redis://:***@127.0.0.1:6391/0 --database-url=postgresql://app:***@db/mlplat --lr=0.1 "
            "db.url=postgresql://app:***@db/x +db={url:redis://u:***@h/0} -Dpostgresql://app:***@db/x "
            "cache=redis://h/0?password=***&db=1") in entry, entry


# ---------------------------------------------------- metrics after the run ended
def test_a_metric_logged_after_the_run_ended_is_written_at_once(p):
    with p.runs.start("e") as run:
        run.log_metric("loss", 0.5)
    run.log_metric("test_auc", 0.93)  # no flush, no close: nothing else would write it
    run.log_metrics({"test_loss": 0.25, "test_acc": 0.75})
    run.log_param("seed", 7)  # as params and tags are
    info = p.runs.get(run.id)
    assert info.status == "finished" and info.params == {"seed": "7"}
    assert info.metrics == {"loss": 0.5, "test_auc": 0.93, "test_loss": 0.25, "test_acc": 0.75}
    assert [(m.step, m.value) for m in p.runs.metric_history(run.id, "test_auc")] == [(0, 0.93)]


# ------------------------------------------------------ values of the wrong kind
@pytest.mark.parametrize("value, message", [
    ("abc", "must be a number, got 'abc'"),
    (10**400, "too large for a float"),
    (None, "must be a number, got None"),
    (torch.ones(3), "must be a number, got tensor"),
    (np.ones(3), "must be a number, got array"),
], ids=["text", "huge", "none", "tensor", "array"])
def test_an_epoch_with_a_value_that_is_not_a_number_is_refused_and_logs_nothing(lite, value, message):
    with lite.runs.training("t") as t:
        with pytest.raises(mp.DataError, match=f"metric 'acc'.*{message}"):
            t.epoch(loss=0.5, acc=value)
        assert t.epoch(loss=torch.tensor(0.25), acc=np.float32(0.5), n=torch.ones(1, requires_grad=True)) == 0
    history = lite.runs.metric_history(t.id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.25)]
    assert lite.runs.get(t.id).metrics == {"loss": 0.25, "acc": 0.5, "n": 1.0}


def test_a_metric_name_of_the_wrong_type_is_refused(lite):
    with lite.runs.start("e") as run:
        with pytest.raises(mp.DataError, match=r"metric name \['a'\] is invalid"):
            run.log_metric(["a"], 1.0)
        run.log_metric("a", 1.0)
    assert lite.runs.get(run.id).metrics == {"a": 1.0}


@pytest.mark.parametrize("args, message", [
    ((5, "k"), "run id must be a string"),
    ((None, "k"), "run id must be a string"),
    (("RUN", None), "metric name must be a string"),
    (("RUN", "k\x00"), "metric name holds a NUL character"),
])
def test_metric_history_refuses_ids_and_names_of_the_wrong_kind_on_both_backends(p, args, message):
    with p.runs.start("e") as run:
        run.log_metric("k", 1.0)
    with pytest.raises(mp.DataError, match=message):
        p.runs.metric_history(*(run.id if a == "RUN" else a for a in args))


# ---------------------------------------------------------------- model columns
@pytest.mark.parametrize("columns, message", [
    ("amount", r"columns must be a list or tuple of column names, got str 'amount': pass \['amount'\]"),
    ([1, 2, 3], "columns must be non-empty strings .* got 1"),
    (["a", "", "c"], "columns must be non-empty strings .* got ''"),
    (["a", "b"], "columns holds 2 names, but the model's input has 3 columns"),
    (["a", "a", "b"], "columns holds 'a' more than once"),
])
def test_log_model_refuses_bad_columns_and_stores_nothing(lite, columns, message):
    with lite.runs.start("e") as run:
        with pytest.raises(mp.DataError, match=message):
            run.log_model(torch.nn.Linear(3, 1), "m", example_input=torch.zeros(2, 3), columns=columns)
        meta = run.log_model(torch.nn.Linear(3, 1), "ok", example_input=torch.zeros(2, 3), columns=("a", "b", "c"))
    assert meta["columns"] == ["a", "b", "c"]
    assert [a["path"] for a in lite.runs.get(run.id).artifacts] == ["ok"]


def test_log_model_checks_columns_against_a_given_signature(lite):
    sig = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]}]}
    with lite.runs.start("e") as run:
        with pytest.raises(mp.DataError, match="columns holds 2 names, but the model's input has 3 columns"):
            run.log_model(torch.nn.Linear(3, 1), "m", signature=sig, columns=["a", "b"])
    assert lite.runs.get(run.id).artifacts == []


def test_a_model_that_fails_on_its_example_input_is_refused_with_a_signature_too(lite):
    """With a signature the example input was not run: a model that fails on it was stored."""
    sig = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 7]}],
           "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1]}]}
    with lite.runs.start("e") as run:
        with pytest.raises(mp.DataError, match=r"the model failed on example_input \(shape \(2, 7\)\)"):
            run.log_model(torch.nn.Linear(4, 1), "m", signature=sig, example_input=torch.zeros(2, 7))
        sig["inputs"][0]["shape"] = [-1, 4]
        run.log_model(torch.nn.Linear(4, 1), "ok", signature=sig, example_input=torch.zeros(2, 4))
    assert [a["path"] for a in lite.runs.get(run.id).artifacts] == ["ok"]


def test_a_model_that_fails_on_its_example_input_is_a_data_error(lite):
    with lite.runs.start("e") as run:
        with pytest.raises(mp.DataError, match=r"the model failed on example_input \(shape \(2, 5\)\): RuntimeError"):
            run.log_model(torch.nn.Linear(3, 1), "m", example_input=torch.zeros(2, 5))
    assert lite.runs.get(run.id).artifacts == []


@pytest.mark.parametrize("example, got", [
    ([[0.0, 0.0, 0.0]], "list holding list"), ({"x": torch.zeros(2, 3)}, "dict"), ((), "tuple"),
    ((torch.zeros(2, 3), 1.0), "tuple holding float"), (np.zeros((2, 3), dtype="float32"), "ndarray"),
])
def test_an_example_input_that_is_not_tensors_is_a_data_error(lite, example, got):
    """A list or dict was a raw AttributeError ('list' object has no attribute 'dtype'), in training() too."""
    message = rf"example_input must be a torch.Tensor, or a non-empty tuple or list of tensors .*, got {got}$"
    with lite.runs.start("e") as run:
        with pytest.raises(mp.DataError, match=message):
            run.log_model(torch.nn.Linear(3, 1), "m", example_input=example)
    with pytest.raises(mp.DataError, match=message):
        lite.runs.training("t", model=torch.nn.Linear(3, 1), example_input=example)
    assert lite.runs.get(run.id).artifacts == []


@pytest.mark.parametrize("alias, name", [("float", "float32"), ("long", "int64"), ("double", "float64"),
                                         ("half", "float16"), ("int", "int32")])
def test_a_signature_dtype_alias_is_stored_as_the_dtype_s_name(lite, alias, name):
    """'float' was stored as given, and export_triton and predict then refused it ('which Triton does not take')."""
    sig = {"inputs": [{"name": "x", "dtype": alias, "shape": [-1, 3]}],
           "outputs": [{"name": "y", "dtype": "float", "shape": [-1, 1]}]}
    with lite.runs.start("e") as run:
        run.log_model(torch.nn.Linear(3, 1), "m", signature=sig)
    stored = lite.runs.get(run.id).artifacts[0]["meta"]["signature"]
    assert [stored["inputs"][0]["dtype"], stored["outputs"][0]["dtype"]] == [name, "float32"]


@pytest.mark.parametrize("kwargs, message", [
    ({"example_input": torch.zeros(2, 5)}, "the model failed on example_input"),
    ({"example_input": torch.zeros(2, 3), "columns": ["a", "b"]}, "columns holds 2 names"),
    ({"columns": "amount"}, "columns must be a list or tuple"),
    ({"model": "not a module"}, "log_model takes a torch.nn.Module, got str"),
])
def test_training_checks_the_model_input_before_the_run_starts(lite, kwargs, message):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(mp.DataError, match=message):
        lite.runs.training("t", **{"model": model, **kwargs})
    assert _nothing_stored(lite) and model.training  # the probe left the model as it was


def test_training_probes_the_model_in_eval_mode_without_grad_and_leaves_it_as_it_was(lite):
    seen = []

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return self.linear(x)

    model = Net()
    with lite.runs.training("t", model=model, example_input=torch.zeros(2, 3), columns=["a", "b", "c"]) as t:
        assert seen == [(False, False)] and model.training
    assert lite.runs.get(t.id).artifacts[0]["meta"]["columns"] == ["a", "b", "c"]


# ----------------------------------------------------------------------- config
def test_a_config_whose_dotted_and_nested_keys_collide_is_refused(lite):
    with pytest.raises(mp.DataError, match="config: 'optim.lr' is given twice"):
        lite.runs.training("t", config={"optim.lr": 0.1, "optim": {"lr": 0.001}})
    with pytest.raises(mp.DataError, match="config: 'optim.lr' is given twice"):
        flatten_config({"optim": {"lr": 0.001}, "optim.lr": 0.1})
    assert _nothing_stored(lite)
    assert flatten_config({"optim.lr": 0.1, "optim": {"beta": 0.9}}) == {"optim.lr": 0.1, "optim.beta": 0.9}


# -------------------------------------------------------------------------- git
def test_a_script_that_git_does_not_track_marks_the_run_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "README").write_text("x")
    git("add", "README")
    git("commit", "-qm", "init")
    script = repo / "train.py"
    script.write_text(textwrap.dedent(f"""
        import mlplat as mp
        with mp.Platform({str(tmp_path / 'home')!r}) as p:
            with p.runs.start("git") as run:
                print(run.id)
    """))
    runs = []
    for commit in (False, True):
        if commit:
            git("add", "train.py")
            git("commit", "-qm", "train")
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=True)
        runs.append(out.stdout.strip())
    with mp.Platform(tmp_path / "home") as p:
        untracked, committed = (p.runs.get(r).tags for r in runs)
    assert untracked["mlplat.git.dirty"] == "true"
    assert committed["mlplat.git.dirty"] == "false" and committed["mlplat.git.commit"] == git("rev-parse", "HEAD")


class _Branchy(torch.nn.Module):
    """Not scriptable (``*rest``), and its output takes a branch on the data: a trace replays the example's."""

    def forward(self, x, *rest):
        if x.sum() > 0:
            return x * 2
        return x - 1


class _Traceable(torch.nn.Module):
    def forward(self, x, *rest):  # not scriptable either, but without a branch on the data; torch warns that
        return x * torch.tensor([2.0])  # the tensor is a constant of the trace, which it is: the trace is kept


class _MeanPool(torch.nn.Module):
    def forward(self, x, *rest):  # not scriptable; torch.tensor of the input's shape: the example's 4 rows, for good
        return x.sum(0, keepdim=True) / torch.tensor(list(x.shape))[0]


def test_a_trace_that_bakes_in_the_example_s_shape_is_not_kept(lite):
    """Only torch's 'registered as constants' warning comes with it, which a literal gives too: such a trace was
    kept, and load() divided every batch by 4."""
    with lite.runs.start("e") as run:
        with pytest.warns(UserWarning, match="stored without TorchScript"):
            meta = run.log_model(_MeanPool(), "model", example_input=torch.ones(4, 3))
    assert meta["torchscript"] is None and "registered as constants" in meta["torchscript_missing"]
    lite.models.register("pool", run.id)
    x = torch.full((2, 3), 5.0)
    torch.testing.assert_close(lite.models.load("pool", version=1)(x), _MeanPool()(x))


class _SeqMean(torch.nn.Module):
    def forward(self, x, *rest):  # the sequence length (dim 1) of the example baked in
        return x.sum(1) / torch.tensor(list(x.shape))[1]


class _Scaled(torch.nn.Module):
    def forward(self, x, k, *rest):  # a constant of a literal; a second input with no batch dimension
        return x * torch.tensor([2.0]) + k


class _ScaledMean(torch.nn.Module):
    def forward(self, s, x, *rest):  # a 0-d first input: the batch is the second's
        return s * x.sum(0) / torch.tensor(list(x.shape))[0]


class _PairMean(torch.nn.Module):
    def forward(self, x, *rest):  # takes an even length only: a batch of one row more is refused
        return x.view(-1, 2).sum() / torch.tensor(list(x.shape))[0]


_FREE_LENGTH = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1, 2]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}


@pytest.mark.parametrize("model, example, signature, kept", [
    (_SeqMean(), torch.ones(4, 10, 2), _FREE_LENGTH, False),  # a length the signature leaves free, baked in
    (_SeqMean(), torch.ones(4, 10, 2), None, True),  # the inferred signature fixes the length at 10: sound
    (_Scaled(), (torch.ones(4, 3), torch.tensor(1.0)), None, True),  # was dropped: the 0-d input could not grow
    (_ScaledMean(), (torch.tensor(2.0), torch.ones(3, 2)), None, False),  # was kept: the batch taken from input 0
    (_PairMean(), torch.ones(4), None, False),  # was kept: no grown input ran, taken as nothing shown
    (_MeanPool(), torch.ones(4, 3), None, False),
])
def test_a_trace_with_constants_is_checked_on_the_example_grown_where_the_signature_is_free(tmp_path, model, example,
                                                                                           signature, kept):
    from mlplat.runs.torch_io import save_torch_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = save_torch_model(model, tmp_path / "m", example_input=example, signature=signature)
    assert (meta["torchscript"] == "trace") is kept, meta["torchscript_missing"]


def test_a_trace_that_depends_on_the_data_is_not_kept(lite, tmp_path):
    """It was stored as model.ts and preferred by load() and export: -1s came back doubled, as the example's
    positive sum made the trace take that branch for every input."""
    with lite.runs.start("e") as run:
        with pytest.warns(UserWarning, match="stored without TorchScript: not scriptable, and its trace depends "
                                             "on the data.*TracerWarning"):
            meta = run.log_model(_Branchy(), "model", example_input=torch.ones(2, 3))
        traced = run.log_model(_Traceable(), "plain", example_input=torch.ones(2, 3))
    assert meta["torchscript"] is None and "torchscript" not in meta["files"] and "TracerWarning" in \
        meta["torchscript_missing"]
    assert traced["torchscript"] == "trace" and traced["torchscript_missing"] is None
    lite.models.register("m", run.id)
    torch.testing.assert_close(lite.models.load("m", version=1)(-torch.ones(1, 3)), torch.full((1, 3), -2.0))
    with pytest.raises(mp.DataError, match=r"no TorchScript file, which the python backend loads \(not scriptable, "
                                           r"and its trace depends on the data"):
        lite.serving.export_triton("m", version=1, repository=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_git_state_in_a_current_folder_deleted_under_the_process(tmp_path, monkeypatch):
    """git_state(None) looks in the current folder: Path.cwd() raised a raw FileNotFoundError as a run started."""
    from mlplat.runs.system import git_state

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert git_state(None) == ("", "")
