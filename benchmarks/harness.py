"""Timing, statistics, throwaway databases, child processes and latency sampling.

Everything the suite starts (databases, processes) is registered with a :class:`Session`, whose
``close()`` removes it again: on success, on failure and on Ctrl-C/SIGTERM alike. Child processes
get a session (process group) of their own, so a terminal's Ctrl-C reaches only the suite, which
then stops them itself, in order, instead of leaving half-killed workers holding connections.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

__all__ = [
    "PYTHON",
    "ROOT",
    "Child",
    "ChildFailed",
    "Session",
    "execute",
    "family",
    "fetchval",
    "median",
    "percentile",
    "quote_ident",
    "stopwatch",
]

ROOT = Path(__file__).resolve().parent.parent
"""The checkout holding the ``benchmarks`` package: children run here so they can import it."""

PYTHON = sys.executable


# ------------------------------------------------------------------------------- statistics


def run_gone(name: str) -> bool:
    """Whether the run that named a throwaway database ``…_<pid>`` has ended."""
    try:
        os.kill(int(name.rsplit("_", 1)[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False  # that run is still alive


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Elapsed:
    """What :func:`stopwatch` measured; set when the block ends.

    ``cpu_seconds`` is this process's own CPU time over the block: next to the wall time it
    shows whether a client was busy (CPU-bound) or waiting for the database.
    """

    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=cpu_seconds)
    seconds: float = math.nan
    cpu_seconds: float = math.nan

    def result(self, jobs: int, **extra: Any) -> dict[str, Any]:
        """A child's result: the keys the suite rates (``seconds``, ``cpu_seconds``, ``jobs``),
        then the measurement's own."""
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "jobs": jobs, **extra}


@contextlib.contextmanager
def stopwatch() -> Iterator[Elapsed]:
    """Time a block with ``time.perf_counter`` (monotonic, highest resolution)."""
    elapsed = Elapsed()
    try:
        yield elapsed
    finally:
        elapsed.seconds = time.perf_counter() - elapsed.started
        elapsed.cpu_seconds = cpu_seconds() - elapsed.cpu_started


# -------------------------------------------------------------------------------- databases
#
# The suite targets one server per run: PostgreSQL (asyncpg, below) or MariaDB/MySQL
# (asyncmy, in benchmarks.mariadb, imported only when used: it is an optional extra). The
# family comes from the URL's scheme, as it does for routemq-outbox itself.

FAMILIES = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
}


