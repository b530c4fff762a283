"""A lookup cache whose entries are made again once they are a given number of seconds old.

The serving and online-read paths keep what they looked up in the database (a model's
version at a stage, a prediction or read plan) for a few seconds, so a promotion or a
new definition is picked up without a lookup on every call.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Expiring"]

V = TypeVar("V")


class Expiring(Generic[V]):
    """Values by key, each made again by ``make`` once ``seconds`` old (``seconds=0``: on every call).

    >>> calls = []
    >>> cache = Expiring(60.0)
    >>> cache.get("fraud", lambda: calls.append(1) or 3), cache.get("fraud", lambda: calls.append(1) or 4)
    (3, 3)
    >>> len(calls)
    1
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._items: dict[Hashable, tuple[V, float]] = {}

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for ``key``: the cached one while younger than ``seconds``, else ``make()`` (cached)."""
        hit = self._items.get(key)
        if hit is not None and time.monotonic() - hit[1] < self._seconds:
            return hit[0]
        value = make()  # an exception caches nothing
        self._items[key] = (value, time.monotonic())
        return value

    def clear(self) -> None:
        """Forget every value."""
        self._items.clear()
