"""The operator commands, through typer's test runner, on PostgreSQL and SQLite.

Each test seeds a fresh migrated database with plain SQL, runs commands the way an operator
types them, and checks both what they print and what the tables hold afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from routemq_outbox import FailJob, Job, admin, queue
from routemq_outbox.cli import app
from routemq_outbox.database import create_engine, create_sync_engine
from routemq_outbox.migrate import VERSION_TABLE, head_revision, revisions
from routemq_outbox.schema import db_now, db_now_plus, failed_jobs, jobs
from routemq_outbox.sql import family

from . import jobs as test_jobs
from .conftest import BACKENDS, EMPTY_DB_URL_FIXTURES, free_port, run_cli


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def ok(*args: str, input: str | None = None) -> Result:
    result = cli(*args, input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def refused(code: int, *args: str, input: str | None = None) -> Result:
    result = cli(*args, input=input)
    assert result.exit_code == code, (result.output, result.exception)
    assert result.stdout == "" or "?" in result.stdout  # only a confirmation prompt, if any
    return result


# ----------------------------------------------------------------------------- seeding


def record(key: str) -> test_jobs.Record:
    job = test_jobs.Record()
    job.key = key
    return job


def add_jobs(engine: sa.Engine, keys: list[str], queue_name: str = "default", **kw: float) -> None:
    """Dispatch Record jobs; ``due_ago`` makes them due that many seconds ago (so that even
    SQLite's one-second CURRENT_TIMESTAMP sees them due), ``delay`` delays them."""
    with engine.begin() as conn:
        if "delay" in kw:
            queue.bulk_sync(
                [record(k) for k in keys], queue=queue_name, delay=kw["delay"], session=conn
            )
            return
        first = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(jobs.c.id), 0)))
        queue.bulk_sync([record(k) for k in keys], queue=queue_name, session=conn)
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id > first)
            .values(available_at=db_now_plus(sa.literal(-kw.get("due_ago", 10.0))))
        )


def reserve(engine: sa.Engine, queue_name: str, count: int) -> None:
    """Mark ``count`` waiting jobs of the queue as held by a worker."""
    with engine.begin() as conn:
        ids = conn.scalars(
            sa.select(jobs.c.id)
            .where(jobs.c.queue == queue_name, jobs.c.reserved_at.is_(None))
            .order_by(jobs.c.id)
            .limit(count)
        ).all()
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(ids))
            .values(
                reserved_at=db_now(),
                token=42,
                lease_expires_at=db_now_plus(sa.literal(60.0)),
                attempts=jobs.c.attempts + 1,
            )
        )


def add_failed(
    engine: sa.Engine,
    queue_name: str = "default",
    *,
    count: int = 1,
    ago: float = 0.0,
    key: str = "f",
    error: str = "ValueError: boom",
) -> list[int]:
    """Insert failed jobs that failed ``ago`` seconds ago; returns their ids."""
    ids = []
    with engine.begin() as conn:
        for i in range(count):
            payload = json.dumps({"job": "tests.record", "data": {"key": f"{key}-{i}"}})
            ids.append(
                conn.execute(
                    sa.insert(failed_jobs)
                    .values(
                        uuid=str(uuid.uuid4()),
                        connection="default",
                        queue=queue_name,
                        payload=payload,
                        exception=f"{error}\n\nTraceback (most recent call last):\n"
                        f'  File "app.py", line 1, in handle\n{error}',
                        attempts=3,
                        job_id=1000 + i,
                        failed_at=db_now_plus(sa.literal(-float(ago))),
                    )
                    .returning(failed_jobs.c.id)
                ).scalar_one()
            )
    return ids


def job_rows(engine: sa.Engine) -> list[sa.Row[tuple[object, ...]]]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(
                    jobs.c.id,
                    jobs.c.queue,
                    sa.cast(jobs.c.payload, sa.Text).label("payload"),
                    jobs.c.attempts,
                    jobs.c.reserved_at,
                    (jobs.c.available_at <= db_now()).label("due"),
                ).order_by(jobs.c.id)
            )
        )


def failed_ids(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(failed_jobs.c.id).order_by(failed_jobs.c.id)))


def keys_of(rows: list[sa.Row[tuple[object, ...]]]) -> list[str]:
    return [json.loads(str(row.payload))["data"]["key"] for row in rows]


