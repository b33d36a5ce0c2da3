"""PgQueuer (1.6.0) measurements, on its own throwaway database.

Settings come from PgQueuer's own documentation: its benchmark tool (``tools/benchmark.py``,
described in docs/benchmark.md) drains with 5 ``PgQueuer`` instances, each on its own asyncpg
connection ("dequeue tasks"), and its performance-tuning guide says to raise ``batch_size`` for
short jobs. We run both shapes and report the best (see :data:`DRAIN_CONFIGS`). Its CLI
(``pgq run``) runs on uvloop, so its workers here do too. Tables stay ``durable`` (logged), the
default and the same durability as routemq-outbox's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import asyncpg

from . import harness
from .harness import Session

__all__ = [
    "DRAIN_CONFIGS",
    "bulk_enqueue_child",
    "drain_child",
    "latency",
    "latency_worker_child",
    "setup",
    "tables",
]

NOOP = "bench_noop"
MARK = "bench_mark"

# (instances, batch_size): the documented benchmark default first, then larger batches.
DRAIN_CONFIGS: tuple[tuple[int, int], ...] = ((5, 10), (4, 50), (2, 100))


def _queries(conn: asyncpg.Connection) -> Any:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    return Queries(AsyncpgDriver(conn))


async def setup(session: Session) -> str:
    """A fresh database with PgQueuer's schema (``pgq install`` does the same)."""
    url = await session.create_database("pgqueuer")
    conn = await harness.connect(url)
    try:
        await _queries(conn).install()
    finally:
        await conn.close()
    return url


async def tables(url: str) -> list[str]:
    """PgQueuer's tables, to empty between measurements."""
    conn = await harness.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename LIKE 'pgqueuer%' ORDER BY tablename"
        )
    finally:
        await conn.close()
    return [row[0] for row in rows]


def _payload(n: int) -> bytes:
    # The same data our no-op job carries.
    return json.dumps({"n": n}, separators=(",", ":")).encode()


async def bulk_enqueue_child(url: str, jobs: int, chunk: int) -> dict[str, Any]:
    """``Queries.enqueue`` with lists: one statement per ``chunk`` jobs."""
    conn = await harness.connect(url)
    try:
        queries = _queries(conn)
        with harness.stopwatch() as elapsed:
            for start in range(0, jobs, chunk):
                count = min(chunk, jobs - start)
                await queries.enqueue(
                    [NOOP] * count,
                    [_payload(n) for n in range(start, start + count)],
                    [0] * count,
                )
        stored = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    finally:
        await conn.close()
    return elapsed.result(
        jobs,
        stored=stored,
        chunk=chunk,
    )


async def drain_child(url: str, jobs: int, instances: int, batch_size: int) -> dict[str, Any]:
    """``instances`` PgQueuer managers in drain mode over the backlog already in ``url``."""
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    handled = 0
    conns = [await harness.connect(url) for _ in range(instances)]
    try:
        pgqs = [PgQueuer.from_asyncpg_connection(conn) for conn in conns]
        for pgq in pgqs:

            @pgq.entrypoint(NOOP)
            async def noop(job: Job) -> None:
                nonlocal handled
                handled += 1

        with harness.stopwatch() as elapsed:
            await asyncio.gather(
                *(pgq.run(batch_size=batch_size, mode=QueueExecutionMode.drain) for pgq in pgqs)
            )
    finally:
        for conn in conns:
            if not conn.is_closed():
                await conn.close()
    left = await harness.fetchval(url, "SELECT count(*) FROM pgqueuer")
    return elapsed.result(
        jobs,
        handled=handled,
        left=left,
        instances=instances,
        batch_size=batch_size,
    )


async def latency_worker_child(url: str, marks: str) -> dict[str, Any]:
    """An idle PgQueuer worker (defaults: LISTEN on its trigger's NOTIFY) until SIGTERM."""
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    from .jobs import write_mark

    conn = await harness.connect(url)
    pgq = PgQueuer.from_asyncpg_connection(conn)

    @pgq.entrypoint(MARK)
    async def mark(job: Job) -> None:
        write_mark(int(job.payload or b"0"), marks)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, pgq.shutdown.set)
    try:
        await pgq.run()
    finally:
        await conn.close()
    return {"stopped": True}


async def latency(session: Session, url: str, samples: int, max_gap: float) -> dict[str, Any]:
    """Commit-to-entrypoint latency of an idle PgQueuer worker, enqueue in a transaction."""
    await harness.reset_tables(url, await tables(url))
    marks = session.marks_path("pgqueuer")
    spec = json.dumps(
        {
            "target": "benchmarks.pgqueuer_peer:latency_worker_child",
            "kwargs": {"url": url, "marks": str(marks)},
            "loop": "uvloop",
        }
    )
    worker = await session.spawn(
        "pgqueuer-latency", [harness.PYTHON, "-m", "benchmarks.child", spec]
    )
    conn = await harness.connect(url)
    queries = _queries(conn)

    async def send(seq: int) -> tuple[float, float]:
        async with conn.transaction():
            await queries.enqueue(MARK, str(seq).encode())
            before_commit = time.perf_counter()
        return before_commit, time.perf_counter()

    try:
        return await harness.sample_latency(send, marks, worker, samples=samples, max_gap=max_gap)
    finally:
        await conn.close()
        await session.stop(worker, grace=10)
