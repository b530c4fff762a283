"""Serving: Triton repositories, a real Triton server, both clients, the local backend, predict, A/B routing."""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import mlplat as mp
from mlplat.serving import TritonServer
from workers import in_forked_child, in_threads

NOW = datetime.now(timezone.utc).replace(microsecond=0)


class Scorer(torch.nn.Module):
    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.linear.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


class Slow(torch.nn.Module):
    """Tens of milliseconds per call: lets requests queue up behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(768, 768) / 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(x.shape[0], 768) + x.sum(dim=1, keepdim=True)
        for _ in range(150):
            y = torch.tanh(y @ self.w)
        return y[:, :2]


class RowSum(torch.nn.Module):
    """Sums each row, whatever its width (its input has a dimension of any size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


ANY_WIDTH = {"inputs": [{"name": "input__0", "dtype": "float32", "shape": [-1, -1]}],
             "outputs": [{"name": "output__0", "dtype": "float32", "shape": [-1, 1]}]}


def _register(p, name: str, module: torch.nn.Module, *, refs=None, train=None, columns=None, stage="production",
              signature=None):
    with p.runs.start(name) as run:
        if train is not None:
            run.log_input(train, "train", feature_refs=refs)
        if signature is not None:
            run.log_model(module, "model", signature=signature)
        else:
            run.log_model(module, "model", example_input=torch.zeros(2, 3), columns=columns)
    v = p.models.register(name, run.id)
    if stage:
        p.models.promote(name, v.version, stage, approved_by="reviewer")
    return v.version


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A platform with features, two versions of a scorer trained on them, and a slow model."""
    root = tmp_path_factory.mktemp("serving")
    p = mp.Platform(root / "home")
    src = root / "txn"
    src.mkdir()
    pq.write_table(pa.table({
        "user_id": pa.array([1, 2, 3], pa.int64()),
        "event_timestamp": pa.array([NOW - timedelta(hours=1)] * 3, pa.timestamp("us", "UTC")),
        "count": pa.array([3, 7, 1], pa.int64()), "amount": pa.array([10.0, 99.5, 0.5]),
    }), src / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView("txn", entities=[user], ttl=timedelta(days=7),
                          schema=[mp.Field("count", mp.Int64), mp.Field("amount", mp.Float64)],
                          source=mp.ParquetSource(src))
    p.features.apply([user, view])
    p.features.materialize(end_date=NOW, progress=False)
    labels = pa.table({"user_id": [1, 2], "event_timestamp": pa.array([NOW, NOW], pa.timestamp("us", "UTC"))})
    train = p.features.get_historical_features(labels, ["txn:count", "txn:amount"])
    cols = ["count", "amount", "basket"]  # "basket" is a request-time input, not a feature
    _register(p, "scorer", Scorer(0.0), refs=["txn:count", "txn:amount"], train=train, columns=cols)
    _register(p, "scorer", Scorer(3.0), refs=["txn:count", "txn:amount"], train=train, columns=cols,
              stage="staging")
    _register(p, "slow", Slow())
    _register(p, "rowsum", RowSum(), signature=ANY_WIDTH)
    yield p
    p.close()


@pytest.fixture(scope="session")
def repository(served, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    batching = mp.DynamicBatching(preferred_batch_sizes=[4, 8], max_queue_delay_us=20_000)
    for version in (1, 2):
        served.serving.export_triton("scorer", version=version, repository=repo, max_batch_size=8,
                                     dynamic_batching=batching)
    served.serving.export_triton("scorer", version=1, repository=repo, triton_name="scorer_quick", max_batch_size=8,
                                 dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=[4, 8],
                                                                     max_queue_delay_us=500))
    served.serving.export_triton("rowsum", repository=repo, max_batch_size=8, dynamic_batching=batching)
    slow = served.models.get("slow", stage="production").version
    served.serving.export_triton("slow", version=slow, repository=repo, triton_name="slow_full", max_batch_size=1,
                                 dynamic_batching=mp.DynamicBatching(queue_policy=mp.QueuePolicy(max_queue_size=1)))
    served.serving.export_triton("slow", version=slow, repository=repo, triton_name="slow_timeout",
                                 max_batch_size=1, dynamic_batching=mp.DynamicBatching(
                                     queue_policy=mp.QueuePolicy(default_timeout_us=20_000)))
    return repo


@pytest.fixture(scope="session")
def triton(repository, triton_python):
    with TritonServer(repository, python=triton_python) as server:
        yield server


# ------------------------------------------------------------------- export
def _parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_is_a_valid_triton_model_config_with_batching_and_lineage(served, tmp_path):
    batching = mp.DynamicBatching(preferred_batch_sizes=[4, 16], max_queue_delay_us=750, priority_levels=2,
                                  default_priority_level=1,
                                  queue_policy=mp.QueuePolicy(default_timeout_us=5000, max_queue_size=64))
    export = served.serving.export_triton("scorer", repository=tmp_path, max_batch_size=16,
                                          dynamic_batching=batching, instances=2)
    cfg = _parse_config(export.config_path.read_text())  # Triton's own protobuf schema reads it
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("scorer", "python", 16)
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 750
    assert cfg.dynamic_batching.priority_levels == 2
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert cfg.instance_group[0].count == 2
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input__0", [3])]
    assert cfg.parameters["mlplat.model"].string_value == "scorer"
    assert cfg.parameters["mlplat.version"].string_value == "1"
    assert cfg.parameters["mlplat.run_id"].string_value == served.models.get("scorer", version=1).run_id
    assert cfg.version_policy.HasField("all")
    assert sorted(p.name for p in (tmp_path / "scorer" / "1").iterdir()) == ["model.py", "model.ts"]


def test_a_batched_model_gets_the_dynamic_batcher_unless_told_otherwise(served, tmp_path):
    for kwargs, batched in [({}, True), ({"dynamic_batching": False}, False), ({"max_batch_size": 0}, False),
                            ({"dynamic_batching": True}, True)]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        export = served.serving.export_triton("scorer", repository=folder, **kwargs)
        cfg = _parse_config(export.config_path.read_text())
        assert cfg.HasField("dynamic_batching") == batched, kwargs
        if batched:  # no wait and no preferred size: whatever is queued together runs together
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
            assert list(cfg.dynamic_batching.preferred_batch_size) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_batch_size=4, dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=[8])),
         "preferred batch size 8 is above max_batch_size 4"),
        (dict(dynamic_batching=mp.DynamicBatching(preserve_ordering=True, priority_levels=2,
                                                  default_priority_level=1)), "preserve_ordering"),
        (dict(max_batch_size=0, dynamic_batching=mp.DynamicBatching()), "needs max_batch_size > 0"),
        (dict(backend="tensorrt"), "backend 'tensorrt' is not one of"),
        (dict(instances=0), "instances must be an integer >= 1"),
        (dict(dynamic_batching=mp.DynamicBatching(priority_levels=2, default_priority_level=3)),
         "default_priority_level must be between 1 and priority_levels"),
        (dict(dynamic_batching=mp.DynamicBatching(queue_policy=mp.QueuePolicy(timeout_action="drop"))),
         "timeout_action must be 'reject' or 'delay'"),
        (dict(max_batch_size=-1), "max_batch_size must be an integer >= 0"),
        # what Triton's config parser rejects (bools, fractions, strings) is refused before it is written
        (dict(max_batch_size=True), "max_batch_size must be an integer >= 0, got True"),
        (dict(max_batch_size=2**31), "max_batch_size must be an integer <= 2147483647"),
        (dict(instances=True), "instances must be an integer >= 1, got True"),
        (dict(dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=[True])),
         "a preferred batch size must be an integer >= 1, got True"),
        (dict(dynamic_batching=mp.DynamicBatching(max_queue_delay_us=250.5)),
         "max_queue_delay_us must be an integer >= 0, got 250.5"),
        (dict(dynamic_batching=mp.DynamicBatching(max_queue_delay_us="500")),
         "max_queue_delay_us must be an integer >= 0, got '500'"),
        (dict(dynamic_batching=mp.DynamicBatching(priority_levels=2.5, default_priority_level=1)),
         "priority_levels must be an integer >= 0, got 2.5"),
        (dict(dynamic_batching=mp.DynamicBatching(preserve_ordering="yes")), "preserve_ordering must be True or"),
        (dict(dynamic_batching=mp.DynamicBatching(queue_policy=mp.QueuePolicy(default_timeout_us=1.5))),
         "queue_policy.default_timeout_us must be an integer >= 0, got 1.5"),
        (dict(dynamic_batching=mp.DynamicBatching(queue_policy=mp.QueuePolicy(max_queue_size=10.0))),
         "queue_policy.max_queue_size must be an integer >= 0, got 10.0"),
        (dict(dynamic_batching=mp.DynamicBatching(queue_policy=mp.QueuePolicy(allow_timeout_override="no"))),
         "queue_policy.allow_timeout_override must be True or False, got 'no'"),
        # a Triton model name is a folder of the repository, and the config's name must equal it
        (dict(triton_name="../escaped"), "Triton model name '../escaped' is invalid: it names a folder"),
        (dict(triton_name="team/fraud"), "Triton model name 'team/fraud' is invalid"),
        (dict(triton_name='a"b'), "Triton model name 'a\"b' is invalid"),
        (dict(triton_name=".."), "Triton model name '..' is invalid"),
    ],
)
def test_invalid_settings_are_refused_before_anything_is_written(served, tmp_path, kwargs, message):
    with pytest.raises(mp.DataError, match=message):
        served.serving.export_triton("scorer", repository=tmp_path / "repo", **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing, in the repository or beside it


def test_a_version_exported_beside_others_must_keep_the_config_they_are_served_by(served, tmp_path):
    served.serving.export_triton("scorer", version=1, repository=tmp_path, backend="python", max_batch_size=8)
    config = tmp_path / "scorer" / "config.pbtxt"
    before = config.read_text()
    for kwargs in (dict(backend="pytorch_libtorch", max_batch_size=8), dict(max_batch_size=2),
                   dict(max_batch_size=8, dynamic_batching=mp.DynamicBatching(max_queue_delay_us=100))):
        with pytest.raises(mp.DataError, match=r"scorer already serves versions 1 with another config .* "
                                               r"export 'scorer' v2 with the same settings, or under another "
                                               r"triton_name="):
            served.serving.export_triton("scorer", version=2, repository=tmp_path, **kwargs)
        assert config.read_text() == before and sorted(p.name for p in (tmp_path / "scorer").iterdir()) == [
            "1", "config.pbtxt"]
    served.serving.export_triton("scorer", version=2, repository=tmp_path, backend="python", max_batch_size=8)
    cfg = _parse_config(config.read_text())
    runs = {str(v): served.models.get("scorer", version=v).run_id for v in (1, 2)}
    assert json.loads(cfg.parameters["mlplat.versions"].string_value) == runs  # each version's lineage
    assert cfg.parameters["mlplat.version"].string_value == "2"
    # the only version exported may change its settings: nothing else is served by the config
    served.serving.export_triton("scorer", version=1, repository=tmp_path / "alone", max_batch_size=8)
    served.serving.export_triton("scorer", version=1, repository=tmp_path / "alone", max_batch_size=2)
    assert _parse_config((tmp_path / "alone" / "scorer" / "config.pbtxt").read_text()).max_batch_size == 2


def test_an_exported_version_folder_is_readable_like_the_other_folders(served, tmp_path):
    old = os.umask(0o022)
    try:
        export = served.serving.export_triton("scorer", version=1, repository=tmp_path, max_batch_size=8)
    finally:
        os.umask(old)
    assert (export.model_dir / "1").stat().st_mode & 0o777 == 0o755  # was mkdtemp's 0700
    assert export.model_dir.stat().st_mode & 0o777 == 0o755


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_a_tensor_without_a_dimension_besides_the_batch_is_refused_at_export(served, tmp_path):
    """Triton would feed (batch, 1) to a model taking (batch,), which the local backend serves as (batch,)."""
    with served.runs.start("rank1") as run:
        run.log_model(Doubler(), "model", example_input=torch.zeros(4))
    v = served.models.register("rank1", run.id).version
    local = served.serving.local_backend().infer("rank1", {"input__0": np.array([1.0, 2.0], np.float32)}, version=v)
    assert local["output__0"].tolist() == [2.0, 4.0]
    with pytest.raises(mp.DataError, match=r"rank1 v1: tensor 'input__0' has shape \[-1\], with no dimension "
                                           r"besides the batch.*unsqueeze"):
        served.serving.export_triton("rank1", version=v, repository=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_libtorch_and_onnx_exports_compute_the_same_numbers(served, tmp_path):
    import onnxruntime as ort

    x = np.random.default_rng(0).random((5, 3), dtype=np.float32)
    want = served.serving.local_backend().infer("scorer", {"input__0": x})["output__0"]
    lib = served.serving.export_triton("scorer", repository=tmp_path, backend="pytorch_libtorch", max_batch_size=8)
    cfg = _parse_config(lib.config_path.read_text())
    # the signature's own names, which follow libtorch's name__<index> rule: predict and clients send the names
    # they send to every backend (it wrote INPUT__0, which predict, sending input__0, could not infer with)
    assert cfg.platform == "pytorch_libtorch" and [i.name for i in cfg.input] == ["input__0"]
    assert [o.name for o in cfg.output] == ["output__0"]
    named = {"inputs": [{"name": "features", "dtype": "float32", "shape": [-1, 3]}],
             "outputs": [{"name": "score", "dtype": "float32", "shape": [-1, 2]}]}
    version = _register(served, "named_io", Scorer(), signature=named, stage=None)
    other = _parse_config(served.serving.export_triton("named_io", version=version, repository=tmp_path / "n",
                                                       backend="pytorch_libtorch", max_batch_size=8)
                          .config_path.read_text())
    assert [i.name for i in other.input] == ["INPUT__0"] and [o.name for o in other.output] == ["OUTPUT__0"]
    module = torch.jit.load(str(tmp_path / "scorer" / "1" / "model.pt"))
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-6)
    onnx = served.serving.export_triton("scorer", repository=tmp_path / "o", backend="onnxruntime", max_batch_size=8)
    assert _parse_config(onnx.config_path.read_text()).platform == "onnxruntime_onnx"
    session = ort.InferenceSession(str(tmp_path / "o" / "scorer" / "1" / "model.onnx"))
    np.testing.assert_allclose(session.run(None, {"input__0": x})[0], want, rtol=1e-5)


def test_a_model_without_a_signature_is_refused(served, tmp_path):
    with served.runs.start("nosig") as run:
        run.log_model(Scorer(), "model")  # no example input: no signature
    v = served.models.register("nosig", run.id)
    with pytest.raises(mp.DataError, match="has no signature"):
        served.serving.export_triton("nosig", version=v.version, repository=tmp_path)
    with pytest.raises(mp.ServingError, match="nosig v1 was logged without a signature.*example_input= and columns="):
        served.serving.predict("nosig", [{"user_id": 1}], version=v.version)  # it said "nosig v1 has 0"


def test_an_onnx_export_keeps_every_dimension_of_any_size_dynamic(served, tmp_path):
    """Only the batch was dynamic: a width of any size (-1, as the config says) was fixed at the traced 2."""
    import onnxruntime as ort

    export = served.serving.export_triton("rowsum", repository=tmp_path, backend="onnxruntime", max_batch_size=8)
    assert [list(i.dims) for i in _parse_config(export.config_path.read_text()).input] == [[-1]]
    session = ort.InferenceSession(str(export.model_dir / "1" / "model.onnx"))
    for rows, width in ((3, 5), (1, 2), (8, 7)):
        x = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
        np.testing.assert_allclose(session.run(None, {"input__0": x})[0], x.sum(axis=1, keepdims=True))


class Masked(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True) if mask is None else (x * mask).sum(dim=1, keepdim=True)


class Ignores(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


class Window(torch.nn.Module):
    """A convolution of kernel 5 over a length of any size: it needs at least 5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 2, kernel_size=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=2)