# ----------------------------------------------------------------------------- stats, size


def test_stats_counts_every_queue(db_url: str, sync_engine: sa.Engine) -> None:
    assert ok("stats").stdout == "no jobs and no failed jobs\n"
    assert json.loads(ok("stats", "--json").stdout) == {"queues": []}

    add_jobs(sync_engine, ["a", "b", "c"], due_ago=3700)
    add_jobs(sync_engine, ["d"], delay=3600)
    reserve(sync_engine, "default", 1)
    add_jobs(sync_engine, ["e"], "emails", due_ago=30)
    add_failed(sync_engine, "reports", count=2)

    doc = json.loads(ok("stats", "--json").stdout)
    by_queue = {row["queue"]: row for row in doc["queues"]}
    assert list(by_queue) == ["default", "emails", "reports"]
    default = by_queue["default"]
    assert (default["pending"], default["delayed"], default["reserved"], default["failed"]) == (
        2,
        1,
        1,
        0,
    )
    assert 3699 <= default["oldest_due_age_seconds"] < 3800
    assert 29 <= by_queue["emails"]["oldest_due_age_seconds"] < 120
    assert by_queue["reports"] == {
        "queue": "reports",
        "pending": 0,
        "delayed": 0,
        "reserved": 0,
        "failed": 2,
        "oldest_due_age_seconds": None,
        "paused": False,
    }

    table = ok("stats").stdout.splitlines()
    assert re.split(r"\s{2,}", table[0]) == [
        "QUEUE",
        "PENDING",
        "DELAYED",
        "RESERVED",
        "FAILED",
        "OLDEST DUE",
    ]
    assert table[1].split() == ["default", "2", "1", "1", "0", "1h", "01m"]
    assert table[3].split() == ["reports", "0", "0", "0", "2", "-"]

    only = json.loads(ok("stats", "--queue", "emails", "--json").stdout)
    assert [row["queue"] for row in only["queues"]] == ["emails"]

    ok("pause", "reports")
    assert ok("stats").stdout.splitlines()[3].split() == [
        "reports",
        "(paused)",
        "0",
        "0",
        "0",
        "2",
        "-",
    ]
    paused = {
        row["queue"]: row["paused"] for row in json.loads(ok("stats", "--json").stdout)["queues"]
    }
    assert paused == {"default": False, "emails": False, "reports": True}


async def test_stats_while_a_producer_opens_new_queues(db_url: str) -> None:
    """Each stats call sees one moment: a queue whose first job commits meanwhile is either
    absent or counted whole, with the age of its oldest job exactly when that one is due.

    (A job may count as delayed for an instant: the database's clock for the statement can be
    read a moment before its snapshot, and the job was due from its own transaction's start.)"""
    reader, writer = create_engine(db_url), create_engine(db_url)
    stop = asyncio.Event()
    opened = 0

    async def produce() -> None:
        nonlocal opened
        while not stop.is_set():
            async with writer.begin() as conn:
                await queue.push(record(f"k{opened}"), queue=f"new-{opened + 1}", session=conn)
            opened += 1

    producer = asyncio.create_task(produce())
    deadline = time.monotonic() + 120
    try:
        # Until the producer has opened enough queues meanwhile (a busy machine slows it).
        while opened < 20 and not producer.done() and time.monotonic() < deadline:
            for row in await admin.queue_stats(reader):
                assert (row.pending + row.delayed, row.reserved, row.failed) == (1, 0, 0), row
                assert (row.oldest_due_age is not None) == (row.pending == 1), row
                assert row.oldest_due_age is None or row.oldest_due_age >= 0.0, row
        stop.set()
        await producer
        assert opened >= 20  # the producer really ran alongside
    finally:
        stop.set()
        await asyncio.gather(producer, return_exceptions=True)
        await reader.dispose()
        await writer.dispose()


def test_stats_of_a_queue_without_rows_shows_zeros_and_says_so(
    db_url: str, sync_engine: sa.Engine
) -> None:
    add_jobs(sync_engine, ["a"])
    result = ok("stats", "--queue", "emials")
    assert result.stdout.splitlines()[1].split() == ["emials", "0", "0", "0", "0", "-"]
    assert "no job or failed job is in queue 'emials'" in result.stderr
    assert refused(2, "stats", "--queue", "x" * 256).stderr.startswith("routemq-outbox: queue name")


