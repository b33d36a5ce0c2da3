"""routemq-outbox job classes the benchmark workers run.

They live in an importable module of their own because a worker process resolves job names
only among the Job subclasses it has imported (``--import benchmarks.jobs``). Importing this
module must stay cheap and side-effect free: the real CLI worker imports it. The one exception
is opt-in: with ``ROUTEMQ_BENCH_CLOCK`` set (the CLI drain measurement), it registers an atexit
hook that writes the process's drain clock to that file.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import time

from routemq_outbox import Job

__all__ = ["CLOCK_ENV", "MARKS_ENV", "MarkJob", "NoopJob", "handled", "write_mark"]

MARKS_ENV = "ROUTEMQ_BENCH_MARKS"
"""Environment variable naming the file that latency jobs append their start times to."""

CLOCK_ENV = "ROUTEMQ_BENCH_CLOCK"
"""Environment variable naming the file where a CLI worker draining no-op jobs writes, at
exit, when this module was imported, when the first job started, when the process ended,
its CPU time in between and how many jobs it ran (see :func:`_write_clock`)."""

# How many no-op jobs this process ran: the in-process drain checks it against the backlog.
_handled = 0
# perf_counter() and this process's CPU seconds when its first no-op job started.
_first_handle: tuple[float, float] | None = None


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
        global _handled, _first_handle
        if _first_handle is None:
            _first_handle = (time.perf_counter(), _cpu_seconds())
        _handled += 1


class MarkJob(Job):
    """Records when ``handle()`` started, for the dispatch-to-start latency."""

    job_name = "bench.mark"

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq

    async def handle(self) -> None:
        write_mark(self.seq)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_clock(path: str, imported: float, cpu_imported: float) -> None:
    """At interpreter exit: the clock of a CLI worker's drain, as one JSON object.

    ``routemq-outbox work`` imports its job modules (``--import``) just before it builds its
    worker and starts its event loop, so ``imported`` is where the worker's own work begins
    (interpreter start-up and the CLI's imports are before it); ``first_handle`` is when the
    first job started (the engine made, connections opened, the first claim done).
    ``exited`` is taken here, in an atexit hook, once the worker has stopped and its engine
    is disposed. Timestamps are ``time.perf_counter()``, CLOCK_MONOTONIC on Linux: the same
    clock as the harness's.
    """
    exited, cpu_exited = time.perf_counter(), _cpu_seconds()
    first, cpu_first = _first_handle or (None, None)
    record = {
        "imported": imported,
        "first_handle": first,
        "exited": exited,
        "cpu_seconds_from_import": cpu_exited - cpu_imported,
        "cpu_seconds_from_first_handle": None if cpu_first is None else cpu_exited - cpu_first,
        "handled": _handled,
    }
    with open(path, "w") as clock:
        clock.write(json.dumps(record) + "\n")


if os.environ.get(CLOCK_ENV):
    atexit.register(_write_clock, os.environ[CLOCK_ENV], time.perf_counter(), _cpu_seconds())
