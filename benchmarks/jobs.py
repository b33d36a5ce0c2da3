"""routemq-outbox job classes the benchmark workers run.

They live in an importable module of their own because a worker process resolves job names
only among the Job subclasses it has imported (``--import benchmarks.jobs``). Importing this
module must stay cheap and side-effect free: the real CLI worker imports it.
"""

from __future__ import annotations

import os
import time

from routemq_outbox import Job

__all__ = ["MARKS_ENV", "MarkJob", "NoopJob", "handled", "write_mark"]

MARKS_ENV = "ROUTEMQ_BENCH_MARKS"
"""Environment variable naming the file that latency jobs append their start times to."""

# How many no-op jobs this process ran: the in-process drain checks it against the backlog.
_handled = 0


def handled() -> int:
    """No-op jobs handled by this process so far."""
    return _handled


def write_mark(seq: int, path: str | None = None) -> None:
    """Append ``seq perf_counter`` to the marks file, in one write.

    ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in every process of the
    machine, so the harness can subtract its own commit timestamps from these. The clock is
    read first, before any I/O, so the mark is the moment ``handle()`` started.
    """
    now = time.perf_counter()
    target = path or os.environ[MARKS_ENV]
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A single small O_APPEND write is atomic: concurrent writers never interleave lines.
        os.write(fd, f"{seq} {now!r}\n".encode())
    finally:
        os.close(fd)


class NoopJob(Job):
    """Does nothing: what is measured is the queue's own cost per job."""

    job_name = "bench.noop"

    def __init__(self, n: int = 0) -> None:
        self.n = n

    async def handle(self) -> None:
        global _handled
        _handled += 1


class MarkJob(Job):
    """Records when ``handle()`` started, for the dispatch-to-start latency."""

    job_name = "bench.mark"

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq

    async def handle(self) -> None:
        write_mark(self.seq)
