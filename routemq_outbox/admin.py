"""Operating the queue: what the ``routemq-outbox`` operator commands do.

Every function takes an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` and runs statements from
:mod:`routemq_outbox.sql`; the CLI parses its arguments, calls one of these and prints the
result. Applications can call them too (an admin page, a health endpoint)::

    from routemq_outbox import admin

    for counts in await admin.queue_stats(engine):
        print(counts.queue, counts.pending, counts.oldest_due_age)

Queues exist only through their rows: a queue is *known* while a job or a failed job is in it
(and, for pausing and resuming, while it is paused or a live worker serves it). Commands that
change something refuse a queue that is not known, job ids that are not in ``jobs`` and
failed-job ids or uuids that are not in ``failed_jobs`` (:class:`~.errors.UnknownQueue`,
:class:`~.errors.UnknownJobId`, :class:`~.errors.UnknownFailedJob`, all
:class:`~.errors.NotFound`), and then change nothing at all. Read-only commands report zeros
for a queue with no rows (an empty queue is normal).

Priorities go from :data:`PRIORITY_MIN` (0, the default) to :data:`PRIORITY_MAX` (9); a
lower priority runs first. A cancelled job is not lost: a waiting one moves to ``failed_jobs``
at once, with a ``Cancelled`` error naming the reason; a running one is asked to stop, and its
worker cancels ``handle()`` and records it there the same way, without a retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from . import sql
from .config import DEFAULT_CONNECTION, notify_enabled, redact
from .errors import (
    Cancelled,
    ConfigurationError,
    UnknownFailedJob,
    UnknownJobId,
    UnknownQueue,
    brief,
)
from .job import validate_queue_name
from .migrate import APP_VERSION_TABLE, BRANCH, VERSION_TABLE, head_revision
from .schema import DEFAULT_PRIORITY, PRIORITY_MAX, PRIORITY_MIN
from .sql import QueueCounts

__all__ = [
    "CANCEL_BATCH",
    "DATABASE_ERRORS",
    "DEFAULT_PRIORITY",
    "MAX_DURATION",
    "MAX_FAILED_ID",
    "MAX_JOB_ID",
    "MAX_JOB_PAGE",
    "MAX_LIST_LIMIT",
    "MAX_RETRY_BATCH",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "RETRY_BATCH",
    "THROUGHPUT_MINUTES",
    "CancelResult",
    "FailedJob",
    "FailedPage",
    "Health",
    "JobInfo",
    "JobPage",
    "QueueCounts",
    "QueueState",
    "Throughput",
    "WorkerInfo",
    "cancel_jobs",
    "cancel_matching",
    "check_health",
    "clear_queue",
    "database_problem",
    "flush_failed",
    "forget_failed",
    "list_failed",
    "list_jobs",
    "list_queues",
    "list_workers",
    "parse_duration",
    "parse_failed_refs",
    "parse_job_ids",
    "pause_queue",
    "paused_queues",
    "prune_failed",
    "queue_names",
    "queue_size",
    "queue_stats",
    "resume_queue",
    "retry_failed",
    "run_now",
    "show_failed",
    "show_job",
    "throughput",
]

RETRY_BATCH = 1000
"""Failed jobs moved back per transaction by ``retry_failed(all=True)``."""
MAX_RETRY_BATCH = 10_000
"""The most ``batch_size`` may be: a batch is held in memory, payloads and all."""
MAX_LIST_LIMIT = 1_000_000
"""The most failed jobs ``list_failed`` returns at once."""
MAX_FAILED_ID = 2**63 - 1
"""Failed job ids are 64-bit integers."""
MAX_DURATION = 100 * 365 * 86400.0
"""The longest age ``prune_failed`` and ``parse_duration`` take: a century, which keeps
``now - age`` within every engine's calendar."""

MAX_JOB_ID = 2**63 - 1
"""Job ids are 64-bit integers."""
MAX_JOB_PAGE = 1000
"""The most jobs ``list_jobs`` returns at once."""
CANCEL_BATCH = 1000
"""Jobs cancelled per transaction by ``cancel_matching``."""

DATABASE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, OSError)
"""What talking to a database may raise: connection trouble, missing tables, …"""


# ----------------------------------------------------------------------------- queues


