"""``failed()`` hooks, run apart from the job's slot and from the worker's lease maintenance.

A hook alerts someone, cleans up, calls an API: it may be slow, or never return. Each runs in a
task of its own (a plain ``def failed`` in a thread), at most ``concurrency`` at once, under the
job's timeout: the worker's watchdog cancels it then, and gives up on one that ignores being
cancelled. Nothing the worker must do in time waits for a hook.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from .execution import Attempt, run_hook
from .job import Job
from .sql import Claimed
from .threads import ThreadRunner

__all__ = ["Hooks"]

log = logging.getLogger("routemq_outbox.worker")


class Hooks:
    """The ``failed()`` hooks a worker is running."""

    def __init__(
        self,
        *,
        concurrency: int,
        time_limit: float | None,
        threads: ThreadRunner,
        ended: Callable[[], None],
        abandoned: Callable[[Attempt], None],
    ) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._time_limit = time_limit  # overrides the jobs' own timeout (--timeout)
        self._threads = threads
        self._ended = ended  # told whenever a hook is over, or given up on
        self._abandoned = abandoned  # keeps a hook that ignores being cancelled
        self.running: dict[asyncio.Task[None], Attempt] = {}

    def __len__(self) -> int:
        return len(self.running)

    def spawn(self, claimed: Claimed, job: Job, error: BaseException) -> None:
        """Run ``job.failed(error)`` for the job of ``claimed``, which has moved to
        failed_jobs."""
        attempt = Attempt(claimed)
        attempt.job = job
        attempt.task = task = asyncio.get_running_loop().create_task(self._run(attempt, job, error))
        self.running[task] = attempt

    async def _run(self, attempt: Attempt, job: Job, error: BaseException) -> None:
        job_id = attempt.claimed.id
        try:
            async with self._slots:
                attempt.limit = self._time_limit or job.timeout
                attempt.deadline = time.monotonic() + attempt.limit
                await run_hook(job, error, self._threads)
        except asyncio.CancelledError:
            if attempt.timed_out:
                log.error(
                    "failed() of job id=%d ran longer than %g s; cancelled", job_id, attempt.limit
                )
            else:
                log.warning("failed() of job id=%d was interrupted at shutdown", job_id)
        except BaseException:
            # Like handle(): SystemExit or KeyboardInterrupt raised by job code must not
            # escape into the event loop, which would stop the whole worker.
            log.exception("failed() of job id=%d raised", job_id)
        finally:
            attempt.deadline = math.inf
            if not attempt.abandoned:
                self.running.pop(attempt.task, None)  # type: ignore[arg-type]
                self._ended()

    def watch(self, now: float, cancel_wait: float) -> None:
        """Cancel hooks past their timeout; give up on those that ignore it (the watchdog)."""
        for attempt in list(self.running.values()):
            attempt.expire(now, cancel_wait)
            if attempt.abandon_at <= now and attempt.stuck(now):
                self._abandon(attempt)

    def cancel(self, cancel_wait: float) -> None:
        """Cancel every hook (the grace period is over)."""
        for attempt in self.running.values():
            attempt.cancel(cancel_wait)

    def abandon_all(self) -> None:
        for attempt in list(self.running.values()):
            self._abandon(attempt)

    def _abandon(self, attempt: Attempt) -> None:
        log.error(
            "failed() of job id=%d ignored being cancelled; it is no longer waited for",
            attempt.claimed.id,
        )
        self._abandoned(attempt)
        self.running.pop(attempt.task, None)  # type: ignore[arg-type]
        self._ended()
