"""The worker under the faults where queues run a job three times or get stuck: a claim taken
over and claimed again, hooks that are slow or hang, jobs of other pools, outcomes the
database refuses, crashes with prefetched jobs, shutdowns that meet lost connections or job
code that ignores cancellation, blocking handlers, a database that is not migrated."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Worker, dispatch, queue, sql, testing
from routemq_outbox import worker as worker_module
from routemq_outbox.database import create_engine
from routemq_outbox.errors import DatabaseNotReady
from routemq_outbox.schema import db_now, db_now_plus, jobs

from . import jobs as test_jobs
from .conftest import run_cli
from .processes import SpawnWorker
from .test_worker import count, failed_rows, log_rows, record, settings, wait_exit


def sleepy(key: str, seconds: float, later: float | None = None) -> test_jobs.Sleepy:
    job = test_jobs.Sleepy()
    job.key, job.seconds, job.later_seconds = key, seconds, later
    return job


async def events(engine: AsyncEngine, key: str, event_name: str) -> list[int]:
    """The attempts for which job ``key`` logged ``event_name``, in order."""
    return [r.attempt for r in await log_rows(engine) if (r.job_key, r.event) == (key, event_name)]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def reserved_expired(
    engine: AsyncEngine, payload: str, queue_name: str, attempts: int
) -> int:
    """A row as a worker that died mid-attempt leaves it: reserved, its lease run out."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.insert(jobs)
            .values(
                queue=queue_name,
                payload=payload,
                attempts=attempts,
                reserved_at=db_now(),
                token=42,
                lease_expires_at=db_now_plus(sa.literal(-60.0, sa.Float())),
            )
            .returning(jobs.c.id)
        )
        return int(result.scalar_one())


async def job_rows(engine: AsyncEngine) -> list[sa.Row[tuple[object, ...]]]:
    async with engine.connect() as conn:
        query = sa.select(jobs.c.id, jobs.c.queue, jobs.c.attempts, jobs.c.reserved_at)
        return list((await conn.execute(query.order_by(jobs.c.id))).all())


