"""Online stores: where materialized feature values are served from.

``open_online_store(url)`` picks the implementation by URL scheme:
``sqlite:///path`` (the embedded default), ``redis://`` / ``rediss://``
(one node), ``redis+cluster://`` / ``rediss+cluster://`` (Redis Cluster).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from ...errors import ConfigError
from .store import OnlineStore

__all__ = ["OnlineStore", "open_online_store"]


def open_online_store(url: str) -> OnlineStore:
    """The online store at ``url``."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteOnlineStore

        return SQLiteOnlineStore(url)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from .redis import RedisOnlineStore

        return RedisOnlineStore(url)
    raise ConfigError(f"online store {url!r}: use sqlite:///path, redis://host:port/db or redis+cluster://host:port")
