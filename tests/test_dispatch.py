"""Dispatch in the caller's transaction, on every backend: the outbox guarantee itself."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from routemq_outbox import Job, dispatch, dispatch_sync, queue, sql
from routemq_outbox.database import create_engine
from routemq_outbox.errors import (
    DispatchError,
    InvalidDelay,
    InvalidQueueName,
    NotAJob,
    OutboxError,
    PayloadTooLarge,
    UnserializableJob,
)
from routemq_outbox.schema import db_now as now_sql
from routemq_outbox.schema import jobs


class SendNotification(Job):
    job_name = "tests.send_notification"
    queue = "notifications"

    def __init__(self) -> None:
        super().__init__()
        self.user_id: int | None = None
        self.message: str | None = None


def notification(user_id: int = 7, message: str = "shipped") -> SendNotification:
    job = SendNotification()
    job.user_id = user_id
    job.message = message
    return job


orders = sa.table("orders", sa.column("id", sa.Integer), sa.column("total", sa.Integer))


@pytest.fixture
async def business(engine: AsyncEngine) -> None:
    """A business table next to the outbox: totals must be positive."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER CHECK (total > 0))")
        )


def check_violation(engine: AsyncEngine | sa.Engine) -> type[sa.exc.DBAPIError]:
    """What a failed CHECK constraint raises. MariaDB's error 4025 is an OperationalError to
    the PyMySQL family of drivers (asyncmy, aiomysql, PyMySQL), not an IntegrityError."""
    if engine.dialect.name in ("mysql", "mariadb"):
        return sa.exc.OperationalError
    return sa.exc.IntegrityError


async def rows(engine: AsyncEngine) -> list[sa.Row[tuple[object, ...]]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(
                jobs.c.queue,
                sa.cast(jobs.c.payload, sa.Text).label("payload"),
                jobs.c.available_at,
                jobs.c.reserved_at,
                jobs.c.attempts,
            ).order_by(jobs.c.id)
        )
        return list(result.all())


async def db_now(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        value: datetime = (await conn.execute(sa.select(now_sql()))).scalar_one()
    return value


async def order_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one())


# ----------------------------------------------------------------------------- atomicity


async def test_rollback_leaves_no_row_and_commit_leaves_exactly_one(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await dispatch(notification(), session=session)
        assert len(await rows(engine)) == 0  # not visible before commit
        await session.rollback()
    assert await rows(engine) == []

    before = await db_now(engine)
    async with AsyncSession(engine) as session, session.begin():
        await dispatch(notification(), session=session)
    after = await db_now(engine)

    (row,) = await rows(engine)
    assert row.queue == "notifications"
    assert json.loads(row.payload) == {
        "job": "tests.send_notification",
        "data": {"user_id": 7, "message": "shipped"},
    }
    assert before - timedelta(seconds=1) <= row.available_at <= after + timedelta(seconds=1)
    assert row.available_at.tzinfo is not None
    assert row.reserved_at is None
    assert row.attempts == 0


async def test_business_write_and_dispatch_commit_together(
    engine: AsyncEngine, business: None
) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.insert(orders).values(id=1, total=10))
        await queue.push(notification(), session=conn)
    assert await order_count(engine) == 1
    assert len(await rows(engine)) == 1


async def test_failed_business_write_after_dispatch_removes_the_job(
    engine: AsyncEngine, business: None
) -> None:
    with pytest.raises(check_violation(engine)):
        async with AsyncSession(engine) as session, session.begin():
            await dispatch(notification(), session=session)
            await session.execute(sa.insert(orders).values(id=2, total=-5))  # CHECK fails
    assert await order_count(engine) == 0
    assert await rows(engine) == []


async def test_rolled_back_business_write_takes_the_job_with_it(
    engine: AsyncEngine, business: None
) -> None:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        await conn.execute(sa.insert(orders).values(id=3, total=10))
        await queue.bulk([notification(1), notification(2)], session=conn)
        await transaction.rollback()
    assert await order_count(engine) == 0
    assert await rows(engine) == []


