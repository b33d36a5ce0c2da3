"""The README's SQL and code samples run as printed."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, queue
from routemq_outbox.schema import db_now, db_now_plus, failed_jobs, jobs
from routemq_outbox.sql import claim

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def named_queries() -> dict[str, str]:
    """The SQL of "Queue size in SQL", keyed by the first word(s) of each comment."""
    (block,) = code_blocks(section("Queue size in SQL"), "sql")
    queries = {}
    for chunk in block.split(";"):
        lines = [line for line in chunk.strip().splitlines() if line.strip()]
        if not lines:
            continue
        name = lines[0].removeprefix("-- ").split(":")[0]
        queries[name] = "\n".join(lines[1:])
    return queries


class Noop(Job):
    job_name = "tests.readme_noop"

    async def handle(self) -> None:
        pass


async def test_queue_size_queries_match_the_library(engine: AsyncEngine) -> None:
    queries = named_queries()
    assert set(queries) == {
        "pending",
        "delayed",
        "reserved",
        "failed",
        "size",
        "by queue",
        "failed by queue",
    }
    await queue.bulk([Noop() for _ in range(4)])
    await queue.push(Noop(), queue="other")
    async with engine.begin() as conn:  # make them due for certain, even at 1 s precision
        await conn.execute(sa.update(jobs).values(available_at=db_now_plus(sa.literal(-10.0))))
    await queue.later(3600, Noop())
    await queue.later(7200, Noop())
    (held,) = await claim(engine, "default", 1, secrets.randbits(63), 60)
    async with engine.begin() as conn:
        for _ in range(2):
            await conn.execute(
                sa.insert(failed_jobs).values(
                    uuid=str(uuid.uuid4()),
                    connection="default",
                    queue="default",
                    payload='{"job": "x", "data": {}}',
                    exception="E",
                    attempts=3,
                    failed_at=db_now(),
                )
            )

    async with engine.connect() as conn:

        def count(name: str) -> int:
            return int(results[name][0][0])

        results = {name: (await conn.execute(sa.text(sql))).all() for name, sql in queries.items()}
        size = await queue.size("default", session=conn)

    assert count("pending") == 3
    assert count("delayed") == 2
    assert count("reserved") == 1
    assert count("failed") == 2
    assert count("size") == size == 5
    assert [tuple(row) for row in results["by queue"]] == [("default", 3, 2, 1), ("other", 1, 0, 0)]
    assert [tuple(row) for row in results["failed by queue"]] == [("default", 2)]
    assert held.queue == "default"


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
    result = run_sample(code, tmp_path, sqlite_url)
    assert result.returncode == 0, result.stderr
    if "dispatch(job, session=session)          # commits" in code:
        assert result.stdout.strip() == "waiting: 2"
    if "dispatch_sync(job, session=session)" in code:
        assert result.stdout.strip() == "waiting: 1"
    if "ChargeOrderJob" in code:
        assert result.stdout.strip() == "charges: 1"
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
