"""What the sync and asyncio clients share: a model's batching hints, input shaping, error mapping.

A request larger than the model's ``max_batch_size`` is split into chunks
and the outputs are concatenated back in order; a pandas or Arrow table is
turned into the model's input arrays (one input of width k takes k columns,
in order; inputs named like columns take those columns: a column of numbers for an
input of one value per row, a list column for a wider one).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import TRITON_UINT64_MAX, plain, require_number
from ..errors import DataError, InferenceTimeoutError, ModelNotReadyError, QueueFullError, ServingError

__all__ = ["ModelInfo", "to_arrays", "split", "join", "map_error", "check_model", "check_request", "check_cast",
           "empty_outputs", "NUMPY_TYPES"]

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
    output_types: tuple[tuple[str, tuple[int, ...]], ...] = ()  # per output: (Triton dtype without TYPE_, dims)

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
            output_types=tuple((dtype(t), tuple(int(d) for d in t.get("dims", []))) for t in config["output"]),
        )

    @property
    def target_batch(self) -> int:
        """Rows to aim for when merging requests: the largest preferred size, else max_batch_size."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size) or 1


def to_arrays(info: ModelInfo, inputs: Any) -> dict[str, np.ndarray]:
    """The model's input arrays from a dict of arrays, a pandas DataFrame or an Arrow table."""
    if isinstance(inputs, Mapping):
        names = [name for name, _, _ in info.inputs]
        unknown = [k for k in inputs if k not in names]
        if unknown:  # a misspelt name was dropped silently, and the model got what the others held
            raise DataError(f"model {info.name!r} has no input {unknown[0]!r}; its inputs are {names}")
        arrays = {k: _asarray(info, k, v) for k, v in inputs.items()}
    else:
        arrays = _table_arrays(info, inputs)
    out = {}
    for name, dtype, dims in info.inputs:
        if name not in arrays:
            raise DataError(f"model {info.name!r} needs an input {name!r}; got {sorted(arrays)}")
        arr = _typed(info, name, dtype, arrays[name])
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


