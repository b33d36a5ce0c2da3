"""The benchmark run: which measurement runs when, at which size, and what is derived from it.

Each system gets its own fresh database; every measurement starts from emptied, vacuumed,
analyzed tables and a checkpoint (see :func:`benchmarks.harness.reset_tables`). A measurement
that fails is recorded as a problem and the run goes on, so one broken peer does not hide the
others' numbers; Ctrl-C and SIGTERM stop the run and still clean up.

The server is PostgreSQL or MariaDB (MySQL), told by the URL's scheme. On MariaDB only
routemq-outbox and the raw ceiling run (the peers are PostgreSQL-only), dispatch has no
NOTIFY variant, and latency is measured with polling only, at the default ``--sleep`` of 1 s
and at 0.1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import platform
import signal
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from . import harness, monitor, ours, pgqueuer_peer, procrastinate_peer
from .checks import evaluate_targets, find_problems
from .harness import Session

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_URLS",
    "FULL",
    "QUICK",
    "SYSTEMS",
    "Sizes",
    "run_async",
]

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MARIADB_DATABASE_URL = "mysql://root@127.0.0.1:3306/test"
DEFAULT_URLS = {"postgresql": DEFAULT_DATABASE_URL, "mariadb": MARIADB_DATABASE_URL}

# What runs on each family's server: PgQueuer and procrastinate exist on PostgreSQL only.
SYSTEMS = {
    "postgresql": ("routemq", "raw", "pgqueuer", "procrastinate"),
    "mysql": ("routemq", "raw"),
}


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is; FULL and QUICK below are the two the CLI offers."""

    jobs: int  # bulk enqueue and drain, per system
    repeats: int  # enqueue+drain rounds for ours, the raw ceiling and PgQueuer's enqueue
    enqueue_chunk: int
    dispatch_transactions: dict[int, int]  # connections -> transactions per run
    dispatch_rounds: int
    latency_samples_listen: int
    latency_samples_poll: int
    latency_samples_peers: int
    claim_small: int
    claim_large: int
    claims_timed: int
    rss_small: int
    rss_large: int
    raw_connections: int = 4
    raw_batch: int = 100


FULL = Sizes(
    jobs=20_000,
    repeats=3,
    enqueue_chunk=1_000,
    dispatch_transactions={1: 1_500, 8: 4_000},
    dispatch_rounds=5,
    latency_samples_listen=200,
    latency_samples_poll=30,
    latency_samples_peers=100,
    claim_small=10_000,
    claim_large=1_000_000,
    claims_timed=20,
    rss_small=20_000,
    rss_large=100_000,
)

QUICK = Sizes(
    jobs=2_000,
    repeats=1,
    enqueue_chunk=1_000,
    dispatch_transactions={1: 300, 8: 800},
    dispatch_rounds=1,
    latency_samples_listen=40,
    latency_samples_poll=6,
    latency_samples_peers=30,
    claim_small=10_000,
    claim_large=100_000,
    claims_timed=10,
    rss_small=5_000,
    rss_large=20_000,
)

# Idle gaps between latency samples. With polling, the gap spans a whole poll interval (the
# worker's default sleep of 1 s) so dispatches land at uniformly random points of the cycle.
LISTEN_GAP_S = 0.05

# A machine busier than this before the run (other processes on the CPUs) gets a warning.
BUSY_WARNING = 0.15
POLL_GAP_S = 1.0

# MariaDB has no NOTIFY, so its workers always poll: besides the default --sleep of 1 s the
# suite measures a tighter poll interval (latency_samples_peers samples: there are no peers).
FAST_POLL_S = 0.1


def _rate(result: dict[str, Any]) -> dict[str, Any]:
    """Add throughput, and the client's own CPU per job and share of the wall time.

    A client CPU share near 1.0 means the Python side was the bottleneck; a low one means it
    was waiting for the database (on this 2-core machine the two also compete for cores).
    """
    rated = {**result, "jobs_per_s": result["jobs"] / result["seconds"]}
    cpu = result.get("cpu_seconds")
    if cpu is not None:
        rated["client_cpu_us_per_job"] = cpu / result["jobs"] * 1e6
        rated["client_cpu_share"] = cpu / result["seconds"]
    return rated


