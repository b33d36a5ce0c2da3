"""The worker: claim due jobs, run them, and write down what became of them.

One :class:`Worker` runs a few cooperating loops on one event loop:

- the **claim loop** reserves due jobs (never more than free slots or the ``max_jobs`` budget)
  and starts a task per job; it sleeps ``sleep`` seconds when nothing is due, or until a
  PostgreSQL NOTIFY says a job was dispatched;
- the **completer** deletes finished jobs in batches, guarded by their reservation tokens;
- **maintenance** extends the leases of held jobs (heartbeats) and takes over jobs whose
  worker stopped heartbeating, returning them to pending or failing them;
- the **listener** (PostgreSQL) holds a LISTEN connection and reconnects when it drops.

Every database write the worker makes to a job is guarded by the token it got when claiming
it, so a worker whose lease expired can never change a job another worker now holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import sql
from .config import DEFAULT_CONNECTION, redact
from .database import create_engine
from .errors import ConfigurationError
from .execution import Outcome, Verdict, cancelled_from_outside, describe, judge_expired, run
from .job import registered_jobs, validate_queue_name

__all__ = ["Worker", "WorkerSettings", "WorkerStats", "import_job_modules", "serve"]

log = logging.getLogger("routemq_outbox.worker")

# Errors that mean "the database is unreachable or misbehaving right now": log, back off, retry.
TRANSIENT = (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError, OSError, TimeoutError)
_BACKOFF_MAX = 30.0
_FINISH_BATCH = 1000


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs. Validated on construction; CLI flags map one to one."""

    database_url: str
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 10
    batch_size: int = 100
    sleep: float = 1.0
    max_jobs: int | None = None
    max_time: float | None = None
    stop_when_empty: bool = False
    timeout: float | None = None
    max_tries: int | None = None
    lease: float = 60.0
    grace: float = 30.0
    listen: bool = True
    connection_name: str = DEFAULT_CONNECTION

    def __post_init__(self) -> None:
        if not self.queues:
            raise ConfigurationError("a worker needs at least one queue")
        for name in self.queues:
            validate_queue_name(name)
        checks: list[tuple[str, float | None, bool]] = [
            ("concurrency", self.concurrency, False),
            ("batch_size", self.batch_size, False),
            ("sleep", self.sleep, False),
            ("max_jobs", self.max_jobs, False),
            ("max_time", self.max_time, False),
            ("timeout", self.timeout, False),
            ("max_tries", self.max_tries, False),
            ("lease", self.lease, False),
            ("grace", self.grace, True),
        ]
        for name, value, zero_ok in checks:
            if value is not None and (value < 0 or (value == 0 and not zero_ok)):
                raise ConfigurationError(f"{name} must be > 0, got {value!r}")

    def __repr__(self) -> str:
        # The URL may carry a password: never let a log line or a traceback's locals show it.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["database_url"] = redact(self.database_url)
        return f"WorkerSettings({', '.join(f'{k}={v!r}' for k, v in values.items())})"

    @property
    def heartbeat(self) -> float:
        """Seconds between lease extensions: three chances before a lease runs out."""
        return self.lease / 3


@dataclass
class WorkerStats:
    """Counts of what the worker did, by outcome."""

    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    interrupted: int = 0
    claimed: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def processed(self) -> int:
        return self.succeeded + self.retried + self.failed


class _Backoff:
    """Growing pauses between attempts to reach a database that is away."""

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = min(_BACKOFF_MAX, max(0.5, self.delay * 2))
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


