"""Chaos: nothing committed is lost, nothing rolled back runs, duplicates only where a worker
was killed, while workers are SIGKILLed over and over and PostgreSQL restarts once.

Real processes on a private PostgreSQL server (it gets restarted): producer processes
dispatch jobs in business transactions (a tenth roll back), four worker processes run them,
and this test is the driver that kills random workers with SIGKILL and starts new ones, and
restarts PostgreSQL once mid-run. Jobs log their start and their effect (end) with their
worker's pid; the driver logs every kill. At the end:

- every committed job's effect happened at least once; no rolled-back job ran at all;
- a job ran more than once only when the worker running it was killed during that run
  (every run but a job's last was cut short by a kill of its worker, after the run started
  and before the next one did);
- ``jobs`` is empty, and ``failed_jobs`` holds exactly the jobs designed to fail;
- the ``failed()`` hook of a failed job ran at most once; exactly once, to its end, unless
  the worker that failed the job was killed (before the hook began, or during it);
- sync jobs (a plain ``def handle``, run in worker threads) are held to all of the above;
- the jobs of a serial key run one at a time, in commit order (every run of one is over
  before the next one's first run starts), and a unique job dispatched twice in its
  transaction is inserted once.

CI runs 3,000 jobs. The full size (20,000 jobs) is one command::

    ROUTEMQ_OUTBOX_CHAOS_JOBS=20000 pytest tests/test_chaos.py

(``ROUTEMQ_OUTBOX_CHAOS_SEED`` picks the kills; the report prints the seed it used.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox.database import create_engine
from routemq_outbox.migrate import upgrade

from . import chaos
from .conftest import ROOT
from .processes import PrivatePostgres, WorkerProcess

# Read at import: the test fixtures clear ROUTEMQ_OUTBOX_* variables from the environment.
JOBS = int(os.environ.get("ROUTEMQ_OUTBOX_CHAOS_JOBS", "3000"))
SEED = int(os.environ.get("ROUTEMQ_OUTBOX_CHAOS_SEED", str(random.randrange(1 << 30))))
WORKERS = 4
PRODUCERS = 2
LEASE = 10  # seconds: long enough that a PostgreSQL restart costs no lease, short enough
#             that a killed worker's jobs come back quickly
KILL_EVERY = (0.4, 1.6)  # seconds between kills, uniformly
SETTLE = 1.0  # seconds a worker works before it may be killed (start-up takes longer)
WORKER_OPTIONS = (
    "--import",
    "tests.chaos",
    "--queue",
    chaos.QUEUE,
    "--concurrency",
    "10",
    "--batch-size",
    "10",
    "--sleep",
    "0.5",
    "--lease",
    str(LEASE),
)


@dataclass
class Run:
    """One attempt of a job as its worker logged it."""

    attempt: int
    pid: int
    started: float
    ended: float | None = None


@dataclass
class Report:
    jobs: int
    seed: int
    committed: int = 0
    rolled_back: int = 0
    ran_once: int = 0
    ran_more: int = 0
    effect_more: int = 0
    kills: int = 0
    kills_mid_job: int = 0
    failed_by_design: int = 0
    sync_jobs: int = 0
    serial_jobs: int = 0
    hooks_ran: int = 0
    hooks_cut: int = 0  # began, and their worker was killed before they ended
    hooks_lost: int = 0  # never began: the worker that failed the job was killed first
    restarts: int = 0
    leases_lost: int = 0  # log lines of live workers finding a job taken over
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"chaos: {self.jobs} jobs (seed {self.seed}) in {self.seconds:.0f} s\n"
            f"  committed {self.committed}, rolled back {self.rolled_back}\n"
            f"  ran once {self.ran_once}, ran twice or more {self.ran_more} "
            f"(effect twice or more {self.effect_more}; jobs designed to fail not counted)\n"
            f"  workers killed {self.kills} ({self.kills_mid_job} with jobs running), "
            f"PostgreSQL restarts {self.restarts}\n"
            f"  failed by design {self.failed_by_design}; failed() hooks ran {self.hooks_ran}, "
            f"cut short by a kill {self.hooks_cut}, lost with their worker {self.hooks_lost}\n"
            f"  sync jobs {self.sync_jobs}, jobs of serial keys {self.serial_jobs}; "
            f"live workers that found a lease taken over: {self.leases_lost}"
        )


@pytest.fixture
def server() -> Iterator[PrivatePostgres]:
    # Four workers of up to ~35 connections each, killed ones lingering a moment, producers.
    server = PrivatePostgres("max_connections=400", "shared_buffers=64MB")
    server.start()
    yield server
    server.close()


class Driver:
    """Starts, kills and restarts the worker processes; remembers every kill."""

    def __init__(self, url: str, log_dir: Path) -> None:
        self.url = url
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self.all: list[WorkerProcess] = []
        self.kills: list[tuple[int, float]] = []  # (pid, when it was dead)
        self.ready: dict[int, float] = {}

    def start(self) -> WorkerProcess:
        worker = WorkerProcess(self.url, *WORKER_OPTIONS, log_dir=self.log_dir)
        self.all.append(worker)
        return worker

    def working_since(self, worker: WorkerProcess) -> float | None:
        """When the worker was first seen working (its start-up line logged), if it is."""
        if worker.pid not in self.ready and "worker started:" in worker.log():
            self.ready[worker.pid] = time.monotonic()
        return self.ready.get(worker.pid)

    def settled(self) -> list[int]:
        """The workers that have been working for a while (start-up takes seconds)."""
        now = time.monotonic()
        return [
            i
            for i, worker in enumerate(self.workers)
            if (since := self.working_since(worker)) is not None and now - since > SETTLE
        ]

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random worker that has been working for a while, and start another;
        only while at most one is starting up, so that the others keep the jobs flowing."""
        settled = self.settled()
        if len(settled) < WORKERS - 1:
            return
        index = rng.choice(settled)
        victim = self.workers[index]
        victim.signal(signal.SIGKILL)
        victim.popen.wait(30)
        self.kills.append((victim.pid, time.time()))
        self.workers[index] = self.start()

    def stop_all(self) -> None:
        """SIGTERM every worker, once it is up: one started by the last kill may still be
        importing, and SIGTERM would then end it before its handler for it is in place."""
        deadline = time.monotonic() + 120
        for worker in self.workers:
            while self.working_since(worker) is None and worker.popen.poll() is None:
                assert time.monotonic() < deadline, f"worker never started:\n{worker.log()}"
                time.sleep(0.1)
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            assert worker.wait(120) == 0, worker.log()

    def cleanup(self) -> None:
        for worker in self.all:
            worker.kill()


