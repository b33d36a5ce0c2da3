"""Job classes the tests dispatch and the worker processes import (``--import tests.jobs``).

Jobs that leave a trace write it to the ``job_log`` table of the database in
``ROUTEMQ_OUTBOX_DATABASE_URL``, through their own connection, as a user's job would.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import sqlalchemy as sa

from routemq_outbox import FailJob, Job, RetryJob
from routemq_outbox.database import connection_engine, create_sync_engine

log_table = sa.table(
    "job_log",
    sa.column("job_key", sa.String),
    sa.column("event", sa.String),
    sa.column("attempt", sa.Integer),
    sa.column("pid", sa.Integer),
    sa.column("at", sa.Float),
)

# DOUBLE PRECISION: MySQL's FLOAT is single precision, which rounds a Unix time to minutes.
CREATE_LOG = (
    "CREATE TABLE IF NOT EXISTS job_log (job_key VARCHAR(100) NOT NULL, "
    "event VARCHAR(40) NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)"
)


async def record(key: str, event: str, attempt: int) -> None:
    async with connection_engine("default").begin() as conn:
        await conn.execute(
            sa.insert(log_table).values(
                job_key=key, event=event, attempt=attempt, pid=os.getpid(), at=time.time()
            )
        )


class Record(Job):
    """Records that it ran."""

    job_name = "tests.record"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)


class Sleepy(Job):
    """Records its start, sleeps ``seconds`` (``later_seconds`` after attempt 1 if set),
    records its end."""

    job_name = "tests.sleepy"
    timeout = 120

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.seconds = 1.0
        self.later_seconds: float | None = None

    async def handle(self) -> None:
        await record(self.key, "start", self.attempt)
        later = self.attempt > 1 and self.later_seconds is not None
        await asyncio.sleep(self.later_seconds if later else self.seconds)  # type: ignore[arg-type]
        await record(self.key, "end", self.attempt)


class Resilient(Sleepy):
    """A Sleepy job that keeps trying through a database outage."""

    job_name = "tests.resilient"
    max_tries = 20
    retry_after = 0.5


class Flaky(Job):
    """Fails its first ``failures`` attempts, then succeeds."""

    job_name = "tests.flaky"
    max_tries = 3
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.failures = 2

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        if self.attempt <= self.failures:
            raise ValueError(f"flaky failure {self.attempt}")

    async def failed(self, exc: BaseException) -> None:
        await record(self.key, "failed", self.attempt)


class AlwaysFails(Flaky):
    job_name = "tests.always_fails"

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1_000


class AsksForRetry(Job):
    job_name = "tests.asks_for_retry"
    max_tries = 5

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.delay = 30.0

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        raise RetryJob("not yet", delay=self.delay)


class GivesUp(Job):
    job_name = "tests.gives_up"
    max_tries = 5

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        raise FailJob("the order was cancelled")

    async def failed(self, exc: BaseException) -> None:
        await record(self.key, "failed", self.attempt)


class Slow(Job):
    """Exceeds its timeout."""

    job_name = "tests.slow"
    timeout = 0.2
    max_tries = 2
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        await asyncio.sleep(30)


class Unconstructible(Job):
    """Cannot be built: rows naming it are inserted by hand."""

    job_name = "tests.unconstructible"

    def __init__(self) -> None:
        raise RuntimeError("constructor exploded")

    async def handle(self) -> None:  # pragma: no cover - never built
        raise AssertionError("unreachable")


class SyncHandle(Job):
    """A plain ``def handle``: it runs in a thread."""

    job_name = "tests.sync_handle"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    def handle(self) -> None:  # type: ignore[override]
        time.sleep(0.05)
        engine = create_sync_engine(os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"])
        with engine.begin() as conn:
            conn.execute(
                sa.insert(log_table).values(
                    job_key=self.key,
                    event="ran",
                    attempt=self.attempt,
                    pid=os.getpid(),
                    at=time.time(),
                )
            )
        engine.dispose()


class FailsUntilFixed(Job):
    """Fails while ``job_log`` has no ``fixed`` event for its key: a downstream service that
    is down until an operator fixes it, after which a retried job succeeds."""

    job_name = "tests.fails_until_fixed"
    max_tries = 2
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        async with connection_engine("default").connect() as conn:
            fixed = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(log_table)
                .where(log_table.c.job_key == self.key, log_table.c.event == "fixed")
            )
        await record(self.key, "ran" if fixed else "broken", self.attempt)
        if not fixed:
            raise ConnectionError(f"downstream service for {self.key} is down")


# ------------------------------------------------------------------ hostile input, BaseException


class Halt(BaseException):
    """A BaseException of the job's own, outside the Exception hierarchy."""


