"""The control plane: job priorities, cancelling running jobs, paused queues, live workers.

``jobs`` gains ``priority`` (0 to 9, lower first, CHECKed), ``cancel_requested`` and
``worker_id``; ``failed_jobs`` gains ``priority``, which a retry gives back. Every existing job
gets priority 0 and no cancel request, which is what it had. The claim index becomes
(queue, priority, available_at, id); new tables ``paused_queues`` and ``workers``.

Producers keep inserting while it runs:

- PostgreSQL: the new columns have constant defaults (a catalog change, no table rewrite);
  the CHECK is added ``NOT VALID`` then validated, which reads the table without blocking
  writes; the new index is built ``CONCURRENTLY`` and the old one dropped ``CONCURRENTLY``,
  outside the revision's transaction.
- MariaDB/MySQL: online DDL (``ALGORITHM=INPLACE, LOCK=NONE``) for the columns and indexes,
  so concurrent reads and writes go on; the statement fails rather than lock if the server
  cannot do it online.
- SQLite: the table is rebuilt, under the database's write lock for as long as that takes.

Revision ID: routemq_outbox_0006
Revises: routemq_outbox_0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sqlalchemy.dialects import mysql

from routemq_outbox.schema import MYSQL_DIALECTS, UTCDateTime, db_now

revision: str = "routemq_outbox_0006"
down_revision: str | None = "routemq_outbox_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MYSQL_TABLE = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}
_CHECK = "priority >= 0 AND priority <= 9"
_ONLINE = "ALGORITHM=INPLACE, LOCK=NONE"


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("worker_id", sa.String(36), nullable=True),
    ]


def _upgrade_postgresql() -> None:
    for column in _columns():
        op.add_column("jobs", column)
    op.add_column(
        "failed_jobs",
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.execute(f"ALTER TABLE jobs ADD CONSTRAINT ck_jobs_priority_range CHECK ({_CHECK}) NOT VALID")
    op.execute("ALTER TABLE jobs VALIDATE CONSTRAINT ck_jobs_priority_range")
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_jobs_claim_by_priority "
            "ON jobs (queue, priority, available_at, id) WHERE reserved_at IS NULL"
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_claim")


def _upgrade_mysql() -> None:
    op.execute(
        "ALTER TABLE jobs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0, "
        "ADD COLUMN cancel_requested BOOL NOT NULL DEFAULT false, "
        f"ADD COLUMN worker_id VARCHAR(36) NULL, {_ONLINE}"
    )
    op.execute(
        f"ALTER TABLE failed_jobs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0, {_ONLINE}"
    )
    # A CHECK constraint cannot be added online; the table is copied (writes wait) while
    # every row is checked. Rows have priority 0 by now, so it cannot fail.
    op.execute(f"ALTER TABLE jobs ADD CONSTRAINT ck_jobs_priority_range CHECK ({_CHECK})")
    op.execute(
        "ALTER TABLE jobs ADD INDEX ix_jobs_claim_by_priority_mysql "
        f"(queue, reserved_at, priority, available_at, id), {_ONLINE}"
    )
    op.execute(f"ALTER TABLE jobs DROP INDEX ix_jobs_claim_mysql, {_ONLINE}")


def _upgrade_sqlite() -> None:
    # The rebuilt table keeps AUTOINCREMENT: ids of deleted jobs are never reused.
    with op.batch_alter_table(
        "jobs", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        for column in _columns():
            batch.add_column(column)
        batch.create_check_constraint(op.f("ck_jobs_priority_range"), sa.text(_CHECK))
        batch.drop_index("ix_jobs_claim")
    op.create_index(
        "ix_jobs_claim_by_priority",
        "jobs",
        ["queue", "priority", "available_at", "id"],
        sqlite_where=sa.text("reserved_at IS NULL"),
    )
    with op.batch_alter_table("failed_jobs") as batch:
        batch.add_column(
            sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0"))
        )


def upgrade() -> None:
    name = op.get_bind().dialect.name
    if name == "postgresql":
        _upgrade_postgresql()
    elif name in MYSQL_DIALECTS:
        _upgrade_mysql()
    else:
        _upgrade_sqlite()
    op.create_table(
        "paused_queues",
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("paused_at", UTCDateTime(), nullable=False, server_default=db_now()),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_paused_queues")),
        **_MYSQL_TABLE,
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column(
            "queues", sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS), nullable=False
        ),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("lease", sa.Float(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False, server_default=db_now()),
        sa.Column("last_seen", UTCDateTime(), nullable=False, server_default=db_now()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        **_MYSQL_TABLE,
    )
    op.create_index(op.f("ix_workers_last_seen"), "workers", ["last_seen"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("paused_queues")
    name = op.get_bind().dialect.name
    if name == "postgresql":
        op.drop_constraint(op.f("ck_jobs_priority_range"), "jobs", type_="check")
        with op.get_context().autocommit_block():
            op.execute(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_jobs_claim "
                "ON jobs (queue, available_at, id) WHERE reserved_at IS NULL"
            )
            op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_claim_by_priority")
        for column in ("worker_id", "cancel_requested", "priority"):
            op.drop_column("jobs", column)
        op.drop_column("failed_jobs", "priority")
    elif name in MYSQL_DIALECTS:
        op.execute(
            "ALTER TABLE jobs ADD INDEX ix_jobs_claim_mysql (queue, reserved_at, available_at, id)"
        )
        op.execute("ALTER TABLE jobs DROP INDEX ix_jobs_claim_by_priority_mysql")
        op.execute("ALTER TABLE jobs DROP CONSTRAINT ck_jobs_priority_range")
        op.execute(
            "ALTER TABLE jobs DROP COLUMN worker_id, DROP COLUMN cancel_requested, "
            "DROP COLUMN priority"
        )
        op.execute("ALTER TABLE failed_jobs DROP COLUMN priority")
    else:
        op.drop_index("ix_jobs_claim_by_priority", "jobs")
        with op.batch_alter_table(
            "jobs", recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ) as batch:
            batch.drop_constraint(op.f("ck_jobs_priority_range"), type_="check")
            batch.drop_column("worker_id")
            batch.drop_column("cancel_requested")
            batch.drop_column("priority")
        op.create_index(
            "ix_jobs_claim",
            "jobs",
            ["queue", "available_at", "id"],
            sqlite_where=sa.text("reserved_at IS NULL"),
        )
        with op.batch_alter_table("failed_jobs") as batch:
            batch.drop_column("priority")