def test_exports_a_backend_would_not_load_are_refused_and_write_nothing(served, tmp_path):
    """They were written, and the server refused the model: a libtorch forward with an optional argument (the
    config has one input), an ONNX graph without the input the model ignores (the config has two)."""
    version = _register(served, "masked", Masked(), stage=None)
    with pytest.raises(mp.DataError, match=r"libtorch backend loads a forward\(\) of 1 Tensor argument\(s\).*"
                                           r"\(x: Tensor, mask: Optional\[Tensor\]\); export it with backend='python'"):
        served.serving.export_triton("masked", version=version, repository=tmp_path / "l", backend="pytorch_libtorch",
                                     max_batch_size=8)
    served.serving.export_triton("masked", version=version, repository=tmp_path / "p", max_batch_size=8)  # it works
    with served.runs.start("ignores") as run:
        run.log_model(Ignores(), "model", example_input=(torch.zeros(2, 3), torch.zeros(2, 3)))
    served.models.register("ignores", run.id)
    with pytest.raises(mp.DataError, match=r"ONNX export left out the input\(s\) \['input__1'\], which the model "
                                           "does not use"):
        served.serving.export_triton("ignores", version=1, repository=tmp_path / "o", backend="onnxruntime",
                                     max_batch_size=8)
    assert not (tmp_path / "l" / "masked").exists() and not (tmp_path / "o" / "ignores").exists()


def test_a_libtorch_export_of_torchscript_this_process_cannot_load_is_written_unchecked(served, tmp_path,
                                                                                       monkeypatch):
    """An op library the server loads (LD_PRELOAD) and this process lacks, or a newer torch's file: the check of
    its forward made the export fail with a raw RuntimeError; it used to be copied, and is again."""
    def unknown_op(*args, **kwargs):
        raise RuntimeError("Unknown builtin op: myops::twice")

    monkeypatch.setattr(torch.jit, "load", unknown_op)
    export = served.serving.export_triton("scorer", version=1, repository=tmp_path, backend="pytorch_libtorch",
                                          max_batch_size=8)
    assert (export.model_dir / "1" / "model.pt").is_file()


def test_an_onnx_export_of_a_batched_model_traces_the_logged_shapes_and_keeps_the_batch_dynamic(served, tmp_path):
    """The traced input had every size of any size at 2 (a kernel of 5 failed on it), and a signature with a fixed
    first dimension was traced with it fixed (the onnxruntime backend refuses batching such a model)."""
    import onnxruntime as ort

    with served.runs.start("window") as run:
        run.log_model(Window(), "model", example_input=torch.zeros(2, 4, 16),
                      signature={"inputs": [{"name": "input__0", "dtype": "float32", "shape": [-1, 4, -1]}],
                                 "outputs": [{"name": "output__0", "dtype": "float32", "shape": [-1, 2]}]})
    served.models.register("window", run.id)
    export = served.serving.export_triton("window", version=1, repository=tmp_path, backend="onnxruntime",
                                          max_batch_size=8)
    session = ort.InferenceSession(str(export.model_dir / "1" / "model.onnx"))
    x = np.random.default_rng(1).random((3, 4, 9), dtype=np.float32)
    want = served.serving.local_backend().infer("window", {"input__0": x}, version=1)["output__0"]
    np.testing.assert_allclose(session.run(None, {"input__0": x})[0], want, rtol=1e-5, atol=1e-6)
    fixed = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 1]}]}
    version = _register(served, "fixed_first", RowSum(), signature=fixed, stage=None)
    export = served.serving.export_triton("fixed_first", version=version, repository=tmp_path, backend="onnxruntime",
                                          max_batch_size=8)
    session = ort.InferenceSession(str(export.model_dir / "1" / "model.onnx"))
    assert [i.shape[0] for i in session.get_inputs()] == ["batch"] and session.get_outputs()[0].shape[0] == "batch"
    np.testing.assert_allclose(session.run(None, {"x": np.ones((5, 3), np.float32)})[0], np.full((5, 1), 3.0))


def test_log_model_refuses_a_model_that_returns_a_dict(tmp_path):
    class Named(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"score": x.sum(dim=1)}

    with mp.Platform(tmp_path / "h") as p, p.runs.start("d") as run:
        with pytest.raises(mp.DataError, match="the model returned dict on example_input; a model serves a tensor, "
                                               "or a tuple or list of tensors"):
            run.log_model(Named(), "model", example_input=torch.zeros(2, 3))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() if f.is_file() else b"" for f in sorted(folder.rglob("*"))}


def test_an_export_into_another_models_or_runs_folder_or_a_file_is_refused_and_changes_nothing(served, tmp_path):
    """It replaced the other model's version 1 (and its config) silently, or mixed two models' versions in one."""
    repo = tmp_path / "repo"
    served.serving.export_triton("scorer", version=1, repository=repo, triton_name="shared", max_batch_size=8)
    before = _tree(repo)
    # another registered model under the same Triton name: its v1 would replace scorer's
    with pytest.raises(mp.DataError, match="shared serves registered model 'scorer', not 'rowsum'.*triton_name="):
        served.serving.export_triton("rowsum", version=1, repository=repo, triton_name="shared", max_batch_size=8)
    (repo / "hand").mkdir()  # a model folder mlplat did not write
    (repo / "hand" / "config.pbtxt").write_text('name: "hand"\nbackend: "python"\n')
    (repo / "bare" / "1").mkdir(parents=True)  # version folders without a config
    before = _tree(repo)
    with pytest.raises(mp.DataError, match=r"hand/config.pbtxt was not written by mlplat"):
        served.serving.export_triton("scorer", version=1, repository=repo, triton_name="hand")
    with pytest.raises(mp.DataError, match=r"bare holds 1 but no config.pbtxt"):
        served.serving.export_triton("scorer", version=1, repository=repo, triton_name="bare")
    # the same model and version from another platform's registry (another run): not the version being served
    other = mp.Platform(tmp_path / "other-home")
    try:
        _register(other, "scorer", Scorer(1.0))
        with pytest.raises(mp.DataError, match=r"shared/1 holds 'scorer' v1 of run \w+, not of run \w+"):
            other.serving.export_triton("scorer", version=1, repository=repo, triton_name="shared", max_batch_size=8)
    finally:
        other.close()
    assert _tree(repo) == before
    served.serving.export_triton("scorer", version=1, repository=repo, triton_name="shared", max_batch_size=8)
    assert _tree(repo) == before  # re-exporting the same version is fine: the same files
    (tmp_path / "file").write_text("not a folder")
    for repository in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(mp.ConfigError, match="file"):
            served.serving.export_triton("scorer", version=1, repository=repository)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_failed_export_leaves_no_half_written_version_and_keeps_the_old_one(served, tmp_path, monkeypatch):
    """A write that failed (a full disk) raised a bare OSError; a config that could not be written left the new
    version folder in place beside the old config, and a re-export had deleted the old folder before writing."""
    from mlplat.serving import triton_repo

    repo = tmp_path / "repo"
    served.serving.export_triton("scorer", version=1, repository=repo, max_batch_size=8)
    before = _tree(repo)
    real_copy, real_replace = shutil.copyfile, os.replace

    def disk_full(src, dst, **kwargs):
        Path(dst).write_bytes(b"half")
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(triton_repo.shutil, "copyfile", disk_full)
    for version in (1, 2):  # a re-export and a new version
        with pytest.raises(mp.StoreError, match=rf"could not write 'scorer' v{version} .*No space left on device"):
            served.serving.export_triton("scorer", version=version, repository=repo, max_batch_size=8)
        assert _tree(repo) == before
    monkeypatch.setattr(triton_repo.shutil, "copyfile", real_copy)

    def config_fails(src, dst):
        if Path(dst).name == "config.pbtxt":
            raise OSError(5, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(triton_repo.os, "replace", config_fails)
    for version in (1, 2):
        with pytest.raises(mp.StoreError, match="Input/output error"):
            served.serving.export_triton("scorer", version=version, repository=repo, max_batch_size=8)
        assert _tree(repo) == before  # no v2 served by v1's config; v1's folder is back as it was
    monkeypatch.setattr(triton_repo.os, "replace", real_replace)

    def onnx_fails(*args, **kwargs):
        Path(args[2]).write_bytes(b"half")
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", onnx_fails)
    with pytest.raises(mp.DataError, match="ONNX export failed: unsupported operator"):
        served.serving.export_triton("scorer", version=1, repository=tmp_path / "onnx", backend="onnxruntime")
    assert not (tmp_path / "onnx" / "scorer").exists()  # the model folder it made goes too: a server would not start


# ---------------------------------------------------------- a real server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_numbers_equal_the_local_backend(served, triton, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    x = np.random.default_rng(1).random((19, 3), dtype=np.float32)  # above max_batch_size: split and joined
    local = served.serving.local_backend()
    with mp.TritonClient(url, protocol=protocol) as client:
        assert client.is_live() and client.is_ready() and client.is_model_ready("scorer")
        assert client.info("scorer").max_batch_size == 8 and client.info("scorer").preferred_batch_sizes == (4, 8)
        for version in (1, 2):
            got = client.infer("scorer", {"input__0": x}, version=version)["output__0"]
            want = local.infer("scorer", {"input__0": x}, version=version)["output__0"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})  # a table's columns fill the input in order
        np.testing.assert_allclose(client.infer("scorer", table, version=1)["output__0"],
                                   local.infer("scorer", {"input__0": x}, version=1)["output__0"], rtol=1e-5)
        assert client.metadata("scorer")["name"] == "scorer"
        if protocol == "http":  # split requests reuse the client's worker threads and their connections
            for _ in range(10):
                client.infer("scorer", {"input__0": x}, version=1)
            assert len(client._http._threads) <= client._max_in_flight
        for backend in (client, local):  # no rows: answered as the local backend does, nothing sent to the server
            empty = backend.infer("scorer", {"input__0": x[:0]}, version=1)["output__0"]
            assert empty.shape == (0, 2) and empty.dtype == np.float32
        assert asyncio.run(_async_infer(url, protocol, {"input__0": x[:0]}))["output__0"].shape == (0, 2)
        for kwargs, name in (({"priority": -1}, "priority"), ({"timeout_us": -1}, "timeout_us"),
                             ({"version": "abc"}, "version"), ({"version": -1}, "version"),
                             ({"priority": 2**64}, "priority"), ({"timeout_us": 2**63}, "timeout_us"),
                             ({"outputs": 5}, "outputs"), ({"outputs": "x"}, "outputs")):
            for backend in (client, local):  # refused before sending: not a time-out, not an unknown model
                with pytest.raises(mp.DataError, match=f"^{name} must be"):  # (gRPC: a raw ValueError past 64 bits)
                    backend.infer("scorer", {"input__0": x}, **kwargs)
        for backend in (client, local):  # numpy's numbers are numbers; a generator of outputs is read once
            got = backend.infer("scorer", {"input__0": x}, version=np.int64(1), priority=np.uint8(0),
                                timeout_us=np.int64(0), outputs=(name for name in ["output__0"]))
            assert list(got) == ["output__0"]  # was {}: the generator was read empty after the check
        for backend in (client, local):  # writable whatever answered and however many rows (a server's answer of
            for rows in (2, 20):         # 2 rows was read-only, split into 3 requests writable, the local one too)
                out = backend.infer("scorer", {"input__0": np.ones((rows, 3), np.float32)}, version=1)["output__0"]
                out[0, 0] = 7.0


