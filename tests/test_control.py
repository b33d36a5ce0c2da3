"""The control plane's admin functions: listing, cancelling and hurrying jobs, pausing queues,
seeing workers. On every engine, against real databases."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import admin, queue, sql
from routemq_outbox.errors import (
    ConfigurationError,
    InvalidQueueName,
    NotFound,
    UnknownJobId,
    UnknownQueue,
)
from routemq_outbox.schema import db_now_plus, failed_jobs, jobs, workers

from . import jobs as test_jobs


def record(key: str) -> test_jobs.Record:
    job = test_jobs.Record()
    job.key = key
    return job


async def add(
    engine: AsyncEngine, keys: list[str], queue_name: str = "default", **kw: float
) -> list[int]:
    """Dispatch Record jobs (due 10 s ago, or ``delay`` seconds from now); their ids."""
    async with engine.begin() as conn:
        first = (
            await conn.execute(sa.select(sa.func.coalesce(sa.func.max(jobs.c.id), 0)))
        ).scalar_one()
        await queue.bulk([record(k) for k in keys], queue=queue_name, session=conn, **kw)
        if "delay" not in kw:
            await conn.execute(
                sa.update(jobs)
                .where(jobs.c.id > first)
                .values(available_at=db_now_plus(sa.literal(-10.0)))
            )
        ids = await conn.execute(sa.select(jobs.c.id).where(jobs.c.id > first).order_by(jobs.c.id))
        return [int(i) for i in ids.scalars()]


async def hold(
    engine: AsyncEngine, queue_name: str, count: int, worker: str | None = None
) -> list[int]:
    """Claim ``count`` due jobs of the queue as a worker would (``worker``: its row id)."""
    async with engine.connect() as conn:
        claimed = await sql.claim(conn, queue_name, count, 7, 60.0, worker=worker)
        await conn.commit()
    return [c.id for c in claimed]


async def test_jobs_list_in_keyset_pages_with_filters(engine: AsyncEngine) -> None:
    due = await add(engine, [f"d{i}" for i in range(5)])
    later = await add(engine, ["l0", "l1"], delay=3600)
    other = await add(engine, ["o0"], queue_name="other")
    running = await hold(engine, "default", 2)
    assert running == due[:2]

    seen: list[int] = []
    after = None
    pages = 0
    while True:
        page = await admin.list_jobs(engine, after=after, limit=3)
        seen += [j.id for j in page.jobs]
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == due + later + other
    assert pages == 3

    states = {
        state: [j.id for j in (await admin.list_jobs(engine, state=state)).jobs]
        for state in ("pending", "delayed", "running")
    }
    assert states == {"pending": due[2:] + other, "delayed": later, "running": running}
    assert [j.id for j in (await admin.list_jobs(engine, queue="other")).jobs] == other
    assert [
        j.id
        for j in (
            await admin.list_jobs(engine, job="tests.record", queue="default", state="delayed")
        ).jobs
    ] == later
    assert (await admin.list_jobs(engine, job="tests.nothing")).jobs == []
    assert [j.id for j in (await admin.list_jobs(engine, text='"l1"')).jobs] == [later[1]]
    assert (await admin.list_jobs(engine, text="%")).jobs == []  # a wildcard is only itself

    info = (await admin.list_jobs(engine, queue="default", state="running")).jobs[0]
    assert (info.queue, info.job, info.state, info.priority, info.attempts) == (
        "default",
        "tests.record",
        "running",
        0,
        1,
    )
    assert info.reserved_until is not None
    assert info.reserved_until.tzinfo is not None
    assert json.loads(info.payload)["data"]["key"] == "d0"

    for bad in ({"limit": 0}, {"limit": admin.MAX_JOB_PAGE + 1}, {"state": "done"}, {"after": -1}):
        with pytest.raises(ConfigurationError):
            await admin.list_jobs(engine, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidQueueName):
        await admin.list_jobs(engine, queue="")


async def test_show_job_and_unknown_ids(engine: AsyncEngine) -> None:
    (job_id,) = await add(engine, ["a"], delay=60)
    shown = await admin.show_job(engine, job_id)
    assert (shown.id, shown.state, shown.cancel_requested, shown.unique_key) == (
        job_id,
        "delayed",
        False,
        None,
    )
    with pytest.raises(UnknownJobId, match=f"no job with id {job_id + 1}"):
        await admin.show_job(engine, job_id + 1)
    with pytest.raises(ConfigurationError):
        await admin.show_job(engine, 0)


async def test_cancel_moves_waiting_jobs_to_failed_jobs_and_flags_running_ones(
    engine: AsyncEngine,
) -> None:
    ids = await add(engine, ["a", "b", "c"])
    async with engine.begin() as conn:
        await conn.execute(sa.update(jobs).where(jobs.c.id == ids[1]).values(priority=4))
    (running,) = await hold(engine, "default", 1)
    assert running == ids[0]

    result = await admin.cancel_jobs(
        engine, [ids[1], ids[2], running, 999_999], reason="wrong customer"
    )
    assert result == admin.CancelResult(
        deleted=[ids[1], ids[2]], stopping=[running], missing=[999_999]
    )

    async with engine.connect() as conn:
        left = (await conn.execute(sa.select(jobs.c.id, jobs.c.cancel_requested))).all()
        failed = (
            await conn.execute(
                sa.select(
                    failed_jobs.c.job_id,
                    failed_jobs.c.exception,
                    failed_jobs.c.priority,
                    failed_jobs.c.attempts,
                ).order_by(failed_jobs.c.job_id)
            )
        ).all()
    assert [(i, bool(flag)) for i, flag in left] == [(running, True)]
    assert [(row.job_id, row.priority, row.attempts) for row in failed] == [
        (ids[1], 4, 0),
        (ids[2], 0, 0),
    ]
    assert all(
        row.exception == "routemq_outbox.errors.Cancelled: cancelled by an operator: wrong customer"
        for row in failed
    )
    listed = await admin.list_failed(engine)
    assert {j.error for j in listed.jobs} == {
        "routemq_outbox.errors.Cancelled: cancelled by an operator: wrong customer"
    }
    assert (await admin.show_job(engine, running)).cancel_requested

    # Cancelling again: nothing left to delete; the running job stays flagged.
    again = await admin.cancel_jobs(engine, [ids[1], running])
    assert again == admin.CancelResult(deleted=[], stopping=[running], missing=[ids[1]])
    with pytest.raises(ConfigurationError):
        await admin.cancel_jobs(engine, [])


async def _lock_waiters(engine: AsyncEngine) -> int:
    """How many transactions wait for a row lock. Asked on a new connection each time:
    PostgreSQL keeps pg_stat_activity as it was for the rest of a transaction. MariaDB's
    information_schema.innodb_trx leaves some waiting transactions out; the list of
    transactions in its status does not (the latest deadlock, above it, is skipped)."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            return int((await conn.execute(sa.text(waiting))).scalar_one())
        status = str((await conn.execute(sa.text("SHOW ENGINE INNODB STATUS"))).one()[2])
        return status.split("\nTRANSACTIONS\n", 1)[1].count("\nLOCK WAIT ")


