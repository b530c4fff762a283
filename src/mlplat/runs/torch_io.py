"""Torch models as artifacts: a folder with TorchScript, the state dict, the signature, metadata.

::

    model/
      mlmodel.json      flavor, torch version, files, signature, the module's class
      model.ts          TorchScript (torch.jit.script, else torch.jit.trace on the example input)
      state_dict.pt     the module's state dict
      module.pt         the whole module pickled (loads only where its class is importable)

Loading prefers TorchScript (no Python class needed, also what Triton runs),
then the pickled module.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, StoreError

__all__ = ["TensorSpec", "Signature", "save_torch_model", "load_torch_model", "read_meta", "checked_fill_null",
           "fill_number", "example_dtype", "checked_columns", "example_width", "probe_model"]

META = "mlmodel.json"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: a name, a dtype ("float32", "int64", ...) and a shape (-1: any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """What a model takes and gives, e.g. ``Signature([TensorSpec("x", "float32", (-1, 4))], [...])``."""

    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The signature as a JSON-able dict (stored in the model's metadata)."""
        def spec(t: TensorSpec) -> dict[str, Any]:
            return {**asdict(t), "shape": list(t.shape)}

        return {"inputs": [spec(t) for t in self.inputs], "outputs": [spec(t) for t in self.outputs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        """The signature a :meth:`to_json` dict describes."""
        def specs(items):
            return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items]

        return cls(specs(data.get("inputs", [])), specs(data.get("outputs", [])))


def _torch():
    try:
        import torch
    except ImportError:
        raise DataError("logging a torch model needs torch: pip install 'mlplat[torch]'") from None
    return torch


def _tensors(example: Any) -> tuple:
    """A model's example input (or output) as its tensors: one tensor, or a tuple or list of them."""
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _dtype_name(tensor: Any) -> str:
    """A tensor's type as a signature names it: "float32", "int64"."""
    return str(tensor.dtype).removeprefix("torch.")


def _as_signature(signature: Signature | Mapping | None, example_input: Any, model: Any) -> Signature | None:
    torch = _torch()
    if isinstance(signature, Mapping):
        unknown = sorted(map(str, set(signature) - {"inputs", "outputs"}))
        if unknown:
            raise DataError(f"signature: unknown key(s) {unknown}; a signature dict has 'inputs' and 'outputs'")
        try:
            signature = Signature.from_json(signature)
        except (KeyError, TypeError) as exc:
            raise DataError(f"signature: each input and output is a dict with 'name', 'dtype' and 'shape' "
                            f"({type(exc).__name__}: {exc})") from None
    if signature is not None:
        if not isinstance(signature, Signature):
            raise DataError(f"signature must be an mp.Signature or a dict with 'inputs' and 'outputs', got "
                            f"{type(signature).__name__} {signature!r:.100}")
        signature = _checked_signature(signature, torch)
        if example_input is not None:  # the model runs on it as without a signature (it stored a model that
            _as_signature(None, example_input, model)  # failed on its own example input)
        return signature
    if example_input is None:
        return None
    tensors = _tensors(example_input)
    wrong = next((t for t in tensors if not isinstance(t, torch.Tensor)), None)
    if wrong is not None or not tensors:
        got = type(example_input).__name__
        got += f" holding {type(wrong).__name__}" if wrong is not None and wrong is not example_input else ""
        raise DataError(f"example_input must be a torch.Tensor, or a non-empty tuple or list of tensors (one per "
                        f"input of the model), got {got}")
    inputs = [TensorSpec(f"input__{i}", _dtype_name(t), (-1, *t.shape[1:])) for i, t in enumerate(tensors)]
    try:
        with torch.no_grad():
            out = model(*tensors)
    except Exception as exc:  # noqa: BLE001 - a wrong width, type or device: whatever the model raised
        shapes = ", ".join(str(tuple(getattr(t, "shape", ()))) for t in tensors)
        raise DataError(f"the model failed on example_input (shape {shapes}): {type(exc).__name__}: "
                        f"{str(exc)[:300]}; give an example input the model takes (a batch of rows as it is "
                        "called with)") from exc
    wrong = next((t for t in _tensors(out) if not isinstance(t, torch.Tensor)), None)
    if wrong is not None:
        raise DataError(f"the model returned {type(wrong).__name__} on example_input; a model serves a tensor, or a "
                        "tuple or list of tensors (Triton's backends and predict take outputs by position)")
    outputs = [TensorSpec(f"output__{i}", _dtype_name(t), (-1, *t.shape[1:])) for i, t in enumerate(_tensors(out))]
    return Signature(inputs, outputs)


def _checked_signature(sig: Signature, torch: Any) -> Signature:
    """``sig`` (shapes as tuples) if every tensor has a name (unique on its side), a torch dtype and a shape of
    dimensions, each -1 (any size) or positive; else a DataError naming the tensor (such a signature was stored
    as given, and predict or export_triton failed on it later, or wrote a config the server could not read)."""
    checked: dict[str, list[TensorSpec]] = {}
    for side, specs in (("inputs", sig.inputs), ("outputs", sig.outputs)):
        if not isinstance(specs, (list, tuple)) or not specs:
            raise DataError(f"signature {side} must be a non-empty list of tensors, got {specs!r:.100}")
        seen: set[str] = set()
        for t in specs:
            if not isinstance(t, TensorSpec):
                raise DataError(f"signature {side} hold mp.TensorSpec objects (or dicts), got {type(t).__name__}")
            if not isinstance(t.name, str) or not t.name.strip():
                raise DataError(f"signature {side}: each tensor needs a name (a non-empty string), got {t.name!r}")
            if t.name in seen:
                raise DataError(f"signature {side}: two tensors are named {t.name!r}")
            seen.add(t.name)
            if not isinstance(t.dtype, str) or not isinstance(getattr(torch, t.dtype, None), torch.dtype):
                raise DataError(f"signature tensor {t.name!r}: dtype {t.dtype!r} is not a torch dtype's name (e.g. "
                                "'float32', 'int64')")
            shape = t.shape
            if (not isinstance(shape, (tuple, list)) or not shape
                    or not all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape)):
                raise DataError(f"signature tensor {t.name!r}: shape {shape!r} must be a list of dimensions, each -1 "
                                "(any size, as the batch) or a positive integer")
            dtype = str(getattr(torch, t.dtype)).removeprefix("torch.")  # an alias ("float", "long"): its name
            checked.setdefault(side, []).append(TensorSpec(t.name, dtype, tuple(shape)))
    return Signature(checked["inputs"], checked["outputs"])


