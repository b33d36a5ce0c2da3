"""routemq-outbox end to end, on the embedded SQLite default.

    python examples/demo.py

Creates the tables, dispatches jobs in the same transaction as business writes, shows that a
rolled-back transaction leaves no job, then runs a real worker process that drains the queue:
one job retried, one moved to failed_jobs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from demo_jobs import DoomedJob, FlakyJob, SendNotificationJob  # noqa: E402

from routemq_outbox import dispatch, queue  # noqa: E402
from routemq_outbox.database import create_engine  # noqa: E402
from routemq_outbox.migrate import upgrade  # noqa: E402


async def business(engine: sa.ext.asyncio.AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)"))
        await conn.execute(
            sa.text("CREATE TABLE notifications (order_id INTEGER PRIMARY KEY, message TEXT)")
        )

    print("2. An order and its notification job, in one transaction (committed):")
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(sa.text("INSERT INTO orders VALUES (1, 'teapot')"))
        job = SendNotificationJob()
        job.order_id, job.message = 1, "your teapot has shipped"
        await dispatch(job, session=session)
    print(f"   pending jobs: {await queue.size('notifications')}")

    print("3. The same, but the transaction rolls back:")
    try:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(sa.text("INSERT INTO orders VALUES (2, 'kettle')"))
            job = SendNotificationJob()
            job.order_id, job.message = 2, "your kettle has shipped"
            await dispatch(job, session=session)
            raise RuntimeError("payment failed")
    except RuntimeError as exc:
        print(f"   rolled back ({exc}); pending jobs still: {await queue.size('notifications')}")

    print("4. A job that fails once, and one that always fails:")
    await queue.bulk([FlakyJob(), DoomedJob()])
    print(f"   pending jobs: {await queue.size('notifications')}")


async def report(engine: sa.ext.asyncio.AsyncEngine) -> None:
    async with engine.connect() as conn:
        sent = (await conn.execute(sa.text("SELECT order_id, message FROM notifications"))).all()
        left = (await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one()
        failed = (
            await conn.execute(sa.text("SELECT queue, attempts, exception FROM failed_jobs"))
        ).all()
    print(f"6. notifications sent: {[tuple(row) for row in sent]}")
    print(f"   jobs left in the queue: {left}")
    for row in failed:
        print(
            f"   failed_jobs: queue={row.queue} attempts={row.attempts} "
            f"exception={row.exception.splitlines()[0]!r}"
        )


async def main() -> None:
    engine = create_engine("sqlite+aiosqlite:///routemq_outbox.db")
    try:
        await business(engine)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    workdir = Path(tempfile.mkdtemp(prefix="routemq-outbox-demo-"))
    os.chdir(workdir)  # the SQLite default, sqlite+aiosqlite:///routemq_outbox.db, lands here
    print(f"1. Creating the tables in {workdir / 'routemq_outbox.db'}")
    upgrade()
    asyncio.run(main())

    print("5. A worker process drains the queue:")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "routemq_outbox",
            "work",
            "--import",
            "demo_jobs",
            "--queue",
            "notifications",
            "--stop-when-empty",
            "--sleep",
            "0.2",
        ],
        env=env,
        check=True,
    )

    engine = create_engine("sqlite+aiosqlite:///routemq_outbox.db")
    asyncio.run(report(engine))
    asyncio.run(engine.dispose())
