"""Job keys: unique keys (``jobs.unique_key``, ``unique_windows``) and serial keys
(``jobs.serial_key``, ``jobs.serial_due_at``, ``serial_keys``).

New nullable columns and new tables: upgrading a populated database gives every existing job
no key, which is what it had.

Revision ID: routemq_outbox_0005
Revises: routemq_outbox_0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from routemq_outbox.schema import MYSQL_DIALECTS, UTCDateTime

revision: str = "routemq_outbox_0005"
down_revision: str | None = "routemq_outbox_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def upgrade() -> None:
    mysql = op.get_bind().dialect.name in MYSQL_DIALECTS
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("unique_key", sa.String(257), nullable=True))
        batch.add_column(sa.Column("serial_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("serial_due_at", UTCDateTime(), nullable=True))
    if mysql:
        op.create_index("ix_jobs_unique_key_mysql", "jobs", ["unique_key"], unique=True)
        op.create_index("ix_jobs_serial_key_mysql", "jobs", ["serial_key", "id"])
    else:
        op.create_index(
            "ix_jobs_unique_key",
            "jobs",
            ["unique_key"],
            unique=True,
            postgresql_where=sa.text("unique_key IS NOT NULL"),
            sqlite_where=sa.text("unique_key IS NOT NULL"),
        )
        op.create_index(
            "ix_jobs_serial_key",
            "jobs",
            ["serial_key", "id"],
            postgresql_where=sa.text("serial_key IS NOT NULL"),
            sqlite_where=sa.text("serial_key IS NOT NULL"),
        )
    op.create_table(
        "unique_windows",
        sa.Column("unique_key", sa.String(257), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("unique_key", name=op.f("pk_unique_windows")),
        **_MYSQL_TABLE,
    )
    op.create_index(op.f("ix_unique_windows_expires_at"), "unique_windows", ["expires_at"])
    op.create_table(
        "serial_keys",
        sa.Column("serial_key", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("serial_key", name=op.f("pk_serial_keys")),
        **_MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("serial_keys")
    op.drop_table("unique_windows")
    mysql = op.get_bind().dialect.name in MYSQL_DIALECTS
    op.drop_index("ix_jobs_serial_key_mysql" if mysql else "ix_jobs_serial_key", "jobs")
    op.drop_index("ix_jobs_unique_key_mysql" if mysql else "ix_jobs_unique_key", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("serial_due_at")
        batch.drop_column("serial_key")
        batch.drop_column("unique_key")