async def _engine_of(url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncEngine:
    """An engine on ``url``, made the configured database, with the jobs' log table."""
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    return engine


@pytest.fixture
async def sqlite_engine(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngine]:
    engine = await _engine_of(sqlite_url, monkeypatch)
    yield engine
    await engine.dispose()


@pytest.fixture
async def pg_engine(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncEngine]:
    engine = await _engine_of(pg_url, monkeypatch)
    yield engine
    await engine.dispose()


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[object]]]:
    """Worker runs started by a test; stopped and awaited after it."""
    tasks: list[asyncio.Task[object]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ claims


async def test_a_job_claimed_again_by_its_own_worker_keeps_its_lease(
    db_url: str, engine: AsyncEngine, log_table: None, running: list[asyncio.Task[object]]
) -> None:
    """The first attempt's lease is taken over (as after an event-loop stall) and the same
    worker claims the job again; the first attempt's late finish must not drop the second
    attempt's claim, which would stop its heartbeats and let it be taken over once more."""
    await dispatch(sleepy("again", 1.0, later=3.0))
    worker = Worker(settings(db_url, lease=1.2, concurrency=2, stop_when_empty=False))
    running.append(asyncio.create_task(worker.run()))
    await until(lambda: _started(engine, "again", 1), 30, "attempt 1")
    async with engine.begin() as conn:  # what another worker's rescue does to a stale lease
        await conn.execute(
            sa.update(jobs).values(reserved_at=None, token=None, lease_expires_at=None)
        )
    await until(lambda: _ended(engine, "again", 2), 30, "attempt 2 to end")
    await asyncio.sleep(1.0)  # a third run would have begun by now
    worker.stop()
    await asyncio.wait_for(running[0], 30)
    assert await events(engine, "again", "start") == [1, 2]
    assert await count(engine, jobs) == 0
    assert await failed_rows(engine) == []


async def _started(engine: AsyncEngine, key: str, attempt: int) -> bool:
    return attempt in await events(engine, key, "start")


async def _ended(engine: AsyncEngine, key: str, attempt: int) -> bool:
    return attempt in await events(engine, key, "end")


async def test_rescue_takes_only_jobs_of_its_own_queues(db_url: str, engine: AsyncEngine) -> None:
    """A worker of another pool may be unable to load a job, or judge it by its own
    --max-tries: it leaves it alone. One of its own that it cannot load goes back to pending
    and fails as an unknown job when claimed."""
    unknown = json.dumps({"job": "reports.unknown_here", "data": {}})
    theirs = await reserved_expired(engine, unknown, "emails", attempts=1)
    await reserved_expired(engine, unknown, "reports", attempts=1)
    worker = Worker(settings(db_url, queues=("reports",), max_tries=1, stop_when_empty=False))
    task = asyncio.create_task(worker.run())
    await until(lambda: _failed_count(engine, 1), 30, "the job of its own queue")
    worker.stop()
    await asyncio.wait_for(task, 30)
    [row] = await job_rows(engine)
    assert (row.id, row.attempts) == (theirs, 1)
    assert row.reserved_at is not None  # untouched: not this pool's
    [failed] = await failed_rows(engine)
    assert failed.queue == "reports"
    assert "UnknownJob" in failed.exception


async def _failed_count(engine: AsyncEngine, expected: int) -> bool:
    return len(await failed_rows(engine)) == expected


async def test_one_rescue_round_takes_every_expired_job(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    """More expired jobs than a batch: the rescue loops until a batch comes back short,
    rather than take one batch per heartbeat interval (100 s here)."""
    await queue.bulk([record(f"k{i}") for i in range(250)])
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(jobs).values(
                attempts=1,
                reserved_at=db_now(),
                token=7,
                lease_expires_at=db_now_plus(sa.literal(-60.0, sa.Float())),
            )
        )
    worker = Worker(settings(db_url, lease=300, concurrency=50, stop_when_empty=False))
    task = asyncio.create_task(worker.run())
    await until(lambda: _all_ran(engine, 250), 45, "every rescued job to run")
    worker.stop()
    await asyncio.wait_for(task, 30)
    assert await count(engine, jobs) == 0


async def _all_ran(engine: AsyncEngine, total: int) -> bool:
    return len(await log_rows(engine)) >= total


async def test_jobs_claimed_while_stopping_do_not_start(
    sqlite_url: str, sqlite_engine: AsyncEngine
) -> None:
    """stop() while a claim waits for SQLite's write lock: what that claim returns is
    released, unspent, not run."""
    await dispatch(sleepy("late", 3.0))
    path = sqlite_url.split("///", 1)[1]
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        worker = Worker(settings(sqlite_url, stop_when_empty=False, grace=5))
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)  # the claim now waits for the lock
        worker.stop()
        await asyncio.sleep(0.2)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    stats = await asyncio.wait_for(task, 30)
    assert await log_rows(sqlite_engine) == []
    assert stats.succeeded == 0
    [row] = await job_rows(sqlite_engine)
    assert (row.reserved_at, row.attempts) == (None, 0)


# ------------------------------------------------------------------ failed() hooks


