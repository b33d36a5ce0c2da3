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
- the **scheduler** (:mod:`.scheduler`) enqueues the due slots of the periodic jobs the
  process imported, unless ``schedules`` is off;
- an optional **observer** (:class:`WorkerObserver`, e.g. the Prometheus metrics) is told of
  every claim and every recorded outcome, and runs its own periodic task beside the worker.

Every database write the worker makes to a job is guarded by the token it got when claiming
it, so a worker whose lease expired can never change a job another worker now holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import faults, sql
from .config import DEFAULT_CONNECTION, notify_enabled, redact
from .database import BlockingSqlite, create_engine
from .errors import ConfigurationError, DatabaseNotReady, OutboxError, OutcomeNotRecorded
from .errors import brief as _brief
from .execution import (
    Attempt,
    Outcome,
    Verdict,
    cancelled,
    describe,
    judge_expired,
    run,
    timed_out,
)
from .faults import TRANSIENT
from .hooks import Hooks
from .job import scheduled_jobs, validate_queue_name
from .scheduler import Scheduler
from .threads import ThreadRunner

__all__ = [
    "TRANSIENT",
    "Worker",
    "WorkerObserver",
    "WorkerSettings",
    "WorkerStats",
    "running_engine",
]

log = logging.getLogger("routemq_outbox.worker")

_T = TypeVar("_T")

_FINISH_BATCH = 1000
_SQLITE_THREADS = 5  # as many as the connections the worker's engine keeps
_HOUSEKEEPING_EVERY = 60.0  # seconds between a worker's rounds of housekeeping
_WATCHDOG_TICK = 0.05  # how late a job's timeout may fire, at most
_CANCEL_CHECK_EVERY = 1.0  # seconds between looks for running jobs an operator cancelled
_WORKER_ROW_KEPT = 3600.0  # seconds a silent worker's row is kept (shown as gone) at least
_COUNT_AFTER = 0.05  # seconds a job started from those claimed ahead runs before it is counted
_CANCEL_WAIT = 5.0  # seconds job code gets to end once cancelled, before its slot is freed
_CLOSING_PERSISTENCE = 10.0  # seconds a closing worker keeps trying to record outcomes
_SUMMARY_EVERY = 60.0  # seconds between the INFO lines that sum up what was done
_COUNTS_EVERY = 5.0  # seconds between additions to the per-minute counts of finished jobs

_engine: ContextVar[AsyncEngine | None] = ContextVar("routemq_outbox_worker_engine", default=None)


def running_engine() -> AsyncEngine | None:
    """The engine of the worker running the calling job; None outside a worker."""
    return _engine.get()


_Key = tuple[int, int]  # (job id, token): one claim of one job
# What a held claim is: its attempt not counted (claimed ahead, or taken over from a silent
# worker), started with its attempt not counted yet, counted, or done (its success not yet
# deleted).
_UNCOUNTED, _STARTED, _COUNTED, _DONE = 0, 1, 2, 3


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
    schedules: bool = True  # take part in enqueuing the periodic jobs this process imported

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
    abandoned: int = 0
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