BASE_EXCEPTIONS: dict[str, type[BaseException]] = {
    "KeyboardInterrupt": KeyboardInterrupt,
    "SystemExit": SystemExit,
    "CancelledError": asyncio.CancelledError,
    "GeneratorExit": GeneratorExit,
    "Halt": Halt,
}


class RaisesBaseException(Job):
    """``handle()`` raises the BaseException named by ``kind`` on every attempt."""

    job_name = "tests.raises_base_exception"
    max_tries = 2
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.kind = "KeyboardInterrupt"

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        raise BASE_EXCEPTIONS[self.kind](f"raised by job {self.key}")

    async def failed(self, exc: BaseException) -> None:
        await record(self.key, "failed", self.attempt)


class SyncRaisesBaseException(RaisesBaseException):
    """The same from a plain ``def handle``, which runs in a thread."""

    job_name = "tests.sync_raises_base_exception"

    def handle(self) -> None:  # type: ignore[override]
        raise BASE_EXCEPTIONS[self.kind](f"raised in a thread by job {self.key}")


class FailedHookRaises(Job):
    """Fails at once; then its ``failed()`` hook raises the BaseException named by ``kind``."""

    job_name = "tests.failed_hook_raises"
    max_tries = 1

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.kind = "SystemExit"

    async def handle(self) -> None:
        raise ValueError(f"{self.key} fails")

    async def failed(self, exc: BaseException) -> None:
        await record(self.key, "failed", self.attempt)
        raise BASE_EXCEPTIONS[self.kind](f"raised by failed() of {self.key}")


