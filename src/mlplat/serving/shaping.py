"""What the sync and asyncio clients share: a model's batching hints, input shaping, error mapping.

A request larger than the model's ``max_batch_size`` is split into chunks
and the outputs are concatenated back in order; a pandas or Arrow table is
turned into the model's input arrays (one input of width k takes k columns,
in order; inputs named like columns take those columns).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError, InferenceTimeoutError, ModelNotReadyError, QueueFullError, ServingError

__all__ = ["ModelInfo", "to_arrays", "split", "join", "map_error", "NUMPY_TYPES"]

#: Triton data type (without TYPE_) -> numpy dtype
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
               "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class ModelInfo:
    """A served model's inputs, outputs and batching hints, read from its config."""

    name: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, Triton dtype without TYPE_, dims)
    outputs: tuple[str, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        def dtype(t: Mapping[str, Any]) -> str:
            return str(t.get("data_type", "")).removeprefix("TYPE_")

        batching = config.get("dynamic_batching") or {}
        return cls(
            name=config["name"],
            inputs=tuple((t["name"], dtype(t), tuple(int(d) for d in t.get("dims", []))) for t in config["input"]),
            outputs=tuple(t["name"] for t in config["output"]),
            max_batch_size=int(config.get("max_batch_size", 0)),
            preferred_batch_sizes=tuple(int(s) for s in batching.get("preferred_batch_size", [])),
            max_queue_delay_us=int(batching.get("max_queue_delay_microseconds", 0)),
        )

    @property
    def target_batch(self) -> int:
        """Rows to aim for when merging requests: the largest preferred size, else max_batch_size."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size) or 1


def to_arrays(info: ModelInfo, inputs: Any) -> dict[str, np.ndarray]:
    """The model's input arrays from a dict of arrays, a pandas DataFrame or an Arrow table."""
    if isinstance(inputs, Mapping):
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
    else:
        from .._arrow import to_table

        table = to_table(inputs, "inputs")
        names = [n for n, _, _ in info.inputs]
        if all(n in table.column_names for n in names):
            _refuse_nulls(info, table, names)
            arrays = {n: table.column(n).to_numpy(zero_copy_only=False) for n in names}
        elif len(info.inputs) == 1 and len(info.inputs[0][2]) == 1:
            width = info.inputs[0][2][0]
            if width not in (-1, table.num_columns):
                raise DataError(f"model {info.name!r} takes {width} columns in {names[0]!r}; the table has "
                                f"{table.num_columns}")
            _refuse_nulls(info, table, table.column_names)
            arrays = {names[0]: np.column_stack([c.to_numpy(zero_copy_only=False) for c in table.columns])}
        else:
            raise DataError(f"model {info.name!r} takes inputs {names}; name the table's columns after them")
    out = {}
    for name, dtype, dims in info.inputs:
        if name not in arrays:
            raise DataError(f"model {info.name!r} needs an input {name!r}; got {sorted(arrays)}")
        arr = arrays[name]
        want = NUMPY_TYPES.get(dtype)
        if want is None:
            raise DataError(f"input {name!r} of model {info.name!r} has type {dtype}, which mlplat cannot send")
        if arr.dtype != want:
            if arr.dtype.kind not in "biuf":
                raise DataError(f"input {name!r} must be numbers ({dtype}), got {arr.dtype}")
            _check_cast(info, name, dtype, arr, np.dtype(want))
            arr = arr.astype(want)
        batched = info.max_batch_size > 0
        rank = len(dims) + (1 if batched else 0)
        if arr.ndim != rank:
            raise DataError(f"input {name!r} of model {info.name!r} must have {rank} dimensions "
                            f"(batch + {list(dims)}), got shape {arr.shape}")
        shape = arr.shape[1:] if batched else arr.shape
        if shape != dims and any(d not in (-1, got) for d, got in zip(dims, shape)):  # equal: the common case
            want = ", ".join(["batch"] * batched + ["any" if d == -1 else str(d) for d in dims])
            raise DataError(f"input {name!r} of model {info.name!r} must have shape ({want}), got {arr.shape}")
        out[name] = np.ascontiguousarray(arr)
    rows = {a.shape[0] for a in out.values()} if info.max_batch_size > 0 else {0}
    if len(rows) > 1:
        raise DataError(f"inputs of model {info.name!r} differ in rows: {sorted(rows)}")
    return out


def _refuse_nulls(info: ModelInfo, table: Any, columns: Sequence[str]) -> None:
    """Nulls in the table's ``columns`` would reach the model as NaN, or as INT64_MIN in an integer input."""
    nulls = [f"{c!r} ({table.column(c).null_count})" for c in columns if table.column(c).null_count]
    if nulls:
        raise DataError(f"the inputs of model {info.name!r} hold nulls in columns {', '.join(nulls)}: a model "
                        "takes no nulls; fill them (e.g. with 0) or drop those rows first")


def _check_cast(info: ModelInfo, name: str, dtype: str, arr: np.ndarray, want: np.dtype) -> None:
    """Refuse a conversion to an integer or bool input that would change values (fractions, NaN, overflow)."""
    if want.kind not in "biu" or arr.size == 0:
        return
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"input {name!r} of model {info.name!r} is {dtype} but holds NaN or infinity")
        if (arr != np.trunc(arr)).any():
            raise DataError(f"input {name!r} of model {info.name!r} is {dtype} but holds fractions (e.g. "
                            f"{arr[arr != np.trunc(arr)][0]}); round them first if that is what you mean")
    low, high = (0, 1) if want.kind == "b" else (np.iinfo(want).min, np.iinfo(want).max)
    if arr.min() < low or arr.max() > high:
        raise DataError(f"input {name!r} of model {info.name!r} is {dtype}: its values must lie in [{low}, {high}], "
                        f"got {arr.min()} to {arr.max()}")


