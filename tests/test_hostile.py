"""Hostile input is contained: payloads naming code, oversized payloads, queue names made of
SQL, jobs that block the event loop, and jobs that raise BaseException.

Each test here fails if the protection it covers is removed (see the notes on each).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, WorkerSettings, dispatch, dispatch_sync, queue
from routemq_outbox.errors import (
    ConfigurationError,
    InvalidQueueName,
    PayloadTooLarge,
    UnknownJob,
    UnserializableJob,
)
from routemq_outbox.job import instantiate
from routemq_outbox.schema import failed_jobs, jobs

from . import jobs as test_jobs
from .processes import SpawnWorker, wait_until
from .test_worker import count, eventually, failed_rows, log_rows, record, wait_exit

# ----------------------------------------------------------------------------- code by name
#
# Protection: ``job.instantiate`` looks job names up in the registry of imported Job classes
# and nothing else. A resolver that imported ``module.attribute`` (as pickle and many task
# queues do) would import tests.canary and leave its marker, or run the callables below.

CANARY_ENV = "ROUTEMQ_OUTBOX_TEST_CANARY"


def hostile_payloads(marker: Path) -> list[tuple[str, dict[str, object]]]:
    """Job names that are importable callables, with data that would leave a mark if run."""
    touched = str(marker) + ".ran"
    return [
        ("os.system", {"command": f"touch {touched}-os-system"}),
        ("posix.system", {"command": f"touch {touched}-posix-system"}),
        ("builtins.eval", {"source": f"open({touched + '-eval'!r}, 'w')"}),
        ("builtins.exec", {"source": f"open({touched + '-exec'!r}, 'w')"}),
        ("subprocess.run", {"args": ["touch", f"{touched}-subprocess"]}),
        ("subprocess.Popen", {"args": ["touch", f"{touched}-popen"]}),
        ("importlib.import_module", {"name": "tests.canary"}),
        ("builtins.__import__", {"name": "tests.canary"}),
        ("tests.canary.touch", {}),
        ("tests.canary:touch", {}),
        ("tests.canary.Canary", {}),  # a real Job class, in a module nobody imported
        ("tests.jobs.Record", {"key": "by-class-path"}),  # imported, but not by that name
        ("__main__.Record", {}),
    ]


def marks(marker: Path) -> list[str]:
    return sorted(p.name for p in marker.parent.iterdir() if p.name.startswith(marker.name))


def test_instantiate_never_imports_what_a_payload_names(tmp_path: Path) -> None:
    """In this process: every name is unknown, and tests.canary stays unimported."""
    assert "tests.canary" not in sys.modules
    for name, data in hostile_payloads(tmp_path / "mark"):
        with pytest.raises(UnknownJob, match=f"unknown job {name!r}"):
            instantiate(name, data, "default")
    assert "tests.canary" not in sys.modules
    assert marks(tmp_path / "mark") == []


async def test_payloads_naming_importable_callables_fail_as_unknown_and_never_run(
    db_url: str, engine: AsyncEngine, log_table: None, spawn: SpawnWorker, tmp_path: Path
) -> None:
    marker = tmp_path / "canary"
    payloads = hostile_payloads(marker)
    async with engine.begin() as conn:
        for name, data in payloads:
            document = json.dumps({"job": name, "data": data})
            await conn.execute(sa.insert(jobs).values(queue="default", payload=document))
    await dispatch(record("after the hostile rows"))

    worker = spawn(db_url, "--stop-when-empty", "--sleep", "0.1", env={CANARY_ENV: str(marker)})
    assert await wait_exit(worker, 60) == 0, worker.log()

    assert marks(marker) == [], "a payload made the worker import or run something"
    failed = await failed_rows(engine)
    assert sorted(json.loads(row.payload)["job"] for row in failed) == sorted(
        name for name, _ in payloads
    )
    for row in failed:
        name = json.loads(row.payload)["job"]
        assert row.exception.startswith(
            f"routemq_outbox.errors.UnknownJob: unknown job {name!r}: no Job subclass"
        ), row.exception
        assert row.attempts == 1  # failed once, never retried
    assert [r.job_key for r in await log_rows(engine)] == ["after the hostile rows"]
    assert await count(engine, jobs) == 0
    assert "moved to failed_jobs" in worker.log()


# ----------------------------------------------------------------------------- payload size
#
# Protection: the size check in ``job.encode_payload``, before any SQL is sent.

LIMIT_ENV = "ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES"


class Blob(Job):
    job_name = "tests.blob"

    def __init__(self, blob: str = "") -> None:
        super().__init__()
        self.blob = blob


def blob_of(size: int, filler: str = "x") -> Blob:
    """A job whose payload is exactly ``size`` bytes of UTF-8 (``filler`` of 1 or 2 bytes)."""
    overhead = len(json.dumps({"job": Blob.job_name, "data": {"blob": ""}}, separators=(",", ":")))
    width = len(filler.encode())
    assert (size - overhead) % width == 0
    return Blob(filler * ((size - overhead) // width))


async def test_oversized_payload_is_refused_before_anything_is_sent(
    db_url: str, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIMIT_ENV, "1000")
    await dispatch(blob_of(1000))  # exactly the limit: accepted
    message = (
        r"Blob: payload is 1002 bytes; the limit is 1000 \(ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES\)\. "
        r"Store large data elsewhere and pass its id"
    )
    with pytest.raises(PayloadTooLarge, match=message):
        await dispatch(blob_of(1002))
    with pytest.raises(PayloadTooLarge, match="payload is 1001 bytes"):
        await dispatch(blob_of(1001, filler="é"))  # bytes of UTF-8, not characters
    with pytest.raises(PayloadTooLarge):
        await queue.bulk([blob_of(10), blob_of(20), blob_of(1002), blob_of(30)])  # all or none
    with pytest.raises(PayloadTooLarge):
        dispatch_sync(blob_of(1002))

    # Refused before any SQL: the caller's transaction is intact and can still commit (on
    # PostgreSQL a statement that failed in the database would have aborted it).
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
    async with engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (1)"))
        with pytest.raises(PayloadTooLarge):
            await dispatch(blob_of(5000), session=conn)
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (2)"))
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one() == 2
    assert await count(engine, jobs) == 1


async def test_the_default_limit_is_one_mebibyte_and_the_setting_is_checked(
    db_url: str, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PayloadTooLarge, match="the limit is 1048576"):
        await dispatch(blob_of(1024 * 1024 + 2))
    await dispatch(blob_of(1024 * 1024))
    assert await count(engine, jobs) == 1
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(LIMIT_ENV, bad)
        with pytest.raises(ConfigurationError, match=f"must be a positive integer, got {bad!r}"):
            await dispatch(blob_of(100))


# ----------------------------------------------------------------------------- queue names
#
# Protection: every statement is parameterised (sql.py never formats a value into SQL), and
# queue names are compared with ``=``, never LIKE. A statement built by string formatting
# breaks on the quotes below, or worse runs them.

HOSTILE_QUEUES = [
    "x'; DROP TABLE jobs; --",
    'x"); DROP TABLE failed_jobs; --',
    "'; DELETE FROM jobs WHERE ''='",
    "semi;colon;",
    'it\'s "quoted" `twice`',
    "back\\slash\\'",
    "ünïcödé 日本語 🚀 émoji",
    "%",
    "_",
    "a%",
    ":name $1 %(x)s ? @p",
    "tab\tand\nnewline",
    "\U0001d4b3" * 255,  # 255 characters of 4 bytes each (MATHEMATICAL SCRIPT CAPITAL X)
]


def decoys(name: str) -> set[str]:
    """Near misses that must not match ``name``: case, accents, prefixes, suffixes. (Padding
    with whitespace is refused at dispatch: MySQL would ignore trailing spaces.)"""
    near = {name.upper(), name.lower(), name + "_", "x", "a", "ünicode"}
    near |= {name[:-1]} if len(name) > 1 else set()
    return {d for d in near if d and d != name and d not in HOSTILE_QUEUES and len(d) <= 255}


async def stored_queues(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(jobs.c.queue).order_by(jobs.c.id))).scalars())


async def test_queue_names_with_quotes_sql_and_unicode_are_stored_and_matched_verbatim(
    db_url: str, engine: AsyncEngine, sync_engine: sa.Engine, log_table: None, spawn: SpawnWorker
) -> None:
    all_decoys = sorted(set().union(*(decoys(name) for name in HOSTILE_QUEUES)))
    for index, name in enumerate(HOSTILE_QUEUES):
        await queue.push(record(f"hostile-{index}"), queue=name)
    for decoy in all_decoys:
        await queue.push(record(f"decoy-{decoy}"), queue=decoy)

    assert await stored_queues(engine) == HOSTILE_QUEUES + all_decoys
    for name in HOSTILE_QUEUES:
        assert await queue.size(name) == 1, repr(name)
    with sync_engine.connect() as conn:
        assert queue.size_sync(HOSTILE_QUEUES[0], session=conn) == 1

    # A worker serving exactly these queues (through its command line) runs exactly their jobs.
    arguments = [arg for name in HOSTILE_QUEUES for arg in ("--queue", name)]
    worker = spawn(db_url, *arguments, "--stop-when-empty", "--sleep", "0.1")
    assert await wait_exit(worker, 60) == 0, worker.log()
    ran = sorted(r.job_key for r in await log_rows(engine))
    assert ran == sorted(f"hostile-{i}" for i in range(len(HOSTILE_QUEUES)))
    assert await stored_queues(engine) == all_decoys  # untouched, and the tables still exist
    for decoy in all_decoys:
        assert await queue.size(decoy) == 1, repr(decoy)
    assert await count(engine, failed_jobs) == 0


async def test_a_queue_name_with_nul_is_refused_everywhere(
    db_url: str, engine: AsyncEngine
) -> None:
    """PostgreSQL cannot store NUL in text: refused up front on every engine, with a clear
    error, instead of a driver error (or a worker retrying a failing claim forever)."""
    name = "before\x00after"
    with pytest.raises(InvalidQueueName, match="contains a NUL character"):
        await queue.push(record("nul"), queue=name)
    with pytest.raises(InvalidQueueName, match="contains a NUL character"):
        await queue.size(name)
    with pytest.raises(InvalidQueueName, match="contains a NUL character"):
        WorkerSettings(database_url=db_url, queues=(name,))
    assert await count(engine, jobs) == 0


async def test_an_attribute_holding_nul_is_refused_at_dispatch_on_every_engine(
    db_url: str, engine: AsyncEngine
) -> None:
    job = record("fine")
    job.note = {"deep": ["ok", "nul\x00here"]}  # type: ignore[attr-defined]
    with pytest.raises(
        UnserializableJob,
        match=r"attribute 'note' at note\['deep'\]\[1\] holds a NUL character",
    ):
        await dispatch(job)
    assert await count(engine, jobs) == 0
    job.note = "a literal \\u0000 is fine"  # type: ignore[attr-defined]
    await dispatch(job)
    assert await count(engine, jobs) == 1


# ----------------------------------------------------------------------------- blocking jobs
#
# Protection: leases. A job that blocks its worker's event loop stops that worker's
# heartbeats; another worker sees the lease run out and takes the job over (fenced by a new
# token), so the job still completes. Without the rescue, the second worker never runs it.


def blocking(cls: type[test_jobs.BlocksTheLoop | test_jobs.BlocksAThread], release: Path) -> Job:
    job = cls()
    job.key, job.release = "blocker", str(release)
    return job


async def test_a_job_blocking_the_event_loop_is_taken_over_when_its_lease_runs_out(
    db_url: str, engine: AsyncEngine, log_table: None, spawn: SpawnWorker, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    await dispatch(blocking(test_jobs.BlocksTheLoop, release))
    stuck = spawn(db_url, "--lease", "2", "--sleep", "0.1")
    await eventually(engine, "SELECT count(*) FROM job_log WHERE event = 'start'", 1, 60)

    rescuer = spawn(db_url, "--lease", "2", "--sleep", "0.1")
    await eventually(engine, "SELECT count(*) FROM job_log WHERE event = 'end'", 1, 90)
    release.touch()  # let the stuck worker's loop go: its late writes must change nothing
    await eventually(engine, "SELECT count(*) FROM job_log WHERE event = 'end'", 2, 90)
    await eventually(engine, "SELECT 1 - count(*) FROM jobs", 1, 30)
    for worker in (stuck, rescuer):
        worker.signal(signal.SIGTERM)
        assert await wait_exit(worker, 60) == 0, worker.log()

    events = [(r.event, r.attempt, r.pid) for r in await log_rows(engine)]
    assert events == [
        ("start", 1, stuck.pid),
        ("start", 2, rescuer.pid),
        ("end", 2, rescuer.pid),
        ("end", 1, stuck.pid),  # it ran twice: the price of blocking the loop
    ]
    assert await count(engine, jobs) == 0
    assert await count(engine, failed_jobs) == 0
    assert "left by a worker that stopped heartbeating; back to pending" in rescuer.log()
    assert "had been taken over after their lease expired; they may run twice" in stuck.log()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_blocking_def_handle_keeps_its_lease(
    db_url: str, engine: AsyncEngine, log_table: None, spawn: SpawnWorker, tmp_path: Path
) -> None:
    """The advice the README gives: a plain ``def handle`` blocks a thread, not the loop."""
    release = tmp_path / "release"
    await dispatch(blocking(test_jobs.BlocksAThread, release))
    first = spawn(db_url, "--lease", "3", "--sleep", "0.1")
    await eventually(engine, "SELECT count(*) FROM job_log WHERE event = 'start'", 1, 60)
    second = spawn(db_url, "--lease", "3", "--sleep", "0.1")
    # A rival that is up and polling, ready to take over a lease that runs out.
    await asyncio.to_thread(wait_until, lambda: "worker started:" in second.log(), 60, "rival")
    # Three leases' worth of blocking: heartbeats go on from the event loop meanwhile.
    await asyncio.sleep(9)
    release.touch()
    await eventually(engine, "SELECT count(*) FROM job_log WHERE event = 'end'", 1, 60)
    await eventually(engine, "SELECT 1 - count(*) FROM jobs", 1, 30)
    for worker in (first, second):
        worker.signal(signal.SIGTERM)
        assert await wait_exit(worker, 60) == 0, worker.log()
    events = [(r.event, r.attempt, r.pid) for r in await log_rows(engine)]
    assert events == [("start", 1, first.pid), ("end", 1, first.pid)]


# ----------------------------------------------------------------------------- BaseException
#
# Protection: ``execution.run`` catches BaseException from job code (telling a CancelledError
# the job raised from the worker cancelling it at shutdown), and the worker does the same
# around ``failed()``. Without it, KeyboardInterrupt or SystemExit escapes into the event loop
# and the worker process dies; a job's own CancelledError would pass for a shutdown.


async def test_jobs_raising_base_exceptions_fail_their_attempts_and_the_worker_goes_on(
    db_url: str, engine: AsyncEngine, log_table: None, spawn: SpawnWorker
) -> None:
    batch: list[Job] = []
    for kind in test_jobs.BASE_EXCEPTIONS:
        for cls in (test_jobs.RaisesBaseException, test_jobs.SyncRaisesBaseException):
            job = cls()
            job.key, job.kind = f"{cls.__name__}-{kind}", kind
            batch.append(job)
        hook = test_jobs.FailedHookRaises()
        hook.key, hook.kind = f"hook-{kind}", kind
        batch.append(hook)
    await queue.bulk(batch)
    worker = spawn(db_url, "--stop-when-empty", "--sleep", "0.1", "--concurrency", "4")
    assert await wait_exit(worker, 90) == 0, worker.log()
    await dispatch(record("after"))  # and a later worker is no different
    worker = spawn(db_url, "--stop-when-empty", "--sleep", "0.1")
    assert await wait_exit(worker, 60) == 0, worker.log()

    failed = {json.loads(r.payload)["data"]["key"]: r for r in await failed_rows(engine)}
    qualified = {
        "KeyboardInterrupt": "KeyboardInterrupt",
        "SystemExit": "SystemExit",
        "CancelledError": "asyncio.exceptions.CancelledError",
        "GeneratorExit": "GeneratorExit",
        "Halt": "tests.jobs.Halt",
    }
    assert len(failed) == len(batch)
    for kind, name in qualified.items():
        for prefix, attempts in (("RaisesBaseException", 2), ("SyncRaisesBaseException", 2)):
            row = failed[f"{prefix}-{kind}"]
            assert row.attempts == attempts  # a failed attempt, retried, then failed_jobs
            assert row.exception.startswith(f"{name}: raised "), row.exception
        assert failed[f"hook-{kind}"].exception.startswith("ValueError: hook-")
    events = sorted((r.job_key, r.event, r.attempt) for r in await log_rows(engine))
    for kind in qualified:
        key = f"RaisesBaseException-{kind}"
        assert [e for e in events if e[0] == key] == [
            (key, "failed", 2),
            (key, "ran", 1),
            (key, "ran", 2),
        ]
        assert (f"hook-{kind}", "failed", 1) in events
    assert ("after", "ran", 1) in events
    assert await count(engine, jobs) == 0


async def test_a_job_whose_attempt_ends_without_an_outcome_is_left_to_its_lease(
    db_url: str, engine: AsyncEngine, log_table: None, spawn: SpawnWorker
) -> None:
    """The worker's last line of defence: when processing a job fails in a way nothing caught
    (here, asyncio throwing GeneratorExit past run()), the worker stops renewing that job's
    lease instead of holding it for as long as it lives; the rescue then retries it and, with
    its attempts spent, fails it. Never held forever, never lost."""
    job = test_jobs.AwaitsAPoisonedFuture()
    job.key = "poisoned"
    await dispatch(job)
    worker = spawn(db_url, "--lease", "1", "--sleep", "0.1")
    await eventually(engine, "SELECT count(*) FROM failed_jobs", 1, 60)
    await dispatch(record("after"))
    await eventually(engine, "SELECT count(*) FROM job_log WHERE job_key = 'after'", 1, 30)
    worker.signal(signal.SIGTERM)
    assert await wait_exit(worker, 30) == 0, worker.log()
    (failed,) = await failed_rows(engine)
    assert failed.exception.startswith("routemq_outbox.errors.LeaseExpired: "), failed.exception
    assert failed.attempts == 2
    runs = [(r.job_key, r.attempt) for r in await log_rows(engine) if r.job_key == "poisoned"]
    assert runs == [("poisoned", 1), ("poisoned", 2)]
    assert "is left to its lease (1 s): it will run again or fail then" in worker.log()
    assert await count(engine, jobs) == 0
