"""Triton model repositories from registered model versions.

``export_triton`` writes ``<repository>/<model>/config.pbtxt`` and
``<repository>/<model>/<version>/`` for one of three backends:

* ``python``: a generated ``model.py`` that loads the TorchScript file with
  torch and runs each dynamic batch in one forward pass (what the Triton
  server bundled in the ``nvidia-pytriton`` wheel runs, CPU included);
* ``pytorch_libtorch``: ``model.pt`` (TorchScript) for the official image;
* ``onnxruntime``: ``model.onnx`` exported with ``torch.onnx``.

Inputs and outputs come from the version's signature; the version's lineage
(model, version, run id) goes into the config's ``parameters``, and
``mlplat.versions`` maps every exported version to its run id. Every exported
version of a model stays loaded (``version_policy: all``), and mlplat's
clients ask for the exact version they mean, so the one config serves them all:
an export that would change it under other versions is refused. Every setting
is checked before anything is written, and the version folder is written to
a temporary name and moved into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import TRITON_INT32_MAX, TRITON_UINT64_MAX, require_bool, require_number
from ..errors import ConfigError, DataError, StoreError
from ..models.registry import NAME_PATTERN

__all__ = ["DynamicBatching", "QueuePolicy", "TritonExport", "render_config", "BACKENDS", "TRITON_TYPES"]

BACKENDS = ("python", "pytorch_libtorch", "onnxruntime")

#: signature dtype -> Triton data type
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float64": "TYPE_FP64", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class QueuePolicy:
    """What Triton does with requests waiting in the dynamic batcher's queue.

    ``default_timeout_us``: a request waiting longer is rejected (``timeout_action="reject"``) or
    pushed back (``"delay"``); 0 means no time-out, and a per-request time-out is then ignored too.
    ``max_queue_size``: requests beyond it are refused at once (0: unbounded).
    """

    timeout_action: str = "reject"
    default_timeout_us: int = 0
    allow_timeout_override: bool = True
    max_queue_size: int = 0


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher: how long to wait for more requests and which batch sizes to aim for.

    >>> DynamicBatching(preferred_batch_sizes=[8, 16], max_queue_delay_us=500).max_queue_delay_us
    500
    """

    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_delay_us: int = 0
    priority_levels: int = 0
    default_priority_level: int = 0
    preserve_ordering: bool = False
    queue_policy: QueuePolicy | None = None


@dataclass(frozen=True)
class TritonExport:
    """What ``export_triton`` wrote."""

    repository: Path
    model: str
    version: int
    backend: str
    config_path: Path
    files: list[str]

    @property
    def model_dir(self) -> Path:
        """``<repository>/<model>``: what ``TritonClient.load_model`` can send to a server."""
        return self.repository / self.model




def _int(name: str, value: object, low: int, high: int) -> None:
    """An integer setting (not a bool, not a float: Triton's config parser takes neither) in [low, high]."""
    above = isinstance(value, int) and value > high
    require_number(name, value, low=low, high=high, integer=True,
                   meaning=f"an integer <= {high}" if above else f"an integer >= {low}")


