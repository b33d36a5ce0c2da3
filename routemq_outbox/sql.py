"""Every statement routemq-outbox runs, per dialect where they differ. Nothing else builds SQL.

Dispatch statements are *built* here and executed by the caller in its own transaction (async or
sync). Worker and operator (admin) operations *run* here, each in one short transaction of their
own; the worker's on the connection it passes: for the hot ones (claim, finish) a connection it
keeps, which on PostgreSQL is in autocommit mode so that a one-statement transaction costs one
round trip.

Claiming follows "The life of a job": on PostgreSQL one statement locks due rows with
``FOR UPDATE SKIP LOCKED`` in a CTE (which the planner cannot flatten, so the ``LIMIT`` holds)
and marks them in the same statement; SQLite, which has one writer at a time, uses
``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING``; MySQL/MariaDB, which have no
``UPDATE … RETURNING``, lock with ``SELECT … FOR UPDATE SKIP LOCKED`` then ``UPDATE`` the
locked rows by primary key in the same transaction.

MySQL and MariaDB run these transactions at READ COMMITTED (see :mod:`.database`): the
locking read then locks just the rows it returns, with no gap locks. Workers never wait for
each other's claims (SKIP LOCKED), and every other write locks only rows its worker holds,
by primary key, so no two workers' transactions can lock rows in opposite orders.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler

from .errors import DispatchError
from .faults import is_deadlock
from .keys import NO_KEYS, UNIQUE_QUEUED, JobKeys
from .schema import (
    PARKED_AT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    Payload,
    UTCDateTime,
    db_minute,
    db_now,
    db_now_plus,
    failed_jobs,
    job_counts,
    jobs,
    paused_queues,
    schedule_slots,
    seconds_since,
    serial_keys,
    statement_now,
    statement_now_plus,
    unique_windows,
    workers,
)

__all__ = [
    "CONTROL_CHANNEL",
    "COUNTS_KEPT_MINUTES",
    "NOTIFY_CHANNEL",
    "CancelOutcome",
    "Claimed",
    "FailedRecord",
    "FailedRow",
    "Housekept",
    "Inserted",
    "JobRow",
    "KeyedSteps",
    "LatestSlot",
    "MinuteCounts",
    "QueueCounts",
    "QueuedInKey",
    "Taken",
    "WorkerRow",
    "cancel_jobs",
    "cancel_requested_ids",
    "capped_queue_counts",
    "claim",
    "claim_statement_text",
    "clear_queue",
    "count_attempts",
    "database_now",
    "delete_failed",
    "delete_parked",
    "enqueue_slot",
    "explain_claim",
    "extend_leases",
    "failed_by_refs",
    "failed_page",
    "family",
    "finish",
    "finish_serial",
    "flush_failed",
    "housekeep",
    "insert_jobs",
    "insert_keyed",
    "insert_one",
    "job_ids_matching",
    "job_page",
    "jobs_by_id",
    "jobs_statement",
    "key_runs",
    "known_queues",
    "latest_slots",
    "lock_serial_keys",
    "move_to_failed",
    "newest_failed_id",
    "newest_job_id",
    "pause_queue",
    "paused_queue_names",
    "prune_failed",
    "prune_slots",
    "prune_workers",
    "queue_counts",
    "queue_counts_statement",
    "queue_exists",
    "queue_size",
    "record_counts",
    "register_worker",
    "release",
    "remove_worker",
    "rescue_expired",
    "resume_queue",
    "retry_failed",
    "retry_failed_batch",
    "run_now",
    "run_steps",
    "size_statement",
    "stored_revisions",
    "throughput",
    "touch_worker",
    "worker_rows",
]

NOTIFY_CHANNEL = "routemq_outbox"
CONTROL_CHANNEL = "routemq_outbox_control"
"""Where PostgreSQL workers hear that a queue was paused or resumed (its name the payload)."""

_T = TypeVar("_T")

Availability = float | datetime | None
"""When inserted jobs become due: ``None`` now, seconds from now, or an aware datetime."""

Statement = tuple[Executable, dict[str, Any] | list[dict[str, Any]]]


def family(dialect_name: str) -> str:
    """``postgresql``, ``sqlite`` or ``mysql`` (MariaDB's dialect is called ``mariadb``)."""
    return "mysql" if dialect_name == "mariadb" else dialect_name


# --------------------------------------------------------------------------------- dispatch


def _when(available: Availability) -> str:
    if available is None:
        return "now"
    return "at" if isinstance(available, datetime) else "delay"


def _available_at(when: str) -> sa.ColumnElement[datetime]:
    # The statement's time, not the transaction's: a delay counts from the dispatch call.
    if when == "now":
        return statement_now()
    if when == "at":
        return sa.bindparam("available_at", type_=UTCDateTime())
    return statement_now_plus(sa.bindparam("delay", type_=sa.Float()))


def _available_params(available: Availability) -> dict[str, Any]:
    if available is None:
        return {}
    if isinstance(available, datetime):
        return {"available_at": available}
    return {"delay": float(available)}


def _notify_after(inserted: sa.CTE) -> sa.Select[Any]:
    queues = sa.select(inserted.c.queue).distinct().subquery("queues")
    return sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, queues.c.queue)).select_from(queues)


@functools.cache
def _insert_statement(kind: str, many: bool, when: str, notify: bool) -> Any:
    """The insert for one shape of dispatch, built once: a dispatch in a busy producer must not
    pay for building (and cache-keying) a new SQLAlchemy construct every time."""
    available_at = _available_at(when)
    if kind == "mysql":
        return _insert_from_json(available_at)
    if kind == "postgresql" and many:
        # All the jobs travel as one JSON text, [[queue, payload], ...], that the server parses
        # once: cheaper on both sides than two arrays, whose driver encoding costs Python calls
        # per element and whose payloads the server would each cast to JSONB.
        source = (
            sa.func.jsonb_array_elements(
                sa.cast(sa.bindparam("items", type_=sa.Text()), postgresql.JSONB())
            )
            .table_valued("item", with_ordinality="position")
            .render_derived(name="source")
        )
        stmt: Any = sa.insert(jobs).from_select(
            ["queue", "payload", "priority", "available_at", "created_at"],
            sa.select(
                source.c.item.op("->>", return_type=sa.String())(0),
                source.c.item.op("->", return_type=Payload())(1),
                sa.cast(source.c.item.op("->>", return_type=sa.String())(2), sa.SmallInteger()),
                available_at,
                statement_now(),
            ).order_by(source.c.position),
        )
    else:
        # inline(): no implicit RETURNING of the new id, which nobody reads.
        stmt = (
            sa.insert(jobs)
            .values(
                queue=sa.bindparam("queue", type_=sa.String()),
                payload=sa.bindparam("payload", type_=Payload()),
                priority=sa.bindparam("priority", type_=sa.SmallInteger()),
                available_at=available_at,
                created_at=statement_now(),
            )
            .inline()
        )
    if notify:
        stmt = _notify_after(stmt.returning(jobs.c.queue).cte("inserted"))
    return stmt


def insert_jobs(
    dialect_name: str,
    rows: Sequence[tuple[str, str]],
    available: Availability,
    *,
    notify: bool,
    priorities: Sequence[int] | None = None,
) -> Statement:
    """The statement inserting ``rows`` of (queue, payload JSON text), whatever their number,
    with ``priorities`` (one per row; None: all 0), and its parameters: one set, or a list of
    sets to run as an executemany in the caller's transaction (all or nothing, like one
    statement).

    PostgreSQL gets ``INSERT … SELECT … FROM jsonb_array_elements(…)`` for many rows, and (with
    ``notify``) the ``pg_notify`` in the same statement, so a dispatch costs one round trip.
    MySQL and MariaDB get ``INSERT … SELECT … FROM JSON_TABLE(…)`` over one JSON array
    parameter: their drivers turn an executemany into one multi-row INSERT only when every
    value is a plain parameter, and ``available_at`` comes from the database clock. Either
    array holds a few MiB of rows at most (one row may be larger on its own), and larger
    inserts take one parameter set per array. SQLite, in-process, gets executemany.
    """
    kind = family(dialect_name)
    extra = _available_params(available)
    many = len(rows) > 1
    stmt = _insert_statement(kind, many, _when(available), notify and kind == "postgresql")
    ranks = [0] * len(rows) if priorities is None else priorities
    if kind == "mysql":
        items = [
            json.dumps([queue, payload, rank], ensure_ascii=False)
            for (queue, payload), rank in zip(rows, ranks, strict=True)
        ]
        chunks = [{"rows": chunk, **extra} for chunk in _json_arrays(items)]
        return stmt, chunks[0] if len(chunks) == 1 else chunks
    if kind == "postgresql" and many:
        queues = {queue: json.dumps(queue, ensure_ascii=False) for queue in {q for q, _ in rows}}
        items = [
            f"[{queues[queue]},{payload},{rank}]"
            for (queue, payload), rank in zip(rows, ranks, strict=True)
        ]
        chunks = [{"items": chunk, **extra} for chunk in _json_arrays(items)]
        return stmt, chunks[0] if len(chunks) == 1 else chunks
    if not many:
        return stmt, {"queue": rows[0][0], "payload": rows[0][1], "priority": ranks[0], **extra}
    return stmt, [
        {"queue": queue, "payload": payload, "priority": rank, **extra}
        for (queue, payload), rank in zip(rows, ranks, strict=True)
    ]


# The rows of a MySQL dispatch, as a table: position keeps the order of ids.
_JSON_ROWS = sa.text(
    "JSON_TABLE(:rows, '$[*]' COLUMNS (position FOR ORDINALITY, "
    "queue VARCHAR(255) PATH '$[0]', payload LONGTEXT PATH '$[1]', "
    "priority SMALLINT PATH '$[2]')) AS source"
).bindparams(sa.bindparam("rows", type_=sa.Text()))
# Bytes of rows per statement: MariaDB's max_allowed_packet is 16 MiB by default, and
# PostgreSQL refuses a JSONB value over 256 MiB, which a JSON text of small numbers reaches at
# about 43 MiB. Bigger statements save nothing measurable (300 jobs of 1 MB: 5.0 s in arrays
# of 4 MiB, 7.6 s in arrays of 32 MiB).
_JSON_CHUNK_BYTES = 4 * 1024 * 1024


def _insert_from_json(available_at: sa.ColumnElement[datetime]) -> sa.Insert:
    source = (
        sa.select(
            sa.literal_column("source.queue", sa.String()),
            sa.literal_column("source.payload", sa.Text()),
            sa.literal_column("source.priority", sa.SmallInteger()),
            available_at,
            statement_now(),
        )
        .select_from(_JSON_ROWS)
        .order_by(sa.literal_column("source.position"))
    )
    return sa.insert(jobs).from_select(
        ["queue", "payload", "priority", "available_at", "created_at"], source
    )


def _json_arrays(items: Sequence[str]) -> Iterator[str]:
    """JSON arrays of ``items`` (each a JSON text), each at most ``_JSON_CHUNK_BYTES`` unless
    one item is larger on its own."""
    limit = _JSON_CHUNK_BYTES
    # A character is at most 4 bytes in UTF-8: most inserts are far below the limit, and need
    # not pay for encoding every item to learn it.
    if 4 * (sum(map(len, items)) + len(items)) + 2 <= limit:
        yield "[" + ",".join(items) + "]"
        return
    chunk: list[str] = []
    size = 2
    for item in items:
        length = len(item.encode()) + 1
        if chunk and size + length > limit:
            yield "[" + ",".join(chunk) + "]"
            chunk, size = [], 2
        chunk.append(item)
        size += length
    yield "[" + ",".join(chunk) + "]"


def size_statement(queue: str) -> sa.Select[Any]:
    """Jobs of ``queue`` waiting to run, due or delayed (not those a worker holds)."""
    return (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.queue == queue, jobs.c.reserved_at.is_(None))
    )


def jobs_statement(queue: str | None) -> sa.Select[Any]:
    """Every row of ``jobs`` (of one queue, or all), in dispatch order: (queue, payload text)."""
    stmt = sa.select(jobs.c.queue, sa.cast(jobs.c.payload, sa.Text())).order_by(jobs.c.id)
    return stmt if queue is None else stmt.where(jobs.c.queue == queue)