def test_size_prints_one_number(db_url: str, sync_engine: sa.Engine) -> None:
    add_jobs(sync_engine, ["a", "b", "c"])
    add_jobs(sync_engine, ["d"], delay=3600)
    reserve(sync_engine, "default", 1)
    add_jobs(sync_engine, ["e"], "emails")
    assert ok("size").stdout == "3\n"  # pending + delayed, as queue.size() counts
    assert ok("size", "default").stdout == "3\n"
    assert ok("size", "emails").stdout == "1\n"
    assert ok("size", "drained").stdout == "0\n"  # an empty queue is not an error for scripts


# ----------------------------------------------------------------------------- failed list / show


def test_failed_list_newest_first_with_queue_and_limit(db_url: str, sync_engine: sa.Engine) -> None:
    assert ok("failed", "list").stdout == "no failed jobs\n"
    first = add_failed(sync_engine, "default", count=3, key="d")
    other = add_failed(sync_engine, "emails", count=1, key="e", error="KeyError: 'smtp'")

    lines = ok("failed", "list").stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "ID",
        "QUEUE",
        "JOB",
        "ATTEMPTS",
        "FAILED AT (UTC)",
        "ERROR",
    ]
    assert [int(line.split()[0]) for line in lines[1:]] == [*other, *reversed(first)]
    assert lines[1].split()[1:4] == ["emails", "tests.record", "3"]
    assert lines[1].endswith("KeyError: 'smtp'")

    limited = ok("failed", "list", "--limit", "2")
    assert len(limited.stdout.splitlines()) == 3
    assert "the 2 newest of 4 failed jobs" in limited.stderr

    doc = json.loads(ok("failed", "list", "--queue", "default", "--json").stdout)
    assert doc["total"] == 3
    assert [row["id"] for row in doc["failed_jobs"]] == list(reversed(first))
    row = doc["failed_jobs"][0]
    assert row["payload"] == {"job": "tests.record", "data": {"key": "d-2"}}
    assert row["error"] == "ValueError: boom"
    assert row["exception"].startswith("ValueError: boom\n\nTraceback (most recent call last):")
    assert (row["queue"], row["job"], row["attempts"], row["job_id"]) == (
        "default",
        "tests.record",
        3,
        1002,
    )
    assert refused(2, "failed", "list", "--limit", "0").stderr


def test_failed_show_prints_the_payload_and_the_whole_traceback(
    db_url: str, sync_engine: sa.Engine
) -> None:
    (failed_id,) = add_failed(sync_engine, key="shown")
    text = ok("failed", "show", str(failed_id)).stdout
    assert f"id:         {failed_id}\n" in text
    assert "job:        tests.record\n" in text
    assert (
        'payload:\n  {\n    "job": "tests.record",\n    "data": {\n      "key": "shown-0"' in text
    )
    assert text.endswith(
        "exception:\n  ValueError: boom\n\n  Traceback (most recent call last):\n"
        '    File "app.py", line 1, in handle\n  ValueError: boom\n'
    )

    doc = json.loads(ok("failed", "show", str(failed_id), "--json").stdout)
    assert doc["payload"] == {"job": "tests.record", "data": {"key": "shown-0"}}
    assert json.loads(ok("failed", "show", doc["uuid"], "--json").stdout) == doc

    missing = refused(2, "failed", "show", str(failed_id + 1))
    assert missing.stderr == f"routemq-outbox: failed_jobs has no job with id {failed_id + 1}\n"
    assert "neither a failed job id" in refused(2, "failed", "show", "12abc").stderr


# ----------------------------------------------------------------------------- retry


def test_failed_retry_by_id_moves_the_jobs_back_with_attempts_reset(
    db_url: str, sync_engine: sa.Engine
) -> None:
    ids = add_failed(sync_engine, count=3, key="r", ago=7200)
    emails = add_failed(sync_engine, "emails", key="e")
    assert ok("failed", "retry", str(ids[0]), str(emails[0])).stdout == "retried 2 failed jobs\n"

    rows = job_rows(sync_engine)
    assert sorted(keys_of(rows)) == ["e-0", "r-0"]
    assert {row.queue for row in rows} == {"default", "emails"}
    assert {(row.attempts, row.reserved_at, bool(row.due)) for row in rows} == {(0, None, True)}
    assert failed_ids(sync_engine) == ids[1:]

    # by uuid too
    with sync_engine.connect() as conn:
        wanted = conn.scalar(sa.select(failed_jobs.c.uuid).where(failed_jobs.c.id == ids[1]))
    assert ok("failed", "retry", str(wanted)).stdout == "retried 1 failed job\n"
    assert failed_ids(sync_engine) == ids[2:]