async def queue_stats(engine: AsyncEngine, queue: str | None = None) -> list[QueueCounts]:
    """Per queue: pending (due now), delayed, reserved, failed, and the age in seconds of the
    oldest due job. Every queue with rows, or just ``queue`` (zeros if it has none)."""
    if queue is None:
        return await sql.queue_counts(engine)
    return await sql.queue_counts(engine, [validate_queue_name(queue)])


async def queue_size(engine: AsyncEngine, queue: str = "default") -> int:
    """Jobs waiting in ``queue``, due or delayed: what ``queue.size()`` returns."""
    return await sql.queue_size(engine, validate_queue_name(queue))


async def _require_queue(engine: AsyncEngine, queue: str) -> str:
    validate_queue_name(queue)
    if await sql.queue_exists(engine, queue):
        return queue
    known = await sql.known_queues(engine)
    if not known:
        hint = "there are no jobs or failed jobs at all"
    else:
        shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        hint = f"queues with jobs: {shown}"
    raise UnknownQueue(f"unknown queue {queue!r}: no job or failed job is in it ({hint})")


async def clear_queue(
    engine: AsyncEngine, queue: str, *, confirm: Callable[[int], bool] | None = None
) -> int | None:
    """Delete the waiting jobs (due and delayed) of ``queue``; jobs a worker is running are
    left to finish. ``confirm(n)`` is asked first with the number about to go; when it says
    no, nothing is deleted and the result is ``None``. Returns how many were deleted."""
    await _require_queue(engine, queue)
    if confirm is not None and not confirm(await sql.queue_size(engine, queue)):
        return None
    return await sql.clear_queue(engine, queue)


# ----------------------------------------------------------------------------- throughput

THROUGHPUT_MINUTES = 60
"""The minutes :func:`throughput` reports by default: the last hour."""


@dataclass(frozen=True)
class Throughput:
    """Jobs that finished in one minute (its start, UTC): ``succeeded``, or ``failed`` (moved to
    failed_jobs)."""

    minute: datetime
    succeeded: int
    failed: int


async def throughput(
    engine: AsyncEngine, *, minutes: int = THROUGHPUT_MINUTES, queue: str | None = None
) -> list[Throughput]:
    """Jobs finished per minute (of ``queue``) over the last ``minutes`` minutes up to the
    current one, oldest first, minutes without any included as zeros.

    From the counts workers add every few seconds, so the current minute is still filling,
    and a worker killed outright (SIGKILL) loses the last few seconds of its counts."""
    if not 1 <= minutes <= sql.COUNTS_KEPT_MINUTES:
        raise ConfigurationError(
            f"minutes must be from 1 to {sql.COUNTS_KEPT_MINUTES}, got {minutes}"
        )
    if queue is not None:
        validate_queue_name(queue)
    now, rows = await sql.throughput(engine, minutes, queue)
    found = {row.minute: row for row in rows}
    points = []
    for minute in range(now - minutes + 1, now + 1):
        row = found.get(minute)
        points.append(
            Throughput(
                datetime.fromtimestamp(minute * 60, UTC),
                row.succeeded if row else 0,
                row.failed if row else 0,
            )
        )
    return points


# ----------------------------------------------------------------------------- failed jobs


@dataclass(frozen=True)
class FailedJob:
    """A row of failed_jobs. ``job`` is the job name in the payload (None if unreadable)."""

    id: int
    uuid: str
    queue: str
    job: str | None
    attempts: int
    failed_at: datetime
    exception: str
    payload: str
    connection: str
    job_id: int | None

    @classmethod
    def _of(cls, row: sql.FailedRow) -> FailedJob:
        return cls(
            id=row.id,
            uuid=row.uuid,
            queue=row.queue,
            job=_job_name(row.payload),
            attempts=row.attempts,
            failed_at=row.failed_at,
            exception=row.exception,
            payload=row.payload,
            connection=row.connection,
            job_id=row.job_id,
        )

    @property
    def error(self) -> str:
        """The first line of the exception: its type and message."""
        lines = self.exception.strip().splitlines()
        return lines[0] if lines else ""

    def as_dict(self, *, full: bool = True) -> dict[str, Any]:
        """For JSON: ``full`` adds the payload (parsed when it is JSON) and the traceback."""
        doc: dict[str, Any] = {
            "id": self.id,
            "uuid": self.uuid,
            "queue": self.queue,
            "job": self.job,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat(),
            "error": self.error,
            "connection": self.connection,
            "job_id": self.job_id,
        }
        if full:
            try:
                doc["payload"] = json.loads(self.payload)
            except ValueError:
                doc["payload"] = self.payload
            doc["exception"] = self.exception
        return doc