# ---------------------------------------------------------------------------- keyed dispatch
#
# A job with a unique or serial key is inserted by its own few statements, which the plain
# dispatch above never runs. The steps are a generator of statements that the caller executes
# on its connection (async or sync) and sends back the results of: one copy of the logic.
#
# Unique keys: the insert skips a row whose key is taken (``ON CONFLICT DO NOTHING``;
# MariaDB/MySQL ``ON DUPLICATE KEY UPDATE id = id``, which inserts nothing and reports no new
# id). A transaction inserting the same key waits, at the index, for the one that holds it
# uncommitted, then inserts (that one rolled back) or skips (it committed). The holder's id is
# read afterwards; if the holder left in between, the insert is tried again.
#
# Serial keys: producers of a key take turns on its ``serial_keys`` row (inserted, or locked
# if it exists) for the rest of their transaction, so that the ids of a key's jobs are in
# commit order. The first job of a key is its head and is due as usual; the others are parked
# (``available_at`` = PARKED_AT, their due time in ``serial_due_at``), out of the claim's
# reach, until the job before them leaves.


class Inserted(NamedTuple):
    """A keyed dispatch: the id of the job inserted, or (``duplicate``) of the one holding
    its unique key."""

    id: int
    duplicate: bool


KeyedSteps = Generator[Statement, Any, Inserted]
"""Statements to run in order, each sent back its result (a buffered ``Result``)."""

_HOLDER_TRIES = 5

_SERIAL_VALUE = {"serial_key": sa.bindparam("serial_key", type_=sa.String())}
_pg_take = postgresql.insert(serial_keys).values(_SERIAL_VALUE)
_mysql_take = mysql.insert(serial_keys).values(_SERIAL_VALUE)
# Insert the key's row, or lock it if it exists (a no-op update takes the row lock). SQLite,
# one writer at a time, needs the row only for the lock the others take.
_TAKE_SERIAL: dict[str, Any] = {
    "postgresql": _pg_take.on_conflict_do_update(
        index_elements=[serial_keys.c.serial_key],
        set_={"serial_key": _pg_take.excluded.serial_key},
    ),
    "sqlite": sqlite.insert(serial_keys).values(_SERIAL_VALUE).on_conflict_do_nothing(),
    "mysql": _mysql_take.on_duplicate_key_update(serial_key=_mysql_take.inserted.serial_key),
}
_SERIAL_BUSY = (
    sa.select(jobs.c.id)
    .where(jobs.c.serial_key == sa.bindparam("serial_key", type_=sa.String()))
    .limit(1)
)
_UNIQUE_KEY = sa.bindparam("unique_key", type_=sa.String())
_HOLDER = sa.select(jobs.c.id).where(jobs.c.unique_key == _UNIQUE_KEY)
_WINDOW_HOLDER = sa.select(unique_windows.c.job_id).where(
    unique_windows.c.unique_key == _UNIQUE_KEY
)
_EXPIRED_WINDOW = sa.delete(unique_windows).where(
    unique_windows.c.unique_key == _UNIQUE_KEY, unique_windows.c.expires_at <= db_now()
)
_WINDOW_VALUES = {
    "unique_key": _UNIQUE_KEY,
    "job_id": sa.bindparam("job_id", type_=sa.BigInteger()),
    "expires_at": statement_now_plus(sa.bindparam("window", type_=sa.Float())),
}
# MySQL: IGNORE, as for schedule slots: the values are valid, so only the duplicate is ignored.
_TAKE_WINDOW: dict[str, Any] = {
    "postgresql": postgresql.insert(unique_windows).values(_WINDOW_VALUES).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(unique_windows).values(_WINDOW_VALUES).on_conflict_do_nothing(),
    "mysql": sa.insert(unique_windows).values(_WINDOW_VALUES).prefix_with("IGNORE"),
}
_DELETE_OWN = sa.delete(jobs).where(jobs.c.id == sa.bindparam("id", type_=sa.BigInteger()))


@functools.cache
def _keyed_insert(kind: str, when: str, parked: bool) -> Any:
    due = _available_at(when)
    values: dict[str, Any] = {
        "queue": sa.bindparam("queue", type_=sa.String()),
        "payload": sa.bindparam("payload", type_=Payload()),
        "priority": sa.bindparam("priority", type_=sa.SmallInteger()),
        "available_at": sa.literal(PARKED_AT, UTCDateTime()) if parked else due,
        "serial_due_at": due if parked else sa.null(),
        "created_at": statement_now(),
        "unique_key": _UNIQUE_KEY,
        "serial_key": sa.bindparam("serial_key", type_=sa.String()),
    }
    if kind == "mysql":
        return mysql.insert(jobs).values(values).on_duplicate_key_update(id=jobs.c.id)
    insert = (postgresql if kind == "postgresql" else sqlite).insert(jobs).values(values)
    return insert.on_conflict_do_nothing(
        index_elements=[jobs.c.unique_key], index_where=jobs.c.unique_key.isnot(None)
    ).returning(jobs.c.id)


# PostgreSQL: every key in one statement, from one array parameter, in key order.
_KEYS_ARRAY = sa.func.unnest(sa.bindparam("keys", type_=postgresql.ARRAY(sa.String()))).alias(
    "wanted"
)
_pg_take_many = postgresql.insert(serial_keys).from_select(
    ["serial_key"],
    sa.select(sa.column("wanted", sa.String())).select_from(_KEYS_ARRAY).order_by(sa.text("1")),
)
_TAKE_SERIAL_MANY = _pg_take_many.on_conflict_do_update(
    index_elements=[serial_keys.c.serial_key],
    set_={"serial_key": _pg_take_many.excluded.serial_key},
)


def lock_serial_keys(dialect_name: str, keys: Sequence[str]) -> Statement:
    """Take the ``serial_keys`` rows of ``keys`` for the caller's transaction, in key order
    (every transaction takes several in the same order, so none waits for another in a
    cycle)."""
    ordered = sorted(set(keys))
    if family(dialect_name) == "postgresql":
        return _TAKE_SERIAL_MANY, {"keys": ordered}
    return _TAKE_SERIAL[family(dialect_name)], [{"serial_key": key} for key in ordered]


def insert_keyed(
    dialect_name: str,
    queue: str,
    payload: str,
    keys: JobKeys,
    available: Availability,
    *,
    notify: bool,
    priority: int = 0,
) -> KeyedSteps:
    """The steps inserting one job with keys, in the caller's transaction."""
    kind = family(dialect_name)
    parked = False
    if keys.serial_key is not None:
        serial = {"serial_key": keys.serial_key}
        yield _TAKE_SERIAL[kind], serial
        parked = (yield _SERIAL_BUSY, serial).first() is not None
    params = {
        "queue": queue,
        "payload": payload,
        "priority": priority,
        "unique_key": keys.unique_key,
        "serial_key": keys.serial_key,
        **_available_params(available),
    }
    statement = _keyed_insert(kind, _when(available), parked)
    new_id: int | None = None
    for _ in range(_HOLDER_TRIES):
        result = yield statement, params
        new_id = (result.lastrowid or None) if kind == "mysql" else result.scalar_one_or_none()
        if new_id is not None or keys.unique_key is None:
            break
        holder = (yield _HOLDER, {"unique_key": keys.unique_key}).scalar_one_or_none()
        if holder is not None:
            return Inserted(int(holder), True)
    if new_id is None:
        # The holder kept finishing between our insert and our read: a key this contended is
        # the caller's to retry, not a reason to strand the job silently.
        raise DispatchError(
            f"could not insert a job with unique key {keys.unique_key!r} nor find the job "
            f"holding it after {_HOLDER_TRIES} tries; dispatch again"
        )
    if keys.unique_for is not None:
        window = {"unique_key": keys.unique_key}
        yield _EXPIRED_WINDOW, window
        taken = yield _TAKE_WINDOW[kind], {**window, "job_id": new_id, "window": keys.unique_for}
        if taken.rowcount != 1:
            # Taken within its period by a job that may be gone: this one was never seen by
            # anyone else, so it simply goes.
            yield _DELETE_OWN, {"id": new_id}
            holder = (yield _WINDOW_HOLDER, window).scalar_one_or_none()
            return Inserted(int(holder if holder is not None else new_id), True)
    if notify and kind == "postgresql" and not parked:
        yield sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("q"))), {"q": queue}
    return Inserted(int(new_id), False)


async def run_steps(conn: AsyncConnection, steps: Generator[Statement, Any, _T]) -> _T:
    """Run a keyed insert's statements on ``conn`` (in its transaction)."""
    try:
        statement = steps.send(None)
        while True:
            statement = steps.send(await conn.execute(*statement))
    except StopIteration as done:
        result: _T = done.value
        return result


async def insert_one(
    conn: AsyncConnection,
    queue: str,
    payload: str,
    keys: JobKeys,
    *,
    notify: bool,
    priority: int = 0,
) -> Inserted | None:
    """Insert one job due now, through the keyed steps when it has keys (then returning what
    they did), else the plain insert."""
    if keys.unique_key is None and keys.serial_key is None:
        await conn.execute(
            *insert_jobs(
                conn.dialect.name, [(queue, payload)], None, notify=notify, priorities=[priority]
            )
        )
        return None
    return await run_steps(
        conn,
        insert_keyed(
            conn.dialect.name, queue, payload, keys, None, notify=notify, priority=priority
        ),
    )


# ----------------------------------------------------------------------------------- worker


class Claimed(NamedTuple):
    """A job row a worker now holds under ``token``; ``attempts`` counts this attempt.
    ``cancel_requested``: an operator cancelled it, so it is recorded, not run."""

    id: int
    queue: str
    payload: str
    attempts: int
    token: int
    serial_key: str | None = None
    priority: int = 0
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class FailedRecord:
    """What goes into failed_jobs."""

    uuid: str
    connection: str
    queue: str
    payload: str
    exception: str
    attempts: int
    job_id: int
    priority: int = 0


_PAYLOAD_TEXT = sa.cast(jobs.c.payload, sa.Text()).label("payload")
_RETURNED = (
    jobs.c.id,
    jobs.c.queue,
    _PAYLOAD_TEXT,
    jobs.c.attempts,
    jobs.c.serial_key,
    jobs.c.priority,
    jobs.c.cancel_requested,
)
_LIMIT = sa.bindparam("limit", type_=sa.Integer())
# MySQL/MariaDB: a locking read of the claim's ranges passes the index entries of every job
# claimed or finished that purge has not removed yet, and each costs it far more than it costs
# a plain (consistent) read. Once priority levels drain one after the other, each claim's
# locking read walked the leftovers of every level already drained: with ten levels in use, a
# drain ran at 0.54 of a single level's speed, with twice the server CPU. So the claim reads the
# lowest level that has a due job first, without locks, and locks from that level on, once
# the queue's previous claim took no job of level 0 (while level 0 has due jobs there is no
# level below it to pass, and that read would only cost a round trip: a plain drain ran 20 %
# slower with it).
_FROM_LEVEL = sa.bindparam("from_level", type_=sa.SmallInteger())
_RESERVE = {
    "reserved_at": db_now(),
    "token": sa.bindparam("new_token", type_=sa.BigInteger()),
    "lease_expires_at": db_now_plus(sa.bindparam("lease", type_=sa.Float())),
    "worker_id": sa.bindparam("worker", type_=sa.String()),
    # A key held only while the job waits is free once a worker takes the job. (The prefix is
    # a literal, not a parameter: the statement is compiled once for every driver.)
    "unique_key": sa.case(
        (
            sa.func.substr(jobs.c.unique_key, sa.literal_column("1"), sa.literal_column("2"))
            == sa.literal_column(f"'{UNIQUE_QUEUED}'"),
            sa.null(),
        ),
        else_=jobs.c.unique_key,
    ),
}


class _Reservation(NamedTuple):
    """The statements of one way of reserving rows, built once: the worker runs them
    thousands of times a second, and building SQLAlchemy constructs is not free."""

    lock: sa.Select[Any]  # MySQL: lock the rows (then ``mark`` them)
    mark: sa.Update  # MySQL: by expanding ``ids``
    reserve: sa.Update  # elsewhere: pick and mark in one statement, RETURNING the rows
    first_level: sa.Select[Any] | None = None  # MySQL: the lowest due level (``lock`` from it)


