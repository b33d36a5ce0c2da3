"""Unique jobs and serial keys, on every engine."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, Worker, WorkerSettings, dispatch, dispatch_sync, queue, sql
from routemq_outbox.admin import retry_failed
from routemq_outbox.database import create_engine
from routemq_outbox.dispatch import BulkResult, DispatchResult
from routemq_outbox.errors import InvalidJobKey, JobDefinitionError
from routemq_outbox.schema import PARKED_AT, failed_jobs, jobs, serial_keys, unique_windows

from . import jobs as test_jobs
from .conftest import DB_URL_FIXTURES


@pytest.fixture(autouse=True)
def _job_log(request: pytest.FixtureRequest) -> None:
    if "engine" in request.fixturenames:
        request.getfixturevalue("log_table")


def unique(account: int | str, key: str = "", cls: type[test_jobs.UniqueSync] | None = None) -> Any:
    job = (cls or test_jobs.UniqueSync)()
    job.account_id = account
    job.key = key or f"u-{account}"
    return job


def ledger(account: str, key: str, seconds: float = 0.0, failures: int = 0) -> test_jobs.Ledger:
    job = test_jobs.Ledger()
    job.account, job.key, job.seconds, job.failures = account, key, seconds, failures
    return job


async def rows(engine: AsyncEngine, *columns: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(*columns).order_by(jobs.c.id))).all())


async def count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def log(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(test_jobs.log_table).order_by(test_jobs.log_table.c.at)
        )
        return list(result.all())


async def drain(url: str, **overrides: Any) -> Worker:
    options: dict[str, Any] = {"database_url": url, "sleep": 0.05, "stop_when_empty": True}
    options.update(overrides)
    worker = Worker(WorkerSettings(**options))
    await asyncio.wait_for(worker.run(), 60)
    return worker


# ------------------------------------------------------------------------------ unique jobs


async def test_a_unique_dispatch_reports_the_holder_and_plain_dispatch_returns_nothing(
    engine: AsyncEngine,
) -> None:
    first = await dispatch(unique(7))
    again = await dispatch(unique(7, "again"))
    other = await dispatch(unique(8))
    assert isinstance(first, DispatchResult)
    assert not first.duplicate
    assert again == DispatchResult(first.id, True)
    assert other is not None
    assert not other.duplicate
    assert other.id != first.id
    assert await dispatch(test_jobs.Record()) is None
    # An explicit key overrides the class's; the same text is the same key.
    by_hand = await dispatch(unique(9), unique_key="account-9")
    assert by_hand is not None
    assert not by_hand.duplicate
    assert await dispatch(unique(10), unique_key="account-9") == DispatchResult(by_hand.id, True)
    stored = await rows(engine, jobs.c.id, jobs.c.unique_key)
    assert [key for _, key in stored] == [
        'q:["tests.unique_sync",[7]]',
        'q:["tests.unique_sync",[8]]',
        None,
        "q:account-9",
    ]


async def test_the_sync_twin_and_queue_push_honour_unique_keys(engine: AsyncEngine) -> None:
    first = dispatch_sync(unique("a"))
    assert first is not None
    assert not first.duplicate
    assert dispatch_sync(unique("a")) == DispatchResult(first.id, True)
    assert await queue.push(unique("a")) == DispatchResult(first.id, True)
    assert await queue.later(5, unique("a")) == DispatchResult(first.id, True)
    assert await count(engine, jobs) == 1


async def test_a_rolled_back_dispatch_frees_its_key(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        inside = await dispatch(unique(1), session=conn)
        assert inside is not None
        assert not inside.duplicate
        await transaction.rollback()
    after = await dispatch(unique(1))
    assert after is not None
    assert not after.duplicate
    assert await count(engine, jobs) == 1


@pytest.mark.parametrize(("cls", "while_running"), [("UniqueSync", False), ("UniqueActive", True)])
async def test_a_key_is_held_while_queued_or_active(
    engine: AsyncEngine, cls: str, while_running: bool
) -> None:
    job_class = getattr(test_jobs, cls)
    first = await dispatch(unique(1, cls=job_class))
    assert first is not None
    async with engine.connect() as conn:
        (claimed,) = await sql.claim(conn, "default", 10, 1, 60.0)
    running = await dispatch(unique(1, cls=job_class))
    assert running is not None
    assert running.duplicate is while_running
    if while_running:
        assert running.id == first.id
        async with engine.connect() as conn:
            assert await sql.finish(conn, [(claimed.id, claimed.token)]) == 1
        finished = await dispatch(unique(1, cls=job_class))
        assert finished is not None
        assert not finished.duplicate


async def test_a_unique_period_outlives_the_job_and_expires(
    engine: AsyncEngine, db_url: str
) -> None:
    first = await dispatch(unique(1, cls=test_jobs.UniqueWindow))
    assert first is not None
    assert not first.duplicate
    await drain(db_url)
    assert await count(engine, jobs) == 0
    # The job ran and left; its key stays taken for the period.
    assert await dispatch(unique(1, cls=test_jobs.UniqueWindow)) == DispatchResult(first.id, True)
    assert await count(engine, jobs) == 0
    await asyncio.sleep(1.1)
    async with engine.connect() as conn:
        assert (await sql.housekeep(conn)).expired_windows == 1
    assert await count(engine, unique_windows) == 0
    again = await dispatch(unique(1, cls=test_jobs.UniqueWindow))
    assert again is not None
    assert not again.duplicate
    # An expired period that no worker pruned yet is taken over by the next dispatch.
    await drain(db_url)
    await asyncio.sleep(1.1)
    third = await dispatch(unique(1, cls=test_jobs.UniqueWindow))
    assert third is not None
    assert not third.duplicate
    assert third.id != again.id


async def test_bulk_skips_duplicates_within_the_batch_and_against_the_table(
    engine: AsyncEngine,
) -> None:
    held = await dispatch(unique(1))
    assert held is not None
    plain = test_jobs.Record()
    result = await queue.bulk([unique(1), unique(2), unique(2), plain, unique(3)])
    assert isinstance(result, BulkResult)
    assert result.inserted == (1, 3, 4)
    assert result.duplicates == (0, 2)
    assert result.ids[0] == held.id
    assert result.ids[2] == result.ids[1]
    assert await count(engine, jobs) == 4
    assert await queue.bulk([test_jobs.Record(), test_jobs.Record()]) is None
    sync = queue.bulk_sync([unique(2), unique(5)])
    assert sync is not None
    assert sync.inserted == (1,)
    assert sync.duplicates == (0,)


async def _hold_then(engine: AsyncEngine, gate: asyncio.Event, commit: bool) -> DispatchResult:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        result = await dispatch(unique("same"), session=conn)
        assert result is not None
        gate.set()
        await asyncio.sleep(0.5)  # the others are waiting at the index meanwhile
        await (transaction.commit() if commit else transaction.rollback())
        return result


async def _compete() -> DispatchResult:
    # In a transaction of its own: on MariaDB, when the holder rolls back, InnoDB may choose
    # one of the waiting transactions as a deadlock victim, which dispatch then runs again.
    result = await dispatch(unique("same"))
    assert result is not None
    return result


@pytest.mark.parametrize("holder_commits", [True, False])
async def test_concurrent_transactions_dispatching_one_key_insert_exactly_one_row(
    engine: AsyncEngine, holder_commits: bool
) -> None:
    gate = asyncio.Event()
    holder = asyncio.create_task(_hold_then(engine, gate, holder_commits))
    await gate.wait()
    others = await asyncio.gather(*(_compete() for _ in range(7)))
    first = await holder
    (row,) = await rows(engine, jobs.c.id)
    inserted = [result for result in others if not result.duplicate]
    if holder_commits:
        assert not first.duplicate
        assert first.id == row.id
        assert not inserted
    else:
        assert len(inserted) == 1
        assert inserted[0].id == row.id
    assert all(result.id == row.id for result in others)


# ------------------------------------------------------------------------------ retries


async def test_a_worker_retry_keeps_an_active_key_and_a_queued_one_is_free(
    engine: AsyncEngine, db_url: str
) -> None:
    active = unique(1, "active", test_jobs.UniqueActive)
    active.fail_first = True
    queued = unique(1, "queued")
    queued.fail_first = True
    await dispatch(active)
    await dispatch(queued)
    async with engine.connect() as conn:
        claimed = await sql.claim(conn, "default", 10, 1, 60.0)
        # The first attempts failed: back to pending, each row kept.
        assert await sql.release(conn, [(c.id, c.token) for c in claimed], delay=0) == 2
    assert (await dispatch(unique(1, cls=test_jobs.UniqueActive))) == DispatchResult(
        claimed[0].id, True
    )
    again = await dispatch(unique(1, "queued-again"))
    assert again is not None
    assert not again.duplicate
    await drain(db_url)
    assert await count(engine, jobs) == 0
    assert await count(engine, failed_jobs) == 0


async def test_a_rescued_unique_job_keeps_its_row_and_key(engine: AsyncEngine, db_url: str) -> None:
    first = await dispatch(unique(1, "rescued", test_jobs.UniqueActive))
    assert first is not None
    async with engine.connect() as conn:
        await sql.claim(conn, "default", 10, 1, 0.05)  # a worker that then died
    await asyncio.sleep(0.2)
    assert await dispatch(unique(1, cls=test_jobs.UniqueActive)) == DispatchResult(first.id, True)
    await drain(db_url)
    assert [row.job_key for row in await log(engine)] == ["rescued"]
    assert await count(engine, failed_jobs) == 0


async def test_failed_retry_brings_a_unique_job_back_without_its_key(
    engine: AsyncEngine, db_url: str
) -> None:
    job = unique(1, "fails", test_jobs.UniqueActive)
    await dispatch(job)
    async with engine.connect() as conn:
        (claimed,) = await sql.claim(conn, "default", 10, 1, 60.0)
        record = sql.FailedRecord(
            "u-1", "default", "default", claimed.payload, "boom", 1, claimed.id
        )
        assert await sql.move_to_failed(conn, claimed.token, record)
    holder = await dispatch(unique(1, "holder", test_jobs.UniqueActive))
    assert holder is not None
    assert not holder.duplicate
    async with engine.connect() as conn:
        (failed_id,) = (await conn.execute(sa.select(failed_jobs.c.id))).scalars()
    assert await retry_failed(engine, [failed_id]) == 1
    keys = [row.unique_key for row in await rows(engine, jobs.c.unique_key)]
    assert keys == ['a:["tests.unique_active",[1]]', None]
    await drain(db_url)
    assert sorted(row.job_key for row in await log(engine)) == ["fails", "holder"]


# ------------------------------------------------------------------------------ bad input


class NotUnique(Job):
    job_name = "tests.keys.not_unique"

    def __init__(self) -> None:
        super().__init__()
        self.account_id: Any = 1

    async def handle(self) -> None:
        pass


class UniqueByMissing(NotUnique):
    job_name = "tests.keys.missing"
    unique_by = ("account",)


class UniqueByValue(NotUnique):
    job_name = "tests.keys.value"
    unique_by = ("account_id",)


@pytest.mark.parametrize(
    ("job", "options", "message"),
    [
        (NotUnique(), {"unique_key": ""}, "unique_key must not be empty"),
        (NotUnique(), {"serial_key": "x" * 256}, "256 characters long; the limit is 255"),
        (NotUnique(), {"unique_key": 42}, "unique_key must be a string, got int"),
        (UniqueByMissing(), {}, "names 'account', which this job has no data attribute"),
    ],
)
async def test_a_bad_key_is_refused_and_nothing_is_inserted(
    engine: AsyncEngine, job: Job, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidJobKey, match=message):
        await dispatch(job, **options)
    assert await count(engine, jobs) == 0


@pytest.mark.parametrize("value", [1.5, None, True, [1]])
async def test_a_key_value_must_be_a_str_or_an_int(engine: AsyncEngine, value: object) -> None:
    job = UniqueByValue()
    job.account_id = value
    with pytest.raises(InvalidJobKey, match="must be a str or int, got"):
        await queue.bulk([UniqueByValue(), job])
    assert await count(engine, jobs) == 0


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"unique_by": "account"}, "unique_by must be a tuple of attribute names"),
        ({"serial_by": ()}, "serial_by must name at least one attribute"),
        ({"unique_while": "running"}, "unique_while must be 'queued' or 'active'"),
        ({"unique_for": 0}, "unique_for must be None, or seconds or a timedelta > 0"),
        ({"unique_for": timedelta(days=-1)}, "unique_for must be None"),
    ],
)
def test_bad_key_settings_are_refused_when_the_class_is_defined(
    attributes: dict[str, Any], message: str
) -> None:
    with pytest.raises(JobDefinitionError, match=message):
        type("Bad", (Job,), {"job_name": "tests.keys.bad", **attributes})


# ------------------------------------------------------------------------------ serial keys


async def test_only_the_head_of_a_serial_key_is_due(engine: AsyncEngine) -> None:
    for i in range(3):
        result = await dispatch(ledger("a", f"a{i}"))
        assert result is not None
        assert not result.duplicate
    await dispatch(ledger("b", "b0"))
    await dispatch(test_jobs.Record(), serial_key="a")  # an explicit key is its own key
    found = await rows(engine, jobs.c.serial_key, jobs.c.available_at, jobs.c.serial_due_at)
    parked = [row.available_at == PARKED_AT for row in found]
    assert parked == [False, True, True, False, False]
    assert all(
        (row.serial_due_at is None) != is_parked
        for row, is_parked in zip(found, parked, strict=False)
    )
    assert await count(engine, serial_keys) == 3


async def test_serial_jobs_run_one_at_a_time_in_dispatch_order(
    engine: AsyncEngine, db_url: str
) -> None:
    for i in range(6):
        await dispatch(ledger("a", f"a{i}", seconds=0.05))
        await dispatch(ledger("b", f"b{i}", seconds=0.05))
    await drain(db_url, concurrency=10)
    assert_serial(await log(engine), {"a": 6, "b": 6})


def assert_serial(entries: list[Any], expected: dict[str, int]) -> None:
    """Per key: runs in order of their number, none starting before the previous ended."""
    for key, number in expected.items():
        mine = [row for row in entries if row.job_key.startswith(key)]
        ends = [row for row in mine if row.event == "end"]
        assert len(ends) >= number
        for earlier, later in itertools.pairwise(mine):
            if earlier.event == "start":
                assert (later.event, later.job_key) == ("end", earlier.job_key), mine
        finished: list[str] = []
        for row in ends:
            if not finished or finished[-1] != row.job_key:
                finished.append(row.job_key)
        assert finished == [f"{key}{i}" for i in range(number)], finished


async def test_a_retried_head_blocks_its_key_until_it_succeeds(
    engine: AsyncEngine, db_url: str
) -> None:
    await dispatch(ledger("a", "a0", failures=1))
    await dispatch(ledger("a", "a1"))
    await drain(db_url)
    entries = [(row.job_key, row.event, row.attempt) for row in await log(engine)]
    assert entries == [
        ("a0", "start", 1),
        ("a0", "end", 1),
        ("a0", "start", 2),
        ("a0", "end", 2),
        ("a1", "start", 1),
        ("a1", "end", 1),
    ]


async def test_a_failed_head_lets_the_next_job_of_its_key_run(
    engine: AsyncEngine, db_url: str
) -> None:
    await dispatch(ledger("a", "a0", failures=3))
    await dispatch(ledger("a", "a1"))
    await drain(db_url)
    assert [row.job_key for row in await log(engine) if row.event == "end"] == [
        "a0",
        "a0",
        "a0",
        "a1",
    ]
    assert await count(engine, failed_jobs) == 1
    async with engine.connect() as conn:
        assert (await sql.housekeep(conn)).unused_serial_keys == 1
    assert await count(engine, serial_keys) == 0


async def test_a_dead_workers_head_blocks_its_key_only_until_the_lease_expires(
    engine: AsyncEngine, db_url: str
) -> None:
    await dispatch(ledger("a", "a0"))
    await dispatch(ledger("a", "a1"))
    async with engine.connect() as conn:
        (head,) = await sql.claim(conn, "default", 10, 1, 0.3)  # then the worker died
    assert head.serial_key == '["tests.ledger",["a"]]'
    await asyncio.sleep(0.4)
    await drain(db_url)
    assert [row.job_key for row in await log(engine) if row.event == "end"] == ["a0", "a1"]


async def test_housekeeping_promotes_a_missed_head_and_prunes_unused_keys(
    engine: AsyncEngine,
) -> None:
    first = await dispatch(ledger("a", "a0"))
    await dispatch(ledger("a", "a1"))
    await dispatch(ledger("b", "b0"))
    assert first is not None
    async with engine.begin() as conn:  # the head gone without its promotion
        await conn.execute(sa.delete(jobs).where(jobs.c.id == first.id))
        await conn.execute(sa.delete(jobs).where(jobs.c.serial_key == '["tests.ledger",["b"]]'))
    async with engine.connect() as conn:
        done = await sql.housekeep(conn)
    assert (done.promoted_keys, done.unused_serial_keys) == (1, 1)
    (row,) = await rows(engine, jobs.c.available_at, jobs.c.serial_due_at)
    assert row.available_at < PARKED_AT
    assert row.serial_due_at is None
    async with engine.connect() as conn:
        assert await sql.housekeep(conn) == sql.Housekept(0, 0, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "processes"), [("postgresql", 4), ("sqlite", 2), ("mariadb", 4)]
)
async def test_worker_processes_keep_serial_order_across_many_keys(
    backend: str,
    processes: int,
    request: pytest.FixtureRequest,
    spawn: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = request.getfixturevalue(DB_URL_FIXTURES[backend])
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    keys, per_key = 50, 40
    batch = [ledger(f"k{k}-", f"k{k}-{i}") for i in range(per_key) for k in range(keys)]
    result = await queue.bulk(batch)
    assert result is not None
    assert len(result.inserted) == keys * per_key
    workers = [
        spawn(url, "--stop-when-empty", "--sleep", "0.1", "--concurrency", "20")
        for _ in range(processes)
    ]
    for worker in workers:
        assert await asyncio.to_thread(worker.wait, 300) == 0, worker.log()
    assert_serial(await log(engine), {f"k{k}-": per_key for k in range(keys)})
    assert await count(engine, jobs) == 0
    await engine.dispose()


async def test_plain_dispatch_sends_one_insert_and_reads_nothing_back(engine: AsyncEngine) -> None:
    sent: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    async with engine.connect() as conn:
        sa.event.listen(engine.sync_engine, "before_cursor_execute", before)
        try:
            async with conn.begin():
                assert await dispatch(test_jobs.Record(), session=conn) is None
                bulk = [test_jobs.Record(), test_jobs.Record()]
                assert await queue.bulk(bulk, session=conn) is None
                keyed = await dispatch(unique(1), session=conn)
        finally:
            sa.event.remove(engine.sync_engine, "before_cursor_execute", before)
    assert keyed is not None
    plain = [s for s in sent if s.startswith("INSERT INTO jobs")]
    assert len(plain) >= 3
    assert all("RETURNING" not in s and "unique_key" not in s for s in plain[:2]), plain
    assert "unique_key" in plain[2]


async def _serial_hold_then(engine: AsyncEngine, gate: asyncio.Event, commit: bool) -> None:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        await dispatch(ledger("same", "held"), session=conn)
        gate.set()
        await asyncio.sleep(0.5)  # the others wait for the key's row meanwhile
        await (transaction.commit() if commit else transaction.rollback())


@pytest.mark.parametrize("holder_commits", [True, False])
async def test_concurrent_producers_of_a_serial_key_take_turns(
    engine: AsyncEngine, holder_commits: bool
) -> None:
    gate = asyncio.Event()
    holder = asyncio.create_task(_serial_hold_then(engine, gate, holder_commits))
    await gate.wait()
    # Each in a transaction of its own, run again if InnoDB ends it as a deadlock victim.
    results = await asyncio.gather(*(dispatch(ledger("same", f"w{i}")) for i in range(7)))
    await holder
    assert all(result is not None and not result.duplicate for result in results)
    found = await rows(engine, jobs.c.id, jobs.c.available_at)
    assert len(found) == 8 if holder_commits else 7
    # Exactly one head, the first job; the others parked behind it.
    assert [row.available_at == PARKED_AT for row in found] == [False] + [True] * (len(found) - 1)