def _job_name(payload: str) -> str | None:
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    name = document.get("job") if isinstance(document, dict) else None
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class FailedPage:
    """The newest failed jobs, and how many there are in all."""

    jobs: list[FailedJob]
    total: int


async def list_failed(
    engine: AsyncEngine, *, queue: str | None = None, limit: int = 50, before: int | None = None
) -> FailedPage:
    """The ``limit`` most recent failed jobs (of ``queue``), newest first; with ``before``,
    those with lower ids (the next page: pass the last id of the one before)."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ConfigurationError(f"limit must be from 1 to {MAX_LIST_LIMIT}, got {limit}")
    if queue is not None:
        validate_queue_name(queue)
    if before is not None and not 0 <= before <= MAX_FAILED_ID:
        raise ConfigurationError(f"before must be a failed job id, got {before}")
    rows, total = await sql.failed_page(engine, queue, limit, before)
    return FailedPage([FailedJob._of(row) for row in rows], total)


def parse_failed_refs(refs: Iterable[str | int]) -> tuple[list[int], list[str]]:
    """Split failed-job references into ids and (canonical) uuids."""
    ids: list[int] = []
    uuids: list[str] = []
    for ref in refs:
        text = str(ref).strip()
        if text.isascii() and text.isdigit():
            if int(text) > MAX_FAILED_ID:
                raise ConfigurationError(
                    f"failed job id {text} is out of range: ids go up to {MAX_FAILED_ID}"
                )
            ids.append(int(text))
            continue
        try:
            uuids.append(str(uuid.UUID(text)))
        except ValueError:
            raise UnknownFailedJob(
                f"{text!r} is neither a failed job id (a number) nor a uuid"
            ) from None
    return ids, uuids


def _missing(taken: sql.Taken, verb: str) -> UnknownFailedJob:
    parts = []
    if taken.missing_ids:
        parts.append("id " + ", ".join(map(str, taken.missing_ids)))
    if taken.missing_uuids:
        parts.append("uuid " + ", ".join(taken.missing_uuids))
    return UnknownFailedJob(f"failed_jobs has no job with {' or '.join(parts)}: nothing was {verb}")


async def show_failed(engine: AsyncEngine, ref: str | int) -> FailedJob:
    """One failed job, by id or uuid."""
    ids, uuids = parse_failed_refs([ref])
    rows = await sql.failed_by_refs(engine, ids, uuids)
    if not rows:
        raise UnknownFailedJob(f"failed_jobs has no job with {'id' if ids else 'uuid'} {ref}")
    return FailedJob._of(rows[0])


async def retry_failed(
    engine: AsyncEngine,
    refs: Sequence[str | int] = (),
    *,
    all: bool = False,
    queue: str | None = None,
    batch_size: int = RETRY_BATCH,
) -> int:
    """Move failed jobs back into ``jobs`` with their attempts reset, due now; returns how many.

    By id or uuid (``refs``): all of them in one transaction, or, if any is not in
    failed_jobs, none. With ``all=True`` (optionally only ``queue``): every job that had
    failed when the call began, ``batch_size`` per transaction; concurrent calls share the
    rows and never move one twice. Either way a job is in one table or the other, never both.
    """
    if all == bool(refs):
        raise ConfigurationError("give the failed jobs to retry, or all=True (not both)")
    if not 1 <= batch_size <= MAX_RETRY_BATCH:
        raise ConfigurationError(
            f"batch_size must be from 1 to {MAX_RETRY_BATCH}, got {batch_size}"
        )
    notify = notify_enabled()
    if refs:
        if queue is not None:
            raise ConfigurationError("queue= selects failed jobs only together with all=True")
        ids, uuids = parse_failed_refs(refs)
        taken = await sql.retry_failed(engine, ids, uuids, notify=notify)
        if taken.missing_ids or taken.missing_uuids:
            raise _missing(taken, "retried")
        return taken.count
    if queue is not None:
        await _require_queue(engine, queue)
    # Only what had failed by now: jobs that fail again meanwhile are not chased round.
    up_to = await sql.newest_failed_id(engine)
    moved = 0
    while up_to:
        count = await sql.retry_failed_batch(engine, queue, up_to, batch_size, notify=notify)
        if not count:
            break
        moved += count
    return moved


async def forget_failed(engine: AsyncEngine, refs: Sequence[str | int]) -> int:
    """Delete failed jobs by id or uuid: all of them, or, if any is missing, none."""
    if not refs:
        raise ConfigurationError("give the failed jobs to forget")
    ids, uuids = parse_failed_refs(refs)
    taken = await sql.delete_failed(engine, ids, uuids)
    if taken.missing_ids or taken.missing_uuids:
        raise _missing(taken, "deleted")
    return taken.count


async def flush_failed(engine: AsyncEngine, *, queue: str | None = None) -> int:
    """Delete every failed job (of ``queue``); returns how many."""
    if queue is not None:
        await _require_queue(engine, queue)
    return await sql.flush_failed(engine, queue)


async def prune_failed(
    engine: AsyncEngine, older_than: float | timedelta, *, queue: str | None = None
) -> int:
    """Delete failed jobs that failed more than ``older_than`` (seconds or a timedelta) ago,
    by the database clock; returns how many."""
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if not 0 < seconds <= MAX_DURATION:
        raise ConfigurationError(
            f"older_than must be a positive duration of at most a century, got {older_than!r}"
        )
    if queue is not None:
        await _require_queue(engine, queue)
    return await sql.prune_failed(engine, float(seconds), queue)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``48h``, ``7d``, ``2w``, ``90s`` or a bare number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match[1]) * _UNIT_SECONDS[match[2].lower()] if match else 0.0
    if not seconds > 0:
        raise ValueError(
            f"invalid duration {text!r}: use a positive number of seconds, or one with a unit: "
            "s, m, h, d or w (e.g. 30m, 48h, 7d, 2w)"
        )
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {text!r}: longer than a century")
    return seconds


# ----------------------------------------------------------------------------- jobs

JobState = Literal["pending", "delayed", "running"]


@dataclass(frozen=True)
class JobInfo:
    """A job in ``jobs``: waiting (``pending``: due; ``delayed``: not yet) or ``running`` (a
    worker holds it until ``reserved_until``, unless its lease is renewed). ``job`` is the job
    name in the payload (None if unreadable); ``payload`` the stored JSON text."""

    id: int
    queue: str
    job: str | None
    state: JobState
    priority: int
    attempts: int
    available_at: datetime
    created_at: datetime
    reserved_until: datetime | None
    unique_key: str | None
    serial_key: str | None
    cancel_requested: bool
    payload: str

    @classmethod
    def _of(cls, row: sql.JobRow) -> JobInfo:
        return cls(
            id=row.id,
            queue=row.queue,
            job=_job_name(row.payload),
            state=cast(JobState, row.state),
            priority=row.priority,
            attempts=row.attempts,
            available_at=row.available_at,
            created_at=row.created_at,
            reserved_until=row.reserved_until,
            unique_key=row.unique_key,
            serial_key=row.serial_key,
            cancel_requested=row.cancel_requested,
            payload=row.payload,
        )

    def as_dict(self, *, full: bool = True) -> dict[str, Any]:
        """For JSON: ``full`` adds the payload (parsed when it is JSON)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "queue": self.queue,
            "job": self.job,
            "state": self.state,
            "priority": self.priority,
            "attempts": self.attempts,
            "available_at": self.available_at.isoformat(),
            "created_at": self.created_at.isoformat(),
            "reserved_until": self.reserved_until and self.reserved_until.isoformat(),
            "unique_key": self.unique_key,
            "serial_key": self.serial_key,
            "cancel_requested": self.cancel_requested,
        }
        if full:
            try:
                doc["payload"] = json.loads(self.payload)
            except ValueError:
                doc["payload"] = self.payload
        return doc


