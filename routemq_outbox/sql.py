"""Every statement routemq-outbox runs, per dialect where they differ. Nothing else builds SQL.

Dispatch statements are *built* here and executed by the caller in its own transaction (async or
sync). Worker operations *run* here, each in one short transaction of their own on the
connection the worker passes: for the hot ones (claim, finish) a connection it keeps, which on
PostgreSQL is in autocommit mode so that a one-statement transaction costs one round trip.

Claiming follows "The life of a job": on PostgreSQL one statement locks due rows with
``FOR UPDATE SKIP LOCKED`` in a CTE (which the planner cannot flatten, so the ``LIMIT`` holds)
and marks them in the same statement; SQLite, which has one writer at a time, uses
``UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING``; MySQL/MariaDB lock with
``SELECT … FOR UPDATE SKIP LOCKED`` then ``UPDATE`` in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from .schema import Payload, UTCDateTime, db_now, db_now_plus, failed_jobs, jobs

__all__ = [
    "NOTIFY_CHANNEL",
    "Claimed",
    "FailedRecord",
    "claim",
    "extend_leases",
    "family",
    "finish",
    "insert_jobs",
    "move_to_failed",
    "release",
    "rescue_expired",
    "size_statement",
]

NOTIFY_CHANNEL = "routemq_outbox"

Availability = float | datetime | None
"""When inserted jobs become due: ``None`` now, seconds from now, or an aware datetime."""

Statement = tuple[Executable, dict[str, Any] | list[dict[str, Any]]]


def family(dialect_name: str) -> str:
    """``postgresql``, ``sqlite`` or ``mysql`` (MariaDB's dialect is called ``mariadb``)."""
    return "mysql" if dialect_name == "mariadb" else dialect_name


# --------------------------------------------------------------------------------- dispatch


def _available_at(available: Availability) -> sa.ColumnElement[datetime]:
    if available is None:
        return db_now()
    if isinstance(available, datetime):
        return sa.bindparam("available_at", type_=UTCDateTime())
    return db_now_plus(sa.bindparam("delay", type_=sa.Float()))


def _available_params(available: Availability) -> dict[str, Any]:
    if available is None:
        return {}
    if isinstance(available, datetime):
        return {"available_at": available}
    return {"delay": float(available)}


def _notify_after(inserted: sa.CTE) -> sa.Select[Any]:
    queues = sa.select(inserted.c.queue).distinct().subquery("queues")
    return sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, queues.c.queue)).select_from(queues)


def insert_jobs(
    dialect_name: str,
    rows: Sequence[tuple[str, str]],
    available: Availability,
    *,
    notify: bool,
) -> Statement:
    """One statement inserting ``rows`` of (queue, payload JSON text), whatever their number.

    PostgreSQL gets ``INSERT … SELECT … FROM unnest(…)`` for many rows, and (with ``notify``)
    the ``pg_notify`` in the same statement, so a dispatch costs one round trip. Elsewhere the
    driver's executemany runs the single-row statement for every row.
    """
    available_at = _available_at(available)
    extra = _available_params(available)
    if family(dialect_name) == "postgresql":
        if len(rows) == 1:
            stmt: Any = sa.insert(jobs).values(
                queue=sa.bindparam("queue", type_=sa.String()),
                payload=sa.bindparam("payload", type_=Payload()),
                available_at=available_at,
            )
            params: dict[str, Any] = {"queue": rows[0][0], "payload": rows[0][1], **extra}
        else:
            source = (
                sa.func.unnest(
                    sa.bindparam("queues", type_=postgresql.ARRAY(sa.String())),
                    sa.bindparam("payloads", type_=postgresql.ARRAY(Payload())),
                )
                .table_valued("queue", "payload")
                .render_derived(name="source")
            )
            stmt = sa.insert(jobs).from_select(
                ["queue", "payload", "available_at"],
                sa.select(source.c.queue, source.c.payload, available_at),
            )
            params = {
                "queues": [queue for queue, _ in rows],
                "payloads": [payload for _, payload in rows],
                **extra,
            }
        if notify:
            stmt = _notify_after(stmt.returning(jobs.c.queue).cte("inserted"))
        return stmt, params
    single = sa.insert(jobs).values(
        queue=sa.bindparam("queue", type_=sa.String()),
        payload=sa.bindparam("payload", type_=Payload()),
        available_at=available_at,
    )
    many = [{"queue": queue, "payload": payload, **extra} for queue, payload in rows]
    return single, many[0] if len(many) == 1 else many