def test_sync_twin_is_atomic_with_the_business_write(
    sync_engine: sa.Engine, engine: AsyncEngine, business: None
) -> None:
    with Session(sync_engine) as session, session.begin():
        session.execute(sa.insert(orders).values(id=4, total=10))
        dispatch_sync(notification(), session=session)
        session.rollback()
    with sync_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0

    with pytest.raises(check_violation(sync_engine)), sync_engine.begin() as conn:
        queue.push_sync(notification(), session=conn)
        conn.execute(sa.insert(orders).values(id=5, total=0))
    with sync_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one() == 0

    with Session(sync_engine) as session, session.begin():
        session.execute(sa.insert(orders).values(id=6, total=10))
        dispatch_sync(notification(), session=session)
    with sync_engine.connect() as conn:
        now = conn.execute(sa.select(now_sql())).scalar_one()
        row = conn.execute(sa.select(jobs.c.queue, jobs.c.available_at)).one()
        assert conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one() == 1
    assert row.queue == "notifications"
    assert abs((now - row.available_at).total_seconds()) <= 1


async def test_without_a_session_the_call_commits_its_own_transaction(
    engine: AsyncEngine,
) -> None:
    await dispatch(notification())
    await queue.push(notification(), queue="emails")
    assert [r.queue for r in await rows(engine)] == ["notifications", "emails"]
    assert await queue.size("emails") == 1


def test_sync_twins_without_a_session(sync_engine: sa.Engine) -> None:
    dispatch_sync(notification())
    queue.later_sync(60, notification())
    queue.bulk_sync([notification(1), notification(2)], queue="bulk")
    assert queue.size_sync("notifications") == 2
    assert queue.size_sync("bulk") == 2