def _reservation(
    where: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[sa.ColumnElement[Any]],
    *,
    count_attempt: bool,
    postgresql_pick: sa.Select[Any] | None = None,
    by_level: bool = False,
) -> dict[str, _Reservation]:
    """``postgresql_pick``, when given, picks (and locks) the rows on PostgreSQL instead of
    ``where`` and ``order_by``. ``by_level``: MySQL reads the lowest due priority level first,
    without locks, and locks rows from that level on (see ``_FROM_LEVEL``)."""
    values = dict(_RESERVE)
    if count_attempt:
        values["attempts"] = jobs.c.attempts + 1
    picked = sa.select(jobs.c.id).where(*where).order_by(*order_by).limit(_LIMIT)
    if postgresql_pick is None:
        cte = picked.with_for_update(skip_locked=True).cte("picked")
    else:
        cte = postgresql_pick.cte("picked")
    lock = sa.select(*_RETURNED).where(*where).order_by(*order_by).limit(_LIMIT)
    mark = sa.update(jobs).where(jobs.c.id.in_(sa.bindparam("ids", expanding=True))).values(values)
    # ``id = ANY((SELECT array_agg(id) FROM picked))``, not a join with ``picked``: the array is
    # computed once and the update finds its rows by primary key, whereas a join lets the
    # planner choose a scan of the whole table when it thinks the table small.
    picked_ids = sa.cast(
        sa.select(sa.func.array_agg(cte.c.id)).scalar_subquery(),
        postgresql.ARRAY(sa.BigInteger()),
    )
    return {
        "postgresql": _Reservation(
            lock,
            mark,
            sa.update(jobs)
            .where(jobs.c.id == sa.any_(picked_ids))
            .values(values)
            .returning(*_RETURNED),
        ),
        "sqlite": _Reservation(
            lock,
            mark,
            sa.update(jobs)
            .where(jobs.c.id.in_(picked.scalar_subquery()))
            .values(values)
            .returning(*_RETURNED),
        ),
        "mysql": _Reservation(
            (lock.where(jobs.c.priority >= _FROM_LEVEL) if by_level else lock).with_for_update(
                skip_locked=True
            ),
            mark,
            mark,
            sa.select(jobs.c.priority).where(*where).order_by(*order_by).limit(1)
            if by_level
            else None,
        ),
    }


# Due jobs of a queue by priority, then available_at, then id. One index range read over
# (queue, priority, available_at, id) with ``available_at <= now`` would read through every
# delayed row of priority 0 before reaching a due one of priority 1; so each priority level is
# its own range read. SQLite and MySQL/MariaDB plan ``priority IN (0, ..., 9)`` that way (one
# range per value, in index order, so no sort). PostgreSQL walks the levels in a nested loop,
# in order, each a LATERAL subquery reading and locking its level's range; the LIMIT above it
# stops the loop once it has enough rows, so later levels are not read at all.
_LEVELS: list[sa.ColumnElement[Any]] = [
    sa.literal_column(str(level)) for level in range(PRIORITY_MIN, PRIORITY_MAX + 1)
]
_QUEUE_NAME = sa.bindparam("queue_name", type_=sa.String())
_DUE = (
    jobs.c.queue == _QUEUE_NAME,
    jobs.c.reserved_at.is_(None),
    jobs.c.priority.in_(_LEVELS),
    jobs.c.available_at <= db_now(),
)
_DUE_ORDER = (jobs.c.priority, jobs.c.available_at, jobs.c.id)
_LEVEL_TABLE = sa.values(
    sa.column("level", sa.SmallInteger()), name="levels", literal_binds=True
).data([(level,) for level in range(PRIORITY_MIN, PRIORITY_MAX + 1)])
_LEVEL_DUE = (
    sa.select(jobs.c.id)
    .where(
        jobs.c.queue == _QUEUE_NAME,
        jobs.c.reserved_at.is_(None),
        jobs.c.priority == _LEVEL_TABLE.c.level,
        jobs.c.available_at <= db_now(),
    )
    .order_by(jobs.c.available_at, jobs.c.id)
    .limit(_LIMIT)
    .with_for_update(skip_locked=True)
    .lateral("level_jobs")
)
_PICK_BY_LEVEL = (
    sa.select(_LEVEL_DUE.c.id).select_from(_LEVEL_TABLE.join(_LEVEL_DUE, sa.true())).limit(_LIMIT)
)
_CLAIM = _reservation(
    _DUE, _DUE_ORDER, count_attempt=True, postgresql_pick=_PICK_BY_LEVEL, by_level=True
)
# Prefetched jobs are claimed without counting an attempt: one that never starts (its worker
# crashed, or stopped) has not spent one. count_attempts() counts it just before it starts.
_CLAIM_AHEAD = _reservation(
    _DUE, _DUE_ORDER, count_attempt=False, postgresql_pick=_PICK_BY_LEVEL, by_level=True
)


def _expired(queues: sa.ColumnElement[bool]) -> dict[str, _Reservation]:
    return _reservation(
        [jobs.c.reserved_at.isnot(None), jobs.c.lease_expires_at < db_now(), queues],
        (jobs.c.lease_expires_at, jobs.c.id),
        count_attempt=False,
    )


# A worker takes over only jobs of its own queues: a job of another pool may be one it cannot
# load, or one whose attempts it would judge by its own --max-tries. On PostgreSQL the queues
# are one array parameter (the statement is compiled once for asyncpg); elsewhere a list.
_RESCUE = {
    **_expired(jobs.c.queue.in_(sa.bindparam("queues", expanding=True))),
    "postgresql": _expired(
        jobs.c.queue == sa.any_(sa.bindparam("queues", type_=postgresql.ARRAY(sa.String())))
    )["postgresql"],
}


class _Compiled(NamedTuple):
    """A statement compiled once for asyncpg: its text, the order of its parameters, and the
    values of those it fixes itself (such as the 1 of ``attempts + 1``)."""

    text: str
    names: tuple[str, ...]
    fixed: dict[str, Any]

    @classmethod
    def of(cls, statement: sa.ClauseElement) -> _Compiled:
        compiled = statement.compile(dialect=PGDialect_asyncpg())  # type: ignore[no-untyped-call]
        assert isinstance(compiled, SQLCompiler)
        fixed = {k: v for k, v in compiled.params.items() if v is not None}
        return cls(str(compiled), tuple(compiled.positiontup or ()), fixed)

    def args(self, params: dict[str, Any]) -> list[Any]:
        merged = {**self.fixed, **params}
        return [merged[name] for name in self.names]


# The worker's two hot statements on PostgreSQL go straight to asyncpg, with the text compiled
# once from the SQLAlchemy statements above (still the one definition): SQLAlchemy's work per
# execution costs more than the statement itself when a worker claims and deletes thousands of
# jobs a second. The driver prepares each text once per connection.
_CLAIM_ASYNCPG = _Compiled.of(_CLAIM["postgresql"].reserve)
_CLAIM_AHEAD_ASYNCPG = _Compiled.of(_CLAIM_AHEAD["postgresql"].reserve)
_RESCUE_ASYNCPG = _Compiled.of(_RESCUE["postgresql"].reserve)


