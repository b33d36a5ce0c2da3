"""Create the schedule_slots table: one row per slot a periodic job was enqueued for.

Its primary key (schedule, slot) is what lets one worker of many enqueue each slot. A new
table, so upgrading a populated database touches none of its rows.

Revision ID: routemq_outbox_0004
Revises: routemq_outbox_0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from routemq_outbox.schema import MYSQL_DIALECTS, UTCDateTime, db_now

revision: str = "routemq_outbox_0004"
down_revision: str | None = "routemq_outbox_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def upgrade() -> None:
    op.create_table(
        "schedule_slots",
        sa.Column("schedule", sa.String(255), nullable=False),
        sa.Column("slot", UTCDateTime(), nullable=False),
        sa.Column("definition", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=db_now(), nullable=False),
        sa.PrimaryKeyConstraint("schedule", "slot", name=op.f("pk_schedule_slots")),
        **_MYSQL_TABLE,
    )
    op.create_index(op.f("ix_schedule_slots_created_at"), "schedule_slots", ["created_at"])


def downgrade() -> None:
    op.drop_table("schedule_slots")