@dataclass(frozen=True)
class JobPage:
    """Jobs by ascending id, and the ``after`` of the next page (None: this is the last)."""

    jobs: list[JobInfo]
    next_after: int | None


def _check_id(job_id: object, what: str = "job id") -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_JOB_ID:
        raise ConfigurationError(
            f"{what} must be an integer from 1 to {MAX_JOB_ID}, got {job_id!r}"
        )
    return job_id


def parse_job_ids(refs: Iterable[str | int]) -> list[int]:
    """Job ids from text (``"17"``) or integers; anything else is refused, naming it."""
    ids = []
    for ref in refs:
        text = str(ref).strip()
        if not (text.isascii() and text.isdigit()):
            raise ConfigurationError(f"{text!r} is not a job id (a positive number)")
        ids.append(_check_id(int(text)))
    return ids


async def list_jobs(
    engine: AsyncEngine,
    *,
    queue: str | None = None,
    state: str | None = None,
    job: str | None = None,
    text: str | None = None,
    after: int | None = None,
    limit: int = 50,
) -> JobPage:
    """A page of jobs by ascending id, from the first with an id above ``after``: of ``queue``,
    in ``state`` (``pending``, ``delayed`` or ``running``; None for all three), named ``job``,
    whose payload text contains ``text``. Pages by keyset (``after=page.next_after``), so a
    page costs the same wherever it is in a table of millions."""
    if not 1 <= limit <= MAX_JOB_PAGE:
        raise ConfigurationError(f"limit must be from 1 to {MAX_JOB_PAGE}, got {limit}")
    if state is not None and state not in sql.JOB_STATES:
        raise ConfigurationError(
            f"state must be one of {', '.join(sql.JOB_STATES)} (or None for all), got {state!r}"
        )
    if queue is not None:
        validate_queue_name(queue)
    if after is not None and after != 0:
        _check_id(after, "after")
    rows, next_after = await sql.job_page(
        engine, queue=queue, state=state, job=job, text=text, after=after, limit=limit
    )
    return JobPage([JobInfo._of(row) for row in rows], next_after)


