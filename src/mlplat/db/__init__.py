"""The SQL database every part of mlplat shares: engine factory, tables, migrations.

SQLite (embedded default, WAL mode) and PostgreSQL are supported by URL. The
schema is created on first use and upgraded with the Alembic migrations that
ship inside the package (``mlplat/db/migrations``).
"""
from __future__ import annotations

from .engine import Database, create_engine, normalize_url
from .models import Base

__all__ = ["Base", "Database", "create_engine", "normalize_url"]
