"""Markers of committed flushes, so that a batch of metric points or A/B rows retried after an interrupt
that landed as its commit returned is not written twice.

Revision ID: 0007_flush_marks
Revises: 0006_model_version_sha256
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mlplat.db.models import UTCDateTime

revision: str = "0007_flush_marks"
down_revision: str | None = "0006_model_version_sha256"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "flush_marks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flush_marks")),
    )


def downgrade() -> None:
    op.drop_table("flush_marks")