def family(url: str) -> str:
    """``postgresql`` or ``mysql`` (MariaDB included), from the URL's scheme."""
    backend = make_url(url).get_backend_name()
    if backend not in FAMILIES:
        raise ValueError(
            f"unsupported database URL scheme {backend!r}: the suite runs on PostgreSQL "
            "(postgresql://) or MariaDB/MySQL (mysql:// or mariadb://)"
        )
    return FAMILIES[backend]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def database_url(maintenance_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``maintenance_url``, driver-less.

    The plain ``postgresql://`` form is what asyncpg and psycopg take, ``mysql://`` (or
    ``mariadb://``) what the suite's asyncmy helpers take; routemq-outbox swaps in its asyncio
    driver itself.
    """
    url = make_url(maintenance_url)
    scheme = "postgresql" if family(maintenance_url) == "postgresql" else url.get_backend_name()
    url = url.set(drivername=scheme, database=name)
    return url.render_as_string(hide_password=False)


# Refusals that mean "the server is busy right now", not "wrong URL": on a server shared with
# other test suites, max_connections can be reached for a while. Waiting beats failing a run.
_BUSY_SERVER = (asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError)
CONNECT_PATIENCE_S = 120.0


async def connect(url: str) -> asyncpg.Connection:
    """An asyncpg connection, retried while the server refuses for lack of slots."""
    deadline = time.perf_counter() + CONNECT_PATIENCE_S
    pause = 0.2
    while True:
        try:
            return await asyncpg.connect(url)
        except _BUSY_SERVER:
            if time.perf_counter() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def execute(url: str, *statements: str) -> None:
    """Run ``statements`` in autocommit on either family's server."""
    if family(url) == "mysql":
        from . import mariadb

        await mariadb.execute(url, *statements)
        return
    conn = await connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def fetchval(url: str, query: str) -> Any:
    """The first column of the first row of ``query``, on either family's server."""
    if family(url) == "mysql":
        from . import mariadb

        return await mariadb.fetchval(url, query)
    conn = await connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def reset_tables(url: str, tables: Sequence[str]) -> None:
    """Empty ``tables``, vacuum and analyze them, and checkpoint.

    Every measurement starts here: no dead tuples or bloated indexes left by the previous one
    (autovacuum may be off, as it is on the reference machine), fresh planner statistics, and
    no dirty buffers whose write-out would land inside the next timing. On MariaDB:
    :func:`benchmarks.mariadb.reset_tables` (TRUNCATE and ANALYZE TABLE; no checkpoint).
    """
    if family(url) == "mysql":
        from . import mariadb

        await mariadb.reset_tables(url, tables)
        return
    conn = await connect(url)
    try:
        if tables:
            names = ", ".join(quote_ident(t) for t in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
            # VACUUM cannot run in a transaction block; asyncpg's execute is autocommit here.
            await conn.execute(f"VACUUM (ANALYZE) {names}")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def vacuum_analyze(url: str, tables: Sequence[str]) -> None:
    """Vacuum and analyze a freshly loaded backlog, so its plan and visibility map are settled.

    On MariaDB, ``ANALYZE TABLE`` (there is nothing to vacuum).
    """
    if family(url) == "mysql":
        from . import mariadb

        await mariadb.analyze(url, tables)
        return
    conn = await connect(url)
    try:
        names = ", ".join(quote_ident(t) for t in tables)
        await conn.execute(f"VACUUM (ANALYZE) {names}")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def server_info(url: str) -> dict[str, Any]:
    """The server settings that decide these numbers, recorded with every result."""
    if family(url) == "mysql":
        from . import mariadb

        return await mariadb.server_info(url)
    conn = await connect(url)
    try:
        info: dict[str, Any] = {"version": await conn.fetchval("SHOW server_version")}
        for setting in (
            "synchronous_commit",
            "fsync",
            "shared_buffers",
            "autovacuum",
            "max_connections",
            "wal_level",
        ):
            info[setting] = await conn.fetchval(f"SHOW {setting}")
        return info
    finally:
        await conn.close()


# -------------------------------------------------------------------------------- processes


class ChildFailed(RuntimeError):
    """A child process exited non-zero or produced no result."""


@dataclass
class Child:
    """A process the suite started, in a process group of its own."""

    process: asyncio.subprocess.Process
    name: str
    stdout_path: Path
    stderr_path: Path
    started: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 25) -> str:
        """The end of the child's stderr and stdout, for error messages."""
        parts = []
        for path in (self.stderr_path, self.stdout_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                if text:
                    parts.append(f"--- {path.name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def result(self) -> dict[str, Any]:
        """The JSON a :mod:`benchmarks.child` runner printed as its last ``RESULT`` line."""
        for line in reversed(self.stdout_path.read_text(errors="replace").splitlines()):
            if line.startswith("RESULT "):
                value: dict[str, Any] = json.loads(line[len("RESULT ") :])
                return value
        raise ChildFailed(f"{self.name} printed no result\n{self.tail()}")


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


# Process groups still alive, for the last-resort atexit sweep (the normal path is Session).
_live_groups: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_live_groups):
        _signal_group(pid, signal.SIGKILL)


# The names of the databases the suite creates, for the sweep of those a killed run left.
STALE_DATABASE = "bench_(routemq|raw|pgqueuer|procrastinate)_[0-9]+"


class Session:
    """Owns the suite's scratch directory, throwaway databases and child processes."""

    def __init__(self, maintenance_url: str, *, keep_logs: bool = False) -> None:
        self.maintenance_url = maintenance_url
        self.family = family(maintenance_url)
        self.keep_logs = keep_logs
        self.workdir = Path(tempfile.mkdtemp(prefix="routemq-bench-"))
        self.databases: list[str] = []
        self.children: list[Child] = []
        self._counter = 0

    def own_sessions(self) -> set[int]:
        """Session ids of this process and of every child it started (each has its own)."""
        return {os.getsid(0), *(child.pid for child in self.children)}

    # -------------------------------------------------------------------------- databases

    async def create_database(self, system: str) -> str:
        """A new empty database ``bench_<system>_<pid>``; returns its URL."""
        name = f"bench_{system}_{os.getpid()}"
        if self.family == "mysql":
            from . import mariadb

            await mariadb.create_database(self.maintenance_url, name)
            self.databases.append(name)
            return database_url(self.maintenance_url, name)
        conn = await connect(self.maintenance_url)
        try:
            # A leftover from a killed run with the same pid would make CREATE fail.
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        finally:
            await conn.close()
        self.databases.append(name)
        return database_url(self.maintenance_url, name)

    async def sweep_stale(self) -> list[str]:
        """Drop ``bench_<system>_<pid>`` databases left by runs that were killed outright.

        Only on a server of this machine, where a pid that no longer exists proves the run
        that made the database is gone; on any other server nothing is touched.
        """
        host = make_url(self.maintenance_url).host
        if host not in (None, "", "localhost", "127.0.0.1", "::1"):
            return []
        if self.family == "mysql":
            from . import mariadb

            return await mariadb.sweep_stale(self.maintenance_url, STALE_DATABASE)
        conn = await connect(self.maintenance_url)
        dropped = []
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname ~ $1", f"^{STALE_DATABASE}$"
            )
            for (name,) in rows:
                if not run_gone(name):
                    continue
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
                dropped.append(name)
        finally:
            await conn.close()
        return dropped

    async def drop_databases(self) -> None:
        if not self.databases:
            return
        if self.family == "mysql":
            from . import mariadb

            await mariadb.drop_databases(self.maintenance_url, self.databases)
            return
        conn = await connect(self.maintenance_url)
        try:
            while self.databases:
                name = self.databases.pop()
                # FORCE ends sessions a killed child may have left behind.
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()

    # -------------------------------------------------------------------------- processes

    def marks_path(self, label: str) -> Path:
        path = self.workdir / f"marks-{label}.txt"
        path.write_text("")
        return path

    async def spawn(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Child:
        """Start ``args`` in its own process group with output to files in the workdir.

        Files, not pipes: a worker logging a line per job must never block on a full pipe
        the suite is not reading at that moment.
        """
        self._counter += 1
        stem = f"{self._counter:02d}-{name}"
        stdout_path = self.workdir / f"{stem}.out"
        stderr_path = self.workdir / f"{stem}.err"
        child_env = dict(os.environ)
        # Children import the benchmarks package from the checkout, whatever the caller's cwd.
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p
        )
        child_env.update(env or {})
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=ROOT,
                env=child_env,
                start_new_session=True,
            )
        child = Child(process, name, stdout_path, stderr_path)
        self.children.append(child)
        _live_groups.add(child.pid)
        return child

    async def wait(self, child: Child, timeout: float) -> int:
        """Wait for ``child`` to exit; kill it and raise if it takes longer than ``timeout``."""
        try:
            code = await asyncio.wait_for(child.process.wait(), timeout)
        except TimeoutError:
            await self.stop(child)
            raise ChildFailed(
                f"{child.name} did not finish within {timeout:g} s\n{child.tail()}"
            ) from None
        _live_groups.discard(child.pid)
        return code

    async def stop(self, child: Child, grace: float = 5.0) -> int | None:
        """SIGTERM the child's group, then SIGKILL what is left after ``grace`` seconds."""
        if child.process.returncode is None:
            _signal_group(child.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace)
            except TimeoutError:
                _signal_group(child.pid, signal.SIGKILL)
                await child.process.wait()
        # Stray grandchildren (none expected) go with the group.
        _signal_group(child.pid, signal.SIGKILL)
        _live_groups.discard(child.pid)
        return child.process.returncode

    async def run_child(
        self,
        target: str,
        kwargs: Mapping[str, Any],
        *,
        loop: str = "asyncio",
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run ``module:function(**kwargs)`` in a fresh interpreter; return its JSON result.

        A fresh process per measurement: every system gets the same clean interpreter, one
        system's imports or event loop policy cannot leak into another's numbers, and a
        crash stays contained.
        """
        spec = json.dumps({"target": target, "kwargs": dict(kwargs), "loop": loop})
        name = target.rsplit(":", 1)[-1]
        child = await self.spawn(name, [PYTHON, "-m", "benchmarks.child", spec], env)
        code = await self.wait(child, timeout)
        if code != 0:
            raise ChildFailed(f"{name} exited with {code}\n{child.tail()}")
        return child.result()

    async def close(self) -> None:
        """Stop every child still running and drop every database; safe to call twice."""
        for child in self.children:
            with contextlib.suppress(Exception):
                await self.stop(child, grace=3.0)
        self.children.clear()
        await self.drop_databases()
        if not self.keep_logs:
            for path in self.workdir.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.workdir.rmdir()


# ------------------------------------------------------------------------------- latencies


def read_marks(path: Path) -> dict[int, float]:
    """``seq -> perf_counter`` of every ``handle()`` start written to ``path`` so far."""
    marks: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            seq, _, stamp = line.partition(" ")
            if stamp:
                marks.setdefault(int(seq), float(stamp))
    return marks


async def wait_for_mark(path: Path, seq: int, timeout: float) -> float | None:
    """Poll ``path`` until job ``seq`` has written its mark; its timestamp or None."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        mark = read_marks(path).get(seq)
        if mark is not None:
            return mark
        # 2 ms polls: fine-grained enough for 1 ms-scale latencies while costing little CPU;
        # the poll only decides when the *next* sample starts, never a measured timestamp.
        await asyncio.sleep(0.002)
    return None


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples_ms, 50),
        "p99_ms": percentile(samples_ms, 99),
        "max_ms": max(samples_ms, default=math.nan),
        "min_ms": min(samples_ms, default=math.nan),
        "samples": len(samples_ms),
    }


