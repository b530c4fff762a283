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

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .._time import as_utc

__all__ = [
    "Base", "UTCDateTime", "utcnow", "FeatureDefinition", "FeatureDefinitionTag", "Materialization",
    "Experiment", "Run", "RunParam", "RunTag", "MetricChunk", "LatestMetric", "RunInput", "RunArtifact",
    "RegisteredModel", "ModelVersion", "ModelAlias", "ModelTransition", "ModelPolicyChange", "ABDecision",
    "ABOutcome", "FlushMark",
]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime; naive input is taken as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        return as_utc(value)


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


# ------------------------------------------------------------------ tracking
class Experiment(Base):
    """A named group of runs."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Run(Base):
    """One execution of training code."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(16))
    start_time: Mapped[datetime] = mapped_column(default=utcnow)
    end_time: Mapped[Optional[datetime]]
    parent_run_id: Mapped[Optional[str]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    user: Mapped[str] = mapped_column(String(255), default="")
    artifact_uri: Mapped[str] = mapped_column(String(2048), default="")

    __table_args__ = (Index(None, "experiment_id", "start_time"),)


#: Search by param or tag value uses a covering index (key, value, run_id) over values up to this
#: length; a longer value would not fit a PostgreSQL btree entry, so the index is partial
#: (see runs/search.py).
SHORT_VALUE = 512
_SHORT = text(f"length(value) <= {SHORT_VALUE}")


class RunParam(Base):
    __tablename__ = "run_params"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_run_params_key_short_value", "key", "value", "run_id", sqlite_where=_SHORT,
                            postgresql_where=_SHORT),)


class RunTag(Base):
    __tablename__ = "run_tags"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_run_tags_key_short_value", "key", "value", "run_id", sqlite_where=_SHORT,
                            postgresql_where=_SHORT),)


class MetricChunk(Base):
    """Points of one metric of a run written by one flush, as packed little-endian arrays.

    A flush of a million points over ten keys is ten rows, not a million: writes cost almost
    nothing in index upkeep, and NaN and infinities are stored as they are.
    """

    __tablename__ = "run_metric_chunks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    count: Mapped[int]
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[bytes] = mapped_column(LargeBinary)  # int64
    values: Mapped[bytes] = mapped_column(LargeBinary)  # float64
    timestamps: Mapped[bytes] = mapped_column(LargeBinary)  # int64, ms since the epoch

    __table_args__ = (Index(None, "run_id", "key"),)


class LatestMetric(Base):
    """The latest point of each metric of a run (greatest step, then timestamp): what search reads.

    A NaN value is stored as NULL here (SQLite cannot store NaN in a REAL column)."""

    __tablename__ = "run_latest_metrics"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[Optional[float]] = mapped_column(Double)
    step: Mapped[int] = mapped_column(BigInteger)
    timestamp: Mapped[int] = mapped_column(BigInteger)

    # covering: a search term reads run ids straight from the index
    __table_args__ = (Index(None, "key", "value", "run_id"),)


class RunInput(Base):
    """A data set a run trained or evaluated on, fingerprinted in full."""

    __tablename__ = "run_inputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    content_hash: Mapped[str] = mapped_column(String(128))
    row_count: Mapped[int] = mapped_column(BigInteger)
    schema: Mapped[dict[str, Any]]
    feature_refs: Mapped[dict[str, Any]]  # {"refs": [...pinned "view@v:feature"...], "entity_rows": artifact path}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("run_id", "name"),)


class RunArtifact(Base):
    """A file (or a model folder) stored for a run in the artifact store."""

    __tablename__ = "run_artifacts"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "file" or "model"
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ------------------------------------------------------------------ registry
class RegisteredModel(Base):
    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    require_distinct_approver: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    version: Mapped[int]
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    artifact: Mapped[str] = mapped_column(String(1024))
    #: the artifact's sha256 when it was registered (its files may not change after); None: registered before
    #: mlplat recorded it and its artifact row was gone by then, so unknown
    artifact_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16), default="none")
    description: Mapped[str] = mapped_column(Text, default="")
    registered_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        Index(None, "model_id", "stage"),
        # at most one production version per model, whatever races happen above
        Index("uq_model_versions_one_production", "model_id", unique=True,
              sqlite_where=text("stage = 'production'"), postgresql_where=text("stage = 'production'")),
    )


class ModelAlias(Base):
    __tablename__ = "model_aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(255), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))


class ModelTransition(Base):
    """Every change of a version's stage or alias: who, when, from, to, approved by, why."""

    __tablename__ = "model_transitions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    from_stage: Mapped[str] = mapped_column(String(64))
    to_stage: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(255))
    approved_by: Mapped[Optional[str]] = mapped_column(String(255))
    notes: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index(None, "version_id", "at"),)


class ModelPolicyChange(Base):
    """Every change of a model's approval policy: to what, who, when, why."""

    __tablename__ = "model_policy_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    require_distinct_approver: Mapped[bool]
    actor: Mapped[str] = mapped_column(String(255))
    notes: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index(None, "model_id", "at"),)


# ------------------------------------------------------------------ serving
class ABDecision(Base):
    """Which variant (and model version) the A/B gateway sent a user to, and when."""

    __tablename__ = "ab_decisions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    experiment_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(255))
    variant: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[int]
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index(None, "experiment_id", "user_id"),)


class ABOutcome(Base):
    """An outcome observed for a user in an A/B experiment (a conversion, a loss, a label)."""

    __tablename__ = "ab_outcomes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    experiment_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(255))
    outcome: Mapped[float] = mapped_column(Double)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index(None, "experiment_id", "user_id"),)


# ------------------------------------------------------------------ buffered writes
class FlushMark(Base):
    """A batch of buffered rows (metric points, A/B decisions and outcomes) that a flush committed, written in
    the batch's transaction: a retry of a batch whose commit may have happened looks it up (mlplat.db.batches).
    The writer deletes it in a later transaction; a process that died leaves a few."""

    __tablename__ = "flush_marks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    at: Mapped[datetime] = mapped_column(default=utcnow)
