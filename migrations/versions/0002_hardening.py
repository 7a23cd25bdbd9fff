"""Issue 10: artifacts.info (what the upload checks found, for job compatibility checks) and an index for the
per-owner active-jobs quota.

Revision ID: 0002_hardening
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002_hardening"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

JSONT = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("info", JSONT, nullable=True))
    op.create_index("ix_jobs_owner_status", "jobs", ["owner_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_status", table_name="jobs")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("info")