async def _asyncpg(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under ``conn``, or None for any other driver."""
    if conn.dialect.driver != "asyncpg":
        return None
    return (await conn.get_raw_connection()).driver_connection


async def _reserve(
    conn: AsyncConnection,
    statements: dict[str, _Reservation],
    compiled: _Compiled,
    params: dict[str, Any],
    *,
    count_attempt: bool,
) -> list[Claimed]:
    """Run a reservation: ``compiled`` (its PostgreSQL form) on asyncpg, else ``statements``."""
    token = params["new_token"]
    kind = family(conn.dialect.name)
    driver = await _asyncpg(conn)
    if driver is not None:
        rows = await driver.fetch(compiled.text, *compiled.args(params))
        return _in_order([Claimed(r[0], r[1], r[2], r[3], token, r[4], r[5], r[6]) for r in rows])
    async with conn.begin():
        if kind == "mysql":
            reservation = statements[kind]
            level = 0
            if reservation.first_level is not None and params.get("lowest_level"):
                level = (await conn.execute(reservation.first_level, params)).scalar()
                if level is None:
                    return []
            params = {**params, "from_level": level}
            # Lock the rows in index order, skipping those another worker is locking, then
            # mark exactly those (already ours) by primary key.
            locked = (await conn.execute(reservation.lock, params)).all()
            if not locked:
                return []
            await conn.execute(reservation.mark, {**params, "ids": [row[0] for row in locked]})
            bump = 1 if count_attempt else 0
            return [
                Claimed(i, q, p, a + bump, token, k, r, bool(c)) for i, q, p, a, k, r, c in locked
            ]
        rows = (await conn.execute(statements[kind].reserve, params)).all()
        return _in_order(
            [Claimed(i, q, p, a, token, k, r, bool(c)) for i, q, p, a, k, r, c in rows]
        )


def _in_order(claimed: list[Claimed]) -> list[Claimed]:
    """Claimed rows in the order to start them (an UPDATE returns them in no set order)."""
    if len(claimed) > 1 and any(job.priority for job in claimed):
        claimed.sort(key=lambda job: job.priority)  # stable: otherwise as the claim found them
    return claimed


async def claim(
    conn: AsyncConnection,
    queue: str,
    limit: int,
    token: int,
    lease: float,
    *,
    count_attempt: bool = True,
    worker: str | None = None,
    lowest_level: int = 0,
) -> list[Claimed]:
    """Reserve up to ``limit`` due jobs of ``queue``, by priority, then oldest
    ``available_at``, for the worker whose row is ``worker``.

    With ``count_attempt=False`` (jobs claimed ahead, to wait for a free slot) the attempt is
    not counted: :func:`count_attempts` counts it when the job is about to start.

    ``lowest_level``: the lowest priority of the jobs the previous claim of this queue took.
    Above 0, MySQL reads the lowest due level first, without locks, and locks from there
    (see ``_FROM_LEVEL``); at 0 there is no level below to pass, and that read is skipped.
    The result is the same either way.
    """
    params = {
        "queue_name": queue,
        "limit": limit,
        "new_token": token,
        "lease": float(lease),
        "worker": worker,
        "lowest_level": lowest_level,
    }
    if count_attempt:
        return await _reserve(conn, _CLAIM, _CLAIM_ASYNCPG, params, count_attempt=True)
    return await _reserve(conn, _CLAIM_AHEAD, _CLAIM_AHEAD_ASYNCPG, params, count_attempt=False)


def claim_statement_text() -> str:
    """The claim statement as the worker sends it to PostgreSQL through asyncpg."""
    return _CLAIM_ASYNCPG.text


async def explain_claim(conn: AsyncConnection, queue: str = "default", limit: int = 100) -> str:
    """PostgreSQL (asyncpg): the plan of the worker's claim statement, exactly as the worker
    sends it, from ``EXPLAIN (ANALYZE, BUFFERS)`` in a transaction that is rolled back."""
    driver = await _asyncpg(conn)
    if driver is None:
        raise ValueError("explain_claim() needs a PostgreSQL connection through asyncpg")
    params = {"queue_name": queue, "limit": limit, "new_token": 0, "lease": 0.0, "worker": None}
    transaction = driver.transaction()
    await transaction.start()
    try:
        rows = await driver.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + _CLAIM_ASYNCPG.text, *_CLAIM_ASYNCPG.args(params)
        )
    finally:
        await transaction.rollback()
    return "\n".join(row[0] for row in rows)


async def rescue_expired(
    conn: AsyncConnection,
    limit: int,
    token: int,
    lease: float,
    queues: Sequence[str],
    *,
    worker: str | None = None,
) -> list[Claimed]:
    """Take over up to ``limit`` jobs of ``queues`` whose worker stopped heartbeating
    (attempts unchanged).

    The caller decides, job by job, to put each back to pending or to fail it.
    """
    params = {
        "limit": limit,
        "new_token": token,
        "lease": float(lease),
        "queues": list(queues),
        "worker": worker,
    }
    return await _reserve(conn, _RESCUE, _RESCUE_ASYNCPG, params, count_attempt=False)


def _held(dialect_name: str, pairs: Sequence[tuple[int, int]]) -> sa.ColumnElement[bool]:
    held = sa.tuple_(jobs.c.id, jobs.c.token).in_(list(pairs))
    if family(dialect_name) == "postgresql":
        return held
    # A plain `id IN` as well: SQLite cannot search an index for a list of row values (it
    # would scan the whole table, under its one write lock), and whether MySQL and MariaDB
    # turn one into key ranges varies between versions. With it, the statement reads (and, on
    # MySQL, locks) only the rows it names, by primary key.
    return sa.and_(jobs.c.id.in_([job_id for job_id, _ in pairs]), held)


# PostgreSQL: the pairs travel as two arrays (two parameters however many jobs), and the
# delete joins them on the primary key.
_PAIRS = (
    sa.func.unnest(
        sa.bindparam("ids", type_=postgresql.ARRAY(sa.BigInteger())),
        sa.bindparam("tokens", type_=postgresql.ARRAY(sa.BigInteger())),
    )
    .table_valued("id", "token")
    .render_derived(name="held")
)
_FINISH_POSTGRESQL = sa.delete(jobs).where(jobs.c.id == _PAIRS.c.id, jobs.c.token == _PAIRS.c.token)


_FINISH_ASYNCPG = _Compiled.of(_FINISH_POSTGRESQL)
_COUNT_POSTGRESQL = (
    sa.update(jobs)
    .where(jobs.c.id == _PAIRS.c.id, jobs.c.token == _PAIRS.c.token)
    .values(attempts=jobs.c.attempts + 1)
)
_COUNT_ASYNCPG = _Compiled.of(_COUNT_POSTGRESQL)


async def _by_pairs(
    conn: AsyncConnection,
    pairs: Sequence[tuple[int, int]],
    compiled: _Compiled,
    postgres: sa.Delete | sa.Update,
    other: sa.Delete | sa.Update,
) -> int:
    """Run a statement on the held jobs ``pairs``: ``compiled`` on asyncpg, ``postgres`` on
    PostgreSQL through another driver, ``other`` (restricted to the pairs) elsewhere."""
    driver = await _asyncpg(conn)
    ids, tokens = zip(*pairs, strict=True)
    if driver is not None:
        status = await driver.execute(
            compiled.text, *compiled.args({"ids": list(ids), "tokens": list(tokens)})
        )
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>" / "UPDATE <count>"
    async with conn.begin():
        if family(conn.dialect.name) == "postgresql":
            result = await conn.execute(postgres, {"ids": ids, "tokens": tokens})
        else:
            result = await conn.execute(other.where(_held(conn.dialect.name, pairs)))
    return int(result.rowcount)


async def finish(conn: AsyncConnection, pairs: Sequence[tuple[int, int]]) -> int:
    """Delete finished jobs given as (id, token); returns how many this worker still held."""
    return await _by_pairs(conn, pairs, _FINISH_ASYNCPG, _FINISH_POSTGRESQL, sa.delete(jobs))


# The next job of each key whose head left becomes the head: the first job of the key (the head
# is always the first, as producers insert in turn and only the first job of a key is due), if
# it is parked. Idempotent: with the head still there, it changes nothing. One statement for
# every key of a batch; on MySQL, which refuses a subquery on the table an UPDATE writes, the
# heads are read first.
_SERIAL_KEYS: sa.BindParameter[Any] = sa.bindparam("serial_keys", expanding=True)
_FIRST_OF_KEYS = (
    sa.select(sa.func.min(jobs.c.id))
    .where(jobs.c.serial_key.in_(_SERIAL_KEYS))
    .group_by(jobs.c.serial_key)
)
# MySQL assigns left to right, each seeing the ones before: available_at first (the table's
# column order, which SQLAlchemy keeps).
_PROMOTION = {"available_at": jobs.c.serial_due_at, "serial_due_at": sa.null()}
_PROMOTE = (
    sa.update(jobs)
    .where(jobs.c.id.in_(_FIRST_OF_KEYS.scalar_subquery()), jobs.c.serial_due_at.isnot(None))
    .values(_PROMOTION)
)
# PostgreSQL: the keys as one array parameter, so that the statement text is the same
# whatever their number (asyncpg prepares it once per connection).
_PROMOTE_PG = (
    sa.update(jobs)
    .where(
        jobs.c.id.in_(
            sa.select(sa.func.min(jobs.c.id))
            .where(
                jobs.c.serial_key
                == sa.any_(sa.bindparam("keys", type_=postgresql.ARRAY(sa.String())))
            )
            .group_by(jobs.c.serial_key)
            .scalar_subquery()
        ),
        jobs.c.serial_due_at.isnot(None),
    )
    .values(_PROMOTION)
)
_PROMOTE_NOTIFY_PG = _notify_after(_PROMOTE_PG.returning(jobs.c.queue).cte("promoted"))
_PROMOTE_BY_ID = (
    sa.update(jobs)
    .where(jobs.c.id.in_(sa.bindparam("ids", expanding=True)), jobs.c.serial_due_at.isnot(None))
    .values(_PROMOTION)
)


async def _promote(conn: AsyncConnection, keys: Sequence[str], *, notify: bool) -> None:
    """Make the next job of each of ``keys`` its head (in the caller's transaction, which
    holds the keys' rows)."""
    kind = family(conn.dialect.name)
    if kind == "mysql":
        params = {"serial_keys": sorted(set(keys))}
        heads = [row[0] for row in await conn.execute(_FIRST_OF_KEYS, params)]
        if heads:
            await conn.execute(_PROMOTE_BY_ID, {"ids": heads})
    elif kind == "postgresql":
        await conn.execute(_PROMOTE_NOTIFY_PG if notify else _PROMOTE_PG, {"keys": list(keys)})
    else:
        await conn.execute(_PROMOTE, {"serial_keys": sorted(set(keys))})


async def _lock_serial(conn: AsyncConnection, keys: Sequence[str]) -> None:
    await conn.execute(*lock_serial_keys(conn.dialect.name, keys))


async def finish_serial(
    conn: AsyncConnection, held: Sequence[tuple[int, int, str]], *, notify: bool = False
) -> int:
    """Delete finished jobs of serial keys, given as (id, token, serial key), and promote the
    next job of each key, in one transaction (``conn`` must not be in autocommit mode);
    returns how many this worker still held.

    The keys' rows are taken first: a producer of one of them that has not committed yet is
    waited for, so that its job, if it comes next, is seen and promoted.
    """
    keys = [key for _, _, key in held]
    pairs = [(job_id, token) for job_id, token, _ in held]
    async with conn.begin():
        await _lock_serial(conn, keys)
        if family(conn.dialect.name) == "postgresql":
            ids, tokens = zip(*pairs, strict=True)
            result = await conn.execute(_FINISH_POSTGRESQL, {"ids": ids, "tokens": tokens})
        else:
            result = await conn.execute(sa.delete(jobs).where(_held(conn.dialect.name, pairs)))
        await _promote(conn, keys, notify=notify)
    return int(result.rowcount)


# A key's run: its head and the jobs parked behind it, in id order, at most ``run_limit`` rows
# and ``run_bytes`` of payload (the head always), read in one statement for many keys. The
# MQTT relay sends a run over one connection while it holds the head (a parked job cannot be
# claimed: the head stays until its holder deletes it), then deletes what the broker took.
_RUN_LIMIT = sa.bindparam("run_limit", type_=sa.Integer())


def _first_rows(key: sa.ColumnElement[str]) -> sa.Select[Any]:
    return (
        sa.select(
            jobs.c.id,
            jobs.c.serial_key,
            jobs.c.queue,
            _PAYLOAD_TEXT,
            sa.case((jobs.c.serial_due_at <= db_now(), 1), else_=0).label("due"),
        )
        .where(jobs.c.serial_key == key)
        .order_by(jobs.c.id)
        .limit(_RUN_LIMIT)
    )


def _runs_of(rows: sa.Subquery) -> sa.Select[Any]:
    """Each key's rows numbered, and cut once their payloads add up to ``run_bytes``."""
    key, order = rows.c.serial_key, rows.c.id
    run = sa.select(
        *rows.c,
        sa.func.row_number().over(partition_by=key, order_by=order).label("position"),
        sa.func.sum(sa.func.length(rows.c.payload))
        .over(partition_by=key, order_by=order)
        .label("size"),
    ).subquery("run")
    return (
        sa.select(run.c.id, run.c.serial_key, run.c.queue, run.c.payload, run.c.due)
        .where(
            sa.or_(
                run.c.position == 1,
                run.c.size <= sa.bindparam("run_bytes", type_=sa.BigInteger()),
            )
        )
        .order_by(run.c.serial_key, run.c.id)
    )


@functools.cache
def _key_runs(count: int) -> sa.Select[Any]:
    """The runs of ``count`` keys (parameters ``key0``, ``key1``, ...): each key's first rows
    by its own index range read (not the whole key: a long backlog would be read each time)."""
    firsts: list[sa.Select[Any]] = [
        sa.select(*_first_rows(sa.bindparam(f"key{n}", type_=sa.String())).subquery().c)
        for n in range(count)
    ]
    return _runs_of((firsts[0] if count == 1 else sa.union_all(*firsts)).subquery("firsts"))


# PostgreSQL: the keys as one array parameter, each key's rows by a LATERAL subquery: one
# statement text however many keys (asyncpg prepares it once per connection).
_WANTED = (
    sa.func.unnest(sa.bindparam("keys", type_=postgresql.ARRAY(sa.String())))
    .table_valued("key")
    .render_derived(name="wanted")
)
_FIRSTS_PG = _first_rows(_WANTED.c.key).lateral("firsts")
_KEY_RUNS_PG = _runs_of(
    sa.select(*_FIRSTS_PG.c).select_from(_WANTED.join(_FIRSTS_PG, sa.true())).subquery("rows")
)
_RUN_KEYS_AT_ONCE = 100  # SQLite takes at most 500 terms in a UNION

_DELETE_PARKED = sa.delete(jobs).where(
    jobs.c.id.in_(sa.bindparam("parked_ids", expanding=True)), jobs.c.serial_due_at.isnot(None)
)
_MANY = 500  # ids per statement: within every engine's parameter limit


class QueuedInKey(NamedTuple):
    """A job of a serial key, as :func:`key_runs` reads it; ``due``: parked behind the head,
    and its due time has come."""

    id: int
    serial_key: str
    queue: str
    payload: str
    due: bool


async def key_runs(
    conn: AsyncConnection, keys: Sequence[str], *, run_limit: int, run_bytes: int
) -> list[QueuedInKey]:
    """The first jobs of each of ``keys`` in id order (the first is the key's head): at most
    ``run_limit`` per key, and, after the head, no more than ``run_bytes`` of payload text
    in all."""
    ordered = sorted(set(keys))
    rows: list[QueuedInKey] = []
    if family(conn.dialect.name) == "postgresql":
        params = {"keys": ordered, "run_limit": run_limit, "run_bytes": run_bytes}
        result = await conn.execute(_KEY_RUNS_PG, params)
        return [QueuedInKey(int(i), k, q, p, bool(d)) for i, k, q, p, d in result]
    for start in range(0, len(ordered), _RUN_KEYS_AT_ONCE):
        chunk = ordered[start : start + _RUN_KEYS_AT_ONCE]
        chunk_params: dict[str, Any] = {f"key{n}": key for n, key in enumerate(chunk)}
        chunk_params.update(run_limit=run_limit, run_bytes=run_bytes)
        result = await conn.execute(_key_runs(len(chunk)), chunk_params)
        rows.extend(QueuedInKey(int(i), k, q, p, bool(d)) for i, k, q, p, d in result)
    return rows


async def delete_parked(conn: AsyncConnection, ids: Sequence[int]) -> int:
    """Delete jobs that are parked behind the head of their key, by id; returns how many.

    Autocommit statements (the mode stays until the connection goes back to its pool): no
    write transaction stays open across an await (see :func:`housekeep`). A job promoted
    meanwhile (its head left: the caller's hold on it had expired) is not parked and stays.
    """
    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
    deleted = 0
    for start in range(0, len(ids), _MANY):
        chunk = list(ids[start : start + _MANY])
        deleted += int((await conn.execute(_DELETE_PARKED, {"parked_ids": chunk})).rowcount)
    return deleted


async def count_attempts(conn: AsyncConnection, pairs: Sequence[tuple[int, int]]) -> int:
    """Count an attempt of held jobs claimed ahead, which have started; returns how many this
    worker still held."""
    every = sa.update(jobs).values(attempts=jobs.c.attempts + 1)
    return await _by_pairs(conn, pairs, _COUNT_ASYNCPG, _COUNT_POSTGRESQL, every)


async def extend_leases(
    conn: AsyncConnection, pairs: Sequence[tuple[int, int]], lease: float
) -> int:
    """Push the lease of held jobs ``lease`` seconds past now; returns how many are still held."""
    async with conn.begin():
        result = await conn.execute(
            sa.update(jobs)
            .where(_held(conn.dialect.name, pairs))
            .values(lease_expires_at=db_now_plus(sa.literal(float(lease), sa.Float())))
        )
    return int(result.rowcount)


async def cancel_requested_ids(
    conn: AsyncConnection, pairs: Sequence[tuple[int, int]]
) -> list[int]:
    """Which of the held jobs ``pairs`` an operator cancelled (a read by primary key)."""
    rows = await conn.execute(
        sa.select(jobs.c.id).where(_held(conn.dialect.name, pairs), jobs.c.cancel_requested)
    )
    return [int(i) for i in rows.scalars()]


async def release(
    conn: AsyncConnection,
    pairs: Sequence[tuple[int, int]],
    *,
    delay: float | None,
    refund_attempt: bool = False,
    count_attempt: bool = False,
) -> int:
    """Return held jobs to pending.

    ``delay`` seconds from now sets ``available_at`` (``None`` keeps it); ``refund_attempt``
    takes back the attempt the claim counted (used at shutdown, for jobs that never finished);
    ``count_attempt`` counts one that was not counted yet (a job claimed ahead that ran).
    """
    values: dict[str, Any] = {"reserved_at": None, "token": None, "lease_expires_at": None}
    if delay is not None:
        values["available_at"] = db_now_plus(sa.literal(float(delay), sa.Float()))
    if refund_attempt:
        values["attempts"] = sa.case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0)
    elif count_attempt:
        values["attempts"] = jobs.c.attempts + 1
    async with conn.begin():
        result = await conn.execute(
            sa.update(jobs).where(_held(conn.dialect.name, pairs)).values(values)
        )
    return int(result.rowcount)


async def move_to_failed(
    conn: AsyncConnection, token: int, record: FailedRecord, *, serial_key: str | None = None
) -> bool:
    """Delete the held job and insert it into failed_jobs, in one transaction (``conn`` must not
    be in autocommit mode); the job of a serial key promotes the next one of its key.

    Returns False (and changes nothing) when the worker no longer holds the job.
    """
    async with conn.begin():
        if serial_key is not None:
            await _lock_serial(conn, [serial_key])
        deleted = await conn.execute(
            sa.delete(jobs).where(jobs.c.id == record.job_id, jobs.c.token == token)
        )
        if deleted.rowcount != 1:
            return False
        await conn.execute(
            sa.insert(failed_jobs).values(
                uuid=record.uuid,
                connection=record.connection,
                queue=record.queue,
                payload=record.payload,
                exception=record.exception,
                attempts=record.attempts,
                job_id=record.job_id,
                failed_at=db_now(),
                priority=record.priority,
            )
        )
        if serial_key is not None:
            await _promote(conn, [serial_key], notify=False)
    return True


async def insert_failed(conn: AsyncConnection, record: FailedRecord) -> None:
    """Record a failure of a job this process does not hold (RouteMQ's ``failed()`` called
    apart from its worker): failed_jobs only, ``jobs`` untouched."""
    async with conn.begin():
        await conn.execute(
            sa.insert(failed_jobs).values(
                uuid=record.uuid,
                connection=record.connection,
                queue=record.queue,
                payload=record.payload,
                exception=record.exception,
                attempts=record.attempts,
                job_id=None,
                failed_at=db_now(),
            )
        )


# Keys of serial jobs with no head: its promotion was missed (the head was deleted by
# ``routemq-outbox clear``, say). Rare, so the query reads every serial job, once a minute.
_HEADLESS = (
    sa.select(jobs.c.serial_key)
    .where(jobs.c.serial_key.isnot(None))
    .group_by(jobs.c.serial_key)
    .having(sa.func.count(jobs.c.serial_due_at) == sa.func.count())
)
_UNUSED_SERIAL_KEYS = sa.delete(serial_keys).where(
    ~sa.select(jobs.c.id).where(jobs.c.serial_key == serial_keys.c.serial_key).exists()
)
_EXPIRED_WINDOWS = sa.delete(unique_windows).where(unique_windows.c.expires_at <= db_now())


COUNTS_KEPT_MINUTES = 24 * 60
"""How long the per-minute counts of finished jobs are kept."""
_OLD_COUNTS = sa.delete(job_counts).where(job_counts.c.minute < db_minute() - COUNTS_KEPT_MINUTES)


class Housekept(NamedTuple):
    """What :func:`housekeep` did."""

    promoted_keys: int
    expired_windows: int
    unused_serial_keys: int
    old_counts: int


async def housekeep(conn: AsyncConnection) -> Housekept:
    """The worker's occasional chores: promote the next job of serial keys left without a
    head, delete the unique periods that have expired and the ``serial_keys`` rows of keys
    without jobs.

    The deletes are single statements in autocommit mode (last: the mode stays until the
    connection goes back to its pool). A write transaction held open across an await is a
    hazard on SQLite: should job code block the event loop between its first write and its
    COMMIT, the database's one write lock stays taken and no other worker can write, not even
    to take that job over. Promoting (rare) needs its transaction; when nothing is headless,
    that transaction only reads, which on SQLite takes no lock."""
    async with conn.begin():
        headless = [str(key) for key in (await conn.execute(_HEADLESS)).scalars()]
        if headless:
            await _lock_serial(conn, headless)
            await _promote(conn, headless, notify=False)
    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
    expired = (await conn.execute(_EXPIRED_WINDOWS)).rowcount
    unused = (await conn.execute(_UNUSED_SERIAL_KEYS)).rowcount
    # Reading the rowcount closes the result (see record_counts).
    old_counts = (await conn.execute(_OLD_COUNTS)).rowcount
    return Housekept(len(headless), int(expired), int(unused), int(old_counts))


# ------------------------------------------------------------------------------- operating
#
# What ``routemq-outbox stats``, ``failed …``, ``clear`` and ``health`` run, and the worker's
# queue depth gauges. The counts are those of the README's "Queue size in SQL" queries (with
# the library's clock, which on SQLite has milliseconds where the README's
# ``CURRENT_TIMESTAMP`` has seconds); a test compares them.


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """One queue's jobs by state, and how long its oldest due job has waited (None: none due)."""

    queue: str
    pending: int = 0
    delayed: int = 0
    reserved: int = 0
    failed: int = 0
    oldest_due_age: float | None = None


def _queue_filter(column: sa.ColumnElement[str], queues: Sequence[str] | None) -> list[Any]:
    return [] if queues is None else [column.in_(list(queues))]


def queue_counts_statement(queues: Sequence[str] | None = None) -> sa.Select[Any]:
    """Per queue (every queue with rows, or those of ``queues`` that have some): pending,
    delayed, reserved and failed jobs, and the age in seconds of the oldest waiting job
    (negative when none is due yet).

    One statement, so one snapshot: counted apart, a queue could get its first job between
    two counts and appear in one and not the other. Each part reads an index, never the table:
    waiting jobs the claim index, reserved ones the lease index (``lease_expires_at`` is set
    exactly when ``reserved_at`` is, and naming both lets PostgreSQL and SQLite use their
    partial index and MySQL its full one), failed jobs their queue index.
    """
    nothing = sa.literal_column("0", sa.Integer())
    due = sa.case(
        (jobs.c.available_at <= db_now(), sa.literal_column("1", sa.Integer())), else_=nothing
    )
    waiting = (
        sa.select(
            jobs.c.queue.label("queue"),
            sa.func.sum(due).label("pending"),
            sa.func.count().label("waiting"),
            nothing.label("reserved"),
            nothing.label("failed"),
            sa.func.min(jobs.c.available_at).label("oldest"),
        )
        .where(jobs.c.reserved_at.is_(None), *_queue_filter(jobs.c.queue, queues))
        .group_by(jobs.c.queue)
    )
    reserved = (
        sa.select(jobs.c.queue, nothing, nothing, sa.func.count(), nothing, sa.null())
        .where(
            jobs.c.reserved_at.isnot(None),
            jobs.c.lease_expires_at.isnot(None),
            *_queue_filter(jobs.c.queue, queues),
        )
        .group_by(jobs.c.queue)
    )
    failed = (
        sa.select(failed_jobs.c.queue, nothing, nothing, nothing, sa.func.count(), sa.null())
        .where(*_queue_filter(failed_jobs.c.queue, queues))
        .group_by(failed_jobs.c.queue)
    )
    parts = sa.union_all(waiting, reserved, failed).subquery("parts")
    pending = sa.func.sum(parts.c.pending)
    return (
        sa.select(
            parts.c.queue,
            pending.label("pending"),
            (sa.func.sum(parts.c.waiting) - pending).label("delayed"),
            sa.func.sum(parts.c.reserved).label("reserved"),
            sa.func.sum(parts.c.failed).label("failed"),
            seconds_since(sa.func.min(parts.c.oldest)).label("oldest_age"),
        )
        .group_by(parts.c.queue)
        .order_by(parts.c.queue)
    )


async def queue_counts(
    engine: AsyncEngine, queues: Sequence[str] | None = None
) -> list[QueueCounts]:
    """Counts of every queue that has jobs or failed jobs (or of ``queues``, zeros included)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(queue_counts_statement(queues))).all()
    found = {
        row.queue: QueueCounts(
            row.queue,
            pending=int(row.pending),
            delayed=int(row.delayed),
            reserved=int(row.reserved),
            failed=int(row.failed),
            # never negative: the clock's sub-second rounding can put "due" a hair ahead
            oldest_due_age=max(0.0, float(row.oldest_age)) if row.pending else None,
        )
        for row in rows
    }
    for name in queues or ():
        found.setdefault(name, QueueCounts(name))
    return [found[name] for name in sorted(found)]


async def queue_size(engine: AsyncEngine, queue: str) -> int:
    """What ``queue.size()`` returns: jobs of ``queue`` waiting, due or delayed."""
    async with engine.connect() as conn:
        return int((await conn.execute(size_statement(queue))).scalar_one())


async def queue_exists(engine: AsyncEngine, queue: str) -> bool:
    """Whether any job or failed job is in ``queue`` (queues exist only through their rows)."""
    in_jobs = sa.select(jobs.c.id).where(jobs.c.queue == queue).exists()
    in_failed = sa.select(failed_jobs.c.id).where(failed_jobs.c.queue == queue).exists()
    async with engine.connect() as conn:
        return bool((await conn.execute(sa.select(sa.or_(in_jobs, in_failed)))).scalar_one())


def _first_above(
    table: sa.Table, where: Sequence[sa.ColumnElement[bool]], above: sa.ColumnElement[Any] | None
) -> sa.ScalarSelect[Any]:
    """The smallest queue name of ``table``'s rows (matching ``where``) above ``above``: one
    probe of an index whose leading column is ``queue``."""
    step = [] if above is None else [table.c.queue > above]
    return (
        sa.select(table.c.queue)
        .where(*where, *step)
        .order_by(table.c.queue)
        .limit(1)
        .scalar_subquery()
    )


def _skip_scan(table: sa.Table, where: Sequence[sa.ColumnElement[bool]]) -> sa.Select[Any]:
    """The distinct queue names of ``table`` (rows matching ``where``), one index probe per
    name: a recursive "loose index scan", where DISTINCT or GROUP BY would read every row's
    index entry on PostgreSQL and SQLite."""
    first = sa.select(_first_above(table, where, None).label("queue"))
    names = first.cte(f"{table.name}_names", recursive=True)
    names = names.union_all(
        sa.select(_first_above(table, where, names.c.queue)).where(names.c.queue.isnot(None))
    )
    return sa.select(names.c.queue).where(names.c.queue.isnot(None))


def _queue_name_statements(dialect: str, failed_only: bool) -> list[sa.Select[Any]]:
    """Statements whose rows together name every queue with jobs (unless ``failed_only``) and
    with failed jobs, each reading an index with ``queue`` in front, one entry per name.

    MySQL and MariaDB do this themselves for a GROUP BY on such an index ("Using index for
    group-by"); PostgreSQL and SQLite need it spelled out. There the claim index holds only
    waiting jobs: the reserved ones, as many as the workers run at once, come from the lease
    index."""
    if family(dialect) == "mysql":
        tables = [failed_jobs] if failed_only else [jobs, failed_jobs]
        return [sa.select(t.c.queue).group_by(t.c.queue) for t in tables]
    statements = [_skip_scan(failed_jobs, [])]
    if not failed_only:
        statements += [
            _skip_scan(jobs, [jobs.c.reserved_at.is_(None)]),
            sa.select(jobs.c.queue)
            .where(jobs.c.reserved_at.isnot(None), jobs.c.lease_expires_at.isnot(None))
            .distinct(),
        ]
    return statements


async def known_queues(engine: AsyncEngine, *, failed_only: bool = False) -> list[str]:
    """Every queue that has jobs or failed jobs (``failed_only``: failed jobs), sorted."""
    names: set[str] = set()
    async with engine.connect() as conn:
        for statement in _queue_name_statements(conn.dialect.name, failed_only):
            names.update(str(name) for name in (await conn.execute(statement)).scalars())
    return sorted(names)


def _capped_count(
    where: Sequence[sa.ColumnElement[bool]], cap: int, table: sa.Table = jobs
) -> sa.ScalarSelect[Any]:
    """How many rows match ``where``, reading at most ``cap + 1`` index entries."""
    some: sa.Select[Any] = (
        sa.select(sa.literal_column("1")).select_from(table).where(*where).limit(cap + 1)
    )
    return sa.select(sa.func.count()).select_from(some.subquery()).scalar_subquery()


def _capped_counts_statement(queue: str, cap: int) -> sa.Select[Any]:
    """One queue's counts, each stopping at ``cap + 1``. Each reads an index range: waiting
    jobs one range of the claim index per priority level (``available_at`` follows
    ``priority`` there), reserved ones the lease index (see queue_counts_statement), failed
    ones their queue index. The oldest waiting job is one probe per level."""
    name = sa.literal(queue, sa.String())
    waiting = (jobs.c.queue == name, jobs.c.reserved_at.is_(None))
    levels = jobs.c.priority.in_(_LEVELS)
    oldest = sa.union_all(
        *(
            sa.select(sa.func.min(jobs.c.available_at).label("at")).where(
                *waiting, jobs.c.priority == level
            )
            for level in _LEVELS
        )
    ).subquery("oldest")
    return sa.select(
        _capped_count([*waiting, levels, jobs.c.available_at <= db_now()], cap).label("pending"),
        _capped_count([*waiting, levels, jobs.c.available_at > db_now()], cap).label("delayed"),
        _capped_count(
            [
                jobs.c.queue == name,
                jobs.c.reserved_at.isnot(None),
                jobs.c.lease_expires_at.isnot(None),
            ],
            cap,
        ).label("reserved"),
        _capped_count([failed_jobs.c.queue == name], cap, failed_jobs).label("failed"),
        sa.select(seconds_since(sa.func.min(oldest.c.at))).scalar_subquery().label("oldest_age"),
    )


async def capped_queue_counts(
    engine: AsyncEngine, queues: Sequence[str], cap: int
) -> list[QueueCounts]:
    """Like queue_counts for ``queues``, but a count that would pass ``cap`` stops at
    ``cap + 1``: each is a bounded read, however many jobs wait. (A statement per queue, so
    not one snapshot: good enough for a page that refreshes.)"""
    found = []
    async with engine.connect() as conn:
        for name in queues:
            row = (await conn.execute(_capped_counts_statement(name, cap))).one()
            found.append(
                QueueCounts(
                    name,
                    pending=int(row.pending),
                    delayed=int(row.delayed),
                    reserved=int(row.reserved),
                    failed=int(row.failed),
                    oldest_due_age=max(0.0, float(row.oldest_age)) if row.pending else None,
                )
            )
    return found


async def clear_queue(engine: AsyncEngine, queue: str) -> int:
    """Delete the waiting (due and delayed) jobs of ``queue``; jobs a worker holds stay."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.delete(jobs).where(jobs.c.queue == queue, jobs.c.reserved_at.is_(None))
        )
    return int(result.rowcount)


# failed_jobs


@dataclass(frozen=True, slots=True)
class FailedRow:
    """A row of failed_jobs, payload as JSON text."""

    id: int
    uuid: str
    connection: str
    queue: str
    payload: str
    exception: str
    attempts: int
    job_id: int | None
    failed_at: datetime


_FAILED_PAYLOAD = sa.cast(failed_jobs.c.payload, sa.Text()).label("payload")
_FAILED_COLUMNS = (
    failed_jobs.c.id,
    failed_jobs.c.uuid,
    failed_jobs.c.connection,
    failed_jobs.c.queue,
    _FAILED_PAYLOAD,
    failed_jobs.c.exception,
    failed_jobs.c.attempts,
    failed_jobs.c.job_id,
    failed_jobs.c.failed_at,
)


def _failed_row(row: sa.Row[Any]) -> FailedRow:
    return FailedRow(**row._asdict())


def _refs(ids: Sequence[int], uuids: Sequence[str]) -> sa.ColumnElement[bool]:
    return sa.or_(failed_jobs.c.id.in_(list(ids)), failed_jobs.c.uuid.in_(list(uuids)))


async def failed_page(
    engine: AsyncEngine, queue: str | None, limit: int, before: int | None = None
) -> tuple[list[FailedRow], int]:
    """The ``limit`` newest failed jobs (of ``queue``; with ids below ``before``), and how many
    there are in all (of ``queue``)."""
    where = [] if queue is None else [failed_jobs.c.queue == queue]
    older = [] if before is None else [failed_jobs.c.id < before]
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(*_FAILED_COLUMNS)
            .where(*where, *older)
            .order_by(failed_jobs.c.id.desc())
            .limit(limit)
        )
        page = [_failed_row(row) for row in rows]
        total = await conn.execute(
            sa.select(sa.func.count()).select_from(failed_jobs).where(*where)
        )
        return page, int(total.scalar_one())


