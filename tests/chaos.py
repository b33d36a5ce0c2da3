"""What the chaos test (tests/test_chaos.py) runs in other processes.

- The job classes its workers import (``--import tests.chaos``). A job writes ``start`` when
  an attempt begins and ``end`` (its effect) when it is done, with the worker's pid, to the
  ``chaos_log`` side table, through a connection of its own, as a user's job would.
- The producer: ``python -m tests.chaos URL FIRST STEP TOTAL`` dispatches the jobs numbered
  FIRST, FIRST+STEP, ... below TOTAL, each in a business transaction that also inserts an
  order row; the transactions of a tenth of them (chosen by number) roll back.

Both keep going through a PostgreSQL restart: their writes retry until the database is back.
A job's log rows are keyed by (job, event, attempt, pid), so a retried write that had in fact
committed is not counted twice.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, dispatch
from routemq_outbox.database import create_engine

QUEUE = "chaos"
MAX_TRIES = 25  # kills spend attempts: plenty, so that only doomed jobs end in failed_jobs
DOOMED_TRIES = 2

TABLES = [
    "CREATE TABLE chaos_orders (key INTEGER PRIMARY KEY)",
    "CREATE TABLE chaos_log (key INTEGER NOT NULL, event VARCHAR(8) NOT NULL, "
    "attempt INTEGER NOT NULL, pid INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL, "
    "PRIMARY KEY (key, event, attempt, pid))",
]

orders = sa.table("chaos_orders", sa.column("key", sa.Integer))
chaos_log = sa.table(
    "chaos_log",
    sa.column("key", sa.Integer),
    sa.column("event", sa.String),
    sa.column("attempt", sa.Integer),
    sa.column("pid", sa.Integer),
    sa.column("at", sa.Float),
)

# Errors that mean "the database is away for now" (a restart): wait and write again.
AWAY = (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError, OSError)


def rolled_back(key: int) -> bool:
    """A tenth of the business transactions roll back, chosen by number."""
    return key % 10 == 7


def doomed(key: int) -> bool:
    """One job in a hundred is designed to fail (always committed: 42 % 10 != 7)."""
    return key % 100 == 42


def work_seconds(key: int) -> float:
    """How long a job works: 0 to 200 ms, so that kills find jobs in the middle of running."""
    return (key * 7919 % 201) / 1000


async def persist(write: Callable[[], Awaitable[Any]], *, limit: float = 300) -> Any:
    """Run ``write`` until the database takes it (it may be restarting)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return await write()
        except sqlalchemy.exc.IntegrityError:
            raise
        except AWAY:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


_engine: AsyncEngine | None = None


def log_engine() -> AsyncEngine:
    """One engine per worker process for the jobs' own writes, as big as their concurrency."""
    global _engine
    if _engine is None:
        _engine = create_engine(
            os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"],
            pool_size=10,
            max_overflow=10,
            pool_pre_ping=True,
        )
    return _engine


async def log(key: int, event: str, attempt: int) -> None:
    row = {"key": key, "event": event, "attempt": attempt, "pid": os.getpid(), "at": time.time()}

    async def write() -> None:
        async with log_engine().begin() as conn:
            await conn.execute(postgresql.insert(chaos_log).values(row).on_conflict_do_nothing())

    await persist(write)


class ChaosJob(Job):
    job_name = "tests.chaos"
    queue = QUEUE
    max_tries = MAX_TRIES
    retry_after = 0.5
    timeout = 300

    def __init__(self) -> None:
        super().__init__()
        self.key = 0
        self.work = 0.0

    async def handle(self) -> None:
        await log(self.key, "start", self.attempt)
        await asyncio.sleep(self.work)
        await log(self.key, "end", self.attempt)


class DoomedChaosJob(ChaosJob):
    """Designed to fail: raises after its effect on each of its attempts."""

    job_name = "tests.chaos_doomed"
    max_tries = DOOMED_TRIES
    retry_after = 0

    async def handle(self) -> None:
        await super().handle()
        raise RuntimeError(f"chaos job {self.key} is designed to fail")


def job_for(key: int) -> ChaosJob:
    job = DoomedChaosJob() if doomed(key) else ChaosJob()
    job.key, job.work = key, work_seconds(key)
    return job


async def produce(url: str, first: int, step: int, total: int) -> tuple[int, int]:
    """Dispatch jobs in business transactions; returns (committed, rolled back)."""
    engine = create_engine(url, pool_pre_ping=True)
    committed = rolled = 0
    for key in range(first, total, step):

        async def transaction(key: int = key) -> bool:
            async with engine.connect() as conn:
                business = await conn.begin()
                await conn.execute(sa.insert(orders).values(key=key))
                await dispatch(job_for(key), session=conn)
                if rolled_back(key):
                    await business.rollback()
                    return False
                await business.commit()
                return True

        try:
            if await persist(transaction):
                committed += 1
            else:
                rolled += 1
        except sqlalchemy.exc.IntegrityError:
            # The order exists: an earlier try did commit, though the connection died before
            # it could say so. Its job was dispatched with it, exactly once.
            committed += 1
    await engine.dispose()
    return committed, rolled


def main(argv: list[str]) -> int:
    url, first, step, total = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    committed, rolled = asyncio.run(produce(url, first, step, total))
    print(f"producer {first}: {committed} committed, {rolled} rolled back", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
