"""routemq-outbox measurements.

Functions ending in ``_child`` run inside a fresh interpreter started by
:meth:`benchmarks.harness.Session.run_child`; the others run in the suite's own process and
drive the real worker CLI (``python -m routemq_outbox work``) as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    "dispatch_variants",
    "drain_child",
    "drain_cli",
    "drain_cli_flags",
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
    await harness.execute(url, raw.orders_ddl(harness.family(url)))
    return url


async def load_backlog(url: str, count: int) -> None:
    """Insert ``count`` due no-op jobs with one server-side statement, then vacuum/analyze.

    Used where the backlog is the *setup* of a measurement (claim cost, RSS, raw ceiling):
    generate_series is the fastest way in and leaves nothing of the loader in the client.
    Each row gets its own ``available_at`` in id order, as rows dispatched over time would.
    On MariaDB: :func:`benchmarks.mariadb.load_backlog` (``seq_1_to_N``, ANALYZE TABLE).
    """
    if harness.family(url) == "mysql":
        from . import mariadb

        await mariadb.load_backlog(url, count)
        return
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
        # ROUTEMQ_OUTBOX_NOTIFY at its default (off); the peers notify from a trigger always.
        with notify_setting(False), harness.stopwatch() as elapsed:
            for start in range(0, jobs, chunk):
                batch = [NoopJob(n) for n in range(start, min(start + chunk, jobs))]
                async with engine.begin() as conn:
                    await queue.bulk(batch, session=conn)
        async with engine.connect() as conn:
            stored = (await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one()
    finally:
        await engine.dispose()
    return elapsed.result(
        jobs,
        stored=stored,
        chunk=chunk,
    )


# -------------------------------------------------------------------------------- drain


async def drain_child(
    url: str,
    jobs: int,
    concurrency: int = DRAIN_CONCURRENCY,
    batch_size: int = DRAIN_BATCH_SIZE,
    prefetch: int | None = None,
) -> dict[str, Any]:
    """Run a Worker with ``stop_when_empty`` over the backlog already in ``url``.

    The worker is the library's own ``Worker.run()``, exactly what the CLI calls, minus
    interpreter start-up and argument parsing, which are not the queue's throughput.
    ``prefetch`` is the worker's (None: its default, as many as ``concurrency``); the suite
    leaves it at the default, comparisons of prefetch settings pass it.
    """
    from routemq_outbox import Worker, WorkerSettings
    from routemq_outbox.database import create_engine

    from . import jobs as bench_jobs

    settings = WorkerSettings(
        database_url=url,
        concurrency=concurrency,
        batch_size=batch_size,
        prefetch=prefetch,
        stop_when_empty=True,
    )
    # The engine the worker would make for itself, with the connections it holds for good
    # (claims, deletes, LISTEN) opened before the clock starts, as the peers' are.
    engine = create_engine(url, pool_size=5, max_overflow=5, worker=True)
    try:
        warm = [await engine.connect() for _ in range(3)]
        for conn in warm:
            await conn.close()
        with harness.stopwatch() as elapsed:
            stats = await Worker(settings, engine=engine).run()
    finally:
        await engine.dispose()
    claims, deletes = stats.claims, stats.deletes
    left = await harness.fetchval(url, "SELECT count(*) FROM jobs")
    return elapsed.result(
        jobs,
        handled=bench_jobs.handled(),
        succeeded=stats.succeeded,
        left=left,
        concurrency=concurrency,
        batch_size=batch_size,
        prefetch=settings.buffer,
        claim_statements=claims,
        delete_statements=deletes,
        jobs_per_claim=stats.claimed / claims if claims else None,
        jobs_per_delete=stats.succeeded / deletes if deletes else None,
    )


# --------------------------------------------------------------- transactional dispatch

DISPATCH_VARIANTS = ("ours_notify", "ours_no_notify", "raw_insert")
# MariaDB has no NOTIFY: one variant of ours (dispatch as it is), and the baseline.
DISPATCH_VARIANTS_MYSQL = ("ours", "raw_insert")


def dispatch_variants(family: str) -> tuple[str, ...]:
    return DISPATCH_VARIANTS_MYSQL if family == "mysql" else DISPATCH_VARIANTS


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

    Interleaving (ours, ours without NOTIFY, raw, then raw, ours, ours without NOTIFY, ...)
    spreads slow drifts of the machine (WAL recycling, page cache) over every variant instead
    of charging them to one, and the order rotates each round so that no variant always runs
    first or last. ``transactions`` maps a connection count (as a string, from JSON) to
    transactions per run.
    """
    runs: dict[str, dict[str, list[float]]] = {
        str(c): {v: [] for v in variants} for c in transactions
    }
    for round_number in range(rounds):
        shift = round_number % len(variants)
        order = [*variants[shift:], *variants[:shift]]
        for connections, count in transactions.items():
            for variant in order:
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
    (ANALYZE, BUFFERS) in a transaction that is rolled back. On MariaDB see
    :func:`_explain_claim_mysql`.
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
            if harness.family(url) == "mysql":
                facts = await _explain_claim_mysql(conn)
            else:
                facts = _plan_facts(await sql.explain_claim(conn, "default", 100))
    finally:
        await engine.dispose()
    return {
        "backlog": backlog,
        "claims": claims,
        "claimed": claimed,
        "load_seconds": loading.seconds,
        "median_ms": harness.median(timings_ms),
        "first_ms": timings_ms[0],
        "p90_ms": harness.percentile(timings_ms, 90),
        "timings_ms": timings_ms,
        **facts,
    }