async def failed_by_refs(
    engine: AsyncEngine, ids: Sequence[int], uuids: Sequence[str]
) -> list[FailedRow]:
    """The failed jobs with these ids or uuids (those that exist), by id."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(*_FAILED_COLUMNS).where(_refs(ids, uuids)).order_by(failed_jobs.c.id)
        )
        return [_failed_row(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Taken:
    """What a failed-job operation took. When ids or uuids were missing, it changed nothing."""

    count: int
    missing_ids: tuple[int, ...] = ()
    missing_uuids: tuple[str, ...] = ()


_TAKEN = (
    failed_jobs.c.id,
    failed_jobs.c.uuid,
    failed_jobs.c.queue,
    _FAILED_PAYLOAD,
    failed_jobs.c.priority,
)
_REF_CHUNK = 1000  # ids per statement: well within every engine's parameter limit
# MySQL/MariaDB: the rows just locked, one statement per row. ``DELETE … WHERE id IN (…)``
# becomes a full scan once the ids are a large share of the rows the optimiser believes the
# table holds (FORCE INDEX does not prevent it), and that scan waits for the rows a concurrent
# caller has locked while that caller's scan waits for ours: a deadlock. A primary key
# equality has one plan, which reads only its row.
_DELETE_FAILED_BY_ID = sa.delete(failed_jobs).where(
    failed_jobs.c.id == sa.bindparam("id", type_=sa.BigInteger())
)


async def _take_failed(
    conn: AsyncConnection,
    where: Sequence[sa.ColumnElement[bool]],
    limit: int | None = None,
) -> list[sa.Row[Any]]:
    """Delete failed jobs and return them. With ``limit``, the oldest ``limit`` rows that no
    other transaction has locked (PostgreSQL and MySQL skip locked rows)."""
    kind = family(conn.dialect.name)
    if kind == "mysql":
        pick = sa.select(*_TAKEN).where(*where).order_by(failed_jobs.c.id)
        if limit is not None:
            pick = pick.limit(limit).with_for_update(skip_locked=True)
        else:
            pick = pick.with_for_update()
        rows = list((await conn.execute(pick)).all())
        if rows:
            await conn.execute(_DELETE_FAILED_BY_ID, [{"id": row.id} for row in rows])
        return rows
    if limit is None:
        stmt = sa.delete(failed_jobs).where(*where)
    else:
        picked = sa.select(failed_jobs.c.id).where(*where).order_by(failed_jobs.c.id).limit(limit)
        if kind == "postgresql":
            cte = picked.with_for_update(skip_locked=True).cte("picked")
            stmt = sa.delete(failed_jobs).where(failed_jobs.c.id == cte.c.id)
        else:
            stmt = sa.delete(failed_jobs).where(failed_jobs.c.id.in_(picked.scalar_subquery()))
    return list((await conn.execute(stmt.returning(*_TAKEN))).all())


async def _requeue(conn: AsyncConnection, rows: Sequence[Any], notify: bool) -> None:
    """Insert taken failed jobs into ``jobs``: attempts 0, due now, their priority kept."""
    if rows:
        stmt, params = insert_jobs(
            conn.dialect.name,
            [(row.queue, row.payload) for row in rows],
            None,
            notify=notify and family(conn.dialect.name) == "postgresql",
            priorities=[row.priority for row in rows],
        )
        await conn.execute(stmt, params)


async def _take_refs(
    engine: AsyncEngine, ids: Sequence[int], uuids: Sequence[str], *, requeue: bool, notify: bool
) -> Taken:
    """Take exactly these failed jobs, in one transaction, or none if any is missing."""
    ids, uuids = sorted(set(ids)), sorted(set(uuids))
    async with engine.connect() as conn, conn.begin() as transaction:
        taken: list[sa.Row[Any]] = []
        for start in range(0, max(len(ids), len(uuids)), _REF_CHUNK):
            chunk = _refs(ids[start : start + _REF_CHUNK], uuids[start : start + _REF_CHUNK])
            taken.extend(await _take_failed(conn, [chunk]))
        missing_ids = tuple(sorted(set(ids) - {row.id for row in taken}))
        missing_uuids = tuple(sorted(set(uuids) - {row.uuid for row in taken}))
        if missing_ids or missing_uuids:
            await transaction.rollback()
            return Taken(0, missing_ids, missing_uuids)
        if requeue:
            await _requeue(conn, taken, notify)
    return Taken(len(taken))


async def retry_failed(
    engine: AsyncEngine, ids: Sequence[int], uuids: Sequence[str], *, notify: bool
) -> Taken:
    """Move these failed jobs back into ``jobs`` (attempts 0, due now) in one transaction;
    if any of them is not in failed_jobs, move none."""
    return await _take_refs(engine, ids, uuids, requeue=True, notify=notify)


async def delete_failed(engine: AsyncEngine, ids: Sequence[int], uuids: Sequence[str]) -> Taken:
    """Delete these failed jobs in one transaction; if any is not in failed_jobs, delete none."""
    return await _take_refs(engine, ids, uuids, requeue=False, notify=False)


async def retry_failed_batch(
    engine: AsyncEngine, queue: str | None, up_to_id: int, limit: int, *, notify: bool
) -> int:
    """Move up to ``limit`` failed jobs (of ``queue``, with ids up to ``up_to_id``) back into
    ``jobs``, in one transaction; returns how many. Rows another transaction holds are
    skipped, so concurrent callers share the work and never move a row twice."""
    where = [failed_jobs.c.id <= up_to_id]
    if queue is not None:
        where.append(failed_jobs.c.queue == queue)
    async with engine.begin() as conn:
        taken = await _take_failed(conn, where, limit)
        await _requeue(conn, taken, notify)
    return len(taken)


async def newest_failed_id(engine: AsyncEngine) -> int:
    """The highest id in failed_jobs (0 when empty)."""
    async with engine.connect() as conn:
        newest = (await conn.execute(sa.select(sa.func.max(failed_jobs.c.id)))).scalar_one()
    return int(newest or 0)


async def flush_failed(engine: AsyncEngine, queue: str | None) -> int:
    """Delete every failed job (of ``queue``)."""
    where = [] if queue is None else [failed_jobs.c.queue == queue]
    async with engine.begin() as conn:
        result = await conn.execute(sa.delete(failed_jobs).where(*where))
    return int(result.rowcount)


async def prune_failed(engine: AsyncEngine, older_than: float, queue: str | None) -> int:
    """Delete failed jobs that failed more than ``older_than`` seconds ago (database clock)."""
    where = [failed_jobs.c.failed_at < db_now_plus(sa.literal(-float(older_than), sa.Float()))]
    if queue is not None:
        where.append(failed_jobs.c.queue == queue)
    async with engine.begin() as conn:
        result = await conn.execute(sa.delete(failed_jobs).where(*where))
    return int(result.rowcount)


# ------------------------------------------------------------------------------- schedules
#
# What the scheduler of periodic jobs runs (see :mod:`.scheduler`). A slot is taken by inserting
# its row, which the primary key (schedule, slot) lets only one transaction do; the job is
# inserted in the same transaction, through the statement ``dispatch`` uses, so that the slot
# row exists exactly when its job was enqueued.


async def database_now(conn: AsyncConnection) -> datetime:
    """The database's current time (aware UTC): the clock that decides when a slot is due."""
    now: datetime = (await conn.execute(sa.select(db_now()))).scalar_one()
    return now


