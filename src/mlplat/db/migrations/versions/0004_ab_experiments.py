"""A/B experiments: routing decisions and outcomes.

Revision ID: 0004_ab_experiments
Revises: 0003_tracking_registry
Create Date: 2026-11-26
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mlplat.db.models import UTCDateTime

revision: str = "0004_ab_experiments"
down_revision: str | None = "0003_tracking_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ab_decisions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("experiment_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("variant", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ab_decisions")),
    )
    op.create_index(op.f("ix_ab_decisions_experiment_id_user_id"), "ab_decisions", ["experiment_id", "user_id"])
    op.create_table(
        "ab_outcomes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("experiment_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("outcome", sa.Double(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ab_outcomes")),
    )
    op.create_index(op.f("ix_ab_outcomes_experiment_id_user_id"), "ab_outcomes", ["experiment_id", "user_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_ab_outcomes_experiment_id_user_id"), table_name="ab_outcomes")
    op.drop_table("ab_outcomes")
    op.drop_index(op.f("ix_ab_decisions_experiment_id_user_id"), table_name="ab_decisions")
    op.drop_table("ab_decisions")
