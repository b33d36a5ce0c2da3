"""The worker side of the control plane: priorities, paused queues, cancelled jobs, the
workers table; and operators racing workers, with real processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, admin, dispatch, queue, sql
from routemq_outbox.database import create_engine
from routemq_outbox.errors import InvalidJobSetting, JobDefinitionError
from routemq_outbox.schema import failed_jobs, jobs
from routemq_outbox.worker import Worker

from . import jobs as test_jobs
from .conftest import DB_URL_FIXTURES, ROOT
from .processes import SpawnWorker
from .test_worker import count, drain, log_rows, record, settings


async def test_priorities_run_lower_first_then_by_due_time(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    order = [("p5", 5), ("p0-a", 0), ("p9", 9), ("p0-b", None), ("p3", 3)]
    for key, priority in order:
        await dispatch(record(key), priority=priority)
    await drain(db_url, concurrency=1, batch_size=1, prefetch=0)
    assert [row.job_key for row in await log_rows(engine)] == ["p0-a", "p0-b", "p3", "p5", "p9"]


async def test_a_job_class_priority_and_a_bulk_priority_are_stored(engine: AsyncEngine) -> None:
    class Urgent(test_jobs.Record):
        job_name = "tests.urgent"
        priority = 2

    await dispatch(Urgent())
    await queue.bulk([record("a"), Urgent()], priority=7)
    await queue.later(60, Urgent(), priority=4)
    assert [j.priority for j in (await admin.list_jobs(engine)).jobs] == [2, 7, 7, 4]


@pytest.mark.parametrize("bad", [-1, 10, 1.5, True, "1"])
async def test_a_priority_out_of_range_is_refused_and_nothing_is_stored(
    engine: AsyncEngine, bad: object
) -> None:
    with pytest.raises(InvalidJobSetting, match="priority must be an integer from 0"):
        await dispatch(record("x"), priority=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidJobSetting, match="priority"):
        await queue.bulk([record("x")], priority=bad)  # type: ignore[arg-type]
    assert await count(engine, jobs) == 0
    with pytest.raises(JobDefinitionError, match="priority must be an integer"):

        class Bad(Job):
            priority = bad  # type: ignore[assignment]

            async def handle(self) -> None: ...


async def test_delayed_jobs_of_a_lower_priority_do_not_hide_due_ones(
    engine: AsyncEngine,
) -> None:
    await queue.bulk([record(f"later-{i}") for i in range(50)], delay=3600)
    await dispatch(record("due"), priority=1)
    async with engine.connect() as conn:
        (claimed,) = await sql.claim(conn, "default", 10, 1, 60.0)
    assert claimed.priority == 1


@pytest.mark.parametrize("lowest_level", [0, 4])
async def test_a_claim_reads_on_into_later_levels_past_jobs_another_claim_holds(
    engine: AsyncEngine, lowest_level: int
) -> None:
    """One claim takes from several levels, in order; and the due jobs of the lowest level
    being locked by a claim still in progress does not leave the others unclaimed. After a
    claim whose lowest level was above 0, MySQL reads the lowest due level without locks
    before it locks from there: that read sees the locked jobs, and the claim goes on past
    them all the same."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: a second claim waits for the first")
    for key, priority in [("a0", 0), ("b0", 0), ("c4", 4), ("d7", 7), ("e7", 7)]:
        await dispatch(record(key), priority=priority)
    async with engine.connect() as first, first.begin():  # as a claim in progress holds them
        level_0 = sa.select(jobs.c.id).where(jobs.c.priority == 0)
        for job_id in list((await first.execute(level_0)).scalars()):  # one by primary key:
            lock = sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update()
            assert (await first.execute(lock)).scalar_one() == job_id  # (MariaDB scans an IN)
        sent: list[str] = []

        def record_select(conn: object, cursor: object, statement: str, *args: object) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                sent.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", record_select)
        try:
            async with engine.connect() as second:
                claimed = await sql.claim(second, "default", 10, 2, 60.0, lowest_level=lowest_level)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", record_select)
    assert [job.priority for job in claimed] == [4, 7, 7]
    if engine.dialect.name != "postgresql":  # MySQL: the unlocked read of the lowest level
        locking = ["FOR UPDATE" in statement for statement in sent]
        assert locking == ([False, True] if lowest_level else [True]), sent
    async with engine.connect() as again:
        after = await sql.claim(again, "default", 10, 3, 60.0, lowest_level=lowest_level)
        assert [job.priority for job in after] == [0, 0]


