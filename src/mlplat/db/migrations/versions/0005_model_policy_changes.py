"""Model policy changes: who turned a model's distinct-approver rule on or off, when and why.

Revision ID: 0005_model_policy_changes
Revises: 0004_ab_experiments
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mlplat.db.models import UTCDateTime

revision: str = "0005_model_policy_changes"
down_revision: str | None = "0004_ab_experiments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_policy_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("require_distinct_approver", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["registered_models.id"],
            name=op.f("fk_model_policy_changes_model_id_registered_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_policy_changes")),
    )
    op.create_index(op.f("ix_model_policy_changes_model_id_at"), "model_policy_changes", ["model_id", "at"],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_model_policy_changes_model_id_at"), table_name="model_policy_changes")
    op.drop_table("model_policy_changes")
