"""The README's SQL and code samples run as printed."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import secrets
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from routemq_outbox import Job, queue
from routemq_outbox.cli import app
from routemq_outbox.schema import db_now_plus, failed_jobs, jobs
from routemq_outbox.sql import claim

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


MARKS = {"postgresql": " (PostgreSQL)", "sqlite": " (SQLite)", "mysql": " (MySQL)"}


def named_queries(dialect: str | None = None) -> dict[str, str]:
    """The SQL of "Queue size in SQL", keyed by the first word(s) of each comment. With
    ``dialect``, the queries marked "(PostgreSQL)", "(SQLite)" or "(MySQL)" only for that one,
    without the mark; on MySQL and MariaDB, the README's MySQL block replaces the queries it
    names."""
    portable, mysql = code_blocks(section("Queue size in SQL"), "sql")
    family = "mysql" if dialect in ("mysql", "mariadb") else dialect
    queries = _parse_queries(portable, family)
    if family == "mysql":
        queries.update(_parse_queries(mysql, family))
    return queries


def _parse_queries(block: str, family: str | None) -> dict[str, str]:
    queries = {}
    for chunk in block.split(";"):
        lines = [line for line in chunk.strip().splitlines() if line.strip()]
        if not lines:
            continue
        name = lines[0].removeprefix("-- ").split(":")[0]
        mark = next((m for m in MARKS.values() if name.endswith(m)), None)
        if family is not None and mark is not None:
            if mark != MARKS[family]:
                continue
            name = name.removesuffix(mark)
        queries[name] = "\n".join(lines[1:])
    return queries


class Noop(Job):
    job_name = "tests.readme_noop"

    async def handle(self) -> None:
        pass


async def test_queue_size_queries_match_the_library(engine: AsyncEngine) -> None:
    assert set(named_queries()) == {
        "pending",
        "delayed",
        "reserved",
        "failed",
        "size",
        "by queue",
        "failed by queue",
        "oldest due age (PostgreSQL)",
        "oldest due age (SQLite)",
        "failed in the last hour (PostgreSQL)",
        "failed in the last hour (SQLite)",
    }
    queries = named_queries(engine.dialect.name)
    assert set(queries) == {
        "pending",
        "delayed",
        "reserved",
        "failed",
        "size",
        "by queue",
        "failed by queue",
        "oldest due age",
        "failed in the last hour",
    }
    await queue.bulk([Noop() for _ in range(4)])
    await queue.push(Noop(), queue="other")
    async with engine.begin() as conn:  # make them due for certain, even at 1 s precision
        await conn.execute(sa.update(jobs).values(available_at=db_now_plus(sa.literal(-10.0))))
    await queue.later(3600, Noop())
    await queue.later(7200, Noop())
    async with engine.connect() as conn:
        (held,) = await claim(conn, "default", 1, secrets.randbits(63), 60)
    async with engine.begin() as conn:
        for queue_name, ago in [("default", 0.0), ("default", 0.0), ("other", 7200.0)]:
            await conn.execute(
                sa.insert(failed_jobs).values(
                    uuid=str(uuid.uuid4()),
                    connection="default",
                    queue=queue_name,
                    payload='{"job": "x", "data": {}}',
                    exception="E",
                    attempts=3,
                    failed_at=db_now_plus(sa.literal(-ago)),
                )
            )

    async with engine.connect() as conn:

        def count(name: str) -> int:
            return int(results[name][0][0])

        if engine.dialect.name in ("mysql", "mariadb"):
            # A session far from UTC: the README's MySQL queries must not depend on it, and
            # the portable ones would be wrong (jobs due in an hour or two would be pending).
            await conn.execute(sa.text("SET time_zone = '+05:00'"))
            portable = named_queries()["pending"]
            assert int((await conn.execute(sa.text(portable))).scalar_one()) == 5
        results = {name: (await conn.execute(sa.text(sql))).all() for name, sql in queries.items()}
        size = await queue.size("default", session=conn)

    assert count("pending") == 3
    assert count("delayed") == 2
    assert count("reserved") == 1
    assert count("failed") == 2
    assert count("size") == size == 5
    assert [tuple(row) for row in results["by queue"]] == [("default", 3, 2, 1), ("other", 1, 0, 0)]
    assert [tuple(row) for row in results["failed by queue"]] == [("default", 2), ("other", 1)]
    assert [tuple(row) for row in results["failed in the last hour"]] == [("default", 2)]
    ages = {queue_name: float(age) for queue_name, age in results["oldest due age"]}
    assert set(ages) == {"default", "other"}
    assert all(9.5 <= age < 120 for age in ages.values()), ages
    assert held.queue == "default"


async def test_stats_json_equals_the_readme_queries(engine: AsyncEngine) -> None:
    await queue.bulk([Noop() for _ in range(5)])
    await queue.bulk([Noop() for _ in range(2)], queue="emails")
    async with engine.begin() as conn:  # due for certain, and of different ages
        await conn.execute(
            sa.update(jobs).values(available_at=db_now_plus(sa.literal(-30.0) - jobs.c.id))
        )
    await queue.later(3600, Noop())
    async with engine.connect() as conn:
        await claim(conn, "default", 2, secrets.randbits(63), 60)
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(failed_jobs),
            [
                {
                    "uuid": str(uuid.uuid4()),
                    "connection": "default",
                    "queue": name,
                    "payload": '{"job": "x", "data": {}}',
                    "exception": "E",
                    "attempts": 3,
                }
                for name in ("default", "reports", "reports")
            ],
        )

    queries = named_queries(engine.dialect.name)
    async with engine.connect() as conn:
        by_queue = (await conn.execute(sa.text(queries["by queue"]))).all()
        failed = (await conn.execute(sa.text(queries["failed by queue"]))).all()
        ages = (await conn.execute(sa.text(queries["oldest due age"]))).all()
    result = await asyncio.to_thread(CliRunner().invoke, app, ["stats", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["queues"]

    expected: dict[str, dict[str, object]] = {}
    for name, pending, delayed, reserved in by_queue:
        expected[name] = {"pending": pending, "delayed": delayed, "reserved": reserved}
    for name, count in failed:
        expected.setdefault(name, {"pending": 0, "delayed": 0, "reserved": 0})["failed"] = count
    assert [row["queue"] for row in stats] == sorted(expected) == ["default", "emails", "reports"]
    for row in stats:
        want = {"failed": 0, **expected[row["queue"]]}
        assert {k: row[k] for k in ("pending", "delayed", "reserved", "failed")} == want
    readme_ages = {name: float(age) for name, age in ages}
    assert set(readme_ages) == {"default", "emails"}
    for row in stats:
        if row["queue"] in readme_ages:  # measured a moment apart
            assert abs(row["oldest_due_age_seconds"] - readme_ages[row["queue"]]) < 5
        else:
            assert row["oldest_due_age_seconds"] is None
    assert [(r["pending"], r["delayed"], r["reserved"], r["failed"]) for r in stats] == [
        (3, 1, 2, 1),
        (2, 0, 0, 0),
        (0, 0, 0, 2),
    ]


def python_samples() -> list[str]:
    return code_blocks(README, "python")


def run_sample(code: str, cwd: Path, db: str) -> subprocess.CompletedProcess[str]:
    path = cwd / "sample.py"
    path.write_text(code)
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=cwd,
        env={"ROUTEMQ_OUTBOX_DATABASE_URL": db, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("index", range(len(python_samples())))
def test_python_samples_run_as_printed(index: int, tmp_path: Path, sqlite_url: str) -> None:
    code = python_samples()[index]
    if "from routemq." in code and importlib.util.find_spec("routemq") is None:
        pytest.skip("a RouteMQ sample: RouteMQ is not installed (it needs Python 3.12+)")
    result = run_sample(code, tmp_path, sqlite_url)
    assert result.returncode == 0, result.stderr
    if "class SendReceiptJob(Job)" in code:
        assert result.stdout.splitlines() == ["waiting: 1", "receipt for order 1"]
    if "dispatch(job, session=session)          # commits" in code:
        assert result.stdout.strip() == "waiting: 2"
    if "dispatch_sync(job, session=session)" in code:
        assert result.stdout.strip() == "waiting: 1"
    if "class PollDevices(Job)" in code:
        assert "run for 20" in result.stdout, result.stderr
    if "await mqtt.publish(" in code:
        assert result.stdout.strip() == "waiting: 2"
    if "class SyncAccount(Job)" in code:
        assert result.stdout.strip() == "False True True"
    if "ChargeOrderJob" in code:
        assert result.stdout.strip() == "charges: 1"
    elif "class ApplyLedgerEntry(Job)" in code:
        assert result.stdout.split("\n")[:3] == [
            "account 42 amount 100",
            "account 42 amount -30",
            "account 42 amount 5",
        ]
    elif "Worker(WorkerSettings(" in code:
        assert result.stdout.strip() == "0 succeeded, 0 failed"


async def test_fastapi_sample_dispatches_in_the_request_transaction(
    tmp_path: Path, db_url: str, engine: AsyncEngine
) -> None:
    from fastapi.testclient import TestClient

    (code,) = [c for c in python_samples() if "FastAPI()" in c]
    namespace: dict[str, object] = {"__name__": "readme_fastapi"}
    exec(compile(code, "README-fastapi", "exec"), namespace)
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))

    app = namespace["app"]
    with TestClient(app) as client:  # type: ignore[arg-type]
        assert client.post("/orders/1").json() == {"status": "accepted", "order_id": 1}
        with pytest.raises(sa.exc.IntegrityError):
            client.post("/orders/1")  # duplicate order: the request's transaction rolls back
    await namespace["engine"].dispose()  # type: ignore[attr-defined]

    async with engine.connect() as conn:
        orders = (await conn.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one()
        payloads = (await conn.execute(sa.select(sa.cast(jobs.c.payload, sa.Text)))).scalars()
        assert orders == 1
        assert [p.replace(" ", "") for p in payloads] == [
            '{"job":"shop.order_placed","data":{"order_id":1}}'
        ]


async def test_dashboard_sample_mounts_it_under_its_prefix(
    db_url: str, engine: AsyncEngine
) -> None:
    from fastapi.testclient import TestClient

    (code,) = [c for c in code_blocks(section("Dashboard"), "python") if "app.mount" in c]
    namespace: dict[str, object] = {"__name__": "readme_dashboard"}
    exec(compile(code, "README-dashboard", "exec"), namespace)
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(failed_jobs).values(
                uuid=str(uuid.uuid4()),
                connection="default",
                queue="emails",
                payload='{"job": "shop.receipt"}',
                exception="ValueError: no such customer",
                attempts=3,
            )
        )
    with TestClient(namespace["app"]) as client:  # type: ignore[arg-type]
        page = client.get("/outbox/failed")
        assert page.status_code == 200
        assert "ValueError: no such customer" in page.text
        assert 'href="/outbox/queues"' in page.text
    await namespace["engine"].dispose()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- Operating


def operating_commands() -> list[str]:
    """Every ``routemq-outbox …`` line of the Operating section, without its comment."""
    commands = []
    for block in code_blocks(section("Operating"), "bash"):
        for line in block.splitlines():
            command = re.split(r"\s{2,}#", line)[0].strip()
            if command.startswith("routemq-outbox "):
                commands.append(command)
    return commands


async def test_operating_commands_run_as_printed(db_url: str, engine: AsyncEngine) -> None:
    commands = operating_commands()
    assert {" ".join(shlex.split(c)[1:3]).removesuffix(" -i") for c in commands} >= {
        "stats",
        "stats --queue",
        "size emails",
        "health",
        "failed list",
        "failed show",
        "failed retry",
        "failed forget",
        "failed flush",
        "failed prune",
        "clear emails",
        "migrate",
        "work",
        "jobs list",
        "jobs show",
        "jobs run-now",
        "jobs cancel",
        "pause reports",
        "resume reports",
        "queues",
        "workers",
    }
    # The failed jobs the examples name: 1-10 in "emails", 11-14 in "default".
    async with engine.begin() as conn:
        ids = [
            (
                await conn.execute(
                    sa.insert(failed_jobs)
                    .values(
                        uuid=str(uuid.uuid4()),
                        connection="default",
                        queue="emails" if i <= 10 else "default",
                        payload='{"job": "tests.readme_noop", "data": {}}',
                        exception="ValueError: boom",
                        attempts=3,
                    )
                    .returning(failed_jobs.c.id)
                )
            ).scalar_one()
            for i in range(1, 15)
        ]
    assert ids == list(range(1, 15))
    await queue.bulk([Noop() for _ in range(3)], queue="emails")
    await queue.later(3600, Noop(), queue="reports")  # job 4, which the examples name

    expected = {
        "routemq-outbox size emails": "3\n",
        "routemq-outbox failed retry 12 13": "retried 2 failed jobs\n",
        "routemq-outbox failed retry --all --queue emails": "retried 10 failed jobs\n",
        "routemq-outbox failed forget 14": "deleted 1 failed job\n",
        "routemq-outbox jobs run-now 4": "made 1 job due now\n",
        'routemq-outbox jobs cancel 4 --reason "built by hand"': (
            "cancelled 1 waiting job (moved to failed_jobs); asked the workers of 0 running "
            "jobs to stop them\n"
        ),
        "routemq-outbox pause reports": "paused queue 'reports'\n",
        "routemq-outbox resume reports": "resumed queue 'reports'\n",
        "routemq-outbox clear emails": "deleted 13 waiting jobs of queue 'emails'\n",
    }
    for command in commands:
        args = shlex.split(command)[1:]
        if args[0] == "work":
            args.append("--help")  # accepted as printed (it would run until stopped)
        result = await asyncio.to_thread(CliRunner().invoke, app, args, input="y\n")
        assert result.exit_code == 0, (command, result.output)
        if command in expected:
            assert result.stdout.endswith(expected.pop(command)), (command, result.stdout)
        if args[:2] == ["failed", "show"]:
            assert "id:         12\n" in result.stdout
    assert expected == {}, "commands missing from the README"


def exposed_metrics() -> tuple[set[str], set[str]]:
    """The metric families of a worker's registry, and every sample name in it, after each
    metric was used once."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from routemq_outbox.execution import Outcome, Verdict
    from routemq_outbox.metrics import STATES, WorkerMetrics
    from routemq_outbox.sql import Claimed

    metrics = WorkerMetrics(["default"])
    metrics.claimed("default", 3)
    metrics.recorded(Claimed(1, "default", "{}", 1, 1), Outcome(Verdict.DONE), ran=True)
    for state in STATES:
        metrics.depth.labels("default", state).set(0)
    metrics.oldest_due_age.labels("default").set(0)
    families, samples = set(), set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        families.add(family.name)
        samples.update(sample.name for sample in family.samples)
    return families, samples


def test_the_metrics_the_readme_names_are_the_ones_a_worker_serves() -> None:
    families, samples = exposed_metrics()
    named = set(re.findall(r"routemq_outbox_[a-z_]+", section("Operating")))
    assert named <= families | samples, named - families - samples
    ours = {
        name
        for name in families
        if name.startswith("routemq_outbox_") and not name.endswith("_created")  # client's own
    }
    assert ours == {name.removesuffix("_total") for name in named}
    assert len(ours) == 9


def test_the_alert_rules_are_valid_prometheus_rules() -> None:
    import yaml

    (block,) = code_blocks(section("Operating"), "yaml")
    (group,) = yaml.safe_load(block)["groups"]
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert set(rules) == {"RouteMQOutboxBacklogAge", "RouteMQOutboxFailureRate"}
    for rule in rules.values():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")")
    assert "routemq_outbox_queue_oldest_due_age_seconds" in rules["RouteMQOutboxBacklogAge"]["expr"]
    assert "routemq_outbox_jobs_failed_total" in rules["RouteMQOutboxFailureRate"]["expr"]