_FILL_KINDS = "a finite number (int or float, not a bool), a mapping of column names to such numbers, or None"


def fill_number(value: Any, what: str, dtype: str | None) -> int | float:
    """``value`` as a JSON-safe number a model input of ``dtype`` holds exactly, else DataError naming ``what``.

    An int stays an int (an int64 fill of 2**62 keeps every digit); a float must be finite, and for an
    integer input a whole number within the type's range; ``dtype`` None (or one numpy lacks): any number."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{what} must be {_FILL_KINDS}; got {value!r} ({type(value).__name__})")
    number: int | float = int(value) if isinstance(value, (int, np.integer)) else float(value)
    if isinstance(number, float) and not math.isfinite(number):
        raise DataError(f"{what} is {number!r}: a fill value must be finite (a model given NaN or infinity answers "
                        "NaN or nonsense); give a number, or None to refuse missing values")
    try:
        kind = np.dtype(dtype) if dtype else None
    except TypeError:  # e.g. bfloat16: predict refuses such an input anyway
        kind = None
    if kind is not None and kind.kind in "iu":
        info = np.iinfo(kind)
        if (isinstance(number, float) and not number.is_integer()) or not info.min <= number <= info.max:
            raise DataError(f"{what} is {number!r}, which the model's {dtype} input cannot hold: give a whole number "
                            f"between {info.min} and {info.max}")
        return int(number)
    if kind is not None and kind.kind == "f" and abs(number) > float(np.finfo(kind).max):
        raise DataError(f"{what} is {number!r}, beyond what the model's {dtype} input holds "
                        f"(at most {float(np.finfo(kind).max):g} either way)")
    return number


def checked_fill_null(fill_null: Any, columns: Sequence[str] | None, dtype: str | None) -> Any:
    """``fill_null`` as stored in a model's metadata (JSON-safe), or DataError saying what is wrong.

    A number fills every input column; a mapping fills the columns it names (each value a number, or None
    to refuse that column's missing values); a column it does not name is refused where missing. A
    mapping's keys must be column names, and among ``columns`` when those are known (else predict checks
    them against the input's columns). ``dtype`` is the input tensor's type, when known."""
    if fill_null is None:
        return None
    if isinstance(fill_null, Mapping):
        known = None if columns is None else list(columns)
        out: dict[str, int | float | None] = {}
        for column, value in fill_null.items():
            if not isinstance(column, str):
                raise DataError(f"fill_null's keys must be column names (strings), got {column!r}")
            if known is not None and column not in known:
                raise DataError(f"fill_null names column {column!r}, which is not one of the model's columns "
                                f"{known}")
            out[column] = None if value is None else fill_number(value, f"fill_null[{column!r}]", dtype)
        return out
    return fill_number(fill_null, "fill_null", dtype)


def checked_columns(columns: Any, width: int | None) -> list[str] | None:
    """``columns`` as a list, else DataError: a list or tuple of unique non-empty strings, as many as the
    input's ``width`` (its number of columns) when that is known."""
    if columns is None:
        return None
    if not isinstance(columns, (list, tuple)):
        hint = f": pass [{columns!r}] for one column" if isinstance(columns, str) else ""
        raise DataError(f"columns must be a list or tuple of column names, got {type(columns).__name__} "
                        f"{columns!r}{hint}")
    bad = next((c for c in columns if not isinstance(c, str) or not c), None)
    if bad is not None:
        raise DataError(f"columns must be non-empty strings (the input's column names, in order), got {bad!r} "
                        f"in {list(columns)!r}")
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DataError(f"columns holds {', '.join(map(repr, twice))} more than once; each input column has a "
                        "name of its own")
    if width is not None and len(columns) != width:
        raise DataError(f"columns holds {len(columns)} names, but the model's input has {width} columns: name "
                        "every column of the input, in order")
    return list(columns)


def example_width(example_input: Any) -> int | None:
    """The number of columns of the one 2-D input tensor ``example_input`` gives, else None: what ``columns``
    must count, known before the model is logged."""
    tensors = _tensors(example_input)
    shape = getattr(tensors[0], "shape", None) if len(tensors) == 1 else None
    return int(shape[1]) if shape is not None and len(shape) == 2 else None


def _signature_width(sig: Signature | None) -> int | None:
    """The number of columns of a signature's one 2-D input (not -1, any), else None."""
    if sig is None or len(sig.inputs) != 1 or len(sig.inputs[0].shape) != 2:
        return None
    width = sig.inputs[0].shape[1]
    return width if width >= 0 else None


def probe_model(model: Any, example_input: Any) -> None:
    """Check ``model`` is a torch module and run it on ``example_input`` as ``log_model`` will (in eval mode,
    without grad): a DataError now (``p.runs.training`` calls it before the run starts) rather than once the
    training is over."""
    _check_module(model)
    if example_input is None:
        return
    was_training = model.training
    model.eval()
    try:
        _as_signature(None, example_input, model)
    finally:
        model.train(was_training)


def _check_module(model: Any) -> None:
    if not isinstance(model, _torch().nn.Module):
        raise DataError(f"log_model takes a torch.nn.Module, got {type(model).__name__}")


def example_dtype(example_input: Any) -> str | None:
    """The type of the one input tensor ``example_input`` gives (as a signature names it: "int64"), else None:
    what a fill must fit, known before the model is logged (``p.runs.training`` checks its fill_null so)."""
    tensors = _tensors(example_input)
    return _dtype_name(tensors[0]) if len(tensors) == 1 and hasattr(tensors[0], "dtype") else None


def save_torch_model(model: Any, folder: Path, *, signature: Signature | Mapping | None = None,
                     example_input: Any = None, columns: Sequence[str] | None = None,
                     fill_null: Any = 0.0) -> dict[str, Any]:
    """Write the model folder; returns its metadata.

    ``columns`` names the columns of the (single) input tensor in order: features by their
    output names and request-time fields; ``p.serving.predict`` assembles inputs from them.
    ``fill_null`` is what predict gives the model for a missing value (see :func:`checked_fill_null`);
    it is checked (against the columns and the input's type, when known) before anything is written.
    """
    torch = _torch()
    _check_module(model)
    columns = checked_columns(columns, example_width(example_input))  # before the model runs, as fill_null
    fill = checked_fill_null(fill_null, columns, None)  # before the model runs: a bad value is refused at once
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        sig = _as_signature(signature, example_input, model)
        checked_columns(columns, _signature_width(sig))  # a signature given: its width
        if sig is not None and len(sig.inputs) == 1:  # the type predict builds: a fill must fit it
            fill = checked_fill_null(fill_null, columns, sig.inputs[0].dtype)
        files = {"state_dict": "state_dict.pt"}
        torch.save(model.state_dict(), folder / "state_dict.pt")
        scripted, how, why_not = _torchscript(torch, model, example_input, sig)
        if scripted is not None:
            with _quiet_jit():
                scripted.save(str(folder / "model.ts"))
            files["torchscript"] = "model.ts"
        else:
            warnings.warn(f"log_model: {type(model).__name__} is stored without TorchScript: {why_not}. load() "
                          "uses the pickled module; export_triton's python and pytorch_libtorch backends need "
                          "TorchScript (make the model scriptable with torch.jit.script)", stacklevel=3)
        try:
            torch.save(model, folder / "module.pt")
            files["module"] = "module.pt"
        except Exception:  # noqa: BLE001 - e.g. a local class that cannot be pickled
            pass
        meta = {
            "flavor": "torch",
            "torch_version": torch.__version__,
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "files": files,
            "torchscript": how,
            "torchscript_missing": why_not,
            "signature": sig.to_json() if sig else None,
            # what an ONNX export traces the model on (a width of any size taken as 2 failed a Conv1d of kernel 5)
            "example_shapes": [list(t.shape) for t in _tensors(example_input)] if example_input is not None else None,
            "columns": list(columns) if columns is not None else None,
            "fill_null": fill,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        }
        (folder / META).write_text(json.dumps(meta, indent=1))
        return meta
    finally:
        model.train(was_training)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield


#: what torch's TracerWarnings say of a trace that replays the example's path ("Converting a tensor to a Python
#: boolean/integer/float", "Iterating over a tensor", "Using len ... might cause the trace to be incorrect") or of
#: one whose outputs differ from the module's; not "torch.tensor results are registered as constants", which a
#: literal gives too (such a trace is checked on another batch instead)
_UNSAFE_TRACE = re.compile(r"^(?!torch\.(as_)?tensor results are registered as constants)"
                           r".*(might cause the trace to be incorrect|does not match)", re.S)


def _torchscript(torch, model: Any, example_input: Any,
                 sig: Signature | None) -> tuple[Any, str | None, str | None]:
    """TorchScript of the model (scripted, else traced on the example input) and how, or (None, None, why not).

    TorchScript is what Triton's libtorch and python backends load; torch 2.13
    warns that torch.jit is deprecated, which is not the user's concern here. A trace torch says may be
    incorrect (a TracerWarning for a branch or a Python number taken from the data) is not kept: it replays
    the example's path for every input and so serves wrong results where the model would branch otherwise.
    A trace with another TracerWarning (a torch.tensor made a constant: of a literal, or of the input's
    shape) is kept only if it answers as the module on the example grown along the signature's free
    dimensions (:func:`_answers_alike`).
    """
    with _quiet_jit():
        try:
            return torch.jit.script(model), "script", None
        except Exception:  # noqa: BLE001 - many modules are not scriptable; tracing may still work
            pass
        if example_input is None:
            return None, None, "not scriptable, and no example_input= to trace it on"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                traced = torch.jit.trace(model, _tensors(example_input))
            except Exception as exc:  # noqa: BLE001
                return None, None, f"not scriptable, and tracing failed ({type(exc).__name__}: {str(exc)[:200]})"
    warned = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for w in caught:
        if w not in warned:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    unsafe = [w for w in warned if _UNSAFE_TRACE.search(str(w.message))]
    if unsafe or (warned and not _answers_alike(torch, model, traced, _tensors(example_input), sig)):
        first = str((unsafe or warned)[0].message).split(". ")[0][:200]
        return None, None, (f"not scriptable, and its trace depends on the data, so it would serve other inputs "
                            f"wrongly (TracerWarning: {first})")
    return traced, "trace", None


def _answers_alike(torch, model: Any, traced: Any, example: tuple, sig: Signature | None) -> bool:
    """Whether the trace answers as the module does on the example grown by one along each dimension the signature
    leaves free (-1: the batch, grown in every input together; any other, one input at a time), where the module
    takes it: a size of the example the trace took for a constant shows. True where nothing is free (all sizes
    are fixed: the example's are the only ones served); False where the module took none of them."""
    shapes = [t.shape for t in sig.inputs] if sig is not None and len(sig.inputs) == len(example) else \
        [(-1, *t.shape[1:]) if t.dim() else () for t in example]
    try:
        batch = [i for i, (t, shape) in enumerate(zip(example, shapes)) if t.dim() and shape and shape[0] == -1]
        variants = [tuple(torch.cat([t, t[:1]]) if i in batch else t for i, t in enumerate(example))] if batch else []
        for i, (t, shape) in enumerate(zip(example, shapes)):
            for d in range(1, min(t.dim(), len(shape))):
                if shape[d] == -1:
                    variants.append((*example[:i], torch.cat([t, t.narrow(d, 0, 1)], dim=d), *example[i + 1:]))
    except (RuntimeError, IndexError):  # an empty dimension: nothing to grow it by
        return False
    if not variants:
        return True
    ran = False
    for inputs in variants:
        try:
            with torch.no_grad():
                want = model(*inputs)
        except Exception:  # noqa: BLE001 - the module takes no such input: no proof either way
            continue
        ran = True
        try:
            with torch.no_grad():
                pairs = list(zip(_tensors(want), _tensors(traced(*inputs)), strict=True))
        except Exception:  # noqa: BLE001 - the trace fails where the module answers
            return False
        if not all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
                   for a, b in pairs):
            return False
    return ran


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder} is not a model folder written by mlplat ({exc})") from None


