"""The tables, defined once with SQLAlchemy Core, and the database clock.

The migrations in ``migrations/`` must produce exactly these tables; a test
compares them.

A row of ``jobs`` is *pending* when ``reserved_at`` is null and *reserved* (a worker holds it)
when ``reserved_at``, ``token`` and ``lease_expires_at`` are all set; a CHECK constraint
allows no other mix. ``token`` is new on every claim, and every write a worker makes to a job
it holds is guarded by it, so a worker whose lease expired cannot touch the job again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

__all__ = [
    "DEFAULT_PRIORITY",
    "KEY_MAX",
    "MYSQL_DIALECTS",
    "PARKED_AT",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "QUEUE_NAME_MAX",
    "SCHEDULE_NAME_MAX",
    "Payload",
    "UTCDateTime",
    "db_minute",
    "db_now",
    "db_now_plus",
    "failed_jobs",
    "include_object",
    "job_counts",
    "jobs",
    "metadata",
    "paused_queues",
    "schedule_slots",
    "seconds_since",
    "serial_keys",
    "statement_now",
    "statement_now_plus",
    "unique_windows",
    "workers",
]

QUEUE_NAME_MAX = 255
PRIORITY_MIN = 0
PRIORITY_MAX = 9
"""A job's priority is from PRIORITY_MIN to PRIORITY_MAX; lower runs first."""
DEFAULT_PRIORITY = PRIORITY_MIN
"""The priority of a job that names none: it runs before all others."""
SCHEDULE_NAME_MAX = 255
KEY_MAX = 255
"""The longest unique or serial key, in characters."""
# A stored unique key is the key behind a two-character mode prefix (see :mod:`.sql`).
_STORED_KEY_MAX = KEY_MAX + 2

PARKED_AT = datetime(9000, 1, 1, tzinfo=UTC)
"""The ``available_at`` of a serial job waiting behind the head of its key: later than any due
time a job may be given, so the claim never reaches it. Its real due time waits in
``serial_due_at`` until the job becomes the head."""

# SQLAlchemy calls MySQL's dialect "mysql" and, for ``mariadb://`` URLs, "mariadb".
MYSQL_DIALECTS = ("mysql", "mariadb")

_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = sa.MetaData(naming_convention=_NAMING)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every engine.

    PostgreSQL stores ``timestamptz``; SQLite and MySQL have no zone, so they store UTC and the
    zone is put back on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: routemq-outbox stores aware UTC times")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Payload(sa.types.TypeDecorator[str]):
    """JSON (JSONB on PostgreSQL) that passes JSON *text* through untouched.

    The library serialises payloads itself (to name an attribute that cannot be stored, and to
    enforce the size limit on the exact bytes), and reads them back as text so that one bad row
    cannot break a whole claimed batch. Select it with ``sa.cast(column, sa.Text)`` to get text
    on PostgreSQL too, whose driver otherwise decodes JSONB.
    """

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB())
        return dialect.type_descriptor(sa.JSON())

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


class db_now(FunctionElement[datetime]):
    """The database's current UTC time: the one clock that decides when a job is due."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


class db_now_plus(FunctionElement[datetime]):
    """The database's current UTC time plus a number of seconds (a float expression)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now_plus"


