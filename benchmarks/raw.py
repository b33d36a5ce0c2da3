"""The suite's own reference points, written without the library.

- The dispatch baseline: the business INSERT plus a hand-written SQLAlchemy INSERT into the
  ``jobs`` table, in the same kind of transaction as ``dispatch(job, session=conn)``.
- The drain ceiling: claim 100 rows per statement (CTE ... FOR UPDATE SKIP LOCKED, then
  UPDATE ... RETURNING) and delete them in one batched statement, on bare asyncpg with a few
  connections. Nothing a worker does beyond that (leases, tokens, job objects, tasks) is in it,
  so it is the best drain this schema allows from Python, against which ours is judged.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import harness

__all__ = [
    "ORDERS_DDL",
    "ORDERS_TABLE",
    "ORDER_INSERT",
    "ceiling_child",
    "insert_job_row",
    "order_params",
]

# The "business" write of every dispatch transaction: an order row, as an app would insert.
ORDERS_TABLE = "bench_orders"
ORDERS_DDL = f"""
CREATE TABLE IF NOT EXISTS {ORDERS_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    amount_cents integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""
ORDER_INSERT = sa.text(
    f"INSERT INTO {ORDERS_TABLE} (customer, amount_cents) VALUES (:customer, :amount_cents)"
)

JOB_INSERT = sa.text("INSERT INTO jobs (queue, payload) VALUES (:queue, CAST(:payload AS jsonb))")


def order_params(n: int) -> dict[str, Any]:
    return {"customer": f"customer-{n % 997}", "amount_cents": 100 + n % 10_000}


async def insert_job_row(conn: AsyncConnection, n: int) -> None:
    """The baseline enqueue: serialise the same payload ours stores, one plain INSERT."""
    payload = json.dumps({"job": "bench.noop", "data": {"n": n}}, separators=(",", ":"))
    await conn.execute(JOB_INSERT, {"queue": "default", "payload": payload})


# ------------------------------------------------------------------------------ ceiling

CLAIM = """
WITH picked AS (
    SELECT id FROM jobs
    WHERE queue = $1 AND reserved_at IS NULL AND available_at <= now()
    ORDER BY available_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs
SET reserved_at = now(), token = $3, lease_expires_at = now() + interval '60 seconds',
    attempts = jobs.attempts + 1
FROM picked
WHERE jobs.id = picked.id
RETURNING jobs.id, jobs.payload::text
"""
DELETE = "DELETE FROM jobs WHERE id = ANY($1::bigint[])"


async def ceiling_child(url: str, jobs: int, connections: int, batch: int) -> dict[str, Any]:
    """Drain the backlog at ``url`` with ``connections`` claim/delete loops."""
    conns: list[asyncpg.Connection] = [await harness.connect(url) for _ in range(connections)]
    try:
        # Prepare both statements on every connection before the clock starts.
        for conn in conns:
            await conn.prepare(CLAIM)
            await conn.prepare(DELETE)

        async def loop(conn: asyncpg.Connection) -> int:
            done = 0
            token = secrets.randbits(63)
            while True:
                rows = await conn.fetch(CLAIM, "default", batch, token)
                if not rows:
                    return done
                # The "work": decode each payload, as any worker must to know the job.
                for row in rows:
                    json.loads(row[1])
                await conn.execute(DELETE, [row[0] for row in rows])
                done += len(rows)

        with harness.stopwatch() as elapsed:
            counts = await asyncio.gather(*(loop(conn) for conn in conns))
        left = await conns[0].fetchval("SELECT count(*) FROM jobs")
    finally:
        for conn in conns:
            await conn.close()
    return {
        "seconds": elapsed.seconds,
        "cpu_seconds": elapsed.cpu_seconds,
        "jobs": jobs,
        "handled": sum(counts),
        "left": left,
        "connections": connections,
        "batch": batch,
    }
