"""Checks of numeric arguments that several parts share (skew, drift, the A/B gateway)."""
from __future__ import annotations

from .errors import DataError


def require_number(name: str, value: object, *, low: float, high: float | None = None, integer: bool = False,
                   meaning: str) -> None:
    """Refuse ``value`` unless it is a number (not a bool) in ``[low, high]``, an int where ``integer``.

    >>> require_number("alpha", True, low=0, high=1, meaning="a probability between 0 and 1")
    Traceback (most recent call last):
    mlplat.DataError: alpha must be a probability between 0 and 1, got True
    """
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not number or not value >= low or (high is not None and not value <= high):  # type: ignore[operator]
        raise DataError(f"{name} must be {meaning}, got {value!r}")