def _asarray(info: ModelInfo, name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged lists: [[1, 2], [3]]
        raise DataError(f"input {name!r} of model {info.name!r} is not a rectangular array ({exc}); give every "
                        "row the same number of values") from None


def _typed(info: ModelInfo, name: str, dtype: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as the input's numpy type, refused where that would change its values."""
    want = NUMPY_TYPES.get(dtype)
    if want is None:
        raise DataError(f"input {name!r} of model {info.name!r} has type {dtype}, which mlplat cannot send")
    if arr.dtype == want:
        return arr
    if arr.dtype.kind not in "biuf":
        raise DataError(f"input {name!r} must be numbers ({dtype}), got {arr.dtype}")
    check_cast(f"input {name!r} of model {info.name!r}", dtype, arr, np.dtype(want))
    return arr.astype(want)


def _table_arrays(info: ModelInfo, inputs: Any) -> dict[str, np.ndarray]:
    """A table's columns as the model's inputs: named after them, or all in order for one input of width k."""
    from .._arrow import to_table

    table = to_table(inputs, "inputs")
    names = [n for n, _, _ in info.inputs]
    if all(n in table.column_names for n in names):
        _refuse_nulls(info, table, names)
        return {n: _named_column(info, n, dims, table.column(n)) for n, _, dims in info.inputs}
    if len(info.inputs) == 1 and len(info.inputs[0][2]) == 1:
        name, dtype, (width,) = info.inputs[0]
        if width not in (-1, table.num_columns):
            raise DataError(f"model {info.name!r} takes {width} columns in {name!r}; the table has "
                            f"{table.num_columns}")
        _refuse_nulls(info, table, table.column_names)
        # each column as the input's type first: stacking int64 with float64 would round 2**53 + 1 first
        return {name: np.column_stack([_typed(info, name, dtype, c.to_numpy(zero_copy_only=False))
                                       for c in table.columns])}
    raise DataError(f"model {info.name!r} takes inputs {names}; name the table's columns after them")


def _named_column(info: ModelInfo, name: str, dims: tuple[int, ...], column: Any) -> np.ndarray:
    """A column named after an input: numbers for an input of one value per row (dims ``[1]``, read as
    ``(rows, 1)``), a list (or fixed-size list) of the input's values per row for a wider one."""
    import pyarrow.types as pat

    listed = pat.is_fixed_size_list(column.type) or pat.is_list(column.type) or pat.is_large_list(column.type)
    arr = _list_values(info, name, column) if listed else column.to_numpy(zero_copy_only=False)
    if info.max_batch_size <= 0 or not dims:  # no batch dimension: the column is the input as it is
        return arr
    if len(arr) == 0 and all(d > 0 for d in dims):
        return arr.reshape(0, *dims)
    if arr.ndim == 1 and all(d == 1 for d in dims):
        return arr.reshape(len(arr), *dims)
    if arr.ndim == 2 and len(dims) > 1 and all(d > 0 for d in dims) and arr.shape[1] == math.prod(dims):
        return arr.reshape(len(arr), *dims)
    if arr.ndim == 1:
        shape = " x ".join("any" if d == -1 else str(d) for d in dims)
        raise DataError(f"input {name!r} of model {info.name!r} takes {shape} values per row: a table column "
                        f"named after it must hold a list of them per row (a list or fixed_size_list column), "
                        "or pass a dict of arrays")
    return arr


def _list_values(info: ModelInfo, name: str, column: Any) -> np.ndarray:
    """A list column whose rows are all as long as each other, as a ``(rows, length)`` array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.min() != lengths.max():
        raise DataError(f"column {name!r} for model {info.name!r} holds lists of {lengths.min()} to "
                        f"{lengths.max()} values; every row needs as many")
    values = col.flatten()
    if values.null_count:
        raise DataError(f"column {name!r} for model {info.name!r} holds nulls inside its lists: a model takes no "
                        "nulls; fill them (e.g. with 0) or drop those rows first")
    width = int(lengths[0]) if len(lengths) else 0
    return values.to_numpy(zero_copy_only=False).reshape(len(col), width)


def _refuse_nulls(info: ModelInfo, table: Any, columns: Sequence[str]) -> None:
    """Nulls in the table's ``columns`` would reach the model as NaN, or as INT64_MIN in an integer input."""
    nulls = [f"{c!r} ({table.column(c).null_count})" for c in columns if table.column(c).null_count]
    if nulls:
        raise DataError(f"the inputs of model {info.name!r} hold nulls in columns {', '.join(nulls)}: a model "
                        "takes no nulls; fill them (e.g. with 0) or drop those rows first")


def check_cast(what: str, dtype: str, arr: np.ndarray, want: np.dtype) -> None:
    """Refuse a conversion of numbers ``arr`` to an integer or bool input (``what``, of type ``dtype``: how the
    message names them) that would change values: fractions, NaN or infinity, values out of the type's range;
    or to a narrower float input, a finite value past its range (it would become infinity)."""
    if arr.size == 0:
        return
    if want.kind == "f":
        if arr.dtype.kind in "iuf" and _largest(arr.dtype) > _largest(want):  # it may overflow: 1e300, 70000 in FP16
            with np.errstate(over="ignore", invalid="ignore"):
                top = np.abs(arr).max() if arr.dtype.kind == "f" else max(-int(arr.min()), int(arr.max()))
                if not top <= _largest(want):  # (NaN or past it: look closer)
                    grown = np.isinf(arr.astype(want)) & np.isfinite(arr)  # a value that rounds to the largest
                    if grown.any():  # passes
                        raise DataError(f"{what} is {dtype} but holds {arr[grown][0]}, past its largest value "
                                        f"({_largest(want):g}): the model would get infinity; scale it first")
        return
    if want.kind not in "biu":
        return
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{what} is {dtype} but holds NaN or infinity")
        if (arr != np.trunc(arr)).any():
            raise DataError(f"{what} is {dtype} but holds fractions (e.g. {arr[arr != np.trunc(arr)][0]}); round "
                            "them first if that is what you mean")
    low, high = (0, 1) if want.kind == "b" else (np.iinfo(want).min, np.iinfo(want).max)
    if arr.dtype.kind == "f":  # in float64, against the first value past the range: float(2**63 - 1) is 2**63,
        wide = arr.astype(np.float64, copy=False)  # so 2.0**63 passed `> high` and astype wrapped it to the minimum
        outside = wide.min() < low or wide.max() >= float(high) + 1
    else:
        outside = arr.min() < low or arr.max() > high
    if outside:
        raise DataError(f"{what} is {dtype}: its values must lie in [{low}, {high}], got {arr.min()} to {arr.max()}")


@functools.lru_cache(maxsize=None)
def _largest(dtype: np.dtype) -> float:
    """The largest value a numeric type holds."""
    return float(np.iinfo(dtype).max if dtype.kind in "iu" else np.finfo(dtype).max)


_INT64_MAX = 2**63 - 1  # gRPC sends timeout_us as an int64


def check_model(model: object) -> str:
    """A model name to ask about (an int or None was a raw TypeError from the protocol's library; a list an
    unhashable key), else DataError."""
    if not isinstance(model, str) or not model:
        raise DataError(f"model must be a model's name (a non-empty string), got {type(model).__name__} "
                        f"{model!r:.100}")
    return model


def check_request(priority: Any, timeout_us: Any, version: Any,
                  outputs: Any) -> tuple[int, int, int | None, list[str] | None]:
    """``(priority, timeout_us, version, outputs)`` as sent, else DataError: whole numbers in range (numpy's too;
    the server would refuse one as something else, a time-out or an unknown model, and gRPC raised a raw
    ValueError past 64 bits), ``outputs`` None or names (a generator taken once; a string refused)."""
    if (priority.__class__ is int and timeout_us.__class__ is int and 0 <= priority <= TRITON_UINT64_MAX
            and 0 <= timeout_us <= _INT64_MAX and (version is None or (version.__class__ is int and version >= 1))
            and (outputs is None or outputs.__class__ is list)):
        return priority, timeout_us, version, outputs  # the common case, checked without the messages
    priority, timeout_us, version = plain(priority), plain(timeout_us), plain(version)
    require_number("priority", priority, low=0, high=TRITON_UINT64_MAX, integer=True,
                   meaning="a priority level, an integer >= 0 (0: the model's default level)")
    require_number("timeout_us", timeout_us, low=0, high=_INT64_MAX, integer=True,
                   meaning="a time-out in microseconds, an integer >= 0 (0: none) below 2**63")
    if version is not None:
        require_number("version", version, low=1, high=_INT64_MAX, integer=True,
                       meaning="a model version, an integer >= 1 (None: the newest)")
    if outputs is not None:
        if isinstance(outputs, (str, bytes)):  # its characters were taken for output names
            raise DataError(f"outputs must be a list of output names, got the string {outputs!r}: pass [{outputs!r}]")
        try:
            outputs = list(outputs)  # a generator is read once, here (it was read empty: every output came back)
        except TypeError:
            raise DataError(f"outputs must be a list of output names, got {type(outputs).__name__}") from None
    return priority, timeout_us, version, outputs


def check_outputs(info: ModelInfo, outputs: Sequence[str] | None) -> None:
    """Every output asked for is one the model has, else DataError (before anything is sent: the server's
    refusal was a plain ServingError, where the local backend said which output)."""
    for name in outputs or ():
        if name not in info.outputs:
            raise DataError(f"model {info.name!r} has no output {name!r}; it has {list(info.outputs)}")


def empty_outputs(info: ModelInfo, outputs: Sequence[str] | None) -> dict[str, np.ndarray]:
    """The outputs of a request of no rows, as the model would give them: no rows, its types and dimensions
    (``outputs`` checked by the caller, with :func:`check_outputs`)."""
    specs = dict(zip(info.outputs, info.output_types))
    out = {}
    for name in outputs or info.outputs:
        dtype, dims = specs[name]
        out[name] = np.empty((0, *(max(d, 0) for d in dims)), NUMPY_TYPES.get(dtype, np.object_))
    return out


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


#: a peer that closed the connection without an answer: geventhttpclient's, aiohttp's
_CLOSED = frozenset({"HTTPConnectionClosed", "ServerDisconnectedError"})
#: an answer that is not HTTP, or not JSON where Triton answers JSON
_NOT_TRITON = frozenset({"HTTPParseError", "JSONDecodeError", "ContentTypeError"})


#: the statuses of a request the model failed on or the server refused as malformed (gRPC, HTTP): the model's
#: own message ("segment not found") must not read as a server state ("not found": not ready)
_FAILED = frozenset({"INTERNAL", "INVALID_ARGUMENT", "500", "400"})


def _status(exc: Exception) -> str | None:
    """tritonclient's status of an InferenceServerException ("INTERNAL" from "StatusCode.INTERNAL", "500")."""
    status = getattr(exc, "status", None)
    try:
        value = status() if callable(status) else None
    except Exception:  # noqa: BLE001 - not tritonclient's exception
        return None
    return None if value is None else str(value).rpartition(".")[2]


def map_error(exc: Exception, model: str, url: str) -> ServingError:
    """tritonclient's exception as the mlplat error that says what happened."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    where = f"model {model!r} at {url}"
    if isinstance(exc, TimeoutError):  # a socket's or asyncio's: the server took too long to answer
        return InferenceTimeoutError(f"{where}: no answer in time ({text}); is the server overloaded or hung?")
    if isinstance(exc, OSError) or type(exc).__name__ in _CLOSED:  # refused, reset, closed, no route
        return ModelNotReadyError(f"{where} is not ready: the server cannot be reached ({text})")
    if type(exc).__name__ in _NOT_TRITON:
        return ServingError(f"{where}: the answer is not Triton's ({type(exc).__name__}: {text}); is that the "
                            "Triton server's port for this protocol?")
    if _status(exc) in _FAILED:  # the model (or the request) failed: its text, a model's own, says no state
        return ServingError(f"{where}: {text}")
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
