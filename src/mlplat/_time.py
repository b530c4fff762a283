"""UTC datetimes: mlplat reads a naive datetime as UTC and hands out aware UTC ones."""
from __future__ import annotations

from datetime import datetime, timezone

from .errors import DataError

__all__ = ["as_utc", "utc_argument"]


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (a naive one is taken as UTC; an aware one keeps its instant).

    >>> as_utc(datetime(2026, 1, 1, 12)).isoformat()
    '2026-01-01T12:00:00+00:00'
    """
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utc_argument(name: str, value: object) -> datetime:
    """A public function's datetime argument as aware UTC; anything else, pandas' NaT included, is a DataError
    naming it. A pandas Timestamp stays one, with its nanoseconds."""
    if not isinstance(value, datetime) or value != value:  # NaT is a datetime unequal to itself
        raise DataError(f"{name} must be a datetime (naive means UTC), got {value!r}")
    try:
        return as_utc(value)
    except OverflowError:  # year 1 at +05:00, year 9999 at -05:00: before or after what a datetime holds in UTC
        raise DataError(f"{name} {value.isoformat()} is outside the years 1 to 9999 in UTC") from None