_SLOT_VALUES = {
    "schedule": sa.bindparam("schedule", type_=sa.String()),
    "slot": sa.bindparam("slot", type_=UTCDateTime()),
    "definition": sa.bindparam("definition", type_=sa.String()),
}
# Inserts the row unless the slot is taken; a transaction taking the same slot at the same
# moment waits for the first, then inserts nothing (MySQL: IGNORE, as it has no ON CONFLICT;
# the values are validated beforehand, so it ignores nothing but the duplicate).
_TAKE_SLOT: dict[str, Any] = {
    "postgresql": postgresql.insert(schedule_slots).values(_SLOT_VALUES).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(schedule_slots).values(_SLOT_VALUES).on_conflict_do_nothing(),
    "mysql": sa.insert(schedule_slots).values(_SLOT_VALUES).prefix_with("IGNORE"),
}


async def enqueue_slot(
    conn: AsyncConnection,
    *,
    schedule: str,
    slot: datetime,
    definition: str,
    queue: str,
    payload: str,
    notify: bool,
    keys: JobKeys = NO_KEYS,
) -> bool:
    """Take ``slot`` of ``schedule`` and insert its job, in one transaction; False (and
    nothing inserted) when the slot was already taken. A job with keys goes through the keyed
    insert: a duplicate of a job holding its unique key takes the slot and inserts nothing."""
    async with conn.begin():
        taken = await conn.execute(
            _TAKE_SLOT[family(conn.dialect.name)],
            {"schedule": schedule, "slot": slot, "definition": definition},
        )
        if taken.rowcount != 1:
            return False
        await insert_one(conn, queue, payload, keys, notify=notify)
    return True


