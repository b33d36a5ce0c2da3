"""Per-minute counts of finished jobs (``job_counts``), which the dashboard's throughput chart
reads instead of scanning jobs.

A new table: upgrading a populated database leaves every other row as it was.

Revision ID: routemq_outbox_0007
Revises: routemq_outbox_0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from routemq_outbox.schema import MYSQL_DIALECTS, QUEUE_NAME_MAX

revision: str = "routemq_outbox_0007"
down_revision: str | None = "routemq_outbox_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("queue", sa.String(QUEUE_NAME_MAX), nullable=False),
        sa.Column("succeeded", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("minute", "queue", name="pk_job_counts"),
        **_MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("job_counts")
