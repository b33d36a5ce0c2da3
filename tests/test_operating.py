"""Operating the queue with real processes: the failed-job round trip, concurrent retries."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import dispatch
from routemq_outbox.database import create_engine
from routemq_outbox.schema import db_now, failed_jobs, jobs

from . import jobs as test_jobs
from .conftest import ROOT, run_cli


async def scalar(engine: AsyncEngine, query: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text(query))).scalar_one())


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_failed_job_round_trip_with_real_processes(db_url: str, engine: AsyncEngine) -> None:
    """fail → list → show → retry → worked, each step a separate ``routemq-outbox`` process."""
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    job = test_jobs.FailsUntilFixed()
    job.key = "invoice-7"
    await dispatch(job)
    env = {"ROUTEMQ_OUTBOX_DATABASE_URL": db_url}
    work = ("work", "-i", "tests.jobs", "--stop-when-empty", "--sleep", "0.1")

    # fail: both attempts find the downstream service down
    worker = await asyncio.to_thread(run_cli, *work, env=env)
    assert worker.returncode == 0, worker.stderr
    assert "moved to failed_jobs" in worker.stderr

    # list
    listed = ok(await asyncio.to_thread(run_cli, "failed", "list", env=env)).splitlines()
    assert len(listed) == 2
    failed_id, queue_name, name, attempts = listed[1].split()[:4]
    assert (queue_name, name, attempts) == ("default", "tests.fails_until_fixed", "2")
    assert listed[1].endswith("ConnectionError: downstream service for invoice-7 is down")

    # show
    shown = ok(await asyncio.to_thread(run_cli, "failed", "show", failed_id, env=env))
    assert '"key": "invoice-7"' in shown
    assert "Traceback (most recent call last):" in shown
    assert 'raise ConnectionError(f"downstream service for {self.key} is down")' in shown

    # the operator fixes the downstream service, then retries
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(test_jobs.log_table).values(
                job_key="invoice-7", event="fixed", attempt=0, pid=0, at=time.time()
            )
        )
    retried = await asyncio.to_thread(run_cli, "failed", "retry", failed_id, env=env)
    assert ok(retried) == "retried 1 failed job\n"
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(jobs.c.attempts, jobs.c.reserved_at))).one()
    assert tuple(row) == (0, None)
    assert await scalar(engine, "SELECT count(*) FROM failed_jobs") == 0

    # worked
    worker = await asyncio.to_thread(run_cli, *work, env=env)
    assert worker.returncode == 0, worker.stderr
    async with engine.connect() as conn:
        events = (
            await conn.execute(
                sa.select(test_jobs.log_table.c.event, test_jobs.log_table.c.attempt).order_by(
                    test_jobs.log_table.c.at
                )
            )
        ).all()
    assert [tuple(e) for e in events] == [("broken", 1), ("broken", 2), ("fixed", 0), ("ran", 1)]
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0
    assert await scalar(engine, "SELECT count(*) FROM failed_jobs") == 0
    assert ok(await asyncio.to_thread(run_cli, "failed", "list", env=env)) == "no failed jobs\n"


def retry_all_process(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "routemq_outbox", "failed", "retry", "--all", "--batch-size", "50"],
        cwd=ROOT,
        env={**os.environ, "ROUTEMQ_OUTBOX_DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


WAITING_FOR_LOCKS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
async def test_two_concurrent_retry_all_move_every_job_exactly_once(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    engine = create_engine(url)
    total = 6000
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(failed_jobs),
            [
                {
                    "uuid": str(uuid.uuid4()),
                    "connection": "default",
                    "queue": "default" if i % 3 else "emails",
                    "payload": json.dumps({"job": "tests.record", "data": {"key": f"k{i}"}}),
                    "exception": "ValueError: boom",
                    "attempts": 3,
                    "job_id": i,
                }
                for i in range(total)
            ],
        )

    gate = await engine.connect()
    await gate.begin()
    if backend == "postgresql":
        # Both processes block on their first batch until the gate opens, then race.
        await gate.execute(sa.text("LOCK TABLE failed_jobs IN EXCLUSIVE MODE"))
    else:
        await gate.execute(sa.update(failed_jobs).where(failed_jobs.c.id == 0).values(attempts=0))
    processes = [retry_all_process(url), retry_all_process(url)]
    try:
        if backend == "postgresql":
            deadline = time.monotonic() + 60
            while await scalar(engine, WAITING_FOR_LOCKS) < 2:
                assert time.monotonic() < deadline, "the two processes never reached the lock"
                await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(3)  # both start and queue up behind SQLite's one writer
        await gate.commit()
        outputs = [await asyncio.to_thread(p.communicate, timeout=240) for p in processes]
    finally:
        await gate.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
    moved = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        match = re.fullmatch(r"retried (\d+) failed jobs?\n", out)
        assert match, out
        moved.append(int(match[1]))
    assert sum(moved) == total, moved
    if backend == "postgresql":
        assert min(moved) > 0, f"one process did all the work: {moved}"

    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    sa.cast(jobs.c.payload, sa.Text).label("payload"),
                    jobs.c.queue,
                    jobs.c.attempts,
                    (jobs.c.available_at <= db_now()).label("due"),
                )
            )
        ).all()
    assert await scalar(engine, "SELECT count(*) FROM failed_jobs") == 0
    keys = [json.loads(row.payload)["data"]["key"] for row in rows]
    assert len(keys) == total
    assert set(keys) == {f"k{i}" for i in range(total)}
    assert {(row.attempts, bool(row.due)) for row in rows} == {(0, True)}
    assert {json.loads(r.payload)["data"]["key"] for r in rows if r.queue == "emails"} == {
        f"k{i}" for i in range(0, total, 3)
    }
    await engine.dispose()
