"""Every statement routemq-outbox runs, per dialect where they differ. Nothing else builds SQL.

Dispatch statements are *built* here and executed by the caller in its own transaction (async or
sync). Worker operations *run* here, each in one short transaction of their own.

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

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine
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
    the ``pg_notify`` in the same statement, so a dispatch costs one round trip. MySQL and
    MariaDB get ``INSERT … SELECT … FROM JSON_TABLE(…)`` over one JSON array parameter (run
    once per few MiB of rows, to stay within ``max_allowed_packet``): their drivers turn an
    executemany into one multi-row INSERT only when every value is a plain parameter, and
    ``available_at`` comes from the database clock. SQLite, in-process, gets executemany.
    """
    available_at = _available_at(available)
    extra = _available_params(available)
    if family(dialect_name) == "mysql":
        chunks = [{"rows": chunk, **extra} for chunk in _json_chunks(rows)]
        return _insert_from_json(available_at), chunks[0] if len(chunks) == 1 else chunks
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


# The rows of a MySQL dispatch, as a table: position keeps the order of ids.
_JSON_ROWS = sa.text(
    "JSON_TABLE(:rows, '$[*]' COLUMNS (position FOR ORDINALITY, "
    "queue VARCHAR(255) PATH '$[0]', payload LONGTEXT PATH '$[1]')) AS source"
).bindparams(sa.bindparam("rows", type_=sa.Text()))
_JSON_CHUNK_BYTES = 4 * 1024 * 1024  # MariaDB's max_allowed_packet is 16 MiB by default


def _insert_from_json(available_at: sa.ColumnElement[datetime]) -> sa.Insert:
    source = (
        sa.select(
            sa.literal_column("source.queue", sa.String()),
            sa.literal_column("source.payload", sa.Text()),
            available_at,
        )
        .select_from(_JSON_ROWS)
        .order_by(sa.literal_column("source.position"))
    )
    return sa.insert(jobs).from_select(["queue", "payload", "available_at"], source)


def _json_chunks(rows: Sequence[tuple[str, str]]) -> Iterator[str]:
    """``rows`` as JSON arrays of ``[queue, payload]``, each at most a few MiB (one row may
    be larger on its own)."""
    items: list[str] = []
    size = 0
    for row in rows:
        item = json.dumps(row, ensure_ascii=False)
        length = len(item.encode())
        if items and size + length > _JSON_CHUNK_BYTES:
            yield "[" + ",".join(items) + "]"
            items, size = [], 0
        items.append(item)
        size += length + 1
    yield "[" + ",".join(items) + "]"


def size_statement(queue: str) -> sa.Select[Any]:
    """Jobs of ``queue`` waiting to run, due or delayed (not those a worker holds)."""
    return (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.queue == queue, jobs.c.reserved_at.is_(None))
    )


# ----------------------------------------------------------------------------------- worker


@dataclass(frozen=True, slots=True)
class Claimed:
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


def _due(queue: str) -> list[sa.ColumnElement[bool]]:
    return [jobs.c.queue == queue, jobs.c.reserved_at.is_(None), jobs.c.available_at <= db_now()]


def _expired() -> list[sa.ColumnElement[bool]]:
    return [jobs.c.reserved_at.isnot(None), jobs.c.lease_expires_at < db_now()]


def _reserve_values(token: int, lease: float, *, count_attempt: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "reserved_at": db_now(),
        "token": token,
        "lease_expires_at": db_now_plus(sa.literal(float(lease), sa.Float())),
    }
    if count_attempt:
        values["attempts"] = jobs.c.attempts + 1
    return values


async def _reserve(
    engine: AsyncEngine,
    where: list[sa.ColumnElement[bool]],
    order_by: Sequence[sa.ColumnElement[Any]],
    limit: int,
    token: int,
    lease: float,
    *,
    count_attempt: bool,
) -> list[Claimed]:
    values = _reserve_values(token, lease, count_attempt=count_attempt)
    async with engine.begin() as conn:
        kind = family(conn.dialect.name)
        if kind == "mysql":
            # Lock the rows in index order, skipping those another worker is locking, then
            # mark exactly those (already ours) by primary key.
            locked = (
                await conn.execute(
                    sa.select(*_RETURNED)
                    .where(*where)
                    .order_by(*order_by)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not locked:
                return []
            await conn.execute(
                sa.update(jobs).where(jobs.c.id.in_([row.id for row in locked])).values(values)
            )
            bump = 1 if count_attempt else 0
            return [Claimed(r.id, r.queue, r.payload, r.attempts + bump, token) for r in locked]
        picked = sa.select(jobs.c.id).where(*where).order_by(*order_by).limit(limit)
        if kind == "postgresql":
            cte = picked.with_for_update(skip_locked=True).cte("picked")
            stmt = sa.update(jobs).where(jobs.c.id == cte.c.id)
        else:
            stmt = sa.update(jobs).where(jobs.c.id.in_(picked.scalar_subquery()))
        rows = (await conn.execute(stmt.values(values).returning(*_RETURNED))).all()
        return [Claimed(r.id, r.queue, r.payload, r.attempts, token) for r in rows]


async def claim(
    engine: AsyncEngine, queue: str, limit: int, token: int, lease: float
) -> list[Claimed]:
    """Reserve up to ``limit`` due jobs of ``queue``, oldest ``available_at`` first."""
    return await _reserve(
        engine,
        _due(queue),
        (jobs.c.available_at, jobs.c.id),
        limit,
        token,
        lease,
        count_attempt=True,
    )


async def rescue_expired(
    engine: AsyncEngine, limit: int, token: int, lease: float
) -> list[Claimed]:
    """Take over up to ``limit`` jobs whose worker stopped heartbeating (attempts unchanged).

    The caller decides, job by job, to put each back to pending or to fail it.
    """
    return await _reserve(
        engine,
        _expired(),
        (jobs.c.lease_expires_at, jobs.c.id),
        limit,
        token,
        lease,
        count_attempt=False,
    )


def _held(dialect_name: str, pairs: Sequence[tuple[int, int]]) -> sa.ColumnElement[bool]:
    held = sa.tuple_(jobs.c.id, jobs.c.token).in_(list(pairs))
    if family(dialect_name) == "mysql":
        # A plain `id IN` as well makes sure, on every MySQL and MariaDB version, that the
        # statement reads (and locks) only the rows it names, by primary key: when the
        # optimiser turns an IN list of row values into key ranges varies between versions.
        return sa.and_(jobs.c.id.in_([job_id for job_id, _ in pairs]), held)
    return held


async def finish(engine: AsyncEngine, pairs: Sequence[tuple[int, int]]) -> int:
    """Delete finished jobs given as (id, token); returns how many this worker still held."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.delete(jobs).where(_held(conn.dialect.name, pairs)))
    return int(result.rowcount)


async def extend_leases(engine: AsyncEngine, pairs: Sequence[tuple[int, int]], lease: float) -> int:
    """Push the lease of held jobs ``lease`` seconds past now; returns how many are still held."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(jobs)
            .where(_held(conn.dialect.name, pairs))
            .values(lease_expires_at=db_now_plus(sa.literal(float(lease), sa.Float())))
        )
    return int(result.rowcount)


async def release(
    engine: AsyncEngine,
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
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(jobs).where(_held(conn.dialect.name, pairs)).values(values)
        )
    return int(result.rowcount)


async def move_to_failed(engine: AsyncEngine, token: int, record: FailedRecord) -> bool:
    """Delete the held job and insert it into failed_jobs, in one transaction.

    Returns False (and changes nothing) when the worker no longer holds the job.
    """
    async with engine.begin() as conn:
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