class Worker:
    """Drains the ``jobs`` table. ``await worker.run()``; ``worker.stop()`` ends it gracefully."""

    def __init__(self, settings: WorkerSettings, *, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.stats = WorkerStats()
        self._engine = engine
        self._owns_engine = engine is None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._running: dict[asyncio.Task[None], sql.Claimed] = {}
        self._held: dict[int, int] = {}  # job id -> token, for every job this worker holds
        self._done: list[tuple[int, int]] = []
        self._done_ready = asyncio.Event()
        self._deleting: list[tuple[int, int]] = []  # the batch the completer is deleting
        self._writing: set[int] = set()  # jobs whose retry or failure is being written down
        self._closed = asyncio.Event()  # set once running jobs are over: helpers wind down

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        """Stop claiming; running jobs get ``grace`` seconds to finish."""
        self._stopping.set()
        self._wake.set()
        self._slot_freed.set()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            self._engine = create_engine(
                self.settings.database_url, pool_size=4, max_overflow=self.settings.concurrency
            )
        return self._engine

    async def run(self) -> WorkerStats:
        """Work until stopped (or a stop condition holds); returns what was done."""
        settings = self.settings
        listening = settings.listen and self.engine.dialect.name == "postgresql"
        self._log_start(listening)
        helpers = [
            asyncio.create_task(self._completer(), name="routemq-outbox completer"),
            asyncio.create_task(self._maintain(), name="routemq-outbox maintenance"),
        ]
        if listening:
            helpers.append(asyncio.create_task(self._listen(), name="routemq-outbox listener"))
        else:
            helpers.append(asyncio.create_task(_wait(self._closed)))
        timer = (
            asyncio.get_running_loop().call_later(settings.max_time, self.stop)
            if settings.max_time
            else None
        )
        try:
            await self._claim_loop()
        finally:
            if timer:
                timer.cancel()
            self._stopping.set()
            await self._drain_running()  # heartbeats go on meanwhile
            self._closed.set()
            self._done_ready.set()
            # The completer flushes what is left and maintenance ends its round; the
            # listener has nothing to finish.
            helpers[-1].cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._release_unfinished()
            if self._owns_engine and self._engine is not None:
                await self._engine.dispose()
        log.info(
            "worker stopped: %d succeeded, %d retried, %d failed, %d released unfinished",
            self.stats.succeeded,
            self.stats.retried,
            self.stats.failed,
            self.stats.interrupted,
        )
        return self.stats

    # ------------------------------------------------------------------ claiming

    def _budget(self) -> int:
        free = self.settings.concurrency - len(self._running)
        if self.settings.max_jobs is not None:
            free = min(free, self.settings.max_jobs - self.stats.claimed)
        return min(free, self.settings.batch_size)

    async def _claim_loop(self) -> None:
        settings = self.settings
        backoff = _Backoff()
        while not self._stopping.is_set():
            if settings.max_jobs is not None and self.stats.claimed >= settings.max_jobs:
                log.info("claimed --max-jobs=%d jobs; finishing", settings.max_jobs)
                return
            wanted = self._budget()
            if wanted <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wake.clear()
            try:
                claimed = await self._claim(wanted)
            except TRANSIENT as exc:
                pause = backoff.next()
                log.warning("claiming failed (%s); retrying in %.1f s", _brief(exc), pause)
                await self._pause(pause)
                continue
            backoff.reset()
            if claimed == wanted:
                continue  # there may be more due jobs: claim again as soon as slots allow
            if settings.stop_when_empty and not claimed:
                if not self._running:
                    log.info("no due jobs left; stopping (--stop-when-empty)")
                    return
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            await self._idle()

    async def _claim(self, wanted: int) -> int:
        """Claim and start up to ``wanted`` jobs, from the earlier queues first."""
        token = secrets.randbits(63)
        claimed = 0
        for queue in self.settings.queues:
            got = await sql.claim(self.engine, queue, wanted - claimed, token, self.settings.lease)
            for job in got:
                self._start(job)  # at once: a failure on the next queue must not orphan these
            claimed += len(got)
            if claimed >= wanted:
                break
        return claimed

    async def _idle(self) -> None:
        """Sleep until a job may be due: the poll interval, a NOTIFY, or stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.sleep)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # ------------------------------------------------------------------ running

    def _start(self, claimed: sql.Claimed) -> None:
        self.stats.claimed += 1
        self._held[claimed.id] = claimed.token
        task = asyncio.create_task(self._process(claimed), name=f"routemq-outbox job {claimed.id}")
        self._running[task] = claimed
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        claimed = self._running.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error while processing a job", exc_info=task.exception())
            # Its outcome is unknown: stop renewing its lease rather than hold it for as long
            # as this worker lives. Once the lease runs out, the rescue retries or fails it.
            if claimed is not None and self._held.pop(claimed.id, None) is not None:
                log.warning(
                    "job id=%d is left to its lease (%g s): it will run again or fail then",
                    claimed.id,
                    self.settings.lease,
                )

    async def _process(self, claimed: sql.Claimed) -> None:
        outcome = await run(
            claimed, time_limit=self.settings.timeout, max_tries=self.settings.max_tries
        )
        await self._apply(claimed, outcome)

    async def _apply(self, claimed: sql.Claimed, outcome: Outcome) -> None:
        """Write down the outcome of one attempt (or of a rescued job)."""
        verdict = outcome.verdict
        if verdict is Verdict.DONE:
            self.stats.succeeded += 1
            self._done.append((claimed.id, claimed.token))
            self._done_ready.set()
            _log_job(logging.INFO, claimed, outcome, f"succeeded in {_ms(outcome)}")
        elif verdict is Verdict.RETRY:
            pair = [(claimed.id, claimed.token)]
            self._writing.add(claimed.id)
            try:
                held = await self._write(
                    lambda: sql.release(self.engine, pair, delay=outcome.delay)
                )
            finally:
                self._writing.discard(claimed.id)
            self._held.pop(claimed.id, None)
            if not held:
                return
            self.stats.retried += 1
            if not outcome.delay:
                self._wake.set()  # due again at once: no reason to wait for the next poll
            if outcome.error is None:
                what = "was left by a worker that stopped heartbeating; back to pending"
            else:
                when = f"in {outcome.delay:g} s" if outcome.delay else "now"
                what = f"failed in {_ms(outcome)} ({_brief(outcome.error)}); retrying {when}"
            _log_job(logging.WARNING, claimed, outcome, what)
        elif verdict is Verdict.FAIL:
            await self._fail(claimed, outcome)
        else:
            self.stats.interrupted += 1  # released, attempt refunded, at shutdown

    async def _fail(self, claimed: sql.Claimed, outcome: Outcome) -> None:
        error = outcome.error
        assert error is not None
        record = sql.FailedRecord(
            uuid=str(uuid.uuid4()),
            connection=self.settings.connection_name,
            queue=claimed.queue,
            payload=claimed.payload,
            exception=describe(error),
            attempts=claimed.attempts,
            job_id=claimed.id,
        )
        self._writing.add(claimed.id)
        try:
            moved = await self._write(
                lambda: sql.move_to_failed(self.engine, claimed.token, record)
            )
        finally:
            self._writing.discard(claimed.id)
        self._held.pop(claimed.id, None)
        if not moved:
            return
        self.stats.failed += 1
        how = f"failed in {_ms(outcome)}" if outcome.job is not None else "could not be loaded"
        what = f"{how} ({_brief(error)}); moved to failed_jobs"
        _log_job(logging.ERROR, claimed, outcome, what)
        if outcome.job is not None:
            try:
                await outcome.job.failed(error)
            except asyncio.CancelledError:
                if cancelled_from_outside():
                    raise  # shutdown, not the hook
                log.exception("failed() of job id=%d raised", claimed.id)
            except BaseException:
                # Like handle(): SystemExit or KeyboardInterrupt raised by job code must not
                # escape into the event loop, which would stop the whole worker.
                log.exception("failed() of job id=%d raised", claimed.id)

    async def _write(self, operation: Callable[[], Awaitable[int | bool]]) -> bool:
        """Run a guarded write until the database takes it; False if the job was not ours."""
        backoff = _Backoff()
        while True:
            try:
                return bool(await operation())
            except TRANSIENT as exc:
                if self._closed.is_set():
                    log.warning(
                        "could not record a job's outcome (%s); its lease will expire "
                        "and it will run again",
                        _brief(exc),
                    )
                    return False
                pause = backoff.next()
                log.warning("database write failed (%s); retrying in %.1f s", _brief(exc), pause)
                await asyncio.sleep(pause)

    async def _completer(self) -> None:
        """Delete finished jobs in batches: whatever finished while the last delete ran."""
        backoff = _Backoff()
        while True:
            await self._done_ready.wait()
            self._done_ready.clear()
            if not self._done:
                if self._closed.is_set():
                    return
                continue
            # Bounded, so that the statement stays within every engine's parameter limit.
            batch, self._done = self._done[:_FINISH_BATCH], self._done[_FINISH_BATCH:]
            if self._done:
                self._done_ready.set()
            self._deleting = batch
            try:
                deleted = await sql.finish(self.engine, batch)
            except TRANSIENT as exc:
                self._deleting = []
                self._done = batch + self._done
                if self._closed.is_set():
                    log.warning(
                        "could not delete %d finished jobs (%s); they will run again "
                        "after their lease expires",
                        len(batch),
                        _brief(exc),
                    )
                    return
                pause = backoff.next()
                log.warning(
                    "deleting finished jobs failed (%s); retrying in %.1f s", _brief(exc), pause
                )
                await asyncio.sleep(pause)
                self._done_ready.set()
                continue
            self._deleting = []
            backoff.reset()
            for job_id, _ in batch:
                self._held.pop(job_id, None)
            if deleted < len(batch):
                log.warning(
                    "%d finished jobs had been taken over after their lease expired; "
                    "they may run twice",
                    len(batch) - deleted,
                )
            if self._closed.is_set():
                self._done_ready.set()

    async def _drain_running(self) -> None:
        """Give running jobs the grace period, then cancel them."""
        if not self._running:
            return
        grace = self.settings.grace
        log.info("waiting up to %g s for %d running jobs", grace, len(self._running))
        _, pending = await asyncio.wait(set(self._running), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("grace period over: interrupting %d jobs", len(pending))
            await asyncio.wait(pending)

    async def _release_unfinished(self) -> None:
        """Jobs still held at exit go back to pending without spending an attempt."""
        if not self._held:
            return
        pairs = list(self._held.items())
        try:
            released = await sql.release(self.engine, pairs, delay=None, refund_attempt=True)
        except TRANSIENT as exc:
            log.warning(
                "could not release %d unfinished jobs (%s); they run again after "
                "their lease expires",
                len(pairs),
                _brief(exc),
            )
            return
        self._held.clear()
        log.info("released %d unfinished jobs back to pending", released)

    # ------------------------------------------------------------------ leases

    async def _maintain(self) -> None:
        """Heartbeats for held jobs, and rescue of jobs whose worker went silent.

        Runs until the worker is closed, so that jobs finishing in the grace period keep
        their leases; rescuing other workers' jobs stops as soon as stopping begins.
        """
        backoff = _Backoff()
        while not self._closed.is_set():
            try:
                await self._heartbeat()
                if not self._stopping.is_set():
                    await self._rescue()
                backoff.reset()
                pause = self.settings.heartbeat
            except TRANSIENT as exc:
                pause = min(backoff.next(), self.settings.heartbeat)
                log.warning("lease maintenance failed (%s); retrying in %.1f s", _brief(exc), pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), pause)

    async def _heartbeat(self) -> None:
        pairs = list(self._held.items())
        if not pairs:
            return
        kept = await sql.extend_leases(self.engine, pairs, self.settings.lease)
        if kept < len(pairs):
            # Jobs whose outcome was written down meanwhile (deleted, released, failed) may
            # have left before the update reached them; only a shortfall among the others
            # means that other workers took jobs over.
            settling = self._writing | {job_id for job_id, _ in (*self._done, *self._deleting)}
            unsettled = self._held.keys() - settling
            others = sum(1 for job_id, _ in pairs if job_id in unsettled)
            if kept < others:
                log.warning(
                    "%d held jobs were taken over by other workers (leases had expired)",
                    others - kept,
                )

    async def _rescue(self) -> None:
        rescued = await sql.rescue_expired(
            self.engine, self.settings.batch_size, secrets.randbits(63), self.settings.lease
        )
        for claimed in rescued:
            self._held[claimed.id] = claimed.token
            await self._apply(claimed, judge_expired(claimed, max_tries=self.settings.max_tries))

    # ------------------------------------------------------------------ LISTEN/NOTIFY

    async def _listen(self) -> None:
        """Wake the claim loop on NOTIFY; on a lost connection, poll and reconnect."""
        backoff = _Backoff()
        queues = set(self.settings.queues)
        while not self._stopping.is_set():
            lost = asyncio.Event()
            try:
                async with self.engine.connect() as conn:
                    try:
                        driver = await _driver_connection(conn)

                        def on_notify(*args: Any) -> None:
                            if args[3] in queues:
                                self._wake.set()

                        await driver.add_listener(sql.NOTIFY_CHANNEL, on_notify)
                        driver.add_termination_listener(lambda *_, lost=lost: lost.set())
                        backoff.reset()
                        self._wake.set()  # jobs may have arrived while nobody listened
                        log.debug("listening on channel %s", sql.NOTIFY_CHANNEL)
                        while not lost.is_set() and not driver.is_closed():
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(lost.wait(), self.settings.sleep * 5)
                    finally:
                        # Never hand a LISTENing connection back to the pool.
                        with contextlib.suppress(Exception):
                            await conn.invalidate()
            except TRANSIENT as exc:
                log.debug("listener error: %s", _brief(exc))
            if self._stopping.is_set():
                return
            pause = backoff.next()
            log.warning(
                "LISTEN connection lost; polling every %g s, reconnecting in %.1f s",
                self.settings.sleep,
                pause,
            )
            await self._pause(pause)

    # ------------------------------------------------------------------ logging

    def _log_start(self, listening: bool) -> None:
        s = self.settings
        log.info(
            "worker started: database=%s queues=%s concurrency=%d batch_size=%d sleep=%gs "
            "lease=%gs grace=%gs listen=%s max_jobs=%s max_time=%s stop_when_empty=%s "
            "timeout=%s max_tries=%s",
            redact(s.database_url),
            ",".join(s.queues),
            s.concurrency,
            s.batch_size,
            s.sleep,
            s.lease,
            s.grace,
            listening,
            s.max_jobs,
            s.max_time,
            s.stop_when_empty,
            s.timeout,
            s.max_tries,
        )


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


async def _driver_connection(conn: AsyncConnection) -> Any:
    raw = await conn.get_raw_connection()
    return raw.driver_connection


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _log_job(level: int, claimed: sql.Claimed, outcome: Outcome, what: str) -> None:
    if not log.isEnabledFor(level):
        return
    name = type(outcome.job).job_name if outcome.job is not None else "?"
    tries = f"/{outcome.max_tries}" if outcome.max_tries else ""
    log.log(
        level,
        "job %s id=%d queue=%s attempt=%d%s %s",
        name,
        claimed.id,
        claimed.queue,
        claimed.attempts,
        tries,
        what,
    )


def _ms(outcome: Outcome) -> str:
    return f"{outcome.duration * 1000:.1f} ms"


def import_job_modules(modules: Sequence[str]) -> None:
    """Import the modules that define Job classes (the only way a job name becomes known)."""
    if os.getcwd() not in sys.path:
        # Like `python -m`: let `--import app.jobs` find the project the worker runs in.
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import job module {module!r}: {exc}") from exc


def serve(settings: WorkerSettings, imports: Sequence[str] = ()) -> int:
    """Run a worker until it stops; the first SIGTERM/SIGINT stops it gracefully, a second
    one exits at once. Returns the process exit code."""
    import_job_modules(imports)
    if not registered_jobs():
        log.warning("no Job classes are imported: every job will fail as unknown (use --import)")

    async def main() -> None:
        worker = Worker(settings)
        loop = asyncio.get_running_loop()
        received: list[signal.Signals] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum)
            if len(received) == 1:
                log.info(
                    "%s received: stopping; running jobs have %g s to finish "
                    "(send it again to exit at once)",
                    signum.name,
                    settings.grace,
                )
                worker.stop()
            else:
                log.warning("%s received again: exiting now", signum.name)
                os._exit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await worker.run()

    asyncio.run(main())
    return 0