async def show_job(engine: AsyncEngine, job_id: int) -> JobInfo:
    """One job, by id (:class:`~.errors.UnknownJobId` if ``jobs`` holds none)."""
    rows = await sql.jobs_by_id(engine, [_check_id(job_id)])
    if not rows:
        raise UnknownJobId(
            f"jobs has no job with id {job_id}: it may have finished, failed (see failed_jobs) "
            "or never existed"
        )
    return JobInfo._of(rows[0])


@dataclass(frozen=True)
class CancelResult:
    """What cancelling did: ``deleted`` waiting jobs (now in failed_jobs as cancelled),
    ``stopping`` running jobs (their workers were asked to stop them), ``missing`` ids (not
    in ``jobs``: finished, failed, cancelled already, or never there)."""

    deleted: list[int]
    stopping: list[int]
    missing: list[int]


def _cancel_exception(reason: str | None) -> str:
    message = "cancelled by an operator" + (f": {reason}" if reason else "")
    return f"{Cancelled.__module__}.{Cancelled.__qualname__}: {message}"


async def cancel_jobs(
    engine: AsyncEngine,
    ids: Sequence[int],
    *,
    reason: str | None = None,
    missing_ok: bool = True,
) -> CancelResult:
    """Cancel jobs by id. Waiting ones move to ``failed_jobs``, in one transaction, with the
    error ``Cancelled`` (and ``reason``); running ones are asked to stop: their worker cancels
    ``handle()`` within about a second and records the job the same way, with no retry.

    Ids not in ``jobs`` are listed in ``missing``; with ``missing_ok=False`` they raise
    :class:`~.errors.UnknownJobId` instead, and nothing is cancelled."""
    wanted = [_check_id(i) for i in ids]
    if not wanted:
        raise ConfigurationError("give the ids of the jobs to cancel")
    outcome = await sql.cancel_jobs(
        engine,
        wanted,
        exception=_cancel_exception(reason),
        connection=DEFAULT_CONNECTION,
        all_or_nothing=not missing_ok,
    )
    if outcome.missing and not missing_ok:
        raise UnknownJobId(
            f"jobs has no job with id {', '.join(map(str, outcome.missing))} (finished, failed, "
            "cancelled already, or never there): nothing was cancelled"
        )
    return CancelResult(outcome.deleted, outcome.stopping, outcome.missing)