def test_failed_retry_with_an_unknown_id_touches_nothing(
    db_url: str, sync_engine: sa.Engine
) -> None:
    ids = add_failed(sync_engine, count=2)
    result = refused(2, "failed", "retry", str(ids[0]), "999", str(ids[1]), "998")
    assert result.stderr == (
        "routemq-outbox: failed_jobs has no job with id 998, 999: nothing was retried\n"
    )
    assert failed_ids(sync_engine) == ids
    assert job_rows(sync_engine) == []

    ghost = str(uuid.uuid4())
    assert ghost in refused(2, "failed", "retry", str(ids[0]), ghost).stderr
    assert failed_ids(sync_engine) == ids

    assert "give the ids" in refused(2, "failed", "retry").stderr
    assert "give the ids" in refused(2, "failed", "retry", "--all", str(ids[0])).stderr
    assert "--queue goes with --all" in refused(2, "failed", "retry", "-q", "x", "1").stderr
    assert failed_ids(sync_engine) == ids


def test_failed_retry_all_in_batches_and_by_queue(db_url: str, sync_engine: sa.Engine) -> None:
    default = add_failed(sync_engine, "default", count=5, key="d")
    emails = add_failed(sync_engine, "emails", count=2, key="e")

    unknown = refused(2, "failed", "retry", "--all", "--queue", "emials")
    assert unknown.stderr == (
        "routemq-outbox: unknown queue 'emials': no job or failed job is in it "
        "(queues with jobs: default, emails)\n"
    )
    assert failed_ids(sync_engine) == default + emails

    result = ok("failed", "retry", "--all", "--queue", "default", "--batch-size", "2")
    assert result.stdout == "retried 5 failed jobs\n"
    assert failed_ids(sync_engine) == emails
    assert sorted(keys_of(job_rows(sync_engine))) == [f"d-{i}" for i in range(5)]

    assert ok("failed", "retry", "--all").stdout == "retried 2 failed jobs\n"
    assert failed_ids(sync_engine) == []
    assert len(job_rows(sync_engine)) == 7
    assert ok("failed", "retry", "--all").stdout == "retried 0 failed jobs\n"


async def test_concurrent_retry_all_never_deadlocks_and_moves_each_job_once(db_url: str) -> None:
    """Callers racing over a small failed_jobs table: each takes a batch the other skips, so
    a delete of its own batch that read beyond it would wait for the other's rows while the
    other waits for its own (MariaDB plans such a delete as a full scan once the batch is a
    large share of the table, whatever the statistics say)."""
    engines = [create_engine(db_url) for _ in range(3)]
    setup, callers = engines[0], engines[1:]
    total = 150
    try:
        for round_ in range(8):
            async with setup.begin() as conn:
                await conn.execute(sa.delete(jobs))
                await conn.execute(
                    sa.insert(failed_jobs),
                    [
                        {
                            "uuid": str(uuid.uuid4()),
                            "connection": "default",
                            "queue": "default",
                            "payload": json.dumps({"job": "tests.record", "data": {"key": i}}),
                            "exception": "ValueError: boom",
                            "attempts": 3,
                            "job_id": i,
                        }
                        for i in range(total)
                    ],
                )
            if round_ == 0:
                async with setup.connect() as conn:
                    await conn.execute(sa.text(ANALYZE[family(setup.dialect.name)]))
                    await conn.commit()
            moved = await asyncio.gather(
                *(admin.retry_failed(caller, all=True, batch_size=50) for caller in callers)
            )
            assert sum(moved) == total, moved
            async with setup.connect() as conn:
                keys = (
                    await conn.execute(
                        sa.select(sa.cast(jobs.c.payload, sa.Text)).order_by(jobs.c.id)
                    )
                ).scalars()
                assert sorted(json.loads(key)["data"]["key"] for key in keys) == list(range(total))
                left = await conn.execute(sa.select(sa.func.count()).select_from(failed_jobs))
                assert left.scalar_one() == 0
    finally:
        for engine in engines:
            await engine.dispose()


