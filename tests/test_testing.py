"""routemq_outbox.testing: the helpers for applications' own tests, on every backend."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from routemq_outbox import dispatch, queue, testing

from . import jobs as test_jobs
from .test_worker import record


def flaky(key: str) -> test_jobs.Flaky:
    job = test_jobs.Flaky()
    job.key = key
    return job


async def test_dispatched_sees_the_sessions_jobs_and_filters_them(
    db_url: str, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await dispatch(record("a"), session=session)
        await queue.push(flaky("b"), queue="other", session=session)
        await queue.later(60, record("c"), session=session)
        every = await testing.dispatched(session=session)
        assert [type(job) for job in every] == [
            test_jobs.Record,
            test_jobs.Flaky,
            test_jobs.Record,
        ]
        records = await testing.dispatched(test_jobs.Record, session=session)
        assert [(job.key, job.queue) for job in records] == [("a", "default"), ("c", "default")]
        other = await testing.dispatched(queue="other", session=session)
        assert [(type(job), job.key) for job in other] == [(test_jobs.Flaky, "b")]
        always = test_jobs.AlwaysFails()
        await dispatch(always, session=session)
        subclasses = await testing.dispatched(test_jobs.Flaky, session=session)
        assert [type(job) for job in subclasses] == [test_jobs.Flaky, test_jobs.AlwaysFails]
        assert await testing.dispatched() == []  # not committed: another transaction sees none
        await session.rollback()
    assert await testing.dispatched() == []


def test_dispatched_sync_reads_a_blocking_session(db_url: str, sync_engine: sa.Engine) -> None:
    with Session(sync_engine) as session, session.begin():
        queue.push_sync(record("s"), session=session)
        [job] = testing.dispatched_sync(test_jobs.Record, session=session)
        assert job.key == "s"


async def test_work_off_runs_the_due_jobs_and_leaves_the_delayed(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await queue.bulk([record("now-1"), record("now-2")])
    await queue.later(3600, record("later"))
    await queue.push(record("elsewhere"), queue="other")
    stats = await testing.work_off()
    assert (stats.succeeded, stats.failed) == (2, 0)
    async with engine.connect() as conn:
        ran = (await conn.execute(sa.select(test_jobs.log_table.c.job_key))).scalars().all()
    assert sorted(ran) == ["now-1", "now-2"]
    left = await testing.dispatched()
    assert sorted(job.key for job in left if isinstance(job, test_jobs.Record)) == [
        "elsewhere",
        "later",
    ]