def _plan_facts(plan: str) -> dict[str, Any]:
    """What the PostgreSQL plan of our claim says (the MariaDB counterpart:
    :func:`_explain_claim_mysql`)."""
    from routemq_outbox import sql

    return {
        "statement": sql.claim_statement_text(),
        "plan": plan,
        "plan_execution_ms": _plan_execution_ms(plan),
        "uses_claim_index": "ix_jobs_claim_by_priority" in plan,
        "seq_scan_on_jobs": "Seq Scan on jobs" in plan,
    }


async def _explain_claim_mysql(conn: Any) -> dict[str, Any]:
    """The plans of the claim's two statements, exactly as the driver received them.

    One more real claim runs with a ``before_cursor_execute`` hook that records the statement
    texts and parameters asyncmy got: the locking ``SELECT … FOR UPDATE SKIP LOCKED`` and the
    ``UPDATE … WHERE id IN (…)``. Both then run again under MariaDB's ``ANALYZE FORMAT=JSON``
    (executed, with actual row counts and times; ``EXPLAIN FORMAT=JSON`` on MySQL) in a
    transaction that is rolled back. ``seq_scan_on_jobs`` means a full scan of ``jobs`` in
    either plan: access type ``ALL`` (the table) or ``index`` (a whole index).
    """
    from sqlalchemy import event

    from routemq_outbox import sql

    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    sync_engine = conn.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", capture)
    try:
        await sql.claim(conn, "default", 100, secrets.randbits(63), 60.0)
    finally:
        event.remove(sync_engine, "before_cursor_execute", capture)
    lock = next((c for c in captured if c[0].lstrip().upper().startswith("SELECT")), None)
    mark = next((c for c in captured if c[0].lstrip().upper().startswith("UPDATE")), None)
    if lock is None or mark is None:
        raise RuntimeError(f"the claim sent no SELECT and UPDATE: {captured!r}")
    prefix = "ANALYZE FORMAT=JSON " if conn.dialect.is_mariadb else "EXPLAIN FORMAT=JSON "
    plans: dict[str, Any] = {}
    async with conn.begin() as transaction:
        # Undo not yet purged: at READ COMMITTED the locking read steps over the delete-marked
        # index entries of rows claimed (or deleted) before and not purged yet, so the pages
        # the SELECT reads grow with it (the JSON has both).
        history = await conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Innodb_history_list_length'")
        history_row = history.first()
        for name, (statement, parameters) in (("select", lock), ("update", mark)):
            result = await conn.exec_driver_sql(prefix + statement, parameters)
            plans[name] = json.loads(result.scalar_one())
        await transaction.rollback()
    select_tables = list(_plan_tables(plans["select"]))
    update_tables = list(_plan_tables(plans["update"]))
    jobs_tables = [t for t in select_tables + update_tables if t.get("table_name") == "jobs"]
    times = [p.get("query_block", {}).get("r_total_time_ms") for p in plans.values()]
    return {
        "statement": f"{lock[0].strip()}\n;\n{mark[0].strip()}",
        "plan": json.dumps(plans, indent=2),
        "plan_execution_ms": sum(times) if all(t is not None for t in times) else None,
        "plan_select_access": [(t.get("access_type"), t.get("key")) for t in select_tables],
        "plan_update_access": [(t.get("access_type"), t.get("key")) for t in update_tables],
        "plan_select_rows_read": sum(t.get("r_rows", t.get("rows")) or 0 for t in select_tables),
        "plan_select_pages": sum(
            t.get("r_engine_stats", {}).get("pages_accessed", 0) for t in select_tables
        ),
        "uses_claim_index": any(
            t.get("key") == "ix_jobs_claim_by_priority_mysql" for t in select_tables
        ),
        "update_uses_primary_key": any(t.get("key") == "PRIMARY" for t in update_tables),
        "filesort": '"filesort"' in json.dumps(plans["select"]),
        "history_list_length": None if history_row is None else int(history_row[1]),
        "seq_scan_on_jobs": any(t.get("access_type") in ("ALL", "index") for t in jobs_tables),
    }