class _Lane:
    """A connection that one loop keeps for its statements: no pool checkout per statement,
    and on PostgreSQL autocommit, so that a one-statement transaction is one round trip. On
    an SQLite file, the statements run on a thread instead (see :class:`.BlockingSqlite`)."""

    def __init__(self, engine: AsyncEngine, blocking: BlockingSqlite | None) -> None:
        self._engine = engine
        self._blocking = blocking
        self._conn: AsyncConnection | None = None

    async def run(self, operation: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        if self._blocking is not None:
            return await self._blocking.run(operation)
        return await operation(await self.get())

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

    Everything the worker holds is keyed by claim, ``(job id, token)``, never by job id alone:
    the same job can come back to the same worker under a new token (its lease ran out and it
    was taken over), and what one claim does must never touch another's bookkeeping.
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
        self._stop_at: float | None = None  # when stop() was called: the grace counts from it
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._changed = asyncio.Event()  # a job or hook ended: shutdown re-checks what is left
        self._running: dict[asyncio.Task[None], Attempt] = {}
        # Claimed ahead, attempt not counted: waiting for a slot.
        self._waiting: collections.deque[sql.Claimed] = collections.deque()
        # Started from there, attempt not counted yet: when each started (monotonic).
        self._uncounted: dict[_Key, float] = {}
        # The keys of the count statement in flight, and its end: a retry of one of them waits
        # for it, or the retry, committing first on another connection, would fence it out.
        self._counting: tuple[set[_Key], asyncio.Future[None]] | None = None
        self._ready: list[_Key] = []  # attempt counted, but claimed as the worker stopped
        self._starting = True  # False once stopping: claimed jobs are released, not run
        self._lowest_level: dict[str, int] = {}  # queue -> lowest priority its last claim took
        self._held: dict[_Key, int] = {}  # every claim this worker holds -> _UNCOUNTED, ...
        self._done: list[_Key] = []
        # The serial key of each finished job that has one: its delete promotes the next job.
        self._serial_done: dict[_Key, str] = {}
        self._done_ready = asyncio.Event()
        self._abandoned: set[asyncio.Task[None]] = set()
        self._threads = ThreadRunner()
        self._hooks = Hooks(
            concurrency=settings.concurrency,
            time_limit=settings.timeout,
            threads=self._threads,
            ended=self._changed.set,
            abandoned=self._keep_abandoned,
        )
        self._rescued = asyncio.Event()  # the first round of taking over expired leases is over
        self._closed = asyncio.Event()  # set once running jobs are over: helpers wind down
        self._closed_at = math.inf
        self._crash: BaseException | None = None  # why a helper loop died, if one did
        self._housekept_at = -math.inf
        self._blocking: BlockingSqlite | None = None  # set by run() on an SQLite file
        # Jobs finished per queue since the last addition to job_counts (the throughput chart).
        self._finished_ok: collections.Counter[str] = collections.Counter()
        self._finished_bad: collections.Counter[str] = collections.Counter()
        self.worker_id = str(uuid.uuid4())  # its row in ``workers``, and on the jobs it holds
        self._registered = False
        self._paused: set[str] = set()  # queues paused, as last read
        self._paused_read_at = -math.inf

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        """Stop claiming and release the jobs claimed ahead; running jobs get ``grace``
        seconds to finish."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._end(release_claimed=True)

    @property
    def abandoned(self) -> int:
        """Attempts and ``failed()`` hooks that ignored being cancelled and still run."""
        return len(self._abandoned)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            # Four connections are held for good (claims, starts, deletes, LISTEN); the others
            # serve heartbeats and the rarer writes (retries, failures), which queue for a
            # connection rather than open dozens: the server's connection limit is shared by
            # every worker.
            self._engine = create_engine(
                self.settings.database_url, pool_size=5, max_overflow=5, worker=True
            )
        return self._engine

    async def run(self) -> WorkerStats:
        """Work until stopped (or a stop condition holds); returns what was done.

        If one of its helper loops fails in a way it cannot retry, the worker stops as on
        :meth:`stop` and ``run()`` then raises that error. With ``stop_when_empty``, a
        database that cannot serve the queue at all (not migrated, no such database) raises
        :class:`~routemq_outbox.errors.DatabaseNotReady` instead of being waited for.
        """
        settings = self.settings
        listening = settings.listen and self.engine.dialect.name == "postgresql"
        self._log_start(listening)
        self._open()
        # The tasks made from here on (every job's) see it.
        engine_token = _engine.set(self.engine)
        # These finish their round when the worker closes; the others are cancelled then.
        finishing = [
            asyncio.create_task(self._completer(), name="routemq-outbox completer"),
            asyncio.create_task(self._counter(), name="routemq-outbox counter"),
            asyncio.create_task(self._heartbeats(), name="routemq-outbox heartbeats"),
            asyncio.create_task(self._rescuer(), name="routemq-outbox rescue"),
            asyncio.create_task(self._tallies(), name="routemq-outbox counts"),
        ]
        cancelled = [
            asyncio.create_task(self._watchdog(), name="routemq-outbox watchdog"),
            asyncio.create_task(self._reporter(), name="routemq-outbox reporter"),
            asyncio.create_task(self._cancel_checks(), name="routemq-outbox cancel checks"),
        ]
        if listening:
            cancelled.append(asyncio.create_task(self._listen(), name="routemq-outbox listener"))
        periodic = scheduled_jobs() if settings.schedules else {}
        if periodic:
            scheduler = Scheduler(self.engine, periodic, notify=notify_enabled())
            cancelled.append(
                asyncio.create_task(scheduler.run(self._stopping), name="routemq-outbox scheduler")
            )
        for helper in (*finishing, *cancelled):
            helper.add_done_callback(self._helper_ended)
        if self._observer is not None:
            watch = self._observer.watch(self)
            cancelled.append(asyncio.create_task(watch, name="routemq-outbox observer"))
        timer = None
        if settings.max_time:
            timer = self._loop.call_later(settings.max_time, self._end_of_time)
        try:
            await self._claim_loop()
        except asyncio.CancelledError:
            self.stop()  # cancelling run() stops the worker as stop() does, grace included
            raise
        finally:
            if timer:
                timer.cancel()
            self._stopping.set()
            if not self._starting:
                await self._release_unstarted()  # at once, so that idle peers can take them
            await self._drain()  # heartbeats go on meanwhile
            self._closed.set()
            self._closed_at = time.monotonic()
            self._done_ready.set()
            for helper in cancelled:
                helper.cancel()
            await asyncio.gather(*finishing, *cancelled, return_exceptions=True)
            await self._release_unfinished()
            await self._unregister()
            await self._close()
            _engine.reset(engine_token)
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

    def _open(self) -> None:
        """The connections the loops share: the claim lane, and on an SQLite file the
        threads that run every statement."""
        self._loop = asyncio.get_running_loop()
        if BlockingSqlite.usable(self.engine):
            self._blocking = BlockingSqlite(self.engine, _SQLITE_THREADS)
        self._claim_lane = _Lane(self.engine, self._blocking)

    async def _close(self) -> None:
        await self._claim_lane.reset()
        if self._blocking is not None:
            await asyncio.to_thread(self._blocking.close)
            self._blocking = None

    def _end(self, *, release_claimed: bool) -> None:
        self._stopping.set()
        self._rescued.set()
        if release_claimed:
            self._starting = False
        self._wake.set()
        self._slot_freed.set()
        self._changed.set()

    def _end_of_time(self) -> None:
        """``max_time`` is up: stop claiming and release the jobs claimed ahead; running jobs
        finish (each within its own timeout), unless :meth:`stop` cuts them short."""
        log.info("ran --max-time=%g s; finishing", self.settings.max_time)
        self._end(release_claimed=True)

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

    def _free_slots(self) -> int:
        return self.settings.concurrency - len(self._running)

    def _budget(self) -> int:
        settings = self.settings
        if self._waiting and len(self._waiting) > settings.buffer // 2:
            return 0  # every slot is busy and enough jobs wait: top up later, in one claim
        free = self._free_slots() + settings.buffer - len(self._waiting)
        if settings.max_jobs is not None:
            free = min(free, settings.max_jobs - self.stats.claimed)
        return min(free, settings.batch_size)

    def _busy(self) -> bool:
        # A finished job of a serial key not deleted yet: its delete may make the next due.
        return bool(self._running or self._waiting or self._serial_done)

    async def _claim_loop(self) -> None:
        settings = self.settings
        backoff = faults.Backoff()
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
                self._give_up_on(exc)
                pause = backoff.next()
                _log_retry("claiming", exc, pause)
                await self._pause(pause)
                continue
            backoff.reset()
            if claimed == wanted:
                continue  # there may be more due jobs: claim again as soon as slots allow
            if settings.stop_when_empty and not claimed:
                if not self._busy():
                    if not self._rescued.is_set():
                        await self._rescued.wait()  # it may put jobs back: claim again
                        continue
                    log.info("no due jobs left; stopping (--stop-when-empty)")
                    return
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            await self._idle()

    def _give_up_on(self, exc: Exception) -> None:
        """For a worker that should stop once the queue is empty, raise what makes waiting
        pointless: a configuration error, a database that cannot serve the queue at all."""
        if not self.settings.stop_when_empty:
            return  # a long-running worker waits, e.g. for the database to be migrated
        if isinstance(exc, OutboxError):
            raise exc
        if faults.is_transient(exc):
            return
        where = redact(self.settings.database_url)
        missing = faults.missing_schema(exc)
        if missing is not None:
            raise DatabaseNotReady(
                f"database {where} is missing {missing} that routemq-outbox needs "
                f"({_brief(exc)}): run `routemq-outbox migrate`"
            ) from exc
        raise DatabaseNotReady(f"database {where} cannot be used: {_brief(exc)}") from exc

    async def _claim(self, wanted: int) -> int:
        """Claim up to ``wanted`` jobs, from the earlier queues first: as many as there are
        free slots, started at once with their attempt counted; the rest claimed ahead."""
        token = secrets.randbits(63)
        lease = self.settings.lease
        lane = self._claim_lane
        paused = await self._paused_queues(lane)
        total = 0
        for queue in self.settings.queues:
            if queue in paused:
                continue
            for count_attempt in (True, False):
                limit = wanted - total
                if count_attempt:
                    limit = min(limit, self._free_slots())
                if limit <= 0:
                    continue
                got = await lane.run(
                    functools.partial(
                        sql.claim,
                        queue=queue,
                        limit=limit,
                        token=token,
                        lease=lease,
                        count_attempt=count_attempt,
                        worker=self.worker_id,
                        lowest_level=self._lowest_level.get(queue, 0),
                    )
                )
                self._lowest_level[queue] = min((job.priority for job in got), default=0)
                self._claimed(queue, got, count_attempt)
                total += len(got)
                if len(got) < limit:
                    break  # this queue has no more due jobs: on to the next
            if total >= wanted:
                break
        return total

    async def _paused_queues(self, lane: _Lane) -> set[str]:
        """The paused queues, read again once ``--sleep`` seconds old (or at once after a
        pause or resume, on PostgreSQL with LISTEN): a paused queue gets no more claims
        within that time."""
        now = time.monotonic()
        if now - self._paused_read_at >= self.settings.sleep:
            self._paused = await lane.run(sql.paused_queue_names)
            self._paused_read_at = now
        return self._paused

    def _claimed(self, queue: str, got: list[sql.Claimed], counted: bool) -> None:
        self.stats.claims += 1
        self.stats.claimed += len(got)
        if got and self._observer is not None:
            self._observer.claimed(queue, len(got))
        for job in got:
            # At once: a failure on the next statement must not orphan these.
            key = (job.id, job.token)
            if not counted:
                self._held[key] = _UNCOUNTED
                self._waiting.append(job)
            elif self._starting:
                self._held[key] = _COUNTED
                self._start(job)
            else:  # claimed as the worker was stopping: released without spending the attempt
                self._held[key] = _COUNTED
                self._ready.append(key)
        if not counted:
            self._refill()  # slots may have freed while the claim ran

    async def _idle(self) -> None:
        """Sleep until a job may be due: the poll interval, a NOTIFY, or stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.sleep)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # ------------------------------------------------------------------ starting

    def _refill(self) -> None:
        """Start jobs claimed ahead in the slots that are free."""
        while self._waiting and self._starting and self._free_slots() > 0:
            claimed = self._waiting.popleft()
            key = (claimed.id, claimed.token)
            self._held[key] = _STARTED
            self._uncounted[key] = time.monotonic()
            self._start(
                sql.Claimed(
                    claimed.id,
                    claimed.queue,
                    claimed.payload,
                    claimed.attempts + 1,
                    key[1],
                    claimed.serial_key,
                )
            )

    async def _counter(self) -> None:
        """Count in the database the attempts of jobs started from those claimed ahead, once
        they have run for ``_COUNT_AFTER`` seconds.

        A job claimed ahead has no attempt counted, so that one whose worker crashes before
        starting it has spent none. Counting it as it starts would cost a row write per job;
        most jobs finish sooner (their success deletes the row, and a retry or failure
        records the attempt itself), so only the jobs still running then are counted, in one
        statement. A job that crashes its worker within that moment does not spend the
        attempt; it is among the first claimed again, and a claim for a free slot counts it.
        """
        lane = _Lane(self.engine, self._blocking)
        try:
            while not self._closed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), _COUNT_AFTER)
                due = time.monotonic() - _COUNT_AFTER
                keys = [key for key, started in self._uncounted.items() if started <= due]
                if not keys:
                    continue
                # Counted from now on: a retry adds nothing. (Should this statement fail, a
                # retry recorded meanwhile has lost the attempt: at worst one more run.)
                for key in keys:
                    del self._uncounted[key]
                    if self._held.get(key) == _STARTED:
                        self._held[key] = _COUNTED
                counted = self._loop.create_future()
                self._counting = (set(keys), counted)
                try:
                    await lane.run(functools.partial(sql.count_attempts, pairs=keys))
                except Exception as exc:
                    await lane.reset()
                    # Not counted after all: those still held get another chance.
                    for key in keys:
                        if self._held.get(key) == _COUNTED and key in self._running_keys():
                            self._held[key] = _STARTED
                            self._uncounted[key] = time.monotonic() - _COUNT_AFTER
                    _log_retry("counting attempts", exc, _COUNT_AFTER)
                finally:
                    self._counting = None
                    counted.set_result(None)
        finally:
            await lane.reset()

    def _running_keys(self) -> set[_Key]:
        return {(a.claimed.id, a.claimed.token) for a in self._running.values()}

    # ------------------------------------------------------------------ running

    def _start(self, claimed: sql.Claimed, outcome: Outcome | None = None) -> None:
        attempt = Attempt(claimed)
        attempt.task = task = self._loop.create_task(self._process(attempt, outcome))
        self._running[task] = attempt

    async def _process(self, attempt: Attempt, outcome: Outcome | None) -> None:
        """Run one attempt (or, given ``outcome``, only record it) in a slot."""
        claimed = attempt.claimed
        key = (claimed.id, claimed.token)
        try:
            if outcome is None and claimed.cancel_requested:
                outcome = cancelled(None)  # cancelled while it waited: recorded, never run
            if outcome is None:
                outcome = await run(
                    attempt,
                    threads=self._threads,
                    time_limit=self.settings.timeout,
                    max_tries=self.settings.max_tries,
                )
            if attempt.abandoned:
                return  # its outcome was recorded when it was given up on
            if outcome.verdict is Verdict.DONE:
                self._succeeded(claimed, key, outcome)  # the common case, without an await
            elif outcome.verdict is Verdict.INTERRUPTED:
                self.stats.interrupted += 1  # released at exit, attempt refunded
            else:
                await self._apply(claimed, outcome)
        except asyncio.CancelledError:
            raise  # shutdown: the job stays held, to be released unspent
        except BaseException:
            if attempt.abandoned:
                return
            log.exception("internal error while processing job id=%d", claimed.id)
            self._uncounted.pop(key, None)
            # Its outcome is unknown: stop renewing its lease rather than hold it for as long
            # as this worker lives. Once the lease runs out, the rescue retries or fails it.
            if self._held.pop(key, None) is not None:
                log.warning(
                    "job id=%d is left to its lease (%g s): it will run again or fail then",
                    claimed.id,
                    self.settings.lease,
                )
        finally:
            if not attempt.abandoned:
                self._slot_ended(attempt)

    def _slot_ended(self, attempt: Attempt) -> None:
        del self._running[attempt.task]  # type: ignore[arg-type]
        self._refill()
        self._slot_freed.set()
        self._changed.set()

    def _succeeded(self, claimed: sql.Claimed, key: _Key, outcome: Outcome) -> None:
        self.stats.succeeded += 1
        self._finished_ok[claimed.queue] += 1
        self._uncounted.pop(key, None)  # its row goes: nothing to count
        self._held[key] = _DONE
        if claimed.serial_key is not None:
            self._serial_done[key] = claimed.serial_key
        self._done.append(key)
        self._done_ready.set()
        if self._observer is not None:
            self._observer.recorded(claimed, outcome, ran=True)
        _log_job(logging.DEBUG, claimed, outcome, "succeeded", "succeeded in %.1f ms", _ms(outcome))

    async def _watchdog(self) -> None:
        """Cancel attempts and hooks that ran past their timeout, and give up on those that
        ignore being cancelled."""
        while True:
            await asyncio.sleep(_WATCHDOG_TICK)
            now = time.monotonic()
            for attempt in list(self._running.values()):
                attempt.expire(now, _CANCEL_WAIT)
                if attempt.abandon_at <= now and attempt.stuck(now):
                    self._abandon(attempt)
            self._hooks.watch(now, _CANCEL_WAIT)

    def _abandon(self, attempt: Attempt) -> None:
        """Free the slot of an attempt that ignored its cancellation (its code still runs).

        After its timeout, the attempt counts as timed out and the job is retried or failed
        as usual. After a shutdown's grace period, the job is left to its lease (another
        worker takes it over once this one has exited).
        """
        claimed = attempt.claimed
        key = (claimed.id, claimed.token)
        self._keep_abandoned(attempt)
        if attempt.cancel_requested and not self._closed.is_set():
            log.error(
                "job id=%d queue=%s ignored being cancelled by an operator: its slot is freed "
                "and it is recorded as cancelled (its code may still be running)",
                claimed.id,
                claimed.queue,
            )
            self._running.pop(attempt.task, None)  # type: ignore[arg-type]
            self._start(claimed, cancelled(attempt.job))
        elif attempt.timed_out and not self._closed.is_set():
            log.error(
                "job id=%d queue=%s ignored being cancelled at its %g s timeout: its slot is "
                "freed and the attempt counts as timed out (its code may still be running)",
                claimed.id,
                claimed.queue,
                attempt.limit,
            )
            self._running.pop(attempt.task, None)  # type: ignore[arg-type]
            self._start(claimed, timed_out(attempt, self.settings.max_tries))
        else:
            log.error(
                "job id=%d queue=%s ignored being cancelled at shutdown; it is left to its "
                "lease (%g s) and runs again after that",
                claimed.id,
                claimed.queue,
                self.settings.lease,
            )
            self._held.pop(key, None)
            self._slot_ended(attempt)

    def _keep_abandoned(self, attempt: Attempt) -> None:
        attempt.abandoned = True
        self.stats.abandoned += 1
        task = attempt.task
        assert task is not None
        self._abandoned.add(task)  # a reference, or asyncio may complain when it is collected
        task.add_done_callback(self._abandoned.discard)

    async def _apply(self, claimed: sql.Claimed, outcome: Outcome, *, ran: bool = True) -> None:
        """Write down an outcome other than success, of one attempt (or of a rescued job, which
        did not run); successes go through :meth:`_succeeded`, without an await."""
        if outcome.verdict is Verdict.FAIL:
            await self._fail(claimed, outcome, ran=ran)
            return
        key = (claimed.id, claimed.token)
        delay = outcome.delay
        if self._counting is not None and key in self._counting[0]:
            await asyncio.shield(self._counting[1])
        # A job started from those claimed ahead, whose attempt is not counted yet.
        count = self._uncounted.pop(key, None) is not None
        held, problem = await self._write(
            lambda conn: sql.release(conn, [key], delay=delay, count_attempt=count)
        )
        if held is None and problem is not None:
            # The database refuses this retry for good (a delay it cannot store, say): fail
            # the job, rather than hold it until the worker exits and run it again then.
            error = OutcomeNotRecorded(f"its retry could not be recorded: {_brief(problem)}")
            error.__cause__ = outcome.error
            failed = Outcome(Verdict.FAIL, outcome.job, error, None, outcome.duration)
            await self._fail(claimed, failed._replace(max_tries=outcome.max_tries), ran=ran)
            return
        self._held.pop(key, None)
        if not held:
            _log_unrecorded(claimed, "retry", held)
            return
        self.stats.retried += 1
        if self._observer is not None:
            self._observer.recorded(claimed, outcome, ran=ran)
        if not delay:
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
            when = f"in {delay:g} s" if delay else "now"
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

    async def _fail(self, claimed: sql.Claimed, outcome: Outcome, *, ran: bool) -> None:
        error = outcome.error
        assert error is not None
        key = (claimed.id, claimed.token)
        self._uncounted.pop(key, None)  # failed_jobs records the attempts, the row goes
        record = sql.FailedRecord(
            uuid=str(uuid.uuid4()),
            connection=self.settings.connection_name,
            queue=claimed.queue,
            payload=claimed.payload,
            exception=describe(error),
            attempts=claimed.attempts,
            job_id=claimed.id,
            priority=claimed.priority,
        )
        moved, problem = await self._write(
            lambda conn: sql.move_to_failed(
                conn, claimed.token, record, serial_key=claimed.serial_key
            )
        )
        if moved is None and problem is not None:
            # The database refuses the text for good: store one it can hold.
            plain = _storable(record.exception) + f"\n\n(stored escaped: {_brief(problem)})"
            record = dataclasses.replace(record, exception=plain)
            moved, problem = await self._write(
                lambda conn: sql.move_to_failed(
                    conn, claimed.token, record, serial_key=claimed.serial_key
                )
            )
        self._held.pop(key, None)
        if not moved:
            _log_unrecorded(claimed, "failure", moved, problem)
            return
        self.stats.failed += 1
        self._finished_bad[claimed.queue] += 1
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
            self._hooks.spawn(claimed, outcome.job, error)

    async def _run(self, operation: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run an operation of :mod:`.sql` on a connection of the pool (on an SQLite file, on
        a thread: see :class:`.BlockingSqlite`)."""
        if self._blocking is not None:
            return await self._blocking.run(operation)
        async with self.engine.connect() as conn:
            return await operation(conn)

    async def _write(
        self, operation: Callable[[AsyncConnection], Awaitable[int | bool]]
    ) -> tuple[bool | None, BaseException | None]:
        """Run a guarded write until the database takes it.

        Returns (True, None) once written, (False, None) if the job was no longer this
        worker's, (None, error) if the database refused it for good, and (None, None) if the
        worker, closing, gave up on a database that stayed away.
        """
        backoff = faults.Backoff()
        while True:
            try:
                return bool(await self._run(operation)), None
            except Exception as exc:
                if not faults.is_transient(exc):
                    return None, exc
                pause = self._closing_pause(backoff)
                if pause is None:
                    return None, None
                _log_retry("database write", exc, pause)
                await asyncio.sleep(pause)

    def _closing_pause(self, backoff: faults.Backoff) -> float | None:
        """The pause before trying a write again, shorter once the worker is closing; None
        once the worker has tried for long enough after closing."""
        pause = backoff.next()
        if not self._closed.is_set():
            return pause
        left = self._closed_at + _CLOSING_PERSISTENCE - time.monotonic()
        return None if left <= 0 else min(pause, left, 1.0)

    async def _completer(self) -> None:
        """Delete finished jobs in batches: whatever finished while the last delete ran."""
        backoff = faults.Backoff()
        lane = _Lane(self.engine, self._blocking)
        try:
            await self._complete(lane, backoff)
        finally:
            await lane.reset()

    async def _complete(self, lane: _Lane, backoff: faults.Backoff) -> None:
        while True:
            await self._done_ready.wait()
            self._done_ready.clear()
            if not self._done:
                if self._closed.is_set():
                    return
                continue
            batch = self._next_done_batch()
            if self._done:
                self._done_ready.set()
            try:
                deleted = await self._finish(lane, batch)
                self.stats.deletes += 1
            except Exception as exc:
                await lane.reset()
                self._done = batch + self._done
                pause = self._closing_pause(backoff)
                if pause is None:
                    log.warning(
                        "could not delete %d finished jobs (%s); they will run again "
                        "after their lease expires",
                        len(self._done),
                        _brief(exc),
                    )
                    return
                _log_retry("deleting finished jobs", exc, pause)
                await asyncio.sleep(pause)
                self._done_ready.set()
                continue
            backoff.reset()
            for key in batch:
                self._held.pop(key, None)
                self._serial_done.pop(key, None)
            if deleted < len(batch):
                log.warning(
                    "%d finished jobs had been taken over after their lease expired; "
                    "they may run twice",
                    len(batch) - deleted,
                )
            if self._closed.is_set():
                self._done_ready.set()

    def _next_done_batch(self) -> list[_Key]:
        """Take the next finished jobs to delete: all of serial keys, or none of them, so that
        a batch is one statement or one transaction. A batch that fails then has changed
        nothing, and its retry finds every job still there: were a first part deleted and the
        rest failed, the retry would count the first part as taken over by another worker.
        Bounded, so that the statement stays within every engine's parameter limit."""
        serial = self._serial_done
        if not serial:
            batch, self._done = self._done[:_FINISH_BATCH], self._done[_FINISH_BATCH:]
            return batch
        keyed = self._done[0] in serial
        batch = [key for key in self._done if (key in serial) == keyed][:_FINISH_BATCH]
        taken = set(batch)
        self._done = [key for key in self._done if key not in taken]
        return batch

    async def _finish(self, lane: _Lane, batch: list[_Key]) -> int:
        """Delete a batch of finished jobs: jobs of serial keys in a transaction that also
        promotes the next job of each key, others by the plain delete."""
        serial = self._serial_done
        if batch[0] not in serial:
            return await lane.run(functools.partial(sql.finish, pairs=batch))
        keyed = [(key[0], key[1], serial[key]) for key in batch]
        deleted = await self._run(
            functools.partial(sql.finish_serial, held=keyed, notify=notify_enabled())
        )
        # The next jobs of these keys may be due now: claim without waiting for a poll.
        self._wake.set()
        self._slot_freed.set()
        return deleted

    # ------------------------------------------------------------------ shutdown

    def _active(self) -> bool:
        return bool(self._running or self._hooks or (self._starting and self._waiting))

    async def _drain(self) -> None:
        """Wait for what is running: jobs, ``failed()`` hooks, and, when the worker ends by
        itself (``--max-jobs``, ``--stop-when-empty``), the jobs claimed ahead. After
        :meth:`stop`, for at most ``grace`` seconds (counted from the stop); then cancel what
        is left, and give up on what ignores that."""
        self._refill()
        if self._active():
            log.info(
                "waiting for %d running jobs%s",
                len(self._running),
                "" if self._stop_at is None else f" (up to {self.settings.grace:g} s)",
            )
        while self._active():
            left = None
            if self._stop_at is not None:
                left = self._stop_at + self.settings.grace - time.monotonic()
                if left <= 0:
                    break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        self._starting = False
        if not (self._running or self._hooks):
            return
        log.warning("grace period over: interrupting %d jobs", len(self._running))
        for attempt in self._running.values():
            attempt.cancel(_CANCEL_WAIT)
        self._hooks.cancel(_CANCEL_WAIT)
        deadline = time.monotonic() + _CANCEL_WAIT
        while (self._running or self._hooks) and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        for attempt in list(self._running.values()):
            self._abandon(attempt)
        self._hooks.abandon_all()

    async def _release_unstarted(self) -> None:
        """Jobs claimed but not started go back to pending, unspent."""
        waiting = [(job.id, job.token) for job in self._waiting]
        self._waiting.clear()
        ready, self._ready = self._ready, []
        await self._release(waiting, refund=False)
        await self._release(ready, refund=True)

    async def _release_unfinished(self) -> None:
        """Jobs still held at exit go back to pending without spending an attempt. Jobs
        that finished, but whose deletion failed, are left to their lease: releasing them
        would run them again at once."""
        by_state: dict[int, list[_Key]] = {_UNCOUNTED: [], _STARTED: [], _COUNTED: [], _DONE: []}
        for key, state in self._held.items():
            by_state[state].append(key)
        await self._release(by_state[_UNCOUNTED] + by_state[_STARTED], refund=False)
        await self._release(by_state[_COUNTED], refund=True)

    async def _release(self, keys: list[_Key], *, refund: bool) -> None:
        if not keys:
            return
        try:
            released = await self._run(
                functools.partial(sql.release, pairs=keys, delay=None, refund_attempt=refund)
            )
        except Exception as exc:
            log.warning(
                "could not release %d unfinished jobs (%s); they run again after "
                "their lease expires",
                len(keys),
                _brief(exc),
            )
            return
        for key in keys:
            self._held.pop(key, None)
        log.info("released %d unfinished jobs back to pending", released)

    # ------------------------------------------------------------------ leases

    async def _heartbeats(self) -> None:
        """Extend the leases of every held job, until the worker is closed (so that jobs
        finishing in the grace period keep their leases)."""
        backoff = faults.Backoff()
        while not self._closed.is_set():
            try:
                await self._heartbeat()
                backoff.reset()
                pause = self.settings.heartbeat
            except Exception as exc:
                pause = min(backoff.next(), self.settings.heartbeat)
                _log_retry("lease maintenance", exc, pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), pause)

    async def _heartbeat(self) -> None:
        pairs = list(self._held)
        # Fewer rows than pairs is normal (jobs finished meanwhile); a job really taken over
        # is reported where its outcome is written, which its token no longer allows.
        for start in range(0, len(pairs), _FINISH_BATCH):
            batch = pairs[start : start + _FINISH_BATCH]
            await self._run(
                functools.partial(sql.extend_leases, pairs=batch, lease=self.settings.lease)
            )
        try:
            await self._presence()
        except Exception as exc:  # the leases matter more: extended first, and they go on
            log.warning("could not refresh this worker's row in workers: %s", _brief(exc))

    async def _presence(self) -> None:
        """Keep the worker's row in ``workers`` fresh (insert it if it is not there: the
        first time, or after it was pruned while this worker could not reach the database)."""
        if self._registered and await self._run(
            _alone(functools.partial(sql.touch_worker, worker_id=self.worker_id))
        ):
            return
        s = self.settings
        await self._run(
            _alone(
                functools.partial(
                    sql.register_worker,
                    worker_id=self.worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queues=s.queues,
                    concurrency=s.concurrency,
                    version=_version(),
                    lease=s.lease,
                )
            )
        )
        self._registered = True

    async def _unregister(self) -> None:
        if not self._registered:
            return
        try:
            await self._run(_alone(functools.partial(sql.remove_worker, worker_id=self.worker_id)))
        except Exception as exc:  # its row goes gone, then pruned
            log.warning("could not remove this worker's row from workers: %s", _brief(exc))

    async def _cancel_checks(self) -> None:
        """Stop the running jobs an operator cancelled: a look every second, by primary key."""
        while True:
            await asyncio.sleep(_CANCEL_CHECK_EVERY)
            running = {(a.claimed.id, a.claimed.token): a for a in self._running.values()}
            if not running:
                continue
            try:
                flagged = set(
                    await self._run(
                        functools.partial(sql.cancel_requested_ids, pairs=list(running))
                    )
                )
            except Exception as exc:
                log.debug("looking for cancelled jobs failed: %s", _brief(exc))
                continue
            for (job_id, _), attempt in running.items():
                if job_id in flagged and not attempt.abandoned:
                    log.warning("job id=%d was cancelled by an operator; stopping it", job_id)
                    attempt.stop(_CANCEL_WAIT)

    async def _rescuer(self) -> None:
        """Take over jobs of this worker's queues whose worker went silent, until stopping.
        Apart from the heartbeats: writing down a rescued job's fate must never delay them."""
        backoff = faults.Backoff()
        while not self._stopping.is_set():
            try:
                await self._rescue()
                backoff.reset()
                pause = self.settings.heartbeat
            except Exception as exc:
                pause = min(backoff.next(), self.settings.heartbeat)
                _log_retry("taking over expired leases", exc, pause)
            self._rescued.set()
            await self._pause(pause)

    async def _housekeep(self) -> None:
        """The occasional chores (see :func:`.sql.housekeep`), at start and then every
        ``_HOUSEKEEPING_EVERY`` seconds, whichever worker of many gets there."""
        now = time.monotonic()
        if now < self._housekept_at + _HOUSEKEEPING_EVERY:
            return
        self._housekept_at = now
        done = await self._run(sql.housekeep)
        kept = max(_WORKER_ROW_KEPT, 10 * self.settings.lease)
        await self._run(_alone(functools.partial(sql.prune_workers, older_than=kept)))
        if done.promoted_keys:
            log.warning(
                "promoted the next job of %d serial keys whose promotion was missed",
                done.promoted_keys,
            )
            self._wake.set()

    async def _rescue(self) -> None:
        await self._housekeep()
        limit = self.settings.batch_size
        while not self._stopping.is_set():
            rescued = await self._run(
                functools.partial(
                    sql.rescue_expired,
                    limit=limit,
                    token=secrets.randbits(63),
                    lease=self.settings.lease,
                    queues=self.settings.queues,
                    worker=self.worker_id,
                )
            )
            for claimed in rescued:
                self._held[(claimed.id, claimed.token)] = _UNCOUNTED
            for claimed in rescued:
                if claimed.cancel_requested:
                    outcome = cancelled(None)
                else:
                    outcome = judge_expired(claimed, max_tries=self.settings.max_tries)
                await self._apply(claimed, outcome, ran=False)
            if not rescued:
                # Not "fewer than the limit": a row another transaction held for a moment
                # was skipped (SKIP LOCKED), and the next statement may take it.
                return

    # ------------------------------------------------------------------ reporting

    async def _tallies(self) -> None:
        """Add the jobs finished per queue to job_counts every few seconds, and once more
        when the worker closes (a SIGKILL loses what was not added yet)."""
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), _COUNTS_EVERY)
            await self._add_counts()

    async def _add_counts(self) -> None:
        ok, bad = self._finished_ok, self._finished_bad
        if not ok and not bad:
            return
        self._finished_ok, self._finished_bad = collections.Counter(), collections.Counter()
        counts = {queue: (ok[queue], bad[queue]) for queue in ok.keys() | bad.keys()}
        try:
            await self._run(functools.partial(sql.record_counts, counts=counts))
        except Exception as exc:
            # Kept for the next round: the counts feed a chart, not worth more effort.
            self._finished_ok.update(ok)
            self._finished_bad.update(bad)
            log.warning("could not add to the counts of finished jobs: %s", _brief(exc))

    async def _reporter(self) -> None:
        """A line at INFO every so often with what was done, instead of one per job (which
        costs a busy worker much of its throughput); ``--verbose`` logs every job."""
        stats = self.stats
        last = (0, 0, 0)
        while True:
            await asyncio.sleep(_SUMMARY_EVERY)
            now = (stats.succeeded, stats.retried, stats.failed)
            if now != last:
                done = [b - a for a, b in zip(last, now, strict=True)]
                log.info(
                    "in the last %g s: %d succeeded, %d retried, %d failed; %d running",
                    _SUMMARY_EVERY,
                    *done,
                    len(self._running),
                )
                last = now

    # ------------------------------------------------------------------ LISTEN/NOTIFY

    async def _listen(self) -> None:
        """Wake the claim loop on NOTIFY; on a lost connection, poll and reconnect."""
        backoff = faults.Backoff()
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

                        def on_control(*args: Any) -> None:
                            if args[3] in queues:
                                self._paused_read_at = -math.inf  # read the paused set again
                                self._wake.set()

                        await driver.add_listener(sql.NOTIFY_CHANNEL, on_notify)
                        await driver.add_listener(sql.CONTROL_CHANNEL, on_control)
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


