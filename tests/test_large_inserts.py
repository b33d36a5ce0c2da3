"""Inserts of many large jobs: a bulk dispatch, and failed jobs moved back by ``retry --all``.

Both send their rows as JSON arrays of a few MiB each. On PostgreSQL one array of them all
would become one JSONB value, which may not exceed 256 MiB: a JSON text of small numbers
reaches that at about 43 MiB, as the payloads here do.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, admin, queue, sql
from routemq_outbox.database import create_engine
from routemq_outbox.schema import failed_jobs, jobs


class Numbers(Job):
    job_name = "tests.numbers"

    def __init__(self, key: int = 0, count: int = 0) -> None:
        super().__init__()
        self.key = key
        self.values = [0] * count


# Each payload is just under the default 1 MiB limit and grows sixfold as JSONB: 45 of them
# are over PostgreSQL's 256 MiB for one JSONB value.
PER_JOB = 520_000
JOBS = 45


async def keys_in(engine: AsyncEngine, table: sa.Table) -> list[int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(sa.func.jsonb_extract_path_text(table.c.payload, "data", "key")).order_by(
                table.c.id
            )
        )
        return [int(key) for key in rows.scalars()]


@pytest.fixture
async def pg_engine(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncEngine]:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", pg_url)
    monkeypatch.setenv("ROUTEMQ_OUTBOX_NOTIFY", "1")  # the insert inside a SELECT pg_notify(…)
    engine = create_engine(pg_url)
    yield engine
    await engine.dispose()


def count_inserts(engine: AsyncEngine) -> list[int]:
    """Parameter sets of the many-rows insert, in a list that grows as they are sent."""
    sent: list[int] = []

    def count(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if "jsonb_array_elements" in statement:
            sent.append(len(params) if many else 1)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    return sent


async def bulk_then_retry_all(engine: AsyncEngine, batch: list[Numbers]) -> None:
    async with engine.connect() as conn:  # all or nothing in the caller's transaction
        transaction = await conn.begin()
        await queue.bulk(batch, session=conn)
        await transaction.rollback()
    assert await keys_in(engine, jobs) == []

    await queue.bulk(batch)
    assert await keys_in(engine, jobs) == list(range(len(batch)))

    async with engine.begin() as conn:  # every one of them fails
        await conn.execute(
            sa.insert(failed_jobs).from_select(
                ["uuid", "connection", "queue", "payload", "exception", "attempts", "job_id"],
                sa.select(
                    sa.cast(sa.func.gen_random_uuid(), sa.String()),
                    sa.literal("default"),
                    jobs.c.queue,
                    jobs.c.payload,
                    sa.literal("ValueError: boom"),
                    sa.literal(3),
                    jobs.c.id,
                ).order_by(jobs.c.id),
            )
        )
        await conn.execute(sa.delete(jobs))

    assert await admin.retry_failed(engine, all=True) == len(batch)
    assert await keys_in(engine, jobs) == list(range(len(batch)))
    assert await keys_in(engine, failed_jobs) == []


async def test_large_bulk_and_retry_all_go_in_several_statements_in_one_transaction(
    pg_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same as below with arrays of 256 kB instead of a few MiB: quick to run."""
    monkeypatch.setattr(sql, "_JSON_CHUNK_BYTES", 256 * 1024)
    sent = count_inserts(pg_engine)
    await bulk_then_retry_all(pg_engine, [Numbers(key, 40_000) for key in range(30)])
    # 30 jobs of 80 kB, three to an array: the rolled-back bulk (the committed one goes through
    # the configured database's own engine); then the retry, of the payloads as JSONB gives
    # them back, with a space after each comma: 120 kB, two to an array
    assert sent == [10, 15]


@pytest.mark.slow
async def test_bulk_and_retry_all_beyond_one_jsonb_value(pg_engine: AsyncEngine) -> None:
    await bulk_then_retry_all(pg_engine, [Numbers(key, PER_JOB) for key in range(JOBS)])
    async with pg_engine.connect() as conn:
        payload = (await conn.execute(sa.select(sa.cast(jobs.c.payload, sa.Text)))).scalar()
    assert json.loads(str(payload))["data"]["values"] == [0] * PER_JOB


@pytest.mark.parametrize("rows", [1, 2, 7, 40])
def test_each_statement_holds_at_most_the_chunk_unless_one_row_is_larger(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "_JSON_CHUNK_BYTES", 100)
    payloads = [json.dumps({"job": "x", "data": {"n": "é" * (i % 60)}}) for i in range(rows)]
    payloads.append(json.dumps({"job": "x", "data": {"big": "y" * 300}}))
    for dialect, key in (("postgresql", "items"), ("mysql", "rows")):
        _, params = sql.insert_jobs(dialect, [("q", p) for p in payloads], None, notify=False)
        texts = [s[key] for s in (params if isinstance(params, list) else [params])]
        arrays = [json.loads(text) for text in texts]
        assert len(arrays) > 1
        for text, array in zip(texts, arrays, strict=True):
            assert len(array) == 1 or len(text.encode()) <= 100
        items = [item for array in arrays for item in array]
        if dialect == "postgresql":
            assert items == [["q", json.loads(p), 0] for p in payloads]
        else:
            assert items == [["q", p, 0] for p in payloads]


def test_one_statement_when_the_rows_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [("q", json.dumps({"job": "x", "data": {"id": str(uuid.uuid4())}})) for _ in range(1000)]
    for dialect in ("postgresql", "mysql"):
        _, params = sql.insert_jobs(dialect, rows, None, notify=False)
        assert isinstance(params, dict)
