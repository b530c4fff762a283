"""The local backend: registered torch models run in this process, behind the Triton client's interface.

For notebooks and tests without a server. ``infer(model, inputs, version=...)``
takes and returns what :class:`~mlplat.TritonClient` does; the model name is a
registered model, and without a version the one at ``stage`` (default
production) is served: the stage is looked up again once the last look-up is
``version_cache_seconds`` old, so a promotion is served from then on.

Usage::

    backend = p.serving.local_backend()
    backend.infer("fraud", {"input__0": x})      # {"output__0": array}
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .._expiring import Expiring
from ..errors import MlplatError, ModelNotReadyError, ServingError
from .shaping import NUMPY_TYPES, ModelInfo, check_model, check_outputs, check_request, join, split, to_arrays

__all__ = ["LocalBackend"]

_TRITON = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64", "int32": "INT32",
           "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


def _tensor(torch: Any, arr: np.ndarray) -> Any:
    """A tensor sharing ``arr``'s memory; a copy of a read-only one (an Arrow column's), which torch warns about."""
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _triton_type(model: str, version: int, tensor: dict[str, Any]) -> str:
    """The Triton type of a signature tensor, as a served model's config would give it."""
    dtype = _TRITON.get(tensor["dtype"])
    if dtype is None:
        raise ModelNotReadyError(f"model {model!r} v{version}: tensor {tensor['name']!r} is {tensor['dtype']}, which "
                                 "mlplat cannot serve (numpy has no such type); log the model in float32")
    return dtype


class LocalBackend:
    """Registered models in-process, with the same ``infer`` as the Triton clients."""

    url = "local"

    def __init__(self, models, *, stage: str = "production", max_batch_size: int = 1024,
                 version_cache_seconds: float = 10.0) -> None:
        self._models = models
        self._stage = stage
        self._max_batch_size = max_batch_size
        self._loaded: dict[tuple[str, int], tuple[int, Any, ModelInfo]] = {}
        self._at_stage: Expiring[int] = Expiring(version_cache_seconds)  # model -> its version at the stage
        self._lock = threading.Lock()

    def _get(self, model: str, version: int | None = None) -> tuple[int, Any, ModelInfo]:
        check_model(model)  # as the Triton clients: a list was a raw TypeError, 123 a ModelNotReadyError
        if version is None:
            version = self._stage_version(model)
        hit = self._loaded.get((model, version))
        if hit is not None:
            return hit
        with self._lock:
            hit = self._loaded.get((model, version))
            if hit is not None:
                return hit
            try:
                info = self._models.get(model, version=version)
                module = self._models.load(model, version=info.version)
                meta = self._models.artifact_meta(info)
            except MlplatError as exc:
                raise ModelNotReadyError(f"model {model!r} is not ready in the local backend: {exc}") from None
            sig = meta.get("signature") or {}
            if not sig.get("inputs"):
                raise ModelNotReadyError(f"model {model!r} v{info.version} has no signature to serve it by")
            spec = ModelInfo(
                name=model,
                inputs=tuple((t["name"], _triton_type(model, info.version, t), tuple(t["shape"][1:]))
                             for t in sig["inputs"]),
                outputs=tuple(t["name"] for t in sig["outputs"]),
                max_batch_size=self._max_batch_size, preferred_batch_sizes=(), max_queue_delay_us=0,
                output_types=tuple((_triton_type(model, info.version, t), tuple(t["shape"][1:]))
                                   for t in sig["outputs"]))
            hit = self._loaded[(model, version)] = (info.version, module, spec)
            return hit

    def _stage_version(self, model: str) -> int:
        """The version at this backend's stage, looked up again once ``version_cache_seconds`` old."""
        return self._at_stage.get(model, lambda: self._lookup(model))

    def _lookup(self, model: str) -> int:
        try:
            return self._models.get(model, stage=self._stage).version
        except MlplatError as exc:
            raise ModelNotReadyError(f"model {model!r} is not ready in the local backend: {exc}") from None

    def is_ready(self) -> bool:
        """Always True: the models run in this process."""
        return True

    def is_model_ready(self, model: str) -> bool:
        """Whether the model (at the backend's stage) can be loaded."""
        check_model(model)
        try:
            self._get(model)
            return True
        except ModelNotReadyError:
            return False

    def info(self, model: str, version: int | None = None) -> ModelInfo:
        """The model's inputs, outputs and batch size, as a Triton client reports them."""
        return self._get(model, version)[2]

    def infer(self, model: str, inputs: Any, *, version: int | None = None, outputs: list[str] | None = None,
              priority: int = 0, timeout_us: int = 0) -> dict[str, np.ndarray]:
        """Run the registered model (``version``, else the one at the backend's stage) on ``inputs``; returns its
        outputs by name (those in ``outputs``, else all), as :meth:`TritonClient.infer` does; it takes the same
        arguments (``priority`` and ``timeout_us`` are checked, and mean nothing in this process)."""
        import torch

        priority, timeout_us, version, outputs = check_request(priority, timeout_us, version, outputs)
        served, module, info = self._get(model, version)
        check_outputs(info, outputs)
        types = [NUMPY_TYPES[t] for t, _ in info.output_types]
        parts = []
        for arrays in split(info, to_arrays(info, inputs)):
            try:
                with torch.inference_mode():
                    out = module(*[_tensor(torch, arrays[n]) for n, _, _ in info.inputs])
                outs = out if isinstance(out, (tuple, list)) else (out,)
                # in the signature's types, as Triton's config makes the served model answer
                parts.append({name: o.numpy().astype(t, copy=False) for name, o, t in zip(info.outputs, outs, types)})
            except Exception as exc:  # noqa: BLE001 - the model's own error, as Triton reports it: a ServingError
                raise ServingError(f"model {model!r} v{served} failed in the local backend: "
                                   f"{type(exc).__name__}: {exc}") from exc
        out = join(parts)
        return {name: out[name] for name in outputs} if outputs else out

    def close(self) -> None:
        """Drop the loaded models."""
        self._loaded.clear()
        self._at_stage.clear()