async def test_a_slow_hook_does_not_hold_back_heartbeats(
    db_url: str, engine: AsyncEngine, log_table: None, running: list[asyncio.Task[object]]
) -> None:
    """The hook of a job taken over from a dead worker takes 4 s: meanwhile the worker's
    running job keeps its 1.2 s lease, so a second worker never takes it over."""
    hooked = test_jobs.HookSleeps()
    hooked.key = "hooked"
    await reserved_expired(engine, _payload(hooked), "default", attempts=1)
    await dispatch(sleepy("long", 3.0))
    first = Worker(settings(db_url, lease=1.2, stop_when_empty=False))
    running.append(asyncio.create_task(first.run()))
    await until(lambda: _logged(engine, "hooked", "hook start"), 30, "the hook")
    second = Worker(settings(db_url, lease=1.2, stop_when_empty=False))
    running.append(asyncio.create_task(second.run()))
    await until(lambda: _logged(engine, "long", "end"), 30, "the long job")
    await until(lambda: _logged(engine, "hooked", "hook end"), 30, "the hook's end")
    for worker in (first, second):
        worker.stop()
    await asyncio.wait_for(asyncio.gather(*running), 30)
    assert await events(engine, "long", "start") == [1]
    assert await count(engine, jobs) == 0


def _payload(job: object) -> str:
    from routemq_outbox.job import encode_payload

    return encode_payload(job, max_bytes=1 << 20)


async def _logged(engine: AsyncEngine, key: str, event_name: str) -> bool:
    return bool(await events(engine, key, event_name))


async def test_a_hanging_hook_is_cut_at_the_jobs_timeout_and_holds_no_slot(
    db_url: str, engine: AsyncEngine, log_table: None, caplog: pytest.LogCaptureFixture
) -> None:
    hanging = test_jobs.HookHangs()
    hanging.key = "hangs"
    await dispatch(hanging)
    await queue.bulk([record(f"after-{i}") for i in range(3)])
    worker = Worker(settings(db_url, concurrency=1, prefetch=0))
    stats = await asyncio.wait_for(worker.run(), 30)
    assert (stats.succeeded, stats.failed) == (3, 1)
    assert await events(engine, "hangs", "hook start") == [1]
    assert "failed() of job id=" in caplog.text
    assert "ran longer than 0.5 s; cancelled" in caplog.text