async def test_named_connection_selects_another_database(
    engine: AsyncEngine, sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reporting = tmp_path / "reporting.db"
    shutil.copyfile(sqlite_template, reporting)
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL_REPORTING", f"sqlite:///{reporting}")
    await queue.push(notification(), connection="reporting")
    assert await queue.size("notifications", connection="reporting") == 1
    assert await queue.size("notifications") == 0
    with pytest.raises(OutboxError, match="ROUTEMQ_OUTBOX_DATABASE_URL_NOWHERE"):
        await queue.push(notification(), connection="nowhere")


# ----------------------------------------------------------------------------- delays


async def test_later_delays_by_seconds_timedelta_or_until_an_aware_datetime(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await queue.later(90, notification(1), session=conn)
        await queue.later(timedelta(minutes=5), notification(2), session=conn)
        at = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
        await queue.later(at.astimezone(ZoneInfo("Asia/Tokyo")), notification(3), session=conn)
        await dispatch(notification(4), delay=1.5, session=conn)
    now = await db_now(engine)
    first, second, third, fourth = await rows(engine)
    assert abs((first.available_at - now).total_seconds() - 90) <= 1
    assert abs((second.available_at - now).total_seconds() - 300) <= 1
    assert third.available_at == at
    assert abs((fourth.available_at - now).total_seconds() - 1.5) <= 1


async def test_mysql_times_do_not_depend_on_the_session_time_zone(
    mariadb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATETIME(6) columns hold UTC and the library compares them with UTC_TIMESTAMP, so a
    connection whose time zone is far from UTC sees the same due times."""
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", mariadb_url)
    engine = create_engine(mariadb_url, connect_args={"init_command": "SET time_zone = '-09:00'"})
    at = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with engine.begin() as conn:
        assert (await conn.execute(sa.text("SELECT @@time_zone"))).scalar_one() == "-09:00"
        await queue.later(at, notification(1), session=conn)
        await queue.later(3600, notification(2), session=conn)
        await dispatch(notification(3), session=conn)
    first, second, third = await rows(engine)
    assert first.available_at == at
    now = await db_now(engine)
    assert abs((second.available_at - now).total_seconds() - 3600) <= 1
    assert abs((third.available_at - now).total_seconds()) <= 1
    assert abs((now - datetime.now(UTC)).total_seconds()) < 60  # UTC, not 9 hours behind
    async with engine.connect() as conn:
        (claimed,) = await sql.claim(conn, "notifications", 10, 1, 30)
    assert json.loads(claimed.payload)["data"]["user_id"] == 3
    await engine.dispose()


@pytest.mark.parametrize(
    ("delay", "message"),
    [
        (datetime(2031, 1, 1, 12, 0), "naive datetime"),
        (-1, "delay must be a finite number of seconds >= 0"),
        (timedelta(seconds=-5), "delay must be a finite number of seconds >= 0"),
        (float("nan"), "finite"),
        ("10", "got str"),
        (True, "got bool"),
    ],
)
async def test_bad_delays_are_refused(engine: AsyncEngine, delay: object, message: str) -> None:
    with pytest.raises(InvalidDelay, match=message):
        await queue.later(delay, notification())  # type: ignore[arg-type]
    assert await rows(engine) == []


# ----------------------------------------------------------------------------- bulk & size


async def test_bulk_of_ten_thousand_jobs_is_a_constant_number_of_statements(
    engine: AsyncEngine,
) -> None:
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    batch = [notification(i, f"message {i}") for i in range(10_000)]
    async with engine.begin() as conn:
        statements.clear()
        await queue.bulk(batch, queue="fanout", session=conn)
        inserted = len(statements)
    sa.event.remove(engine.sync_engine, "before_cursor_execute", count)

    assert inserted == 1
    assert await queue.size("fanout") == 10_000
    payloads = {json.loads(r.payload)["data"]["user_id"] for r in await rows(engine)}
    assert payloads == set(range(10_000))


async def test_a_bulk_beyond_one_packet_keeps_its_order_and_is_all_or_nothing(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL and MySQL send a bulk as JSON documents of a few MiB each: here, of about
    2 kB."""
    monkeypatch.setattr(sql, "_JSON_CHUNK_BYTES", 2000)
    batch = [notification(i, "x" * 100) for i in range(100)]
    async with engine.connect() as conn:
        transaction = await conn.begin()
        await queue.bulk(batch, session=conn)
        await transaction.rollback()
    assert await rows(engine) == []

    await queue.bulk(batch)
    payloads = [json.loads(r.payload)["data"] for r in await rows(engine)]
    assert [p["user_id"] for p in payloads] == list(range(100))
    assert {p["message"] for p in payloads} == {"x" * 100}


async def test_bulk_of_nothing_touches_nothing(engine: AsyncEngine) -> None:
    await queue.bulk([])
    assert await rows(engine) == []


async def test_bulk_uses_each_jobs_own_queue_unless_told(engine: AsyncEngine) -> None:
    other = notification()
    other.queue = "high-priority"
    await queue.bulk([notification(), other])
    assert sorted(r.queue for r in await rows(engine)) == ["high-priority", "notifications"]


async def test_size_counts_waiting_jobs_but_not_reserved_ones(engine: AsyncEngine) -> None:
    await queue.bulk([notification(i) for i in range(3)], queue="q")
    await queue.later(3600, notification(), queue="q")
    await queue.push(notification(), queue="other")
    async with engine.begin() as conn:
        first = sa.select(jobs.c.id).where(jobs.c.queue == "q").limit(1).scalar_subquery()
        await conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == first)
            .values(reserved_at=now_sql(), token=1, lease_expires_at=now_sql())
        )
    assert await queue.size("q") == 3
    assert await queue.size("other") == 1
    assert await queue.size("missing") == 0


# ----------------------------------------------------------------------------- bad input


class Holder(Job):
    job_name = "tests.holder"

    def __init__(self) -> None:
        super().__init__()
        self.fine = "ok"


@pytest.mark.parametrize(
    ("attribute", "value", "where"),
    [
        ("callback", lambda: None, "attribute 'callback' holds function"),
        ("sock", "socket", "attribute 'sock' holds socket"),
        ("when", datetime(2030, 1, 1, tzinfo=UTC), "attribute 'when' holds datetime"),
        ("nested", {"a": [1, {2, 3}]}, "attribute 'nested' at nested['a'][1] holds set"),
        ("ratio", float("inf"), "attribute 'ratio' holds float inf"),
    ],
)
async def test_unserialisable_attribute_is_named_and_nothing_is_inserted(
    engine: AsyncEngine, attribute: str, value: object, where: str
) -> None:
    good, bad = Holder(), Holder()
    with socket.socket() as sock:
        setattr(bad, attribute, sock if value == "socket" else value)
        with pytest.raises(UnserializableJob, match=where.replace("[", r"\[").replace("]", r"\]")):
            await queue.bulk([good, bad])
        with pytest.raises(TypeError, match=attribute):
            dispatch_sync(bad)
    assert await rows(engine) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("q" * 256, "256 characters long; the limit is 255"),
        (42, "must be a string, got int"),
        (" padded", "starts or ends with whitespace"),
        ("emails ", "starts or ends with whitespace"),
    ],
)
async def test_bad_queue_names_are_refused(engine: AsyncEngine, name: object, message: str) -> None:
    with pytest.raises(InvalidQueueName, match=message):
        await queue.push(notification(), queue=name)  # type: ignore[arg-type]
    job = notification()
    job.queue = name  # type: ignore[assignment]
    with pytest.raises(InvalidQueueName, match=message):
        await dispatch(job)
    assert await rows(engine) == []


