"""What job keys cost: draining jobs spread over serial keys against a plain drain, and unique
dispatch against plain dispatch at 8 connections, as ratios from interleaved rounds.

On a database of its own beside ``--database-url`` (created, migrated and dropped)::

    python -m benchmarks.keys                                   # PostgreSQL
    python -m benchmarks.keys --quick
    python -m benchmarks.keys --database-url mysql://root@127.0.0.1:3306/test
    python -m benchmarks.keys --plain-only                      # no keys: runs on any version

Targets (reported, never asserted): a drain over 1,000 serial keys at least 0.5 times the
plain drain; unique dispatch at 8 connections at least 0.85 times plain dispatch.
``--plain-only`` measures the plain drain and dispatch alone, to compare two versions of the
library (run it with each on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from routemq_outbox import Worker, WorkerSettings, dispatch, sql
from routemq_outbox.config import async_url
from routemq_outbox.database import create_engine
from routemq_outbox.job import encode_payload
from routemq_outbox.migrate import upgrade
from routemq_outbox.schema import jobs

from .jobs import NoopJob
from .schedule_cost import database_of, on_server

SERIAL_KEYS = 1000
CONNECTIONS = 8
DRAIN_TARGET = 0.5
UNIQUE_TARGET = 0.85


async def _load(url: str, count: int, serial: bool) -> None:
    """``count`` due no-op jobs; with ``serial``, spread round-robin over SERIAL_KEYS keys,
    the first of each key its head and the others parked, as dispatch leaves them."""
    payload = encode_payload(NoopJob(), max_bytes=1 << 20)
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(jobs))
            now = await sql.database_now(conn)
            rows: list[dict[str, Any]] = []
            for n in range(count):
                row: dict[str, Any] = {"queue": "default", "payload": payload}
                if serial:
                    row["serial_key"] = f"key-{n % SERIAL_KEYS}"
                    if n >= SERIAL_KEYS:
                        row["available_at"] = _parked()
                        row["serial_due_at"] = now
                rows.append(row)
            for start in range(0, count, 5000):
                chunk = rows[start : start + 5000]
                if serial:
                    heads = [r for r in chunk if "serial_due_at" not in r]
                    parked = [r for r in chunk if "serial_due_at" in r]
                    for part in (heads, parked):
                        if part:
                            await conn.execute(sa.insert(jobs), part)
                else:
                    await conn.execute(sa.insert(jobs), chunk)
    finally:
        await engine.dispose()


def _parked() -> Any:
    from routemq_outbox.schema import PARKED_AT

    return PARKED_AT


async def _drain(url: str, count: int) -> float:
    settings = WorkerSettings(database_url=url, stop_when_empty=True, concurrency=20)
    started = time.perf_counter()
    stats = await Worker(settings).run()
    seconds = time.perf_counter() - started
    if stats.succeeded != count:
        raise RuntimeError(f"drained {stats.succeeded} jobs of {count}")
    return count / seconds


async def _dispatch(url: str, transactions: int, unique: bool) -> float:
    engine = create_engine(url, pool_size=CONNECTIONS, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(jobs))
        counter = iter(range(transactions))

        async def producer() -> None:
            for n in counter:
                async with engine.begin() as conn:
                    if unique:
                        await dispatch(NoopJob(n), session=conn, unique_key=f"u-{n}")
                    else:
                        await dispatch(NoopJob(n), session=conn)

        async with engine.connect():
            pass
        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(CONNECTIONS)))
        return transactions / (time.perf_counter() - started)
    finally:
        await engine.dispose()


async def measure(url: str, *, quick: bool, plain_only: bool) -> dict[str, Any]:
    backlog = 5000 if quick else 20000
    transactions = 2000 if quick else 5000
    rounds = 3 if quick else 5
    drains: dict[str, list[float]] = {"plain": [], "serial": []}
    dispatches: dict[str, list[float]] = {"plain": [], "unique": []}
    for round_number in range(rounds):
        kinds = ["plain"] if plain_only else ["plain", "serial"]
        for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
            await _load(url, backlog, kind == "serial")
            drains[kind].append(await _drain(url, backlog))
            print(f"round {round_number}: drain {kind} {drains[kind][-1]:.0f}/s", file=sys.stderr)
        kinds = ["plain"] if plain_only else ["plain", "unique"]
        for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
            dispatches[kind].append(await _dispatch(url, transactions, kind == "unique"))
            print(
                f"round {round_number}: dispatch {kind} {dispatches[kind][-1]:.0f}/s",
                file=sys.stderr,
            )
    result: dict[str, Any] = {
        "backlog": backlog,
        "serial_keys": SERIAL_KEYS,
        "transactions": transactions,
        "connections": CONNECTIONS,
        "rounds": rounds,
        "drain_jobs_per_s": {k: statistics.median(v) for k, v in drains.items() if v},
        "dispatch_tps": {k: statistics.median(v) for k, v in dispatches.items() if v},
        "runs": {"drain": drains, "dispatch": dispatches},
    }
    if not plain_only:
        drain, tps = result["drain_jobs_per_s"], result["dispatch_tps"]
        result["serial_drain_ratio"] = drain["serial"] / drain["plain"]
        result["unique_dispatch_ratio"] = tps["unique"] / tps["plain"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.keys", description=__doc__)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plain-only", action="store_true")
    args = parser.parse_args()
    url, name = database_of(args.database_url)
    server = async_url(args.database_url).render_as_string(hide_password=False)
    if name is not None:
        asyncio.run(on_server(server, f"CREATE DATABASE {name}"))
    try:
        upgrade(url)
        result = asyncio.run(measure(url, quick=args.quick, plain_only=args.plain_only))
    finally:
        if name is not None:
            asyncio.run(on_server(server, f"DROP DATABASE {name}"))
        else:
            Path(sa.make_url(url).database or "").unlink(missing_ok=True)
    print(json.dumps(result, indent=2))
    if args.plain_only:
        return 0
    print(
        f"serial drain / plain drain: {result['serial_drain_ratio']:.2f} "
        f"(target >= {DRAIN_TARGET}); unique dispatch / plain dispatch at {CONNECTIONS} "
        f"connections: {result['unique_dispatch_ratio']:.2f} (target >= {UNIQUE_TARGET})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
