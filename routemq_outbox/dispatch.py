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

from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from . import sql, tracing
from .ambient import current_session
from .config import DEFAULT_CONNECTION, max_payload_bytes, notify_enabled
from .database import connection_engine, connection_sync_engine
from .errors import MAX_DELAY_SECONDS, InvalidDelay
from .faults import is_deadlock
from .job import Job, check_priority, encode_payload, job_data, validate_queue_name
from .keys import NO_KEYS, JobKeys, job_keys

__all__ = [
    "AsyncTarget",
    "BulkResult",
    "Delay",
    "DispatchResult",
    "Queue",
    "SyncTarget",
    "dispatch",
    "dispatch_sync",
    "insert_payloads",
    "queue",
]

_T = TypeVar("_T")

# A keyed dispatch in a transaction of its own runs it again when InnoDB picks it as a
# deadlock's victim, which happens to one of several transactions waiting for the same key
# when the one holding it rolls back. In the caller's transaction the caller must retry.
_DEADLOCK_TRIES = 3

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


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """What a dispatch of a job with a unique or serial key did: ``id`` is the new job's, or,
    when ``duplicate``, that of the job that holds the unique key (which may have finished
    already, for a key held for a period by ``unique_for``)."""

    id: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What ``queue.bulk`` did with jobs among which some have keys: the positions (0-based,
    in the order given) of the jobs inserted and of the duplicates skipped, and for each
    position the id of its job or of the job holding its key."""

    inserted: tuple[int, ...]
    duplicates: tuple[int, ...]
    ids: tuple[int, ...]


@dataclass(frozen=True)
class _Insert:
    rows: list[tuple[str, str]]
    available: sql.Availability
    keys: list[JobKeys] | None = None  # None: no job has a key
    priorities: list[int] | None = None  # one per row; None: all 0

    def statement(self, dialect_name: str) -> sql.Statement:
        notify = sql.family(dialect_name) == "postgresql" and notify_enabled()
        return sql.insert_jobs(
            dialect_name, self.rows, self.available, notify=notify, priorities=self.priorities
        )

    def steps(self, dialect_name: str) -> Any:
        """The keyed insert: a generator of statements, returning one Inserted per row."""
        assert self.keys is not None
        notify = sql.family(dialect_name) == "postgresql" and notify_enabled()
        serial = [keys.serial_key for keys in self.keys if keys.serial_key is not None]
        if len(set(serial)) > 1:
            yield sql.lock_serial_keys(dialect_name, serial)
        done: list[sql.Inserted] = []
        priorities = self.priorities or [0] * len(self.rows)
        for (queue, payload), keys, priority in zip(self.rows, self.keys, priorities, strict=True):
            inserted = yield from sql.insert_keyed(
                dialect_name, queue, payload, keys, self.available, notify=notify, priority=priority
            )
            done.append(inserted)
        return done


@contextmanager
def _sending(insert: _Insert) -> Iterator[_Insert]:
    """``insert`` in a producer span, with the span's trace context in each payload, when
    tracing is on; as it is otherwise."""
    if not insert.rows or not tracing.enabled():
        yield insert
        return
    with tracing.send_span(insert.rows) as rows:
        yield replace(insert, rows=rows)


def _insert(
    jobs: Iterable[Job],
    queue: str | None,
    delay: Delay | None,
    unique_key: str | None = None,
    serial_key: str | None = None,
    priority: int | None = None,
) -> _Insert:
    """Validate and serialise everything up front: bad input raises before any I/O."""
    if queue is not None:
        validate_queue_name(queue)
    if priority is not None:
        check_priority(priority)
    limit = max_payload_bytes()
    valid: set[str] = set() if queue is None else {queue}
    rows = []
    keys: list[JobKeys] = []
    priorities: list[int] = []
    keyed = False
    for job in jobs:
        payload = encode_payload(job, max_bytes=limit)
        name = queue or job.queue
        if not isinstance(name, str) or name not in valid:  # each distinct name once
            valid.add(validate_queue_name(name))
        rows.append((name, payload))
        priorities.append(job.priority if priority is None else priority)
        found = job_keys(job, job_data, unique_key, serial_key)
        keyed = keyed or found is not NO_KEYS
        keys.append(found)
    ranked = priorities if any(priorities) else None
    return _Insert(rows, _availability(delay), keys if keyed else None, ranked)


async def _drive_async(conn: AsyncConnection, steps: Any) -> list[sql.Inserted]:
    result: list[sql.Inserted] = await sql.run_steps(conn, steps)
    return result


def _drive_sync(conn: sa.Connection, steps: Any) -> Any:
    """Run a keyed insert's statements on ``conn``."""
    try:
        statement = steps.send(None)
        while True:
            statement = steps.send(conn.execute(*statement))
    except StopIteration as done:
        return done.value


