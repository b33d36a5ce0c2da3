"""The control plane's costs: the idle claim beside a million delayed jobs, `jobs list` pages
over a million jobs, and a drain with priorities in use against a plain one.

    python -m benchmarks.control                      # PostgreSQL, 1,000,000 jobs
    python -m benchmarks.control --quick              # 20,000 jobs: a smoke run
    python -m benchmarks.control --backend sqlite
    python -m benchmarks.control --backend mariadb

Creates a database of its own (a file on SQLite) and drops it at the end. Prints the numbers,
the claim's plan, and the drain ratio; measures, never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from routemq_outbox import Job, admin, queue, sql
from routemq_outbox.database import create_engine, create_sync_engine
from routemq_outbox.migrate import upgrade
from routemq_outbox.worker import Worker, WorkerSettings

SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/postgres",
    "mariadb": "mysql://root@127.0.0.1:3306/test",
}


class Noop(Job):
    job_name = "benchmarks.control.noop"

    async def handle(self) -> None:
        return None


def create_database(backend: str) -> tuple[str, Callable[[], None]]:
    """A fresh migrated database, and how to drop it."""
    if backend == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="control-bench-"))
        url = f"sqlite+aiosqlite:///{folder / 'bench.db'}"
        upgrade(url)

        def drop_file() -> None:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()

        return url, drop_file
    name = f"bench_control_{os.getpid()}"
    server = sa.make_url(SERVERS[backend])
    admin_engine = create_sync_engine(server.render_as_string(hide_password=False))
    with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = server.set(database=name).render_as_string(hide_password=False)
    upgrade(url)

    def drop() -> None:
        with admin_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if backend == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE {name}"))
        admin_engine.dispose()

    return url, drop


# A million rows in one statement per engine: the payload is a fixed small job.
_FILL = {
    "postgresql": (
        "INSERT INTO jobs (queue, payload, available_at, priority) "
        "SELECT CASE WHEN i % 10 = 0 THEN 'reports' ELSE 'default' END, "
        '\'{"job": "benchmarks.control.noop", "data": {}}\', now() + interval \'1 day\', 0 '
        "FROM generate_series(1, :n) AS i"
    ),
    "sqlite": (
        "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n) "
        "INSERT INTO jobs (queue, payload, available_at, created_at, priority) "
        "SELECT CASE WHEN i % 10 = 0 THEN 'reports' ELSE 'default' END, "
        '\'{"job": "benchmarks.control.noop", "data": {}}\', '
        "strftime('%Y-%m-%d %H:%M:%f', 'now', '+1 day'), "
        "strftime('%Y-%m-%d %H:%M:%f', 'now'), 0 FROM seq"
    ),
    "mariadb": (
        "INSERT INTO jobs (queue, payload, available_at, created_at, priority) "
        "SELECT IF(seq % 10 = 0, 'reports', 'default'), "
        '\'{"job": "benchmarks.control.noop", "data": {}}\', '
        "UTC_TIMESTAMP(6) + INTERVAL 1 DAY, UTC_TIMESTAMP(6), 0 FROM seq_1_to_{n}"
    ),
}


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> float:
    """The median of ``repeat`` calls, in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def drain_rate(url: str, jobs: int, priorities: bool) -> float:
    """Jobs per second for one worker draining ``jobs`` no-op jobs."""
    if priorities:
        levels = collections.Counter(random.randint(0, 9) for _ in range(jobs))
        for level, count in levels.items():
            await queue.bulk([Noop() for _ in range(count)], priority=level)
    else:
        await queue.bulk([Noop() for _ in range(jobs)])
    worker = Worker(
        WorkerSettings(database_url=url, concurrency=50, stop_when_empty=True, sleep=0.05)
    )
    started = time.perf_counter()
    stats = await worker.run()
    elapsed = time.perf_counter() - started
    assert stats.succeeded == jobs, stats
    return jobs / elapsed


