"""Periodic job classes for worker processes (``--import tests.periodic_jobs``).

Kept out of tests/jobs.py: every worker that imports a periodic class enqueues its slots, and
the other tests' workers must not.
"""

from __future__ import annotations

from routemq_outbox import Job, every


class EverySecond(Job):
    """Enqueued once a second into a queue no test worker works, so that its jobs stay in the
    ``jobs`` table to be counted."""

    job_name = "tests.periodic.every_second"
    queue = "periodic"
    schedule = every(seconds=1)

    async def handle(self) -> None:
        pass
