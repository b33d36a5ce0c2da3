"""RouteMQ applications on the outbox: the ``outbox`` queue driver under RouteMQ's own
``dispatch``/``queue``/``QueueWorker``, transactional dispatch, and RouteMQ jobs on our worker,
on every backend."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

pytest.importorskip(
    "routemq", reason="RouteMQ is not installed (it needs Python 3.12+: the routemq extra)"
)

from routemq.job import Job as RouteMQJob
from routemq.queue.queue_manager import QueueManager, dispatch
from routemq.queue.queue_manager import queue as routemq_queue
from routemq.queue.queue_worker import QueueWorker

from routemq_outbox import testing, transaction
from routemq_outbox.execution import load
from routemq_outbox.routemq_driver import OutboxQueue, wrap
from routemq_outbox.routemq_driver import RouteMQJob as Adapter
from routemq_outbox.schema import failed_jobs, jobs
from routemq_outbox.sql import Claimed

from . import routemq_jobs
from .jobs import log_table as job_log


@pytest.fixture(autouse=True)
def _outbox_by_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``QUEUE_CONNECTION=outbox``, which RouteMQ reads once, when it is first imported."""
    monkeypatch.setattr(routemq_queue, "_default_connection", "outbox")
    return


PLACED = sa.insert(job_log).values(job_key="order", event="placed", attempt=0, pid=0, at=0.0)


def email(to: str) -> routemq_jobs.SendEmailJob:
    job = routemq_jobs.SendEmailJob()
    job.to = to
    return job


def keyed(cls: type[Any], key: str) -> Any:
    job = cls()
    job.key = key
    return job