ANALYZE = {
    "postgresql": "ANALYZE failed_jobs",
    "sqlite": "ANALYZE failed_jobs",
    "mysql": "ANALYZE TABLE failed_jobs",
}


# ----------------------------------------------------------------------------- delete


def test_failed_forget_deletes_exactly_the_given_ids(db_url: str, sync_engine: sa.Engine) -> None:
    ids = add_failed(sync_engine, count=3)
    assert (
        "no job with id 77: nothing was deleted"
        in refused(2, "failed", "forget", str(ids[0]), "77").stderr
    )
    assert failed_ids(sync_engine) == ids
    assert ok("failed", "forget", str(ids[0]), str(ids[2])).stdout == "deleted 2 failed jobs\n"
    assert failed_ids(sync_engine) == [ids[1]]
    assert job_rows(sync_engine) == []


def test_failed_flush_all_or_one_queue(db_url: str, sync_engine: sa.Engine) -> None:
    add_failed(sync_engine, "default", count=2)
    emails = add_failed(sync_engine, "emails", count=3)
    add_jobs(sync_engine, ["waiting"])
    assert "unknown queue 'nope'" in refused(2, "failed", "flush", "--queue", "nope").stderr
    assert ok("failed", "flush", "-q", "default").stdout == (
        "deleted 2 failed jobs of queue 'default'\n"
    )
    assert failed_ids(sync_engine) == emails
    assert ok("failed", "flush").stdout == "deleted 3 failed jobs\n"
    assert failed_ids(sync_engine) == []
    assert keys_of(job_rows(sync_engine)) == ["waiting"]


def test_failed_prune_deletes_only_rows_older_than_the_duration(
    db_url: str, sync_engine: sa.Engine
) -> None:
    old = add_failed(sync_engine, count=2, ago=2 * 3600, key="old")
    recent = add_failed(sync_engine, count=2, ago=50 * 60, key="recent")
    fresh = add_failed(sync_engine, count=1, key="fresh")
    other_old = add_failed(sync_engine, "emails", ago=3 * 86400, key="other")

    result = ok("failed", "prune", "--older-than", "1h", "--queue", "default")
    assert result.stdout == "deleted 2 failed jobs that failed more than 1h ago\n"
    assert failed_ids(sync_engine) == recent + fresh + other_old

    assert ok("failed", "prune", "--older-than", "2d").stdout.startswith("deleted 1 failed job ")
    assert failed_ids(sync_engine) == recent + fresh
    assert ok("failed", "prune", "--older-than", "3600").stdout.startswith("deleted 0 ")
    assert old[0] not in failed_ids(sync_engine)

    bad = refused(2, "failed", "prune", "--older-than", "soon")
    assert "invalid duration 'soon'" in bad.stderr
    assert "--older-than" in bad.stderr
    assert failed_ids(sync_engine) == recent + fresh


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("48h", 172800),
        ("7d", 604800),
        ("2w", 1209600),
        ("1.5h", 5400),
        (" 7D ", 604800),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert admin.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-1h", "1y", "h", "1h30m", "1e3"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        admin.parse_duration(text)


def test_clear_asks_then_deletes_the_waiting_jobs_of_one_queue(
    db_url: str, sync_engine: sa.Engine
) -> None:
    add_jobs(sync_engine, ["a", "b", "c"])
    add_jobs(sync_engine, ["later"], delay=3600)
    reserve(sync_engine, "default", 1)
    add_jobs(sync_engine, ["keep"], "emails")

    declined = refused(1, "clear", "default", input="n\n")
    assert "Delete 3 waiting jobs of queue 'default'? [y/N]" in declined.stdout
    assert declined.stderr == "routemq-outbox: nothing was deleted\n"
    assert len(job_rows(sync_engine)) == 5

    assert "unknown queue 'defualt'" in refused(2, "clear", "defualt", "--yes").stderr
    assert len(job_rows(sync_engine)) == 5

    accepted = ok("clear", "default", input="y\n")
    assert accepted.stdout.endswith("deleted 3 waiting jobs of queue 'default'\n")
    rows = job_rows(sync_engine)
    assert [(row.queue, row.reserved_at is not None) for row in rows] == [
        ("default", True),  # a worker runs it: left alone
        ("emails", False),
    ]
    assert ok("clear", "emails", "-y").stdout == "deleted 1 waiting job of queue 'emails'\n"


