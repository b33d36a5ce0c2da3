"""RouteMQ applications on routemq-outbox: RouteMQ's own ``QueueWorker`` on RouteMQ's database
driver against the same worker on the ``outbox`` driver, and RouteMQ jobs on our worker.

Each run enqueues ``--jobs`` no-op RouteMQ jobs through RouteMQ's ``queue.bulk`` and drains
them, on a database of its own that it creates and drops (Python 3.12+, RouteMQ installed)::

    python -m benchmarks.routemq                        # PostgreSQL, 2000 jobs
    python -m benchmarks.routemq --quick                # 500 jobs
    python -m benchmarks.routemq --database-url mysql://root@127.0.0.1:3306/test
    python -m benchmarks.routemq --database-url sqlite+aiosqlite:///bench.db

RouteMQ's database driver writes timezone-aware datetimes into naive columns, which asyncpg
refuses: on PostgreSQL its row reports that error instead of a rate. Ratios are printed, never
asserted; exit status 1 when a run on our side did not drain every job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from routemq.model import Model
from routemq.queue.queue_manager import queue as routemq_queue
from routemq.queue.queue_worker import QueueWorker

from routemq_outbox import testing
from routemq_outbox.config import async_url
from routemq_outbox.database import connection_engine
from routemq_outbox.migrate import upgrade

from .routemq_jobs import Noop
from .schedule_cost import on_server

# RouteMQ's own drivers for each family (its database driver is tested with these)
_ROUTEMQ_DRIVERS = {"postgresql": "asyncpg", "mysql": "aiomysql", "mariadb": "aiomysql"}


def database_of(url: str) -> tuple[str, str | None]:
    parsed = sa.make_url(async_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path(f"bench_routemq_{os.getpid()}.db").resolve()
        return f"sqlite+aiosqlite:///{path}", None
    name = f"bench_routemq_{os.getpid()}"
    return parsed.set(database=name).render_as_string(hide_password=False), name


def for_routemq(url: str) -> str:
    parsed = sa.make_url(url)
    driver = _ROUTEMQ_DRIVERS.get(parsed.get_backend_name())
    if driver is not None:
        parsed = parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}")
        parsed = parsed.difference_update_query(["charset"])
    return parsed.render_as_string(hide_password=False)


def noops(count: int) -> list[Noop]:
    jobs = []
    for n in range(count):
        job = Noop()
        job.n = n
        jobs.append(job)
    return jobs


async def routemq_worker(connection: str, count: int) -> float:
    """Seconds RouteMQ's QueueWorker takes to drain ``count`` jobs through ``connection``."""
    await routemq_queue.bulk(noops(count), connection=connection)
    worker = QueueWorker(queue_name="bench", connection=connection, max_jobs=count, sleep=0)
    started = time.perf_counter()
    await worker.work()
    elapsed = time.perf_counter() - started
    left = await routemq_queue.size("bench", connection=connection)
    if left:
        raise RuntimeError(f"{left} jobs left after {count} pops")
    return elapsed


async def our_worker(url: str, count: int) -> float:
    await routemq_queue.bulk(noops(count), connection="outbox")
    started = time.perf_counter()
    stats = await testing.work_off(["bench"], database_url=url)
    elapsed = time.perf_counter() - started
    if stats.succeeded != count:
        raise RuntimeError(f"{stats.succeeded} of {count} jobs succeeded")
    return elapsed


async def measure(url: str, count: int) -> dict[str, Any]:
    results: dict[str, Any] = {"jobs": count}
    os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"] = url
    Model.configure(for_routemq(url))
    try:
        await Model.create_tables()
        results["routemq_worker_on_routemq_driver"] = count / await routemq_worker(
            "database", count
        )
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        results["routemq_worker_on_routemq_driver"] = f"{type(exc).__name__}: {first_line}"[:200]
    finally:
        await Model.cleanup()
    results["routemq_worker_on_outbox"] = count / await routemq_worker("outbox", count)
    results["our_worker_on_routemq_jobs"] = count / await our_worker(url, count)
    baseline = results["routemq_worker_on_routemq_driver"]
    if isinstance(baseline, float):
        results["ratio_routemq_worker_outbox_vs_routemq_driver"] = (
            results["routemq_worker_on_outbox"] / baseline
        )
        results["ratio_our_worker_vs_routemq_driver"] = (
            results["our_worker_on_routemq_jobs"] / baseline
        )
    results["ratio_our_worker_vs_routemq_worker_on_outbox"] = (
        results["our_worker_on_routemq_jobs"] / results["routemq_worker_on_outbox"]
    )
    return results


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="500 jobs")
    parser.add_argument("--json", help="also write the numbers to this file")
    options = parser.parse_args()
    logging.disable(logging.INFO)  # RouteMQ logs every job at INFO: not what is measured
    count = 500 if options.quick else options.jobs
    url, name = database_of(options.database_url)
    server = async_url(options.database_url)
    if name is not None:
        await on_server(server, f"CREATE DATABASE {name}")
    try:
        await asyncio.to_thread(upgrade, url)
        results = await measure(url, count)
        await connection_engine("default").dispose()  # the driver's pool, before the drop
    finally:
        if name is not None:
            await on_server(server, f"DROP DATABASE {name}")
        else:
            path = sa.make_url(url).database or ""
            for suffix in ("", "-wal", "-shm"):  # SQLite's write-ahead log files too
                Path(path + suffix).unlink(missing_ok=True)
    results["database"] = sa.make_url(url).get_backend_name()
    for key, value in results.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        unit = " jobs/s" if isinstance(value, float) and not key.startswith("ratio") else ""
        print(f"{key:48s} {shown}{unit}")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
