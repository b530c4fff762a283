"""SQLAlchemy 2.0 typed declarative tables.

One ``Base`` with a naming convention (so constraint names are the same on
SQLite and PostgreSQL and migrations can refer to them) and a timestamp type
that always gives back timezone-aware UTC datetimes, also on SQLite.
A change here needs a migration in ``db/migrations/versions``; a test checks
that autogenerate finds no difference between these tables and the migrated
database.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, DateTime, ForeignKey, Index, MetaData, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = ["Base", "UTCDateTime", "FeatureDefinition", "FeatureDefinitionTag", "Materialization", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime; naive input is taken as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDocument}


class FeatureDefinition(Base):
    """One version of an entity, feature view or feature service definition."""

    __tablename__ = "feature_definitions"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int]
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("kind", "name", "version"),
        Index(None, "kind", "name"),
    )


class FeatureDefinitionTag(Base):
    """A tag of a definition version, kept apart so search by tag is one indexed query."""

    __tablename__ = "feature_definition_tags"

    definition_id: Mapped[int] = mapped_column(
        ForeignKey("feature_definitions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))

    __table_args__ = (Index(None, "key", "value"),)


class Materialization(Base):
    """One finished materialization of a view version into an online store."""

    __tablename__ = "materializations"

    id: Mapped[int] = mapped_column(primary_key=True)
    view: Mapped[str] = mapped_column(String(255))
    view_version: Mapped[int]
    online_store: Mapped[str] = mapped_column(String(1024))
    start: Mapped[Optional[datetime]]
    end: Mapped[datetime]
    rows: Mapped[int]
    written: Mapped[int]
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index(None, "view", "view_version", "online_store"),)
