"""Putting jobs on the queue: ``dispatch`` and ``queue.push / later / bulk / size``.

With ``session=`` (an ``AsyncSession`` or ``AsyncConnection``; a ``Session`` or ``Connection``
for the ``*_sync`` twins) the insert joins the caller's transaction and nothing is committed:
the job exists exactly when the caller's transaction commits. Without it, the call commits a
short transaction of its own on the configured database (``connection=`` names which one),
unless it runs inside ``async with transaction(session):``, whose session it then joins.

Every twin validates and serialises through the same code before touching the database, so bad
input raises before anything is sent, and builds its statement with :mod:`routemq_outbox.sql`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from . import sql, tracing
from .ambient import current_session
from .config import DEFAULT_CONNECTION, max_payload_bytes, notify_enabled
from .database import connection_engine, connection_sync_engine
from .errors import MAX_DELAY_SECONDS, InvalidDelay
from .job import Job, encode_payload, validate_queue_name

__all__ = [
    "AsyncTarget",
    "Delay",
    "Queue",
    "SyncTarget",
    "dispatch",
    "dispatch_sync",
    "insert_payloads",
    "queue",
]

Delay = float | int | timedelta | datetime
"""Seconds from now, a timedelta, or a timezone-aware datetime."""

AsyncTarget = AsyncSession | AsyncConnection
SyncTarget = Session | sa.Connection


# Due times outside this range are refused: MariaDB's DATETIME and Python's datetime end
# with the year 9999, and far from now any due time is a mistake (a delay in milliseconds,
# a zero timestamp).
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LONGEST = timedelta(seconds=MAX_DELAY_SECONDS)


def _availability(delay: Delay | None) -> sql.Availability:
    if delay is None:
        return None
    if isinstance(delay, datetime):
        if delay.tzinfo is None or delay.utcoffset() is None:
            raise InvalidDelay(
                f"naive datetime {delay.isoformat()} given as the time to run the job: "
                "pass a timezone-aware datetime (e.g. datetime.now(timezone.utc) + ...)"
            )
        # Aware datetimes compare and subtract by their UTC instants, without the overflow
        # that converting one near the year 1 or 9999 to UTC may raise.
        if delay < _EARLIEST or delay - datetime.now(UTC) > _LONGEST:
            raise InvalidDelay(
                f"the time to run the job must be from 1970-01-01 UTC to 100 years from now, "
                f"got {delay.isoformat()}"
            )
        return delay
    if isinstance(delay, timedelta):
        seconds: float = delay.total_seconds()
    elif isinstance(delay, int | float) and not isinstance(delay, bool):
        seconds = delay
    else:
        raise InvalidDelay(
            f"delay must be seconds, a timedelta or an aware datetime, got {type(delay).__name__}"
        )
    # Comparisons, not float(): NaN fails them, and they do not overflow on a huge int.
    if not 0 <= seconds <= MAX_DELAY_SECONDS:
        raise InvalidDelay(
            f"delay must be a finite number of seconds >= 0 and at most {MAX_DELAY_SECONDS} "
            f"(100 years), got {delay!r}"
        )
    return float(seconds) or None


@dataclass(frozen=True)
class _Insert:
    rows: list[tuple[str, str]]
    available: sql.Availability

    def statement(self, dialect_name: str) -> sql.Statement:
        notify = sql.family(dialect_name) == "postgresql" and notify_enabled()
        return sql.insert_jobs(dialect_name, self.rows, self.available, notify=notify)

    async def put(self, session: AsyncTarget | None, connection: str | None) -> None:
        if session is None and connection is None:
            session = current_session()  # inside ``async with transaction(session):``
        if tracing.enabled():
            with tracing.send_span(self.rows) as rows:
                await _run_async(_Insert(rows, self.available).statement, session, connection)
            return
        await _run_async(self.statement, session, connection)

    def put_sync(self, session: SyncTarget | None, connection: str | None) -> None:
        if tracing.enabled():
            with tracing.send_span(self.rows) as rows:
                _run_sync(_Insert(rows, self.available).statement, session, connection)
            return
        _run_sync(self.statement, session, connection)


def _insert(jobs: Iterable[Job], queue: str | None, delay: Delay | None) -> _Insert:
    """Validate and serialise everything up front: bad input raises before any I/O."""
    if queue is not None:
        validate_queue_name(queue)
    limit = max_payload_bytes()
    valid: set[str] = set() if queue is None else {queue}
    rows = []
    for job in jobs:
        payload = encode_payload(job, max_bytes=limit)
        name = queue or job.queue
        if not isinstance(name, str) or name not in valid:  # each distinct name once
            valid.add(validate_queue_name(name))
        rows.append((name, payload))
    return _Insert(rows, _availability(delay))


def _size(queue: str) -> Callable[[str], sql.Statement]:
    validate_queue_name(queue)
    return lambda dialect_name: (sql.size_statement(queue), {})


def _check_connection(session: object, connection: str | None) -> str:
    if session is not None and connection is not None:
        raise TypeError("pass session= or connection=, not both: a session already has a database")
    return connection or DEFAULT_CONNECTION


async def _run_async(
    build: Callable[[str], sql.Statement], session: AsyncTarget | None, connection: str | None
) -> sa.Result[Any]:
    name = _check_connection(session, connection)
    if session is None:
        async with connection_engine(name).begin() as conn:
            return await _execute_async(conn, build)
    if isinstance(session, AsyncSession):
        return await _execute_async(await session.connection(), build)
    if isinstance(session, AsyncConnection):
        return await _execute_async(session, build)
    raise TypeError(
        f"session= takes an AsyncSession or AsyncConnection, got {type(session).__name__}"
        + ("; use the *_sync twin for it" if isinstance(session, Session | sa.Connection) else "")
    )


async def _execute_async(
    conn: AsyncConnection, build: Callable[[str], sql.Statement]
) -> sa.Result[Any]:
    stmt, params = build(conn.dialect.name)
    return await conn.execute(stmt, params)


def _run_sync(
    build: Callable[[str], sql.Statement], session: SyncTarget | None, connection: str | None
) -> sa.Result[Any]:
    name = _check_connection(session, connection)
    if session is None:
        with connection_sync_engine(name).begin() as conn:
            return _execute_sync(conn, build)
    if isinstance(session, Session):
        return _execute_sync(session.connection(), build)
    if isinstance(session, sa.Connection):
        return _execute_sync(session, build)
    raise TypeError(
        f"session= takes a Session or Connection, got {type(session).__name__}"
        + ("; await the async call for it" if isinstance(session, AsyncTarget) else "")
    )


def _execute_sync(conn: sa.Connection, build: Callable[[str], sql.Statement]) -> sa.Result[Any]:
    stmt, params = build(conn.dialect.name)
    return conn.execute(stmt, params)


class Queue:
    """The queue API (a stateless facade; use the module-level ``queue``)."""

    async def push(
        self,
        job: Job,
        *,
        queue: str | None = None,
        session: AsyncTarget | None = None,
        connection: str | None = None,
    ) -> None:
        """Put ``job`` on ``queue`` (default: the job's own queue), due now."""
        await _insert([job], queue, None).put(session, connection)

    async def later(
        self,
        delay: Delay,
        job: Job,
        *,
        queue: str | None = None,
        session: AsyncTarget | None = None,
        connection: str | None = None,
    ) -> None:
        """Put ``job`` on the queue, due after ``delay`` (seconds, timedelta or aware datetime)."""
        await _insert([job], queue, delay).put(session, connection)

    async def bulk(
        self,
        jobs: Iterable[Job],
        *,
        queue: str | None = None,
        delay: Delay | None = None,
        session: AsyncTarget | None = None,
        connection: str | None = None,
    ) -> None:
        """Put many jobs on the queue in one statement. All or none are inserted."""
        insert = _insert(jobs, queue, delay)
        if insert.rows:
            await insert.put(session, connection)

    async def size(
        self,
        queue: str = "default",
        *,
        session: AsyncTarget | None = None,
        connection: str | None = None,
    ) -> int:
        """Jobs waiting in ``queue``: due or delayed, not counting those being run."""
        return int((await _run_async(_size(queue), session, connection)).scalar_one())

    def push_sync(
        self,
        job: Job,
        *,
        queue: str | None = None,
        session: SyncTarget | None = None,
        connection: str | None = None,
    ) -> None:
        """:meth:`push` for a blocking ``Session`` / ``Connection``."""
        _insert([job], queue, None).put_sync(session, connection)

    def later_sync(
        self,
        delay: Delay,
        job: Job,
        *,
        queue: str | None = None,
        session: SyncTarget | None = None,
        connection: str | None = None,
    ) -> None:
        """:meth:`later` for a blocking ``Session`` / ``Connection``."""
        _insert([job], queue, delay).put_sync(session, connection)

    def bulk_sync(
        self,
        jobs: Iterable[Job],
        *,
        queue: str | None = None,
        delay: Delay | None = None,
        session: SyncTarget | None = None,
        connection: str | None = None,
    ) -> None:
        """:meth:`bulk` for a blocking ``Session`` / ``Connection``."""
        insert = _insert(jobs, queue, delay)
        if insert.rows:
            insert.put_sync(session, connection)

    def size_sync(
        self,
        queue: str = "default",
        *,
        session: SyncTarget | None = None,
        connection: str | None = None,
    ) -> int:
        """:meth:`size` for a blocking ``Session`` / ``Connection``."""
        return int(_run_sync(_size(queue), session, connection).scalar_one())


queue = Queue()


async def dispatch(
    job: Job,
    *,
    delay: Delay | None = None,
    session: AsyncTarget | None = None,
    connection: str | None = None,
) -> None:
    """Put ``job`` on its own queue (``job.queue``), optionally after ``delay``.

    Pass ``session=`` to dispatch inside your transaction: the job then exists if and only if
    that transaction commits.
    """
    await _insert([job], None, delay).put(session, connection)


def dispatch_sync(
    job: Job,
    *,
    delay: Delay | None = None,
    session: SyncTarget | None = None,
    connection: str | None = None,
) -> None:
    """:func:`dispatch` for a blocking ``Session`` / ``Connection``."""
    _insert([job], None, delay).put_sync(session, connection)


async def insert_payloads(
    rows: Iterable[tuple[str, str]],
    *,
    delay: Delay | None = None,
    session: AsyncTarget | None = None,
    connection: str | None = None,
) -> None:
    """Insert payloads already encoded as JSON objects' text, as (queue, payload) pairs, the
    way :func:`dispatch` inserts jobs: for queue drivers that bring their own payload format."""
    checked = [(validate_queue_name(name), payload) for name, payload in rows]
    if checked:
        await _Insert(checked, _availability(delay)).put(session, connection)