async def _async_infer(url: str, protocol: str, inputs) -> dict[str, np.ndarray]:
    async with mp.AsyncTritonClient(url, protocol=protocol) as c:
        return await c.infer("scorer", inputs, version=1)


class Difference(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b


def test_table_columns_named_after_two_inputs_fill_them_in_any_order(served, triton, tmp_path):
    """Inputs of dims [1] take 1-D columns named after them (the named path always failed the rank check)."""
    with served.runs.start("difference") as run:
        run.log_model(Difference(), "model", example_input=(torch.zeros(2, 1), torch.zeros(2, 1)))
    v = served.models.register("difference", run.id).version
    export = served.serving.export_triton("difference", version=v, repository=tmp_path, max_batch_size=8)
    table = pa.table({"input__1": pa.array([1.0, 2.0, 3.0], pa.float32()), "input__0": [10.0, 20.0, 30.0]})
    want = [[9.0], [18.0], [27.0]]
    local = served.serving.local_backend()
    assert local.infer("difference", table.to_pandas(), version=v)["output__0"].tolist() == want
    with mp.TritonClient(triton.grpc_url) as client:
        client.load_model("difference", export.model_dir)
        try:
            assert client.infer("difference", table, version=v)["output__0"].tolist() == want
            listed = pa.table({"input__0": pa.array([[0.5, 1.0, 1.5]] * 2, pa.list_(pa.float32(), 3))})
            np.testing.assert_allclose(client.infer("scorer", listed, version=1)["output__0"],
                                       local.infer("scorer", {"input__0": np.array([[0.5, 1.0, 1.5]] * 2,
                                                                                   np.float32)}, version=1)[
                                           "output__0"], rtol=1e-5)
        finally:
            client.unload_model("difference")


def test_the_http_client_keeps_a_few_connections_for_any_number_of_threads_and_close_releases_them(triton):
    """A thread per request (a web server's) kept a tritonclient client, socket and gevent hub per thread
    for good, and close() left the dead threads' pipes open; a split request after close() raised."""
    x = np.ones((2, 3), np.float32)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    client = mp.TritonClient(triton.http_url, protocol="http", max_in_flight=2)
    before = fds()
    for _ in range(20):
        t = threading.Thread(target=client.infer, args=("scorer", {"input__0": x}), kwargs={"version": 1})
        t.start()
        t.join()
    assert fds() - before <= 2 * 4  # two workers: a socket and the gevent hub's pipes each (3 per thread before)
    client.close()
    assert fds() <= before
    assert client.infer("scorer", {"input__0": np.ones((19, 3), np.float32)}, version=1)["output__0"].shape == (19, 2)
    client.close()
    assert fds() <= before


class Lookup(torch.nn.Module):
    """A table look-up: an index out of its range fails (the model's own error)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.arange(8, dtype=torch.float32).reshape(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0]].double()  # float64 out, where its signature says float32


LOOKUP = {"inputs": [{"name": "input__0", "dtype": "int64", "shape": [-1, 1]}],
          "outputs": [{"name": "output__0", "dtype": "float32", "shape": [-1, 2]}]}


class Picky(torch.nn.Module):
    """Fails on a negative value with a message that reads like a server state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("customer segment not found: the lookup timed out, queue full, not ready")
        return x * 2


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_s_own_error_is_a_serving_error_whatever_its_words(served, triton, tmp_path, protocol):
    """The error was classed by words of its text, the model's own included: this one was a ModelNotReadyError
    (an InferenceTimeoutError, a QueueFullError by other words), and a coalesced batch then gave it to every
    caller, as a server state, instead of sending the batch again caller by caller."""
    v = _register(served, "picky", Picky(), stage=None)
    export = served.serving.export_triton("picky", version=v, repository=tmp_path, max_batch_size=8)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with mp.TritonClient(url, protocol=protocol, coalesce=True, coalesce_wait_us=300_000) as client:
        client.load_model("picky", export.model_dir)
        try:
            got: dict[int, Any] = {}

            def call(k: int) -> None:
                try:
                    got[k] = client.infer("picky", {"input__0": np.full((1, 3), -1.0 if k == 0 else k, np.float32)},
                                          version=v)["output__0"].tolist()
                except mp.MlplatError as exc:
                    got[k] = exc

            in_threads(call, 3)
            assert type(got[0]) is mp.ServingError and "customer segment not found" in str(got[0]), got
            assert [got[1], got[2]] == [[[2.0] * 3], [[4.0] * 3]]
        finally:
            client.unload_model("picky")


def test_one_bad_request_fails_alone_in_a_dynamic_batch_and_the_local_backend_answers_alike(served, triton, tmp_path):
    """The generated model.py failed every request batched with a bad one; the local backend raised the model's
    bare IndexError (Triton: a ServingError), answered in float64 where Triton answers the signature's float32,
    ignored outputs= and took any misspelt argument (verison=2) silently."""
    v = _register(served, "lookup", Lookup(), signature=LOOKUP, stage=None)
    export = served.serving.export_triton("lookup", version=v, repository=tmp_path, max_batch_size=8,
                                          dynamic_batching=mp.DynamicBatching(max_queue_delay_us=500_000))
    good, bad = np.array([[1], [3]], np.int64), np.array([[9]], np.int64)
    local = served.serving.local_backend()
    want = local.infer("lookup", {"input__0": good}, version=v)["output__0"]
    assert want.dtype == np.float32 and want.tolist() == [[2.0, 3.0], [6.0, 7.0]]
    with pytest.raises(mp.ServingError, match=r"(?s)model 'lookup' v1 failed in the local backend: .*index 9 is out "):
        local.infer("lookup", {"input__0": bad}, version=v)
    assert list(local.infer("lookup", {"input__0": good}, version=v, outputs=["output__0"])) == ["output__0"]
    with pytest.raises(mp.DataError, match="has no output 'nope'"):
        local.infer("lookup", {"input__0": good}, version=v, outputs=["nope"])
    with pytest.raises(TypeError):
        local.infer("lookup", {"input__0": good}, verison=v)
    got: dict[str, Any] = {}
    with mp.TritonClient(triton.grpc_url) as client:
        client.load_model("lookup", export.model_dir)
        try:
            def call(k: int) -> None:  # sent together: the server's batcher waits up to 0.5 s to batch them
                try:
                    got[k] = client.infer("lookup", {"input__0": [good, bad][k]}, version=v)["output__0"]
                except mp.MlplatError as exc:
                    got[k] = exc

            in_threads(call, 2)
            assert isinstance(got[0], np.ndarray), got
            np.testing.assert_array_equal(got[0], want)
            assert got[0].dtype == want.dtype
            assert isinstance(got[1], mp.ServingError) and "index 9 is out of bounds" in str(got[1]), got
            assert _request_counts(triton, "lookup", str(v))[2] == 1  # one batch, answered request by request
            with pytest.raises(mp.DataError, match="has no output 'nope'"):  # was the server's refusal, a ServingError
                client.infer("lookup", {"input__0": good}, version=v, outputs=["nope"])
        finally:
            client.unload_model("lookup")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_export_sent_with_load_model_serves_without_shared_disk(served, triton, tmp_path, protocol):
    name = f"sent_{protocol}"  # written outside the server's repository: the files travel with the request
    export = served.serving.export_triton("scorer", version=2, repository=tmp_path / "elsewhere", triton_name=name,
                                          max_batch_size=8)
    x = np.random.default_rng(3).random((5, 3), dtype=np.float32)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with mp.TritonClient(url, protocol=protocol) as client:
        assert not client.is_model_ready(name)
        client.load_model(name, export.model_dir)
        assert client.is_model_ready(name)
        np.testing.assert_allclose(client.infer(name, {"input__0": x}, version=2)["output__0"],
                                   served.serving.local_backend().infer("scorer", {"input__0": x}, version=2)[
                                       "output__0"], rtol=1e-5, atol=1e-7)
        client.unload_model(name)
        with pytest.raises(mp.ConfigError, match="no config.pbtxt"):
            client.load_model(name, tmp_path)
        with pytest.raises(mp.ServingError, match="could not load 'not_in_the_repository'"):
            client.load_model("not_in_the_repository")


def test_dynamic_batching_shows_in_the_server_statistics(triton):
    before = _request_counts(triton, "scorer", "1")
    x = np.ones((1, 3), dtype=np.float32)
    with mp.TritonClient(triton.grpc_url) as client:  # no client-side merging: the server batches
        in_threads(lambda _: [client.infer("scorer", {"input__0": x}, version=1) for _ in range(10)], 8)
    after = _request_counts(triton, "scorer", "1", rows=before[0] + 80)
    inferences, executions = after[0] - before[0], after[2] - before[2]
    assert inferences == 80 and executions < inferences  # several requests per execution


def test_coalescing_clients_return_each_callers_own_rows(served, triton):
    rng = np.random.default_rng(2)
    rows = rng.random((64, 3), dtype=np.float32)
    want = served.serving.local_backend().infer("scorer", {"input__0": rows}, version=1)["output__0"]
    got: dict[int, np.ndarray] = {}
    before = _request_counts(triton, "scorer", "1")
    with mp.TritonClient(triton.grpc_url, coalesce=True) as client:
        def caller(i: int) -> None:
            got[i] = client.infer("scorer", {"input__0": rows[i : i + 1]}, version=1)["output__0"]

        in_threads(caller, 64)
        after = _request_counts(triton, "scorer", "1", rows=before[0] + 64)
        # merged on the client: 64 rows reached the server in fewer requests
        assert after[0] - before[0] == 64 and after[1] - before[1] < 64
        # a caller alone is answered (after at most the coalescing wait), and so is the next burst
        np.testing.assert_allclose(client.infer("scorer", {"input__0": rows[:1]}, version=1)["output__0"], want[:1],
                                   rtol=1e-5, atol=1e-7)
        # an error reaches every caller of the merged request
        errors = _concurrently(lambda: client.infer("scorer", {"input__0": rows[:1]}, version=99), 8)
        assert all(isinstance(e, mp.ModelNotReadyError) for e in errors), errors
    np.testing.assert_allclose(np.concatenate([got[i] for i in range(64)]), want, rtol=1e-5, atol=1e-7)

    async def main():
        async with mp.AsyncTritonClient(triton.grpc_url, coalesce=True) as c:
            outs = await asyncio.gather(*(c.infer("scorer", {"input__0": rows[i : i + 1]}, version=1)
                                          for i in range(64)))
            plain = await mp.AsyncTritonClient(triton.grpc_url).infer("scorer", {"input__0": rows}, version=1)
        return np.concatenate([o["output__0"] for o in outs]), plain["output__0"]

    merged, plain = asyncio.run(main())
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-7)

    # made outside any event loop (e.g. at import time), then used from two asyncio.run calls
    shared = mp.AsyncTritonClient(triton.grpc_url, coalesce=True)

    async def burst():
        outs = await asyncio.gather(*(shared.infer("scorer", {"input__0": rows[i : i + 1]}, version=1)
                                      for i in range(8)))
        return np.concatenate([o["output__0"] for o in outs])

    for _ in range(2):
        np.testing.assert_allclose(asyncio.run(burst()), want[:8], rtol=1e-5, atol=1e-7)
    asyncio.run(shared.close())


def test_coalesced_requests_of_other_widths_go_in_batches_of_their_own(triton):
    """A model with an input of any width: concurrent requests of 3 and of 5 values per row each get their own
    row sums (a width-5 request coalesced with width-3 ones failed every caller of the batch with numpy's
    ValueError), from threads and coroutines, over gRPC and HTTP."""
    def request(i: int) -> tuple[np.ndarray, float]:
        width = 5 if i % 3 == 0 else 3
        return np.full((1, width), float(i), np.float32), float(i * width)

    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        got: dict[int, Any] = {}
        with mp.TritonClient(url, protocol=protocol, coalesce=True, coalesce_wait_us=20_000) as client:
            def caller(k: int, client=client, got=got) -> None:
                for i in range(k, 120, 8):
                    try:
                        got[i] = float(client.infer("rowsum", {"input__0": request(i)[0]})["output__0"][0, 0])
                    except Exception as exc:  # noqa: BLE001 - collected for the assertion
                        got[i] = exc

            in_threads(caller, 8)
        assert got == {i: request(i)[1] for i in range(120)}, protocol

        async def main(url=url, protocol=protocol) -> list:
            async with mp.AsyncTritonClient(url, protocol=protocol, coalesce=True, coalesce_wait_us=20_000) as c:
                outs = await asyncio.gather(*(c.infer("rowsum", {"input__0": request(i)[0]}) for i in range(24)),
                                            return_exceptions=True)
            return [o if isinstance(o, BaseException) else float(o["output__0"][0, 0]) for o in outs]

        assert asyncio.run(main()) == [request(i)[1] for i in range(24)], protocol