def _wait_for_file(path: str, limit: float = 120) -> None:
    """Block the calling thread (with ``time.sleep``) until ``path`` exists."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


class BlocksTheLoop(Job):
    """On attempt 1, ``async def handle`` blocks the event loop with ``time.sleep`` until the
    file ``release`` exists: nothing else in its worker runs meanwhile, heartbeats included."""

    job_name = "tests.blocks_the_loop"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.release = ""

    async def handle(self) -> None:
        await record(self.key, "start", self.attempt)
        if self.attempt == 1:
            _wait_for_file(self.release)  # the mistake this job exists to make
        await record(self.key, "end", self.attempt)


class BlocksAThread(Job):
    """The right way to block: a plain ``def handle`` runs in a thread, so the worker's event
    loop (and its heartbeats) carry on."""

    job_name = "tests.blocks_a_thread"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.release = ""

    def handle(self) -> None:  # type: ignore[override]
        _log_sync(self.key, "start", self.attempt)
        _wait_for_file(self.release)
        _log_sync(self.key, "end", self.attempt)


def _log_sync(key: str, event: str, attempt: int) -> None:
    engine = create_sync_engine(os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(
            sa.insert(log_table).values(
                job_key=key, event=event, attempt=attempt, pid=os.getpid(), at=time.time()
            )
        )
    engine.dispose()


class AwaitsAPoisonedFuture(Job):
    """Awaits a future holding GeneratorExit. asyncio throws that into the worker's task at its
    outermost coroutine, past every handler in between, so the attempt ends with no outcome;
    the worker then leaves the job to its lease, and the rescue retries and finally fails it."""

    job_name = "tests.awaits_a_poisoned_future"
    max_tries = 2

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # Set once the task waits on it: the task's wake-up then *throws* the exception in.
        loop.call_later(0.01, future.set_exception, GeneratorExit("poisoned future"))
        await future


# ------------------------------------------------------------------ worker faults


class WaitsForFile(Job):
    """Records its start, waits (without blocking the loop) until the file ``release``
    exists, records its end. One attempt only: a spent attempt shows in failed_jobs."""

    job_name = "tests.waits_for_file"
    max_tries = 1
    timeout = 120

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.release = ""

    async def handle(self) -> None:
        await record(self.key, "start", self.attempt)
        while not os.path.exists(self.release):
            await asyncio.sleep(0.05)
        await record(self.key, "end", self.attempt)


class HookSleeps(Job):
    """Fails at once; its ``failed()`` hook records, sleeps ``hook_seconds``, records."""

    job_name = "tests.hook_sleeps"
    max_tries = 1
    timeout = 60

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.hook_seconds = 4.0

    async def handle(self) -> None:
        raise ValueError(f"{self.key} fails")

    async def failed(self, exc: BaseException) -> None:
        await record(self.key, "hook start", self.attempt)
        await asyncio.sleep(self.hook_seconds)
        await record(self.key, "hook end", self.attempt)


class HookHangs(Job):
    """Fails at once; its ``failed()`` hook never returns (an alert call with no timeout)."""

    job_name = "tests.hook_hangs"
    max_tries = 1
    timeout = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        raise ValueError(f"{self.key} fails")

    async def failed(self, exc: BaseException) -> None:
        await record(self.key, "hook start", self.attempt)
        await asyncio.Event().wait()


class SyncHook(Job):
    """A plain ``def handle`` that fails and a plain ``def failed()`` that blocks a while."""

    job_name = "tests.sync_hook"
    max_tries = 1

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    def handle(self) -> None:  # type: ignore[override]
        raise ValueError(f"{self.key} fails")

    def failed(self, exc: BaseException) -> None:  # type: ignore[override]
        time.sleep(1.0)
        _log_sync(self.key, "hook end", self.attempt)


class Stubborn(Job):
    """Swallows every cancellation (``except BaseException: continue``, a common mistake) for
    ``seconds`` (for ever when 0), then returns."""

    job_name = "tests.stubborn"
    max_tries = 1
    timeout = 1

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.seconds = 0.0

    async def handle(self) -> None:
        await record(self.key, "start", self.attempt)
        started = time.monotonic()
        while not self.seconds or time.monotonic() - started < self.seconds:
            try:
                await asyncio.sleep(0.05)
            except BaseException:  # the mistake this job exists to make
                continue


# Released by the tests that leave threads hanging in this process.
RELEASE_THREADS = threading.Event()


class HangsInAThread(Job):
    """A plain ``def handle`` that never returns (a socket read without a timeout) until
    ``RELEASE_THREADS`` is set; ``for_ever`` ignores even that."""

    job_name = "tests.hangs_in_a_thread"
    max_tries = 1
    timeout = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.for_ever = False

    def handle(self) -> None:  # type: ignore[override]
        if self.for_ever:
            threading.Event().wait()
        RELEASE_THREADS.wait()


# Filled by the in-process tests of sync handlers.
SYNC_RUNS: list[str] = []


class SyncSleeps(Job):
    """A plain ``def handle`` that blocks ``seconds`` (a slow HTTP call), then notes its key."""

    job_name = "tests.sync_sleeps"
    max_tries = 1
    timeout = 1.8

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.seconds = 1.0

    def handle(self) -> None:  # type: ignore[override]
        time.sleep(self.seconds)
        SYNC_RUNS.append(self.key)


class InfiniteRetryDelay(Job):
    """Fails, and asks for a retry delay no database can store."""

    job_name = "tests.infinite_retry_delay"
    max_tries = 3

    async def handle(self) -> None:
        raise ValueError("fails")

    def retry_delay(self, attempt: int) -> float:
        return float("inf")


class RetriesAfter(Job):
    """Sleeps ``seconds``, then asks to be retried in a minute."""

    job_name = "tests.retries_after"
    max_tries = 5

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.15

    async def handle(self) -> None:
        await asyncio.sleep(self.seconds)
        raise RetryJob("again later", delay=60)


class UniqueSync(Job):
    """A unique job (one per account while it waits); records that it ran."""

    job_name = "tests.unique_sync"
    unique_by = ("account_id",)
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.account_id: int | str = 0
        self.key = ""
        self.fail_first = False

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        if self.fail_first and self.attempt == 1:
            raise RuntimeError("first attempt fails")


class UniqueActive(UniqueSync):
    """Unique while it waits or runs."""

    job_name = "tests.unique_active"
    unique_while = "active"


class UniqueWindow(UniqueSync):
    """Unique for a second after dispatch, even once it ran."""

    job_name = "tests.unique_window"
    unique_for = 1.0


class Ledger(Job):
    """A serial job (one at a time per account, in dispatch order): records its start and end
    around ``seconds`` of sleep; fails its first ``failures`` attempts."""

    job_name = "tests.ledger"
    serial_by = ("account",)
    retry_after = 0
    max_tries = 3

    def __init__(self) -> None:
        super().__init__()
        self.account = ""
        self.key = ""
        self.seconds = 0.0
        self.failures = 0

    async def handle(self) -> None:
        await record(self.key, "start", self.attempt)
        await asyncio.sleep(self.seconds)
        await record(self.key, "end", self.attempt)
        if self.attempt <= self.failures:
            raise RuntimeError(f"attempt {self.attempt} fails")