class LatestSlot(NamedTuple):
    """The newest slot taken of a schedule, and the schedule's definition then."""

    slot: datetime
    definition: str


async def latest_slots(conn: AsyncConnection, schedules: Sequence[str]) -> dict[str, LatestSlot]:
    """The newest slot taken of each of ``schedules`` that has one."""
    if not schedules:
        return {}
    newest = (
        sa.select(schedule_slots.c.schedule, sa.func.max(schedule_slots.c.slot).label("slot"))
        .where(schedule_slots.c.schedule.in_(list(schedules)))
        .group_by(schedule_slots.c.schedule)
        .subquery("newest")
    )
    rows = await conn.execute(
        sa.select(
            schedule_slots.c.schedule, schedule_slots.c.slot, schedule_slots.c.definition
        ).join(
            newest,
            sa.and_(
                schedule_slots.c.schedule == newest.c.schedule,
                schedule_slots.c.slot == newest.c.slot,
            ),
        )
    )
    return {row.schedule: LatestSlot(row.slot, row.definition) for row in rows}


_PRUNE_SLOTS = sa.delete(schedule_slots).where(
    schedule_slots.c.schedule == sa.bindparam("name", type_=sa.String()),
    schedule_slots.c.slot < sa.bindparam("newest", type_=UTCDateTime()),
    schedule_slots.c.created_at < db_now_plus(sa.bindparam("age", type_=sa.Float())),
)


async def prune_slots(conn: AsyncConnection, older_than: float) -> None:
    """Delete the slot rows written more than ``older_than`` seconds ago (database clock),
    except each schedule's newest. Two steps rather than one statement with a subquery on the
    same table, which MySQL refuses in a DELETE; a slot taken in between is newer still."""
    newest = sa.select(schedule_slots.c.schedule, sa.func.max(schedule_slots.c.slot)).group_by(
        schedule_slots.c.schedule
    )
    async with conn.begin():
        found = (await conn.execute(newest)).all()
        if found:
            await conn.execute(
                _PRUNE_SLOTS,
                [{"name": name, "newest": slot, "age": -float(older_than)} for name, slot in found],
            )


# ---------------------------------------------------------------------------- control plane
#
# Listing, cancelling and hurrying jobs, pausing queues, and the workers' own rows.


@dataclass(frozen=True, slots=True)
class JobRow:
    """A row of ``jobs`` as operators see it; ``state`` by the database clock."""

    id: int
    queue: str
    payload: str
    state: str
    priority: int
    attempts: int
    available_at: datetime
    created_at: datetime
    reserved_until: datetime | None
    unique_key: str | None
    serial_key: str | None
    cancel_requested: bool


JOB_STATES = ("pending", "delayed", "running")

_STATE = sa.case(
    (jobs.c.reserved_at.isnot(None), sa.literal_column("'running'")),
    (jobs.c.available_at <= db_now(), sa.literal_column("'pending'")),
    else_=sa.literal_column("'delayed'"),
).label("state")
_JOB_COLUMNS = (
    jobs.c.id,
    jobs.c.queue,
    _PAYLOAD_TEXT,
    _STATE,
    jobs.c.priority,
    jobs.c.attempts,
    # A parked serial job's real due time waits in serial_due_at.
    sa.func.coalesce(jobs.c.serial_due_at, jobs.c.available_at).label("available_at"),
    jobs.c.created_at,
    jobs.c.lease_expires_at.label("reserved_until"),
    jobs.c.unique_key,
    jobs.c.serial_key,
    jobs.c.cancel_requested,
)
_STATE_FILTER = {
    "pending": (jobs.c.reserved_at.is_(None), jobs.c.available_at <= db_now()),
    "delayed": (jobs.c.reserved_at.is_(None), jobs.c.available_at > db_now()),
    "running": (jobs.c.reserved_at.isnot(None),),
}


def _job_row(row: sa.Row[Any]) -> JobRow:
    values = row._asdict()
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRow(**values)


def _job_filter(
    queue: str | None, state: str | None, job: str | None, text: str | None
) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if queue is not None:
        where.append(jobs.c.queue == queue)
    if state is not None:
        where.extend(_STATE_FILTER[state])
    if job is not None:
        where.append(jobs.c.payload["job"].as_string() == job)
    if text is not None:
        where.append(sa.cast(jobs.c.payload, sa.Text()).contains(text, autoescape=True))
    return where


async def job_page(
    engine: AsyncEngine,
    *,
    queue: str | None,
    state: str | None,
    job: str | None,
    text: str | None,
    after: int | None,
    limit: int,
) -> tuple[list[JobRow], int | None]:
    """Up to ``limit`` jobs matching the filters with ids above ``after``, by id, and the id to
    pass as ``after`` for the next page (None on the last). A keyset page: it reads the
    primary key from ``after`` on, never rows before it."""
    where = _job_filter(queue, state, job, text)
    if after is not None:
        where.append(jobs.c.id > after)
    stmt = sa.select(*_JOB_COLUMNS).where(*where).order_by(jobs.c.id).limit(limit + 1)
    async with engine.connect() as conn:
        rows = [_job_row(row) for row in await conn.execute(stmt)]
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


async def jobs_by_id(engine: AsyncEngine, ids: Sequence[int]) -> list[JobRow]:
    """The jobs with these ids that exist, by id."""
    found: list[JobRow] = []
    async with engine.connect() as conn:
        for start in range(0, len(ids), _REF_CHUNK):
            chunk = list(ids[start : start + _REF_CHUNK])
            stmt = sa.select(*_JOB_COLUMNS).where(jobs.c.id.in_(chunk)).order_by(jobs.c.id)
            found.extend(_job_row(row) for row in await conn.execute(stmt))
    return sorted(found, key=lambda row: row.id)


async def newest_job_id(engine: AsyncEngine) -> int:
    """The highest id in jobs (0 when empty)."""
    async with engine.connect() as conn:
        newest = (await conn.execute(sa.select(sa.func.max(jobs.c.id)))).scalar_one()
    return int(newest or 0)


