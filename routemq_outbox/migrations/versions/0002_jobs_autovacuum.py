"""Tune autovacuum for the jobs table on PostgreSQL: a churn table.

Every job is inserted, updated by its claim and deleted within moments, so dead rows pile up
at the pace of the queue while the live table stays small. With the defaults, autovacuum
waits for 20 % of the rows the table *had* (after a backlog of a million drains, 200,000 dead
rows) and then throttles itself; meanwhile every claim steps over the dead index entries.
Here it runs once a thousand rows have died, whatever the table's size, unthrottled, and
statistics follow the same rhythm so the claim's plan sees what the table holds now.
The other databases have nothing to tune: InnoDB purges on its own, SQLite has no vacuum
daemon.

Revision ID: routemq_outbox_0002
Revises: routemq_outbox_0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "routemq_outbox_0002"
down_revision: str | None = "routemq_outbox_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SETTINGS = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "1000",
    "autovacuum_vacuum_cost_delay": "0",
}


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        options = ", ".join(f"{name} = {value}" for name, value in SETTINGS.items())
        op.execute(f"ALTER TABLE jobs SET ({options})")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE jobs RESET ({', '.join(SETTINGS)})")
