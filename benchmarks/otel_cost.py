"""What tracing costs dispatch and drain: without OpenTelemetry, with the API but no SDK, and
with an SDK recording every span (exported to nowhere, so that the exporter is not measured).

``--jobs`` jobs are dispatched one transaction each, then drained by ``testing.work_off()``, on a
database of its own that it creates and drops::

    python -m benchmarks.otel_cost                      # PostgreSQL, 2000 jobs
    python -m benchmarks.otel_cost --quick              # 500 jobs
    python -m benchmarks.otel_cost --database-url sqlite+aiosqlite:///bench.db

Rates and ratios to the run without OpenTelemetry are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from routemq_outbox import Job, dispatch, testing, tracing
from routemq_outbox.config import async_url
from routemq_outbox.database import connection_engine
from routemq_outbox.migrate import upgrade

from .schedule_cost import on_server


class Noop(Job):
    job_name = "bench.otel_noop"
    queue = "otel"

    async def handle(self) -> None:
        pass


class Nowhere(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def database_of(url: str) -> tuple[str, str | None]:
    parsed = sa.make_url(async_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path(f"bench_otel_{os.getpid()}.db").resolve()
        return f"sqlite+aiosqlite:///{path}", None
    name = f"bench_otel_{os.getpid()}"
    return parsed.set(database=name).render_as_string(hide_password=False), name


async def one_round(url: str, count: int) -> tuple[float, float]:
    """Jobs per second dispatched, and drained."""
    started = time.perf_counter()
    for _ in range(count):
        await dispatch(Noop())
    dispatched = time.perf_counter() - started
    started = time.perf_counter()
    stats = await testing.work_off(["otel"], database_url=url)
    drained = time.perf_counter() - started
    if stats.succeeded != count:
        raise RuntimeError(f"{stats.succeeded} of {count} jobs succeeded")
    return count / dispatched, count / drained


def set_mode(mode: str, api: Any, sdk: TracerProvider) -> None:
    tracing.trace = None if mode == "without_otel" else api  # type: ignore[assignment]
    # The API lets a provider be set once; its proxy stands in until then.
    trace._TRACER_PROVIDER = sdk if mode == "sdk" else None


def check_ns(mode: str, api: Any, sdk: TracerProvider, calls: int = 200_000) -> float:
    """Nanoseconds one ``tracing.enabled()`` takes: what an untraced dispatch or attempt pays."""
    set_mode(mode, api, sdk)
    started = time.perf_counter_ns()
    for _ in range(calls):
        tracing.enabled()
    return (time.perf_counter_ns() - started) / calls


async def measure(url: str, count: int, rounds: int) -> dict[str, Any]:
    os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"] = url
    api = tracing.trace
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(Nowhere()))
    modes = ("without_otel", "api_without_sdk", "sdk")
    best = dict.fromkeys(modes, (0.0, 0.0))
    await one_round(url, min(count, 200))  # warm up pools and statement caches
    # Modes take turns within each round, so that a busy spell on the machine hits them all;
    # the best round counts, since noise only ever slows a round down.
    for _ in range(rounds):
        for mode in modes:
            set_mode(mode, api, sdk)
            dispatched, drained = await one_round(url, count)
            best[mode] = (max(best[mode][0], dispatched), max(best[mode][1], drained))
    results: dict[str, Any] = {"jobs": count, "rounds": rounds}
    base = best["without_otel"]
    for mode in modes:
        results[mode] = {
            "dispatch_per_s": best[mode][0],
            "drain_per_s": best[mode][1],
            "dispatch_ratio": best[mode][0] / base[0],
            "drain_ratio": best[mode][1] / base[1],
            "check_ns": check_ns(mode, api, sdk),
        }
    set_mode("without_otel", api, sdk)
    return results


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="500 jobs")
    parser.add_argument("--json", help="also write the numbers to this file")
    options = parser.parse_args()
    count = 500 if options.quick else options.jobs
    url, name = database_of(options.database_url)
    server = async_url(options.database_url)
    if name is not None:
        await on_server(server, f"CREATE DATABASE {name}")
    try:
        await asyncio.to_thread(upgrade, url)
        results = await measure(url, count, options.rounds)
        await connection_engine("default").dispose()
    finally:
        if name is not None:
            await on_server(server, f"DROP DATABASE {name}")
        else:
            path = sa.make_url(url).database or ""
            for suffix in ("", "-wal", "-shm"):  # SQLite's write-ahead log files too
                Path(path + suffix).unlink(missing_ok=True)
    print(f"{sa.make_url(url).get_backend_name()}: {count} jobs, best of {options.rounds} rounds")
    for mode in ("without_otel", "api_without_sdk", "sdk"):
        n = results[mode]
        print(
            f"  {mode:16s} dispatch {n['dispatch_per_s']:9,.0f}/s (x{n['dispatch_ratio']:.2f})"
            f"   drain {n['drain_per_s']:9,.0f}/s (x{n['drain_ratio']:.2f})"
            f"   enabled() {n['check_ns']:5.0f} ns"
        )
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