async def log(engine: AsyncEngine) -> list[tuple[str, str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(job_log.c.job_key, job_log.c.event, job_log.c.attempt).order_by(job_log.c.at)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def count(engine: AsyncEngine, table: sa.Table) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar())


def test_routemq_finds_the_driver_by_its_entry_point() -> None:
    assert "outbox" in QueueManager.registered_drivers()
    assert isinstance(QueueManager().get_driver("outbox"), OutboxQueue)


async def test_routemqs_queue_worker_drains_through_the_outbox_driver(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(email("a@example.com"))
    await routemq_queue.push(email("b@example.com"))
    await routemq_queue.bulk([email("c@example.com"), email("d@example.com")])
    await routemq_queue.later(3600, email("later@example.com"))
    await routemq_queue.push(keyed(routemq_jobs.DoomedJob, "doomed"), queue="emails")
    assert await routemq_queue.size("emails") == 6
    stats = await routemq_queue.stats("emails")
    assert (stats["ready"], stats["delayed"]) == (5, 1)

    # four jobs that succeed, and two attempts of the doomed one: six pops
    worker = QueueWorker(queue_name="emails", connection="outbox", max_jobs=6, sleep=0)
    await worker.work()

    events = await log(engine)
    ran = sorted(key for key, event, _ in events if event == "ran")
    assert ran == ["a@example.com", "b@example.com", "c@example.com", "d@example.com"]
    doomed = [(event, attempt) for key, event, attempt in events if key == "doomed"]
    assert doomed == [("start", 1), ("start", 2), ("failed:ValueError", 2)]
    # the delayed job waits; the doomed one is in failed_jobs only, never in both tables
    assert await count(engine, jobs) == 1
    [failed] = await OutboxQueue().list_failed_jobs("emails")
    assert json.loads(failed["payload"])["class"] == "tests.routemq_jobs.DoomedJob"
    assert "ValueError: doomed attempt 2" in failed["exception"]
    assert failed["attempts"] == 2


async def test_a_rolled_back_routemq_dispatch_leaves_no_job(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    class Abandon(Exception):
        pass

    with pytest.raises(Abandon):
        async with AsyncSession(engine) as session, transaction(session):
            await session.execute(PLACED)
            await dispatch(email("rolled-back@example.com"))
            await routemq_queue.push(email("also-rolled-back@example.com"))
            raise Abandon
    assert await count(engine, jobs) == 0
    assert await log(engine) == []

    async with AsyncSession(engine) as session, transaction(session):
        await session.execute(PLACED)
        await dispatch(email("committed@example.com"))
        # not visible outside the transaction until it commits
        assert await count(engine, jobs) == 0
    assert await count(engine, jobs) == 1
    assert await log(engine) == [("order", "placed", 0)]

    # outside a transaction() block RouteMQ's dispatch commits on its own, as it always did
    await dispatch(email("own@example.com"))
    assert await count(engine, jobs) == 2


async def test_transaction_joins_a_transaction_already_begun(
    db_url: str, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as session, session.begin():
        async with transaction(session):
            await dispatch(email("joined@example.com"))
        assert await count(engine, jobs) == 0  # the block did not commit the caller's
        await session.rollback()
    assert await count(engine, jobs) == 0


async def test_our_worker_runs_routemq_jobs_with_retries_and_failed(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    await dispatch(keyed(routemq_jobs.FlakyJob, "flaky"))
    await dispatch(keyed(routemq_jobs.DoomedJob, "doomed"))
    await dispatch(email("e@example.com"))

    stats = await testing.work_off(["default", "emails"])

    assert (stats.succeeded, stats.retried, stats.failed) == (2, 2, 1)
    events = await log(engine)
    assert [(e, a) for k, e, a in events if k == "flaky"] == [
        ("start", 1),
        ("start", 2),
        ("ran", 2),
    ]
    assert [(e, a) for k, e, a in events if k == "doomed"] == [
        ("start", 1),
        ("start", 2),
        ("failed:ValueError", 2),
    ]
    assert ("e@example.com", "ran", 1) in events
    assert await count(engine, jobs) == 0
    async with engine.connect() as conn:
        [(exception, attempts)] = (
            await conn.execute(sa.select(failed_jobs.c.exception, failed_jobs.c.attempts))
        ).all()
    assert "ValueError: doomed attempt 2" in exception
    assert attempts == 2


def claimed(payload: dict[str, Any], attempts: int = 1) -> Claimed:
    return Claimed(1, "default", wrap(json.dumps(payload)), attempts, 1)


def routemq_payload(cls: type[Any], data: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"class": f"{cls.__module__}.{cls.__name__}", "data": data, **settings}


def test_the_payloads_settings_are_the_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    job = load(
        claimed(
            routemq_payload(
                routemq_jobs.SendEmailJob,
                {"to": "x"},
                max_tries=7,
                timeout=0,
                retry_after=5,
                retry_backoff_enabled=True,
                retry_backoff_max_delay=40,
            )
        )
    )
    assert isinstance(job, Adapter)
    assert (job.max_tries, job.timeout, job.retry_after) == (7, 60, 5)  # timeout 0: the default
    assert [job.retry_delay(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert job.routemq.to == "x"


def test_payload_data_never_sets_reserved_attributes() -> None:
    allowed = set(RouteMQJob._allowed_classes)
    job = load(
        claimed(
            routemq_payload(
                routemq_jobs.SendEmailJob,
                {"to": "x", "_allowed_classes": ["os.system"], "_private": 1},
            )
        )
    )
    inner = job.routemq  # type: ignore[attr-defined]
    assert "_allowed_classes" not in vars(inner)
    assert "_private" not in vars(inner)
    assert RouteMQJob._allowed_classes == allowed


async def test_an_unregistered_class_is_refused_even_with_the_allow_list_off(
    monkeypatch: pytest.MonkeyPatch, db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    monkeypatch.setenv("ROUTEMQ_JOB_ALLOWLIST_DISABLED", "1")
    await OutboxQueue().push(json.dumps(routemq_payload(routemq_jobs.UnregisteredJob, {})))
    stats = await testing.work_off()
    assert stats.failed == 1
    assert await log(engine) == []
    [failed] = await OutboxQueue().list_failed_jobs()
    assert "unknown RouteMQ job 'tests.routemq_jobs.UnregisteredJob'" in failed["exception"]


async def test_routemqs_worker_keeps_a_job_that_is_not_routemqs(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    from routemq_outbox import dispatch as outbox_dispatch

    from .jobs import Record

    mine = Record()
    mine.key = "ours"
    await outbox_dispatch(mine)
    driver = OutboxQueue()
    assert await driver.pop("default") is None
    [failed] = await driver.list_failed_jobs("default")
    assert "is not a RouteMQ job" in failed["exception"]
    assert json.loads(failed["payload"])["job"] == "tests.record"  # kept whole, retryable


async def test_the_drivers_lease_heartbeat_reaper_and_failed_job_operations(
    db_url: str, engine: AsyncEngine
) -> None:
    driver = OutboxQueue()
    await driver.push(routemq_jobs.SendEmailJob().serialize(), "emails")
    popped = await driver.pop("emails")
    assert popped is not None
    assert popped["attempts"] == 1
    assert json.loads(popped["payload"])["class"] == "tests.routemq_jobs.SendEmailJob"
    assert await driver.heartbeat(popped["id"], "emails") is True
    assert await driver.pop("emails") is None  # held
    assert await driver.reap_expired("emails", visibility_timeout=300) == 0

    # another driver reaps it once its lease is over: it goes back to pending
    other = OutboxQueue()
    driver._lease = 0.0
    assert await driver.heartbeat(popped["id"], "emails") is True  # lease now ends at once
    assert await other.reap_expired("emails", visibility_timeout=0) == 1
    assert await driver.heartbeat(popped["id"], "emails") is False  # no longer ours
    await driver.delete(popped["id"], "emails")  # the stale holder cannot delete it
    again = await other.pop("emails")
    assert again is not None
    assert again["id"] == popped["id"]
    assert again["attempts"] == 2

    await other.failed("outbox", "emails", again["payload"], "RuntimeError: gave up")
    await other.delete(again["id"], "emails")
    assert await count(engine, jobs) == 0
    [failed] = await other.list_failed_jobs("emails")
    assert await other.get_failed_job(failed["id"]) == failed
    assert await other.get_failed_job(10**9) is None
    assert await other.retry_failed_job(failed["id"]) is True
    assert await other.retry_failed_job(failed["id"]) is False
    assert await other.size("emails") == 1
    third = await other.pop("emails")
    assert third is not None
    await other.failed("outbox", "emails", third["payload"], "RuntimeError: again")
    assert await other.forget_failed_job((await other.list_failed_jobs())[0]["id"]) is True
    await other.failed("outbox", "emails", third["payload"], "not held: failed_jobs only")
    assert await other.flush_failed_jobs("emails") == 1
    assert await other.flush_failed_jobs("nowhere") == 0


async def test_a_worker_process_runs_the_routemq_jobs_it_imports(
    sqlite_url: str, spawn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``routemq-outbox work --import app.jobs`` with only RouteMQ job modules imported."""
    from routemq_outbox.database import create_engine

    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as conn:
            from .jobs import CREATE_LOG

            await conn.execute(sa.text(CREATE_LOG))
        await dispatch(keyed(routemq_jobs.FlakyJob, "flaky"))
        worker = spawn(
            sqlite_url, "--import", "tests.routemq_jobs", "--stop-when-empty", "--sleep", "0.1"
        )
        assert worker.wait(60) == 0, worker.log()
        assert [(e, a) for k, e, a in await log(engine)] == [("start", 1), ("start", 2), ("ran", 2)]
        assert await count(engine, jobs) == 0
    finally:
        await engine.dispose()


def test_the_example_application_runs() -> None:
    import subprocess
    import sys

    from .conftest import ROOT

    app = ROOT / "examples" / "routemq_app"
    done = subprocess.run(
        [sys.executable, "main.py"], cwd=app, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1. order o-1 arrives: {'status': 'accepted', 'order_id': 'o-1'}",
        "2. order o-2 is refused (order o-2 has no items): neither the order nor its job exists",
        "   orders: [('o-1', 'new')]; jobs waiting: 1",
        "3. a worker runs the RouteMQ job:",
        "   processed order o-1 (attempt 1)",
        "   orders: [('o-1', 'processed')]; jobs waiting: 0",
    ]


async def test_our_worker_holds_a_routemq_job_to_its_timeout(
    db_url: str, engine: AsyncEngine
) -> None:
    await dispatch(routemq_jobs.SlowJob())
    started = time.monotonic()
    stats = await testing.work_off()
    assert time.monotonic() - started < 20
    assert stats.failed == 1
    [failed] = await OutboxQueue().list_failed_jobs()
    assert "JobTimeout: attempt 1 ran longer than its 1 s timeout" in failed["exception"]
