"""Drift: does what a model sees in production still look like what it was trained on?

The reference is the model version's training data, rebuilt from the offline
store exactly as lineage's ``verify`` does (kept entity rows + pinned feature
references); the current data is the served-feature log. Per feature:

* numeric: the population stability index over ten quantile bins of the
  training values, and the two-sample Kolmogorov-Smirnov test;
* categorical (strings, booleans): PSI over the categories and a chi-square
  test of homogeneity.

A feature drifted when its PSI exceeds ``psi_threshold`` (0.2 is the usual
"significant shift") or its test's p-value is below ``alpha``, or when one side
has values and the other none (nulls and NaNs are left out, and counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import DataError, NotFoundError
from .._arrow import is_numeric
from .._checks import BINS_MAX, require_number
from .stats import bin_counts, chi2_contingency, ks_2samp, numeric_bins, psi

__all__ = ["DriftReport", "FeatureDrift", "check_drift_limits", "drift_check"]


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    kind: str  # "numeric" or "categorical"
    psi: float
    test: str  # "ks" or "chi2"
    statistic: float
    p_value: float
    drifted: bool
    training_rows: int
    served_rows: int
    training_nulls: int = 0  # rows left out as null or NaN
    served_nulls: int = 0


@dataclass
class DriftReport:
    model: str
    version: int
    psi_threshold: float
    alpha: float
    features: dict[str, FeatureDrift] = field(default_factory=dict)

    @property
    def drifted(self) -> list[str]:
        """The names of the features that drifted."""
        return [f for f, d in self.features.items() if d.drifted]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``--json`` prints)."""
        return {"model": self.model, "version": self.version, "psi_threshold": self.psi_threshold,
                "alpha": self.alpha, "drifted": self.drifted,
                "features": {f: vars(d) for f, d in self.features.items()}}


def check_drift_limits(bins: int, psi_threshold: float, alpha: float) -> None:
    require_number("bins", bins, low=2, high=BINS_MAX, integer=True, meaning=f"an integer from 2 to {BINS_MAX:,}")
    require_number("psi_threshold", psi_threshold, low=0, meaning="a number >= 0")
    require_number("alpha", alpha, low=0, high=1, meaning="a probability between 0 and 1")


def _values(column: pa.ChunkedArray) -> tuple[str, np.ndarray]:
    if is_numeric(column.type):
        arr = column.cast(pa.float64(), safe=False).drop_null().to_numpy()  # integers past 2**53 round
        return "numeric", arr[~np.isnan(arr)]
    return "categorical", np.asarray([str(v) for v in column.drop_null().to_pylist()], dtype=object)


def _comparable(name: str, training: pa.ChunkedArray, served: pa.ChunkedArray) -> pa.ChunkedArray:
    """The served values as the training column's kind: numbers compare as float64 (an int64 training
    column against float32 served inputs), anything else is cast to the training type."""
    if served.type == training.type or (is_numeric(training.type) and is_numeric(served.type)):
        return served
    try:
        return served.cast(training.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"feature {name!r} was served as {served.type} but trained as {training.type}, and the "
                        f"served values do not convert ({exc}): log and train it as one type") from None


def _narrower_float(a: pa.DataType, b: pa.DataType) -> np.dtype | None:
    """The narrowest float type below float64 of two columns' types (None: none is). A request-time input
    predict logs as a float32 model input is 0.10000000149 where the training table held 0.1: compared
    at float64, values on the quantile edges of training moved to the next bin and a calm input drifted."""
    widths = [t.bit_width for t in (a, b) if pa.types.is_floating(t) and t.bit_width < 64]
    return np.dtype(f"float{min(widths)}") if widths else None


def compare_column(name: str, training: pa.ChunkedArray, served: pa.ChunkedArray, *, bins: int = 10,
                   psi_threshold: float = 0.2, alpha: float = 0.01) -> FeatureDrift:
    """One feature's drift. A side with no values at all (every one null or NaN) while the other has
    some has drifted: an online store serving nothing but nulls is not calm."""
    kind, ref = _values(training)
    _, cur = _values(_comparable(name, training, served))
    narrow = _narrower_float(training.type, served.type)
    if kind == "numeric" and narrow is not None:  # both at the precision one side has (0.1 served as float32)
        ref, cur = ref.astype(narrow).astype(np.float64), cur.astype(narrow).astype(np.float64)
    if kind == "numeric":
        edges = numeric_bins(ref, bins)
        expected, actual = bin_counts(edges, ref), bin_counts(edges, cur)
        stat, p = ks_2samp(ref, cur)
        test = "ks"
    else:
        cats = sorted(set(ref.tolist()) | set(cur.tolist()))
        index = {c: i for i, c in enumerate(cats)}
        expected = np.bincount([index[c] for c in ref], minlength=len(cats))
        actual = np.bincount([index[c] for c in cur], minlength=len(cats))
        stat, p = chi2_contingency(expected, actual)
        test = "chi2"
    value = psi(expected, actual)
    if len(ref) and len(cur):
        drifted = bool(value > psi_threshold or p < alpha)
    else:
        drifted = bool(len(ref) or len(cur))  # values on one side only
    return FeatureDrift(name, kind, value, test, stat, p, drifted, len(ref), len(cur),
                        len(training) - len(ref), len(served) - len(cur))


def drift_check(training: pa.Table, served: pa.Table, features: list[str], *, model: str, version: int,
                bins: int = 10, psi_threshold: float = 0.2, alpha: float = 0.01) -> DriftReport:
    """Compare each feature's training distribution with what was served."""
    if served.num_rows == 0:
        raise NotFoundError(f"no served features are logged for {model!r} v{version}")
    for what, table in (("training data", training), ("served-feature log", served)):
        missing = [n for n in features if n not in table.column_names]
        if missing:  # an empty report would read as "no drift"
            raise DataError(f"the {what} of {model!r} v{version} has no column for features {missing}; it has "
                            f"{table.column_names}")
    report = DriftReport(model, version, psi_threshold, alpha)
    for name in features:
        report.features[name] = compare_column(name, training.column(name), served.column(name), bins=bins,
                                               psi_threshold=psi_threshold, alpha=alpha)
    return report