async def test_a_plain_def_hook_runs_in_a_thread(
    db_url: str, engine: AsyncEngine, log_table: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync ``failed()`` blocks for 1 s: in a thread, not on the event loop."""
    job = test_jobs.SyncHook()
    job.key = "sync-hook"
    await dispatch(job)
    stalls: list[float] = []

    async def ticker() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.02)
            stalls.append(time.monotonic() - started)

    watching = asyncio.create_task(ticker())
    try:
        stats = await asyncio.wait_for(Worker(settings(db_url)).run(), 30)
    finally:
        watching.cancel()
    assert stats.failed == 1
    assert await events(engine, "sync-hook", "hook end") == [1]
    assert max(stalls) < 0.5, max(stalls)
    assert "raised" not in caplog.text


# ------------------------------------------------------------------ outcomes the database refuses


async def test_a_retry_delay_no_database_can_store_fails_the_job(
    db_url: str, engine: AsyncEngine
) -> None:
    await dispatch(test_jobs.InfiniteRetryDelay())
    stats = await asyncio.wait_for(Worker(settings(db_url)).run(), 30)
    assert (stats.retried, stats.failed) == (0, 1)
    [row] = await failed_rows(engine)
    assert "InvalidDelay" in row.exception
    assert await count(engine, jobs) == 0


async def test_a_retry_the_database_refuses_fails_the_job(
    db_url: str, engine: AsyncEngine, log_table: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release statement fails for good (here: a CHECK constraint): the job is failed,
    saying why, instead of being held, retried for ever and run again at the next start."""

    async def refused(conn: object, pairs: list[tuple[int, int]], **_: object) -> int:
        assert isinstance(conn, sa.ext.asyncio.AsyncConnection)
        async with conn.begin():
            await conn.execute(sa.update(jobs).where(jobs.c.id == pairs[0][0]).values(attempts=-1))
        return 1

    monkeypatch.setattr(worker_module.sql, "release", refused)
    flaky = test_jobs.Flaky()
    flaky.key = "refused"
    await dispatch(flaky)
    stats = await asyncio.wait_for(Worker(settings(db_url)).run(), 30)
    assert (stats.retried, stats.failed) == (0, 1)
    [row] = await failed_rows(engine)
    assert "OutcomeNotRecorded: its retry could not be recorded" in row.exception
    assert "flaky failure 1" in row.exception
    assert await events(engine, "refused", "failed") == [1]  # failed() was called


async def test_a_failure_text_the_database_refuses_is_stored_escaped(
    db_url: str, engine: AsyncEngine, log_table: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the text ever hold what no engine stores (a lone surrogate), the failure is
    recorded with the text escaped, once, rather than retried for ever."""
    monkeypatch.setattr(worker_module, "describe", lambda exc: "Broken: \ud800 and \x00")
    flaky = test_jobs.AlwaysFails()
    flaky.key = "escaped"
    flaky.failures = 1
    await dispatch(flaky)
    stats = await asyncio.wait_for(Worker(settings(db_url, max_tries=1)).run(), 30)
    assert stats.failed == 1
    [row] = await failed_rows(engine)
    assert row.exception.startswith("Broken: \\ud800 and \\x00")


# ------------------------------------------------------------------ crashes and shutdowns


async def test_prefetched_jobs_keep_their_attempt_when_the_worker_is_killed(
    db_url: str, engine: AsyncEngine, log_table: None, spawn: SpawnWorker, tmp_path: Path
) -> None:
    """kill -9 with jobs claimed ahead (max_tries=1): the running one has spent its attempt
    and fails with LeaseExpired; those that never started run later, as their first attempt."""
    release = tmp_path / "release"
    batch = []
    for i in range(4):
        job = test_jobs.WaitsForFile()
        job.key, job.release = f"k{i}", str(release)
        batch.append(job)
    await queue.bulk(batch)
    first = spawn(db_url, "--concurrency", "1", "--prefetch", "3", "--lease", "2")
    await until(lambda: _logged(engine, "k0", "start"), 60, "the first job")
    await until(lambda: _all_reserved(engine), 30, "the jobs claimed ahead")
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)
    assert [r.attempts for r in await job_rows(engine)] == [1, 0, 0, 0]
    release.touch()
    await asyncio.sleep(2.5)  # the dead worker's leases run out
    stats = await asyncio.wait_for(Worker(settings(db_url, lease=2)).run(), 60)
    assert stats.succeeded == 3
    [failed] = await failed_rows(engine)
    assert "LeaseExpired" in failed.exception
    for key in ("k1", "k2", "k3"):
        assert await events(engine, key, "end") == [1]


async def test_a_job_started_from_those_claimed_ahead_spends_its_attempt(
    db_url: str, engine: AsyncEngine, log_table: None, tmp_path: Path
) -> None:
    """Claimed ahead, its attempt is not counted; once it has run a moment, it is: a crash
    now would spend it, as for any job that ran."""
    release = tmp_path / "release"
    waits = test_jobs.WaitsForFile()
    waits.key, waits.release = "ahead", str(release)
    await queue.bulk([record("first"), waits])
    worker = Worker(settings(db_url, concurrency=1, prefetch=1))
    task = asyncio.create_task(worker.run())
    await until(lambda: _logged(engine, "ahead", "start"), 30, "the job claimed ahead")
    await until(lambda: _attempts_are(engine, [1]), 5, "its attempt to be counted")
    release.touch()
    stats = await asyncio.wait_for(task, 30)
    assert (stats.succeeded, stats.failed) == (2, 0)


async def _attempts_are(engine: AsyncEngine, expected: list[int]) -> bool:
    return [r.attempts for r in await job_rows(engine)] == expected


async def _all_reserved(engine: AsyncEngine) -> bool:
    rows = await job_rows(engine)
    return len(rows) == 4 and all(r.reserved_at is not None for r in rows)


async def test_stop_releases_prefetched_jobs_at_once(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    """Jobs claimed ahead go back to pending, unspent, as soon as the worker stops, while
    the running job still has its grace period: idle peers can take them meanwhile."""
    await queue.bulk([sleepy(f"k{i}", 3.0) for i in range(4)])
    worker = Worker(settings(db_url, concurrency=1, prefetch=3, stop_when_empty=False))
    task = asyncio.create_task(worker.run())
    await until(lambda: _logged(engine, "k0", "start"), 30, "the first job")
    await until(lambda: _all_reserved(engine), 30, "the jobs claimed ahead")
    worker.stop()
    await until(lambda: _released(engine, 3), 1.5, "the prefetched jobs to be released")
    assert not await _logged(engine, "k0", "end")  # still running
    stats = await asyncio.wait_for(task, 30)
    assert stats.succeeded == 1
    assert [r.attempts for r in await job_rows(engine)] == [0, 0, 0]


async def _released(engine: AsyncEngine, expected: int) -> bool:
    return sum(r.reserved_at is None for r in await job_rows(engine)) == expected


async def test_max_jobs_lets_a_job_longer_than_the_grace_period_finish(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(sleepy("long", 1.5))
    worker = Worker(settings(db_url, max_jobs=1, grace=0.2, stop_when_empty=False))
    stats = await asyncio.wait_for(worker.run(), 30)
    assert (stats.succeeded, stats.interrupted) == (1, 0)
    assert await events(engine, "long", "end") == [1]
    assert await count(engine, jobs) == 0


async def test_a_success_is_deleted_even_when_the_connections_drop_at_shutdown(
    pg_url: str, pg_engine: AsyncEngine, spawn: SpawnWorker
) -> None:
    """The server closes every connection of the worker, which is then stopped while its
    job runs: the job still finishes in the grace period, and its deletion is retried on a
    new connection instead of the job being handed back (to run again)."""
    engine = pg_engine
    await dispatch(sleepy("closing", 2.0))
    worker = spawn(pg_url, "--sleep", "0.2")
    await until(lambda: _logged(engine, "closing", "start"), 60, "the job")
    async with engine.connect() as conn:
        await conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "application_name = 'routemq-outbox worker' AND datname = current_database()"
            )
        )
    await asyncio.sleep(0.2)
    worker.signal(signal.SIGTERM)
    assert await wait_exit(worker, 60) == 0, worker.log()
    assert await events(engine, "closing", "start") == [1]
    assert await count(engine, jobs) == 0, worker.log()


async def test_a_job_that_ignores_its_timeout_loses_its_slot(
    db_url: str, engine: AsyncEngine, log_table: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled at its 1 s timeout, the job swallows the cancellation and goes on for 3 s:
    the worker waits a moment, then frees the slot and counts the attempt as timed out."""
    monkeypatch.setattr(worker_module, "_CANCEL_WAIT", 0.5)
    job = test_jobs.Stubborn()
    job.key, job.seconds = "stubborn", 3.0
    await dispatch(job)
    await queue.bulk([record(f"after-{i}") for i in range(2)])
    worker = Worker(settings(db_url, concurrency=1, prefetch=0))
    started = time.monotonic()
    stats = await asyncio.wait_for(worker.run(), 30)
    took = time.monotonic() - started
    assert (stats.succeeded, stats.failed, stats.abandoned) == (2, 1, 1)
    assert took < 3.0, took  # not waiting for the job that ignores its cancellation
    [row] = await failed_rows(engine)
    assert "JobTimeout" in row.exception
    assert "ignored being cancelled" in row.exception
    while worker.abandoned:  # let the stubborn code end before the test's loop closes
        await asyncio.sleep(0.1)


async def test_shutdown_ends_even_when_job_code_ignores_cancellation(
    sqlite_url: str, sqlite_engine: AsyncEngine, spawn: SpawnWorker
) -> None:
    """A job that swallows every cancellation for ever: after the grace period and a few
    seconds, the worker gives up on it, exits, and leaves the job to its lease."""
    job = test_jobs.Stubborn()
    job.key = "for ever"
    await dispatch(job)
    worker = spawn(sqlite_url, "--grace", "1", "--timeout", "600")
    await until(lambda: _logged(sqlite_engine, "for ever", "start"), 60, "the job")
    worker.signal(signal.SIGTERM)
    assert await wait_exit(worker, 30) == 0, worker.log()
    assert "ignored being cancelled at shutdown" in worker.log()
    [row] = await job_rows(sqlite_engine)
    assert row.reserved_at is not None  # left to its lease, not handed back while it runs


# ------------------------------------------------------------------ plain def handle


@pytest.fixture
def sync_runs() -> Iterator[list[str]]:
    test_jobs.SYNC_RUNS.clear()
    test_jobs.RELEASE_THREADS.clear()
    yield test_jobs.SYNC_RUNS
    test_jobs.RELEASE_THREADS.set()  # let the threads the test left hanging end


def sync_sleeps(key: str, seconds: float) -> test_jobs.SyncSleeps:
    job = test_jobs.SyncSleeps()
    job.key, job.seconds = key, seconds
    return job


async def test_every_slot_gets_a_thread_at_once(db_url: str, sync_runs: list[str]) -> None:
    """40 blocking handles of 1 s with a 1.8 s timeout at --concurrency 40: none waits for
    a thread (asyncio's default pool has at most 32), so none times out."""
    await queue.bulk([sync_sleeps(f"k{i}", 1.0) for i in range(40)])
    stats = await asyncio.wait_for(Worker(settings(db_url, concurrency=40)).run(), 60)
    assert (stats.succeeded, stats.failed) == (40, 0)
    assert sorted(sync_runs) == sorted(f"k{i}" for i in range(40))


async def test_hung_threads_do_not_starve_later_sync_jobs(
    db_url: str, sync_runs: list[str]
) -> None:
    await queue.bulk([test_jobs.HangsInAThread() for _ in range(40)])
    await queue.later(0.3, sync_sleeps("after", 0.1))
    stats = await asyncio.wait_for(Worker(settings(db_url, concurrency=40)).run(), 60)
    assert stats.failed == 40  # timed out, their threads still hanging
    assert stats.succeeded == 1
    assert sync_runs == ["after"]


async def test_a_hung_thread_does_not_keep_the_process_alive(
    sqlite_url: str, sqlite_engine: AsyncEngine, spawn: SpawnWorker
) -> None:
    job = test_jobs.HangsInAThread()
    job.for_ever = True
    await dispatch(job)
    worker = spawn(sqlite_url, "--stop-when-empty", "--grace", "1")
    assert await wait_exit(worker, 30) == 0, worker.log()
    assert "worker stopped: 0 succeeded, 0 retried, 1 failed" in worker.log()


async def test_a_retry_waits_for_the_count_of_its_attempt_in_flight(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job claimed ahead retries while the statement counting its attempt is on its way:
    the retry, on another connection, must not commit first and fence the count out."""
    real_count = sql.count_attempts

    async def slow_count(conn: object, pairs: object) -> None:
        await asyncio.sleep(0.3)  # the job's retry comes meanwhile
        await real_count(conn, pairs)  # type: ignore[arg-type]

    monkeypatch.setattr(sql, "count_attempts", slow_count)
    await queue.bulk([test_jobs.RetriesAfter(), test_jobs.RetriesAfter()])
    stats = await asyncio.wait_for(Worker(settings(db_url, concurrency=1, prefetch=1)).run(), 60)
    assert stats.retried == 2
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            attempts = (await conn.execute(sa.select(jobs.c.attempts))).scalars().all()
    finally:
        await engine.dispose()
    assert sorted(attempts) == [1, 1]


async def test_a_failed_delete_of_serial_jobs_does_not_undo_the_delete_of_others(
    db_url: str,
    engine: AsyncEngine,
    log_table: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finished jobs with and without a serial key are deleted by different statements. When
    the serial ones' delete fails, the plain ones deleted before it are not deleted again (a
    retry that found them gone would report them taken over by another worker)."""
    if db_url.startswith("sqlite"):
        pytest.skip(
            "on an SQLite file these statements run on threads, where this one's sleep cannot"
        )
    real_finish, real_finish_serial = sql.finish, sql.finish_serial
    failed = []

    async def slow_first_finish(conn: object, pairs: object) -> int:
        if not failed:  # the first delete: the other two jobs finish meanwhile
            await asyncio.sleep(0.6)
        return await real_finish(conn, pairs)  # type: ignore[arg-type]

    async def failing_once(conn: object, held: object, notify: bool = False) -> int:
        if not failed:
            failed.append(held)
            raise ConnectionResetError("the connection dropped")
        return await real_finish_serial(conn, held, notify=notify)  # type: ignore[arg-type]

    monkeypatch.setattr(sql, "finish", slow_first_finish)
    monkeypatch.setattr(sql, "finish_serial", failing_once)
    await dispatch(sleepy("first", 0))
    await dispatch(sleepy("plain", 0.2))
    await dispatch(sleepy("keyed", 0.2), serial_key="k")
    stats = await asyncio.wait_for(Worker(settings(db_url, concurrency=3)).run(), 60)
    assert stats.succeeded == 3
    assert failed, "the delete of the serial job never failed: the fault was not met"
    assert "taken over" not in caplog.text
    assert await count(engine, jobs) == 0
    assert sorted(row.job_key for row in await log_rows(engine) if row.event == "end") == [
        "first",
        "keyed",
        "plain",
    ]


# ------------------------------------------------------------------ SQLite and the primary key


async def test_sqlite_writes_find_held_jobs_by_primary_key(sqlite_url: str) -> None:
    """Finish, heartbeat, release and counting attempts name the jobs by (id, token): on
    SQLite they must search the primary key, not scan the table under its one write lock."""
    engine = create_engine(sqlite_url)
    seen: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, params: object, *_: object) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "DELETE")):
            seen.append((statement, params))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    pairs = [(1, 7), (2, 7), (3, 7)]
    try:
        async with engine.connect() as conn:
            await sql.extend_leases(conn, pairs, 60)
            await sql.count_attempts(conn, pairs)
            await sql.release(conn, pairs, delay=None)
            await sql.finish(conn, pairs)
        assert len(seen) == 4
        async with engine.connect() as conn:
            for statement, params in seen:
                plan = await conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + statement,
                    params,  # type: ignore[arg-type]
                )
                details = " | ".join(str(row[-1]) for row in plan)
                assert "SCAN jobs" not in details, (statement, details)
                assert "INTEGER PRIMARY KEY" in details, (statement, details)
    finally:
        await engine.dispose()


# ------------------------------------------------------------------ a database that is not ready


@pytest.fixture(params=["postgresql", "sqlite", "mariadb"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database that exists but has none of the tables."""
    if request.param == "sqlite":
        path = tmp_path / "unmigrated.db"
        sqlite3.connect(path).close()
        return f"sqlite+aiosqlite:///{path}"
    fixture = {"postgresql": "empty_pg_url", "mariadb": "empty_mariadb_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


async def test_work_off_on_an_unmigrated_database_says_so(unmigrated_url: str) -> None:
    with pytest.raises(DatabaseNotReady, match="run `routemq-outbox migrate`"):
        await asyncio.wait_for(testing.work_off(database_url=unmigrated_url), 30)


def test_work_stop_when_empty_on_an_unmigrated_database_exits_with_one_line(
    unmigrated_url: str,
) -> None:
    result = run_cli("work", "--stop-when-empty", "--database-url", unmigrated_url, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "routemq-outbox:" in line]
    assert len(errors) == 1, result.stderr
    assert "run `routemq-outbox migrate`" in errors[0]
    assert "Traceback" not in result.stderr
