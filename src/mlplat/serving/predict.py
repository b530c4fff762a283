"""One-call online prediction: entity rows -> online features -> inference -> result, logged.

The plan for a model version is built once (and cached for ``cache_seconds``):
its feature references pinned to the definition versions it was trained on
(from the run's logged input) and named as that training table named them
(``view__feature`` when it was retrieved with ``full_feature_names=True``),
the order of its input columns (``columns`` given to ``log_model``, else the
features in reference order), its input tensor's name and type. A feature
view a model needs must have been materialized, at that definition version,
into this online store: otherwise predict refuses instead of serving nulls.
A missing input value (an entity the online store has no row for, a null, a None
request-time value) goes to the model as the version's ``fill_null`` (logged with the
model: one number, a number per column, or refused); a version logged before
``fill_null`` was recorded gets 0, as it always did.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .._arrow import to_table
from .._expiring import Expiring
from ..errors import DataError, ServingError
from ..runs.torch_io import checked_fill_null
from .client import TritonClient
from .served_log import OWN_COLUMNS, ServedLog, own_column_clash
from .shaping import NUMPY_TYPES, check_cast

__all__ = ["Predictor", "Prediction"]


class Prediction(dict):
    """Column lists: the join keys, then each model output; plus ``model``, ``version`` and ``variant``.

    An output of one value per row gives a number per entity row; a wider one gives each row's values as
    a list (e.g. ``[p_legit, p_fraud]`` from a 2-class softmax)."""

    def __init__(self, columns: dict[str, list], *, model: str, version: int, variant: str,
                 features: dict[str, list]) -> None:
        super().__init__(columns)
        self.model, self.version, self.variant = model, version, variant
        self.features = features

    def to_arrow(self) -> pa.Table:
        """The outputs (and entity keys) as a pyarrow Table."""
        return pa.table(dict(self))


@dataclass(frozen=True)
class _Plan:
    model: str
    version: int
    run_id: str
    refs: tuple[str, ...]  # pinned "view@version:feature"
    full_feature_names: bool  # named view__feature, as in the training table
    feature_names: tuple[str, ...]  # their output names
    join_keys: tuple[str, ...]
    columns: tuple[str, ...]  # model input columns in order
    input_name: str
    input_dtype: Any
    outputs: tuple[str, ...]
    types: dict[str, pa.DataType]
    fills: tuple[int | float | None, ...]  # per column: what a missing value becomes; None: refused

    @property
    def narrow_float(self) -> bool:
        """A float input narrower than a Python float (float32): a large value may become infinity in it."""
        dtype = np.dtype(self.input_dtype)
        return dtype.kind == "f" and dtype.itemsize < 8  # (an int64 input column cannot grow to infinity)


class Predictor:
    """Builds and caches prediction plans; runs them against a backend."""

    def __init__(self, features, models, served_log: ServedLog, *, cache_seconds: float = 10.0) -> None:
        self._features = features
        self._models = models
        self._log = served_log
        self._plans: Expiring[_Plan] = Expiring(cache_seconds)

    def plan(self, model: str, *, version: int | None = None, stage: str | None = None,
             alias: str | None = None) -> _Plan:
        return self._plans.get((model, version, stage, alias), lambda: self._make_plan(model, version, stage, alias))

    def _make_plan(self, model: str, version: int | None, stage: str | None, alias: str | None) -> _Plan:
        info = self._models.resolve(model, version=version, stage=stage, alias=alias)
        meta = self._models.artifact_meta(info)
        sig = (meta.get("signature") or {})
        if not sig.get("inputs"):
            raise ServingError(f"{model} v{info.version} was logged without a signature, so predict cannot shape "
                               "its input: log it with example_input= and columns= (run.log_model or "
                               "p.runs.training) so its input tensor and the features' order are known")
        if len(sig.get("inputs", [])) != 1:
            raise ServingError(f"predict serves models with one input tensor; {model} v{info.version} has "
                               f"{len(sig.get('inputs', []))}")
        refs, full = self._models.training_features(info)  # not lineage(): that also reads history, approvals
        if not refs:
            raise ServingError(f"{model} v{info.version} was trained without logged feature refs: log its "
                               "training data with run.log_input(..., feature_refs=...) so predict knows them")
        requests, names = self._features.resolve(refs, full_feature_names=full)
        self._check_materialized(model, info.version, requests)
        keys: list[str] = []
        types: dict[str, pa.DataType] = {"model_version": pa.int64()}  # the served log's column types
        for req in requests:
            keys += [k for k in req.view.join_keys if k not in keys]
            for f, out in zip(req.features, req.output_names):
                types[out] = req.view.field(f).dtype.arrow
        columns = tuple(meta.get("columns") or names)
        spec = sig["inputs"][0]
        width = spec["shape"][-1] if len(spec["shape"]) > 1 else 1
        if width not in (-1, len(columns)):
            raise ServingError(f"{model} v{info.version} takes {width} input columns but its columns are {columns}")
        dtype = NUMPY_TYPES.get({"float32": "FP32", "float64": "FP64", "int64": "INT64",
                                 "int32": "INT32"}.get(spec["dtype"], ""))
        if dtype is None:
            raise ServingError(f"predict cannot build a {spec['dtype']} input for {model} v{info.version}")
        for c in columns:  # request-time inputs (what the entity rows give) are logged as input.<name>
            if c not in names and c not in keys:
                types[f"input.{c}"] = pa.from_numpy_dtype(dtype)
        return _Plan(model, info.version, info.run_id, tuple(refs), full, tuple(names), tuple(keys), columns,
                     spec["name"], dtype, tuple(t["name"] for t in sig["outputs"]), types,
                     _fills(model, info.version, meta, columns, spec["dtype"]))

    def _check_materialized(self, model: str, version: int, requests) -> None:
        for req in requests:
            if self._features.last_materialized(req.view.name, req.view.version) is None:
                raise ServingError(
                    f"feature view {req.view.name!r} at definition version {req.view.version}, which {model} "
                    f"v{version} was trained with, has never been materialized into "
                    f"{self._features.online_store.name}: run "
                    f"p.features.materialize(views=['{req.view.name}@{req.view.version}'])")

    def predict(self, model: str, entity_rows: Any, *, backend: Any, version: int | None = None,
                stage: str | None = None, alias: str | None = None, variant: str = "default",
                triton_model: str | None = None, log: bool = True) -> Prediction:
        if inspect.iscoroutinefunction(getattr(backend, "infer", None)):
            raise ServingError("predict runs synchronously: give it a synchronous backend (mp.TritonClient or the "
                               "local backend), not an mp.AsyncTritonClient")
        plan = self.plan(model, version=version, stage=stage, alias=alias)
        clash = own_column_clash([*plan.join_keys, *plan.feature_names]) if log else []
        if clash:  # before anything is served: its rows would not fit the log (it dropped them all at its flush)
            raise ServingError(f"{model} v{plan.version}'s {'/'.join(map(repr, clash))} (a join key or feature) is "
                               "named as a column the served-feature log writes for every row "
                               f"({', '.join(OWN_COLUMNS)}), so its predictions cannot be logged for skew checks: "
                               "name it otherwise in the feature view and train again, or predict with log=False")
        # a table (pandas, polars, Arrow) becomes Arrow once, for the online read and the request-time columns
        rows = entity_rows if isinstance(entity_rows, (dict, list)) else to_table(entity_rows, "entity rows")
        online = self._features.get_online_features(list(plan.refs), rows,
                                                    full_feature_names=plan.full_feature_names)
        n = len(online[plan.join_keys[0]]) if plan.join_keys else 0
        if n == 0:  # no entity rows: nothing to infer or log
            return Prediction({**{k: [] for k in plan.join_keys}, **{o: [] for o in plan.outputs}}, model=model,
                              version=plan.version, variant=variant, features={f: [] for f in plan.feature_names})
        matrix = np.empty((n, len(plan.columns)), dtype=plan.input_dtype)
        given = {}  # request-time inputs, logged with nulls where the rows gave none
        refused = []  # columns with a missing value that the model's fill_null does not fill
        narrow = plan.narrow_float
        with np.errstate(over="ignore"):  # a float32 column's overflow is refused below, naming the value
            for j, (col, fill) in enumerate(zip(plan.columns, plan.fills)):
                values = online.get(col)
                if values is None:
                    values = given[col] = _request_column(rows, col, n)
                if None in values:
                    if fill is None:
                        refused.append((col, values))
                        continue
                    values = [fill if v is None else v for v in values]  # as the model was trained
                try:
                    matrix[:, j] = _numbers(plan, col, values)
                except OverflowError:  # a Python int past the input type's range: the checked path names it
                    _checked_numbers(_what(plan, col), np.dtype(plan.input_dtype), values)
                    raise
                if narrow and np.isinf(matrix[:, j]).any():  # 1e300 became inf in float32, unless it was
                    _checked_numbers(_what(plan, col), np.dtype(plan.input_dtype), values)  # inf: names the value
                if col in given:  # as the model got them (numbers of its type), so the log file's column converts
                    given[col] = [None if g is None else v for g, v in zip(given[col], matrix[:, j].tolist())]
        if refused:  # before inference and the served log: nothing is served
            raise _missing_error(plan, refused, online, n)
        served = triton_model or model
        given_name, output_names = _served_names(backend, served, plan)
        outputs = backend.infer(served, {given_name: matrix}, version=plan.version)
        flat = {name: _per_row(model, name, outputs[out], n) for name, out in zip(plan.outputs, output_names)}
        keys = {k: online[k] for k in plan.join_keys}
        features = {name: online[name] for name in plan.feature_names}
        if log:
            self._log.add(model, plan.version, variant, keys, features, flat, refs=plan.refs, types=plan.types,
                          full_feature_names=plan.full_feature_names, inputs=given)
        return Prediction({**keys, **flat}, model=model, version=plan.version, variant=variant, features=features)


def _fills(model: str, version: int, meta: dict, columns: tuple[str, ...], dtype: str) -> tuple:
    """Per input column, the value predict gives the model where it has none (None: refuse), from the
    ``fill_null`` log_model recorded; a version logged before that was recorded gets 0 everywhere."""
    if "fill_null" not in meta:
        return (0,) * len(columns)
    try:  # checked again here: the columns may have been the features' names, unknown when it was logged
        rule = checked_fill_null(meta["fill_null"], columns, dtype)
    except DataError as exc:
        raise ServingError(f"{model} v{version} cannot be served with the fill_null it was logged with: {exc}; "
                           "log the model again with a fill_null that fits its input columns") from None
    return tuple(rule.get(c) for c in columns) if isinstance(rule, dict) else (rule,) * len(columns)


def _numbers(plan: _Plan, col: str, values: list) -> list | np.ndarray:
    """One input column's values as numbers the model's input type holds unchanged, else DataError naming
    the value: a string or list among them, a fraction, NaN or a value out of range for an integer input
    (the checks a Triton client or the local backend makes of an input array). Plain Python floats and ints
    (what the online store gives) for a float input, and ints in range for an integer one, pass as they are."""
    want = np.dtype(plan.input_dtype)
    if want.kind == "f":
        if all(v.__class__ is float or v.__class__ is int for v in values):
            return values
    elif want.char in _INT_RANGE and all(v.__class__ is int for v in values) \
            and _INT_RANGE[want.char][0] <= min(values) and max(values) <= _INT_RANGE[want.char][1]:
        return values
    return _checked_numbers(_what(plan, col), want, values)


def _what(plan: _Plan, col: str) -> str:
    return f"column {col!r} of {plan.model} v{plan.version}'s input"


_INT_RANGE = {np.dtype(t).char: (np.iinfo(t).min, np.iinfo(t).max) for t in (np.int8, np.int16, np.int32, np.int64,
                                                                         np.uint8, np.uint16, np.uint32, np.uint64)}


def _checked_numbers(what: str, want: np.dtype, values: list) -> np.ndarray:
    """The values as an array after :func:`check_cast`'s checks (numpy types, bools, floats for an integer
    input), else DataError naming the value."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):  # ragged: lists among the numbers
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "biuf":
        bad = next((v for v in values if not isinstance(v, (int, float, np.number, np.bool_))), None)
        if bad is None:  # numbers all, some too large for any numpy integer
            raise DataError(f"{what} is {want} and cannot hold {max(values, key=abs)!r}")
        raise DataError(f"{what} must hold numbers ({want}), got {bad!r}")
    check_cast(what, str(want), arr, want)
    return arr


