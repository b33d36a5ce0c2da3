"""How long each dashboard page takes with a big queue: 1,000,000 due jobs in four queues and
100,000 failed jobs (``--quick``: 10,000 and 1,000), on a database of its own that it creates,
migrates, fills with INSERT … SELECT and drops::

    python -m benchmarks.dashboard_pages                       # PostgreSQL
    python -m benchmarks.dashboard_pages --quick
    python -m benchmarks.dashboard_pages --database-url mysql://root@127.0.0.1:3306/test
    python -m benchmarks.dashboard_pages --database-url sqlite+aiosqlite:///bench.db

Each page is requested through the ASGI app (no network, no browser: the time is the
dashboard's and the database's) once to warm up, then ``--rounds`` times; the median and the
slowest are printed. Exit status 1 when a page's median reaches 300 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx2 as httpx
import sqlalchemy as sa

from routemq_outbox.config import async_url
from routemq_outbox.dashboard import create_app
from routemq_outbox.database import create_engine
from routemq_outbox.migrate import upgrade
from routemq_outbox.schema import db_now_plus

from .schedule_cost import on_server

LIMIT_MS = 300.0
QUEUES = 4


def database_of(url: str) -> tuple[str, str | None]:
    parsed = sa.make_url(async_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path("bench_dashboard.db").resolve()
        path.unlink(missing_ok=True)
        return f"sqlite+aiosqlite:///{path}", None
    name = "bench_dashboard"
    return parsed.set(database=name).render_as_string(hide_password=False), name


def _series(family: str, count: int) -> tuple[str, str]:
    """A WITH prefix (or none) and a FROM clause giving g = 1..count."""
    if family == "postgresql":
        return "", f"generate_series(1, {count}) AS s(g)"
    if family == "sqlite":
        more = f"SELECT g + 1 FROM s WHERE g < {count}"
        return f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL {more}) ", "s"
    return "", f"(SELECT seq AS g FROM seq_1_to_{count}) AS s"


async def fill(url: str, pending: int, failed: int) -> None:
    engine = create_engine(url)
    family = engine.dialect.name
    concat = "CONCAT({})" if family in ("mysql", "mariadb") else "({})"
    glue = ", " if family in ("mysql", "mariadb") else " || "

    def text(*parts: str) -> str:
        return concat.format(glue.join(parts))

    minute_ago = str(
        db_now_plus(sa.literal(-60.0)).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True}
        )
    )
    as_text = "{}::text" if family == "postgresql" else "CAST({} AS CHAR(12))"
    queue = text("'q'", as_text.format(f"(g % {QUEUES})"))
    number = as_text.format("g")
    payload = text('\'{"job": "bench.job", "data": {"n": \'', number, "'}}'")
    cast = "::jsonb" if family == "postgresql" else ""
    with_, series = _series(family, pending)
    uuid = {
        "postgresql": "gen_random_uuid()::text",
        "sqlite": "'00000000-0000-4000-8000-' || printf('%012d', g)",
    }.get(family, "CONCAT('00000000-0000-4000-8000-', LPAD(g, 12, '0'))")
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    f"{with_}INSERT INTO jobs (queue, payload, available_at) "
                    f"SELECT {queue}, {payload}{cast}, {minute_ago} FROM {series}"
                )
            )
            with_, series = _series(family, failed)
            await conn.execute(
                sa.text(
                    f"{with_}INSERT INTO failed_jobs (uuid, connection, queue, payload, "
                    f"exception, attempts) SELECT {uuid}, 'default', {queue}, {payload}{cast}, "
                    "'ValueError: the bench failed\n\nTraceback (most recent call last):\n"
                    '  File "bench.py", line 1, in handle\nValueError: the bench failed\', 3 '
                    f"FROM {series}"
                )
            )
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in ("jobs", "failed_jobs"):
                if family == "postgresql":
                    await conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
                elif family == "sqlite":
                    await conn.execute(sa.text(f"ANALYZE {table}"))
                else:
                    await conn.execute(sa.text(f"ANALYZE TABLE {table}"))
    finally:
        await engine.dispose()


async def measure(url: str, rounds: int) -> list[tuple[str, float, float]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            some_job = (await conn.execute(sa.text("SELECT max(id) FROM jobs"))).scalar()
            some_failed = (await conn.execute(sa.text("SELECT min(id) FROM failed_jobs"))).scalar()
        pages = [
            "/",
            "/jobs",
            "/jobs?queue=q1&state=pending",
            "/jobs?queue=q2&state=delayed",
            "/jobs?job=bench.job",
            "/jobs?text=%22n%22%3A+77",
            f"/jobs?after={some_job // 2}",
            f"/jobs/{some_job}",
            "/failed",
            "/failed?queue=q3",
            f"/failed?before={some_failed + 500}",
            f"/failed/{some_failed}",
            "/queues",
            "/workers",
            "/schedules",
        ]
        times = []
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            for page in pages:
                (await http.get(page)).raise_for_status()
                spent = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    (await http.get(page)).raise_for_status()
                    spent.append(1000 * (time.perf_counter() - started))
                times.append((page, statistics.median(spent), max(spent)))
        return times
    finally:
        await engine.dispose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--quick", action="store_true", help="10,000 jobs and 1,000 failed")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    pending, failed = (10_000, 1_000) if options.quick else (1_000_000, 100_000)
    url, name = database_of(options.database_url)
    server = async_url(options.database_url)
    if name is not None:
        await on_server(server, f"DROP DATABASE IF EXISTS {name}")
        await on_server(server, f"CREATE DATABASE {name}")
    try:
        await asyncio.to_thread(upgrade, url)
        started = time.perf_counter()
        await fill(url, pending, failed)
        filled = time.perf_counter() - started
        times = await measure(url, options.rounds)
    finally:
        if name is not None:
            await on_server(server, f"DROP DATABASE {name}")
        else:
            Path(sa.make_url(url).database or "").unlink(missing_ok=True)
    family = sa.make_url(url).get_backend_name()
    print(
        f"{family}: {pending:,} due jobs in {QUEUES} queues, {failed:,} failed jobs "
        f"(filled in {filled:.0f} s); {options.rounds} requests per page"
    )
    print(f"  {'PAGE':<34} {'MEDIAN':>9} {'SLOWEST':>9}")
    for page, median, slowest in times:
        print(f"  {page:<34} {median:7.1f}ms {slowest:7.1f}ms")
    return 0 if all(median < LIMIT_MS for _, median, _ in times) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