async def cancel_matching(
    engine: AsyncEngine, *, queue: str, job: str | None = None, reason: str | None = None
) -> CancelResult:
    """Cancel every job of ``queue`` (named ``job``) there when the call began, as
    :func:`cancel_jobs` does, :data:`CANCEL_BATCH` per transaction."""
    await _require_queue(engine, queue)
    up_to = await sql.newest_job_id(engine)
    deleted: list[int] = []
    stopping: list[int] = []
    after = 0
    while True:
        ids = await sql.job_ids_matching(engine, queue, job, after, CANCEL_BATCH)
        ids = [i for i in ids if i <= up_to]
        if not ids:
            break
        outcome = await sql.cancel_jobs(
            engine, ids, exception=_cancel_exception(reason), connection=DEFAULT_CONNECTION
        )
        deleted += outcome.deleted
        stopping += outcome.stopping
        after = ids[-1]
    return CancelResult(deleted, stopping, [])


async def run_now(engine: AsyncEngine, ids: Sequence[int]) -> list[int]:
    """Make waiting jobs due now; returns their ids (running ones are left alone). If any id
    is not in ``jobs``, raises :class:`~.errors.UnknownJobId` naming them, and changes
    nothing."""
    wanted = [_check_id(i) for i in ids]
    if not wanted:
        raise ConfigurationError("give the ids of the jobs to run now")
    made_due, missing = await sql.run_now(engine, wanted)
    if missing:
        raise UnknownJobId(
            f"jobs has no job with id {', '.join(map(str, missing))}: nothing was changed"
        )
    return made_due


# ----------------------------------------------------------------------------- queue states


async def pause_queue(engine: AsyncEngine, queue: str) -> None:
    """Pause ``queue``: workers stop claiming its jobs (within their ``--sleep``, at once on
    PostgreSQL with LISTEN) and finish those they hold. It stays paused, across worker
    restarts, until :func:`resume_queue`. A queue that is not known yet (no jobs, failed
    jobs, or live worker serving it) is refused, as a likely typo."""
    validate_queue_name(queue)
    if queue not in await sql.paused_queue_names(engine) and not await _served(engine, queue):
        await _require_queue(engine, queue)
    await sql.pause_queue(engine, queue, notify=True)


async def resume_queue(engine: AsyncEngine, queue: str) -> None:
    """Resume a paused ``queue`` (a queue that is not paused is left as it is)."""
    validate_queue_name(queue)
    if not await sql.resume_queue(engine, queue, notify=True) and not await _served(engine, queue):
        await _require_queue(engine, queue)


async def paused_queues(engine: AsyncEngine) -> set[str]:
    """The names of the paused queues."""
    return await sql.paused_queue_names(engine)


async def _served(engine: AsyncEngine, queue: str) -> bool:
    return any(w.alive and queue in w.queues for w in await sql.worker_rows(engine))


@dataclass(frozen=True)
class QueueState:
    """A queue's state and counts: ``pending`` (due), ``delayed``, ``running``, ``failed``,
    and how long its oldest due job has waited, in seconds (None: none is due). ``capped``
    names the counts that reached the cap given to list_queues: those hold the cap, and the
    queue has at least that many (more, most likely)."""

    name: str
    paused: bool
    pending: int
    delayed: int
    running: int
    failed: int
    oldest_due_age: float | None
    capped: frozenset[str] = frozenset()


