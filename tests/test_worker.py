"""The worker: claiming, running, retrying, failing, leases, shutdown, bad rows, wake-up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Worker, WorkerSettings, dispatch, queue
from routemq_outbox import execution as execution_module
from routemq_outbox import worker as worker_module
from routemq_outbox.database import create_engine
from routemq_outbox.schema import db_now, failed_jobs, jobs
from routemq_outbox.sql import FailedRecord, claim, finish, move_to_failed, release, rescue_expired

from . import jobs as test_jobs
from .conftest import DB_URL_FIXTURES
from .processes import PrivatePostgres, SpawnWorker, WorkerProcess


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exit_stack:
        yield exit_stack


async def log_rows(engine: AsyncEngine) -> list[sa.Row[tuple[object, ...]]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(test_jobs.log_table).order_by(test_jobs.log_table.c.at)
        )
        return list(result.all())


async def count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def failed_rows(engine: AsyncEngine) -> list[sa.Row[tuple[object, ...]]]:
    async with engine.connect() as conn:
        columns = [c for c in failed_jobs.c if c.name != "payload"]
        payload = sa.cast(failed_jobs.c.payload, sa.Text).label("payload")
        result = await conn.execute(sa.select(*columns, payload).order_by(failed_jobs.c.id))
        return list(result.all())


def record(key: str) -> test_jobs.Record:
    job = test_jobs.Record()
    job.key = key
    return job


def settings(url: str, **overrides: object) -> WorkerSettings:
    options: dict[str, object] = {"database_url": url, "sleep": 0.05, "stop_when_empty": True}
    options.update(overrides)
    return WorkerSettings(**options)  # type: ignore[arg-type]


async def drain(url: str, **overrides: object) -> Worker:
    worker = Worker(settings(url, **overrides))
    await asyncio.wait_for(worker.run(), 60)
    return worker


# ----------------------------------------------------------------------------- many workers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "processes", "total"),
    [
        ("postgresql", 4, 5000),
        ("sqlite", 2, 5000),
        ("mariadb", 4, 5000),
    ],
)
async def test_concurrent_worker_processes_run_every_job_exactly_once(
    backend: str,
    processes: int,
    total: int,
    request: pytest.FixtureRequest,
    spawn: SpawnWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = request.getfixturevalue(DB_URL_FIXTURES[backend])
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
        await queue.bulk([record(f"job-{i}") for i in range(total)], session=conn)

    workers = [
        spawn(url, "--stop-when-empty", "--sleep", "0.1", "--concurrency", "20")
        for _ in range(processes)
    ]
    for worker in workers:
        assert await asyncio.to_thread(worker.wait, 240) == 0, worker.log()

    rows = await log_rows(engine)
    keys = [row.job_key for row in rows]
    logs = "\n".join(line for w in workers for line in w.log().splitlines() if "INFO" not in line)
    assert len(keys) == total, f"{len(keys)} records for {total} jobs; worker warnings:\n{logs}"
    assert set(keys) == {f"job-{i}" for i in range(total)}
    assert len({row.pid for row in rows}) >= 2, "the work was not shared between processes"
    assert await count(engine, jobs) == 0
    assert await count(engine, failed_jobs) == 0
    await engine.dispose()


# ----------------------------------------------------------------------------- retries


async def test_a_job_failing_twice_succeeds_on_its_third_attempt(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.Flaky()
    job.key, job.failures = "flaky", 2
    await dispatch(job)
    worker = await drain(db_url)
    rows = await log_rows(engine)
    assert [(r.event, r.attempt) for r in rows] == [("ran", 1), ("ran", 2), ("ran", 3)]
    assert await count(engine, jobs) == 0
    assert await count(engine, failed_jobs) == 0
    assert (worker.stats.succeeded, worker.stats.retried, worker.stats.failed) == (1, 2, 0)


async def test_a_job_that_always_fails_ends_in_failed_jobs_once(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.AlwaysFails()
    job.key = "doomed"
    await dispatch(job)
    await drain(db_url)
    rows = await log_rows(engine)
    assert [(r.event, r.attempt) for r in rows] == [
        ("ran", 1),
        ("ran", 2),
        ("ran", 3),
        ("failed", 3),
    ]
    assert await count(engine, jobs) == 0
    (failed,) = await failed_rows(engine)
    assert failed.attempts == 3
    assert failed.queue == "default"
    assert failed.connection == "default"
    assert failed.exception.startswith("ValueError: flaky failure 3\n")
    assert "Traceback (most recent call last)" in failed.exception
    assert 'in handle\n    raise ValueError(f"flaky failure {self.attempt}")' in failed.exception
    assert json.loads(failed.payload) == {
        "job": "tests.always_fails",
        "data": {"key": "doomed", "failures": 1000},
    }
    assert len(failed.uuid) == 36


async def test_timeouts_count_as_failures(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.Slow()
    job.key = "slow"
    await dispatch(job)
    started = time.monotonic()
    await drain(db_url)
    assert time.monotonic() - started < 20
    assert [r.attempt for r in await log_rows(engine)] == [1, 2]
    (failed,) = await failed_rows(engine)
    assert failed.exception.startswith(
        "routemq_outbox.errors.JobTimeout: attempt 2 ran longer than its 0.2 s timeout"
    )


async def test_cli_timeout_and_max_tries_override_the_jobs_own(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.Sleepy()
    job.key, job.seconds = "override", 5
    await dispatch(job)
    await drain(db_url, timeout=0.3, max_tries=1)
    (failed,) = await failed_rows(engine)
    assert failed.attempts == 1
    assert "ran longer than its 0.3 s timeout" in failed.exception


async def test_retry_job_releases_with_its_delay(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.AsksForRetry()
    job.key, job.delay = "later", 30
    await dispatch(job)
    await drain(db_url)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(jobs, db_now().label("now")))).one()
    assert row.attempts == 1
    assert row.reserved_at is None
    assert row.token is None
    assert abs((row.available_at - row.now).total_seconds() - 30) < 2


async def test_fail_job_skips_the_remaining_attempts(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.GivesUp()
    job.key = "cancelled"
    await dispatch(job)
    await drain(db_url)
    assert [(r.event, r.attempt) for r in await log_rows(engine)] == [("ran", 1), ("failed", 1)]
    (failed,) = await failed_rows(engine)
    assert failed.attempts == 1
    assert failed.exception.startswith("routemq_outbox.errors.FailJob: the order was cancelled")


async def test_exponential_backoff_spreads_retries(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    class Backing(test_jobs.AlwaysFails):
        job_name = "tests.backing"
        retry_after = 100
        backoff = "exponential"

    job = Backing()
    job.key = "backoff"
    await dispatch(job)
    await drain(db_url, max_jobs=1)
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(jobs.c.available_at, db_now().label("now")))).one()
    delay = (row.available_at - row.now).total_seconds()
    assert 49 <= delay <= 101  # attempt 1: 100 s with equal jitter, i.e. 50..100


async def test_sync_handle_runs_in_a_thread(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    jobs_ = []
    for i in range(4):
        job = test_jobs.SyncHandle()
        job.key = f"sync-{i}"
        jobs_.append(job)
    await queue.bulk(jobs_)
    await drain(db_url)
    assert sorted(r.job_key for r in await log_rows(engine)) == [f"sync-{i}" for i in range(4)]


# ----------------------------------------------------------------------------- claiming


async def test_delayed_job_does_not_run_before_available_at(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await queue.later(1.5, record("delayed"))
    async with engine.connect() as conn:
        due: datetime = (await conn.execute(sa.select(jobs.c.available_at))).scalar_one()
    worker = Worker(settings(db_url, stop_when_empty=False, max_time=4))
    await asyncio.wait_for(worker.run(), 30)
    (row,) = await log_rows(engine)
    assert row.at >= due.timestamp() - 0.01, f"ran {due.timestamp() - row.at:.3f} s early"
    assert worker.stats.succeeded == 1


async def test_earlier_queues_are_served_first(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await queue.bulk([record(f"low-{i}") for i in range(5)], queue="low")
    await queue.bulk([record(f"high-{i}") for i in range(5)], queue="high")
    await drain(db_url, queues=("high", "low"), concurrency=1)
    keys = [r.job_key for r in await log_rows(engine)]
    assert keys == [f"high-{i}" for i in range(5)] + [f"low-{i}" for i in range(5)]


async def test_other_queues_are_left_alone(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await queue.push(record("mine"), queue="mine")
    await queue.push(record("theirs"), queue="theirs")
    await drain(db_url, queues=("mine",))
    assert [r.job_key for r in await log_rows(engine)] == ["mine"]
    assert await queue.size("theirs") == 1


async def test_a_claim_never_exceeds_the_limit_and_orders_by_available_at(
    db_url: str, engine: AsyncEngine, stack: contextlib.AsyncExitStack
) -> None:
    await queue.later(60, record("later"))
    await queue.bulk([record(f"now-{i}") for i in range(5)])
    token = secrets.randbits(63)
    conn = await stack.enter_async_context(engine.connect())
    got = await claim(conn, "default", 3, token, 30)
    assert [json.loads(c.payload)["data"]["key"] for c in sorted(got, key=lambda c: c.id)] == [
        "now-0",
        "now-1",
        "now-2",
    ]
    assert {c.attempts for c in got} == {1}
    rest = await claim(conn, "default", 10, secrets.randbits(63), 30)
    assert len(rest) == 2  # the delayed one is not due
    assert await claim(conn, "default", 10, secrets.randbits(63), 30) == []


async def test_a_worker_whose_lease_expired_cannot_touch_the_job(
    db_url: str, engine: AsyncEngine, stack: contextlib.AsyncExitStack
) -> None:
    await dispatch(record("fenced"))
    conn = await stack.enter_async_context(engine.connect())
    (mine,) = await claim(conn, "default", 1, secrets.randbits(63), lease=0.01)
    await asyncio.sleep(0.1)
    (theirs,) = await rescue_expired(conn, 10, secrets.randbits(63), 30, ["default"])
    assert theirs.id == mine.id
    assert theirs.token != mine.token

    stale = [(mine.id, mine.token)]
    assert await finish(conn, stale) == 0
    assert await release(conn, stale, delay=0) == 0
    record_ = FailedRecord("u-1", "default", "default", mine.payload, "E", 1, mine.id)
    assert await move_to_failed(conn, mine.token, record_) is False
    assert await count(engine, failed_jobs) == 0
    async with engine.connect() as other:
        assert (await other.execute(sa.select(jobs.c.token))).scalar_one() == theirs.token
    assert await finish(conn, [(theirs.id, theirs.token)]) == 1


# ----------------------------------------------------------------------------- bad rows


async def insert_raw(engine: AsyncEngine, payload: str, queue_name: str = "default") -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.insert(jobs).values(queue=queue_name, payload=payload))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            '{"job": "os.system", "data": {"command": "touch /tmp/routemq-outbox-pwned"}}',
            "UnknownJob: unknown job 'os.system'",
        ),
        (
            '{"job": "tests.unconstructible", "data": {}}',
            "JobConstructionError: constructing tests.unconstructible raised RuntimeError: "
            "constructor exploded",
        ),
        ("[1, 2, 3]", "MalformedPayload: payload must be a JSON object, got list"),
        ('{"data": {}}', "MalformedPayload: payload has no job name"),
        (
            '{"job": "tests.record", "data": {"_attempt": 5}}',
            "MalformedPayload: payload of job 'tests.record' sets private attributes",
        ),
        (
            '{"job": "tests.record", "data": {"key": "x", "attempt": 3}}',
            "MalformedPayload: payload of job 'tests.record' sets reserved attributes ['attempt']",
        ),
    ],
)
async def test_bad_rows_go_to_failed_jobs_once_and_the_worker_goes_on(
    db_url: str, engine: AsyncEngine, log_table: None, payload: str, message: str
) -> None:
    await insert_raw(engine, payload)
    await dispatch(record("after"))
    worker = await drain(db_url)
    (failed,) = await failed_rows(engine)
    assert failed.exception.startswith(f"routemq_outbox.errors.{message}"), failed.exception
    assert failed.attempts == 1
    assert json.loads(failed.payload) == json.loads(payload)
    assert [r.job_key for r in await log_rows(engine)] == ["after"]
    assert await count(engine, jobs) == 0
    assert worker.stats.failed == 1
    assert not Path("/tmp/routemq-outbox-pwned").exists()


async def test_invalid_json_is_kept_verbatim_in_failed_jobs(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only SQLite stores text that is not JSON (PostgreSQL's JSONB refuses it on insert)."""
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    engine = create_engine(sqlite_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    await insert_raw(engine, '{"job": "tests.record", "data": ')
    await dispatch(record("after"))
    await drain(sqlite_url)
    (failed,) = await failed_rows(engine)
    assert failed.exception.startswith(
        "routemq_outbox.errors.MalformedPayload: payload is not valid JSON"
    )
    assert failed.payload == '{"job": "tests.record", "data": '
    assert [r.job_key for r in await log_rows(engine)] == ["after"]
    await engine.dispose()


# ----------------------------------------------------------------------------- processes


async def eventually(engine: AsyncEngine, query: str, expected: int, timeout: float) -> None:
    """Wait until ``query`` (one number) reaches ``expected``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with engine.connect() as conn:
                value = int((await conn.execute(sa.text(query))).scalar_one())
        except sa.exc.DBAPIError:
            value = -1  # the database is restarting
        if value >= expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {query} is {value}, not {expected}")
        await asyncio.sleep(0.05)


def sleepy(
    key: str, seconds: float, cls: type[test_jobs.Sleepy] = test_jobs.Sleepy
) -> test_jobs.Sleepy:
    job = cls()
    job.key, job.seconds = key, seconds
    return job


STARTED = "SELECT count(*) FROM job_log WHERE event = 'start'"
ENDED = "SELECT count(*) FROM job_log WHERE event = 'end'"


async def wait_exit(worker: WorkerProcess, timeout: float) -> int:
    return await asyncio.to_thread(worker.wait, timeout)


async def test_stop_conditions_exit_zero(
    db_url: str, spawn: SpawnWorker, engine: AsyncEngine, log_table: None
) -> None:
    await queue.bulk([record(f"k{i}") for i in range(10)])

    worker = spawn(db_url, "--max-jobs", "3", "--concurrency", "1", "--sleep", "0.1")
    assert await wait_exit(worker, 60) == 0, worker.log()
    assert "claimed --max-jobs=3 jobs" in worker.log()
    assert await queue.size() == 7

    started = time.monotonic()
    worker = spawn(db_url, "--max-time", "1", "--queue", "empty", "--sleep", "0.1")
    assert await wait_exit(worker, 60) == 0, worker.log()
    assert time.monotonic() - started >= 1

    worker = spawn(db_url, "--stop-when-empty", "--sleep", "0.1")
    assert await wait_exit(worker, 60) == 0, worker.log()
    assert await queue.size() == 0
    assert "no due jobs left; stopping (--stop-when-empty)" in worker.log()
    assert len(await log_rows(engine)) == 10


async def test_sigkilled_workers_jobs_are_run_by_another_after_the_lease(
    db_url: str, spawn: SpawnWorker, engine: AsyncEngine, log_table: None
) -> None:
    batch = [sleepy(f"held-{i}", 60) for i in range(5)]
    for job in batch:
        job.later_seconds = 0
    await queue.bulk(batch)

    doomed = spawn(db_url, "--lease", "2", "--concurrency", "5", "--sleep", "0.1")
    await eventually(engine, STARTED, 5, 30)
    doomed.signal(signal.SIGKILL)
    await wait_exit(doomed, 10)

    rescuer = spawn(db_url, "--lease", "2", "--sleep", "0.1")
    await eventually(engine, ENDED, 5, 60)
    rescuer.signal(signal.SIGTERM)
    assert await wait_exit(rescuer, 30) == 0, rescuer.log()

    ended = {(r.job_key, r.attempt, r.pid) for r in await log_rows(engine) if r.event == "end"}
    assert ended == {(f"held-{i}", 2, rescuer.pid) for i in range(5)}
    assert await count(engine, jobs) == 0
    assert await count(engine, failed_jobs) == 0
    assert "left by a worker that stopped heartbeating" in rescuer.log()


async def test_heartbeats_keep_a_long_job_with_its_worker(
    db_url: str, spawn: SpawnWorker, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(sleepy("long", 4))
    first = spawn(db_url, "--lease", "1", "--stop-when-empty", "--sleep", "0.1")
    await eventually(engine, STARTED, 1, 30)
    second = spawn(db_url, "--lease", "1", "--max-time", "5", "--sleep", "0.1")
    assert await wait_exit(first, 60) == 0, first.log()
    assert await wait_exit(second, 60) == 0, second.log()
    events = [(r.event, r.pid) for r in await log_rows(engine)]
    assert events == [("start", first.pid), ("end", first.pid)]


async def test_sigterm_lets_the_running_job_finish(
    db_url: str, spawn: SpawnWorker, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(sleepy("graceful", 2))
    worker = spawn(db_url, "--grace", "10", "--sleep", "0.1")
    await eventually(engine, STARTED, 1, 30)
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    assert await wait_exit(worker, 15) == 0, worker.log()
    assert time.monotonic() - started < 10
    assert [r.event for r in await log_rows(engine)] == ["start", "end"]
    assert await count(engine, jobs) == 0
    assert "SIGTERM received: stopping" in worker.log()


async def test_sigterm_with_a_short_grace_returns_the_job_unspent(
    db_url: str, spawn: SpawnWorker, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(sleepy("interrupted", 30))
    worker = spawn(db_url, "--grace", "0.5", "--sleep", "0.1")
    await eventually(engine, STARTED, 1, 30)
    worker.signal(signal.SIGTERM)
    assert await wait_exit(worker, 15) == 0, worker.log()
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(jobs))).one()
    assert (row.reserved_at, row.token, row.lease_expires_at, row.attempts) == (None, None, None, 0)
    assert [r.event for r in await log_rows(engine)] == ["start"]
    assert "released 1 unfinished jobs back to pending" in worker.log()


async def test_a_second_signal_exits_at_once(
    db_url: str, spawn: SpawnWorker, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(sleepy("stubborn", 30))
    worker = spawn(db_url, "--grace", "60", "--sleep", "0.1")
    await eventually(engine, STARTED, 1, 30)
    worker.signal(signal.SIGINT)
    await asyncio.sleep(0.3)
    worker.signal(signal.SIGINT)
    assert await wait_exit(worker, 10) == 128 + signal.SIGINT
    assert "SIGINT received again: exiting now" in worker.log()


async def test_prefetched_jobs_wait_for_a_slot_and_go_back_unspent_at_stop(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await queue.bulk([sleepy(f"s{i}", 0.5) for i in range(5)])
    worker = Worker(settings(db_url, concurrency=1, prefetch=2, stop_when_empty=False))
    running = asyncio.create_task(worker.run())
    await eventually(engine, STARTED, 1, 30)
    held = "SELECT count(*) FROM jobs WHERE reserved_at IS NOT NULL"
    await eventually(engine, held, 3, 10)  # one running, two waiting for its slot
    worker.stop()
    await asyncio.wait_for(running, 30)
    assert [(r.job_key, r.event) for r in await log_rows(engine)] == [
        ("s0", "start"),
        ("s0", "end"),
    ]
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(jobs).order_by(jobs.c.id))).all()
    assert [(r.reserved_at, r.token, r.attempts) for r in rows] == [(None, None, 0)] * 4


async def test_prefetched_jobs_still_run_when_the_worker_ends_by_itself(
    db_url: str, engine: AsyncEngine, log_table: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    await queue.bulk([record(f"k{i}") for i in range(6)])
    sizes: list[int] = []

    async def counting_claim(*args: object, **kwargs: object) -> list[object]:
        got = await claim(*args, **kwargs)  # type: ignore[arg-type]
        sizes.append(len(got))
        return got  # type: ignore[return-value]

    monkeypatch.setattr(worker_module.sql, "claim", counting_claim)
    worker = await drain(db_url, concurrency=1, prefetch=3, max_jobs=4, stop_when_empty=False)
    assert max(sizes) > 1, sizes  # jobs were claimed beyond the one free slot
    assert [r.job_key for r in await log_rows(engine)] == ["k0", "k1", "k2", "k3"]
    assert worker.stats.succeeded == 4
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(jobs).order_by(jobs.c.id))).all()
    assert [(r.reserved_at, r.attempts) for r in rows] == [(None, 0), (None, 0)]


async def test_an_unexpected_error_while_deleting_is_logged_and_retried(
    db_url: str,
    engine: AsyncEngine,
    log_table: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await queue.bulk([record(f"k{i}") for i in range(5)])
    calls = 0

    async def finish_breaking_once(conn: object, pairs: list[tuple[int, int]]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:  # e.g. a driver left in a bad state by a lost connection
            raise RuntimeError("driver in a bad state")
        return await finish(conn, pairs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module.sql, "finish", finish_breaking_once)
    worker = Worker(settings(db_url, stop_when_empty=False))
    running = asyncio.create_task(worker.run())
    await eventually(engine, "SELECT 5 - count(*) FROM jobs", 5, 30)  # deleted after all
    worker.stop()
    await asyncio.wait_for(running, 30)
    assert len(await log_rows(engine)) == 5
    assert "deleting finished jobs failed unexpectedly (RuntimeError: driver in a bad state)" in (
        caplog.text
    )


async def test_a_helper_loop_that_dies_stops_the_worker_and_raises(
    db_url: str,
    engine: AsyncEngine,
    log_table: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await dispatch(sleepy("watched", 0.5))

    def broken_expire(self: object, now: float, cancel_wait: float) -> None:
        raise RuntimeError("watchdog bug")

    monkeypatch.setattr(execution_module.Attempt, "expire", broken_expire)
    worker = Worker(settings(db_url, stop_when_empty=False))
    with pytest.raises(RuntimeError, match="watchdog bug"):
        await asyncio.wait_for(worker.run(), 30)
    assert "routemq-outbox watchdog stopped on an unexpected error" in caplog.text
    assert [r.event for r in await log_rows(engine)] == ["start", "end"]  # finished first
    assert await count(engine, jobs) == 0


async def test_the_start_line_shows_the_settings_and_hides_the_password(
    pg_url: str, spawn: SpawnWorker
) -> None:
    with_password = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    worker = spawn(with_password, "--stop-when-empty", "--queue", "a", "--queue", "b")
    assert await wait_exit(worker, 60) == 0, worker.log()
    log = worker.log()
    assert "s3cret-pw" not in log
    assert "database=postgresql+asyncpg://postgres:***@" in log
    assert "queues=a,b concurrency=10" in log


async def test_unknown_import_is_a_clear_error(pg_url: str, spawn: SpawnWorker) -> None:
    worker = spawn(pg_url, "--import", "no.such.module")
    assert await wait_exit(worker, 30) == 2
    assert "cannot import job module 'no.such.module'" in worker.log()


# ----------------------------------------------------------------------------- PostgreSQL only

LISTENERS = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %routemq_outbox%'"


@pytest.fixture
async def pg_engine(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncEngine]:
    """A PostgreSQL-only test's engine, with the job log table and the default URL set."""
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", pg_url)
    engine = create_engine(pg_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    yield engine
    await engine.dispose()


async def test_notify_wakes_an_idle_worker_and_survives_a_lost_listener(
    pg_url: str, spawn: SpawnWorker, pg_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_NOTIFY", "1")  # producers opt in
    engine = pg_engine
    worker = spawn(pg_url, "--sleep", "60")
    await eventually(engine, LISTENERS, 1, 30)
    await asyncio.sleep(0.5)  # the first poll is over: from now on only NOTIFY can wake it

    await dispatch(record("woken"))
    await eventually(engine, "SELECT count(*) FROM job_log", 1, 10)

    async with engine.connect() as conn:
        await conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN %routemq_outbox%'"
            )
        )
    await asyncio.sleep(0.5)
    await eventually(engine, LISTENERS, 1, 30)  # reconnected
    await asyncio.sleep(0.5)
    await dispatch(record("woken again"))
    await eventually(engine, "SELECT count(*) FROM job_log", 2, 10)
    worker.signal(signal.SIGTERM)
    assert await wait_exit(worker, 30) == 0
    assert "LISTEN connection lost" in worker.log()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()


@pytest.mark.slow
async def test_worker_survives_a_postgresql_restart(
    private_postgres: PrivatePostgres, spawn: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from routemq_outbox.migrate import upgrade

    url = private_postgres.url()
    await asyncio.to_thread(upgrade, url)
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    engine = create_engine(url, pool_pre_ping=True)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    await queue.bulk([sleepy(f"r-{i}", 0.02, test_jobs.Resilient) for i in range(300)])

    worker = spawn(url, "--concurrency", "4", "--sleep", "0.1", "--lease", "5")
    await eventually(engine, ENDED, 20, 60)
    await asyncio.to_thread(private_postgres.restart)
    try:
        await eventually(
            engine, "SELECT count(DISTINCT job_key) FROM job_log WHERE event = 'end'", 300, 120
        )
        await eventually(engine, "SELECT 300 - count(*) FROM jobs", 300, 60)
    except AssertionError as exc:
        async with engine.connect() as conn:
            left = (
                await conn.execute(
                    sa.text(
                        "SELECT id, attempts, reserved_at IS NOT NULL AS held, token, "
                        "lease_expires_at - now() AS lease_left, available_at - now() AS due_in "
                        "FROM jobs ORDER BY id"
                    )
                )
            ).all()
        notable = [line for line in worker.log().splitlines() if " INFO " not in line]
        raise AssertionError(
            f"{exc}\njobs left: {left}\nworker warnings:\n"
            + "\n".join(notable[-80:])
            + f"\nworker log:\n{worker.log()[-3000:]}"
        ) from None
    worker.signal(signal.SIGTERM)
    assert await wait_exit(worker, 30) == 0, worker.log()
    assert await count(engine, failed_jobs) == 0
    assert "retrying in" in worker.log()
    await engine.dispose()


async def test_the_asyncpg_fast_path_and_sqlalchemy_agree(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims and deletes on asyncpg skip SQLAlchemy; through psycopg they do not."""
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", pg_url)
    await queue.bulk([record(f"k{i}") for i in range(6)])
    fast = create_engine(pg_url)
    slow = create_engine(pg_url.replace("+asyncpg", "+psycopg"))
    seen: dict[str, list[str]] = {"fast": [], "slow": []}
    for name, engine in (("fast", fast), ("slow", slow)):
        sa.event.listen(
            engine.sync_engine,
            "before_cursor_execute",
            lambda *args, name=name: seen[name].append(args[2]),
        )
    async with fast.connect() as a, slow.connect() as b:
        assert a.dialect.driver == "asyncpg"
        assert b.dialect.driver == "psycopg"
        first = await claim(a, "default", 3, 11, 30)
        second = await claim(b, "default", 10, 22, 30)
        assert [json.loads(c.payload)["data"]["key"] for c in first + second] == [
            f"k{i}" for i in range(6)
        ]
        assert {(c.attempts, c.token) for c in first} == {(1, 11)}
        assert {(c.attempts, c.token) for c in second} == {(1, 22)}
        assert await finish(a, [(c.id, 99) for c in second]) == 0  # not their tokens
        assert await finish(b, [(c.id, 99) for c in first]) == 0
        assert await finish(a, [(c.id, c.token) for c in first]) == 3
        assert await finish(b, [(c.id, c.token) for c in second]) == 3
    # The asyncpg path bypasses SQLAlchemy's execution entirely; psycopg's goes through it.
    assert not any("UPDATE jobs" in s or "DELETE FROM jobs" in s for s in seen["fast"])
    assert any("UPDATE jobs" in s for s in seen["slow"])
    assert any("DELETE FROM jobs" in s for s in seen["slow"])
    await fast.dispose()
    await slow.dispose()