# SQLite's own text format, matching what SQLAlchemy stores for DateTime there, with
# milliseconds; julianday arithmetic keeps sub-second delays.
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(db_now)
def _now_default(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return _SQLITE_NOW


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _now_mysql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


def _seconds(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return compiler.process(seconds, **kw)


@compiles(db_now_plus, "postgresql")
def _now_plus_postgresql(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(now() + make_interval(secs => {_seconds(element, compiler, **kw)}))"


class statement_now(FunctionElement[datetime]):
    """The database's UTC time when the current statement began: when a job was dispatched.

    On PostgreSQL ``now()`` (:class:`db_now`) is when the *transaction* began, so a job
    dispatched a minute into a transaction with a 10 s delay would be due 50 s after the
    call; ``statement_timestamp()`` is the call's own time, and the same for every row of a
    bulk. Elsewhere :class:`db_now` already is the statement's time.
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "statement_now"


class statement_now_plus(FunctionElement[datetime]):
    """:class:`statement_now` plus a number of seconds (a float expression)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "statement_now_plus"


@compiles(statement_now)
def _statement_now(element: statement_now, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(db_now(), **kw)


@compiles(statement_now, "postgresql")
def _statement_now_postgresql(element: statement_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "statement_timestamp()"


@compiles(statement_now_plus)
def _statement_now_plus(element: statement_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    (seconds,) = element.clauses
    return compiler.process(db_now_plus(seconds), **kw)


@compiles(statement_now_plus, "postgresql")
def _statement_now_plus_postgresql(
    element: statement_now_plus, compiler: SQLCompiler, **kw: Any
) -> str:
    seconds = compiler.process(next(iter(element.clauses)), **kw)
    return f"(statement_timestamp() + make_interval(secs => {seconds}))"


@compiles(db_now_plus, "sqlite")
def _now_plus_sqlite(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = _seconds(element, compiler, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', julianday('now') + ({seconds}) / 86400.0)"


@compiles(db_now_plus, "mysql")
@compiles(db_now_plus, "mariadb")
def _now_plus_mysql(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = _seconds(element, compiler, **kw)
    return f"TIMESTAMPADD(MICROSECOND, ROUND(({seconds}) * 1000000), UTC_TIMESTAMP(6))"


class seconds_since(FunctionElement[float]):
    """Seconds from a timestamp expression to the database's current time (a float)."""

    type = sa.Float()
    inherit_cache = True
    name = "seconds_since"


def _since(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    (moment,) = element.clauses
    return compiler.process(moment, **kw)


@compiles(seconds_since, "postgresql")
def _since_postgresql(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    return f"EXTRACT(EPOCH FROM now() - {_since(element, compiler, **kw)})"


@compiles(seconds_since, "sqlite")
def _since_sqlite(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    return f"((julianday('now') - julianday({_since(element, compiler, **kw)})) * 86400.0)"


@compiles(seconds_since, "mysql")
@compiles(seconds_since, "mariadb")
def _since_mysql(element: seconds_since, compiler: SQLCompiler, **kw: Any) -> str:
    moment = _since(element, compiler, **kw)
    return f"(TIMESTAMPDIFF(MICROSECOND, {moment}, UTC_TIMESTAMP(6)) / 1000000.0)"


class db_minute(FunctionElement[int]):
    """The database's current minute: whole minutes since the Unix epoch, an integer."""

    type = sa.BigInteger()
    inherit_cache = True
    name = "db_minute"


@compiles(db_minute, "postgresql")
def _minute_postgresql(element: db_minute, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(floor(EXTRACT(EPOCH FROM now()) / 60) AS BIGINT)"


@compiles(db_minute, "sqlite")
def _minute_sqlite(element: db_minute, compiler: SQLCompiler, **kw: Any) -> str:
    return "(CAST(strftime('%s', 'now') AS INTEGER) / 60)"


@compiles(db_minute, "mysql")
@compiles(db_minute, "mariadb")
def _minute_mysql(element: db_minute, compiler: SQLCompiler, **kw: Any) -> str:
    return "FLOOR(UNIX_TIMESTAMP() / 60)"


def _only_on(*dialects: str) -> Any:
    """A ``ddl_if`` rule: create the item on these dialects only. :func:`include_object`
    reads it back, so that alembic's comparisons skip the item elsewhere."""

    def applies(*_: Any, dialect: Dialect, **__: Any) -> bool:
        return dialect.name in dialects

    applies.dialects = dialects  # type: ignore[attr-defined]
    return applies


_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# MySQL's TEXT holds 64 KiB, less than a deep traceback: LONGTEXT there.
_LongText = sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS)

# MySQL/MariaDB: InnoDB (row locks, SKIP LOCKED, transactions), full Unicode, and a binary
# collation so that queue names compare by their characters as on PostgreSQL and SQLite
# ('Mail' is not 'mail'; MySQL's default collations ignore case and accents). Like every
# PAD SPACE collation it ignores trailing spaces: there, 'a ' is the queue 'a'.
_MYSQL_TABLE: dict[str, Any] = {
    f"{dialect}_{option}": value
    for dialect in MYSQL_DIALECTS
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", _BigId, sa.Identity(), primary_key=True),
    sa.Column("queue", sa.String(QUEUE_NAME_MAX), nullable=False),
    sa.Column("payload", Payload(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("reserved_at", UTCDateTime(), nullable=True),
    sa.Column("available_at", UTCDateTime(), nullable=False, server_default=db_now()),
    sa.Column("created_at", UTCDateTime(), nullable=False, server_default=db_now()),
    sa.Column("token", sa.BigInteger(), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("unique_key", sa.String(_STORED_KEY_MAX), nullable=True),
    sa.Column("serial_key", sa.String(KEY_MAX), nullable=True),
    sa.Column("serial_due_at", UTCDateTime(), nullable=True),
    sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0")),
    # Set by an operator on a running job: its worker stops it and records it as cancelled.
    sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    # The worker that holds the job (the ``workers`` row), while reserved; stale otherwise.
    sa.Column("worker_id", sa.String(36), nullable=True),
    sa.CheckConstraint("queue <> ''", name="queue_not_empty"),
    sa.CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    sa.CheckConstraint(
        "(reserved_at IS NULL AND token IS NULL AND lease_expires_at IS NULL)"
        " OR (reserved_at IS NOT NULL AND token IS NOT NULL AND lease_expires_at IS NOT NULL)",
        name="reservation_complete",
    ),
    sa.CheckConstraint(
        f"priority >= {PRIORITY_MIN} AND priority <= {PRIORITY_MAX}", name="priority_range"
    ),
    sqlite_autoincrement=True,
    **_MYSQL_TABLE,
)

# The claim reads only pending rows of a queue, one priority level at a time, each in
# (available_at, id) order; the partial index holds exactly those rows, so claiming stays
# cheap however many are reserved, and a level's delayed rows are never read to reach the next.
sa.Index(
    "ix_jobs_claim_by_priority",
    jobs.c.queue,
    jobs.c.priority,
    jobs.c.available_at,
    jobs.c.id,
    postgresql_where=jobs.c.reserved_at.is_(None),
    sqlite_where=jobs.c.reserved_at.is_(None),
).ddl_if(callable_=_only_on("postgresql", "sqlite"))
# MySQL and MariaDB have no partial indexes. With reserved_at as the second column, the
# pending rows of a queue and priority are still one contiguous range in (available_at, id)
# order, so the claim reads (and locks) only the rows it takes, never the reserved ones.
sa.Index(
    "ix_jobs_claim_by_priority_mysql",
    jobs.c.queue,
    jobs.c.reserved_at,
    jobs.c.priority,
    jobs.c.available_at,
    jobs.c.id,
).ddl_if(callable_=_only_on(*MYSQL_DIALECTS))
# The reaper looks for reserved rows whose lease ran out; kept apart from the claim predicate.
# (On MySQL, a full index: pending rows have a NULL lease, which no `<` comparison reaches.)
sa.Index(
    "ix_jobs_lease",
    jobs.c.lease_expires_at,
    postgresql_where=jobs.c.reserved_at.isnot(None),
    sqlite_where=jobs.c.reserved_at.isnot(None),
)

# A unique key is held by at most one row. MySQL and MariaDB have no partial indexes, but
# their unique indexes let any number of NULLs through, which is all the partial one is for.
sa.Index(
    "ix_jobs_unique_key",
    jobs.c.unique_key,
    unique=True,
    postgresql_where=jobs.c.unique_key.isnot(None),
    sqlite_where=jobs.c.unique_key.isnot(None),
).ddl_if(callable_=_only_on("postgresql", "sqlite"))
sa.Index("ix_jobs_unique_key_mysql", jobs.c.unique_key, unique=True).ddl_if(
    callable_=_only_on(*MYSQL_DIALECTS)
)
# The jobs of a serial key in dispatch order: the head is the first.
sa.Index(
    "ix_jobs_serial_key",
    jobs.c.serial_key,
    jobs.c.id,
    postgresql_where=jobs.c.serial_key.isnot(None),
    sqlite_where=jobs.c.serial_key.isnot(None),
).ddl_if(callable_=_only_on("postgresql", "sqlite"))
sa.Index("ix_jobs_serial_key_mysql", jobs.c.serial_key, jobs.c.id).ddl_if(
    callable_=_only_on(*MYSQL_DIALECTS)
)

failed_jobs = sa.Table(
    "failed_jobs",
    metadata,
    sa.Column("id", _BigId, sa.Identity(), primary_key=True),
    sa.Column("uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("connection", sa.String(255), nullable=False),
    sa.Column("queue", sa.String(QUEUE_NAME_MAX), nullable=False),
    sa.Column("payload", Payload(), nullable=False),
    sa.Column("exception", _LongText, nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("job_id", sa.BigInteger(), nullable=True),
    sa.Column("failed_at", UTCDateTime(), nullable=False, server_default=db_now()),
    # The job's priority, which a retry gives it back.
    sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0")),
    sqlite_autoincrement=True,
    **_MYSQL_TABLE,
)
sa.Index("ix_failed_jobs_queue_failed_at", failed_jobs.c.queue, failed_jobs.c.failed_at)
sa.Index("ix_failed_jobs_failed_at", failed_jobs.c.failed_at)


# One row per slot a periodic job was enqueued for, written in the transaction that inserts the
# job: the primary key lets one worker of many take each slot. Rows are not tied to the job
# (finishing or deleting it frees nothing), and they are pruned by age, each schedule's latest
# kept, since it is where a worker that starts looks for what was missed.
schedule_slots = sa.Table(
    "schedule_slots",
    metadata,
    sa.Column("schedule", sa.String(SCHEDULE_NAME_MAX), nullable=False),
    sa.Column("slot", UTCDateTime(), nullable=False),
    sa.Column("definition", sa.String(255), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False, server_default=db_now()),
    sa.PrimaryKeyConstraint("schedule", "slot"),
    **_MYSQL_TABLE,
)
sa.Index("ix_schedule_slots_created_at", schedule_slots.c.created_at)


# A unique key with a period (``unique_for``) stays taken here until ``expires_at``, whether its
# job is still in ``jobs`` or long gone; workers delete expired rows now and then.
unique_windows = sa.Table(
    "unique_windows",
    metadata,
    sa.Column("unique_key", sa.String(_STORED_KEY_MAX), primary_key=True),
    sa.Column("job_id", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
    **_MYSQL_TABLE,
)
sa.Index("ix_unique_windows_expires_at", unique_windows.c.expires_at)

# One row per serial key in use: the lock that producers of a key, and the worker promoting its
# next job, take in turn, so that ids are in commit order and no promotion misses a job. The row
# holds no state (deleting it loses nothing), and workers delete those of keys without jobs.
serial_keys = sa.Table(
    "serial_keys",
    metadata,
    sa.Column("serial_key", sa.String(KEY_MAX), primary_key=True),
    **_MYSQL_TABLE,
)

# A queue is paused while it has a row here: workers claim none of its jobs. In the database,
# so that it holds across worker restarts and for workers that start later.
paused_queues = sa.Table(
    "paused_queues",
    metadata,
    sa.Column("queue", sa.String(QUEUE_NAME_MAX), primary_key=True),
    sa.Column("paused_at", UTCDateTime(), nullable=False, server_default=db_now()),
    **_MYSQL_TABLE,
)

# One row per worker process, written when it starts and refreshed with its leases
# (``last_seen``); a worker silent for longer than its lease is gone, and workers delete the
# rows of those silent for long.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("queues", _LongText, nullable=False),  # a JSON array of names, in claim order
    sa.Column("concurrency", sa.Integer(), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("lease", sa.Float(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False, server_default=db_now()),
    sa.Column("last_seen", UTCDateTime(), nullable=False, server_default=db_now()),
    **_MYSQL_TABLE,
)
sa.Index("ix_workers_last_seen", workers.c.last_seen)


# Jobs finished per queue and minute (of the database clock), for the dashboard's throughput
# chart: workers add their counts every few seconds with one upsert, so the chart never scans
# jobs or failed_jobs. Housekeeping deletes rows older than a day.
job_counts = sa.Table(
    "job_counts",
    metadata,
    sa.Column("minute", sa.BigInteger(), nullable=False),
    sa.Column("queue", sa.String(QUEUE_NAME_MAX), nullable=False),
    sa.Column("succeeded", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    sa.Column("failed", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    sa.PrimaryKeyConstraint("minute", "queue"),
    **_MYSQL_TABLE,
)


def include_object(dialect_name: str) -> Callable[..., bool]:
    """An alembic ``include_object`` hook (autogenerate, schema comparison) that leaves out
    the indexes created on other dialects only."""

    def include(item: object, name: str | None, type_: str, reflected: bool, *_: Any) -> bool:
        rule = getattr(item, "_ddl_if", None) if type_ == "index" and not reflected else None
        dialects = getattr(rule.callable_, "dialects", None) if rule is not None else None
        return dialects is None or dialect_name in dialects

    return include
