"""routemq-outbox measurements.

Functions ending in ``_child`` run inside a fresh interpreter started by
:meth:`benchmarks.harness.Session.run_child`; the others run in the suite's own process and
drive the real worker CLI (``python -m routemq_outbox work``) as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from . import harness, raw
from .harness import PYTHON, Session
from .monitor import RssSampler

__all__ = [
    "DRAIN_BATCH_SIZE",
    "DRAIN_CONCURRENCY",
    "TABLES",
    "bulk_enqueue_child",
    "claim_cost_child",
    "dispatch_child",
    "drain_child",
    "latency",
    "load_backlog",
    "setup",
    "worker_rss",
]

TABLES = ("jobs", "failed_jobs", raw.ORDERS_TABLE)

# Worker settings for every drain of ours (in-process and CLI). The claim takes
# min(free slots, batch_size) jobs, so concurrency must be at least batch_size for a claim to
# fill a batch of 100; no-op jobs never hold a slot long, so the extra slots cost nothing.
DRAIN_CONCURRENCY = 100
DRAIN_BATCH_SIZE = 100

NOOP_PAYLOAD_SQL = "jsonb_build_object('job', 'bench.noop', 'data', jsonb_build_object('n', g))"


async def setup(session: Session, system: str = "routemq") -> str:
    """A fresh database with our schema (the real migrations) and the business table."""
    from routemq_outbox.migrate import upgrade

    url = await session.create_database(system)
    # upgrade() runs its own event loop (asyncio.run), so it must not run on this one.
    await asyncio.to_thread(upgrade, url)
    conn = await harness.connect(url)
    try:
        await conn.execute(raw.ORDERS_DDL)
    finally:
        await conn.close()
    return url


async def load_backlog(url: str, count: int) -> None:
    """Insert ``count`` due no-op jobs with one server-side statement, then vacuum/analyze.

    Used where the backlog is the *setup* of a measurement (claim cost, RSS, raw ceiling):
    generate_series is the fastest way in and leaves nothing of the loader in the client.
    Each row gets its own ``available_at`` in id order, as rows dispatched over time would.
    """
    conn = await harness.connect(url)
    try:
        await conn.execute(
            f"""
            INSERT INTO jobs (queue, payload, available_at)
            SELECT 'default', {NOOP_PAYLOAD_SQL},
                   now() - make_interval(secs => ($1 - g) / 1000.0)
            FROM generate_series(1, $1::int) AS g
            """,
            count,
        )
    finally:
        await conn.close()
    await harness.vacuum_analyze(url, ["jobs"])


@contextlib.contextmanager
def notify_setting(enabled: bool) -> Iterator[None]:
    """Set ROUTEMQ_OUTBOX_NOTIFY for the duration (dispatch reads it on every call)."""
    previous = os.environ.get("ROUTEMQ_OUTBOX_NOTIFY")
    os.environ["ROUTEMQ_OUTBOX_NOTIFY"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ROUTEMQ_OUTBOX_NOTIFY", None)
        else:
            os.environ["ROUTEMQ_OUTBOX_NOTIFY"] = previous


# ------------------------------------------------------------------------- bulk enqueue


async def bulk_enqueue_child(url: str, jobs: int, chunk: int) -> dict[str, Any]:
    """``queue.bulk`` of ``jobs`` no-op jobs, ``chunk`` per call and transaction."""
    from routemq_outbox import queue
    from routemq_outbox.database import create_engine

    from .jobs import NoopJob

    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect():
            pass  # open the pooled connection before the clock starts, as the peers do
        with notify_setting(True), harness.stopwatch() as elapsed:
            for start in range(0, jobs, chunk):
                batch = [NoopJob(n) for n in range(start, min(start + chunk, jobs))]
                async with engine.begin() as conn:
                    await queue.bulk(batch, session=conn)
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one()
    finally:
        await engine.dispose()
    return {
        "seconds": elapsed.seconds,
        "cpu_seconds": elapsed.cpu_seconds,
        "jobs": jobs,
        "stored": stored,
        "chunk": chunk,
    }


# -------------------------------------------------------------------------------- drain


async def drain_child(
    url: str,
    jobs: int,
    concurrency: int = DRAIN_CONCURRENCY,
    batch_size: int = DRAIN_BATCH_SIZE,
) -> dict[str, Any]:
    """Run a Worker with ``stop_when_empty`` over the backlog already in ``url``.

    The worker is the library's own ``Worker.run()``, exactly what the CLI calls, minus
    interpreter start-up and argument parsing, which are not the queue's throughput.
    """
    from routemq_outbox import Worker, WorkerSettings

    from . import jobs as bench_jobs

    settings = WorkerSettings(
        database_url=url,
        concurrency=concurrency,
        batch_size=batch_size,
        stop_when_empty=True,
    )
    with harness.stopwatch() as elapsed:
        stats = await Worker(settings).run()
    claims, deletes = stats.claims, stats.deletes
    conn = await harness.connect(url)
    try:
        left = await conn.fetchval("SELECT count(*) FROM jobs")
    finally:
        await conn.close()
    return {
        "seconds": elapsed.seconds,
        "cpu_seconds": elapsed.cpu_seconds,
        "jobs": jobs,
        "handled": bench_jobs.handled(),
        "succeeded": stats.succeeded,
        "left": left,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "claim_statements": claims,
        "delete_statements": deletes,
        "jobs_per_claim": stats.claimed / claims if claims else None,
        "jobs_per_delete": stats.succeeded / deletes if deletes else None,
    }


# --------------------------------------------------------------- transactional dispatch

DISPATCH_VARIANTS = ("ours_notify", "ours_no_notify", "raw_insert")


async def _dispatch_run(url: str, variant: str, transactions: int, connections: int) -> float:
    """Transactions per second: each INSERTs a business row and enqueues one job, commits."""
    from routemq_outbox import dispatch
    from routemq_outbox.database import create_engine

    from .jobs import NoopJob

    engine = create_engine(url, pool_size=connections, max_overflow=0)
    try:
        # Open every pooled connection before the clock starts.
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(connections):
                await stack.enter_async_context(engine.connect())

        counter = iter(range(transactions))

        async def ours() -> None:
            for n in counter:
                async with engine.begin() as conn:
                    await conn.execute(raw.ORDER_INSERT, raw.order_params(n))
                    await dispatch(NoopJob(n), session=conn)

        async def baseline() -> None:
            for n in counter:
                async with engine.begin() as conn:
                    await conn.execute(raw.ORDER_INSERT, raw.order_params(n))
                    await raw.insert_job_row(conn, n)

        body = baseline if variant == "raw_insert" else ours
        with notify_setting(variant == "ours_notify"), harness.stopwatch() as elapsed:
            await asyncio.gather(*(body() for _ in range(connections)))
    finally:
        await engine.dispose()
    return transactions / elapsed.seconds


async def dispatch_child(
    url: str, transactions: dict[str, int], rounds: int, variants: list[str]
) -> dict[str, Any]:
    """All dispatch variants at each connection count, interleaved over ``rounds`` rounds.

    Interleaving (ours, ours without NOTIFY, raw, ours, ...) spreads slow drifts of the machine
    (WAL recycling, page cache) over every variant instead of charging them to one.
    ``transactions`` maps a connection count (as a string, from JSON) to transactions per run.
    """
    runs: dict[str, dict[str, list[float]]] = {
        str(c): {v: [] for v in variants} for c in transactions
    }
    for _ in range(rounds):
        for connections, count in transactions.items():
            for variant in variants:
                await harness.reset_tables(url, TABLES)
                rate = await _dispatch_run(url, variant, count, int(connections))
                runs[str(connections)][variant].append(rate)
    return {
        "runs": runs,
        "median_tps": {
            c: {v: harness.median(rates) for v, rates in per.items()} for c, per in runs.items()
        },
        "transactions": transactions,
        "rounds": rounds,
    }


# ---------------------------------------------------------------------------- claim cost


async def claim_cost_child(url: str, backlog: int, claims: int) -> dict[str, Any]:
    """Time our real claim (``routemq_outbox.sql.claim``) of 100 jobs on a ``backlog``.

    ``sql.explain_claim`` then runs the same statement, as the worker sends it, under EXPLAIN
    (ANALYZE, BUFFERS) in a transaction that is rolled back.
    """
    from routemq_outbox import sql
    from routemq_outbox.database import create_engine

    await harness.reset_tables(url, TABLES)
    with harness.stopwatch() as loading:
        await load_backlog(url, backlog)
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            timings_ms: list[float] = []
            claimed = 0
            for _ in range(claims):
                started = time.perf_counter()
                got = await sql.claim(conn, "default", 100, secrets.randbits(63), 60.0)
                timings_ms.append((time.perf_counter() - started) * 1000)
                claimed += len(got)
            plan = await sql.explain_claim(conn, "default", 100)
    finally:
        await engine.dispose()
    execution_ms = _plan_execution_ms(plan)
    return {
        "backlog": backlog,
        "claims": claims,
        "claimed": claimed,
        "load_seconds": loading.seconds,
        "median_ms": harness.median(timings_ms),
        "first_ms": timings_ms[0],
        "p90_ms": harness.percentile(timings_ms, 90),
        "timings_ms": timings_ms,
        "statement": sql.claim_statement_text(),
        "plan": plan,
        "plan_execution_ms": execution_ms,
        "uses_claim_index": "ix_jobs_claim" in plan,
        "seq_scan_on_jobs": "Seq Scan on jobs" in plan,
    }


def _plan_execution_ms(plan: str) -> float | None:
    for line in plan.splitlines():
        if line.strip().startswith("Execution Time:"):
            return float(line.split(":", 1)[1].split()[0])
    return None


# ----------------------------------------------------------------- CLI worker processes


def cli_args(url: str, *extra: str) -> list[str]:
    """The real worker command line, importing the benchmark job classes."""
    return [
        PYTHON,
        "-m",
        "routemq_outbox",
        "work",
        "--import",
        "benchmarks.jobs",
        "--database-url",
        url,
        *extra,
    ]


async def latency(
    session: Session, url: str, *, listen: bool, samples: int, max_gap: float
) -> dict[str, Any]:
    """Commit-to-``handle()`` latency against an idle CLI worker (see sample_latency)."""
    from routemq_outbox import dispatch
    from routemq_outbox.database import create_engine

    from .jobs import MARKS_ENV, MarkJob

    await harness.reset_tables(url, TABLES)
    marks = session.marks_path(f"routemq-{'listen' if listen else 'poll'}")
    flags = ["--concurrency", "10", "--sleep", "1.0"] + ([] if listen else ["--no-listen"])
    worker = await session.spawn(
        f"routemq-latency-{'listen' if listen else 'poll'}",
        cli_args(url, *flags),
        {MARKS_ENV: str(marks)},
    )
    engine = create_engine(url, pool_size=1)

    async def send(seq: int) -> tuple[float, float]:
        async with engine.begin() as conn:
            await dispatch(MarkJob(seq), session=conn)
            before_commit = time.perf_counter()
        return before_commit, time.perf_counter()

    try:
        with notify_setting(True):
            return await harness.sample_latency(
                send, marks, worker, samples=samples, max_gap=max_gap
            )
    finally:
        await engine.dispose()
        await session.stop(worker, grace=10)


async def worker_rss(session: Session, url: str, backlog: int, timeout: float) -> dict[str, Any]:
    """Peak RSS of the real CLI worker draining ``backlog`` jobs with --stop-when-empty."""
    await harness.reset_tables(url, TABLES)
    await load_backlog(url, backlog)
    flags = [
        "--concurrency",
        str(DRAIN_CONCURRENCY),
        "--batch-size",
        str(DRAIN_BATCH_SIZE),
        "--stop-when-empty",
    ]
    started = time.perf_counter()
    worker = await session.spawn(f"routemq-rss-{backlog}", cli_args(url, *flags))
    sampler = RssSampler(worker.pid)
    sampler.start()
    try:
        code = await session.wait(worker, timeout)
    finally:
        await sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise harness.ChildFailed(f"worker exited with {code}\n{worker.tail()}")
    conn = await harness.connect(url)
    try:
        left = await conn.fetchval("SELECT count(*) FROM jobs")
    finally:
        await conn.close()
    return {
        **sampler.summary(),
        "backlog": backlog,
        "left": left,
        "wall_seconds": wall,
        "jobs_per_s_incl_startup": backlog / wall,
    }