async def _keyed_async(
    insert: _Insert, session: AsyncTarget | None, connection: str | None
) -> list[sql.Inserted]:
    async def run(conn: AsyncConnection) -> list[sql.Inserted]:
        return await _drive_async(conn, insert.steps(conn.dialect.name))

    return await _with_async(run, session, connection)


def _keyed_sync(
    insert: _Insert, session: SyncTarget | None, connection: str | None
) -> list[sql.Inserted]:
    def run(conn: sa.Connection) -> list[sql.Inserted]:
        result: list[sql.Inserted] = _drive_sync(conn, insert.steps(conn.dialect.name))
        return result

    return _with_sync(run, session, connection)


def _one(done: list[sql.Inserted]) -> DispatchResult:
    return DispatchResult(done[0].id, done[0].duplicate)


def _bulk(done: list[sql.Inserted]) -> BulkResult:
    return BulkResult(
        tuple(i for i, row in enumerate(done) if not row.duplicate),
        tuple(i for i, row in enumerate(done) if row.duplicate),
        tuple(row.id for row in done),
    )


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
    if session is None and connection is None:
        session = current_session()  # inside ``async with transaction(session):``
    name = _check_connection(session, connection)
    if session is None:
        async with connection_engine(name).begin() as conn:
            return await _execute_async(conn, build)
    if isinstance(session, AsyncSession):
        return await _execute_async(await session.connection(), build)
    if isinstance(session, AsyncConnection):
        return await _execute_async(session, build)
    _refuse_async(session)
    return None