def _alone(
    operation: Callable[[AsyncConnection], Awaitable[_T]],
) -> Callable[[AsyncConnection], Awaitable[_T]]:
    """``operation`` as single statements in autocommit mode: no transaction left open."""

    async def alone(conn: AsyncConnection) -> _T:
        return await operation(await conn.execution_options(isolation_level="AUTOCOMMIT"))

    return alone


def _version() -> str:
    try:
        return version("routemq-outbox")
    except PackageNotFoundError:  # pragma: no cover - a checkout without install
        return "0.0.0"


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
    missing = faults.missing_schema(exc)
    if missing is not None:
        log.error(
            "%s failed: the database is missing %s (%s); run `routemq-outbox migrate`. "
            "Retrying in %.1f s",
            what,
            missing,
            _brief(exc),
            pause,
        )
    elif isinstance(exc, OutboxError):  # e.g. no SQLite database file (yet)
        log.error("%s failed: %s; retrying in %.1f s", what, exc, pause)
    elif isinstance(exc, TRANSIENT):
        log.warning("%s failed (%s); retrying in %.1f s", what, _brief(exc), pause)
    else:
        message = "%s failed unexpectedly (%s); retrying in %.1f s"
        log.error(message, what, _brief(exc), pause, exc_info=exc)


def _log_unrecorded(
    claimed: sql.Claimed, what: str, held: bool | None, problem: BaseException | None = None
) -> None:
    if held is False:
        log.warning(
            "job id=%d queue=%s: its lease had expired and it was taken over by another "
            "worker; this worker's %s was not recorded",
            claimed.id,
            claimed.queue,
            what,
        )
    elif problem is not None:
        log.error(
            "job id=%d queue=%s: the database refused to record its %s (%s); it is left "
            "to its lease and runs again after that",
            claimed.id,
            claimed.queue,
            what,
            _brief(problem),
            exc_info=problem,
        )
    else:
        log.warning(
            "job id=%d queue=%s: its %s could not be recorded before the worker exited; it "
            "runs again after its lease expires",
            claimed.id,
            claimed.queue,
            what,
        )


def _storable(text: str) -> str:
    """``text`` escaped down to printable ASCII: what any engine's text column can hold."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\x00", "\\x00")


def _ms(outcome: Outcome) -> float:
    return outcome.duration * 1000
