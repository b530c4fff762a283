"""Feature catalog: versioned definitions and their tags.

Revision ID: 0001_feature_catalog
Revises:
Create Date: 2026-11-26
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from mlplat.db.models import JSONDocument, UTCDateTime

revision: str = "0001_feature_catalog"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feature_definitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", JSONDocument, nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feature_definitions")),
        sa.UniqueConstraint("kind", "name", "version", name=op.f("uq_feature_definitions_kind_name_version")),
    )
    op.create_index(op.f("ix_feature_definitions_kind_name"), "feature_definitions", ["kind", "name"])
    op.create_table(
        "feature_definition_tags",
        sa.Column("definition_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["definition_id"],
            ["feature_definitions.id"],
            name=op.f("fk_feature_definition_tags_definition_id_feature_definitions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("definition_id", "key", name=op.f("pk_feature_definition_tags")),
    )
    op.create_index(op.f("ix_feature_definition_tags_key_value"), "feature_definition_tags", ["key", "value"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feature_definition_tags_key_value"), table_name="feature_definition_tags")
    op.drop_table("feature_definition_tags")
    op.drop_index(op.f("ix_feature_definitions_kind_name"), table_name="feature_definitions")
    op.drop_table("feature_definitions")