def test_clients_serve_again_after_close_and_reconnect_within_a_second_of_a_server_coming_back(triton):
    """close() then a call: the gRPC client raised "Cannot invoke RPC on closed channel!" (a ValueError) for
    good and said the server was not live; HTTP opened its connections again. And a gRPC channel that failed to
    connect for a while backed off for seconds (gRPC's default back-off grows to minutes) before it tried a
    server that had come back: callers kept getting errors after it was ready."""
    x = np.ones((1, 3), np.float32)
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        client = mp.TritonClient(url, protocol=protocol)
        first = client.infer("scorer", {"input__0": x}, version=1)["output__0"]
        for _ in range(2):
            client.close()
            assert client.is_live()
            np.testing.assert_array_equal(client.infer("scorer", {"input__0": x}, version=1)["output__0"], first)
        client.close()

    import grpc
    from concurrent.futures import ThreadPoolExecutor
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Live(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):  # noqa: N802 - the service's name for it
            return service_pb2.ServerLiveResponse(live=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens there yet
    client = mp.TritonClient(url, timeout_s=1.0)
    t_end = time.monotonic() + 6.0
    while time.monotonic() < t_end:  # six seconds of failed connects: gRPC's own back-off would reach 4 s
        assert not client.is_live()
        time.sleep(0.05)
    server = grpc.server(ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Live(), server)
    server.add_insecure_port(url)
    server.start()
    try:
        t0 = time.monotonic()
        while not client.is_live() and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        assert time.monotonic() - t0 < 2.0  # back-off capped at 1 s (it took 3 s and more)
    finally:
        client.close()
        server.stop(None)


def test_async_coalescing_sends_short_batches_after_its_wait_and_never_sends_cancelled_callers(served, triton):
    rows = np.random.default_rng(5).random((6, 3), dtype=np.float32)
    want = served.serving.local_backend().infer("scorer", {"input__0": rows}, version=1)["output__0"]

    def check(i: int, out) -> None:
        np.testing.assert_allclose(out["output__0"], want[i : i + 1], rtol=1e-5, atol=1e-7)

    async def main() -> float:
        c = mp.AsyncTritonClient(triton.grpc_url, coalesce=True, coalesce_wait_us=300_000)
        await c.info("scorer")  # read once: the callers below enter the coalescer at once
        before = _request_counts(triton, "scorer", "1")

        def call(i: int) -> asyncio.Task:
            return asyncio.ensure_future(c.infer("scorer", {"input__0": rows[i : i + 1]}, version=1))

        # two callers at once: the first goes alone (one caller seen so far), the second waits for a partner
        t0 = time.perf_counter()
        first, second = call(0), call(1)
        check(0, await first)
        check(1, await second)  # sent alone once its 300 ms ran out (with the first it would take ~1 ms)
        waited = time.perf_counter() - t0
        # a caller cancelled while its batch waits is never sent; the others are unaffected
        third, fourth = call(2), call(3)
        await asyncio.sleep(0.02)
        fourth.cancel()
        check(2, await third)
        await asyncio.sleep(0.45)  # past the cancelled caller's wait
        assert fourth.cancelled()
        # close answers a batch still waiting instead of leaving its caller hanging
        fifth, sixth = call(4), call(5)
        await asyncio.sleep(0.02)
        await c.close()
        check(4, await fifth)
        check(5, await sixth)
        after = _request_counts(triton, "scorer", "1", rows=before[0] + 5)
        time.sleep(0.05)  # a sixth row, had the cancelled caller's been sent, would be counted by now
        after = _request_counts(triton, "scorer", "1")
        assert after[0] - before[0] == 5  # rows 0, 1, 2, 4, 5: row 3 never reached the server
        # an error reaches every caller of a merged request
        shared = mp.AsyncTritonClient(triton.grpc_url, coalesce=True)
        errors = await asyncio.gather(*(shared.infer("scorer", {"input__0": rows[i : i + 1]}, version=99)
                                        for i in range(6)), return_exceptions=True)
        await shared.close()
        assert all(isinstance(e, mp.ModelNotReadyError) for e in errors), errors
        return waited

    assert asyncio.run(main()) >= 0.29


def test_coalescers_follow_a_model_reloaded_with_a_smaller_batch_size(served, triton, tmp_path):
    """After load_model, merged requests keep to the new config (the server refuses a batch above its
    max_batch_size: a coalescer still holding the old config sent 8 rows to a model taking 4)."""
    name = "resized"
    x = np.random.default_rng(6).random((8, 3), dtype=np.float32)
    want = served.serving.local_backend().infer("scorer", {"input__0": x}, version=2)["output__0"]

    def folder(max_batch_size: int) -> Path:
        return served.serving.export_triton("scorer", version=2, repository=tmp_path / str(max_batch_size),
                                            triton_name=name, max_batch_size=max_batch_size).model_dir

    got: dict[int, Any] = {}
    with mp.TritonClient(triton.grpc_url, coalesce=True, coalesce_wait_us=50_000) as client:
        def caller(k: int) -> None:
            try:
                got[k] = client.infer(name, {"input__0": x[k : k + 1]}, version=2)["output__0"]
            except Exception as exc:  # noqa: BLE001 - asserted below
                got[k] = exc

        client.load_model(name, folder(8))
        for max_batch_size in (8, 4):
            if max_batch_size == 4:
                client.load_model(name, folder(4))
            for _ in range(3):
                in_threads(caller, 8)
                assert not [g for g in got.values() if isinstance(g, Exception)], got
                np.testing.assert_allclose(np.concatenate([got[k] for k in range(8)]), want, rtol=1e-5, atol=1e-7)
            assert client.info(name).max_batch_size == max_batch_size

    async def main() -> list:
        async with mp.AsyncTritonClient(triton.grpc_url, coalesce=True, coalesce_wait_us=50_000) as c:
            await c.load_model(name, folder(8))
            assert await c.is_live() and (await c.metadata(name))["name"] == name
            with pytest.raises(mp.ServingError, match="could not load 'not_in_the_repository'"):
                await c.load_model("not_in_the_repository")
            first = await asyncio.gather(*(c.infer(name, {"input__0": x[k : k + 1]}, version=2) for k in range(8)))
            await c.load_model(name, folder(4))
            second = await asyncio.gather(*(c.infer(name, {"input__0": x[k : k + 1]}, version=2) for k in range(8)))
            await c.unload_model(name)
            assert not await c.is_model_ready(name)
        async with mp.AsyncTritonClient("127.0.0.1:1") as dead:
            assert not await dead.is_live()
        return [first, second]

    for outs in asyncio.run(main()):
        np.testing.assert_allclose(np.concatenate([o["output__0"] for o in outs]), want, rtol=1e-5, atol=1e-7)


def test_coalescing_waits_as_long_as_its_callers_take_to_come_back(triton):
    """Callers that come back one after another, the last 1.2 ms after the first (longer than the model's
    0.5 ms queue delay), still fill their batches once the wait has adapted; with the wait fixed at
    0.5 ms, the batches go short."""
    row = np.zeros((1, 3), np.float32)

    def rows_per_request(client) -> float:
        before = _request_counts(triton, "scorer_quick", "1")

        def caller(k: int) -> None:
            for _ in range(60):
                client.infer("scorer_quick", {"input__0": row}, version=1)
                time.sleep(k * 0.0004)

        in_threads(caller, 4)
        after = _request_counts(triton, "scorer_quick", "1", rows=before[0] + 240)
        assert after[0] - before[0] == 240
        return 240 / (after[1] - before[1])

    with mp.TritonClient(triton.grpc_url, coalesce=True) as adaptive, \
            mp.TritonClient(triton.grpc_url, coalesce=True, coalesce_wait_us=500) as fixed:
        assert adaptive.info("scorer_quick").max_queue_delay_us == 500  # the adaptive wait starts at the fixed one
        assert rows_per_request(adaptive) >= 3.0
        assert rows_per_request(fixed) <= 2.5


def test_the_coalescing_wait_grows_while_batches_go_short_and_comes_back_when_they_fill():
    from mlplat.serving.client import _Patience

    fixed = _Patience(0.0005, adapts=False)
    for _ in range(20):
        fixed.ran_out()
    assert fixed.seconds == 0.0005  # coalesce_wait_us given: kept as given
    wait = _Patience(0.0005, adapts=True)
    seen = []
    for _ in range(40):
        wait.ran_out()
        seen.append(wait.seconds)
    assert seen == sorted(seen) and seen[0] > 0.0005 and seen[-1] == pytest.approx(0.005)  # at most 10x
    for _ in range(100):
        wait.gathered(0.00002)  # callers back at once again (or fewer of them, after a short batch)
    assert wait.seconds == 0.0005  # never below the model's queue delay


def _request_counts(triton, model: str, version: str, rows: int = 0) -> tuple[int, int, int]:
    """(rows inferred, requests that succeeded, executions) of a model version, from the server's statistics; with
    ``rows``, once at least that many rows are counted (5 s at most): a backend may report an execution's
    statistics after sending its responses, so a count read right after the answers must not race it."""
    import tritonclient.grpc as grpcclient

    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    deadline = time.monotonic() + 5
    while True:
        stats = raw.get_inference_statistics(model, version, as_json=True)["model_stats"][0]
        counted = int(stats.get("inference_count", 0))
        if counted >= rows or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    raw.close()
    success = stats.get("inference_stats", {}).get("success", {})
    return counted, int(success.get("count", 0)), int(stats.get("execution_count", 0))


def _concurrently(fn, n: int) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    in_threads(run, n)
    return results


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_hung_or_unreachable_server_gives_mlplat_errors_within_timeout_s(protocol):
    """A server that accepts connections and never answers, and a port nobody listens on: every call, sync
    and async, ends within the client's timeout_s with the mlplat error that says which (the HTTP clients let
    socket and aiohttp errors through, and gRPC calls other than infer waited 20 s or for ever)."""
    x = np.ones((1, 3), np.float32)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    gone_url = f"127.0.0.1:{gone.getsockname()[1]}"
    gone.close()  # nobody listens there now: connections are refused
    cases = ((f"127.0.0.1:{hung.getsockname()[1]}", mp.InferenceTimeoutError), (gone_url, mp.ModelNotReadyError))
    took: list[float] = []

    def timed(call, error, url) -> None:
        t0 = time.perf_counter()
        with pytest.raises(error, match=f"'scorer' at {url}"):
            call()
        took.append(time.perf_counter() - t0)

    try:
        for url, error in cases:
            with mp.TritonClient(url, protocol=protocol, timeout_s=0.5) as client:
                assert not client.is_live() and not client.is_model_ready("scorer")
                for call in (lambda: client.infer("scorer", {"input__0": x}), lambda: client.metadata("scorer"),
                             lambda: client.load_model("scorer")):
                    timed(call, error, url)

            async def main(url=url, error=error) -> None:
                async with mp.AsyncTritonClient(url, protocol=protocol, timeout_s=0.5) as c:
                    assert not await c.is_live()
                    for call in (lambda: c.infer("scorer", {"input__0": x}), lambda: c.metadata("scorer"),
                                 lambda: c.unload_model("scorer")):
                        t0 = time.perf_counter()
                        with pytest.raises(error, match=f"'scorer' at {url}"):
                            await call()
                        took.append(time.perf_counter() - t0)

            asyncio.run(main())
    finally:
        hung.close()
    assert len(took) == 12 and max(took) < 5, took  # bounded by timeout_s (0.5 s), not 20 s or 60 s


def test_http_calls_waiting_for_a_busy_connection_still_end_within_timeout_s():
    """12 threads calling a hung server through 2 HTTP connections: a call's timeout_s started only once a
    connection took it, so calls ended 0.5, 1, 1.5 ... 3 s after they were made; now each ends within
    timeout_s of being made, and one still queued then is not sent."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    client = mp.TritonClient(f"127.0.0.1:{hung.getsockname()[1]}", protocol="http", timeout_s=0.5, max_in_flight=2)
    ended: list[tuple[float, str]] = []

    def call(i: int) -> None:
        t0 = time.perf_counter()
        try:
            client.infer("scorer", {"input__0": np.ones((1, 3), np.float32)})
        except mp.InferenceTimeoutError as exc:
            ended.append((time.perf_counter() - t0, str(exc)))

    try:
        in_threads(call, 12)
    finally:
        client.close()
        hung.close()
    assert len(ended) == 12 and max(t for t, _ in ended) < 1.5, ended
    assert any("none of the client's 2 HTTP connections came free" in msg for _, msg in ended), ended
    assert all("'scorer'" in msg for _, msg in ended)


def _misbehaving_peer(answer: bytes | None) -> socket.socket:
    """A localhost peer that reads a request, then sends ``answer`` (None: nothing) and closes the connection."""
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = peer.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    if answer is not None:
                        conn.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return peer


def test_a_peer_that_closes_the_connection_or_is_not_triton_gives_mlplat_errors():
    """geventhttpclient's HTTPConnectionClosed / HTTPParseError and rapidjson's JSONDecodeError escaped raw."""
    html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 15\r\n\r\n<html>hi</html>"
    x = {"input__0": np.ones((1, 3), np.float32)}
    for answer, error in ((None, mp.ModelNotReadyError), (b"HELLO THERE\r\n\r\n", mp.ServingError),
                          (html, mp.ServingError)):
        peer = _misbehaving_peer(answer)
        url = f"127.0.0.1:{peer.getsockname()[1]}"
        try:
            with mp.TritonClient(url, protocol="http", timeout_s=2) as client:
                calls = [lambda: client.config("scorer"), lambda: client.infer("scorer", x),
                         lambda: client.metadata("scorer"), lambda: client.load_model("scorer")]
                for call in calls:
                    with pytest.raises(error):
                        call()

            async def main(url=url, error=error) -> None:
                async with mp.AsyncTritonClient(url, protocol="http", timeout_s=2) as c:
                    for call in (lambda: c.config("scorer"), lambda: c.infer("scorer", x)):
                        with pytest.raises(error):
                            await call()

            asyncio.run(main())
        finally:
            peer.close()
    with pytest.raises(mp.ConfigError, match="must be host:port"):
        mp.TritonClient("not a url::", protocol="http")


class _WebServer:
    """A plain HTTP server on a free localhost port that answers every GET and POST with 200 and
    ``answers[path]`` (else ``default``): a web server, not Triton, at the URL a client was given."""

    def __init__(self, default: bytes, answers: dict[str, bytes] | None = None) -> None:
        import http.server

        answers = answers or {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = answers.get(self.path.partition("?")[0], default)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> _WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("body", [b"", b"hello", b"{}", b"[1, 2]", b'"ok"', b'{"name": 3}'])
def test_a_web_server_that_answers_200_is_not_taken_for_triton(body):
    """load_model and unload_model "succeeded" and is_live / is_ready / is_model_ready said True against any
    server answering 200; metadata and config returned {} or raised a bare TypeError or KeyError."""
    x = {"input__0": np.ones((1, 3), np.float32)}
    not_triton = (r"127\.0\.0\.1:\d+ is not a Triton server: it answered .*Triton server's HTTP port|"
                  r"at 127\.0\.0\.1:\d+: the answer is not Triton's \(JSONDecodeError")  # the second: not JSON
    with _WebServer(body) as web:
        with mp.TritonClient(web.url, protocol="http", timeout_s=5) as client:
            for call in (lambda: client.load_model("scorer"), lambda: client.unload_model("scorer"),
                         client.is_live, client.is_ready, lambda: client.is_model_ready("scorer"),
                         lambda: client.metadata("scorer"), lambda: client.config("scorer"),
                         lambda: client.info("scorer"), lambda: client.infer("scorer", x)):
                with pytest.raises(mp.ServingError, match=not_triton) as raised:
                    call()
                assert not isinstance(raised.value, mp.ModelNotReadyError)  # the server is there: not Triton

        async def main() -> None:
            async with mp.AsyncTritonClient(web.url, protocol="http", timeout_s=5) as c:
                for call in (lambda: c.load_model("scorer"), lambda: c.unload_model("scorer"), c.is_live, c.is_ready,
                             lambda: c.is_model_ready("scorer"), lambda: c.metadata("scorer"),
                             lambda: c.config("scorer"), lambda: c.infer("scorer", x)):
                    with pytest.raises(mp.ServingError, match=not_triton):
                        await call()

        asyncio.run(main())


def test_an_inference_answer_without_the_outputs_asked_for_is_a_serving_error():
    """A server that answers the metadata and config requests as Triton does, but not the inference: the
    outputs came back as None."""
    config = {"name": "m", "max_batch_size": 8, "input": [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [3]}],
              "output": [{"name": "output__0", "data_type": "TYPE_FP32", "dims": [1]}]}
    answers = {"/v2": json.dumps({"name": "triton", "version": "2.50.0", "extensions": []}).encode(),
               "/v2/models/m/config": json.dumps(config).encode()}
    x = {"input__0": np.ones((2, 3), np.float32)}
    for infer_answer in (b"{}", b'{"model_name": "m", "outputs": []}'):
        with _WebServer(infer_answer, answers) as web:
            with mp.TritonClient(web.url, protocol="http", timeout_s=5) as client:
                assert client.is_live() and client.info("m").max_batch_size == 8  # Triton, as far as it shows
                with pytest.raises(mp.ServingError, match=r"is not a Triton server: it answered an inference "
                                                          r"request for model 'm'"):
                    client.infer("m", x)

            async def main(url=web.url) -> None:
                async with mp.AsyncTritonClient(url, protocol="http", timeout_s=5) as c:
                    assert await c.is_live()
                    with pytest.raises(mp.ServingError, match="is not a Triton server: it answered an inference"):
                        await c.infer("m", x)

            asyncio.run(main())


def test_queue_full_and_timeouts_become_mlplat_errors(served, triton):
    x = np.ones((1, 3), dtype=np.float32)
    with mp.TritonClient(triton.grpc_url) as client:
        full = _concurrently(lambda: client.infer("slow_full", {"input__0": x}), 8)
        assert any(isinstance(r, mp.QueueFullError) for r in full), full
        assert any(isinstance(r, dict) for r in full)  # the one running and the one queued still answer
        late = _concurrently(lambda: client.infer("slow_timeout", {"input__0": x}), 8)
        assert any(isinstance(r, mp.InferenceTimeoutError) for r in late), late
        per_request = _concurrently(lambda: client.infer("slow_full", {"input__0": x}, timeout_us=1), 4)
        assert all(isinstance(r, (dict, mp.ServingError)) for r in per_request)
        with pytest.raises(mp.ModelNotReadyError, match="'nope'.*not ready"):
            client.infer("nope", {"input__0": x})
        with pytest.raises(mp.ModelNotReadyError):
            client.infer("scorer", {"input__0": x}, version=99)
        with pytest.raises(mp.DataError, match="must have 2 dimensions"):
            client.infer("scorer", {"input__0": np.ones(3, np.float32)})
        for backend in (client, served.serving.local_backend()):  # refused before the model sees it
            with pytest.raises(mp.DataError, match=r"'input__0' of model 'scorer' must have shape \(batch, 3\), "
                                                   r"got \(2, 5\)"):
                backend.infer("scorer", {"input__0": np.ones((2, 5), np.float32)})
        with pytest.raises(mp.DataError, match=r"has no input 'x'; its inputs are \['input__0'\]"):
            client.infer("scorer", {"x": x})
        with pytest.raises(mp.DataError, match="needs an input 'input__0'"):
            client.infer("scorer", {})
    with mp.TritonClient("127.0.0.1:1", timeout_s=2) as dead:
        assert not dead.is_ready()
        with pytest.raises(mp.ModelNotReadyError):
            dead.infer("scorer", {"input__0": x})


# ------------------------------------------------------------------ predict
def test_predict_uses_online_features_and_logs_what_it_served(served, triton):
    rows = [{"user_id": 1, "basket": 2.0}, {"user_id": 2, "basket": 0.0}, {"user_id": 42, "basket": 1.0}]
    local = served.serving.predict("scorer", rows, backend=served.serving.local_backend())
    with mp.TritonClient(triton.grpc_url) as client:
        remote = served.serving.predict("scorer", rows, backend=client)
        staged = served.serving.predict("scorer", rows, backend=client, stage="staging")
    assert list(local) == ["user_id", "output__0"] and local.version == 1 and staged.version == 2
    np.testing.assert_allclose(remote["output__0"], local["output__0"], rtol=1e-5)
    assert remote.features == {"count": [3, 7, None], "amount": [10.0, 99.5, None]}
    x = np.array([[3, 10.0, 2.0], [7, 99.5, 0.0], [0, 0, 1.0]], dtype=np.float32)  # nulls serve as 0
    want = served.serving.local_backend().infer("scorer", {"input__0": x}, version=1)["output__0"]
    assert np.asarray(local["output__0"]).shape == (3, 2)  # both classes' scores per row (it kept the first only)
    np.testing.assert_allclose(local["output__0"], want, rtol=1e-6)
    log = served.serving.served_features("scorer")
    assert {"request_time", "model_version", "variant", "user_id", "count", "amount",
            "prediction.output__0[0]", "prediction.output__0[1]"} <= set(log.column_names)
    v2 = log.filter(pc.equal(log.column("model_version"), 2))  # the staged call's rows, in order
    logged = np.column_stack([v2.column(f"prediction.output__0[{j}]").to_numpy() for j in (0, 1)])
    np.testing.assert_allclose(logged, staged["output__0"], rtol=1e-6)
    assert set(log.column("model_version").to_pylist()) == {1, 2}
    refs, keys = served.serving.served_log.refs("scorer")
    assert refs == ["txn@1:count", "txn@1:amount"] and keys == ["user_id"]
    with pytest.raises(mp.DataError, match="needs a column 'basket'"):
        served.serving.predict("scorer", [{"user_id": 1}], backend=served.serving.local_backend())
    logged = served.serving.served_features("scorer").num_rows
    for nothing in ([], {"user_id": [], "basket": []}):  # no entity rows: an empty answer, nothing inferred or logged
        empty = served.serving.predict("scorer", nothing, backend=client)  # the client is closed: not called
        assert dict(empty) == {"user_id": [], "output__0": []} and empty.features == {"count": [], "amount": []}
    assert served.serving.served_features("scorer").num_rows == logged


def test_predict_sends_the_served_models_own_tensor_names(served, triton, tmp_path):
    # a pytorch_libtorch export names tensors INPUT__0 / OUTPUT__0 when the signature's names do not follow its
    # name__<index> rule; predict sent the signature's names ("needs an input 'INPUT__0'"). The python backend
    # reads its names from the config, so a config renamed that way stands in for such an export here.
    export = served.serving.export_triton("scorer", version=1, repository=tmp_path, triton_name="scorer_renamed",
                                          max_batch_size=8)
    config = export.config_path.read_text()
    export.config_path.write_text(config.replace('"input__0"', '"INPUT__0"').replace('"output__0"', '"OUTPUT__0"'))
    rows = [{"user_id": 1, "basket": 2.0}, {"user_id": 42, "basket": 1.0}]
    local = served.serving.predict("scorer", rows, version=1, backend=served.serving.local_backend(), log=False)
    with mp.TritonClient(triton.grpc_url) as client:
        client.load_model("scorer_renamed", export.model_dir)
        try:
            assert [n for n, _, _ in client.info("scorer_renamed").inputs] == ["INPUT__0"]
            remote = served.serving.predict("scorer", rows, version=1, backend=client, triton_model="scorer_renamed",
                                            log=False)
            assert list(remote) == ["user_id", "output__0"]  # named as the model was logged
            np.testing.assert_allclose(remote["output__0"], local["output__0"], rtol=1e-5)
        finally:
            client.unload_model("scorer_renamed")


def test_predict_refuses_a_request_time_column_of_another_length_than_the_entity_rows(served):
    backend = served.serving.local_backend()
    logged = served.serving.served_features("scorer").num_rows
    for rows, message in (({"user_id": [1, 2, 3], "basket": [1.0]}, "has 1 values for 3 entity rows"),
                          ({"user_id": [1, 2], "basket": [1.0, 2.0, 3.0]}, "has 3 values for 2 entity rows"),
                          ({"user_id": [1, 2], "basket": 1.0}, "of the entity rows must be a list with one value")):
        for log in (True, False):  # refused before inference, whether logged or not
            with pytest.raises(mp.DataError, match=f"column 'basket' {message}"):
                served.serving.predict("scorer", rows, backend=backend, log=log)
    assert served.serving.served_features("scorer").num_rows == logged
    ok = served.serving.predict("scorer", {"user_id": [1, 2], "basket": [1.0, 2.0]}, backend=backend, log=False)
    assert len(ok["output__0"]) == 2


def test_predict_refuses_features_never_materialized_at_the_trained_version(served, tmp_path):
    view = served.features.get_feature_view("txn")
    changed = mp.FeatureView("txn", entities=view.entities, ttl=timedelta(days=8), schema=view.schema,
                             source=view.source)
    served.features.apply([changed])  # version 2, never materialized
    with served.runs.start("v2") as run:
        run.log_input(pa.table({"user_id": [1], "event_timestamp": pa.array([NOW], pa.timestamp("us", "UTC")),
                                "count": [1]}), "train", feature_refs=["txn:count"])
        run.log_model(torch.nn.Linear(1, 1), "model", example_input=torch.zeros(2, 1))
    v = served.models.register("needs_v2", run.id)
    with pytest.raises(mp.ServingError, match="txn' at definition version 2.*never been materialized.*txn@2"):
        served.serving.predict("needs_v2", [{"user_id": 1}], version=v.version)
    served.features.materialize(views=["txn@2"], end_date=NOW, progress=False)
    out = served.serving.predict("needs_v2", [{"user_id": 1}], version=v.version)
    assert out.version == v.version and len(out["output__0"]) == 1
    served.features.apply([view])  # back to the first definition, as version 3: leave the session as it was


# ------------------------------------------------------------------ A/B
def test_a_users_variant_is_the_same_in_every_process(tmp_path):
    script = textwrap.dedent(f"""
        import json, mlplat as mp
        p = mp.Platform({str(tmp_path / 'home')!r})
        g = mp.ABGateway("fraud", "fraud@staging", 0.3, "exp", salt="2026-11", platform=p)
        print(json.dumps([g.variant(u) for u in range(2000)] + [g.variant(f"user-{{u}}") for u in range(200)]))
    """)
    runs = []
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    assert all(r == runs[0] for r in runs)
    share = runs[0][:2000].count("challenger") / 2000
    assert 0.27 < share < 0.33
    with mp.Platform(tmp_path / "home") as p:
        other_salt = mp.ABGateway("fraud", "fraud@staging", 0.3, "exp", salt="other", platform=p)
        assert [other_salt.variant(u) for u in range(2000)] != runs[0][:2000]


def test_a_user_is_one_user_whatever_type_the_id_arrives_as(served):
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "id-types", salt="s3", platform=served)
    for user in range(50):  # pandas turns an int id column with a missing value into floats
        forms = {user, float(user), np.int64(user), np.float32(user), str(user)}
        assert len({gateway.bucket(u) for u in forms}) == 1, user
    assert gateway.route(7.0).user_id == "7"
    for bad in (None, True, float("nan"), object()):
        with pytest.raises(mp.DataError, match="a user id must be a string or a number"):
            gateway.route(bad)
    gateway.close()


def test_gateway_routes_logs_and_summarizes(served):
    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "scorer-exp", salt="s1", platform=served)
    seen = {}
    for user in range(200):
        result = gateway.predict(user, [{"user_id": 1, "basket": 1.0}], backend=served.serving.local_backend())
        assert result.version == (2 if result.variant == "challenger" else 1)
        assert seen.setdefault(user, result.variant) == result.variant
        gateway.record_outcome(user, 1.0 if result.variant == "challenger" else 0.0)  # a planted difference
    assert gateway.route(7).variant == seen[7]  # routing again: the same variant
    summary = gateway.summary()
    v = summary["variants"]
    assert v["champion"]["users"] + v["challenger"]["users"] == 200
    assert v["challenger"]["decisions"] == v["challenger"]["users"] + (seen[7] == "challenger")
    assert v["challenger"]["mean"] == 1.0 and v["champion"]["mean"] == 0.0
    assert summary["difference"]["estimate"] == 1.0 and summary["difference"]["ci95"][0] > 0
    assert served.serving.served_features("scorer").filter(pa.compute.equal(
        pa.compute.field("variant"), "challenger")).num_rows > 0
    for fraction in (1.5, True, float("nan"), "0.1"):
        with pytest.raises(mp.DataError, match="challenger_fraction must be a share between 0 and 1, got"):
            mp.ABGateway("scorer", "scorer@2", fraction, "x", platform=served)
    with pytest.raises(mp.DataError, match="model reference"):
        mp.ABGateway("scorer@1@2", "scorer", 0.1, "x", platform=served)
    for bad in (float("nan"), float("inf"), "yes", None):
        with pytest.raises(mp.DataError, match="an outcome must be a (finite )?number"):
            gateway.record_outcome(1, bad)
    with pytest.raises(mp.DataError):  # refused before serving: not a decision the summary counts
        gateway.predict(999, [{"user_id": 1}], backend=served.serving.local_backend())
    after = gateway.summary()["variants"]
    assert sum(after[k]["decisions"] for k in after) == sum(v[k]["decisions"] for k in v)
    gateway.close()


def test_a_user_routed_to_both_variants_counts_once_for_the_first(served):
    before = mp.ABGateway("scorer", "scorer@staging", 0.0, "ramp-up", salt="r", platform=served)  # all champion
    after = mp.ABGateway("scorer", "scorer@staging", 1.0, "ramp-up", salt="r", platform=served)  # the split moved
    for user in range(40):
        before.route(user)
    before.flush()
    for user in range(40):
        after.route(user)
        after.record_outcome(user, 1.0)
    after.flush()
    v = after.summary()["variants"]
    assert v["champion"]["users"] == v["challenger"]["users"] == 40  # decisions: both, as they were made
    assert (v["champion"]["outcomes"], v["challenger"]["outcomes"]) == (40, 0)  # outcomes: once, first variant
    before.close()
    after.close()


def test_gateway_summary_takes_the_user_as_the_unit_on_every_database(database_url, tmp_path):
    # users reporting several like outcomes are fewer observations than their rows: the old per-row Welch error
    # was far too narrow; and the gateway's SQL had never run on PostgreSQL
    rng = np.random.default_rng(7)
    with mp.Platform(tmp_path / "home", database_url=database_url) as p:
        _register(p, "m", Scorer(0.0))
        _register(p, "m", Scorer(1.0), stage="staging")
        gateway = mp.ABGateway("m", "m@staging", 0.5, "clustered", salt="c", platform=p)
        sums: dict[str, list[float]] = {"champion": [], "challenger": []}
        counts: dict[str, list[int]] = {"champion": [], "challenger": []}
        rows: dict[str, list[float]] = {"champion": [], "challenger": []}
        for user in range(60):
            variant = gateway.route(user).variant
            level = rng.normal(10.0, 3.0) + (0.5 if variant == "challenger" else 0.0)
            values = level + rng.normal(0.0, 0.1, size=1 + user % 7)  # alike within a user
            for value in values:
                gateway.record_outcome(user, float(value))
            sums[variant].append(float(values.sum()))
            counts[variant].append(len(values))
            rows[variant].extend(values.tolist())
        summary = gateway.summary()
        gateway.close()

    def delta_variance(s: list[float], n: list[int]) -> float:  # brute force, numpy
        s_, n_ = np.asarray(s), np.asarray(n, dtype=float)
        r = s_.sum() / n_.sum()
        cov = np.cov(np.vstack([s_, n_]), ddof=1)
        return float((cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (len(s_) * n_.mean() ** 2))

    want = math.sqrt(sum(delta_variance(sums[v], counts[v]) for v in sums))
    got = summary["difference"]
    assert got["std_error"] == pytest.approx(want, rel=1e-9)
    assert got["estimate"] == pytest.approx(np.mean(rows["challenger"]) - np.mean(rows["champion"]), rel=1e-9)
    per_row = math.sqrt(sum(np.var(rows[v], ddof=1) / len(rows[v]) for v in rows))
    assert got["std_error"] > 1.5 * per_row  # what the old summary reported
    for v in sums:
        assert summary["variants"][v]["outcome_users"] == len(sums[v])
        assert summary["variants"][v]["outcomes"] == len(rows[v])
        assert summary["variants"][v]["mean"] == pytest.approx(np.mean(rows[v]), rel=1e-9)


def test_gateway_summary_keeps_the_spread_of_large_outcomes_and_refuses_a_bad_time(served):
    import statistics

    import sqlalchemy as sa

    from mlplat.db.models import ABOutcome

    gateway = mp.ABGateway("scorer", "scorer@staging", 0.5, "large-outcomes", salt="s2", platform=served)
    outcomes: dict[str, list[float]] = {"champion": [], "challenger": []}
    for user in range(100):
        variant = gateway.route(user).variant
        value = 1e9 + user % 5 + (1.0 if variant == "challenger" else 0.0)
        gateway.record_outcome(user, value, at=datetime(2026, 1, 1))  # naive: UTC
        outcomes[variant].append(value)
    for bad in ("2026-01-01T00:00:00", 1767225600, datetime(2026, 1, 1).date()):
        with pytest.raises(mp.DataError, match="at must be a datetime"):
            gateway.record_outcome(1, 1.0, at=bad)  # refused, not buffered to fail every later flush
    summary = gateway.summary()
    for variant, values in outcomes.items():
        got = summary["variants"][variant]
        assert got["outcomes"] == len(values) and got["mean"] == pytest.approx(statistics.fmean(values))
        assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-6)  # was 0.0: cancellation
    se = math.sqrt(sum(statistics.variance(v) / len(v) for v in outcomes.values()))
    low, high = summary["difference"]["ci95"]
    assert summary["difference"]["std_error"] == pytest.approx(se, rel=1e-6) and low < 1.0 < high and high - low > 1
    with served.db.connect() as conn:
        times = conn.execute(sa.select(ABOutcome.at).where(ABOutcome.experiment_id == "large-outcomes")).scalars()
        assert {t.replace(tzinfo=None) for t in times} == {datetime(2026, 1, 1)}
    gateway.close()


def test_served_log_sampling(tmp_path):
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path, sample_rate=0.25, seed=3)
    kept = sum(log.add("m", 1, "default", {"k": list(range(100))}, {"f": [1.0] * 100}, {"o": [0.5] * 100},
                       refs=["v@1:f"], types={"f": pa.float64()}) for _ in range(40))
    assert 800 < kept < 1200  # a quarter of 4,000
    assert log.read("m").num_rows == kept
    none = ServedLog(tmp_path / "none", sample_rate=0.0)
    assert none.add("m", 1, "d", {"k": [1]}, {}, {}, refs=[], types={}) == 0
    with pytest.raises(ValueError, match="sample_rate"):
        ServedLog(tmp_path, sample_rate=2)
    with pytest.raises(mp.DataError, match=r"columns \['f'\] of 'm' do not have the 2 rows"):
        ServedLog(tmp_path / "short").add("m", 1, "d", {"k": [1, 2]}, {"f": [1.0]}, {"o": [0.5, 0.5]}, refs=[],
                                          types={})
    log.close()
    none.close()


def test_versions_sharing_feature_refs_keep_every_logged_column(tmp_path):
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path)
    refs, types = ["txn@1:count"], {"count": pa.int64(), "model_version": pa.int64(), "input.basket": pa.float32()}
    log.add("m", 1, "default", {"user_id": [1, 2]}, {"count": [3, 7]}, {"output__0": [0.1, 0.2]}, refs=refs,
            types=types)
    log.flush()  # the first file holds no input.basket and no prediction.score
    log.add("m", 2, "default", {"user_id": [3, 4]}, {"count": [1, 2]}, {"output__0": [0.3, 0.4], "score": [1, 2]},
            refs=refs, types=types, inputs={"basket": [5.0, 6.0]})
    log.flush()
    table = log.read("m").sort_by("user_id")
    assert table.column("input.basket").to_pylist() == [None, None, 5.0, 6.0]
    assert table.column("prediction.score").to_pylist() == [None, None, 1.0, 2.0]
    assert table.column("prediction.output__0").to_pylist() == [0.1, 0.2, 0.3, 0.4]
    # a version whose output is wider logs one column per value: each column keeps one type across versions
    log.add("m", 3, "default", {"user_id": [5, 6]}, {"count": [4, 5]}, {"output__0": [[0.9, 0.1], [0.2, 0.8]]},
            refs=refs, types=types)
    table = log.read("m").sort_by("user_id")
    assert table.column("prediction.output__0").to_pylist() == [0.1, 0.2, 0.3, 0.4, None, None]
    assert table.column("prediction.output__0[0]").to_pylist() == [None] * 4 + [0.9, 0.2]
    assert table.column("prediction.output__0[1]").to_pylist() == [None] * 4 + [0.1, 0.8]
    [group] = log.groups("m", features_only=True)
    assert sorted(group.rows.column_names) == ["count", "model_version", "request_time", "user_id"]
    assert group.rows.num_rows == 6
    log.close()


def test_served_log_files_predict_did_not_write_are_a_store_error_naming_them(tmp_path):
    """served_features raised pyarrow's ArrowInvalid naming no file for a corrupt file, and read a foreign file
    (no served-log metadata) as rows of its own group."""
    p = mp.Platform(tmp_path / "home")
    log = p.serving.served_log
    _log_rows(log, 10)
    log.flush()
    folder = log.root / "m"
    [good] = folder.glob("*.parquet")
    rows = pq.read_table(good)
    for name, write in (("truncated", lambda f: f.write_bytes(good.read_bytes()[:-30])),
                        ("foreign", lambda f: pq.write_table(pa.table({"a": [1, 2]}), f)),
                        ("no-metadata", lambda f: pq.write_table(rows.replace_schema_metadata(None), f)),
                        ("bad-metadata", lambda f: pq.write_table(rows.replace_schema_metadata(
                            {**rows.schema.metadata, b"mlplat.refs": b"v@1:f"}), f))):
        bad = folder / f"20260101T000000-{name}.parquet"
        write(bad)
        for read in (lambda: p.serving.served_features("m"), lambda: log.groups("m", features_only=True),
                     lambda: log.ref_sets("m")):
            with pytest.raises(mp.StoreError, match=rf"log of 'm' holds files .*{bad.name} \(.*\); move them out "
                                                    rf"of {re.escape(str(folder))}"):
                read()
        bad.unlink()
    assert p.serving.served_features("m").num_rows == 10
    p.close()


def test_a_served_log_file_without_a_column_its_metadata_names_is_refused(tmp_path):
    """Read as nulls beside the files that have it: skew scored a feature not logged as mismatched, drift
    counted nulls that were never served."""
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path)
    for start in (0, 10):
        _log_rows(log, 10, start)
        log.flush()
    first, second = sorted((tmp_path / "m").glob("*.parquet"))
    full = pq.read_table(second)
    for drop in ("f", "k"):  # a feature, a join key
        pq.write_table(full.drop_columns([drop]), second)
        for read in (lambda: log.read("m"), lambda: log.groups("m", features_only=True)):
            with pytest.raises(mp.StoreError, match=rf"{second.name} \(no column for \['{drop}'\], which its "
                                                    r"metadata names\)"):
                read()
    pq.write_table(full, second)
    assert log.read("m").column("f").null_count == 0
    log.close()


def test_a_served_log_writer_removes_temporary_files_of_crashed_writes_once_an_hour_old(tmp_path):
    """A killed process leaves its hidden .<name>.parquet.tmp behind: readers skip it, and they piled up."""
    from mlplat.serving.served_log import ServedLog

    folder = tmp_path / "m"
    folder.mkdir()
    old, young = folder / ".20260101T000000-a.parquet.tmp", folder / ".20260101T000000-b.parquet.tmp"
    other = folder / ".someone-elses.tmp"  # not a temporary file of the log: not touched
    for f in (old, young, other):
        f.write_bytes(b"PAR1 half a file")
    two_hours_ago = time.time() - 7200
    for f in (old, other):
        os.utime(f, (two_hours_ago, two_hours_ago))
    os.utime(young, (time.time() - 3000, time.time() - 3000))  # another process's write may still be going
    log = ServedLog(tmp_path)
    _log_rows(log, 10)
    log.flush()
    assert not old.exists() and young.exists() and other.exists()
    assert log.read("m").num_rows == 10  # readers skip the young one
    log.close()


def _log_rows(log, n: int, start: int = 0) -> int:
    return log.add("m", 1, "default", {"k": list(range(start, start + n))}, {"f": [1.0] * n}, {"o": [0.5] * n},
                   refs=["v@1:f"], types={"f": pa.float64()})


def test_the_background_flusher_writes_a_served_log_when_it_is_full_or_old(tmp_path):
    """One file per max_rows rows or per max_age_s, not one per second (a day of steady serving made
    86,400 small files per model, each opened by every skew check)."""
    from mlplat import _background
    from mlplat.serving.served_log import ServedLog

    def files(log) -> int:
        return len(list((log.root / "m").glob("*.parquet")))

    young = ServedLog(tmp_path / "young", max_age_s=60)
    old = ServedLog(tmp_path / "old", max_age_s=2)  # roomy: a stalled test must not see it due too soon
    full = ServedLog(tmp_path / "full", max_rows=100)
    for log in (young, old, full):
        assert not log.due()
        _log_rows(log, 50)
    _log_rows(full, 50)  # 100 rows: full, which wakes the flusher (it may have written it already)
    assert (full.due() or files(full) == 1) and not old.due() and not young.due()
    time.sleep(2.1)
    assert (old.due() or files(old) == 1) and not young.due()  # the flusher's pass may have written it
    _background.wake()
    deadline = time.monotonic() + 10
    while (files(old) < 1 or files(full) < 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(2.5 * _background.interval)  # the flusher has passed more than twice: young is still buffered
    assert (files(young), files(old), files(full)) == (0, 1, 1)
    assert len(young) == 50 and young.read("m").num_rows == 50  # a reader flushes first: nothing is hidden
    for log in (young, old, full):
        log.close()


def test_a_large_served_log_buffer_converts_in_chunks_to_the_same_table(tmp_path, monkeypatch):
    """Chunked conversion (the GIL let go between chunks) gives the table one conversion gives, also when
    a column's first chunk is all null or a later chunk needs a wider type."""
    from mlplat.serving import served_log
    from mlplat.serving.served_log import ServedLog, _Batch, _table

    n = 95
    columns = {"request_time": list(range(n)), "k": list(range(n)), "s": [f"u{i}" for i in range(n)],
               "late": [None] * 40 + [float(i) for i in range(55)],  # first chunk all null
               "wide": list(range(30)) + [i + 0.5 for i in range(65)],  # ints, then floats
               "f": [None if i % 7 == 0 else i / 3 for i in range(n)]}
    batch = _Batch(["v@1:f"], ["k"], {"f": pa.float64()}, False)
    batch.columns, batch.rows = columns, n
    whole = _table(batch)
    monkeypatch.setattr(served_log, "_CHUNK", 16)
    chunked = _table(batch)
    assert chunked.schema == whole.schema and chunked.equals(whole)
    assert whole.schema.field("wide").type == pa.float64() and chunked.column("k").num_chunks > 1
    log = ServedLog(tmp_path)
    _log_rows(log, 100)
    log.flush()
    assert log.read("m").column("k").to_pylist() == list(range(100))
    log.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_flusher_thread_runs_at_a_lower_cpu_priority(tmp_path):
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path)  # registering starts the flusher if it is not running
    flusher = next(t for t in threading.enumerate() if t.name == "mlplat-flusher")
    deadline = time.monotonic() + 5
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    while os.getpriority(os.PRIO_PROCESS, flusher.native_id) != want and time.monotonic() < deadline:
        time.sleep(0.01)  # a flusher started just now lowers its priority first thing
    assert os.getpriority(os.PRIO_PROCESS, flusher.native_id) == want
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == want - 10 or want == 19  # ours unchanged
    log.close()