def rows_of(info: ModelInfo, arrays: Mapping[str, np.ndarray]) -> int:
    return next(iter(arrays.values())).shape[0] if info.max_batch_size > 0 else 1


def split(info: ModelInfo, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Chunks of at most max_batch_size rows (the request itself when it fits)."""
    n = rows_of(info, arrays)
    size = info.max_batch_size
    if size <= 0 or n <= size:
        return [arrays]
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def join(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def map_error(exc: Exception, model: str, url: str) -> ServingError:
    """tritonclient's exception as the mlplat error that says what happened."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    where = f"model {model!r} at {url}"
    if isinstance(exc, TimeoutError):  # a socket's or asyncio's: the server took too long to answer
        return InferenceTimeoutError(f"{where}: no answer in time ({text}); is the server overloaded or hung?")
    if isinstance(exc, OSError):  # refused, reset, no route (aiohttp's connection errors are OSErrors too)
        return ModelNotReadyError(f"{where} is not ready: the server cannot be reached ({text})")
    if "exceeds maximum queue size" in low or "queue is full" in low or "queue full" in low:
        return QueueFullError(f"{where}: the server's queue is full ({text}); slow down or raise max_queue_size")
    if "timeout" in low or "timed out" in low or "deadline" in low:
        return InferenceTimeoutError(f"{where}: the request timed out ({text})")
    if ("not ready" in low or "unavailable" in low or "not found" in low or "unknown model" in low
            or "failed to connect" in low or "connection refused" in low):
        return ModelNotReadyError(f"{where} is not ready ({text})")
    return ServingError(f"{where}: {text}")


def merge(items: Sequence[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Several requests' arrays as one batch, and each request's row count."""
    sizes = [next(iter(a.values())).shape[0] for a in items]
    if len(items) == 1:
        return items[0], sizes
    return {k: np.concatenate([a[k] for a in items]) for k in items[0]}, sizes


def unmerge(outputs: dict[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """A batch's outputs back into one dict per request."""
    out, start = [], 0
    for n in sizes:
        out.append({k: v[start : start + n] for k, v in outputs.items()})
        start += n
    return out
