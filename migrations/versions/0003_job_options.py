"""jobs.options: what the user said about their data when creating the job ({"class_names": [...],
"allow_low_accuracy": bool}), stored with the job so the worker uses it and the job shows it.

Revision ID: 0003_job_options
Revises: 0002_hardening
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003_job_options"
down_revision = "0002_hardening"
branch_labels = None
depends_on = None

JSONT = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite (embedded mode) cannot ALTER in place
        batch.add_column(sa.Column("options", JSONT, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("options")
