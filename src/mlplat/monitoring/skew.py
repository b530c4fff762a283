"""Training-serving skew: recompute what was served with the training path and compare.

The served-feature log holds, for sampled predictions, the entity keys, the
request time and each feature value actually served, with the feature
references pinned to their definition versions. ``skew_check`` rebuilds
those values with ONE offline point-in-time retrieval (the logged rows as
entity rows, stamped with their request times) and reports per feature the
share of values that differ by more than a relative tolerance, whether that
share crosses a threshold, and every mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError, NotFoundError
from .._arrow import is_numeric
from .._checks import require_number

__all__ = ["SkewReport", "FeatureSkew", "Mismatch", "check_limits", "merge_reports", "skew_check"]


@dataclass(frozen=True)
class Mismatch:
    feature: str
    entity: dict[str, Any]
    request_time: datetime
    served: Any
    recomputed: Any


@dataclass(frozen=True)
class FeatureSkew:
    feature: str
    compared: int
    mismatched: int
    share: float
    skewed: bool


@dataclass
class SkewReport:
    """Per feature: values compared, mismatched, their share and whether it crosses the threshold."""

    model: str
    rows: int
    tolerance: float
    threshold: float
    features: dict[str, FeatureSkew] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def skewed(self) -> list[str]:
        """The names of the features whose mismatch share is above the threshold."""
        return [f for f, s in self.features.items() if s.skewed]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``--json`` prints)."""
        return {
            "model": self.model, "rows": self.rows, "tolerance": self.tolerance, "threshold": self.threshold,
            "skewed": self.skewed,
            "features": {f: vars(s) for f, s in self.features.items()},
            "mismatches": [{**vars(m), "request_time": m.request_time.isoformat()} for m in self.mismatches],
        }


#: numbers this close are no mismatch at any tolerance above 0: float noise around zero (a sum of +x and -x
#: giving 1e-13 online and 0.0 offline), as numpy's isclose has an absolute tolerance besides its relative one
_NOISE = 1e-12

def _mismatched(served: pa.ChunkedArray, recomputed: pa.ChunkedArray, tolerance: float) -> np.ndarray:
    """Indices where served and recomputed values differ (null vs value, NaN vs number, an infinity vs
    anything but the same infinity, or beyond tolerance). Numbers compare as numbers whatever their
    types (a float served for an integer feature too); two columns of one integer type compare exactly
    where they are equal, so integers past 2**53 (where float64 rounds) are no mismatch of themselves."""
    if served.type != recomputed.type and not (is_numeric(served.type) and is_numeric(recomputed.type)):
        try:
            served = served.cast(recomputed.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return np.arange(len(served))
    s_null = served.is_null().to_numpy(zero_copy_only=False)
    r_null = recomputed.is_null().to_numpy(zero_copy_only=False)
    t = recomputed.type
    if is_numeric(t):
        a = served.cast(pa.float64(), safe=False).fill_null(0.0).to_numpy()
        b = recomputed.cast(pa.float64(), safe=False).fill_null(0.0).to_numpy()
        a_nan, b_nan = np.isnan(a), np.isnan(b)
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - b)
            far = diff > tolerance * np.maximum(np.abs(a), np.abs(b))
            if tolerance > 0:
                far &= diff > _NOISE
        far |= (np.isinf(a) | np.isinf(b)) & (a != b)  # inf against anything else: no tolerance covers it
        value_differs = (a_nan != b_nan) | (~a_nan & ~b_nan & far)
        if pa.types.is_integer(t) and served.type == t:  # exact where float64 rounds
            unequal = pc.not_equal(served, recomputed).fill_null(False).to_numpy(zero_copy_only=False)
            value_differs = unequal & (value_differs | (tolerance == 0))
    else:
        equal = pc.equal(served, recomputed).fill_null(False).to_numpy(zero_copy_only=False)
        value_differs = ~equal
    both = ~s_null & ~r_null
    return np.flatnonzero((s_null != r_null) | (both & value_differs))