def _check_name(name: object) -> None:
    """A Triton model name is its folder's name in the repository: a plain name, as the registry's."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DataError(f"Triton model name {name!r} is invalid: it names a folder of the repository, so use "
                        "letters, digits, '_', '-' and '.' (not first), at most 255; no '/' or quotes")


def _check(max_batch_size: int, batching: DynamicBatching | None, instances: int, backend: str) -> None:
    if backend not in BACKENDS:
        raise DataError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    _int("max_batch_size", max_batch_size, 0, TRITON_INT32_MAX)
    _int("instances", instances, 1, TRITON_INT32_MAX)
    if batching is None:
        return
    if not isinstance(batching, DynamicBatching):
        raise DataError(f"dynamic_batching must be an mp.DynamicBatching, got {batching!r}")
    if max_batch_size == 0:
        raise DataError("dynamic batching needs max_batch_size > 0 (with 0 the model takes no batch dimension)")
    if not isinstance(batching.preferred_batch_sizes, (list, tuple)):  # a generator would be used up by the check
        raise DataError(f"preferred_batch_sizes must be a list of integers, got {batching.preferred_batch_sizes!r}")
    for size in batching.preferred_batch_sizes:
        _int("a preferred batch size", size, 1, TRITON_INT32_MAX)
        if size > max_batch_size:
            raise DataError(f"preferred batch size {size} is above max_batch_size {max_batch_size}")
    _int("max_queue_delay_us", batching.max_queue_delay_us, 0, TRITON_UINT64_MAX)
    _int("priority_levels", batching.priority_levels, 0, TRITON_UINT64_MAX)
    _int("default_priority_level", batching.default_priority_level, 0, TRITON_UINT64_MAX)
    require_bool("preserve_ordering", batching.preserve_ordering)
    if batching.preserve_ordering and batching.priority_levels > 1:
        raise DataError("preserve_ordering cannot be combined with several priority levels: Triton would "
                        "reorder requests by priority")
    if batching.priority_levels and not 1 <= batching.default_priority_level <= batching.priority_levels:
        raise DataError(f"default_priority_level must be between 1 and priority_levels "
                        f"({batching.priority_levels})")
    if not batching.priority_levels and batching.default_priority_level:
        raise DataError("default_priority_level needs priority_levels")
    if batching.queue_policy is not None:
        _check_policy(batching.queue_policy)


def _check_policy(policy: QueuePolicy) -> None:
    if not isinstance(policy, QueuePolicy):
        raise DataError(f"queue_policy must be an mp.QueuePolicy, got {policy!r}")
    if policy.timeout_action not in ("reject", "delay"):
        raise DataError(f"queue_policy.timeout_action must be 'reject' or 'delay', got {policy.timeout_action!r}")
    _int("queue_policy.default_timeout_us", policy.default_timeout_us, 0, TRITON_UINT64_MAX)
    _int("queue_policy.max_queue_size", policy.max_queue_size, 0, TRITON_INT32_MAX)
    require_bool("queue_policy.allow_timeout_override", policy.allow_timeout_override)


def _check_ranks(model_name: str, version: int, signature: dict[str, Any], batched: bool) -> None:
    """Refuse tensors with no dimension besides the batch: Triton's config needs one, so the model would get
    ``(batch, 1)`` where it takes ``(batch,)`` (the local backend serves ``(batch,)``: they would differ)."""
    for t in [*signature["inputs"], *signature["outputs"]]:
        if not _dims_of(t["shape"], batched):
            raise DataError(f"{model_name} v{version}: tensor {t['name']!r} has shape {t['shape']}, with no dimension "
                            f"{'besides the batch' if batched else 'at all'}, which a Triton config cannot describe "
                            "as it is: log the model with one more dimension (e.g. x.unsqueeze(-1), shape (batch, 1))")


def _check_types(model_name: str, version: int, signature: dict[str, Any]) -> None:
    """Refuse tensor types that no backend here can serve and no mlplat client can send or read (bfloat16:
    numpy has no such type, so neither the generated model.py nor the clients can carry it)."""
    for t in [*signature["inputs"], *signature["outputs"]]:
        if t["dtype"] == "bfloat16":
            raise DataError(f"{model_name} v{version}: tensor {t['name']!r} is bfloat16, which the python backend's "
                            "model.py and mlplat's clients cannot carry (numpy has no bfloat16): log the model in "
                            "float32 (model.float(), with a float32 example_input) to serve it")


def _dims_of(shape: list[int], batched: bool) -> list[int]:
    return list(shape[1:]) if batched else list(shape)


def _dims(shape: list[int], batched: bool) -> list[int]:
    return _dims_of(shape, batched) or [1]


def _tensor(spec: dict[str, Any], batched: bool, name: str) -> str:
    dtype = TRITON_TYPES.get(spec["dtype"])
    if dtype is None:
        raise DataError(f"tensor {spec['name']!r} has dtype {spec['dtype']!r}, which Triton does not take")
    if not isinstance(name, str) or not name:
        raise DataError(f"tensor {name!r} of the model's signature: Triton needs each input and output named (a "
                        "non-empty string): log the model with a signature that names them")
    dims = ", ".join(str(d) for d in _dims(spec["shape"], batched))
    return f'  {{\n    name: {_quoted(name)}\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def _quoted(text: str) -> str:
    """``text`` as a protobuf text-format string: quotes, backslashes and control characters escaped (a tensor
    named 'amount"usd' made a config.pbtxt the server could not read, and no model of the repository loaded).

    >>> _quoted('amount"usd')
    '"amount\\\\042usd"'
    """
    return '"' + "".join(f"\\{ord(c):03o}" if ord(c) < 32 or c in '"\\' else c for c in text) + '"'


def _policy(p: QueuePolicy) -> str:
    return (f"timeout_action: {p.timeout_action.upper()}\n      default_timeout_microseconds: "
            f"{p.default_timeout_us}\n      allow_timeout_override: {str(p.allow_timeout_override).lower()}\n"
            f"      max_queue_size: {p.max_queue_size}")


def render_config(name: str, backend: str, signature: dict[str, Any], *, max_batch_size: int,
                  batching: DynamicBatching | None, instances: int, parameters: dict[str, str],
                  names: tuple[list[str], list[str]]) -> str:
    """config.pbtxt text (protobuf text format)."""
    batched = max_batch_size > 0
    lines = [f'name: "{name}"']
    lines.append({"python": 'backend: "python"', "pytorch_libtorch": 'platform: "pytorch_libtorch"',
                  "onnxruntime": 'platform: "onnxruntime_onnx"'}[backend])
    lines.append(f"max_batch_size: {max_batch_size}")
    lines.append("version_policy: { all: { } }")  # every exported version stays servable: A/B, rollbacks
    in_names, out_names = names
    lines.append("input [\n" + ",\n".join(_tensor(t, batched, n) for t, n in zip(signature["inputs"], in_names))
                 + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(t, batched, n) for t, n in zip(signature["outputs"], out_names))
                 + "\n]")
    if batching is not None:
        body = []
        if batching.preferred_batch_sizes:
            body.append(f"  preferred_batch_size: [ {', '.join(map(str, batching.preferred_batch_sizes))} ]")
        body.append(f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}")
        if batching.preserve_ordering:
            body.append("  preserve_ordering: true")
        if batching.priority_levels:
            body.append(f"  priority_levels: {batching.priority_levels}")
            body.append(f"  default_priority_level: {batching.default_priority_level}")
        if batching.queue_policy is not None:
            body.append("  default_queue_policy {\n      " + _policy(batching.queue_policy) + "\n  }")
        lines.append("dynamic_batching {\n" + "\n".join(body) + "\n}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]")
    for key, value in parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}')
    return "\n".join(lines) + "\n"


PYTHON_MODEL = '''"""Generated by mlplat: serves {model} v{version} (run {run_id}) with torch on Triton's python
backend."""
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        torch.set_num_threads(int(os.environ.get("MLPLAT_TORCH_THREADS", "1")))
        self.model = torch.jit.load(os.path.join(folder, "model.ts"), map_location="cpu").eval()
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        if self.batched and len(requests) > 1:  # the dynamic batch in one forward pass
            sizes = [a[0].shape[0] for a in arrays]
            try:
                batch = [np.concatenate([a[i] for a in arrays]) for i in range(len(self.inputs))]
                outs = self._run(batch)
            except Exception:  # one request's bad values: the others still get their answers
                return [self._answer(a) for a in arrays]
            responses, start = [], 0
            for n in sizes:
                responses.append(self._response([o[start:start + n] for o in outs]))
                start += n
            return responses
        return [self._answer(a) for a in arrays]

    def _answer(self, arrays):
        """One request's response, or its own error (the model's message) rather than the whole batch's."""
        try:
            return self._response(self._run(arrays))
        except Exception as exc:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{{type(exc).__name__}}: {{exc}}"))

    def _run(self, arrays):
        with torch.inference_mode():
            out = self.model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in outs]

    def _response(self, outs):
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, o.astype(dtype)) for (name, dtype), o in zip(self.outputs, outs)])
'''


def write_repository(repository: Path, model_name: str, version: int, backend: str, model_folder: Path,
                     meta: dict[str, Any], *, max_batch_size: int, batching: DynamicBatching | None,
                     instances: int, parameters: dict[str, str]) -> TritonExport:
    """Write the model's config and version folder (validated first; the folder moved into place)."""
    _check_name(model_name)
    _check(max_batch_size, batching, instances, backend)
    signature = meta.get("signature")
    if not signature or not signature.get("inputs") or not signature.get("outputs"):
        raise DataError(f"{model_name} v{version} has no signature: log the model with example_input= or "
                        "signature= so its inputs and outputs are known")
    _check_ranks(model_name, version, signature, max_batch_size > 0)
    _check_types(model_name, version, signature)
    if "torchscript" not in meta.get("files", {}) and backend in ("python", "pytorch_libtorch"):
        why = meta.get("torchscript_missing")  # recorded since mlplat kept traces that warned out
        raise DataError(f"{model_name} v{version} has no TorchScript file, which the {backend} backend loads ("
                        f"{why or 'the module was neither scriptable nor traceable'}): make the model scriptable "
                        "(torch.jit.script)" + ("" if why else ", or log it with example_input= so it can be traced"))
    names = ([t["name"] for t in signature["inputs"]], [t["name"] for t in signature["outputs"]])
    if backend == "pytorch_libtorch":  # its tensors are found by position: names must say it, as name__<index>
        names = (_positional(names[0], "INPUT"), _positional(names[1], "OUTPUT"))
    model_dir = repository / model_name
    config_path = model_dir / "config.pbtxt"
    _check_folders(repository, model_dir)
    try:
        old = config_path.read_text() if config_path.is_file() else None
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from None
    others = _other_versions(model_dir, version)
    _check_owner(model_dir, old, parameters.get("mlplat.model", model_name), version, parameters["mlplat.run_id"])
    lineage = {**(_lineage(old) if old else {}), str(version): parameters["mlplat.run_id"]}
    parameters = {**parameters, "mlplat.versions": json.dumps({v: lineage[v] for v in sorted(lineage, key=int)
                                                                if v in others or v == str(version)})}
    config = render_config(model_name, backend, signature, max_batch_size=max_batch_size, batching=batching,
                           instances=instances, parameters=parameters, names=names)
    if old is not None and others and _serving_part(old) != _serving_part(config):
        raise DataError(f"{model_dir} already serves versions {', '.join(others)} with another config (backend, "
                        f"inputs, outputs, batching or instances): one config.pbtxt serves every version of a Triton "
                        f"model, so export {model_name!r} v{version} with the same settings, or under another "
                        "triton_name=, or remove the other version folders first")
    # a model folder this export makes goes again should it fail: one without a config.pbtxt stops a Triton
    # server from starting on the repository at all
    created = not model_dir.exists()
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the Triton repository folder {model_dir}: {exc.strerror}") from None
    target = model_dir / str(version)
    staging = model_dir / f".{version}-{uuid.uuid4().hex}"
    aside = model_dir / f".{version}-old-{uuid.uuid4().hex}"
    moved = False
    try:
        # the umask's mode, as the other folders: mkdtemp's 0700 hid it from a server run as another user
        staging.mkdir()
        files = _write_version(staging, backend, model_folder, meta, signature, names, parameters,
                               batched=max_batch_size > 0)
        if target.exists():  # a re-export: the old folder is moved aside (kept until the config is written)
            os.rename(target, aside)
        os.rename(staging, target)
        moved = True
        tmp = model_dir / f".config.pbtxt.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_text(config)
            os.replace(tmp, config_path)
        finally:
            if tmp.exists():
                tmp.unlink()
    except BaseException as exc:
        # nothing half written stays where a server polling the repository would load it: the new version folder
        # goes, and the one it replaced comes back
        shutil.rmtree(target if moved else staging, ignore_errors=True)
        if aside.exists():
            os.rename(aside, target)
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StoreError(f"could not write {model_name!r} v{version} into the Triton repository {repository}: "
                             f"{exc.strerror or exc} ({exc.filename or model_dir}); nothing of it was left "
                             "there") from exc
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return TritonExport(repository, model_name, version, backend, config_path, files)


def _check_folders(repository: Path, model_dir: Path) -> None:
    """The repository and the model's folder are folders (or not there yet): a file in their place is refused."""
    for folder, what in ((repository, "Triton repository"), (model_dir, "model folder")):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"the {what} {folder} is a file, not a folder: pass a folder (or a path not there yet)")


def _check_owner(model_dir: Path, old: str | None, model: str, version: int, run_id: str) -> None:
    """Refuse to write into a model folder that holds another model, or a version folder that holds another run:
    an export would replace (or mix with) what a server serves under that name."""
    if not model_dir.is_dir():
        return
    if old is None:
        found = sorted(d.name for d in model_dir.iterdir() if not d.name.startswith("."))
        if found:
            raise DataError(f"{model_dir} holds {', '.join(found)} but no config.pbtxt: it is not a model mlplat "
                            f"exported; export {model!r} under another triton_name=, or remove the folder first")
        return
    owner = _parameter(old, "mlplat.model")
    if owner is None:
        raise DataError(f"{model_dir / 'config.pbtxt'} was not written by mlplat (it has no mlplat.model parameter): "
                        f"export {model!r} under another triton_name=, or remove the folder first")
    if owner != model:
        raise DataError(f"{model_dir} serves registered model {owner!r}, not {model!r}: export {model!r} under "
                        "another triton_name=, or remove the folder first")
    previous = _lineage(old).get(str(version))
    if (model_dir / str(version)).exists() and previous is not None and previous != run_id:
        raise DataError(f"{model_dir / str(version)} holds {model!r} v{version} of run {previous}, not of run "
                        f"{run_id} (another platform's registry?): export it under another triton_name=, or remove "
                        "the version folder first")


def _other_versions(model_dir: Path, version: int) -> list[str]:
    """The version folders of the model other than ``version``'s, in version order."""
    if not model_dir.is_dir():
        return []
    return sorted((d.name for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit() and d.name != str(version)),
                  key=int)


def _serving_part(config: str) -> str:
    """What Triton serves every version by: the config without mlplat's lineage parameters (written last)."""
    return config.split("\nparameters {", 1)[0]


def _parameter(config: str, key: str) -> str | None:
    """A string parameter of a config this module wrote (None when it has none)."""
    found = re.search(r'key: "' + re.escape(key) + r'"\n  value: \{ string_value: (".*") \}', config)
    try:
        value = json.loads(found.group(1)) if found else None
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _lineage(config: str) -> dict[str, str]:
    """``mlplat.versions`` of a config this module wrote: each exported version's run id."""
    try:
        found = json.loads(_parameter(config, "mlplat.versions") or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _write_version(folder: Path, backend: str, model_folder: Path, meta: dict[str, Any],
                   signature: dict[str, Any], names, parameters: dict[str, str], *, batched: bool) -> list[str]:
    ts = model_folder / meta["files"]["torchscript"] if "torchscript" in meta.get("files", {}) else None
    if backend == "python":
        shutil.copyfile(ts, folder / "model.ts")
        (folder / "model.py").write_text(PYTHON_MODEL.format(model=parameters["mlplat.model"],
                                                            version=parameters["mlplat.version"],
                                                            run_id=parameters["mlplat.run_id"]))
        return ["model.py", "model.ts"]
    if backend == "pytorch_libtorch":
        _check_libtorch_inputs(ts, len(signature["inputs"]), parameters)
        shutil.copyfile(ts, folder / "model.pt")
        return ["model.pt"]
    _export_onnx(model_folder, meta, signature, names, folder / "model.onnx", batched=batched)
    return ["model.onnx"]


def _check_libtorch_inputs(ts: Path, inputs: int, parameters: dict[str, str]) -> None:
    """Refuse TorchScript whose forward the libtorch backend will not load: it takes tensors only, as many as
    the config's inputs (``mask: Optional[Tensor] = None`` made the server refuse the model)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        try:
            arguments = torch.jit.load(str(ts), map_location="cpu").forward.schema.arguments[1:]
        except Exception:  # noqa: BLE001 - an op library this process lacks, a newer torch's file: the server
            return  # may have what it needs (LD_PRELOAD), so the file is exported unchecked, as it always was
    wrong = [f"{a.name}: {a.type}" for a in arguments if str(a.type) != "Tensor"]
    if wrong or len(arguments) != inputs:
        found = ", ".join(f"{a.name}: {a.type}" for a in arguments)
        raise DataError(f"{parameters['mlplat.model']} v{parameters['mlplat.version']}: Triton's libtorch backend "
                        f"loads a forward() of {inputs} Tensor argument(s), one per signature input; this one takes "
                        f"({found}); export it with backend='python', which calls it with the signature's inputs")


def _export_onnx(model_folder: Path, meta: dict[str, Any], signature: dict[str, Any], names, target: Path, *,
                 batched: bool) -> None:
    import torch

    from ..runs.torch_io import load_torch_model

    model = load_torch_model(model_folder)
    shapes = meta.get("example_shapes")
    if not (isinstance(shapes, list) and len(shapes) == len(signature["inputs"])
            and all(len(s) == len(t["shape"]) for s, t in zip(shapes, signature["inputs"]))):
        shapes = [[2] * len(t["shape"]) for t in signature["inputs"]]  # a model logged before mlplat kept them
    examples = tuple(torch.zeros([e if d < 0 else d for e, d in zip(shape, t["shape"])],
                                 dtype=getattr(torch, t["dtype"])) for shape, t in zip(shapes, signature["inputs"]))
    in_names, out_names = names
    # every dimension of any size (-1) stays so in the graph, not only the batch: a traced size would be fixed;
    # a batched model's first one too, whatever the signature says (Triton's onnxruntime backend refuses a model
    # with a non-zero max_batch_size whose first dimension is fixed)
    axes = {}
    for n, t in zip([*in_names, *out_names], [*signature["inputs"], *signature["outputs"]]):
        dynamic = {i: ("batch" if i == 0 else f"{n}_dim{i}") for i, d in enumerate(t["shape"])
                   if d < 0 or (i == 0 and batched)}
        if dynamic:
            axes[n] = dynamic
    try:
        with warnings.catch_warnings():
            # the artifact is TorchScript, which only the TorchScript-based exporter reads; torch warns it is legacy
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX")
            torch.onnx.export(model, examples, str(target), input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, dynamo=False)
    except ImportError as exc:
        raise DataError(f"ONNX export needs the onnx package: pip install 'mlplat[onnx]' ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        raise DataError(f"ONNX export failed: {exc}") from exc
    import onnx  # the exporter needed it

    graph = onnx.load(str(target), load_external_data=False).graph
    kept = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    dropped = [n for n in in_names if n not in kept]
    if dropped:  # the exporter leaves out inputs the graph does not use, and the server refuses the config then
        raise DataError(f"ONNX export left out the input(s) {dropped}, which the model does not use: Triton's "
                        "onnxruntime backend refuses a config whose inputs the model lacks; export it with "
                        "backend='python' or 'pytorch_libtorch', or log a model that uses every input")


def _positional(names: list[str], prefix: str) -> list[str]:
    """Tensor names as the libtorch backend needs them, ``<name>__<index>`` with the index of the position:
    the signature's own when they already are (``input__0``, what ``log_model`` names them, so ``predict``
    and clients send the same names to every backend), else ``<prefix>__<index>``.

    >>> _positional(["input__0", "input__1"], "INPUT"), _positional(["features"], "INPUT")
    (['input__0', 'input__1'], ['INPUT__0'])
    """
    if all(re.fullmatch(rf"[A-Za-z_][A-Za-z0-9_]*?__{i}", n) for i, n in enumerate(names)):
        return list(names)
    return [f"{prefix}__{i}" for i in range(len(names))]
