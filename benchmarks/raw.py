"""The suite's own reference points, written without the library.

- The dispatch baseline: the business INSERT plus a hand-written SQLAlchemy INSERT into the
  ``jobs`` table, in the same kind of transaction as ``dispatch(job, session=conn)``.
- The drain ceiling: claim 100 rows per statement (CTE ... FOR UPDATE SKIP LOCKED, then
  UPDATE ... RETURNING) and delete them in one batched statement, on bare asyncpg with a few
  connections. Nothing a worker does beyond that (leases, tokens, job objects, tasks) is in it,
  so it is the best drain this schema allows from Python, against which ours is judged.
- On MariaDB the same on bare asyncmy: one transaction per claim (``SELECT … FOR UPDATE SKIP
  LOCKED`` of 100 ids and payloads, ``UPDATE … WHERE id IN (…)``, COMMIT, as the library's
  claim does it), then one autocommitted ``DELETE … WHERE id IN (…)``.
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
    "ceiling_child_mysql",
    "insert_job_row",
    "order_params",
    "orders_ddl",
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
# The same table on MariaDB/MySQL: InnoDB, utf8mb4, a clustered auto-increment key.
ORDERS_DDL_MYSQL = f"""
CREATE TABLE IF NOT EXISTS {ORDERS_TABLE} (
    id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
    customer varchar(255) NOT NULL,
    amount_cents integer NOT NULL,
    created_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4
"""


def orders_ddl(family: str) -> str:
    """The business table's DDL for the ``postgresql`` or ``mysql`` family."""
    return ORDERS_DDL_MYSQL if family == "mysql" else ORDERS_DDL


ORDER_INSERT = sa.text(
    f"INSERT INTO {ORDERS_TABLE} (customer, amount_cents) VALUES (:customer, :amount_cents)"
)

JOB_INSERT = sa.text("INSERT INTO jobs (queue, payload) VALUES (:queue, CAST(:payload AS jsonb))")
# MariaDB's JSON column is LONGTEXT with a json_valid() CHECK: the text goes in as it is.
JOB_INSERT_MYSQL = sa.text("INSERT INTO jobs (queue, payload) VALUES (:queue, :payload)")


def order_params(n: int) -> dict[str, Any]:
    return {"customer": f"customer-{n % 997}", "amount_cents": 100 + n % 10_000}


async def insert_job_row(conn: AsyncConnection, n: int) -> None:
    """The baseline enqueue: serialise the same payload ours stores, one plain INSERT."""
    payload = json.dumps({"job": "bench.noop", "data": {"n": n}}, separators=(",", ":"))
    statement = JOB_INSERT if conn.dialect.name == "postgresql" else JOB_INSERT_MYSQL
    await conn.execute(statement, {"queue": "default", "payload": payload})


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
    return elapsed.result(
        jobs,
        handled=sum(counts),
        left=left,
        connections=connections,
        batch=batch,
    )


# ------------------------------------------------------------------- ceiling on MariaDB

CLAIM_MYSQL = """
SELECT id, payload FROM jobs
WHERE queue = %s AND reserved_at IS NULL AND available_at <= UTC_TIMESTAMP(6)
ORDER BY available_at, id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""
MARK_MYSQL = """
UPDATE jobs
SET reserved_at = UTC_TIMESTAMP(6), token = %s,
    lease_expires_at = UTC_TIMESTAMP(6) + INTERVAL 60 SECOND, attempts = attempts + 1
WHERE id IN ({ids})
"""
DELETE_MYSQL = "DELETE FROM jobs WHERE id IN ({ids})"


async def ceiling_child_mysql(url: str, jobs: int, connections: int, batch: int) -> dict[str, Any]:
    """Drain the backlog at ``url`` with ``connections`` claim/delete loops on bare asyncmy.

    Sessions run at READ COMMITTED, as routemq-outbox's do (see routemq_outbox.database).
    """
    from . import mariadb

    conns = [await mariadb.connect(url) for _ in range(connections)]
    try:
        for conn in conns:
            async with conn.cursor() as cur:
                await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")

        async def loop(conn: Any) -> int:
            done = 0
            token = secrets.randbits(63)
            async with conn.cursor() as cur:
                while True:
                    await conn.begin()
                    await cur.execute(CLAIM_MYSQL, ("default", batch))
                    rows = await cur.fetchall()
                    if not rows:
                        await conn.commit()
                        return done
                    ids = ",".join(str(int(row[0])) for row in rows)
                    await cur.execute(MARK_MYSQL.format(ids=ids), (token,))
                    await conn.commit()
                    # The "work": decode each payload, as any worker must to know the job.
                    for row in rows:
                        json.loads(row[1])
                    await cur.execute(DELETE_MYSQL.format(ids=ids))
                    done += len(rows)

        with harness.stopwatch() as elapsed:
            counts = await asyncio.gather(*(loop(conn) for conn in conns))
        async with conns[0].cursor() as cur:
            await cur.execute("SELECT count(*) FROM jobs")
            (left,) = await cur.fetchone()
    finally:
        for conn in conns:
            await mariadb.close(conn)
    return elapsed.result(
        jobs,
        handled=sum(counts),
        left=left,
        connections=connections,
        batch=batch,
    )