# ----------------------------------------------------------------------------- health, migrate


def test_health_is_ok_at_head(db_url: str) -> None:
    result = ok("health")
    assert result.stdout.startswith("ok: database ")
    assert result.stdout.endswith(f"is reachable and its schema is at head ({head_revision()})\n")


def test_health_fails_on_an_empty_database_until_migrated(empty_pg_url: str) -> None:
    result = refused(1, "health", "--database-url", empty_pg_url)
    assert result.stderr.startswith("routemq-outbox: database postgresql+asyncpg://")
    assert result.stderr.endswith("is not migrated: run routemq-outbox migrate\n")

    assert ok("migrate", "--database-url", empty_pg_url).stderr == (
        f"database schema is at {head_revision()} (head)\n"
    )
    ok("health", "--database-url", empty_pg_url)


def test_health_fails_on_an_empty_sqlite_file(tmp_path: Path) -> None:
    (tmp_path / "new.db").touch()
    url = f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"
    assert refused(1, "health", "--database-url", url).stderr.endswith(
        "is not migrated: run routemq-outbox migrate\n"
    )


def test_commands_refuse_a_missing_sqlite_file_instead_of_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "mistyped.db"
    url = f"sqlite:///{path}"
    for command in (["health"], ["stats"], ["size"], ["failed", "list"], ["clear", "x", "--yes"]):
        assert refused(2, *command, "--database-url", url).stderr == (
            f"routemq-outbox: no SQLite database at {path}: check the database URL, or "
            "create the database with routemq-outbox migrate\n"
        )
    assert not path.exists()

    ok("migrate", "--database-url", url)
    ok("health", "--database-url", url)


def test_health_fails_on_an_unreachable_database_without_showing_the_password() -> None:
    url = f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/app"
    result = refused(1, "health", "--database-url", url, "--timeout", "20")
    assert result.stderr.startswith(
        "routemq-outbox: database postgresql+asyncpg://app:***@127.0.0.1:"
    )
    assert "/app is unreachable: " in result.stderr
    assert "s3cret-pw" not in result.output


def test_health_names_a_wrong_revision_and_accepts_the_apps_own_version_table(
    pg_url: str, sync_engine_pg: sa.Engine
) -> None:
    with sync_engine_pg.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'abc123'"))
    wrong = refused(1, "health", "--database-url", pg_url)
    assert f"has schema revision abc123, but this routemq-outbox needs {head_revision()}" in (
        wrong.stderr
    )

    with sync_engine_pg.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(
            sa.text("INSERT INTO alembic_version VALUES ('app_0007'), (:head)"),
            {"head": head_revision()},
        )
    ok("health", "--database-url", pg_url)