async def test_a_paused_queue_is_not_claimed_until_resumed(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await queue.push(record("mail"), queue="mail")
    await queue.push(record("other"))
    await admin.pause_queue(engine, "mail")
    await drain(db_url, queues=("mail", "default"))
    assert [row.job_key for row in await log_rows(engine)] == ["other"]
    assert [j.queue for j in (await admin.list_jobs(engine)).jobs] == ["mail"]
    await admin.resume_queue(engine, "mail")
    await drain(db_url, queues=("mail", "default"))
    assert [row.job_key for row in await log_rows(engine)] == ["other", "mail"]


async def test_a_running_job_cancelled_by_an_operator_stops_and_is_not_retried(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = test_jobs.Sleepy()
    job.key, job.seconds = "long", 60
    await dispatch(job)
    worker = Worker(settings(db_url, stop_when_empty=False))
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(600):
            if await log_rows(engine):
                break
            await asyncio.sleep(0.05)
        (job_id,) = [j.id for j in (await admin.list_jobs(engine, state="running")).jobs]
        result = await admin.cancel_jobs(engine, [job_id], reason="not needed")
        assert result == admin.CancelResult([], [job_id], [])
        for _ in range(600):
            if await count(engine, failed_jobs):
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
    async with engine.connect() as conn:
        (failed,) = (await conn.execute(sa.select(failed_jobs))).all()
    assert failed.exception.startswith(
        "routemq_outbox.errors.Cancelled: cancelled by an operator while running"
    )
    assert failed.job_id == job_id
    assert await count(engine, jobs) == 0
    assert [(r.event, r.attempt) for r in await log_rows(engine)] == [("start", 1)]
    assert worker.stats.failed == 1
    assert worker.stats.retried == 0


async def test_a_flagged_job_a_worker_claims_is_recorded_cancelled_not_run(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    # A job flagged while held, then let go of (its worker stopped before noticing).
    await dispatch(record("flagged"))
    async with engine.begin() as conn:
        await conn.execute(sa.update(jobs).values(cancel_requested=True))
    await drain(db_url)
    assert await log_rows(engine) == []
    assert await count(engine, jobs) == 0
    (listed,) = (await admin.list_failed(engine)).jobs
    assert listed.error == "routemq_outbox.errors.Cancelled: cancelled by an operator"


async def test_a_worker_registers_heartbeats_and_leaves(db_url: str, engine: AsyncEngine) -> None:
    worker = Worker(settings(db_url, stop_when_empty=False, lease=3, queues=("a", "b")))
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(600):
            if await admin.list_workers(engine):
                break
            await asyncio.sleep(0.05)
        (info,) = await admin.list_workers(engine)
        assert (info.id, info.queues, info.concurrency, info.alive) == (
            worker.worker_id,
            ["a", "b"],
            10,
            True,
        )
    finally:
        worker.stop()
        await asyncio.wait_for(running, 60)
    assert await admin.list_workers(engine) == []


# ----------------------------------------------------------------------------- real processes


def cli_process(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "routemq_outbox", *args, "--database-url", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out + err


@pytest.mark.parametrize("backend", ["postgresql", "sqlite", "mariadb"])
async def test_a_sigkilled_worker_shows_as_gone_within_its_lease(
    backend: str, request: pytest.FixtureRequest, spawn: SpawnWorker
) -> None:
    url = request.getfixturevalue(DB_URL_FIXTURES[backend])
    engine = create_engine(url)
    try:
        worker = spawn(url, "--lease", "2", "--sleep", "0.1")

        async def states() -> list[tuple[int, bool]]:
            return [(w.pid, w.alive) for w in await admin.list_workers(engine)]

        for _ in range(1200):
            if await states() == [(worker.pid, True)]:
                break
            await asyncio.sleep(0.05)
        assert await states() == [(worker.pid, True)], worker.log()
        worker.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while await states() != [(worker.pid, False)]:
            assert time.monotonic() - killed_at < 60, "the killed worker never showed as gone"
            await asyncio.sleep(0.1)
        (gone,) = await admin.list_workers(engine)
        assert gone.running == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite", "mariadb"])
async def test_two_operators_cancelling_while_workers_claim_never_corrupt_a_job(
    backend: str,
    request: pytest.FixtureRequest,
    spawn: SpawnWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every job either ran (and left) or was recorded cancelled, once; none recorded
    cancelled before it ran has run."""
    url = request.getfixturevalue(DB_URL_FIXTURES[backend])
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    total = 3000
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(test_jobs.CREATE_LOG))
            await queue.bulk([record(f"job-{i}") for i in range(total)], session=conn)
        workers = [
            spawn(url, "--sleep", "0.05", "--concurrency", "2", "--batch-size", "2")
            for _ in range(2)
        ]
        while not await log_rows(engine):
            await asyncio.sleep(0.02)
        operators = [cli_process(url, "jobs", "cancel", "--queue", "default") for _ in range(2)]
        for operator in operators:
            code, output = await asyncio.to_thread(finished, operator)
            assert code == 0, output
        for _ in range(1200):  # the workers finish or record what they hold
            if await count(engine, jobs) == 0:
                break
            await asyncio.sleep(0.05)
        for worker in workers:
            worker.signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 60) == 0, worker.log()

        ran = [row.job_key for row in await log_rows(engine)]
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        failed_jobs.c.job_id,
                        failed_jobs.c.exception,
                        sa.cast(failed_jobs.c.payload, sa.Text).label("payload"),
                    )
                )
            ).all()
        cancelled = {test_jobs_key(row.payload): row.exception for row in rows}
        assert await count(engine, jobs) == 0
        assert len(ran) == len(set(ran)), "a job ran twice"
        assert len(rows) == len(cancelled) == len({row.job_id for row in rows})
        assert set(ran) | set(cancelled) == {f"job-{i}" for i in range(total)}
        assert all("Cancelled: cancelled by an operator" in e for e in cancelled.values())
        before_running = {k for k, e in cancelled.items() if "while running" not in e}
        assert not before_running & set(ran), "a job recorded cancelled before it ran, ran"
        assert before_running, "the operators cancelled nothing: the race was not run"
    finally:
        await engine.dispose()


def test_jobs_key(payload: str) -> str:
    import json

    return str(json.loads(payload)["data"]["key"])


test_jobs_key.__test__ = False  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite", "mariadb"])
async def test_pausing_while_workers_claim_stops_claims_and_resuming_drains_the_rest(
    backend: str,
    request: pytest.FixtureRequest,
    spawn: SpawnWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = request.getfixturevalue(DB_URL_FIXTURES[backend])
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    total = 3000
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(test_jobs.CREATE_LOG))
            await queue.bulk([record(f"job-{i}") for i in range(total)], session=conn)
        workers = [
            spawn(url, "--sleep", "0.1", "--concurrency", "2", "--batch-size", "2")
            for _ in range(2)
        ]
        while not await log_rows(engine):
            await asyncio.sleep(0.02)
        code, output = await asyncio.to_thread(finished, cli_process(url, "pause", "default"))
        assert code == 0, output
        # The workers finish what they hold and claim nothing more.
        for _ in range(1200):
            (counts,) = await admin.queue_stats(engine, "default")
            if counts.reserved == 0:
                break
            await asyncio.sleep(0.05)
        assert counts.reserved == 0
        ran = len(await log_rows(engine))
        await asyncio.sleep(1.0)  # ten polls
        (counts,) = await admin.queue_stats(engine, "default")
        assert counts.reserved == 0
        assert len(await log_rows(engine)) == ran < total
        code, output = await asyncio.to_thread(finished, cli_process(url, "resume", "default"))
        assert code == 0, output
        for _ in range(2400):
            if await count(engine, jobs) == 0:
                break
            await asyncio.sleep(0.05)
        for worker in workers:
            worker.signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 60) == 0, worker.log()
        keys = [row.job_key for row in await log_rows(engine)]
        assert sorted(keys) == sorted(f"job-{i}" for i in range(total))
    finally:
        await engine.dispose()
