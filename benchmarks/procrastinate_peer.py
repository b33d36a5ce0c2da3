"""procrastinate (3.10.0) measurements, on its own throwaway database.

Settings come from procrastinate's documentation: "Execute multiple jobs at the same time"
(howto/concurrency) runs ``concurrency=30`` sub-workers for asynchronous tasks, and jobs are
kept after completion (``delete_jobs="never"``, the default and the cheaper choice: a status
update instead of a delete). The psycopg pool gets enough connections for every sub-worker to
write its job's outcome without queueing for one. Its CLI runs on plain asyncio, as here.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import harness
from .harness import Session
from .jobs import MARKS_ENV

__all__ = [
    "DRAIN_CONCURRENCY",
    "TABLES",
    "bulk_enqueue_child",
    "drain_child",
    "latency",
    "latency_worker_child",
    "setup",
]

TABLES = (
    "procrastinate_jobs",
    "procrastinate_events",
    "procrastinate_periodic_defers",
    "procrastinate_workers",
)

DRAIN_CONCURRENCY = 30

_handled = 0


def make_app(url: str, pool_size: int) -> Any:
    """An App with the benchmark's two tasks, on a psycopg pool of ``pool_size``."""
    import procrastinate

    from .jobs import write_mark

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=url, min_size=min(pool_size, 4), max_size=pool_size
        )
    )

    @app.task(name="bench_noop")
    async def noop(n: int) -> None:
        global _handled
        _handled += 1

    @app.task(name="bench_mark")
    async def mark(seq: int) -> None:
        write_mark(seq)

    return app


async def setup(session: Session) -> str:
    """A fresh database with procrastinate's schema (``procrastinate schema --apply``)."""
    url = await session.create_database("procrastinate")
    app = make_app(url, 2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return url


async def bulk_enqueue_child(url: str, jobs: int, chunk: int) -> dict[str, Any]:
    """``Task.batch_defer_async``: one call (one statement) per ``chunk`` jobs."""
    app = make_app(url, 1)
    async with app.open_async():
        task = app.tasks["bench_noop"]
        with harness.stopwatch() as elapsed:
            for start in range(0, jobs, chunk):
                await task.batch_defer_async(
                    *({"n": n} for n in range(start, min(start + chunk, jobs)))
                )
    stored = await harness.fetchval(url, "SELECT count(*) FROM procrastinate_jobs")
    return elapsed.result(
        jobs,
        stored=stored,
        chunk=chunk,
    )


async def drain_child(url: str, jobs: int, concurrency: int = DRAIN_CONCURRENCY) -> dict[str, Any]:
    """One worker with ``concurrency`` sub-workers and ``wait=False`` over the backlog."""
    app = make_app(url, concurrency + 2)
    async with app.open_async():
        with harness.stopwatch() as elapsed:
            await app.run_worker_async(
                concurrency=concurrency, wait=False, install_signal_handlers=False
            )
    left = await harness.fetchval(
        url, "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
    )
    return elapsed.result(
        jobs,
        handled=_handled,
        left=left,
        concurrency=concurrency,
    )


async def latency_worker_child(url: str) -> dict[str, Any]:
    """An idle worker with the defaults (listen_notify=True) until SIGTERM."""
    app = make_app(url, 4)
    async with app.open_async():
        # procrastinate's own signal handlers stop it gracefully on SIGTERM.
        await app.run_worker_async(concurrency=1)
    return {"stopped": True}


async def latency(session: Session, url: str, samples: int, max_gap: float) -> dict[str, Any]:
    """Commit-to-task latency of an idle procrastinate worker (``defer_async`` commits)."""
    await harness.reset_tables(url, TABLES)
    marks = session.marks_path("procrastinate")
    spec = json.dumps(
        {"target": "benchmarks.procrastinate_peer:latency_worker_child", "kwargs": {"url": url}}
    )
    worker = await session.spawn(
        "procrastinate-latency",
        [harness.PYTHON, "-m", "benchmarks.child", spec],
        {MARKS_ENV: str(marks)},
    )
    app = make_app(url, 1)
    try:
        async with app.open_async():
            task = app.tasks["bench_mark"]

            async def send(seq: int) -> tuple[float, float]:
                # defer_async runs its INSERT in a transaction of its own and commits it.
                before = time.perf_counter()
                await task.defer_async(seq=seq)
                return before, time.perf_counter()

            return await harness.sample_latency(
                send, marks, worker, samples=samples, max_gap=max_gap
            )
    finally:
        await session.stop(worker, grace=10)