async def scalar(engine: AsyncEngine, query: str) -> int:
    """One number, or -1 while the database is away."""
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text(query))).scalar_one())
    except (sa.exc.DBAPIError, OSError):
        return -1


def start_producers(url: str, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.chaos", url, str(i), str(PRODUCERS), str(JOBS)],
            cwd=ROOT,
            env={**os.environ, "ROUTEMQ_OUTBOX_DATABASE_URL": url},
            stdout=(log_dir / f"producer-{i}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(PRODUCERS)
    ]


@pytest.mark.slow
@pytest.mark.timeout(max(600, JOBS // 10))
async def test_chaos(
    server: PrivatePostgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    url = server.url()
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url, pool_pre_ping=True)
    async with engine.begin() as conn:
        for statement in chaos.TABLES:
            await conn.execute(sa.text(statement))

    driver = Driver(url, tmp_path)
    report = Report(JOBS, SEED)
    producers = start_producers(url, tmp_path)
    try:
        driver.workers = [driver.start() for _ in range(WORKERS)]
        # Kill and restart workers for as long as the producers run; restart PostgreSQL once,
        # when about half of the orders are in.
        while any(p.poll() is None for p in producers):
            await asyncio.sleep(rng.uniform(*KILL_EVERY))
            driver.kill_one(rng)
            if (
                not report.restarts
                and len(driver.settled()) >= WORKERS - 1
                and await scalar(engine, ORDERS) >= JOBS * 0.9 / 2
            ):
                await asyncio.to_thread(server.restart)
                report.restarts += 1
        if not report.restarts:  # the producers were quicker than expected
            await asyncio.to_thread(server.restart)
            report.restarts += 1
        for i, producer in enumerate(producers):
            output = (tmp_path / f"producer-{i}.log").read_text()
            assert producer.wait() == 0, output

        # The killing is over: the killed workers' jobs come back after their lease.
        deadline = time.monotonic() + LEASE * 6 + JOBS / 20
        while await scalar(engine, "SELECT count(*) FROM jobs") != 0:
            assert time.monotonic() < deadline, "jobs left over:\n" + driver.workers[0].log()
            await asyncio.sleep(0.5)
        driver.stop_all()
    finally:
        for producer in producers:
            if producer.poll() is None:
                producer.kill()
        driver.cleanup()

    report.kills = len(driver.kills)
    killed = dict(driver.kills)
    report.leases_lost = sum(
        worker.log().count("taken over") for worker in driver.all if worker.pid not in killed
    )
    report.seconds = time.monotonic() - started
    try:
        await check(engine, driver.kills, report)
        # Only killed workers lose jobs: a live one never logs that its job was taken over.
        assert report.leases_lost == 0, "a live worker lost a lease"
        # The faults really happened: workers died with jobs in hand, and the server restarted.
        assert report.kills_mid_job > 0, "no worker was killed while running a job"
        assert report.restarts == 1, "PostgreSQL was not restarted"
        assert report.sync_jobs > 0, "no sync job ran"
        assert report.serial_jobs > 0, "no job of a serial key ran"
        assert report.hooks_ran > 0, "no failed() hook ran"
    finally:
        await engine.dispose()
        with capsys.disabled():
            print("\n" + str(report))


ORDERS = "SELECT count(*) FROM chaos_orders"


async def check(engine: AsyncEngine, kills: list[tuple[int, float]], report: Report) -> None:
    async with engine.connect() as conn:
        orders = set((await conn.execute(sa.text("SELECT key FROM chaos_orders"))).scalars())
        log = (
            await conn.execute(sa.text("SELECT key, event, attempt, pid, at FROM chaos_log"))
        ).all()
        left = int((await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one())
        failed = (
            await conn.execute(
                sa.text("SELECT CAST(payload AS TEXT), exception, attempts FROM failed_jobs")
            )
        ).all()

    should_commit = {k for k in range(JOBS) if not chaos.rolled_back(k)}
    report.committed, report.rolled_back = len(orders), JOBS - len(orders)
    assert orders == should_commit, "the business transactions did not commit as designed"
    assert left == 0, f"{left} jobs left in the jobs table"

    hooks = [tuple(row) for row in log if row.event in ("hook", "hooked")]
    log = [row for row in log if row.event in ("start", "end")]
    runs: dict[int, dict[tuple[int, int], Run]] = defaultdict(dict)
    for key, event, attempt, pid, at in sorted(log, key=lambda row: row.event != "start"):
        if event == "start":
            runs[key][(attempt, pid)] = Run(attempt, pid, at)
        else:
            runs[key][(attempt, pid)].ended = at

    # No rolled-back job ran; every committed job's effect happened.
    ran_rolled_back = sorted(set(runs) - orders)
    assert not ran_rolled_back, f"rolled-back jobs ran: {ran_rolled_back[:20]}"
    no_effect = sorted(k for k in orders if not any(r.ended for r in runs[k].values()))
    assert not no_effect, f"committed jobs whose effect never happened: {no_effect[:20]}"

    # Every run but a job's last was cut short by a kill of its worker during that run (or,
    # for a job designed to fail, ended in its designed failure and was retried).
    killed_at: dict[int, float] = dict(kills)
    assert len(killed_at) == len(kills), "a pid was killed twice?"
    unexplained: list[str] = []
    interrupted: set[int] = set()
    for key in sorted(orders):
        ordered = sorted(runs[key].values(), key=lambda r: r.started)
        for run, after in itertools.pairwise(ordered):
            death = killed_at.get(run.pid)
            if death is not None and run.started <= death <= after.started:
                interrupted.add(run.pid)
            elif not (chaos.doomed(key) and run.ended):
                unexplained.append(f"job {key}: {run} then {after}")
        if chaos.doomed(key):
            continue
        assert ordered[-1].ended, f"job {key}: its last run did not finish: {ordered}"
        report.sync_jobs += chaos.sync(key)
        if len(ordered) > 1:
            report.ran_more += 1
        else:
            report.ran_once += 1
        if sum(1 for r in ordered if r.ended) > 1:
            report.effect_more += 1
    assert not unexplained, "runs repeated without a kill:\n" + "\n".join(unexplained[:20])
    report.kills_mid_job = len(interrupted)

    # The jobs of a serial key ran one at a time, in the order they were committed: every
    # run of one (killed or not) is over before the next one's first run starts.
    serial: dict[str, list[int]] = defaultdict(list)
    for key in sorted(orders):
        name = chaos.serial_key(key, PRODUCERS)
        if name is not None:
            serial[name].append(key)
    for name, keys in serial.items():
        for earlier, later in itertools.pairwise(keys):
            last = max(max(r.started, r.ended or r.started) for r in runs[earlier].values())
            first = min(r.started for r in runs[later].values())
            assert last < first, f"serial key {name}: job {later} started before {earlier} ended"
        report.serial_jobs += len(keys)

    # failed_jobs holds exactly the jobs designed to fail, each once.
    doomed = sorted(k for k in orders if chaos.doomed(k))
    failed_keys = sorted(json.loads(payload)["data"]["key"] for payload, _, _ in failed)
    report.failed_by_design = len(failed_keys)
    assert failed_keys == doomed, "failed_jobs does not hold exactly the jobs designed to fail"
    for _, exception, attempts in failed:
        assert attempts <= chaos.DOOMED_TRIES
        assert "is designed to fail" in exception or exception.startswith(
            "routemq_outbox.errors.LeaseExpired"  # killed during its last attempt
        ), exception
    exceptions = {json.loads(payload)["data"]["key"]: exception for payload, exception, _ in failed}
    check_hooks(exceptions, runs, hooks, killed_at, report)


def check_hooks(
    exceptions: dict[int, str],
    runs: dict[int, dict[tuple[int, int], Run]],
    hooks: list[tuple[Any, ...]],
    killed_at: dict[int, float],
    report: Report,
) -> None:
    """The ``failed()`` hook of each failed job (``exceptions``: the failed jobs, with the
    text stored) ran at most once, and exactly once, to its end, unless a kill explains it."""
    began: dict[int, set[tuple[int, int]]] = defaultdict(set)  # job -> (pid, call) of hooks
    ended: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for key, event, call, pid, _ in hooks:
        (began if event == "hook" else ended)[key].add((pid, call))
    assert set(began) <= set(exceptions), "a hook ran for a job that did not fail"
    for key, exception in sorted(exceptions.items()):
        assert len(began[key]) <= 1, f"job {key}: its hook ran {len(began[key])} times"
        assert ended[key] <= began[key], f"job {key}: its hook ended without beginning"
        for pid, _ in began[key] - ended[key]:
            assert pid in killed_at, f"job {key}: its hook never ended in live worker {pid}"
            report.hooks_cut += 1
        report.hooks_ran += len(ended[key])
        if began[key]:
            continue
        # Never began: the worker that moved the job to failed_jobs died first. That is the
        # worker of its last run when that run failed as designed; else (LeaseExpired) one
        # that took the job over later.
        last = max(runs[key].values(), key=lambda run: run.started)
        if "is designed to fail" in exception:
            assert last.pid in killed_at, f"job {key}: worker {last.pid} ran no hook"
        else:
            assert any(at >= last.started for at in killed_at.values()), f"job {key}: no hook"
        report.hooks_lost += 1