def _missing_error(plan: _Plan, refused: list[tuple[str, list]], online: dict[str, list], n: int) -> DataError:
    """The error for input columns with missing values that the model's ``fill_null`` does not fill: each
    column with the entity rows (their join keys, the first few) that had no value, and what to do."""
    parts, kinds = [], set()
    for col, values in refused:
        missing = [i for i, v in enumerate(values) if v is None]
        shown = ", ".join(
            "(" + ", ".join(f"{k}={online[k][i]!r}" for k in plan.join_keys) + ")" if plan.join_keys else f"row {i}"
            for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        kind = "feature" if col in plan.feature_names else "request-time input"
        kinds.add(kind)
        parts.append(f"{kind} {col!r} has no value for {len(missing)} of {n} entity rows: {shown}{more}")
    todo = "".join(t for k, t in (("feature", "materialize the feature views (p.features.materialize) so the "
                                               "online store holds those entities, "),
                                   ("request-time input", "give every entity row its request-time inputs, "))
                   if k in kinds)
    return DataError(f"{plan.model} v{plan.version} refuses missing input values (its fill_null does not fill "
                     f"these columns): {'; '.join(parts)}. To serve them, {todo}or log the model with fill_null= "
                     "(a number, or a mapping column -> number, as the training data was filled)")


def _served_names(backend: Any, served: str, plan: _Plan) -> tuple[str, tuple[str, ...]]:
    """The served model's names for the signature's input and outputs: the same names, or, where the backend
    names them otherwise, its one input and its outputs by position (a ``pytorch_libtorch`` export names
    tensors ``INPUT__0`` / ``OUTPUT__0`` when the signature's names do not follow its ``name__<index>``
    rule, and that backend finds them by position). The local backend serves the signature's names."""
    if not isinstance(backend, TritonClient):
        return plan.input_name, plan.outputs
    info = backend.info(served)
    inputs = [name for name, _, _ in info.inputs]
    if inputs == [plan.input_name] and all(o in info.outputs for o in plan.outputs):
        return plan.input_name, plan.outputs
    if len(inputs) != 1 or len(info.outputs) != len(plan.outputs):
        raise ServingError(f"{served!r} on the backend takes inputs {inputs} and gives outputs {list(info.outputs)}; "
                           f"{plan.model} v{plan.version} was logged with input {plan.input_name!r} and outputs "
                           f"{list(plan.outputs)}: serve an export of that version (p.serving.export_triton), or "
                           "pass triton_model= naming it")
    return inputs[0], tuple(info.outputs)


def _per_row(model: str, name: str, values: Any, n: int) -> list:
    """An output as one entry per entity row: a number where the model gives one value per row, else the
    row's values as a list (nested as the output's shape: a 2-class softmax gives ``[p0, p1]`` per row)."""
    arr = np.asarray(values)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ServingError(f"{model}'s output {name!r} has shape {arr.shape}: not one row per entity row ({n})")
    return arr.reshape(n).tolist() if arr.size == n else arr.tolist()


def _request_column(rows: dict | list | pa.Table, name: str, n: int) -> list:
    """A request-time input (not a feature) from the entity rows: one value per entity row, None where a row
    has none. A NaN is none too, however the rows came: pandas turns it into a null on the way to Arrow, and a
    list of dicts gave the model the NaN (a NaN prediction, logged as served) where a frame was filled."""
    if isinstance(rows, dict):
        if name in rows:
            values = rows[name]
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
                raise DataError(f"column {name!r} of the entity rows must be a list with one value per entity row, "
                                f"got {values!r}")
            if len(values) != n:
                raise DataError(f"column {name!r} has {len(values)} values for {n} entity rows: give one value per "
                                "entity row")
            return _nans_as_none(values)
    elif isinstance(rows, list):
        # a row that leaves the input out (as JSON leaves out a null field) has none: filled or refused as None
        if all(isinstance(r, dict) for r in rows) and any(name in r for r in rows):
            return _nans_as_none(r.get(name) for r in rows)
    elif name in rows.column_names:  # an Arrow or polars NaN too (pandas made its NaN a null)
        return _nans_as_none(rows.column(name).to_pylist())
    raise DataError(f"the model needs a column {name!r}: it is not a feature, so the entity rows must hold it")


def _nans_as_none(values: Any) -> list:
    return [None if isinstance(v, (float, np.floating)) and v != v else v for v in values]
