"""What the chaos test (tests/test_chaos.py) runs in other processes.

- The job classes its workers import (``--import tests.chaos``). A job writes ``start`` when
  an attempt begins and ``end`` (its effect) when it is done, with the worker's pid, to the
  ``chaos_log`` side table, through a connection of its own, as a user's job would. A fifth
  of the jobs have a plain ``def handle`` (run in the worker's threads, writing through a
  sync driver); the jobs designed to fail have a ``failed()`` hook (async, or a plain ``def``
  for the sync ones) that writes ``hook`` as it starts and ``hooked`` once done, each call
  with a number of its own in place of the attempt.
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
import random
import sys
import threading
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
    """Two jobs in a hundred are designed to fail, one of them sync (always committed:
    42 % 10 and 43 % 10 are not 7)."""
    return key % 100 in (42, 43)


def sync(key: int) -> bool:
    """A fifth of the jobs have a plain ``def handle`` (and 43 is one of them)."""
    return key % 5 == 3


def serial_key(key: int, producers: int) -> str | None:
    """A fifth of the jobs have a serial key, three per producer: each producer commits its
    jobs in key order, so that is the order they must run in."""
    return f"serial-{key % producers}-{key % 3}" if key % 5 == 1 else None


def unique(key: int) -> bool:
    """A fifth of the jobs (42, designed to fail, among them) are dispatched twice with the
    same unique key in their transaction: the second dispatch must be a duplicate."""
    return key % 5 == 2


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


def _logged(key: int, event: str, attempt: int) -> sa.Insert:
    row = {"key": key, "event": event, "attempt": attempt, "pid": os.getpid(), "at": time.time()}
    return postgresql.insert(chaos_log).values(row).on_conflict_do_nothing()


async def log(key: int, event: str, attempt: int) -> None:
    statement = _logged(key, event, attempt)

    async def write() -> None:
        async with log_engine().begin() as conn:
            await conn.execute(statement)

    await persist(write)


_sync_engine: sa.Engine | None = None
_sync_engine_lock = threading.Lock()


def sync_log(key: int, event: str, attempt: int, *, limit: float = 300) -> None:
    """:func:`log` for sync job code (in a worker thread), through psycopg, as a sync job's
    own database writes would go."""
    global _sync_engine
    with _sync_engine_lock:
        if _sync_engine is None:
            url = os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"].replace("+asyncpg", "+psycopg")
            _sync_engine = sa.create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    statement = _logged(key, event, attempt)
    deadline = time.monotonic() + limit
    while True:
        try:
            with _sync_engine.begin() as conn:
                conn.execute(statement)
            return
        except AWAY:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


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
    """Designed to fail: raises after its effect on each of its attempts. Its hook works as
    long as an attempt, so that kills find hooks in the middle of running too."""

    job_name = "tests.chaos_doomed"
    max_tries = DOOMED_TRIES
    retry_after = 0

    async def handle(self) -> None:
        await super().handle()
        raise RuntimeError(f"chaos job {self.key} is designed to fail")

    async def failed(self, exc: BaseException) -> None:
        call = hook_call()
        await log(self.key, "hook", call)
        await asyncio.sleep(self.work)
        await log(self.key, "hooked", call)


class SyncChaosJob(ChaosJob):
    """A plain ``def handle``: blocks its worker thread, never the event loop."""

    job_name = "tests.chaos_sync"

    def handle(self) -> None:  # type: ignore[override]
        sync_log(self.key, "start", self.attempt)
        time.sleep(self.work)
        sync_log(self.key, "end", self.attempt)


class SyncDoomedChaosJob(SyncChaosJob):
    """Designed to fail, in sync code, with a plain ``def failed`` hook."""

    job_name = "tests.chaos_sync_doomed"
    max_tries = DOOMED_TRIES
    retry_after = 0

    def handle(self) -> None:  # type: ignore[override]
        super().handle()
        raise RuntimeError(f"chaos job {self.key} is designed to fail")

    def failed(self, exc: BaseException) -> None:  # type: ignore[override]
        call = hook_call()
        sync_log(self.key, "hook", call)
        time.sleep(self.work)
        sync_log(self.key, "hooked", call)


def hook_call() -> int:
    """A number for one call of a hook, logged in place of the attempt: a write retried
    through a restart is counted once, a hook called twice (even by one worker) twice."""
    return random.randrange(1 << 31)


def job_for(key: int) -> ChaosJob:
    kinds = {
        (False, False): ChaosJob,
        (True, False): DoomedChaosJob,
        (False, True): SyncChaosJob,
        (True, True): SyncDoomedChaosJob,
    }
    job = kinds[doomed(key), sync(key)]()
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
                serial = serial_key(key, step)
                if unique(key):
                    first_try = await dispatch(job_for(key), session=conn, unique_key=f"u{key}")
                    again = await dispatch(job_for(key), session=conn, unique_key=f"u{key}")
                    if first_try is None or again is None or not again.duplicate:
                        raise RuntimeError(f"job {key}: a unique job was dispatched twice")
                elif serial is not None:
                    await dispatch(job_for(key), session=conn, serial_key=serial)
                else:
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
