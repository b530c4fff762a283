"""Model versions record their artifact's sha256 at registration, so a change after it shows.

Versions registered before get the sha256 their artifact row holds now (the best record there is;
null, meaning unknown, where the row is gone).

Revision ID: 0006_model_version_sha256
Revises: 0005_model_policy_changes
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_model_version_sha256"
down_revision: str | None = "0005_model_policy_changes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("artifact_sha256", sa.String(length=64), nullable=True))
    op.execute("UPDATE model_versions SET artifact_sha256 = (SELECT run_artifacts.sha256 FROM run_artifacts "
               "WHERE run_artifacts.run_id = model_versions.run_id AND run_artifacts.path = model_versions.artifact)")


def downgrade() -> None:
    op.drop_column("model_versions", "artifact_sha256")
