"""Create the jobs and failed_jobs tables.

MySQL and MariaDB get InnoDB tables in utf8mb4 with a binary collation, LONGTEXT tracebacks,
and a claim index of their own (they have no partial indexes), exactly as in schema.py.

Revision ID: routemq_outbox_0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from routemq_outbox.schema import MYSQL_DIALECTS, Payload, UTCDateTime, db_now

revision: str = "routemq_outbox_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("routemq_outbox",)
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_LongText = sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS)
_MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}


def _on_mysql() -> bool:
    return op.get_context().dialect.name in MYSQL_DIALECTS


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", _BigId, sa.Identity(), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("payload", Payload(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("reserved_at", UTCDateTime(), nullable=True),
        sa.Column("available_at", UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=db_now(), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("queue <> ''", name=op.f("ck_jobs_queue_not_empty")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts_not_negative")),
        sa.CheckConstraint(
            "(reserved_at IS NULL AND token IS NULL AND lease_expires_at IS NULL)"
            " OR (reserved_at IS NOT NULL AND token IS NOT NULL"
            " AND lease_expires_at IS NOT NULL)",
            name=op.f("ck_jobs_reservation_complete"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sqlite_autoincrement=True,
        **_MYSQL_TABLE,
    )
    if _on_mysql():
        op.create_index(
            op.f("ix_jobs_claim_mysql"), "jobs", ["queue", "reserved_at", "available_at", "id"]
        )
    else:
        op.create_index(
            op.f("ix_jobs_claim"),
            "jobs",
            ["queue", "available_at", "id"],
            postgresql_where=sa.text("reserved_at IS NULL"),
            sqlite_where=sa.text("reserved_at IS NULL"),
        )
    op.create_index(
        op.f("ix_jobs_lease"),
        "jobs",
        ["lease_expires_at"],
        postgresql_where=sa.text("reserved_at IS NOT NULL"),
        sqlite_where=sa.text("reserved_at IS NOT NULL"),
    )
    op.create_table(
        "failed_jobs",
        sa.Column("id", _BigId, sa.Identity(), nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("connection", sa.String(255), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("payload", Payload(), nullable=False),
        sa.Column("exception", _LongText, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("failed_at", UTCDateTime(), server_default=db_now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failed_jobs")),
        sa.UniqueConstraint("uuid", name=op.f("uq_failed_jobs_uuid")),
        sqlite_autoincrement=True,
        **_MYSQL_TABLE,
    )
    op.create_index(op.f("ix_failed_jobs_queue_failed_at"), "failed_jobs", ["queue", "failed_at"])
    op.create_index(op.f("ix_failed_jobs_failed_at"), "failed_jobs", ["failed_at"])


def downgrade() -> None:
    op.drop_table("failed_jobs")
    op.drop_table("jobs")
