"""RouteMQ job classes for the RouteMQ tests (``--import tests.routemq_jobs``), unchanged from
how a RouteMQ application writes them. They leave their trace in ``job_log`` as tests/jobs.py's
do."""

from __future__ import annotations

import asyncio

from routemq.job import Job

from .jobs import record


@Job.register
class SendEmailJob(Job):
    """Records that it ran."""

    queue = "emails"

    def __init__(self) -> None:
        super().__init__()
        self.to = ""

    async def handle(self) -> None:
        await record(self.to, "ran", self.attempts)


@Job.register
class FlakyJob(Job):
    """Fails its first attempt, then succeeds."""

    max_tries = 3
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "start", self.attempts)
        if self.attempts < 2:
            raise RuntimeError(f"flaky attempt {self.attempts}")
        await record(self.key, "ran", self.attempts)


@Job.register
class DoomedJob(Job):
    """Always fails; its failed() records the error."""

    max_tries = 2
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "start", self.attempts)
        raise ValueError(f"doomed attempt {self.attempts}")

    async def failed(self, exception: Exception) -> None:
        await record(self.key, f"failed:{type(exception).__name__}", self.attempts)


class UnregisteredJob(Job):
    """Not on RouteMQ's allow-list."""

    async def handle(self) -> None:
        await record("unregistered", "ran", self.attempts)


@Job.register
class SlowJob(Job):
    """Outlives its one-second timeout."""

    max_tries = 1
    timeout = 1

    async def handle(self) -> None:
        await asyncio.sleep(30)