async def claim_plan(engine: Any, backend: str) -> str:
    """The plan of the claim as the worker runs it (SQLite, MariaDB: of its row-picking part)."""
    values = {"queue_name": "default", "limit": 100, "new_token": 0, "lease": 0.0, "from_level": 0}
    async with engine.connect() as conn:
        if backend == "postgresql":
            return str(await sql.explain_claim(conn, "default", 100))
        statement = sql._CLAIM["sqlite" if backend == "sqlite" else "mysql"]
        compiled = (statement.reserve if backend == "sqlite" else statement.lock).compile(
            dialect=conn.dialect
        )
        params = tuple(
            compiled.params.get(name) if name not in values else values[name]
            for name in compiled.positiontup or ()
        )
        explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
        rows = await conn.exec_driver_sql(explain + str(compiled), params)
        if backend == "sqlite":
            return "\n".join(str(row[-1]) for row in rows)
        return "\n".join(str(dict(row._mapping)) for row in rows)


async def main(backend: str, quick: bool, rounds: int) -> None:
    size = 20_000 if quick else 1_000_000
    drain_jobs = 2_000 if quick else 20_000
    repeat = 20 if quick else 50
    url, drop = create_database(backend)
    engine = create_engine(url)
    try:
        os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"] = url
        plain, ranked = [], []
        for turn in range(rounds):  # alternated, each first in turn: drift hits both alike
            for ranks in (False, True) if turn % 2 == 0 else (True, False):
                rate = await drain_rate(url, drain_jobs, priorities=ranks)
                (ranked if ranks else plain).append(round(rate))
        print(f"drain of {drain_jobs:,} no-op jobs, one worker, concurrency 50, {rounds} rounds:")
        print(f"  plain (all priority 0): {statistics.median(plain):,.0f} jobs/s {plain}")
        print(f"  priorities 0-9 mixed:   {statistics.median(ranked):,.0f} jobs/s {ranked}")
        print(f"  ratio: {statistics.median(ranked) / statistics.median(plain):.3f}")

        fill = _FILL[backend].replace("{n}", str(size))
        started = time.perf_counter()
        async with engine.begin() as conn:
            await conn.execute(sa.text(fill), {"n": size})
        if backend == "postgresql":
            async with engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE jobs")
        elif backend == "sqlite":
            async with engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE")
        took = time.perf_counter() - started
        print(f"\n{size:,} delayed jobs of priority 0 inserted in {took:.1f} s")
        async with engine.begin() as conn:  # one due job of priority 1 behind them
            await conn.execute(
                sa.text(
                    "INSERT INTO jobs (queue, payload, priority) VALUES "
                    '(\'default\', \'{"job": "benchmarks.control.noop", "data": {}}\', 1)'
                )
            )

        async def idle_claim() -> None:
            async with engine.connect() as conn:
                await sql.claim(conn, "nothing-due", 100, 1, 60.0)

        async def claim_and_release() -> None:
            async with engine.connect() as conn:
                got = await sql.claim(conn, "default", 100, 1, 60.0)
                await sql.release(
                    conn, [(j.id, j.token) for j in got], delay=None, refund_attempt=True
                )
                assert len(got) == 1

        print(
            f"idle claim (queue with no rows):            {await timed(idle_claim, repeat):.2f} ms"
        )
        print(
            f"claim of the one due job behind {size:,} delayed (+ release): "
            f"{await timed(claim_and_release, repeat):.2f} ms"
        )
        print("claim plan:\n" + await claim_plan(engine, backend))

        newest = await sql.newest_job_id(engine)
        pages = {
            "first page": {},
            "middle page": {"after": newest // 2},
            "last page": {"after": newest - 30},
            "queue=reports, middle": {"queue": "reports", "after": newest // 2},
            "state=pending (one row in all)": {"state": "pending"},
        }
        print(f"\njobs list, 50 a page, over {size:,} jobs:")
        for name, options in pages.items():

            async def page(options: dict[str, Any] = options) -> None:
                await admin.list_jobs(engine, limit=50, **options)

            print(f"  {name:<32} {await timed(page, repeat):8.2f} ms")
    finally:
        await engine.dispose()
        drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", choices=("postgresql", "sqlite", "mariadb"), default="postgresql"
    )
    parser.add_argument("--quick", action="store_true", help="20,000 jobs instead of 1,000,000")
    parser.add_argument("--rounds", type=int, default=5, help="drain rounds of each kind")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.backend, arguments.quick, arguments.rounds))