Send = Callable[[int], Awaitable[tuple[float, float]]]
"""Dispatches job ``seq`` in a transaction of its own; returns perf_counter() just before
the COMMIT was sent and just after it returned."""


async def sample_latency(
    send: Send, marks: Path, worker: Child, *, samples: int, max_gap: float, seed: int = 7
) -> dict[str, Any]:
    """Commit-to-``handle()`` latency of an idle ``worker``, one job at a time.

    A warm-up job first proves the worker is up, connected and listening. Each sample then
    waits a random 10 ms..``max_gap`` (so the worker is idle and, when polling, the dispatch
    lands at a random phase of the poll cycle), dispatches, and waits for the job's mark.

    Latency counts from the instant the COMMIT *returned* to the dispatcher. On a loaded
    machine the dispatcher can be descheduled right after its commit while the worker runs,
    so a sample can come out slightly negative; ``commit_ms`` (how long the COMMIT itself
    took) bounds that uncertainty.
    """
    rng = random.Random(seed)
    await send(-1)
    if await wait_for_mark(marks, -1, timeout=60) is None:
        raise ChildFailed(f"{worker.name} never ran the warm-up job\n{worker.tail()}")
    await asyncio.sleep(0.5)
    latencies_ms: list[float] = []
    commits_ms: list[float] = []
    for seq in range(samples):
        await asyncio.sleep(rng.uniform(0.01, max_gap))
        before, committed = await send(seq)
        started = await wait_for_mark(marks, seq, timeout=30)
        if started is None:
            raise ChildFailed(f"{worker.name}: job {seq} never started\n{worker.tail()}")
        latencies_ms.append((started - committed) * 1000)
        commits_ms.append((committed - before) * 1000)
    return {
        **latency_summary(latencies_ms),
        "negative_samples": sum(1 for v in latencies_ms if v < 0),
        "commit_p50_ms": percentile(commits_ms, 50),
        "latencies_ms": latencies_ms,
    }
