"""``p.serving``: export to Triton, serve in-process or through Triton, predict, route A/B.

Usage::

    p.serving.export_triton("fraud", stage="production", repository="triton-repo", backend="python",
                            max_batch_size=64,
                            dynamic_batching=mp.DynamicBatching(preferred_batch_sizes=[16, 64],
                                                                max_queue_delay_us=500))
    p.serving.predict("fraud", [{"user_id": 42, "merchant_id": "m0001", "amount": 19.9}])
"""
from __future__ import annotations

import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import pyarrow as pa

from .._checks import storable
from ..errors import DataError
from .gateway import ABGateway
from .local import LocalBackend
from .predict import Prediction, Predictor
from .served_log import ServedLog
from .triton_repo import DynamicBatching, TritonExport, write_repository

__all__ = ["ServingService"]


class ServingService:
    """Serving for one Platform. Reach it as ``Platform(...).serving``."""

    def __init__(self, platform: Any) -> None:
        self._p = platform
        s = platform.settings
        self.served_log = ServedLog(s.home / "served", sample_rate=s.served_sample_rate)
        self._predictor = Predictor(platform.features, platform.models, self.served_log)
        self._backend: Any = None
        self._backend_lock = threading.Lock()  # threads racing on first use share one backend
        self._gateways: weakref.WeakSet[ABGateway] = weakref.WeakSet()  # made on this platform: close() writes them

    # ------------------------------------------------------------- export
    def export_triton(
        self,
        name: str,
        *,
        repository: str | Path,
        version: int | None = None,
        stage: str | None = None,
        alias: str | None = None,
        backend: str = "python",
        max_batch_size: int = 64,
        dynamic_batching: DynamicBatching | bool | None = None,
        instances: int = 1,
        triton_name: str | None = None,
    ) -> TritonExport:
        """Write a Triton model repository entry for a registered version (default: production).

        Writes ``<repository>/<triton_name or name>/config.pbtxt`` (inputs and outputs from the
        signature, ``max_batch_size``, ``dynamic_batching``, ``instances`` CPU instances, and the
        version's lineage as parameters). By default a model that takes a batch (``max_batch_size`` > 0)
        gets Triton's dynamic batcher with no wait (``mp.DynamicBatching()``: concurrent requests already
        queued are run together, none is held back); pass ``mp.DynamicBatching(...)`` to tune it, or
        ``dynamic_batching=False`` for a config without it and ``<repository>/<model>/<version>/`` with the model
        for ``backend``: ``python`` (generated model.py + TorchScript), ``pytorch_libtorch``
        (model.pt) or ``onnxruntime`` (model.onnx). Invalid settings are refused before anything
        is written.
        """
        repository = _repository(repository)
        if triton_name is not None and not (isinstance(triton_name, str) and triton_name.strip()):
            raise DataError(f"triton_name= must be a non-empty model name (a str), got {triton_name!r}: leave it out "
                            "to export under the model's own name")
        models = self._p.models
        info = models.resolve(name, version=version, stage=stage, alias=alias)
        meta = models.artifact_meta(info)
        with tempfile.TemporaryDirectory() as tmp:
            folder = models.fetch(info, Path(tmp) / "model")  # StoreError if its files changed since registration
            return write_repository(
                repository, name if triton_name is None else triton_name, info.version, backend, folder, meta,
                max_batch_size=max_batch_size, batching=_batching(dynamic_batching, max_batch_size),
                instances=instances,
                parameters={"mlplat.model": name, "mlplat.version": str(info.version), "mlplat.run_id": info.run_id,
                            "mlplat.stage": info.stage},
            )

    # ------------------------------------------------------------ backends
    def local_backend(self, *, stage: str = "production", version_cache_seconds: float = 10.0) -> LocalBackend:
        """Registered torch models served in this process, behind the Triton client's ``infer``; without a
        version, the one at ``stage``, looked up again every ``version_cache_seconds``."""
        return LocalBackend(self._p.models, stage=stage, version_cache_seconds=version_cache_seconds)

    @property
    def backend(self) -> Any:
        """The default backend: a TritonClient for ``triton_url`` / MLPLAT_TRITON_URL, else the local one."""
        backend = self._backend
        if backend is None:
            with self._backend_lock:
                if self._backend is None:
                    self._backend = self._open_backend()
                backend = self._backend
        return backend

    def _open_backend(self) -> Any:
        """A TritonClient for the configured Triton URL, else a local backend (called once, under the lock)."""
        url = self._p.settings.triton_url
        if url:
            from .client import TritonClient

            return TritonClient(url)
        return self.local_backend()

    # ------------------------------------------------------------- predict
    def predict(self, model: str, entity_rows: Any, *, version: int | None = None, stage: str | None = None,
                alias: str | None = None, backend: Any = None, variant: str = "default",
                triton_model: str | None = None, log: bool = True) -> Prediction:
        """Online features for the entity rows -> the model -> predictions, with the served features logged.

        The model version (default: production) decides which features, at which definition
        versions, in which column order; columns that are not features (request-time inputs such
        as a transaction's amount) come from the entity rows. A sample (``served_sample_rate``) of
        what was served is logged for skew checks.

        Usage::

            p.serving.predict("fraud", [{"user_id": 42, "merchant_id": "m0001", "amount": 19.9}])
            # -> {"user_id": [42], "merchant_id": ["m0001"], "output__0": [0.031]}
        """
        if not isinstance(variant, str):  # 0 or False passed here, and the served log's flush lost its batch
            raise DataError(f"variant must be a string (the name the served log records the call under), got "
                            f"{type(variant).__name__} {variant!r}")
        storable(variant, "variant")
        if backend is not None and not callable(getattr(backend, "infer", None)):
            raise DataError(f"backend must be a serving backend (p.serving.local_backend(), an mp.TritonClient), "
                            f"got {type(backend).__name__}: it has no infer()")
        return self._predictor.predict(model, entity_rows, backend=backend or self.backend, version=version,
                                       stage=stage, alias=alias, variant=variant, triton_model=triton_model, log=log)

    def served_features(self, model: str, since: Any = None) -> pa.Table:
        """The served-feature log of a model (sampled rows of what predictions used), oldest first, from
        ``since`` (a datetime) on; NotFoundError when nothing was ever logged for ``model``.

        >>> p.serving.served_features("fraud").num_rows  # doctest: +SKIP
        500
        """
        return self.served_log.read(model, since)

    def ab_gateway(self, champion: str, challenger: str, challenger_fraction: float, experiment_id: str,
                   salt: str | None = None) -> ABGateway:
        """``mp.ABGateway`` on this platform."""
        return ABGateway(champion, challenger, challenger_fraction, experiment_id, salt, platform=self._p)

    def close(self) -> None:
        """Write the served-feature log and what the A/B gateways made on this platform buffered (they stay
        open), and close the backend predict opened (a Triton client or local models).

        The backend is closed even when writing fails; then the first error is raised.
        """
        with self._backend_lock:
            backend, self._backend = self._backend, None
        try:
            try:
                for gateway in list(self._gateways):
                    gateway.flush()
            finally:
                self.served_log.close()
        finally:
            if backend is not None and hasattr(backend, "close"):
                backend.close()


def _batching(value: DynamicBatching | bool | None, max_batch_size: Any) -> Any:
    """The dynamic batching an export writes: the default (None) batches whatever is queued for a model
    that takes a batch; False writes none; True the defaults; anything else is checked by the export."""
    if value is None:
        return DynamicBatching() if isinstance(max_batch_size, int) and max_batch_size > 0 else None
    if value is True:
        return DynamicBatching()
    return None if value is False else value


def _repository(value: Any) -> Path:
    """export_triton's ``repository``: a non-empty str or os.PathLike (``""`` would be the current folder)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"repository= must be the Triton model repository's folder (a non-empty str or path), "
                        f"got {value!r}")
    return Path(text)