def _plan_tables(node: Any) -> Iterator[dict[str, Any]]:
    """Every table access in a MariaDB/MySQL JSON plan."""
    if isinstance(node, dict):
        if "table_name" in node:
            yield node
        for value in node.values():
            yield from _plan_tables(value)
    elif isinstance(node, list):
        for value in node:
            yield from _plan_tables(value)


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
    session: Session, url: str, *, listen: bool, samples: int, max_gap: float, sleep: float = 1.0
) -> dict[str, Any]:
    """Commit-to-``handle()`` latency against an idle CLI worker (see sample_latency).

    ``sleep`` is the worker's poll interval (``--sleep``), which decides the latency when it
    does not listen (always on MariaDB, which has no NOTIFY).
    """
    from routemq_outbox import dispatch
    from routemq_outbox.database import create_engine

    from .jobs import MARKS_ENV, MarkJob

    await harness.reset_tables(url, TABLES)
    label = "listen" if listen else "poll" if sleep == 1.0 else f"poll-{sleep:g}s"
    marks = session.marks_path(f"routemq-{label}")
    flags = ["--concurrency", "10", "--sleep", str(sleep)] + ([] if listen else ["--no-listen"])
    worker = await session.spawn(
        f"routemq-latency-{label}",
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
            result = await harness.sample_latency(
                send, marks, worker, samples=samples, max_gap=max_gap
            )
        return {**result, "sleep_s": sleep, "listen": listen}
    finally:
        await engine.dispose()
        await session.stop(worker, grace=10)


def drain_cli_flags(concurrency: int = DRAIN_CONCURRENCY) -> list[str]:
    """The CLI drain's flags: the defaults, except what makes it stop and its concurrency.

    ``--concurrency`` is the in-process drain's, so the two compare; everything else
    (``--batch-size``, ``--prefetch``, logging at INFO in text to stderr, LISTEN) is left at
    what ``routemq-outbox work`` does when not told otherwise.
    """
    return ["--concurrency", str(concurrency), "--stop-when-empty"]


async def drain_cli(
    session: Session,
    url: str,
    jobs: int,
    *,
    concurrency: int = DRAIN_CONCURRENCY,
    extra: tuple[str, ...] = (),
    timeout: float = 300.0,
) -> dict[str, Any]:
    """The real CLI, ``routemq-outbox work`` with its default flags, draining the backlog
    already in ``url`` until it stops by itself (``--stop-when-empty``).

    Its log goes where a user's would when a service manager or a shell redirect captures
    stderr: to a file (the child's ``.err`` file). An atexit hook in :mod:`benchmarks.jobs`
    (see ``CLOCK_ENV``) writes the process's clock: when the CLI imported the job modules
    (``--import``, just before it builds its worker and starts its event loop), when the
    first job started, and when the process ended.

    The rate is the backlog over the time from the first job's start to the end of the
    process: the worker's steady drain, its shutdown (the last deletes, closing its
    connections, the event loop) included. What comes before the first job (making the
    engine, opening connections, the first claim: ``startup_seconds``) is a cost a worker
    pays once in its life, as is interpreter start-up; the in-process drain opens its
    connections before its clock starts too. ``jobs_per_s_from_import`` and
    ``jobs_per_s_incl_startup`` (from spawning the process to its exit) include them.
    ``extra`` adds flags, for comparisons outside the suite (e.g. ``--prefetch 0``).
    """
    from .jobs import CLOCK_ENV

    clock = session.marks_path(f"drain-cli-{len(session.children)}")
    args = cli_args(url, *drain_cli_flags(concurrency), *extra)
    started = time.perf_counter()
    worker = await session.spawn("routemq-drain-cli", args, {CLOCK_ENV: str(clock)})
    code = await session.wait(worker, timeout)
    wall = time.perf_counter() - started
    if code != 0:
        raise harness.ChildFailed(f"CLI worker exited with {code}\n{worker.tail()}")
    text = clock.read_text().strip()
    times = json.loads(text) if text else {}
    if times.get("first_handle") is None:
        raise harness.ChildFailed(f"CLI worker ran no job or wrote no clock\n{worker.tail()}")
    from_import = times["exited"] - times["imported"]
    left = await harness.fetchval(url, "SELECT count(*) FROM jobs")
    log_lines = worker.stderr_path.read_text(errors="replace").splitlines()
    return {
        "seconds": times["exited"] - times["first_handle"],
        "cpu_seconds": times["cpu_seconds_from_first_handle"],
        "jobs": jobs,
        "handled": times["handled"],
        "left": left,
        "startup_seconds": times["first_handle"] - times["imported"],
        "seconds_from_import": from_import,
        "jobs_per_s_from_import": jobs / from_import,
        "cpu_seconds_from_import": times["cpu_seconds_from_import"],
        "wall_seconds": wall,
        "jobs_per_s_incl_startup": jobs / wall,
        "args": [a if a != url else "<url>" for a in args[1:]],
        "log_lines": len(log_lines),
        "log_bytes": worker.stderr_path.stat().st_size,
    }


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
    left = await harness.fetchval(url, "SELECT count(*) FROM jobs")
    return {
        **sampler.summary(),
        "backlog": backlog,
        "left": left,
        "wall_seconds": wall,
        "jobs_per_s_incl_startup": backlog / wall,
    }