async def job_ids_matching(
    engine: AsyncEngine, queue: str, job: str | None, after: int, limit: int
) -> list[int]:
    """Ids above ``after`` of the jobs of ``queue`` (named ``job``), by id, at most ``limit``."""
    stmt = (
        sa.select(jobs.c.id)
        .where(*_job_filter(queue, None, job, None), jobs.c.id > after)
        .order_by(jobs.c.id)
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [int(i) for i in (await conn.execute(stmt)).scalars()]


class CancelOutcome(NamedTuple):
    """What :func:`cancel_jobs` did with each id."""

    deleted: list[int]  # waiting: moved to failed_jobs as cancelled
    stopping: list[int]  # held by a worker: asked to stop
    missing: list[int]  # not in jobs


_CANCEL_TAKEN = (
    jobs.c.id,
    jobs.c.queue,
    _PAYLOAD_TEXT,
    jobs.c.attempts,
    jobs.c.priority,
    jobs.c.serial_key,
)
_REQUEST_CANCEL = sa.update(jobs).values(cancel_requested=True)
_DELETE_JOB_BY_ID = sa.delete(jobs).where(jobs.c.id == sa.bindparam("id", type_=sa.BigInteger()))


_DEADLOCK_TRIES = 3  # an operator's transaction chosen as a deadlock's victim runs again


async def cancel_jobs(
    engine: AsyncEngine,
    ids: Sequence[int],
    *,
    exception: str,
    connection: str,
    all_or_nothing: bool = False,
) -> CancelOutcome:
    """Cancel jobs: waiting ones leave ``jobs`` for ``failed_jobs`` (with ``exception``), in
    one transaction; then those a worker holds get ``cancel_requested``, one row at a time.

    The operator never waits for a row while holding another that a worker may want, so it
    cannot deadlock with one. The first transaction locks only waiting rows, in id order (as
    every other operator does); a worker's statements touch only the rows it holds. A
    worker claiming one of them at the same moment either takes it first (it is then held,
    and flagged next) or finds it gone. Any row still there after the delete is flagged,
    whatever its state, so that a job a worker let go of meanwhile is not missed: a worker
    records a flagged job as cancelled instead of running it.

    With ``all_or_nothing``, if any id is not in ``jobs`` nothing is changed (and only
    ``missing`` is filled in). A job that finishes while it is being cancelled is listed in
    ``missing`` too.
    """
    wanted = sorted(set(ids))
    if all_or_nothing:
        async with engine.connect() as conn:
            present = set(
                (await conn.execute(sa.select(jobs.c.id).where(jobs.c.id.in_(wanted)))).scalars()
            )
        missing = [i for i in wanted if i not in present]
        if missing:
            return CancelOutcome([], [], missing)
    for attempt in range(1, _DEADLOCK_TRIES + 1):
        try:
            taken = await _take_waiting(engine, wanted, exception, connection)
            break
        except sa.exc.DBAPIError as exc:  # a backstop: the lock order above should prevent it
            if attempt == _DEADLOCK_TRIES or not is_deadlock(exc):
                raise
    gone = {int(row.id) for row in taken}
    held: list[int] = []
    async with engine.connect() as conn:
        for job_id in (i for i in wanted if i not in gone):
            async with conn.begin():
                flagged = await conn.execute(_REQUEST_CANCEL.where(jobs.c.id == job_id))
            if flagged.rowcount:
                held.append(job_id)
    missing = [i for i in wanted if i not in gone and i not in held]
    return CancelOutcome(sorted(gone), held, missing)


async def _take_waiting(
    engine: AsyncEngine, wanted: Sequence[int], exception: str, connection: str
) -> list[sa.Row[Any]]:
    """Move the waiting jobs among ``wanted`` to ``failed_jobs``, in one transaction, and
    return them; the next job of a serial key becomes its head."""
    waiting = sa.and_(jobs.c.id.in_(wanted), jobs.c.reserved_at.is_(None))
    async with engine.connect() as conn, conn.begin():
        serial = (
            await conn.execute(
                sa.select(jobs.c.serial_key)
                .where(waiting, jobs.c.serial_key.isnot(None))
                .distinct()
            )
        ).scalars()
        keys = sorted(str(key) for key in serial)
        if keys:
            await _lock_serial(conn, keys)
        if family(engine.dialect.name) == "sqlite":  # one writer: the statement is alone
            taken = list(
                await conn.execute(sa.delete(jobs).where(waiting).returning(*_CANCEL_TAKEN))
            )
        else:
            # Locked in id order, so that two operators take turns instead of deadlocking.
            pick = sa.select(*_CANCEL_TAKEN).where(waiting).order_by(jobs.c.id).with_for_update()
            taken = list((await conn.execute(pick)).all())
            if taken:
                await conn.execute(_DELETE_JOB_BY_ID, [{"id": row.id} for row in taken])
        if taken:
            await conn.execute(
                sa.insert(failed_jobs),
                [
                    {
                        "uuid": str(uuid.uuid4()),
                        "connection": connection,
                        "queue": row.queue,
                        "payload": row.payload,
                        "exception": exception,
                        "attempts": row.attempts,
                        "job_id": row.id,
                        "priority": row.priority,
                    }
                    for row in taken
                ],
            )
            promote = sorted({row.serial_key for row in taken if row.serial_key is not None})
            if promote:
                await _lock_serial(conn, promote)
                await _promote(conn, promote, notify=False)
    return taken


async def run_now(engine: AsyncEngine, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Make these jobs due now, in one transaction: (the ids of waiting jobs made due, the
    ids not in ``jobs``). If any id is missing, nothing is changed. A serial job waiting
    behind its key's head keeps waiting for it, due as soon as it becomes the head."""
    wanted = sorted(set(ids))
    async with engine.begin() as conn:
        present = await conn.execute(
            sa.select(jobs.c.id, jobs.c.reserved_at)
            .where(jobs.c.id.in_(wanted))
            .order_by(jobs.c.id)
            .with_for_update()
        )
        rows = present.all()
        missing = sorted(set(wanted) - {int(row.id) for row in rows})
        if missing:
            return [], missing
        waiting = [int(row.id) for row in rows if row.reserved_at is None]
        if waiting:
            where = (jobs.c.id.in_(waiting), jobs.c.reserved_at.is_(None))
            await conn.execute(
                sa.update(jobs)
                .where(*where, jobs.c.serial_due_at.is_(None), jobs.c.available_at > db_now())
                .values(available_at=db_now())
            )
            await conn.execute(
                sa.update(jobs)
                .where(*where, jobs.c.serial_due_at.isnot(None))
                .values(serial_due_at=db_now())
            )
    return waiting, []


_pg_pause = postgresql.insert(paused_queues).values(queue=sa.bindparam("queue"))
_PAUSE: dict[str, Any] = {
    "postgresql": _pg_pause.on_conflict_do_nothing(),
    "sqlite": sqlite.insert(paused_queues)
    .values(queue=sa.bindparam("queue"))
    .prefix_with("OR IGNORE"),
    "mysql": sa.insert(paused_queues).values(queue=sa.bindparam("queue")).prefix_with("IGNORE"),
}


async def pause_queue(engine: AsyncEngine, queue: str, *, notify: bool) -> bool:
    """Pause ``queue`` (if it is not paused already: returns whether this call paused it); with
    ``notify``, PostgreSQL workers listening hear it at once."""
    async with engine.begin() as conn:
        result = await conn.execute(_PAUSE[family(conn.dialect.name)], {"queue": queue})
        if notify and family(conn.dialect.name) == "postgresql":
            await conn.execute(sa.select(sa.func.pg_notify(CONTROL_CHANNEL, queue)))
    return bool(result.rowcount)


async def resume_queue(engine: AsyncEngine, queue: str, *, notify: bool) -> bool:
    """Resume ``queue``; returns whether it was paused."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.delete(paused_queues).where(paused_queues.c.queue == queue))
        if notify and family(conn.dialect.name) == "postgresql":
            await conn.execute(sa.select(sa.func.pg_notify(CONTROL_CHANNEL, queue)))
    return bool(result.rowcount)


_PAUSED = sa.select(paused_queues.c.queue)


async def paused_queue_names(conn: AsyncConnection | AsyncEngine) -> set[str]:
    """The paused queues (a read of a table that holds a row per paused queue)."""
    if isinstance(conn, AsyncEngine):
        async with conn.connect() as own:
            return await paused_queue_names(own)
    async with conn.begin():  # ended here: the caller's next transaction is its own
        return {str(name) for name in (await conn.execute(_PAUSED)).scalars()}


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A row of ``workers``, whether it is alive (seen within its lease), and the ids of the
    jobs it holds."""

    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    version: str
    started_at: datetime
    last_seen: datetime
    alive: bool
    running: list[int]


async def register_worker(
    conn: AsyncConnection,
    *,
    worker_id: str,
    host: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    version: str,
    lease: float,
) -> None:
    """Insert the worker's row (one autocommit statement)."""
    await conn.execute(
        sa.insert(workers).values(
            id=worker_id,
            host=host,
            pid=pid,
            queues=json.dumps(list(queues), ensure_ascii=False),
            concurrency=concurrency,
            version=version,
            lease=float(lease),
            started_at=db_now(),
            last_seen=db_now(),
        )
    )


_TOUCH = (
    sa.update(workers)
    .where(workers.c.id == sa.bindparam("worker_id", type_=sa.String()))
    .values(last_seen=db_now())
)


async def touch_worker(conn: AsyncConnection, worker_id: str) -> bool:
    """The worker's heartbeat: one statement; False when its row is gone (pruned while the
    worker was silent), for the worker to register again."""
    return bool((await conn.execute(_TOUCH, {"worker_id": worker_id})).rowcount)


async def remove_worker(conn: AsyncConnection, worker_id: str) -> None:
    """Delete the worker's row (it stopped)."""
    await conn.execute(sa.delete(workers).where(workers.c.id == worker_id))


async def prune_workers(conn: AsyncConnection, older_than: float) -> int:
    """Delete the rows of workers silent for more than ``older_than`` seconds."""
    limit = db_now_plus(sa.literal(-float(older_than), sa.Float()))
    result = await conn.execute(sa.delete(workers).where(workers.c.last_seen < limit))
    return int(result.rowcount)


async def worker_rows(engine: AsyncEngine) -> list[WorkerRow]:
    """Every worker row, live ones first (by start), then gone ones (latest seen first)."""
    alive = (seconds_since(workers.c.last_seen) <= workers.c.lease).label("alive")
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(workers, alive))).all()
        held: dict[str, list[int]] = {}
        if rows:
            running = await conn.execute(
                sa.select(jobs.c.worker_id, jobs.c.id)
                .where(
                    jobs.c.reserved_at.isnot(None),
                    jobs.c.lease_expires_at.isnot(None),
                    jobs.c.worker_id.in_([row.id for row in rows]),
                )
                .order_by(jobs.c.id)
            )
            for worker_id, job_id in running:
                held.setdefault(str(worker_id), []).append(int(job_id))
    found = [
        WorkerRow(
            id=row.id,
            host=row.host,
            pid=int(row.pid),
            queues=list(json.loads(row.queues)),
            concurrency=int(row.concurrency),
            version=row.version,
            started_at=row.started_at,
            last_seen=row.last_seen,
            alive=bool(row.alive),
            running=held.get(row.id, []) if row.alive else [],
        )
        for row in rows
    ]
    live = sorted((w for w in found if w.alive), key=lambda w: (w.started_at, w.id))
    gone = sorted((w for w in found if not w.alive), key=lambda w: w.last_seen, reverse=True)
    return live + gone


# schema version


async def stored_revisions(engine: AsyncEngine, tables: Sequence[str]) -> dict[str, list[str]]:
    """The alembic revisions recorded in each of ``tables`` that exists."""
    async with engine.connect() as conn:
        present = await conn.run_sync(
            lambda sync: [name for name in tables if sa.inspect(sync).has_table(name)]
        )
        found: dict[str, list[str]] = {}
        for name in present:
            version = sa.table(name, sa.column("version_num", sa.String()))
            rows = await conn.execute(sa.select(version.c.version_num))
            found[name] = [str(value) for value in rows.scalars()]
        return found


# ------------------------------------------------------------------------------- throughput
#
# Workers count the jobs they finish in memory and add them to ``job_counts`` every few
# seconds; the dashboard's chart reads those rows, never jobs or failed_jobs.


def _add_counts(dialect_name: str, rows: list[dict[str, Any]]) -> Executable:
    values = [{**row, "minute": db_minute()} for row in rows]
    if family(dialect_name) == "mysql":
        insert = mysql.insert(job_counts).values(values)
        upserted: Executable = insert.on_duplicate_key_update(
            succeeded=job_counts.c.succeeded + insert.inserted.succeeded,
            failed=job_counts.c.failed + insert.inserted.failed,
        )
        return upserted
    upsert = (postgresql if dialect_name == "postgresql" else sqlite).insert(job_counts)
    upsert = upsert.values(values)
    added: Executable = upsert.on_conflict_do_update(
        index_elements=[job_counts.c.minute, job_counts.c.queue],
        set_={
            "succeeded": job_counts.c.succeeded + upsert.excluded.succeeded,
            "failed": job_counts.c.failed + upsert.excluded.failed,
        },
    )
    return added


async def record_counts(conn: AsyncConnection, counts: dict[str, tuple[int, int]]) -> None:
    """Add (succeeded, failed) per queue to the current minute's counts: one statement in
    autocommit mode (no transaction held across an await: see :func:`housekeep`)."""
    rows = [
        {"queue": queue, "succeeded": succeeded, "failed": failed}
        for queue, (succeeded, failed) in sorted(counts.items())
    ]
    conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
    # Closed at once: on SQLite a result left open keeps its statement, and with it the write
    # lock, until it is collected, however late that is if job code blocks the loop.
    (await conn.execute(_add_counts(conn.dialect.name, rows))).close()


class MinuteCounts(NamedTuple):
    """Jobs finished in one minute (whole minutes since the Unix epoch)."""

    minute: int
    succeeded: int
    failed: int


async def throughput(
    engine: AsyncEngine, minutes: int, queue: str | None = None
) -> tuple[int, list[MinuteCounts]]:
    """The database's current minute, and the counts of the ``minutes`` up to it that have
    any (of ``queue``), oldest first."""
    where = [] if queue is None else [job_counts.c.queue == queue]
    async with engine.connect() as conn:
        now = int((await conn.execute(sa.select(db_minute()))).scalar_one())
        rows = await conn.execute(
            sa.select(
                job_counts.c.minute,
                sa.func.sum(job_counts.c.succeeded),
                sa.func.sum(job_counts.c.failed),
            )
            .where(job_counts.c.minute > now - minutes, *where)
            .group_by(job_counts.c.minute)
            .order_by(job_counts.c.minute)
        )
        return now, [MinuteCounts(int(m), int(s), int(f)) for m, s, f in rows]
