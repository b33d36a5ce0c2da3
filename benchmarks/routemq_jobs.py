"""The RouteMQ job of the RouteMQ benchmark (``python -m benchmarks.routemq``): it does nothing,
so that what is measured is the queue."""

from __future__ import annotations

from routemq.job import Job


@Job.register
class Noop(Job):
    queue = "bench"

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    async def handle(self) -> None:
        pass