async def _with_async(
    run: Callable[[AsyncConnection], Awaitable[_T]],
    session: AsyncTarget | None,
    connection: str | None,
) -> _T:
    if session is None and connection is None:
        session = current_session()  # inside ``async with transaction(session):``
    name = _check_connection(session, connection)
    if session is None:
        for attempt in range(1, _DEADLOCK_TRIES + 1):
            try:
                async with connection_engine(name).begin() as conn:
                    return await run(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == _DEADLOCK_TRIES or not is_deadlock(exc):
                    raise
    if isinstance(session, AsyncSession):
        return await run(await session.connection())
    if isinstance(session, AsyncConnection):
        return await run(session)
    _refuse_async(session)
    return None


def _refuse_async(session: object) -> NoReturn:
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
    _refuse_sync(session)
    return None


def _with_sync(
    run: Callable[[sa.Connection], _T], session: SyncTarget | None, connection: str | None
) -> _T:
    name = _check_connection(session, connection)
    if session is None:
        for attempt in range(1, _DEADLOCK_TRIES + 1):
            try:
                with connection_sync_engine(name).begin() as conn:
                    return run(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == _DEADLOCK_TRIES or not is_deadlock(exc):
                    raise
    if isinstance(session, Session):
        return run(session.connection())
    if isinstance(session, sa.Connection):
        return run(session)
    _refuse_sync(session)
    return None


def _refuse_sync(session: object) -> NoReturn:
    raise TypeError(
        f"session= takes a Session or Connection, got {type(session).__name__}"
        + ("; await the async call for it" if isinstance(session, AsyncTarget) else "")
    )


def _execute_sync(conn: sa.Connection, build: Callable[[str], sql.Statement]) -> sa.Result[Any]:
    stmt, params = build(conn.dialect.name)
    return conn.execute(stmt, params)


async def _push_async(
    insert: _Insert, session: AsyncTarget | None, connection: str | None
) -> DispatchResult | None:
    with _sending(insert) as insert:
        if insert.keys is not None:
            return _one(await _keyed_async(insert, session, connection))
        await _run_async(insert.statement, session, connection)
    return None


def _push_sync(
    insert: _Insert, session: SyncTarget | None, connection: str | None
) -> DispatchResult | None:
    with _sending(insert) as insert:
        if insert.keys is not None:
            return _one(_keyed_sync(insert, session, connection))
        _run_sync(insert.statement, session, connection)
    return None


class Queue:
    """The queue API (a stateless facade; use the module-level ``queue``)."""

    async def push(
        self,
        job: Job,
        *,
        queue: str | None = None,
        session: AsyncTarget | None = None,
        connection: str | None = None,
        priority: int | None = None,
    ) -> DispatchResult | None:
        """Put ``job`` on ``queue`` (default: the job's own queue), due now. Returns None, or
        for a job with a key, a :class:`DispatchResult`. ``priority`` overrides the job's."""
        insert = _insert([job], queue, None, priority=priority)
        return await _push_async(insert, session, connection)

    async def later(
        self,
        delay: Delay,
        job: Job,
        *,
        queue: str | None = None,
        session: AsyncTarget | None = None,
        connection: str | None = None,
        priority: int | None = None,
    ) -> DispatchResult | None:
        """Put ``job`` on the queue, due after ``delay`` (seconds, timedelta or aware datetime)."""
        insert = _insert([job], queue, delay, priority=priority)
        return await _push_async(insert, session, connection)

    async def bulk(
        self,
        jobs: Iterable[Job],
        *,
        queue: str | None = None,
        delay: Delay | None = None,
        session: AsyncTarget | None = None,
        connection: str | None = None,
        priority: int | None = None,
    ) -> BulkResult | None:
        """Put many jobs on the queue in one statement. All or none are inserted.

        When some of the jobs have unique or serial keys, they are inserted one by one (in
        the same transaction), duplicates are skipped, and a :class:`BulkResult` says which.
        ``priority`` overrides each job's own."""
        with _sending(_insert(jobs, queue, delay, priority=priority)) as insert:
            if insert.keys is not None:
                return _bulk(await _keyed_async(insert, session, connection))
            if insert.rows:
                await _run_async(insert.statement, session, connection)
        return None

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
        priority: int | None = None,
    ) -> DispatchResult | None:
        """:meth:`push` for a blocking ``Session`` / ``Connection``."""
        return _push_sync(_insert([job], queue, None, priority=priority), session, connection)

    def later_sync(
        self,
        delay: Delay,
        job: Job,
        *,
        queue: str | None = None,
        session: SyncTarget | None = None,
        connection: str | None = None,
        priority: int | None = None,
    ) -> DispatchResult | None:
        """:meth:`later` for a blocking ``Session`` / ``Connection``."""
        return _push_sync(_insert([job], queue, delay, priority=priority), session, connection)

    def bulk_sync(
        self,
        jobs: Iterable[Job],
        *,
        queue: str | None = None,
        delay: Delay | None = None,
        session: SyncTarget | None = None,
        connection: str | None = None,
        priority: int | None = None,
    ) -> BulkResult | None:
        """:meth:`bulk` for a blocking ``Session`` / ``Connection``."""
        with _sending(_insert(jobs, queue, delay, priority=priority)) as insert:
            if insert.keys is not None:
                return _bulk(_keyed_sync(insert, session, connection))
            if insert.rows:
                _run_sync(insert.statement, session, connection)
        return None

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
    unique_key: str | None = None,
    serial_key: str | None = None,
    priority: int | None = None,
) -> DispatchResult | None:
    """Put ``job`` on its own queue (``job.queue``), optionally after ``delay``, with the
    job's ``priority`` or the one given (0 to 9; lower runs first).

    Pass ``session=`` to dispatch inside your transaction: the job then exists if and only if
    that transaction commits.

    A job without keys returns None (its insert reads nothing back). One with a unique key
    (its class's ``unique_by``, or ``unique_key=``) or a serial key (``serial_by``, or
    ``serial_key=``) returns a :class:`DispatchResult`: its id, or, if an equal job holds
    the unique key, that job's id with ``duplicate`` True (and nothing inserted).
    """
    insert = _insert([job], None, delay, unique_key, serial_key, priority)
    return await _push_async(insert, session, connection)


def dispatch_sync(
    job: Job,
    *,
    delay: Delay | None = None,
    session: SyncTarget | None = None,
    connection: str | None = None,
    unique_key: str | None = None,
    serial_key: str | None = None,
    priority: int | None = None,
) -> DispatchResult | None:
    """:func:`dispatch` for a blocking ``Session`` / ``Connection``."""
    insert = _insert([job], None, delay, unique_key, serial_key, priority)
    return _push_sync(insert, session, connection)


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
        await _push_async(_Insert(checked, _availability(delay)), session, connection)
