"""A Triton repository stays one the server starts on: a failed export leaves no model folder behind, and tensor
names are written so the server reads them; batching settings are kept as given; a model whose feature is named
as a served-log column is refused before serving, not logged into a batch its flush then dropped whole."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mlplat as mp
from mlplat.serving import TritonServer


class _NoOnnx(torch.nn.Module):
    """Traceable to TorchScript, not exportable to ONNX (torch.onnx has no linalg_svd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x @ x.transpose(0, 1))[1][:, None] + x[:, :1]


class _Sum(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


def _register(p: mp.Platform, name: str, module: torch.nn.Module, **log) -> int:
    with p.runs.start(name) as run:
        run.log_model(module, "model", **(log or {"example_input": torch.zeros(2, 3)}))
    return p.models.register(name, run.id).version


def test_a_failed_export_leaves_no_model_folder_and_the_server_starts(tmp_path, triton_python):
    repo = tmp_path / "repo"
    quoted = {"inputs": [{"name": 'amount"usd\\x', "dtype": "float32", "shape": [-1, 3]}],
              "outputs": [{"name": "total", "dtype": "float32", "shape": [-1, 1]}]}
    with mp.Platform(tmp_path / "home") as p:
        _register(p, "svd", _NoOnnx())
        _register(p, "quoted", _Sum(), signature=quoted)
        with pytest.raises(mp.DataError, match="ONNX"):
            p.serving.export_triton("svd", version=1, repository=repo, backend="onnxruntime", max_batch_size=8)
        assert not repo.exists() or list(repo.iterdir()) == []  # an empty 'svd' folder stopped the server
        p.serving.export_triton("quoted", version=1, repository=repo, max_batch_size=8)  # unreadable before
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        with TritonServer(repo, python=triton_python) as server, mp.TritonClient(server.grpc_url) as client:
            out = client.infer("quoted", {'amount"usd\\x': x})
            local = p.serving.local_backend().infer("quoted", {'amount"usd\\x': x}, version=1)
            np.testing.assert_allclose(out["total"], local["total"])
            np.testing.assert_allclose(out["total"], [[3.0], [12.0]])


def test_preferred_batch_sizes_are_a_list_or_tuple(tmp_path):
    with mp.Platform(tmp_path / "home") as p:
        _register(p, "sum", _Sum())
        with pytest.raises(mp.DataError, match="preferred_batch_sizes must be a list"):  # a generator: kept none
            p.serving.export_triton("sum", version=1, repository=tmp_path / "repo", max_batch_size=16,
                                    dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=(s for s in (4, 8))))
        done = p.serving.export_triton("sum", version=1, repository=tmp_path / "repo", max_batch_size=16,
                                       dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=(4, 8)))
        assert "preferred_batch_size: [ 4, 8 ]" in done.config_path.read_text()


def test_a_feature_named_as_a_served_log_column_is_refused_before_serving(tmp_path):
    src = tmp_path / "txn"
    src.mkdir()
    now = datetime.now(timezone.utc)
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()),
                             "event_timestamp": pa.array([now - timedelta(hours=1)] * 2, pa.timestamp("us", "UTC")),
                             "variant": [1.0, 2.0]}), src / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView("txn", entities=[user], ttl=timedelta(days=1), schema=[mp.Field("variant", mp.Float64)],
                          source=mp.ParquetSource(src))
    with mp.Platform(tmp_path / "home") as p:
        p.features.apply([user, view])
        p.features.materialize(progress=False)
        labels = pa.table({"user_id": [1], "event_timestamp": pa.array([now], pa.timestamp("us", "UTC"))})
        with p.runs.start("m") as run:
            run.log_input(p.features.get_historical_features(labels, ["txn:variant"]), "train",
                          feature_refs=["txn:variant"])
            run.log_model(torch.nn.Linear(1, 1), "model", example_input=torch.zeros(2, 1), columns=["variant"])
        p.models.promote("m", p.models.register("m", run.id).version, "production", approved_by="reviewer")
        backend = p.serving.local_backend()
        with pytest.raises(mp.ServingError, match=r"'variant' \(a join key or feature\) is named as a column the "
                                                  r"served-feature log writes.*log=False"):
            p.serving.predict("m", [{"user_id": 1}, {"user_id": 2}], backend=backend)
        served = p.serving.predict("m", [{"user_id": 1}, {"user_id": 2}], backend=backend, log=False)
        assert served.features == {"variant": [1.0, 2.0]}
        with pytest.raises(mp.NotFoundError):  # nothing was logged (the rows it took were dropped at its flush)
            p.serving.served_features("m")


def test_tensor_names_are_written_as_protobuf_text_reads_them():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from mlplat.serving.triton_repo import _quoted

    for name in ['a"b', "a\\b", "line\nbreak", "tab\t", "é😀", "plain"]:
        parsed = text_format.Parse(f"input [ {{ name: {_quoted(name)} data_type: TYPE_FP32 dims: [ 1 ] }} ]",
                                   model_config_pb2.ModelConfig())
        assert parsed.input[0].name == name


def test_a_signature_log_model_cannot_serve_is_refused_when_logged(tmp_path):
    """Stored as given before: a raw KeyError for a tensor without a dtype; an empty or repeated name, a shape
    'abc' (stored as ('a', 'b', 'c')), an unknown dtype, a string for a signature (logged as none)."""
    def sig(*inputs, outputs=({"name": "y", "dtype": "float32", "shape": [-1, 1]},)):
        return {"inputs": list(inputs), "outputs": list(outputs)}

    x = {"name": "x", "dtype": "float32", "shape": [-1, 3]}
    cases = [(sig({"name": "x"}), "with 'name', 'dtype' and 'shape'"),
             (sig({**x, "name": ""}), "needs a name"), (sig(x, x), "two tensors are named 'x'"),
             (sig({**x, "shape": "abc"}), "shape"), (sig({**x, "shape": [-1, 0]}), "positive integer"),
             (sig({**x, "dtype": "floaty"}), "not a torch dtype"), (sig(x, outputs=()), "outputs must be a non-empty"),
             ({"input": []}, "unknown key"), ("x", "must be an mp.Signature or a dict"), (sig(1), "with 'name'")]
    with mp.Platform(tmp_path / "home") as p:
        with p.runs.start("sum") as run:
            for signature, message in cases:
                with pytest.raises(mp.DataError, match=message):
                    run.log_model(_Sum(), "model", signature=signature)
            run.log_model(_Sum(), "model", signature=mp.Signature([mp.TensorSpec("x", "float32", [-1, 3])],
                                                                  [mp.TensorSpec("y", "float32", (-1, 1))]))
        assert [a["path"] for a in p.runs.get(run.id).artifacts] == ["model"]
        assert p.models.artifact_meta(p.models.get("sum", version=p.models.register("sum", run.id).version))[
            "signature"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3]}]