def test_rows_of_a_writer_dropped_without_close_are_still_written(served, tmp_path):
    """A gateway built per request and never closed, a served log whose owner is gone: nothing is lost."""
    import gc

    import sqlalchemy as sa

    from mlplat import _background
    from mlplat.db.models import ABDecision
    from mlplat.serving.served_log import ServedLog

    def route_and_drop() -> None:
        gateway = mp.ABGateway("scorer", "scorer@2", 0.5, "dropped", platform=served)
        for user in range(50):
            gateway.route(user)

    def log_and_drop() -> None:
        _log_rows(ServedLog(tmp_path / "young", max_age_s=0), 7)

    route_and_drop()
    log_and_drop()
    gc.collect()
    _background.wake()

    def stored() -> int:
        with served.db.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(ABDecision)
                                .where(ABDecision.experiment_id == "dropped")).scalar()

    # one background pass writes both, in no set order: wait for both (the file first was a flaky count of 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (stored() == 50 and list((tmp_path / "young").glob("*/*.parquet"))):
        time.sleep(0.05)
    assert stored() == 50 and ServedLog(tmp_path / "young").read("m").num_rows == 7
    # rows not yet due (max_age_s 30 s) of a log dropped before interpreter exit are written at exit
    script = textwrap.dedent(f"""
        import gc, pyarrow as pa
        from mlplat.serving.served_log import ServedLog
        log = ServedLog({str(tmp_path / "old")!r})
        log.add("m", 1, "d", {{"k": [1, 2, 3]}}, {{"f": [1.0, 2.0, 3.0]}}, {{"o": [0.1, 0.2, 0.3]}}, refs=["v@1:f"],
                types={{"f": pa.float64()}})
        del log
        gc.collect()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert ServedLog(tmp_path / "old").read("m").num_rows == 3


def test_a_served_log_used_after_close_writes_its_rows_as_before(tmp_path):
    """A closed platform opens again on later use; its served log dropped the rows of predictions made after
    close() (no flusher, no write at exit), with no error."""
    script = textwrap.dedent(f"""
        import pyarrow as pa
        from mlplat.serving.served_log import ServedLog
        log = ServedLog({str(tmp_path)!r})
        def add(n):
            log.add("m", 1, "d", {{"k": list(range(n))}}, {{"f": [1.0] * n}}, {{"o": [0.5] * n}}, refs=["v@1:f"],
                    types={{"f": pa.float64()}})
        add(2)
        log.close()
        add(3)  # after close(): not due yet (30 s), so written at interpreter exit
        log.close()
        log.close()  # twice: nothing buffered
        add(4)
    """)
    from mlplat.serving.served_log import ServedLog

    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert ServedLog(tmp_path).read("m").num_rows == 9  # 5 before: the rows after the last close() were lost


def test_writers_write_their_buffer_themselves_when_the_flusher_falls_behind(served, tmp_path, monkeypatch):
    """Back-pressure instead of memory growing without bound: a buffer holding BACKLOG times its flush size
    is written by the call that filled it (the niced flusher can starve on a saturated machine)."""
    from mlplat import _background
    from mlplat.serving import gateway
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path / "log", max_rows=100)
    _background.unregister(log)  # a flusher that never gets to it
    _log_rows(log, 399)
    assert len(log) == 399  # below the backlog: left to the flusher
    _log_rows(log, 1)  # the call that reaches BACKLOG x max_rows writes before it returns
    assert len(log) == 0 and len(list((tmp_path / "log" / "m").glob("*.parquet"))) == 1
    log.close()
    with served.runs.start("backlog") as run:
        buffer = run._metrics
        _background.unregister(buffer)
        buffer._max = 10
        for step in range(_background.BACKLOG * 10 - 1):
            run.log_metric("m", float(step), step=step)
        assert len(buffer) == 39
        run.log_metric("m", 39.0, step=39)
        assert len(buffer) == 0 and [pt.step for pt in served.runs.metric_history(run.id, "m")] == list(range(40))
    monkeypatch.setattr(gateway, "_MAX_ROWS", 5)
    ab = mp.ABGateway("scorer", "scorer@2", 0.5, "backlog", platform=served)
    _background.unregister(ab._writes)
    for user in range(_background.BACKLOG * 5 - 1):
        ab.record_outcome(user, 1.0)
    assert len(ab._writes) == 19
    ab.record_outcome(19, 1.0)
    assert len(ab._writes) == 0 and ab.summary()["experiment_id"] == "backlog"
    ab.close()


def test_a_flush_returns_after_a_flush_already_running_in_another_thread(tmp_path):
    """The background flusher may have taken the rows and be writing them: flush() must wait for it."""
    from mlplat.serving.served_log import ServedLog

    writing, finish = threading.Event(), threading.Event()

    class SlowDisk(ServedLog):
        def _write(self, model, table):
            writing.set()
            finish.wait(10)
            super()._write(model, table)

    log = SlowDisk(tmp_path)
    _log_rows(log, 50)
    other = threading.Thread(target=log.flush)
    other.start()
    assert writing.wait(10)  # the other flush holds the rows, not yet on disk
    threading.Timer(0.3, finish.set).start()
    log.flush()
    assert len(list((tmp_path / "m").glob("*.parquet"))) == 1  # on disk when flush() returned
    other.join()
    assert log.read("m").num_rows == 50
    log.close()


def test_rows_that_cannot_become_a_table_are_dropped_with_an_error_and_the_rest_written(tmp_path):
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path)
    log.add("bad", 1, "default", {"k": [1, 2]}, {"f": ["not a number", 2.0]}, {"o": [0.5, 0.5]}, refs=["v@1:f"],
            types={"f": pa.float64()})
    _log_rows(log, 10)
    with pytest.raises(mp.DataError, match=r"dropped rows it could not store: 2 rows of 'bad' v1"):
        log.flush()
    assert len(log) == 0 and log.read("m").num_rows == 10 and not (tmp_path / "bad").exists()
    log.flush()  # nothing left to fail on
    log.close()


def test_rows_a_failed_flush_could_not_write_are_kept_for_the_next(tmp_path):
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path)
    (tmp_path / "m").write_text("a file where the model's folder goes")
    _log_rows(log, 30)
    with pytest.raises(mp.StoreError, match=r"writing to .*/m failed \(\[Errno 17\] File exists"):  # was OSError
        log.flush()
    assert len(log) == 30
    _log_rows(log, 20, start=30)  # logged after the failure: kept behind the first rows
    (tmp_path / "m").unlink()
    log.flush()
    assert len(log) == 0 and log.read("m").column("k").to_pylist() == list(range(50))
    log.close()


def test_a_log_that_cannot_be_written_does_not_fail_the_calls_that_add_to_it(tmp_path, caplog):
    """A full disk: the predict call that found the backlog wrote it itself and raised a raw OSError, as did every
    later one, each trying the whole backlog again; now the rows stay buffered (up to a bound, then new ones are
    dropped with a warning), flush() raises a StoreError naming the folder, and a later flush writes them."""
    import logging

    from mlplat.serving import served_log

    log = served_log.ServedLog(tmp_path / "served", max_rows=10, max_age_s=3600)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "m").write_text("a file where the model's folder goes")
    with caplog.at_level(logging.WARNING, logger="mlplat"):
        for i in range(50):
            _log_rows(log, 5, start=5 * i)
    assert len(log) == served_log._FULL * 10  # kept up to the bound, the rest dropped
    assert sum("drops new rows" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(mp.StoreError, match=r"'m': writing to .*served/m failed .*stay buffered: the next flush"):
        log.flush()
    (tmp_path / "served" / "m").unlink()
    log.flush()
    assert log.read("m").num_rows == served_log._FULL * 10 and len(log) == 0
    log.close()


def test_a_log_that_cannot_be_written_stays_within_its_bound_under_many_serving_threads(tmp_path):
    """Rows a failing flush had taken out did not count against the bound, and every thread finding the backlog
    converted it again: 4 threads buffered 9.7x the bound (6 GB) and waited up to 18 s in add() (12x here)."""
    from mlplat.serving import served_log

    log = served_log.ServedLog(tmp_path, max_rows=2_000, max_age_s=3600)
    (tmp_path / "m").write_text("a file where the model's folder goes")
    bound = served_log._FULL * 2_000
    peak = [0]
    stop = time.monotonic() + 3

    def serve(_: int) -> None:
        i = 0
        while time.monotonic() < stop:
            _log_rows(log, 100, start=i)
            peak[0] = max(peak[0], len(log) + getattr(log, "_out", 0))
            i += 100

    in_threads(serve, 4)
    assert bound - 100 <= peak[0] <= bound  # held, and not by dropping too early
    assert log._failures >= 1
    (tmp_path / "m").unlink()
    log.flush()
    assert log.read("m").num_rows == bound
    log.close()

def test_a_slow_but_working_log_slows_its_callers_down_and_drops_nothing(tmp_path, monkeypatch):
    """The bound for a log that cannot be written dropped 74 % of the rows of one whose writes took 0.3 s: the
    callers that found the backlog no longer waited for it (only one per 5 s wrote it)."""
    from mlplat.serving import served_log

    writing = served_log.pq.write_table

    def slow_write(*args, **kwargs):
        time.sleep(0.2)
        return writing(*args, **kwargs)

    monkeypatch.setattr(served_log.pq, "write_table", slow_write)
    log = served_log.ServedLog(tmp_path, max_rows=200, max_age_s=3600)
    added = [0] * 4
    stop = time.monotonic() + 4

    def serve(t: int) -> None:  # until twice the bound is logged (or 4 s, where rows past the bound are dropped)
        while time.monotonic() < stop and sum(added) < 2 * served_log._FULL * 200:
            added[t] += _log_rows(log, 20, start=sum(added))

    in_threads(serve, 4)
    log.flush()
    assert log.read("m").num_rows == sum(added) > served_log._FULL * 200
    log.close()

def test_gateway_flush_returns_after_a_flush_already_running_in_another_thread(tmp_path):
    """Decisions taken by a flush that waits for the database are in it once a later flush() returns."""
    import sqlite3

    from mlplat.db.models import ABDecision
    from mlplat.serving.gateway import _Writes

    p = mp.Platform(tmp_path / "home")
    writes = _Writes(p.db)
    blocker = sqlite3.connect(tmp_path / "home" / "mlplat.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    writes.add(ABDecision, {"experiment_id": "e", "user_id": "u1", "variant": "champion", "model": "m",
                            "model_version": 1})
    other = threading.Thread(target=writes.flush)
    other.start()
    deadline = time.monotonic() + 10
    while len(writes) and time.monotonic() < deadline:  # the other flush has taken the row, waits for the lock
        time.sleep(0.005)
    assert len(writes) == 0
    threading.Timer(0.3, blocker.rollback).start()
    writes.flush()
    assert blocker.execute("SELECT user_id FROM ab_decisions").fetchall() == [("u1",)]
    other.join()
    writes.close()
    blocker.close()
    p.close()


def test_the_local_backend_serves_a_promotion_once_its_stage_look_up_is_old(served):
    first = _register(served, "flipped", Scorer(0.0))
    backend = served.serving.local_backend(version_cache_seconds=0)
    cached = served.serving.local_backend(version_cache_seconds=3600)
    x = {"input__0": np.array([[1.0, 2.0, 3.0]], np.float32)}
    v1 = backend.infer("flipped", x, version=first)["output__0"]
    np.testing.assert_array_equal(backend.infer("flipped", x)["output__0"], v1)
    np.testing.assert_array_equal(cached.infer("flipped", x)["output__0"], v1)
    second = _register(served, "flipped", torch.nn.Linear(3, 2))  # promoted to production
    v2 = backend.infer("flipped", x, version=second)["output__0"]
    assert not np.allclose(v1, v2)
    np.testing.assert_array_equal(backend.infer("flipped", x)["output__0"], v2)
    np.testing.assert_array_equal(cached.infer("flipped", x)["output__0"], v1)  # until its look-up is old


def test_inputs_that_would_change_on_the_way_to_the_model_are_refused():
    from mlplat.serving.shaping import ModelInfo, to_arrays

    ints = ModelInfo("m", (("x", "INT64", (2,)),), ("y",), 8, (), 0)
    with pytest.raises(mp.DataError, match=r"model 'm' hold nulls in columns 'a' \(1\): .*fill them"):
        to_arrays(ints, pa.table({"a": pa.array([1, None], pa.int64()), "b": pa.array([3, 4], pa.int64())}))
    with pytest.raises(mp.DataError, match=r"hold nulls in columns 'x' \(1\)"):  # a float input too: no NaN
        to_arrays(ModelInfo("m", (("x", "FP32", ()),), ("y",), 8, (), 0), pa.table({"x": [1.5, None], "z": [1, 2]}))
    for values, message in (([[2.7, 1.0]], r"is INT64 but holds fractions \(e.g. 2.7\)"),
                            ([[np.nan, 1.0]], "is INT64 but holds NaN or infinity")):
        with pytest.raises(mp.DataError, match=f"input 'x' of model 'm' {message}"):
            to_arrays(ints, {"x": np.array(values)})
    with pytest.raises(mp.DataError, match=r"is INT8: its values must lie in \[-128, 127\], got 1 to 300"):
        to_arrays(ModelInfo("m", (("x", "INT8", (2,)),), ("y",), 8, (), 0), {"x": np.array([[300, 1]])})
    whole = to_arrays(ints, {"x": np.array([[2.0, 1.0]])})["x"]  # whole numbers convert as they are
    assert whole.dtype == np.int64 and whole.tolist() == [[2, 1]]
    assert to_arrays(ints, pa.table({"a": [1, 2], "b": [3, 4]}))["x"].tolist() == [[1, 3], [2, 4]]


def test_table_columns_fill_inputs_exactly_and_ragged_lists_are_refused():
    from mlplat.serving.shaping import ModelInfo, to_arrays

    ints = ModelInfo("m", (("x", "INT64", (2,)),), ("y",), 8, (), 0)
    big = 2**53 + 1  # stacking int64 with float64 columns made float64 first: it came out as 2**53
    mixed = pa.table({"user_id": pa.array([big], pa.int64()), "flag": [1.0]})
    assert to_arrays(ints, mixed)["x"].tolist() == [[big, 1]]
    with pytest.raises(mp.DataError, match="input 'x' of model 'm' is INT64 but holds fractions"):
        to_arrays(ints, pa.table({"a": [1, 2], "b": [0.5, 1.0]}))
    with pytest.raises(mp.DataError, match="input 'x' of model 'm' is not a rectangular array"):
        to_arrays(ints, {"x": [[1, 2], [3]]})
    wide = ModelInfo("m", (("x", "FP32", (3,)),), ("y",), 8, (), 0)
    listed = pa.chunked_array([pa.array([[1, 2, 3]], pa.list_(pa.float32(), 3)),
                               pa.array([[4, 5, 6]], pa.list_(pa.float32(), 3))])
    assert to_arrays(wide, pa.table({"x": listed}))["x"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert to_arrays(wide, pa.table({"x": [[1.0, 2.0, 3.0]]}))["x"].tolist() == [[1, 2, 3]]
    with pytest.raises(mp.DataError, match="'x' of model 'm' takes 3 values per row: .*a list or fixed_size_list"):
        to_arrays(wide, pa.table({"x": [1.0, 2.0]}))
    with pytest.raises(mp.DataError, match="holds lists of 1 to 3 values"):
        to_arrays(wide, pa.table({"x": [[1.0, 2.0, 3.0], [1.0]]}))


class Half(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_a_bfloat16_model_is_refused_at_export_and_by_the_local_backend(served, tmp_path):
    """No backend here serves bfloat16 and no mlplat client carries it (numpy has none): it loaded and failed."""
    with served.runs.start("half") as run:
        run.log_model(Half(), "model", example_input=torch.zeros(2, 3, dtype=torch.bfloat16))
    v = served.models.register("half", run.id).version
    for backend in ("python", "pytorch_libtorch"):
        with pytest.raises(mp.DataError, match=r"tensor 'input__0' is bfloat16.*log the model in float32"):
            served.serving.export_triton("half", version=v, repository=tmp_path, backend=backend, max_batch_size=4)
    assert not (tmp_path / "half").exists()
    with pytest.raises(mp.ModelNotReadyError, match="'input__0' is bfloat16"):
        served.serving.local_backend().infer("half", {"input__0": np.ones((1, 3), np.float32)}, version=v)


def test_local_backend_and_server_errors(served, tmp_path):
    backend = served.serving.local_backend()
    with pytest.raises(mp.ModelNotReadyError, match="'ghost' is not ready"):
        backend.infer("ghost", {"input__0": np.ones((1, 3), np.float32)})
    assert not backend.is_model_ready("ghost") and backend.is_model_ready("scorer")
    with pytest.raises(mp.ConfigError, match="cannot import pytriton"):
        TritonServer(tmp_path, python=sys.executable).start()


def test_a_model_that_fails_to_load_is_named_with_the_servers_error_line(served, triton, triton_python, tmp_path):
    """The error was the log's last 3000 characters: a table of settings and shutdown lines, not the failure."""
    export = served.serving.export_triton("scorer", version=1, repository=tmp_path / "repo", triton_name="broken")
    (export.model_dir / "1" / "model.ts").write_bytes(b"not TorchScript")
    server = TritonServer(tmp_path / "repo", python=triton_python)
    with pytest.raises(mp.ServingError, match=r"exited \(1\): models that failed to load: 'broken'; server errors: "
                                              r".*failed to load 'broken' version 1: .*PytorchStreamReader"):
        server.start()
    assert not server.running and server._tmp is None  # nothing left running or behind
    with pytest.raises(mp.ConfigError, match="is not a folder"):
        TritonServer(tmp_path / "missing", python=triton_python).start()
    with pytest.raises(mp.ServingError, match="already running"):  # a second start left the first one orphaned
        triton.start()
    assert triton.running and mp.TritonClient(triton.grpc_url).is_ready()


def test_a_server_whose_chosen_port_was_taken_starts_on_other_ports(triton_python, tmp_path, monkeypatch):
    """A port chosen free and taken before Triton bound it (another process's connection) failed the start."""
    from mlplat.serving import server as server_module

    real, calls = server_module._free_ports, []

    def first_taken(n: int) -> list[int]:
        calls.append(n)
        ports = real(n)
        return [taken, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(server_module, "_free_ports", first_taken)
    (tmp_path / "repo").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with TritonServer(tmp_path / "repo", python=triton_python) as server:
            client = mp.TritonClient(server.grpc_url)
            assert server.http_port != taken and client.is_live() and len(calls) == 2
            client.close()


# ------------------------------------------------------------------ fork (a pre-fork server's workers)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_served_log_used_before_a_fork_writes_each_row_once_and_the_child_flushes_on_its_own(tmp_path):
    """Rows buffered at the fork were written by the parent and again by the child; the child had no
    flusher (its rows waited for its exit), and a flush running at the fork left its lock held forever."""
    from mlplat.serving.served_log import ServedLog

    log = ServedLog(tmp_path, max_age_s=0.1)
    _log_rows(log, 10)  # buffered in the parent when it forks

    def child():
        _log_rows(log, 10, start=100)
        deadline = time.monotonic() + 4
        while len(log) and time.monotonic() < deadline:  # the child's own flusher writes them
            time.sleep(0.02)
        assert len(log) == 0, f"{len(log)} rows still buffered in the child"
        _log_rows(log, 10, start=200)
        log.flush()  # returns: the lock a flush held at the fork is not the child's

    with log._flush_lock:  # a flush running (the flusher thread's, say) when the process forks
        code = in_forked_child(child)
    assert code == 0
    log.flush()
    keys = sorted(log.read("m").column("k").to_pylist())
    assert keys == [*range(10), *range(100, 110), *range(200, 210)]
    log.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_gateway_decisions_buffered_at_a_fork_are_written_once(tmp_path, monkeypatch):
    p = mp.Platform(tmp_path / "home")
    gateway = mp.ABGateway("m", "m@staging", 0.5, "fork-exp", salt="s", platform=p)
    monkeypatch.setattr(gateway, "_version", lambda variant: ("m", 1))  # no registered model needed
    for user in range(5):
        gateway.route(user)  # buffered in the parent when it forks

    def child():
        for user in range(100, 103):
            gateway.route(user)
        gateway.flush()

    with gateway._writes._flush_lock:  # a flush running when the process forks
        code = in_forked_child(child)
    assert code == 0
    variants = gateway.summary()["variants"]
    assert sum(v["decisions"] for v in variants.values()) == 8  # 5 + 3: none written twice
    assert sum(v["users"] for v in variants.values()) == 8
    gateway.close()
    p.close()


def test_a_closed_gateway_refuses_to_log_and_what_it_wrote_stays(tmp_path, monkeypatch):
    """route, predict and record_outcome after close() were accepted, and their rows buffered by a writer the
    flusher no longer knew: written by a later flush() if someone called it, else lost without a word."""
    p = mp.Platform(tmp_path / "home")
    gateway = mp.ABGateway("m", "m@staging", 0.5, "closed-exp", salt="s", platform=p)
    monkeypatch.setattr(gateway, "_version", lambda variant: ("m", 1))  # no registered model needed
    variant = gateway.route(1).variant
    gateway.record_outcome(1, 1.0)
    gateway.close()
    before = gateway.summary()
    assert before["variants"][variant]["decisions"] == before["variants"][variant]["outcomes"] == 1
    for call in (lambda: gateway.route(2), lambda: gateway.record_outcome(1, 0.0),
                 lambda: gateway.predict(2, [{"user_id": 2}])):
        with pytest.raises(mp.ServingError, match="ABGateway of experiment 'closed-exp' is closed: it logs no "
                                                  "more .*make a new mp.ABGateway"):
            call()
    gateway.flush()
    assert gateway.summary() == before and len(gateway._writes) == 0  # nothing buffered, nothing written
    assert gateway.variant(1) == variant  # routing questions that log nothing still answer
    gateway.close()  # closing again is fine
    p.close()


def test_predict_names_an_asyncio_client_given_as_its_backend(served):
    """It called the coroutine function and failed on the coroutine: a raw TypeError, and a never-awaited warning."""
    client = mp.AsyncTritonClient("127.0.0.1:1")
    with pytest.raises(mp.ServingError, match="predict runs synchronously: give it a synchronous backend"):
        served.serving.predict("scorer", [{"user_id": 1, "basket": 1.0}], backend=client)
