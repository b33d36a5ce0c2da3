"""What scheduling periodic jobs costs the database when nothing is due.

A scheduler with 100 schedules (none due during the run) checks the database clock for
``--seconds``; every statement it sends is counted, with its time, through SQLAlchemy's cursor
events, on a database of its own that it creates, migrates and drops::

    python -m benchmarks.schedule_cost                       # PostgreSQL, 130 s
    python -m benchmarks.schedule_cost --quick               # 65 s
    python -m benchmarks.schedule_cost --database-url mysql://root@127.0.0.1:3306/test
    python -m benchmarks.schedule_cost --database-url sqlite+aiosqlite:///bench.db

Exit status 1 when the scheduler sent more than one statement per second, or enqueued
anything.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from routemq_outbox import Job, cron
from routemq_outbox.config import async_url
from routemq_outbox.database import create_engine
from routemq_outbox.migrate import upgrade
from routemq_outbox.scheduler import Scheduler
from routemq_outbox.schema import jobs

SCHEDULES = 100


def schedules(now: datetime) -> dict[str, type[Job]]:
    """100 daily cron schedules, at every minute of the two hours that start an hour from
    now: none falls due during a run shorter than an hour."""
    classes: dict[str, type[Job]] = {}
    for i in range(SCHEDULES):
        at = now + timedelta(hours=1) + timedelta(minutes=i)
        name = f"bench.schedule_{i:03d}"
        expression = f"{at.minute} {at.hour} * * *"
        classes[name] = type(f"Bench{i}", (Job,), {"job_name": name, "schedule": cron(expression)})
    return classes


def database_of(url: str) -> tuple[str, str | None]:
    """A URL of a new database beside ``url`` (a file for SQLite), and its name to drop."""
    parsed = sa.make_url(async_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path(f"bench_schedules_{os.getpid()}.db").resolve()
        return f"sqlite+aiosqlite:///{path}", None
    name = f"bench_schedules_{os.getpid()}"
    return parsed.set(database=name).render_as_string(hide_password=False), name


async def on_server(url: str, statement: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def measure(url: str, seconds: float) -> dict[str, Any]:
    engine = create_engine(url)
    sent: collections.Counter[str] = collections.Counter()
    spent: list[float] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["started"] = time.perf_counter()
        sent[" ".join(statement.split())[:60]] += 1

    def after(conn: Any, *args: Any) -> None:
        spent.append(time.perf_counter() - conn.info.pop("started"))

    try:
        sa.event.listen(engine.sync_engine, "before_cursor_execute", before)
        sa.event.listen(engine.sync_engine, "after_cursor_execute", after)
        stopping = asyncio.Event()
        scheduler = Scheduler(engine, schedules(datetime.now(UTC)), notify=False)
        task = asyncio.create_task(scheduler.run(stopping))
        await asyncio.sleep(seconds)
        stopping.set()
        await task
        sa.event.remove(engine.sync_engine, "before_cursor_execute", before)
        sa.event.remove(engine.sync_engine, "after_cursor_execute", after)
        async with engine.connect() as conn:
            count = sa.select(sa.func.count()).select_from(jobs)
            enqueued = (await conn.execute(count)).scalar_one()
    finally:
        await engine.dispose()
    return {
        "statements": sum(sent.values()),
        "per_second": sum(sent.values()) / seconds,
        "by_statement": dict(sent),
        "mean_ms": 1000 * sum(spent) / len(spent) if spent else 0.0,
        "max_ms": 1000 * max(spent, default=0.0),
        "enqueued": enqueued,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=float, default=130.0)
    parser.add_argument("--quick", action="store_true", help="65 seconds")
    options = parser.parse_args()
    seconds = 65.0 if options.quick else options.seconds
    url, name = database_of(options.database_url)
    server = async_url(options.database_url)
    if name is not None:
        await on_server(server, f"CREATE DATABASE {name}")
    try:
        await asyncio.to_thread(upgrade, url)
        result = await measure(url, seconds)
    finally:
        if name is not None:
            await on_server(server, f"DROP DATABASE {name}")
        else:
            Path(sa.make_url(url).database or "").unlink(missing_ok=True)
    family = sa.make_url(url).get_backend_name()
    print(f"{family}: {SCHEDULES} schedules, nothing due, {seconds:g} s")
    print(
        f"  {result['statements']} statements = {result['per_second']:.3f} per second "
        f"(mean {result['mean_ms']:.2f} ms, max {result['max_ms']:.2f} ms); "
        f"{result['enqueued']} jobs enqueued"
    )
    for statement, count in sorted(result["by_statement"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:5d}  {statement}")
    return 0 if result["per_second"] <= 1.0 and result["enqueued"] == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