@pytest.fixture
def sync_engine_pg(pg_url: str) -> Iterator[sa.Engine]:
    from routemq_outbox.database import create_sync_engine

    engine = create_sync_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrate_only_upgrades_and_says_what_the_database_is_at(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    first, head = revisions()[0], head_revision()
    assert (first, head) == ("routemq_outbox_0001", "routemq_outbox_0007")
    every_revision = ", ".join(revisions())

    def at() -> list[str]:
        engine = create_sync_engine(url)
        try:
            with engine.connect() as conn:
                return list(conn.scalars(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")))
        finally:
            engine.dispose()

    assert ok("migrate", "--revision", first, "--database-url", url).stderr == (
        f"database schema is at {first}\n"
    )
    assert at() == [first]
    assert ok("migrate", "--database-url", url).stderr == f"database schema is at {head} (head)\n"
    assert ok("migrate", "--database-url", url).stderr == f"database schema is at {head} (head)\n"
    choices = f"migrate goes to head or to one of {every_revision}, and only upgrades; got"
    for revision, message in [
        ("nonexistent", f"unknown revision 'nonexistent': routemq-outbox has {every_revision}"),
        ("-1", f"{choices} '-1'"),
        ("+1", f"{choices} '+1'"),
        ("base", f"{choices} 'base'"),
        ("heads", f"{choices} 'heads'"),
        (first, f"the database is at {head}, past {first}: migrate only upgrades"),
    ]:
        result = refused(2, "migrate", "--revision", revision, "--database-url", url)
        assert result.stderr.startswith(f"routemq-outbox: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert at() == [head]


def test_migrate_sql_prints_the_ddl(pg_url: str) -> None:
    ddl = ok("migrate", "--sql", "--database-url", pg_url).stdout
    assert "CREATE TABLE jobs" in ddl
    assert "CREATE TABLE failed_jobs" in ddl


def test_database_errors_are_one_clear_line(tmp_path: Path) -> None:
    url = f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/app"
    result = refused(1, "failed", "list", "--database-url", url)
    assert result.stderr.startswith("routemq-outbox: database postgresql://app:***@127.0.0.1:")
    assert len(result.stderr.splitlines()) == 1
    assert "s3cret-pw" not in result.output


# ----------------------------------------------------------------------------- numbers

OUT_OF_RANGE = [
    (("work", "--concurrency", "99999999999999999999"), "--concurrency must be a whole number"),
    (("work", "--concurrency", "0"), "--concurrency must be a whole number from 1 to 10000"),
    (("work", "--batch-size", "10001"), "--batch-size must be a whole number from 1 to 10000"),
    (("work", "--prefetch", "-1"), "--prefetch must be a whole number from 0 to 10000"),
    (("work", "--max-jobs", "9223372036854775808"), "--max-jobs must be a whole number"),
    (("work", "--max-tries", "2147483648"), "--max-tries must be a whole number"),
    (("work", "--metrics-port", "70000"), "--metrics-port must be a whole number from 1 to 65535"),
    (("work", "--sleep", "1e400"), "--sleep must be a number of seconds above 0 and at most"),
    (("work", "--lease", "inf"), "--lease must be a number of seconds above 0"),
    (("work", "--grace", "nan"), "--grace must be a number of seconds from 0 to 31536000"),
    (("work", "--grace", "-1"), "--grace must be a number of seconds from 0"),
    (("work", "--max-time", "nan"), "--max-time must be a number of seconds"),
    (("work", "--timeout", "-5"), "--timeout must be a number of seconds above 0"),
    (("work", "--metrics-interval", "0"), "--metrics-interval must be a number of seconds"),
    (("health", "--timeout", "-1"), "--timeout must be a number of seconds above 0"),
    (("health", "--timeout", "nan"), "--timeout must be a number of seconds above 0"),
    (("failed", "list", "--limit", "99999999999999999999"), "--limit must be a whole number"),
    (("failed", "list", "--limit", "0"), "--limit must be a whole number from 1 to 1000000"),
    (("failed", "retry", "--all", "--batch-size", "99999999999"), "--batch-size must be a whole"),
    (("failed", "show", "99999999999999999999999"), "failed job id 99999999999999999999999 is"),
    (("failed", "retry", "1", "9223372036854775808"), "failed job id 9223372036854775808 is out"),
    (("failed", "forget", "9223372036854775808"), "failed job id 9223372036854775808 is out"),
    (("failed", "prune", "--older-than", "99999999999w"), "--older-than: invalid duration"),
    (("failed", "prune", "--older-than", "1e400"), "--older-than: invalid duration '1e400'"),
]


@pytest.mark.parametrize(("args", "message"), OUT_OF_RANGE)
def test_out_of_range_numbers_are_one_line_before_any_database_work(
    args: tuple[str, ...], message: str
) -> None:
    """The database named here does not answer: reaching it would exit 1 with its error, or
    (a worker) keep trying; a process, so that the test ends either way."""
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/app"
    result = run_cli(*args, "--database-url", url, timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith(f"routemq-outbox: {message}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_huge_numbers_on_every_database(db_url: str, sync_engine: sa.Engine) -> None:
    ids = add_failed(sync_engine, count=2, ago=3600)
    for args in [
        ("failed", "list", "--limit", "99999999999999999999"),
        ("failed", "list", "--limit", "9223372036854775808"),
        ("failed", "show", "99999999999999999999999"),
        ("failed", "retry", str(ids[0]), "9223372036854775808"),
        ("failed", "forget", "99999999999999999999999"),
        ("failed", "prune", "--older-than", "99999999999w"),
        ("failed", "prune", "--older-than", "100000000000000000000"),
    ]:
        result = refused(2, *args)
        assert len(result.stderr.splitlines()) == 1, (args, result.stderr)
    assert failed_ids(sync_engine) == ids
    largest = refused(2, "failed", "show", "9223372036854775807")
    assert largest.stderr == "routemq-outbox: failed_jobs has no job with id 9223372036854775807\n"
    assert ok("failed", "list", "--limit", "1000000").stdout.count("ValueError: boom") == 2
    assert ok("failed", "prune", "--older-than", "5000w").stdout.startswith("deleted 0 ")
    assert failed_ids(sync_engine) == ids


# ----------------------------------------------------------------------------- help, work


def test_help_groups_the_commands() -> None:
    text = ok("--help").stdout
    panels = re.findall(r"╭─ (\w[\w ]*?) ─", text)
    assert panels == [
        "Options",
        "Workers",
        "Monitoring",
        "Maintenance",
        "Failed jobs",
        "Periodic jobs",
    ]
    maintenance = text[text.index("Maintenance") : text.index("Failed jobs")]
    assert "clear" in maintenance
    assert "migrate" in maintenance
    for command in ("list", "show", "retry", "forget", "flush", "prune"):
        assert re.search(rf"│ {command}\s", ok("failed", "--help").stdout), command
    for command in ("list", "run"):
        assert re.search(rf"│ {command}\s", ok("schedule", "--help").stdout), command


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``work`` configures the root logger: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.getLogger("routemq_outbox")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(logging.NOTSET)


class Quick(Job):
    """Jobs that need no database of their own: the worker runs in this process."""

    job_name = "tests.admin.quick"
    max_tries = 2
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.fate = "succeed"

    async def handle(self) -> None:
        if self.fate == "fail once" and self.attempt == 1:
            raise ValueError("first attempt fails")
        if self.fate == "give up":
            raise FailJob("hopeless")


def quick(fate: str) -> Quick:
    job = Quick()
    job.fate = fate
    return job


def test_work_logs_json_lines(db_url: str, sync_engine: sa.Engine, restore_logging: None) -> None:
    with sync_engine.begin() as conn:
        queue.bulk_sync([quick("succeed"), quick("fail once"), quick("give up")], session=conn)

    result = ok("work", "--stop-when-empty", "--sleep", "0.05", "--log-format", "json", "-v")
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert {line["logger"] for line in lines} == {"routemq_outbox.worker"}
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", x["ts"]) for x in lines
    )
    jobs_ = sorted((line for line in lines if "job" in line), key=lambda x: (x["id"], x["attempt"]))
    assert [(x["outcome"], x["attempt"], x["level"]) for x in jobs_] == [
        ("succeeded", 1, "DEBUG"),
        ("retried", 1, "WARNING"),
        ("succeeded", 2, "DEBUG"),
        ("failed", 1, "ERROR"),
    ]
    for line in jobs_:
        assert (line["job"], line["queue"]) == ("tests.admin.quick", "default")
        assert isinstance(line["id"], int)
        assert line["duration_ms"] >= 0
        assert line["message"].startswith(f"job tests.admin.quick id={line['id']} queue=default")
    assert lines[0]["message"].startswith("worker started: ")
    assert lines[-1]["message"] == (
        "worker stopped: 2 succeeded, 1 retried, 1 failed, 0 released unfinished"
    )


def test_work_quiet_and_verbose(db_url: str, sync_engine: sa.Engine, restore_logging: None) -> None:
    with sync_engine.begin() as conn:
        queue.bulk_sync([quick("succeed"), quick("give up")], session=conn)
    quiet = ok("work", "--stop-when-empty", "--sleep", "0.05", "--quiet")
    assert [line.split(" ", 3)[2] for line in quiet.stderr.splitlines()] == ["ERROR"]
    assert "job tests.admin.quick" in quiet.stderr
    assert "FailJob: hopeless" in quiet.stderr

    with sync_engine.begin() as conn:
        queue.push_sync(quick("succeed"), session=conn)
    verbose = ok("work", "--stop-when-empty", "--sleep", "0.05", "-v")
    levels = {line.split(" ", 3)[2] for line in verbose.stderr.splitlines()}
    if db_url.startswith("postgresql"):
        assert "DEBUG" in levels  # "listening on channel …"
    assert "INFO" in levels
    assert "sqlalchemy" not in verbose.stderr  # no echo of every statement

    assert "exclude each other" in refused(2, "work", "--quiet", "--verbose").stderr