def size_statement(queue: str) -> sa.Select[Any]:
    """Jobs of ``queue`` waiting to run, due or delayed (not those a worker holds)."""
    return (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.queue == queue, jobs.c.reserved_at.is_(None))
    )


# ----------------------------------------------------------------------------------- worker


class Claimed(NamedTuple):
    """A job row a worker now holds under ``token``; ``attempts`` counts this attempt."""

    id: int
    queue: str
    payload: str
    attempts: int
    token: int


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


_PAYLOAD_TEXT = sa.cast(jobs.c.payload, sa.Text()).label("payload")
_RETURNED = (jobs.c.id, jobs.c.queue, _PAYLOAD_TEXT, jobs.c.attempts)
_LIMIT = sa.bindparam("limit", type_=sa.Integer())
_RESERVE = {
    "reserved_at": db_now(),
    "token": sa.bindparam("new_token", type_=sa.BigInteger()),
    "lease_expires_at": db_now_plus(sa.bindparam("lease", type_=sa.Float())),
}


class _Reservation(NamedTuple):
    """The statements of one way of reserving rows, built once: the worker runs them
    thousands of times a second, and building SQLAlchemy constructs is not free."""

    lock: sa.Select[Any]  # MySQL: lock the rows (then ``mark`` them)
    mark: sa.Update  # MySQL: by expanding ``ids``
    reserve: sa.Update  # elsewhere: pick and mark in one statement, RETURNING the rows


def _reservation(
    where: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[sa.ColumnElement[Any]],
    *,
    count_attempt: bool,
) -> dict[str, _Reservation]:
    values = dict(_RESERVE)
    if count_attempt:
        values["attempts"] = jobs.c.attempts + 1
    picked = sa.select(jobs.c.id).where(*where).order_by(*order_by).limit(_LIMIT)
    cte = picked.with_for_update(skip_locked=True).cte("picked")
    lock = sa.select(*_RETURNED).where(*where).order_by(*order_by).limit(_LIMIT)
    mark = sa.update(jobs).where(jobs.c.id.in_(sa.bindparam("ids", expanding=True))).values(values)
    return {
        "postgresql": _Reservation(
            lock,
            mark,
            sa.update(jobs).where(jobs.c.id == cte.c.id).values(values).returning(*_RETURNED),
        ),
        "sqlite": _Reservation(
            lock,
            mark,
            sa.update(jobs)
            .where(jobs.c.id.in_(picked.scalar_subquery()))
            .values(values)
            .returning(*_RETURNED),
        ),
        "mysql": _Reservation(lock.with_for_update(skip_locked=True), mark, mark),
    }


_CLAIM = _reservation(
    [
        jobs.c.queue == sa.bindparam("queue_name", type_=sa.String()),
        jobs.c.reserved_at.is_(None),
        jobs.c.available_at <= db_now(),
    ],
    (jobs.c.available_at, jobs.c.id),
    count_attempt=True,
)
_RESCUE = _reservation(
    [jobs.c.reserved_at.isnot(None), jobs.c.lease_expires_at < db_now()],
    (jobs.c.lease_expires_at, jobs.c.id),
    count_attempt=False,
)