def check_limits(tolerance: float, threshold: float) -> None:
    require_number("tolerance", tolerance, low=0, meaning="a number >= 0 (a relative difference)")
    require_number("threshold", threshold, low=0, high=1, meaning="a share between 0 and 1")


def merge_reports(name: str, reports: list[SkewReport], *, prefix_model: bool = False) -> SkewReport:
    """One report from several (groups of one model's log, or several models serving a view).

    Counts of the same feature add up; with ``prefix_model`` features are named ``model:feature``.
    """
    if len(reports) == 1 and not prefix_model:
        return reports[0]
    first = reports[0]
    merged = SkewReport(name, sum(r.rows for r in reports), first.tolerance, first.threshold)
    counts: dict[str, list[int]] = {}
    for r in reports:
        for feature, s in r.features.items():
            key = f"{r.model}:{feature}" if prefix_model else feature
            c = counts.setdefault(key, [0, 0])
            c[0] += s.compared
            c[1] += s.mismatched
        merged.mismatches += [Mismatch(f"{r.model}:{m.feature}" if prefix_model else m.feature, m.entity,
                                       m.request_time, m.served, m.recomputed) for m in r.mismatches]
    for key, (compared, mismatched) in counts.items():
        share = mismatched / compared if compared else 0.0
        merged.features[key] = FeatureSkew(key, compared, mismatched, share, share > first.threshold)
    merged.mismatches.sort(key=lambda m: m.request_time)
    return merged


def skew_check(features, log: pa.Table, refs: list[str], keys: list[str], *, model: str,
               full_feature_names: bool = False, sample: int | None = None, tolerance: float = 0.01,
               threshold: float = 0.05, seed: int = 0, max_mismatches: int = 1_000,
               view: str | None = None) -> SkewReport:
    """Compare served feature values with the offline retrieval at the same request times
    (``log``: the served rows to check, already limited to a time window by the caller; its features
    named as ``refs`` resolve with ``full_feature_names``; ``view``: check only that view's features)."""
    check_limits(tolerance, threshold)
    if log.num_rows == 0 or not refs:
        raise NotFoundError(f"no served features are logged for {model!r}: predict with logging on first")
    if sample is not None and log.num_rows > sample:
        picks = np.sort(np.random.default_rng(seed).choice(log.num_rows, size=sample, replace=False))
        log = log.take(pa.array(picks))
    report = SkewReport(model, log.num_rows, tolerance, threshold)
    if log.num_rows == 0:
        return report
    entity = pa.table({**{k: log.column(k) for k in keys}, "event_timestamp": log.column("request_time")})
    # one batched point-in-time retrieval
    recomputed = features.get_historical_features(entity, refs, full_feature_names=full_feature_names)
    requests, _ = features.resolve(refs, full_feature_names=full_feature_names)
    view_keys = {name: req.view.join_keys for req in requests for name in req.output_names}
    names = [n for req in requests if view is None or req.view.name == view for n in req.output_names]
    missing = [n for n in names if n not in log.column_names]
    if missing:  # an empty (or short) report would read as "no skew"
        raise DataError(f"the served-feature log of {model!r} has no column for features {missing} that its "
                        f"references {refs} name; it has {log.column_names}: were its files written by "
                        "predict? Move the others out of its folder")
    for name in names:
        bad = _mismatched(log.column(name), recomputed.column(name), tolerance)
        share = len(bad) / log.num_rows
        report.features[name] = FeatureSkew(name, log.num_rows, len(bad), share, share > threshold)
        if max_mismatches and len(bad):  # listed per feature, so every skewed feature gets examples
            picks = pa.array(bad[:max_mismatches])
            served, again = log.column(name).take(picks).to_pylist(), recomputed.column(name).take(picks).to_pylist()
            times = log.column("request_time").take(picks).to_pylist()
            own = view_keys.get(name, keys)  # the keys of the feature's own view
            keys_at = {k: log.column(k).take(picks).to_pylist() for k in own}
            report.mismatches += [Mismatch(name, {k: keys_at[k][j] for k in own}, times[j], served[j], again[j])
                                  for j in range(len(picks))]
    report.mismatches.sort(key=lambda m: m.request_time)
    return report