def load_torch_model(folder: Path) -> Any:
    """The model in eval mode: TorchScript if present, else (or if the TorchScript does not load here) the
    pickled module. A folder neither loads from is a StoreError naming the torch version that wrote it and
    this one (TorchScript written by a newer torch often does not load in an older one)."""
    torch = _torch()
    meta = read_meta(folder)
    files: Mapping[str, str] = meta.get("files", {})
    if "torchscript" not in files and "module" not in files:
        raise StoreError(f"model folder {folder} has neither TorchScript nor a pickled module; rebuild the module "
                         "and load state_dict.pt into it")
    errors = []
    for kind in ("torchscript", "module"):
        if kind not in files:
            continue
        try:
            if kind == "torchscript":
                with _quiet_jit():
                    model = torch.jit.load(str(folder / files[kind]), map_location="cpu")
            else:
                model = torch.load(folder / files[kind], map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - reported below with the torch versions
            errors.append(f"{files[kind]}: {type(exc).__name__}: {str(exc)[:500]}")
            continue
        model.eval()
        return model
    saved = meta.get("torch_version", "an unknown version")
    hint = ("" if saved == torch.__version__ else
            f"; load it with torch {saved}, or rebuild the module and load state_dict.pt into it")
    raise StoreError(f"model folder {folder} was written by torch {saved} and does not load in torch "
                     f"{torch.__version__} ({'; '.join(errors)}){hint}")