async def test_queue_name_of_255_characters_is_fine(engine: AsyncEngine) -> None:
    await queue.push(notification(), queue="q" * 255)
    assert await queue.size("q" * 255) == 1


@pytest.mark.parametrize("thing", [object(), {"job": "x"}, SendNotification])
async def test_non_jobs_are_refused(engine: AsyncEngine, thing: object) -> None:
    with pytest.raises(NotAJob, match=r"expected an instance of a routemq_outbox\.Job subclass"):
        await queue.push(thing)  # type: ignore[arg-type]
    with pytest.raises(NotAJob):
        await queue.bulk([notification(), thing])  # type: ignore[list-item]
    assert await rows(engine) == []


async def test_oversized_payload_is_refused(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES", "1000")
    with pytest.raises(PayloadTooLarge, match="the limit is 1000"):
        await dispatch(notification(message="x" * 2000))
    await dispatch(notification(message="x" * 500))
    assert len(await rows(engine)) == 1


async def test_a_sync_session_given_to_the_async_call_is_explained(
    sync_engine: sa.Engine,
) -> None:
    with Session(sync_engine) as session, pytest.raises(TypeError, match=r"use the \*_sync twin"):
        await dispatch(notification(), session=session)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="session= or connection=, not both"):
        await dispatch(notification(), session=object(), connection="x")  # type: ignore[arg-type]


def test_dispatch_errors_share_the_base() -> None:
    for error in (InvalidDelay, InvalidQueueName, NotAJob, PayloadTooLarge, UnserializableJob):
        assert issubclass(error, DispatchError)
        assert issubclass(error, OutboxError)


async def test_notify_is_opt_in(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Producers send NOTIFY only with ROUTEMQ_OUTBOX_NOTIFY=1 (it serialises their commits)."""
    import asyncpg

    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", pg_url)
    listener = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("routemq_outbox", lambda *args: heard.put_nowait(args[3]))
    try:
        await dispatch(notification())
        await queue.bulk([notification(1), notification(2)], queue="bulk")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(heard.get(), 0.5)
        monkeypatch.setenv("ROUTEMQ_OUTBOX_NOTIFY", "1")
        await dispatch(notification())
        assert await asyncio.wait_for(heard.get(), 5) == "notifications"
        await queue.bulk([notification(1), notification(2)], queue="bulk")
        assert await asyncio.wait_for(heard.get(), 5) == "bulk"
    finally:
        await listener.close()