async def list_queues(engine: AsyncEngine, *, cap: int | None = None) -> list[QueueState]:
    """Every queue with jobs, failed jobs or a pause, by name.

    With ``cap``, no count goes past it: each reads at most ``cap + 1`` index entries, so the
    list costs the same with a million jobs as with ten thousand (what the dashboard wants).
    Without, the counts are exact, and read all of the indexes they count."""
    if cap is not None and cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    paused = await sql.paused_queue_names(engine)
    if cap is None:
        found = await sql.queue_counts(engine)
    else:
        names = sorted(set(await sql.known_queues(engine)) | paused)
        found = await sql.capped_queue_counts(engine, names, cap)
    counts = {c.queue: c for c in found}
    for name in paused - counts.keys():
        counts[name] = QueueCounts(name)
    states = []
    for name, c in sorted(counts.items()):
        values = {"pending": c.pending, "delayed": c.delayed, "running": c.reserved}
        values["failed"] = c.failed
        over = frozenset(k for k, v in values.items() if cap is not None and v > cap)
        shown = {k: cap if cap is not None and k in over else v for k, v in values.items()}
        states.append(
            QueueState(
                name=name,
                paused=name in paused,
                pending=shown["pending"],
                delayed=shown["delayed"],
                running=shown["running"],
                failed=shown["failed"],
                oldest_due_age=c.oldest_due_age,
                capped=over,
            )
        )
    return states


async def queue_names(engine: AsyncEngine, *, failed_only: bool = False) -> list[str]:
    """The queues list_queues lists (``failed_only``: those with failed jobs), sorted, without
    counting anything: one index probe per name."""
    names = set(await sql.known_queues(engine, failed_only=failed_only))
    if not failed_only:
        names |= await sql.paused_queue_names(engine)
    return sorted(names)


# ----------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerInfo:
    """A worker process: where it runs, what it serves, and whether it is alive (it renewed
    its row within its lease time); ``running`` holds the ids of the jobs it holds."""

    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    version: str
    started_at: datetime
    last_seen: datetime
    alive: bool
    running: list[int]

    def as_dict(self) -> dict[str, Any]:
        """For JSON."""
        document = dataclasses.asdict(self)
        document.update(
            started_at=self.started_at.isoformat(), last_seen=self.last_seen.isoformat()
        )
        return document


async def list_workers(engine: AsyncEngine) -> list[WorkerInfo]:
    """Live workers (oldest first), then gone ones not yet pruned (latest seen first)."""
    return [WorkerInfo(**dataclasses.asdict(row)) for row in await sql.worker_rows(engine)]


# ----------------------------------------------------------------------------- health


def database_problem(url: str | URL, exc: BaseException, what: str = "") -> str:
    """``database URL [what]: <the error in one line>``, the password hidden in both."""
    reason = brief(exc)
    try:
        password = make_url(url).password
    except sqlalchemy.exc.ArgumentError:
        password = None
    if password:
        reason = reason.replace(str(password), "***")
    return f"database {redact(url)}{' ' + what if what else ''}: {reason}"


@dataclass(frozen=True)
class Health:
    """Whether the database answers and its schema is the one this version needs."""

    ok: bool
    message: str
    revision: str | None = None


async def check_health(engine: AsyncEngine, *, within: float = 10.0) -> Health:
    """Reachable and migrated to head, with an answer ``within`` seconds? Never raises for a
    database problem: it reports it."""
    where = redact(engine.url)
    head = head_revision()
    try:
        found = await asyncio.wait_for(
            sql.stored_revisions(engine, [VERSION_TABLE, APP_VERSION_TABLE]), within
        )
    except TimeoutError:
        return Health(False, f"database {where} is unreachable: no answer within {within:g} s")
    except DATABASE_ERRORS as exc:
        return Health(False, database_problem(engine.url, exc, "is unreachable"))
    ours = found.get(VERSION_TABLE, [])
    if head in ours or (not ours and head in found.get(APP_VERSION_TABLE, [])):
        return Health(True, f"database {where} is reachable and its schema is at head", head)
    embedded = [rev for rev in found.get(APP_VERSION_TABLE, []) if rev.startswith(f"{BRANCH}_")]
    if not ours and embedded:
        return Health(
            False,
            f"database {where} has schema revision {', '.join(embedded)} in "
            f"{APP_VERSION_TABLE}, but this routemq-outbox needs {head}: run `alembic upgrade "
            "heads` in your application, whose alembic applies our migrations",
            ", ".join(embedded),
        )
    if not ours:
        return Health(False, f"database {where} is not migrated: run routemq-outbox migrate")
    revision = ", ".join(ours)
    return Health(
        False,
        f"database {where} has schema revision {revision}, but this routemq-outbox needs "
        f"{head}: run routemq-outbox migrate (or upgrade routemq-outbox if the database is "
        "newer)",
        revision,
    )
