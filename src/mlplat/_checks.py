"""Checks of arguments that several parts share (skew, drift, the A/B gateway, the registry, exports, runs,
search)."""
from __future__ import annotations

import difflib
import operator

import numpy as np

from .errors import DataError, MlplatError


def as_int(value: object) -> int | None:
    """``value`` as a Python int when it is an integer (numpy and torch integers too), not a bool; else None.

    >>> as_int(7), as_int(True), as_int(7.0)
    (7, None, None)
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


#: the largest version number of a model or a feature definition (their version columns are 32-bit INTEGERs
#: on PostgreSQL: a larger one overflowed the query)
VERSION_MAX = 2**31 - 1


#: the widths of Triton's ModelConfig fields (int32 and uint64), which an export checks (the library and the
#: CLI's serve export options)
TRITON_INT32_MAX, TRITON_UINT64_MAX = 2**31 - 1, 2**64 - 1


#: the most bins a drift check takes per feature (the library and the CLI's --bins): more leaves most of
#: them a few training rows (and 10**10 did not fit in memory)
BINS_MAX = 1_000


def check_version(version: object) -> int:
    """A model or feature-definition version number as a Python int (numpy's too): an int from 1 to
    :data:`VERSION_MAX`, else DataError."""
    version = plain(version)
    require_number("version", version, low=1, high=VERSION_MAX, integer=True,
                   meaning=f"a version number (an int: 1, 2, ..., at most {VERSION_MAX})")
    return version  # type: ignore[return-value]


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` as an error message quotes it: shortened past ``limit`` characters (a megabyte of notes
    is not echoed back), and a huge int, whose repr Python refuses past 4300 digits, named by its type.

    >>> shown("n" * 100, limit=10)
    "'nnnnnnnnn... (102 characters)"
    """
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def require_bool(name: str, value: object) -> bool:
    """Refuse ``value`` unless it is True or False (1, "yes" and None are refused: say which is meant).

    >>> require_bool("preserve_ordering", 1)
    Traceback (most recent call last):
    mlplat.DataError: preserve_ordering must be True or False, got 1
    """
    if not isinstance(value, bool):
        raise DataError(f"{name} must be True or False, got {value!r}")
    return value


def plain(value: object) -> object:
    """A numpy number as the Python number it holds (``np.int64(8)`` -> ``8``, ``np.bool_(True)`` -> ``True``),
    for the checks below and what is stored after them; anything else as it is.

    >>> plain(np.float32(0.5)), plain("8")
    (0.5, '8')
    """
    return value.item() if isinstance(value, np.generic) else value


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


def close_names(name: str, known: list[str], none_yet: str) -> str:
    """The end of a "not found" message: close matches of ``name`` among ``known``, else the known names
    (at most 20), else ``none_yet``.

    >>> close_names("frad", ["fraud", "churn"], "no model is registered yet")
    "; did you mean 'fraud'?"
    >>> close_names("x", [], "no model is registered yet")
    '; no model is registered yet'
    """
    close = difflib.get_close_matches(name, known, n=3)
    if close:
        return f"; did you mean {', '.join(map(repr, close))}?"
    return f"; known: {', '.join(known[:20])}" if known else f"; {none_yet}"


def storable(text: str, what: str, *, error: type[MlplatError] = DataError) -> str:
    """``text`` if SQLite and PostgreSQL both store it as given, else ``error`` naming ``what``: no NUL
    character (PostgreSQL's text cannot hold one) and valid UTF-8 (no lone surrogate such as ``'\\udcff'``,
    which ``os.fsdecode`` or ``errors="surrogateescape"`` leave for a byte that is not UTF-8). Checked before
    anything is written or looked up: in a query such text failed the whole transaction (every buffered
    metric point with it) or came out of the driver as a raw UnicodeEncodeError."""
    if "\x00" in text:
        raise error(f"{what} holds a NUL character ('\\x00'), which PostgreSQL cannot store: {shown(text)}; "
                        "remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} holds {text[exc.start]!r}, a lone surrogate that is not UTF-8 text: {shown(text)} "
                        "(what decoding bytes with errors='surrogateescape' leaves for a byte that is not UTF-8); "
                        "decode those bytes with their real encoding, or with errors='replace'") from None
    return text
