"""Postgres NOTIFY on every change to a job, an API key or an artifact, so that API processes can serve status
polls from memory and drop an entry the moment its row changes (app/api/poll_cache.py). SQLite (embedded mode)
has no NOTIFY: there the API does not cache and this revision does nothing.

Revision ID: 0004_change_notify
Revises: 0003_job_options
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004_change_notify"
down_revision = "0003_job_options"
branch_labels = None
depends_on = None

CHANNEL = "nba_changes"
TABLES = ("jobs", "api_keys", "artifacts")

# The payload is "<table>:<id>". pg_notify is transactional: listeners hear it only after the commit, so an API
# process never drops an entry and then re-reads the old row from a transaction that has not committed yet.
FUNCTION = f"""
CREATE OR REPLACE FUNCTION nba_notify_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME || ':' || COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    for table in TABLES:
        op.execute(f"CREATE TRIGGER {table}_notify_change AFTER UPDATE OR DELETE ON {table} "
                   f"FOR EACH ROW EXECUTE FUNCTION nba_notify_change()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify_change ON {table}")
    op.execute("DROP FUNCTION IF EXISTS nba_notify_change()")
