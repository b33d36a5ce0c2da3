"""The worker: claim due jobs, run them, and write down what became of them.

One :class:`Worker` runs a few cooperating loops on one event loop:

- the **claim loop** reserves due jobs (never more than its free slots and ``prefetch``
  buffer, nor the ``max_jobs`` budget) and starts a task per job as slots free; it sleeps
  ``sleep`` seconds when nothing is due, or until a PostgreSQL NOTIFY says a job was
  dispatched;
- the **completer** deletes finished jobs in batches, guarded by their reservation tokens;
- **maintenance** extends the leases of held jobs (heartbeats) and takes over jobs whose
  worker stopped heartbeating, returning them to pending or failing them;
- the **listener** (PostgreSQL) holds a LISTEN connection and reconnects when it drops;
- an optional **observer** (:class:`WorkerObserver`, e.g. the Prometheus metrics) is told of
  every claim and every recorded outcome, and runs its own periodic task beside the worker.

Every database write the worker makes to a job is guarded by the token it got when claiming
it, so a worker whose lease expired can never change a job another worker now holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import asyncpg
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import sql
from .config import DEFAULT_CONNECTION, redact
from .database import create_engine
from .errors import ConfigurationError
from .errors import brief as _brief
from .execution import (
    Attempt,
    Outcome,
    Verdict,
    cancelled_from_outside,
    describe,
    judge_expired,
    run,
)
from .job import validate_queue_name

__all__ = [
    "Worker",
    "WorkerObserver",
    "WorkerSettings",
    "WorkerStats",
]

log = logging.getLogger("routemq_outbox.worker")

# Errors that mean "the database is unreachable or misbehaving right now": log, back off, retry.
# asyncpg's own appear where the hot path talks to the driver directly (sql.claim, sql.finish).
TRANSIENT = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    # Raised straight from asyncpg when a connection breaks mid-operation (seen when the
    # server shuts down); through SQLAlchemy it arrives as a DBAPIError.
    asyncpg.InternalClientError,
)
_BACKOFF_MAX = 30.0
_FINISH_BATCH = 1000
_WATCHDOG_TICK = 0.05  # how late a job's timeout may fire, at most


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs. Validated on construction; CLI flags map one to one."""

    database_url: str
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 10
    batch_size: int = 100
    prefetch: int | None = None  # None: as many as ``concurrency``
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
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # noqa: S104 - metrics are for scrapers on other hosts
    metrics_interval: float = 15.0

    def __post_init__(self) -> None:
        if not self.queues:
            raise ConfigurationError("a worker needs at least one queue")
        for name in self.queues:
            validate_queue_name(name)
        checks: list[tuple[str, float | None, bool]] = [
            ("concurrency", self.concurrency, False),
            ("batch_size", self.batch_size, False),
            ("prefetch", self.prefetch, True),
            ("sleep", self.sleep, False),
            ("max_jobs", self.max_jobs, False),
            ("max_time", self.max_time, False),
            ("timeout", self.timeout, False),
            ("max_tries", self.max_tries, False),
            ("lease", self.lease, False),
            ("grace", self.grace, True),
            ("metrics_interval", self.metrics_interval, False),
        ]
        for name, value, zero_ok in checks:
            if value is not None and (value < 0 or (value == 0 and not zero_ok)):
                raise ConfigurationError(f"{name} must be > 0, got {value!r}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigurationError(f"metrics_port must be 1-65535, got {self.metrics_port!r}")

    def __repr__(self) -> str:
        # The URL may carry a password: never let a log line or a traceback's locals show it.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["database_url"] = redact(self.database_url)
        return f"WorkerSettings({', '.join(f'{k}={v!r}' for k, v in values.items())})"

    @property
    def buffer(self) -> int:
        """Claimed jobs that may wait for a free slot: the next claim overlaps running ones."""
        return self.concurrency if self.prefetch is None else self.prefetch

    @property
    def heartbeat(self) -> float:
        """Seconds between lease extensions: three chances before a lease runs out."""
        return self.lease / 3


@dataclass
class WorkerStats:
    """Counts of what the worker did: outcomes, jobs claimed, and the claim and delete
    statements that carried them."""

    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    interrupted: int = 0
    claimed: int = 0
    claims: int = 0
    deletes: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def processed(self) -> int:
        return self.succeeded + self.retried + self.failed


class WorkerObserver(Protocol):
    """Told what a worker does, to keep metrics, say (see :mod:`routemq_outbox.metrics`).

    ``claimed`` and ``recorded`` are called on the worker's event loop, in its hot path: they
    must be quick and must neither block nor do I/O. ``watch`` runs as a task beside the
    worker for periodic work (it may query the database through ``worker.engine``) and is
    cancelled when the worker closes. A worker without an observer pays nothing for this.
    """

    def claimed(self, queue: str, count: int) -> None:
        """``count`` (> 0) due jobs of ``queue`` were claimed by one statement."""

    def recorded(self, claimed: sql.Claimed, outcome: Outcome, *, ran: bool) -> None:
        """The outcome of a job was recorded: DONE, RETRY or FAIL, counted as in
        :class:`WorkerStats`. ``ran`` is False for a job taken over from a worker that
        stopped heartbeating (no attempt ran here; its outcome has no duration)."""

    async def watch(self, worker: Worker) -> None:
        """Runs beside the worker until the worker closes (then it is cancelled)."""


class _Backoff:
    """Growing pauses between attempts to reach a database that is away."""

    def __init__(self) -> None:
        self.delay = 0.0

    def next(self) -> float:
        self.delay = min(_BACKOFF_MAX, max(0.5, self.delay * 2))
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


class _Lane:
    """A connection that one loop keeps for its statements: no pool checkout per statement,
    and on PostgreSQL autocommit, so that a one-statement transaction is one round trip."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def get(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self._engine.connect()
            if self._engine.dialect.name == "postgresql":
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            self._conn = conn
        return self._conn

    async def reset(self) -> None:
        """Drop the connection after an error (it may be dead); the next get() opens one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()


class Worker:
    """Drains the ``jobs`` table. ``await worker.run()``; ``worker.stop()`` ends it gracefully.

    Without ``engine`` it makes its own with :func:`.database.create_engine`. An engine of
    your own on MySQL/MariaDB should run at READ COMMITTED, as those do (see
    :mod:`.database`).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        engine: AsyncEngine | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.settings = settings
        self._observer = observer
        self.stats = WorkerStats()
        self._engine = engine
        self._owns_engine = engine is None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._running: dict[asyncio.Task[None], Attempt] = {}
        self._waiting: collections.deque[sql.Claimed] = collections.deque()  # prefetched
        self._starting = True  # False once stopping: prefetched jobs are released, not run
        self._held: dict[int, int] = {}  # job id -> token, for every job this worker holds
        self._done: list[tuple[int, int]] = []
        self._done_ready = asyncio.Event()
        self._closed = asyncio.Event()  # set once running jobs are over: helpers wind down
        self._crash: BaseException | None = None  # why a helper loop died, if one did

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        """Stop claiming; running jobs get ``grace`` seconds to finish."""
        self._stopping.set()
        self._starting = False
        self._wake.set()
        self._slot_freed.set()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            # Three connections are held for good (claims, deletes, LISTEN); the others serve
            # heartbeats and the rarer writes (retries, failures), which queue for a connection
            # rather than open dozens: the server's connection limit is shared by every worker.
            self._engine = create_engine(
                self.settings.database_url, pool_size=5, max_overflow=5, worker=True
            )
        return self._engine

    async def run(self) -> WorkerStats:
        """Work until stopped (or a stop condition holds); returns what was done.

        If one of its helper loops fails in a way it cannot retry, the worker stops as on
        :meth:`stop` and ``run()`` then raises that error.
        """
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        listening = settings.listen and self.engine.dialect.name == "postgresql"
        self._log_start(listening)
        self._claim_lane = _Lane(self.engine)
        helpers = [
            asyncio.create_task(self._completer(), name="routemq-outbox completer"),
            asyncio.create_task(self._maintain(), name="routemq-outbox maintenance"),
            asyncio.create_task(self._watchdog(), name="routemq-outbox watchdog"),
        ]
        if listening:
            helpers.append(asyncio.create_task(self._listen(), name="routemq-outbox listener"))
        for helper in helpers:
            helper.add_done_callback(self._helper_ended)
        watchers = []
        if self._observer is not None:
            watch = self._observer.watch(self)
            watchers.append(asyncio.create_task(watch, name="routemq-outbox observer"))
        timer = self._loop.call_later(settings.max_time, self.stop) if settings.max_time else None
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
            # watchdog, the listener and the observer have nothing to finish.
            for helper in (*helpers[2:], *watchers):
                helper.cancel()
            await asyncio.gather(*helpers, *watchers, return_exceptions=True)
            await self._claim_lane.reset()
            await self._release_unfinished()
            if self._owns_engine and self._engine is not None:
                await self._engine.dispose()
        if self._crash is not None:
            raise self._crash
        log.info(
            "worker stopped: %d succeeded, %d retried, %d failed, %d released unfinished",
            self.stats.succeeded,
            self.stats.retried,
            self.stats.failed,
            self.stats.interrupted,
        )
        return self.stats

    def _helper_ended(self, task: asyncio.Task[None]) -> None:
        """A helper loop that dies takes the worker down (gracefully), never silently."""
        if task.cancelled() or task.exception() is None or self._crash is not None:
            return
        self._crash = task.exception()
        log.critical(
            "%s stopped on an unexpected error; stopping the worker",
            task.get_name(),
            exc_info=self._crash,
        )
        self.stop()

    # ------------------------------------------------------------------ claiming

    def _budget(self) -> int:
        settings = self.settings
        if self._waiting and len(self._waiting) > settings.buffer // 2:
            return 0  # every slot is busy and enough jobs wait: top up later, in one claim
        free = settings.concurrency + settings.buffer - len(self._running) - len(self._waiting)
        if settings.max_jobs is not None:
            free = min(free, settings.max_jobs - self.stats.claimed)
        return min(free, settings.batch_size)

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
            except Exception as exc:
                await self._claim_lane.reset()
                pause = backoff.next()
                _log_retry("claiming", exc, pause)
                await self._pause(pause)
                continue
            backoff.reset()
            if claimed == wanted:
                continue  # there may be more due jobs: claim again as soon as slots allow
            if settings.stop_when_empty and not claimed:
                if not self._running and not self._waiting:
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
        conn = await self._claim_lane.get()
        for queue in self.settings.queues:
            got = await sql.claim(conn, queue, wanted - claimed, token, self.settings.lease)
            self.stats.claims += 1
            self.stats.claimed += len(got)
            if got and self._observer is not None:
                self._observer.claimed(queue, len(got))
            for job in got:
                # At once: a failure on the next queue must not orphan these.
                self._held[job.id] = job.token
                if len(self._running) < self.settings.concurrency:
                    self._start(job)
                else:
                    self._waiting.append(job)
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
        attempt = Attempt(claimed)
        attempt.task = task = self._loop.create_task(self._process(attempt))
        self._running[task] = attempt

    async def _process(self, attempt: Attempt) -> None:
        claimed = attempt.claimed
        try:
            outcome = await run(
                attempt, time_limit=self.settings.timeout, max_tries=self.settings.max_tries
            )
            if outcome.verdict is Verdict.DONE:
                self._succeeded(claimed, outcome)  # the common case, without an await
            else:
                await self._apply(claimed, outcome)
        except asyncio.CancelledError:
            raise  # shutdown: the job stays held, to be released unspent
        except BaseException:
            log.exception("internal error while processing job id=%d", claimed.id)
            # Its outcome is unknown: stop renewing its lease rather than hold it for as long
            # as this worker lives. Once the lease runs out, the rescue retries or fails it.
            if self._held.pop(claimed.id, None) is not None:
                log.warning(
                    "job id=%d is left to its lease (%g s): it will run again or fail then",
                    claimed.id,
                    self.settings.lease,
                )
        finally:
            del self._running[attempt.task]  # type: ignore[arg-type]
            if self._waiting and self._starting:
                self._start(self._waiting.popleft())
            self._slot_freed.set()

    def _succeeded(self, claimed: sql.Claimed, outcome: Outcome) -> None:
        self.stats.succeeded += 1
        self._done.append((claimed.id, claimed.token))
        self._done_ready.set()
        if self._observer is not None:
            self._observer.recorded(claimed, outcome, ran=True)
        _log_job(logging.INFO, claimed, outcome, "succeeded", "succeeded in %.1f ms", _ms(outcome))

    async def _watchdog(self) -> None:
        """Cancel attempts that ran past their timeout."""
        while True:
            await asyncio.sleep(_WATCHDOG_TICK)
            now = time.monotonic()
            for attempt in list(self._running.values()):
                attempt.expire(now)

    async def _apply(self, claimed: sql.Claimed, outcome: Outcome, *, ran: bool = True) -> None:
        """Write down an outcome other than success, of one attempt (or of a rescued job, which
        did not run); successes go through :meth:`_succeeded`, without an await."""
        verdict = outcome.verdict
        if verdict is Verdict.RETRY:
            pair = [(claimed.id, claimed.token)]
            held = await self._write(lambda conn: sql.release(conn, pair, delay=outcome.delay))
            self._held.pop(claimed.id, None)
            if not held:
                _log_lost(claimed, "retry")
                return
            self.stats.retried += 1
            if self._observer is not None:
                self._observer.recorded(claimed, outcome, ran=ran)
            if not outcome.delay:
                self._wake.set()  # due again at once: no reason to wait for the next poll
            if outcome.error is None:
                _log_job(
                    logging.WARNING,
                    claimed,
                    outcome,
                    "retried",
                    "was left by a worker that stopped heartbeating; back to pending",
                    ran=ran,
                )
            else:
                when = f"in {outcome.delay:g} s" if outcome.delay else "now"
                _log_job(
                    logging.WARNING,
                    claimed,
                    outcome,
                    "retried",
                    "failed in %.1f ms (%s); retrying %s",
                    _ms(outcome),
                    _brief(outcome.error),
                    when,
                    ran=ran,
                )
        elif verdict is Verdict.FAIL:
            await self._fail(claimed, outcome, ran=ran)
        else:
            self.stats.interrupted += 1  # released, attempt refunded, at shutdown

    async def _fail(self, claimed: sql.Claimed, outcome: Outcome, *, ran: bool) -> None:
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
        moved = await self._write(lambda conn: sql.move_to_failed(conn, claimed.token, record))
        self._held.pop(claimed.id, None)
        if not moved:
            _log_lost(claimed, "failure")
            return
        self.stats.failed += 1
        if self._observer is not None:
            self._observer.recorded(claimed, outcome, ran=ran)
        how = f"failed in {_ms(outcome):.1f} ms" if outcome.job else "could not be loaded"
        _log_job(
            logging.ERROR,
            claimed,
            outcome,
            "failed",
            "%s (%s); moved to failed_jobs",
            how,
            _brief(error),
            ran=ran,
        )
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

    async def _write(self, operation: Callable[[AsyncConnection], Awaitable[int | bool]]) -> bool:
        """Run a guarded write until the database takes it; False if the job was not ours."""
        backoff = _Backoff()
        while True:
            try:
                async with self.engine.connect() as conn:
                    return bool(await operation(conn))
            except Exception as exc:
                if self._closed.is_set():
                    log.warning(
                        "could not record a job's outcome (%s); its lease will expire "
                        "and it will run again",
                        _brief(exc),
                    )
                    return False
                pause = backoff.next()
                _log_retry("database write", exc, pause)
                await asyncio.sleep(pause)

    async def _completer(self) -> None:
        """Delete finished jobs in batches: whatever finished while the last delete ran."""
        backoff = _Backoff()
        lane = _Lane(self.engine)
        try:
            await self._complete(lane, backoff)
        finally:
            await lane.reset()

    async def _complete(self, lane: _Lane, backoff: _Backoff) -> None:
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
            try:
                deleted = await sql.finish(await lane.get(), batch)
                self.stats.deletes += 1
            except Exception as exc:
                await lane.reset()
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
                _log_retry("deleting finished jobs", exc, pause)
                await asyncio.sleep(pause)
                self._done_ready.set()
                continue
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
        """Give running jobs the grace period, then cancel them.

        Prefetched jobs still start when the worker ends by itself (``--max-jobs``,
        ``--stop-when-empty``) and slots free up in time; after :meth:`stop` they do not.
        """
        if not self._running:
            return
        grace = self.settings.grace
        log.info(
            "waiting up to %g s for %d running jobs",
            grace,
            len(self._running) + self._starting * len(self._waiting),
        )
        deadline = time.monotonic() + grace
        while self._running and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._running), timeout=left)
        self._starting = False
        pending = set(self._running)
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
            async with self.engine.connect() as conn:
                released = await sql.release(conn, pairs, delay=None, refund_attempt=True)
        except Exception as exc:
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
            except Exception as exc:
                pause = min(backoff.next(), self.settings.heartbeat)
                _log_retry("lease maintenance", exc, pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), pause)

    async def _heartbeat(self) -> None:
        pairs = list(self._held.items())
        if not pairs:
            return
        # Fewer rows than pairs is normal (jobs finished meanwhile); a job really taken over
        # is reported where its outcome is written, which its token no longer allows.
        async with self.engine.connect() as conn:
            await sql.extend_leases(conn, pairs, self.settings.lease)

    async def _rescue(self) -> None:
        async with self.engine.connect() as conn:
            rescued = await sql.rescue_expired(
                conn, self.settings.batch_size, secrets.randbits(63), self.settings.lease
            )
        for claimed in rescued:
            self._held[claimed.id] = claimed.token
            outcome = judge_expired(claimed, max_tries=self.settings.max_tries)
            await self._apply(claimed, outcome, ran=False)

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
            except Exception:
                log.exception("the LISTEN connection failed unexpectedly")
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


async def _driver_connection(conn: AsyncConnection) -> Any:
    raw = await conn.get_raw_connection()
    return raw.driver_connection


def _log_job(
    level: int,
    claimed: sql.Claimed,
    outcome: Outcome,
    result: str,
    what: str,
    *args: object,
    ran: bool = True,
) -> None:
    """One line per recorded outcome, built only when its level is enabled (this is the hot
    path); the fields also go on the record, for JSON logs."""
    if not log.isEnabledFor(level):
        return
    name = type(outcome.job).job_name if outcome.job is not None else "?"
    tries = f"/{outcome.max_tries}" if outcome.max_tries else ""
    fields = {
        "job": name,
        "id": claimed.id,
        "queue": claimed.queue,
        "attempt": claimed.attempts,
        "outcome": result,
        "duration_ms": round(outcome.duration * 1000, 3) if ran else None,
    }
    log.log(
        level,
        "job %s id=%d queue=%s attempt=%d%s " + what,
        name,
        claimed.id,
        claimed.queue,
        claimed.attempts,
        tries,
        *args,
        extra=fields,
    )


def _log_retry(what: str, exc: Exception, pause: float) -> None:
    """A database step that failed and will be retried. Anything but the database being away
    gets its traceback, and is retried all the same: a loop that died on it would leave its
    jobs held and heartbeated, but never finished, for as long as the worker lives."""
    if isinstance(exc, TRANSIENT):
        log.warning("%s failed (%s); retrying in %.1f s", what, _brief(exc), pause)
    else:
        message = "%s failed unexpectedly (%s); retrying in %.1f s"
        log.error(message, what, _brief(exc), pause, exc_info=exc)


def _log_lost(claimed: sql.Claimed, what: str) -> None:
    log.warning(
        "job id=%d queue=%s: its lease had expired and it was taken over by another worker; "
        "this worker's %s was not recorded",
        claimed.id,
        claimed.queue,
        what,
    )


def _ms(outcome: Outcome) -> float:
    return outcome.duration * 1000
