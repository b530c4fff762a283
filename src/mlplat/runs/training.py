"""The training helper: tracking as the default path, in two or three added lines.

Usage (an existing torch loop; the added lines are marked)::

    with p.runs.training("fraud", config=cfg, data=train, features=refs, model=model) as t:   # added
        for epoch in range(cfg["epochs"]):
            loss = train_one_epoch(model, loader, optimizer)
            t.epoch(loss=loss, val_auc=evaluate(model, val_loader))                         # added

``config`` (a dict, dataclass, argparse Namespace or any object with
attributes) becomes the run's params, flattened with dots; ``data`` is logged
as the "train" input (with ``features``, its feature definitions are pinned);
each ``t.epoch(...)`` logs its metrics at the next step; ``model`` is logged
when the block ends without an error (or call ``t.model(...)`` yourself).
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from ..errors import DataError
from .run import ActiveRun

__all__ = ["Training", "flatten_config"]


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config as flat params: nested keys joined with dots. Values of kinds a config commonly holds
    whose text is the same in every process (an Enum member, a torch device or dtype) become that text;
    other values are left as they are (a param refuses kinds whose text is not stable).

    >>> flatten_config({"lr": 0.001, "net": {"hidden": 64}})
    {'lr': 0.001, 'net.hidden': 64}
    """
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif not isinstance(config, Mapping):
        try:
            attrs = vars(config)
        except TypeError:  # a list, a number, a string: a raw "vars() argument must have __dict__ attribute"
            raise DataError(f"config must be a dict, a dataclass or an object with attributes (an argparse "
                            f"Namespace), got {type(config).__name__} {config!r:.100}") from None
        config = {k: v for k, v in attrs.items() if not k.startswith("_")}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            items = flatten_config(value, f"{name}.").items()
        else:
            items = [(name, _stable_text(value))]
        for flat, item in items:
            if flat in out:  # {"optim.lr": 0.1, "optim": {"lr": 0.001}}: one value would be lost
                raise DataError(f"config: {flat!r} is given twice (a dotted key and a nested one flatten to the "
                                "same param), so one value would be lost; rename one of them")
            out[flat] = item
    return out


def _stable_text(value: Any) -> Any:
    """An Enum member as ``Class.NAME`` (``str()`` of an IntEnum changed in Python 3.11), a torch device or
    dtype as its text; anything else as it is."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    kind = type(value)
    return str(value) if kind.__module__ == "torch" and kind.__name__ in ("device", "dtype") else value


def _scalar(value: Any) -> Any:
    """A one-element tensor or array as its Python number (``.item()``, which a tensor on a GPU or needing
    grad takes too); anything else as it is, for log_metrics to check and refuse by name."""
    item = getattr(value, "item", None)
    if item is None or isinstance(value, (int, float)):
        return value
    try:
        return item()
    except Exception:  # noqa: BLE001 - more than one element, or an item() of another kind: refused as it is
        return value


class Training:
    """A run set up for a training loop; use it as a context manager."""

    def __init__(self, run: ActiveRun, *, data: Any = None, features: Any = None, model: Any = None,
                 example_input: Any = None, columns: Any = None, fill_null: Any = 0.0) -> None:
        self.run = run
        self._model = model
        self._example = example_input
        self._columns = columns
        self._fill_null = fill_null
        self._epoch = 0
        self.input = run.log_input(data, "train", feature_refs=features) if data is not None else None

    @property
    def id(self) -> str:
        """The run's id."""
        return self.run.id

    def epoch(self, **metrics: float) -> int:
        """Log this epoch's metrics (values may be floats, numpy numbers or one-element torch tensors); returns
        the epoch. A bad value is a DataError and logs none of them (the epoch is not counted)."""
        step = self._epoch
        self.run.log_metrics({k: _scalar(v) for k, v in metrics.items()}, step=step)
        self._epoch += 1
        return step

    def model(self, model: Any, name: str = "model", **kwargs: Any) -> dict[str, Any]:
        """Log the model now (otherwise the one passed at start is logged at the end); ``kwargs`` go to
        ``run.log_model`` (``signature=``; ``example_input=``, ``columns=``, ``fill_null=`` default to those
        given at start)."""
        self._model = None
        return self.run.log_model(model, name, example_input=kwargs.pop("example_input", self._example),
                                  columns=kwargs.pop("columns", self._columns),
                                  fill_null=kwargs.pop("fill_null", self._fill_null), **kwargs)

    def __enter__(self) -> Training:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None and self._model is not None:
            try:
                self.model(self._model)
            except BaseException as err:
                self.run.__exit__(type(err), err, err.__traceback__)
                raise
        self.run.__exit__(exc_type, exc, tb)