async def _reserve(
    conn: AsyncConnection,
    statements: dict[str, _Reservation],
    params: dict[str, Any],
    *,
    count_attempt: bool,
) -> list[Claimed]:
    token = params["new_token"]
    kind = family(conn.dialect.name)
    async with conn.begin():
        if kind == "mysql":
            reservation = statements[kind]
            locked = (await conn.execute(reservation.lock, params)).all()
            if not locked:
                return []
            await conn.execute(reservation.mark, {**params, "ids": [row[0] for row in locked]})
            bump = 1 if count_attempt else 0
            return [Claimed(i, q, p, a + bump, token) for i, q, p, a in locked]
        rows = (await conn.execute(statements[kind].reserve, params)).all()
        return [Claimed(i, q, p, a, token) for i, q, p, a in rows]


async def claim(
    conn: AsyncConnection, queue: str, limit: int, token: int, lease: float
) -> list[Claimed]:
    """Reserve up to ``limit`` due jobs of ``queue``, oldest ``available_at`` first."""
    params = {"queue_name": queue, "limit": limit, "new_token": token, "lease": float(lease)}
    return await _reserve(conn, _CLAIM, params, count_attempt=True)


async def rescue_expired(
    conn: AsyncConnection, limit: int, token: int, lease: float
) -> list[Claimed]:
    """Take over up to ``limit`` jobs whose worker stopped heartbeating (attempts unchanged).

    The caller decides, job by job, to put each back to pending or to fail it.
    """
    params = {"limit": limit, "new_token": token, "lease": float(lease)}
    return await _reserve(conn, _RESCUE, params, count_attempt=False)


def _held(pairs: Sequence[tuple[int, int]]) -> sa.ColumnElement[bool]:
    return sa.tuple_(jobs.c.id, jobs.c.token).in_(list(pairs))


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


async def finish(conn: AsyncConnection, pairs: Sequence[tuple[int, int]]) -> int:
    """Delete finished jobs given as (id, token); returns how many this worker still held."""
    async with conn.begin():
        if family(conn.dialect.name) == "postgresql":
            ids, tokens = zip(*pairs, strict=True)
            result = await conn.execute(_FINISH_POSTGRESQL, {"ids": ids, "tokens": tokens})
        else:
            result = await conn.execute(sa.delete(jobs).where(_held(pairs)))
    return int(result.rowcount)


async def extend_leases(
    conn: AsyncConnection, pairs: Sequence[tuple[int, int]], lease: float
) -> int:
    """Push the lease of held jobs ``lease`` seconds past now; returns how many are still held."""
    async with conn.begin():
        result = await conn.execute(
            sa.update(jobs)
            .where(_held(pairs))
            .values(lease_expires_at=db_now_plus(sa.literal(float(lease), sa.Float())))
        )
    return int(result.rowcount)


async def release(
    conn: AsyncConnection,
    pairs: Sequence[tuple[int, int]],
    *,
    delay: float | None,
    refund_attempt: bool = False,
) -> int:
    """Return held jobs to pending.

    ``delay`` seconds from now sets ``available_at`` (``None`` keeps it); ``refund_attempt``
    takes back the attempt the claim counted (used at shutdown, for jobs that never finished).
    """
    values: dict[str, Any] = {"reserved_at": None, "token": None, "lease_expires_at": None}
    if delay is not None:
        values["available_at"] = db_now_plus(sa.literal(float(delay), sa.Float()))
    if refund_attempt:
        values["attempts"] = sa.case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0)
    async with conn.begin():
        result = await conn.execute(sa.update(jobs).where(_held(pairs)).values(values))
    return int(result.rowcount)


async def move_to_failed(conn: AsyncConnection, token: int, record: FailedRecord) -> bool:
    """Delete the held job and insert it into failed_jobs, in one transaction (``conn`` must not
    be in autocommit mode).

    Returns False (and changes nothing) when the worker no longer holds the job.
    """
    async with conn.begin():
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
            )
        )
    return True
