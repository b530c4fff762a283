"""Materializations: what each view version wrote into which online store, up to when.

Revision ID: 0002_materializations
Revises: 0001_feature_catalog
Create Date: 2026-11-26
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mlplat.db.models import UTCDateTime

revision: str = "0002_materializations"
down_revision: str | None = "0001_feature_catalog"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "materializations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("view", sa.String(length=255), nullable=False),
        sa.Column("view_version", sa.Integer(), nullable=False),
        sa.Column("online_store", sa.String(length=1024), nullable=False),
        sa.Column("start", UTCDateTime(), nullable=True),
        sa.Column("end", UTCDateTime(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("written", sa.Integer(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_materializations")),
    )
    op.create_index(op.f("ix_materializations_view_view_version_online_store"), "materializations",
                    ["view", "view_version", "online_store"])


def downgrade() -> None:
    op.drop_index(op.f("ix_materializations_view_view_version_online_store"), table_name="materializations")
    op.drop_table("materializations")