async def test_cancelling_running_jobs_cannot_deadlock_with_their_worker(
    engine: AsyncEngine,
) -> None:
    """A worker's statement holds its second running job, the operator waits for it, then the
    statement takes the first one too (a worker locks its rows in whatever order its plan
    reads them). An operator holding the first while it waits for the second would be a
    deadlock, and one of the two would be rolled back."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: a second one waits, it cannot deadlock")
    await add(engine, ["first", "second"])
    first, second = await hold(engine, "default", 2)
    extend = sa.update(jobs).values(lease_expires_at=db_now_plus(sa.literal(60.0)))
    async with engine.connect() as worker:
        await worker.execute(extend.where(jobs.c.id == second))
        operator = asyncio.create_task(admin.cancel_jobs(engine, [first, second]))
        for _ in range(200):
            if await _lock_waiters(engine):
                break
            await asyncio.sleep(0.02)
        assert await _lock_waiters(engine) == 1, "the operator never waited for the worker"
        await worker.execute(extend.where(jobs.c.id == first))  # fails if it was a deadlock
        await worker.commit()
        result = await asyncio.wait_for(operator, 30)
    assert result == admin.CancelResult(deleted=[], stopping=[first, second], missing=[])


async def test_retrying_a_cancelled_job_gives_back_its_priority(engine: AsyncEngine) -> None:
    (job_id,) = await add(engine, ["a"])
    async with engine.begin() as conn:
        await conn.execute(sa.update(jobs).values(priority=7))
    await admin.cancel_jobs(engine, [job_id])
    assert await admin.retry_failed(engine, all=True) == 1
    (back,) = (await admin.list_jobs(engine)).jobs
    assert (back.priority, back.cancel_requested, back.state) == (7, False, "pending")


async def test_cancel_matching_takes_one_queue_and_job_name(engine: AsyncEngine) -> None:
    mine = await add(engine, ["a", "b"], queue_name="mail")
    others = await add(engine, ["c"], queue_name="sms")
    async with engine.begin() as conn:  # another job class in the same queue
        await conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == mine[1])
            .values(payload='{"job": "tests.other", "data": {}}')
        )
    result = await admin.cancel_matching(engine, queue="mail", job="tests.record")
    assert result == admin.CancelResult(deleted=[mine[0]], stopping=[], missing=[])
    rest = await admin.cancel_matching(engine, queue="mail")
    assert rest.deleted == [mine[1]]
    assert [j.id for j in (await admin.list_jobs(engine)).jobs] == others
    with pytest.raises(UnknownQueue, match="'nowhere'"):
        await admin.cancel_matching(engine, queue="nowhere")


async def test_a_cancelled_serial_head_lets_the_next_job_of_its_key_run(
    engine: AsyncEngine,
) -> None:
    first, second = test_jobs.Ledger(), test_jobs.Ledger()
    first.account, second.account = "a", "a"
    async with engine.begin() as conn:
        await queue.push(first, session=conn)
        await queue.push(second, session=conn)
    head, parked = [j.id for j in (await admin.list_jobs(engine)).jobs]
    assert (await admin.show_job(engine, parked)).state == "delayed"
    await admin.cancel_jobs(engine, [head])
    assert (await admin.show_job(engine, parked)).state == "pending"


async def test_run_now_makes_waiting_jobs_due_or_changes_nothing(engine: AsyncEngine) -> None:
    later = await add(engine, ["a", "b"], delay=3600)
    (running,) = await hold(engine, "default", 1) or [None]
    assert running is None  # nothing due yet
    with pytest.raises(UnknownJobId, match="999999"):
        await admin.run_now(engine, [later[0], 999_999])
    assert (await admin.show_job(engine, later[0])).state == "delayed"
    assert await admin.run_now(engine, [later[0]]) == [later[0]]
    assert [j.id for j in (await admin.list_jobs(engine, state="pending")).jobs] == [later[0]]
    assert await hold(engine, "default", 5) == [later[0]]
    assert await admin.run_now(engine, [later[0]]) == []  # running: left alone


async def test_pause_and_resume_queues(engine: AsyncEngine) -> None:
    await add(engine, ["a", "b"], queue_name="mail")
    await add(engine, ["c"], queue_name="sms", delay=60)
    await admin.pause_queue(engine, "mail")
    await admin.pause_queue(engine, "mail")  # idempotent
    states = {q.name: q for q in await admin.list_queues(engine)}
    assert states["mail"] == admin.QueueState(
        "mail", True, 2, 0, 0, 0, states["mail"].oldest_due_age
    )
    assert states["mail"].oldest_due_age is not None
    assert states["mail"].oldest_due_age >= 9
    assert states["sms"] == admin.QueueState("sms", False, 0, 1, 0, 0, None)
    assert await sql.paused_queue_names(engine) == {"mail"}

    with pytest.raises(UnknownQueue, match="'mial'"):
        await admin.pause_queue(engine, "mial")
    with pytest.raises(InvalidQueueName):
        await admin.pause_queue(engine, "x" * 256)
    with pytest.raises(UnknownQueue):
        await admin.resume_queue(engine, "mial")

    # A paused queue stays known (and listed) once its jobs are gone.
    await admin.cancel_matching(engine, queue="mail")
    listed = {q.name: q.paused for q in await admin.list_queues(engine)}
    assert listed == {"mail": True, "sms": False}
    await admin.resume_queue(engine, "mail")
    await admin.resume_queue(engine, "mail")  # known through its failed jobs; not paused: fine
    assert await sql.paused_queue_names(engine) == set()
    assert not any(q.paused for q in await admin.list_queues(engine))


async def add_failed(engine: AsyncEngine, queue_name: str, count: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(failed_jobs),
            [
                {
                    "uuid": f"00000000-0000-4000-8000-{queue_name[:4]:0>4}{i:08d}",
                    "connection": "default",
                    "queue": queue_name,
                    "payload": json.dumps({"job": "tests.record", "data": {"key": str(i)}}),
                    "exception": "ValueError: boom",
                    "attempts": 3,
                }
                for i in range(count)
            ],
        )


async def test_capped_counts_stop_at_the_cap_and_say_which_reached_it(
    engine: AsyncEngine,
) -> None:
    await add(engine, [f"p{i}" for i in range(7)], queue_name="mail")
    await add(engine, ["d0", "d1"], queue_name="mail", delay=60)
    await hold(engine, "mail", 2)
    await add_failed(engine, "mail", 4)
    await add(engine, [f"h{i}" for i in range(3)], queue_name="sms", priority=9)
    await add_failed(engine, "gone", 1)
    await admin.pause_queue(engine, "sms")

    exact = {q.name: q for q in await admin.list_queues(engine)}
    assert [(q.pending, q.delayed, q.running, q.failed) for q in exact.values()] == [
        (0, 0, 0, 1),
        (5, 2, 2, 4),
        (3, 0, 0, 0),
    ]
    assert all(q.capped == frozenset() for q in exact.values())

    capped = {q.name: q for q in await admin.list_queues(engine, cap=3)}
    assert list(capped) == list(exact)
    mail = capped["mail"]
    assert (mail.pending, mail.delayed, mail.running, mail.failed) == (3, 2, 2, 3)
    assert mail.capped == {"pending", "failed"}
    assert mail.oldest_due_age == pytest.approx(exact["mail"].oldest_due_age, abs=5)
    assert mail.oldest_due_age is not None
    assert mail.oldest_due_age >= 9
    sms = capped["sms"]
    assert (sms.paused, sms.pending, sms.capped) == (True, 3, frozenset())  # at the cap: exact
    assert sms.oldest_due_age is not None  # found on its own priority level
    assert capped["gone"] == exact["gone"]

    def counted(q: admin.QueueState) -> tuple[object, ...]:
        return (q.name, q.paused, q.pending, q.delayed, q.running, q.failed, q.capped)

    roomy = await admin.list_queues(engine, cap=100)
    assert [counted(q) for q in roomy] == [counted(q) for q in exact.values()]
    with pytest.raises(ValueError, match="cap"):
        await admin.list_queues(engine, cap=0)


async def test_queue_names_are_the_queues_list_queues_lists(engine: AsyncEngine) -> None:
    assert await admin.queue_names(engine) == []
    await add(engine, ["a"], queue_name="waiting")
    await add(engine, ["b"], queue_name="later", delay=60)
    await add(engine, ["c"], queue_name="running")
    await hold(engine, "running", 1)
    await add_failed(engine, "broken", 2)
    await add_failed(engine, "waiting", 1)
    await add(engine, ["d"], queue_name="zzz")
    await admin.pause_queue(engine, "zzz")
    await admin.cancel_matching(engine, queue="zzz")  # its job goes to failed_jobs

    names = await admin.queue_names(engine)
    assert names == [q.name for q in await admin.list_queues(engine)]
    assert names == ["broken", "later", "running", "waiting", "zzz"]
    assert await sql.known_queues(engine) == [q.queue for q in await admin.queue_stats(engine)]
    assert await admin.queue_names(engine, failed_only=True) == ["broken", "waiting", "zzz"]


async def test_an_idle_queue_a_live_worker_serves_can_be_paused(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await sql.register_worker(
            conn,
            worker_id="w1",
            host="h",
            pid=1,
            queues=["idle"],
            concurrency=1,
            version="1",
            lease=60,
        )
        await conn.commit()
    await admin.pause_queue(engine, "idle")
    assert [(q.name, q.paused) for q in await admin.list_queues(engine)] == [("idle", True)]


async def test_workers_are_listed_live_first_with_their_running_jobs(engine: AsyncEngine) -> None:
    await add(engine, ["a", "b", "c"])
    async with engine.connect() as conn:
        for worker_id in ("live", "gone"):
            await sql.register_worker(
                conn,
                worker_id=worker_id,
                host="box",
                pid=42,
                queues=["default", "mail"],
                concurrency=4,
                version="1.2.3",
                lease=30,
            )
        await conn.execute(
            sa.update(workers)
            .where(workers.c.id == "gone")
            .values(last_seen=db_now_plus(sa.literal(-31.0)))
        )
        await conn.commit()
    held = await hold(engine, "default", 2, worker="live")
    await hold(engine, "default", 1, worker="gone")

    live, gone = await admin.list_workers(engine)
    assert (
        live.id,
        live.alive,
        live.running,
        live.queues,
        live.concurrency,
        live.pid,
        live.host,
        live.version,
    ) == ("live", True, held, ["default", "mail"], 4, 42, "box", "1.2.3")
    assert (gone.id, gone.alive, gone.running) == ("gone", False, [])
    assert live.last_seen.tzinfo is not None
    assert live.started_at <= live.last_seen

    async with engine.connect() as conn:
        assert await sql.touch_worker(conn, "gone")
        assert await sql.prune_workers(conn, 3600) == 0
        await conn.execute(
            sa.update(workers)
            .where(workers.c.id == "gone")
            .values(last_seen=db_now_plus(sa.literal(-7200.0)))
        )
        assert await sql.prune_workers(conn, 3600) == 1
        assert not await sql.touch_worker(conn, "gone")
        await conn.commit()
    assert [w.id for w in await admin.list_workers(engine)] == ["live"]


def test_not_found_errors_share_one_base() -> None:
    assert issubclass(UnknownJobId, NotFound)
    assert issubclass(UnknownJobId, LookupError)
