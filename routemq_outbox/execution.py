"""Running one claimed job, apart from the claim loop: load it, run it, judge the result.

Nothing here touches the database; the worker applies the :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
import traceback
from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

from .errors import FailJob, JobConstructionError, JobLoadError, JobTimeout, LeaseExpired, RetryJob
from .job import Job, decode_payload, instantiate
from .sql import Claimed

__all__ = [
    "DESCRIBE_MAX_CHARS",
    "Attempt",
    "Outcome",
    "Verdict",
    "cancelled_from_outside",
    "describe",
    "judge_expired",
    "load",
    "run",
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
        name, data = decode_payload(claimed.payload)
        job = instantiate(name, data, claimed.queue)
    except JobLoadError:
        raise
    except BaseException as exc:  # job code (__init__, a property setter) as in run()
        raise JobConstructionError(
            f"loading job id={claimed.id} raised {type(exc).__name__}: {exc}"
        ) from exc
    job.__dict__["_attempt"] = claimed.attempts
    job.__dict__["_job_id"] = claimed.id
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


_ASYNC_HANDLE: dict[object, bool] = {}


def _is_async(job: Job) -> bool:
    function = type(job).handle
    is_async = _ASYNC_HANDLE.get(function)
    if is_async is None:
        is_async = _ASYNC_HANDLE[function] = inspect.iscoroutinefunction(function)
    return is_async


def _capture(handle: Callable[[], object]) -> tuple[object, BaseException | None]:
    """Call ``handle`` (in a worker thread) and hand back its result or its exception."""
    try:
        return handle(), None
    except BaseException as exc:
        return None, exc


async def _in_thread(job: Job) -> None:
    # A plain ``def handle`` runs in a thread so it cannot stall the worker's event loop. Its
    # exception comes back as a value and is raised here, an ordinary raise that run() sees:
    # left in the thread's future, a GeneratorExit would be *thrown* into the task's
    # outermost coroutine (CPython closes the coroutines in between), past run()'s handler.
    result, error = await asyncio.to_thread(_capture, job.handle)
    if error is not None:
        raise error
    if inspect.isawaitable(result):
        await result


class Attempt:
    """One attempt in progress, shared by the task running it and the worker's watchdog.

    The worker sets ``task`` when it starts the attempt; :func:`run` sets ``deadline`` (a
    ``time.monotonic()`` value) once it knows the job's timeout, and the watchdog cancels the
    task when the deadline passes. One watchdog for all attempts costs less than a timer per
    attempt, which matters when the worker runs tens of thousands of short jobs a second.
    """

    __slots__ = ("claimed", "deadline", "task", "timed_out")

    def __init__(self, claimed: Claimed) -> None:
        self.claimed = claimed
        self.task: asyncio.Task[None] | None = None
        self.deadline = math.inf
        self.timed_out = False

    def expire(self, now: float) -> None:
        """Cancel the attempt if its deadline has passed (the watchdog calls this)."""
        if now >= self.deadline and not self.timed_out and self.task is not None:
            self.timed_out = True
            self.task.cancel()


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
        delay = max(0.0, float(job.retry_delay(claimed.attempts)))
    return Outcome(Verdict.RETRY, job, error, delay, duration, max_tries)


async def run(
    attempt: Attempt, *, time_limit: float | None = None, max_tries: int | None = None
) -> Outcome:
    """Run one attempt. ``time_limit``/``max_tries`` override the job's own."""
    claimed = attempt.claimed
    started = time.perf_counter()
    try:
        job = load(claimed)
    except JobLoadError as exc:
        return Outcome(Verdict.FAIL, None, exc, None, time.perf_counter() - started, 0)
    tries = max_tries or job.max_tries
    if claimed.attempts > tries:
        error: BaseException = FailJob(
            f"attempt {claimed.attempts} is past max_tries={tries}; not run again"
        )
        return Outcome(Verdict.FAIL, job, error, None, 0.0, tries)
    limit = time_limit or job.timeout
    task = attempt.task
    assert task is not None, "the worker sets Attempt.task before the attempt starts"
    attempt.deadline = time.monotonic() + limit
    try:
        await (job.handle() if _is_async(job) else _in_thread(job))
    except asyncio.CancelledError as exc:
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
    if attempt.timed_out:
        task.uncancel()  # the job swallowed our cancellation and finished anyway
    return Outcome(Verdict.DONE, job, None, None, time.perf_counter() - started, tries)


def judge_expired(claimed: Claimed, *, max_tries: int | None = None) -> Outcome:
    """Decide the fate of a job whose worker stopped heartbeating mid-attempt.

    It goes back to pending if attempts remain, else to failed_jobs with LeaseExpired.
    """
    try:
        job = load(claimed)
    except JobLoadError as exc:
        return Outcome(Verdict.FAIL, None, exc)
    tries = max_tries or job.max_tries
    if claimed.attempts < tries:
        return Outcome(Verdict.RETRY, job, None, None, 0.0, tries)
    error = LeaseExpired(
        f"the worker running attempt {claimed.attempts} of {tries} stopped heartbeating "
        "(it crashed, was killed or lost the database) before the job finished"
    )
    return Outcome(Verdict.FAIL, job, error, None, 0.0, tries)