def _best(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The median sample by throughput, with every sample's rate kept alongside."""
    ordered = sorted(samples, key=lambda r: r["jobs_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_jobs_per_s"] = [r["jobs_per_s"] for r in samples]
    return chosen


class Run:
    """One benchmark run: collects results and problems as measurements complete."""

    def __init__(self, session: Session, sizes: Sizes, progress: Callable[[str], None]) -> None:
        self.session = session
        self.family = session.family
        self.sizes = sizes
        self.progress = progress
        self.results: dict[str, Any] = {
            "bulk_enqueue": {},
            "dispatch": {},
            "drain": {},
            "latency": {},
            "claim": {},
            "rss": {},
        }
        self.errors: list[str] = []

    async def step(self, label: str, action: Callable[[], Awaitable[None]]) -> None:
        """Run one measurement; a failure is written down and the run continues."""
        self.progress(f"{label} ...")
        started = time.perf_counter()
        try:
            await action()
        except Exception as exc:
            self.errors.append(f"{label} failed: {type(exc).__name__}: {exc}")
            self.progress(f"{label} FAILED:\n{traceback.format_exc()}")
            return
        self.progress(f"{label} done in {time.perf_counter() - started:.1f} s")

    # ---------------------------------------------------------------- routemq-outbox

    async def routemq(self) -> None:
        url = await ours.setup(self.session)
        sizes = self.sizes

        async def enqueue_and_drain() -> None:
            enqueues, drains, cli_drains = [], [], []
            for round_number in range(sizes.repeats):
                # The in-process drain and the CLI's take turns going first, so that a slow
                # drift of the machine is not always charged to the same one.
                kinds = ("in_process", "cli") if round_number % 2 == 0 else ("cli", "in_process")
                for kind in kinds:
                    await harness.reset_tables(url, ours.TABLES)
                    enqueued = _rate(
                        await self.session.run_child(
                            "benchmarks.ours:bulk_enqueue_child",
                            {"url": url, "jobs": sizes.jobs, "chunk": sizes.enqueue_chunk},
                        )
                    )
                    # The enqueued jobs are the drain's backlog: vacuumed and analyzed first.
                    await harness.vacuum_analyze(url, ["jobs"])
                    if kind == "cli":
                        # The same backlog, drained by `routemq-outbox work` with its
                        # defaults; its enqueue is set-up here, not a sample. A failure is
                        # written down without losing the in-process drain's numbers.
                        try:
                            cli = await ours.drain_cli(self.session, url, sizes.jobs)
                        except Exception as exc:
                            self.errors.append(
                                f"routemq-outbox CLI drain failed: {type(exc).__name__}: {exc}"
                            )
                            self.progress(f"CLI drain FAILED:\n{traceback.format_exc()}")
                        else:
                            cli_drains.append(_rate(cli))
                        continue
                    enqueues.append(enqueued)
                    drains.append(
                        _rate(
                            await self.session.run_child(
                                "benchmarks.ours:drain_child",
                                {"url": url, "jobs": sizes.jobs},
                                loop="uvloop",  # as `routemq-outbox work` runs
                            )
                        )
                    )
            self.results["bulk_enqueue"]["routemq"] = _best(enqueues)
            self.results["drain"]["routemq"] = _best(drains)
            if cli_drains:
                self.results["drain"]["routemq_cli"] = _best(cli_drains)

        async def dispatch() -> None:
            self.results["dispatch"] = await self.session.run_child(
                "benchmarks.ours:dispatch_child",
                {
                    "url": url,
                    "transactions": {str(c): n for c, n in sizes.dispatch_transactions.items()},
                    "rounds": sizes.dispatch_rounds,
                    "variants": list(ours.dispatch_variants(self.family)),
                },
            )

        async def latency() -> None:
            found = self.results["latency"]
            if self.family != "mysql":
                found["routemq_listen"] = await ours.latency(
                    self.session,
                    url,
                    listen=True,
                    samples=sizes.latency_samples_listen,
                    max_gap=LISTEN_GAP_S,
                )
            found["routemq_poll"] = await ours.latency(
                self.session,
                url,
                listen=False,
                samples=sizes.latency_samples_poll,
                max_gap=POLL_GAP_S,
            )
            if self.family == "mysql":
                # No NOTIFY on MariaDB: a tighter poll interval as well as the default (1 s).
                found["routemq_poll_fast"] = await ours.latency(
                    self.session,
                    url,
                    listen=False,
                    samples=sizes.latency_samples_peers,
                    max_gap=FAST_POLL_S,
                    sleep=FAST_POLL_S,
                )

        async def claim() -> None:
            for backlog in (sizes.claim_small, sizes.claim_large):
                self.results["claim"][str(backlog)] = await self.session.run_child(
                    "benchmarks.ours:claim_cost_child",
                    {"url": url, "backlog": backlog, "claims": sizes.claims_timed},
                )

        async def rss() -> None:
            for backlog in (sizes.rss_small, sizes.rss_large):
                self.results["rss"][str(backlog)] = await ours.worker_rss(
                    self.session, url, backlog, timeout=300
                )

        await self.step("routemq-outbox: bulk enqueue + drain", enqueue_and_drain)
        await self.step("routemq-outbox: transactional dispatch", dispatch)
        await self.step("routemq-outbox: latency", latency)
        await self.step("routemq-outbox: worker RSS (CLI)", rss)
        await self.step("routemq-outbox: claim cost", claim)

    # ----------------------------------------------------------------------- raw ceiling

    async def raw(self) -> None:
        # Our schema (the real migrations) in a database of its own.
        url = await ours.setup(self.session, "raw")
        sizes = self.sizes

        async def ceiling() -> None:
            samples = []
            for _ in range(sizes.repeats):
                await harness.reset_tables(url, ours.TABLES)
                await ours.load_backlog(url, sizes.jobs)
                samples.append(
                    _rate(
                        await self.session.run_child(
                            "benchmarks.raw:ceiling_child"
                            + ("_mysql" if self.family == "mysql" else ""),
                            {
                                "url": url,
                                "jobs": sizes.jobs,
                                "connections": sizes.raw_connections,
                                "batch": sizes.raw_batch,
                            },
                        )
                    )
                )
            self.results["drain"]["raw_ceiling"] = _best(samples)

        await self.step("raw ceiling: drain", ceiling)

    # -------------------------------------------------------------------------- PgQueuer

    async def pgqueuer(self) -> None:
        url = await pgqueuer_peer.setup(self.session)
        tables = await pgqueuer_peer.tables(url)
        sizes = self.sizes

        async def enqueue_and_drain() -> None:
            enqueues, drains = [], []
            for instances, batch_size in pgqueuer_peer.DRAIN_CONFIGS:
                await harness.reset_tables(url, tables)
                enqueues.append(
                    _rate(
                        await self.session.run_child(
                            "benchmarks.pgqueuer_peer:bulk_enqueue_child",
                            {"url": url, "jobs": sizes.jobs, "chunk": sizes.enqueue_chunk},
                        )
                    )
                )
                await harness.vacuum_analyze(url, tables)
                drains.append(
                    _rate(
                        await self.session.run_child(
                            "benchmarks.pgqueuer_peer:drain_child",
                            {
                                "url": url,
                                "jobs": sizes.jobs,
                                "instances": instances,
                                "batch_size": batch_size,
                            },
                            loop="uvloop",
                        )
                    )
                )
            self.results["bulk_enqueue"]["pgqueuer"] = _best(enqueues)
            # The peer's best documented configuration is the one it is judged by.
            best = dict(max(drains, key=lambda r: r["jobs_per_s"]))
            best["configs"] = [
                {
                    "instances": r["instances"],
                    "batch_size": r["batch_size"],
                    "jobs_per_s": r["jobs_per_s"],
                }
                for r in drains
            ]
            self.results["drain"]["pgqueuer"] = best

        async def latency() -> None:
            self.results["latency"]["pgqueuer_listen"] = await pgqueuer_peer.latency(
                self.session, url, sizes.latency_samples_peers, LISTEN_GAP_S
            )

        await self.step("PgQueuer: bulk enqueue + drain", enqueue_and_drain)
        await self.step("PgQueuer: latency", latency)

    # --------------------------------------------------------------------- procrastinate

    async def procrastinate(self) -> None:
        url = await procrastinate_peer.setup(self.session)
        tables = procrastinate_peer.TABLES
        sizes = self.sizes

        async def enqueue_and_drain() -> None:
            # One round only: procrastinate drains at a few hundred jobs/s, so a round of the
            # default size already takes over a minute.
            await harness.reset_tables(url, tables)
            self.results["bulk_enqueue"]["procrastinate"] = _rate(
                await self.session.run_child(
                    "benchmarks.procrastinate_peer:bulk_enqueue_child",
                    {"url": url, "jobs": sizes.jobs, "chunk": sizes.enqueue_chunk},
                )
            )
            await harness.vacuum_analyze(url, tables)
            self.results["drain"]["procrastinate"] = _rate(
                await self.session.run_child(
                    "benchmarks.procrastinate_peer:drain_child",
                    {"url": url, "jobs": sizes.jobs},
                    timeout=900,
                )
            )

        async def latency() -> None:
            self.results["latency"]["procrastinate_listen"] = await procrastinate_peer.latency(
                self.session, url, sizes.latency_samples_peers, LISTEN_GAP_S
            )

        await self.step("procrastinate: bulk enqueue + drain", enqueue_and_drain)
        await self.step("procrastinate: latency", latency)


def _versions(family: str = "postgresql") -> dict[str, str]:
    versions = {"python": platform.python_version()}
    packages = (
        ("routemq-outbox", "sqlalchemy", "asyncmy")
        if family == "mysql"
        else ("routemq-outbox", "pgqueuer", "procrastinate", "sqlalchemy", "asyncpg", "psycopg")
    )
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    if family != "mysql":  # psycopg plays no part in a MariaDB run
        with contextlib.suppress(ImportError):
            import psycopg

            # procrastinate's speed depends on it: "binary" or "c", not pure-Python "python".
            versions["psycopg implementation"] = psycopg.pq.__impl__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        versions["routemq-outbox commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=harness.ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return versions


async def run_async(
    *,
    quick: bool = False,
    database_url: str = DEFAULT_DATABASE_URL,
    systems: tuple[str, ...] | None = None,
    progress: Callable[[str], None] | None = None,
    keep_logs: bool = False,
) -> dict[str, Any]:
    """Run the suite and return every number, the derived ratios, targets and problems.

    The server's family (PostgreSQL or MariaDB/MySQL) comes from ``database_url``'s scheme;
    ``systems`` defaults to every system that family can run (see ``SYSTEMS``).
    """
    family = harness.family(database_url)
    if systems is None:
        systems = SYSTEMS[family]
    unsupported = [s for s in systems if s not in SYSTEMS[family]]
    if unsupported:
        raise ValueError(
            f"{', '.join(unsupported)} cannot run on MariaDB/MySQL (PostgreSQL only); "
            f"choose among {', '.join(SYSTEMS[family])}"
        )
    sizes = QUICK if quick else FULL
    say = progress or (lambda message: None)
    session = Session(database_url, keep_logs=keep_logs)
    runner = Run(session, sizes, say)
    started = time.perf_counter()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    # SIGTERM cancels the run like Ctrl-C does, so the finally below still cleans up.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    machine: dict[str, Any] = {}
    foreign = monitor.ForeignLoad(session.own_sessions, server_processes(family))
    try:
        await session.sweep_stale()
        server = await harness.server_info(database_url)
        machine["before"] = await monitor.machine_busy()
        busy = machine["before"]["cpu_busy_share"]
        if busy is not None and busy > BUSY_WARNING:
            say(
                f"WARNING: the machine is {busy:.0%} busy before the run started; "
                "something else is using the CPUs and these numbers will be noisy"
            )
        foreign.start()
        for system in systems:
            await getattr(runner, system)()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGTERM)
        with contextlib.suppress(Exception):
            machine["during"] = await foreign.stop()
            machine["after"] = await monitor.machine_busy(0.5)
        # Shielded: a second cancellation must not interrupt the clean-up half way.
        await asyncio.shield(session.close())
        if keep_logs:
            say(f"child logs kept in {session.workdir}")
    settings: dict[str, Any] = {
        "routemq_drain": {
            "concurrency": ours.DRAIN_CONCURRENCY,
            "batch_size": ours.DRAIN_BATCH_SIZE,
        },
        "routemq_drain_cli": {"flags": ours.drain_cli_flags()},
    }
    if family == "mysql":
        settings["latency_poll_sleeps_s"] = [1.0, FAST_POLL_S]
        settings["dispatch_variants"] = list(ours.dispatch_variants(family))
    else:
        settings["pgqueuer_drain_configs"] = [list(c) for c in pgqueuer_peer.DRAIN_CONFIGS]
        settings["procrastinate_drain_concurrency"] = procrastinate_peer.DRAIN_CONCURRENCY
    results: dict[str, Any] = {
        "meta": {
            "family": family,
            "quick": quick,
            "sizes": asdict(sizes),
            "server": server,
            "machine": machine,
            "versions": _versions(family),
            "settings": settings,
            "systems": list(systems),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - started,
        },
        **runner.results,
    }
    results["ratios"], results["targets"] = evaluate_targets(results)
    results["problems"] = runner.errors + find_problems(results, systems)
    return _finite(results)


def server_processes(family: str) -> frozenset[str]:
    """Names of the database server's processes: their CPU is not "other load"."""
    if family == "mysql":
        from .mariadb import SERVER_PROCESSES

        return SERVER_PROCESSES
    return frozenset({"postgres"})


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: missing numbers become null (and are reported as problems)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
