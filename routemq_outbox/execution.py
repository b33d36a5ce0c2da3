"""Running one claimed job, apart from the claim loop: load it, run it, judge the result.

Nothing here touches the database; the worker applies the :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import time
import traceback
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import NamedTuple

from . import tracing
from .errors import (
    Cancelled,
    FailJob,
    JobConstructionError,
    JobLoadError,
    JobTimeout,
    LeaseExpired,
    RetryJob,
)
from .job import Job, check_retry_delay, decode_payload, instantiate
from .sql import Claimed
from .threads import ThreadRunner

__all__ = [
    "DESCRIBE_MAX_CHARS",
    "Attempt",
    "Outcome",
    "Verdict",
    "cancelled",
    "cancelled_from_outside",
    "describe",
    "judge_expired",
    "load",
    "run",
    "run_hook",
    "timed_out",
]


class Verdict(Enum):
    DONE = "done"
    RETRY = "retry"
    FAIL = "fail"
    INTERRUPTED = "interrupted"


class Outcome(NamedTuple):
    """What became of one attempt.

    ``delay`` is the wait before the next attempt (RETRY; ``None`` keeps ``available_at``).
    ``job`` is the loaded instance, when loading worked (FAIL calls its ``failed()``).
    """

    verdict: Verdict
    job: Job | None = None
    error: BaseException | None = None
    delay: float | None = None
    duration: float = 0.0
    max_tries: int = 0


def load(claimed: Claimed) -> Job:
    """The job instance stored in ``claimed``; raises a JobLoadError for a bad row.

    Whatever goes wrong, even a ``BaseException`` raised by the job's constructor, is a
    JobLoadError: the worker then fails the row once instead of leaving it held.
    """
    try:
        name, data, scheduled_at = decode_payload(claimed.payload)
        job = instantiate(name, data, claimed.queue)
    except JobLoadError:
        raise
    except BaseException as exc:  # job code (__init__, a property setter) as in run()
        raise JobConstructionError(
            f"loading job id={claimed.id} raised {type(exc).__name__}: {exc}"
        ) from exc
    job.__dict__["_attempt"] = claimed.attempts
    job.__dict__["_job_id"] = claimed.id
    job.__dict__["_scheduled_at"] = scheduled_at
    return job


# failed_jobs.exception is for people: the head and the tail of a longer text say what and
# where; the middle of a 100 MB message or a runaway chain of causes does not.
DESCRIBE_MAX_CHARS = 64 * 1024


def describe(exc: BaseException) -> str:
    """``Type: message`` then the traceback: what failed_jobs.exception holds.

    The text is storable on every engine: NUL (which PostgreSQL's text cannot hold) becomes
    ``\\x00`` and a lone surrogate (which UTF-8 cannot encode) its ``\\udcff`` escape; of a
    text longer than :data:`DESCRIBE_MAX_CHARS`, that many characters are kept, half from its
    head and half from its tail.
    """
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    message = _str(exc)
    head = f"{name}: {message}" if message else name
    try:
        trace = "".join(traceback.format_exception(exc)).rstrip()
    except Exception as error:  # a __str__ that raises, a broken __traceback__
        trace = f"(the traceback could not be formatted: {type(error).__name__})"
    return _bounded(_storable(head + "\n\n" + trace), DESCRIBE_MAX_CHARS)


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as error:
        return f"(str() of the exception raised {type(error).__name__})"


def _storable(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def _bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    note = f"\n\n[... {len(text) - limit} characters left out ...]\n\n"
    return text[: limit // 2] + note + text[len(text) - (limit - limit // 2) :]


_IS_ASYNC: dict[object, bool] = {}


def _is_async(function: object) -> bool:
    is_async = _IS_ASYNC.get(function)
    if is_async is None:
        is_async = _IS_ASYNC[function] = inspect.iscoroutinefunction(function)
    return is_async


async def _call(function: Callable[[], object], is_async: bool, threads: ThreadRunner) -> None:
    """Await job code: a coroutine function on the loop, a plain ``def`` in a thread of its
    own, so that it cannot stall the worker's event loop (what it returns may be awaitable)."""
    if is_async:
        await function()  # type: ignore[misc]
        return
    result = await threads.run(function)
    if inspect.isawaitable(result):
        await result


class Attempt:
    """One attempt in progress, shared by the task running it and the worker's watchdog.

    The worker sets ``task`` when it starts the attempt; :func:`run` sets ``deadline`` (a
    ``time.monotonic()`` value) once it knows the job's timeout, and the watchdog cancels the
    task when the deadline passes. One watchdog for all attempts costs less than a timer per
    attempt, which matters when the worker runs tens of thousands of short jobs a second.

    A task that swallows its cancellation keeps running; once ``abandon_at`` has passed the
    worker gives up waiting for it (``abandoned``): its slot is freed and whatever the task
    does afterwards is ignored.
    """

    __slots__ = (
        "abandon_at",
        "abandoned",
        "cancel_requested",
        "claimed",
        "deadline",
        "job",
        "limit",
        "task",
        "timed_out",
    )

    def __init__(self, claimed: Claimed) -> None:
        self.claimed = claimed
        self.task: asyncio.Task[None] | None = None
        self.job: Job | None = None  # once loaded
        self.limit = 0.0  # the attempt's timeout in seconds, once known
        self.deadline = math.inf
        self.abandon_at = math.inf
        self.timed_out = False
        self.abandoned = False
        self.cancel_requested = False  # an operator cancelled the job

    def expire(self, now: float, cancel_wait: float) -> None:
        """Cancel the attempt if its deadline has passed (the watchdog calls this)."""
        if now >= self.deadline and not self.timed_out and self.task is not None:
            self.timed_out = True
            self.abandon_at = now + cancel_wait
            self.task.cancel()

    def cancel(self, cancel_wait: float) -> None:
        """Cancel the attempt now (shutdown); it may be abandoned ``cancel_wait`` s later."""
        if self.task is not None and not self.task.done():
            self.abandon_at = min(self.abandon_at, time.monotonic() + cancel_wait)
            self.task.cancel()

    def stop(self, cancel_wait: float) -> None:
        """An operator cancelled the job: cancel the attempt, which then fails for good."""
        if not self.cancel_requested and not self.timed_out:
            self.cancel_requested = True
            self.cancel(cancel_wait)

    def stuck(self, now: float) -> bool:
        """Cancelled, yet still running past ``abandon_at``: job code swallowed the cancel."""
        return now >= self.abandon_at and self.task is not None and not self.task.done()


def cancelled_from_outside() -> bool:
    """Whether the running task is being cancelled (shutdown), as opposed to job code raising
    a CancelledError of its own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _after_failure(
    job: Job, claimed: Claimed, max_tries: int, error: BaseException, started: float
) -> Outcome:
    duration = time.perf_counter() - started
    if isinstance(error, FailJob) or claimed.attempts >= max_tries:
        return Outcome(Verdict.FAIL, job, error, None, duration, max_tries)
    delay = error.delay if isinstance(error, RetryJob) and error.delay is not None else None
    if delay is None:
        try:
            delay = check_retry_delay(job.retry_delay(claimed.attempts))
        except Exception as exc:
            # A retry_delay() that raises, or returns a delay no engine can store, would do
            # the same on every attempt: fail the job, saying why, rather than hold it.
            exc.__cause__ = error
            return Outcome(Verdict.FAIL, job, exc, None, duration, max_tries)
    return Outcome(Verdict.RETRY, job, error, delay, duration, max_tries)


def run(
    attempt: Attempt,
    *,
    threads: ThreadRunner,
    time_limit: float | None = None,
    max_tries: int | None = None,
) -> Awaitable[Outcome]:
    """Run one attempt (a plain ``def handle`` in one of ``threads``), in a consumer span when
    tracing is on. ``time_limit``/``max_tries`` override the job's own."""
    if tracing.enabled():
        return tracing.process_span(
            attempt.claimed,
            functools.partial(
                _run, attempt, threads=threads, time_limit=time_limit, max_tries=max_tries
            ),
        )
    # The coroutine itself, not one awaiting it: untraced attempts pay for no extra frame.
    return _run(attempt, threads=threads, time_limit=time_limit, max_tries=max_tries)


async def _run(
    attempt: Attempt,
    *,
    threads: ThreadRunner,
    time_limit: float | None,
    max_tries: int | None,
) -> Outcome:
    claimed = attempt.claimed
    started = time.perf_counter()
    try:
        job = load(claimed)
    except JobLoadError as exc:
        return Outcome(Verdict.FAIL, None, exc, None, time.perf_counter() - started, 0)
    attempt.job = job
    tries = max_tries or job.max_tries
    if claimed.attempts > tries:
        error: BaseException = FailJob(
            f"attempt {claimed.attempts} is past max_tries={tries}; not run again"
        )
        return Outcome(Verdict.FAIL, job, error, None, 0.0, tries)
    limit = attempt.limit = time_limit or job.timeout
    task = attempt.task
    assert task is not None, "the worker sets Attempt.task before the attempt starts"
    attempt.deadline = time.monotonic() + limit
    try:
        if _is_async(type(job).handle):
            await job.handle()  # the common case, without a coroutine of ours around it
        else:
            await _call(job.handle, False, threads)
    except asyncio.CancelledError as exc:
        if attempt.cancel_requested and task.uncancel() == 0:
            return cancelled(job, time.perf_counter() - started, exc)
        if attempt.timed_out and task.uncancel() == 0:
            error = JobTimeout(
                f"attempt {claimed.attempts} ran longer than its {limit:g} s timeout"
            )
            error.__cause__ = exc
            return _after_failure(job, claimed, tries, error, started)
        if task.cancelling():
            # The worker is shutting down and its grace period ran out.
            return Outcome(Verdict.INTERRUPTED, job, None, None, time.perf_counter() - started)
        return _after_failure(job, claimed, tries, exc, started)  # the job's own CancelledError
    except BaseException as exc:  # a job must not take the worker down
        # SystemExit or KeyboardInterrupt raised *by job code* fail that attempt like any
        # exception; signals to the worker process are handled by the worker, not here.
        if attempt.timed_out:
            task.uncancel()  # the job swallowed our cancellation and raised something else
        return _after_failure(job, claimed, tries, exc, started)
    finally:
        attempt.deadline = math.inf  # writing down the outcome is never cut short
    if attempt.timed_out or attempt.cancel_requested:
        task.uncancel()  # the job swallowed our cancellation and finished anyway
    return Outcome(Verdict.DONE, job, None, None, time.perf_counter() - started, tries)


def cancelled(
    job: Job | None, duration: float = 0.0, cause: BaseException | None = None
) -> Outcome:
    """The outcome of a job an operator cancelled: failed, with no more attempts."""
    error = Cancelled("cancelled by an operator" + (" while running" if cause else ""))
    error.__cause__ = cause
    return Outcome(Verdict.FAIL, job, error, None, duration)


def timed_out(attempt: Attempt, max_tries: int | None) -> Outcome:
    """The outcome of an attempt that ran past its timeout and ignored being cancelled."""
    job = attempt.job
    assert job is not None, "only a running attempt can time out"
    claimed = attempt.claimed
    error = JobTimeout(
        f"attempt {claimed.attempts} ran longer than its {attempt.limit:g} s timeout and "
        "ignored being cancelled; it may still be running"
    )
    return _after_failure(job, claimed, max_tries or job.max_tries, error, time.perf_counter())


async def run_hook(job: Job, error: BaseException, threads: ThreadRunner) -> None:
    """Call ``job.failed(error)``: a coroutine on the loop, a plain ``def`` in a thread."""
    await _call(functools.partial(job.failed, error), _is_async(type(job).failed), threads)


def judge_expired(claimed: Claimed, *, max_tries: int | None = None) -> Outcome:
    """Decide the fate of a job whose worker stopped heartbeating mid-attempt.

    It goes back to pending if attempts remain, else to failed_jobs with LeaseExpired. A job
    this worker cannot load goes back to pending too, attempts unchanged: whoever claims it
    next judges it (a worker that can load it runs it; one that cannot fails it).
    """
    try:
        job = load(claimed)
    except JobLoadError:
        return Outcome(Verdict.RETRY)
    tries = max_tries or job.max_tries
    if claimed.attempts < tries:
        return Outcome(Verdict.RETRY, job, None, None, 0.0, tries)
    error = LeaseExpired(
        f"the worker running attempt {claimed.attempts} of {tries} stopped heartbeating "
        "(it crashed, was killed or lost the database) before the job finished"
    )
    return Outcome(Verdict.FAIL, job, error, None, 0.0, tries)
