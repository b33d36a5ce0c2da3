"""The suite's own SQL on MariaDB (and MySQL): connections, throwaway databases, clean tables.

What :mod:`benchmarks.harness` does with asyncpg on PostgreSQL, done here on bare asyncmy (the
driver routemq-outbox itself uses on this family), with autocommit on. Differences that show
in the numbers:

- There is no ``VACUUM`` and no ``CHECKPOINT``. ``TRUNCATE`` recreates a table (no dead rows,
  no purge backlog left behind), ``ANALYZE TABLE`` refreshes InnoDB's persistent statistics;
  dirty pages are flushed by the server's page cleaner in its own time (forcing it would need
  a global setting, and the suite never changes server settings), so writes of one
  measurement can be flushed during the next one.
- There is no ``DROP DATABASE … WITH (FORCE)``: before dropping one of its databases the suite
  ends the connections still using *that* database (a killed child's), which are its own.
- Backlogs are loaded with MariaDB's ``SEQUENCE`` engine (``seq_1_to_N``), the counterpart of
  ``generate_series``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Sequence
from typing import Any

import asyncmy
from asyncmy.errors import OperationalError
from sqlalchemy.engine import make_url

from . import harness

__all__ = [
    "SERVER_PROCESSES",
    "analyze",
    "close",
    "connect",
    "create_database",
    "drop_databases",
    "execute",
    "fetchval",
    "load_backlog",
    "reset_tables",
    "server_info",
    "sweep_stale",
]

# Process names of the server, whose CPU is the database's work, not "other load".
SERVER_PROCESSES = frozenset({"mariadbd", "mysqld"})

_TOO_MANY_CONNECTIONS = 1040
CONNECT_PATIENCE_S = 120.0
# Administrative statements give up on a metadata lock after this long instead of hanging
# (the server's default lock_wait_timeout is a year).
LOCK_WAIT_TIMEOUT_S = 120
BACKLOG_CHUNK = 100_000  # rows per INSERT … SELECT FROM seq_…: each its own transaction


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


async def connect(url: str, *, database: bool = True) -> Any:
    """An autocommit asyncmy connection, retried while the server is out of connections."""
    parsed = make_url(url)
    deadline = time.perf_counter() + CONNECT_PATIENCE_S
    pause = 0.2
    while True:
        try:
            conn = await asyncmy.connect(
                host=parsed.host or "127.0.0.1",
                port=parsed.port or 3306,
                user=parsed.username or "root",
                password=parsed.password or "",
                db=(parsed.database or None) if database else None,
                autocommit=True,
                charset="utf8mb4",
            )
        except OperationalError as exc:
            if exc.args and exc.args[0] == _TOO_MANY_CONNECTIONS:
                if time.perf_counter() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            raise
        async with conn.cursor() as cur:
            await cur.execute(f"SET SESSION lock_wait_timeout = {LOCK_WAIT_TIMEOUT_S}")
        return conn


async def close(conn: Any) -> None:
    """Say goodbye to the server (COM_QUIT), or just drop the socket if that fails."""
    try:
        await conn.ensure_closed()
    except Exception:
        conn.close()


async def _run(conn: Any, statement: str, args: Sequence[Any] | None = None) -> list[Any]:
    async with conn.cursor() as cur:
        await cur.execute(statement, args)
        return list(await cur.fetchall() or [])


async def execute(url: str, *statements: str) -> None:
    conn = await connect(url)
    try:
        for statement in statements:
            await _run(conn, statement)
    finally:
        await close(conn)


async def fetchval(url: str, query: str) -> Any:
    conn = await connect(url)
    try:
        rows = await _run(conn, query)
    finally:
        await close(conn)
    return rows[0][0] if rows else None


async def reset_tables(url: str, tables: Sequence[str]) -> None:
    """Empty ``tables`` (``TRUNCATE`` recreates each, restarting AUTO_INCREMENT) and analyze
    them: the counterpart of PostgreSQL's TRUNCATE + VACUUM (ANALYZE) + CHECKPOINT, minus the
    checkpoint (see the module docstring)."""
    conn = await connect(url)
    try:
        for table in tables:
            await _run(conn, f"TRUNCATE TABLE {quote_ident(table)}")
        if tables:
            await _run(conn, "ANALYZE TABLE " + ", ".join(quote_ident(t) for t in tables))
    finally:
        await close(conn)


async def analyze(url: str, tables: Sequence[str]) -> None:
    """Fresh optimizer statistics for a just-loaded backlog."""
    conn = await connect(url)
    try:
        await _run(conn, "ANALYZE TABLE " + ", ".join(quote_ident(t) for t in tables))
    finally:
        await close(conn)


async def load_backlog(url: str, count: int) -> None:
    """``count`` due no-op jobs, ``available_at`` rising with the id one millisecond apart (as
    rows dispatched over time would be), inserted server-side, then analyzed."""
    conn = await connect(url)
    try:
        for start in range(1, count + 1, BACKLOG_CHUNK):
            end = min(start + BACKLOG_CHUNK - 1, count)
            await _run(
                conn,
                f"""
                INSERT INTO jobs (queue, payload, available_at)
                SELECT 'default',
                       JSON_OBJECT('job', 'bench.noop', 'data', JSON_OBJECT('n', seq)),
                       UTC_TIMESTAMP(6) - INTERVAL (({count} - seq) * 1000) MICROSECOND
                FROM seq_{start}_to_{end}
                """,
            )
        await _run(conn, "ANALYZE TABLE jobs")
    finally:
        await close(conn)


async def server_info(url: str) -> dict[str, Any]:
    """The server settings that decide these numbers, recorded with every result."""
    conn = await connect(url)
    try:
        info: dict[str, Any] = {"version": (await _run(conn, "SELECT VERSION()"))[0][0]}
        for name in (
            "innodb_flush_log_at_trx_commit",
            "sync_binlog",
            "log_bin",
            "innodb_buffer_pool_size",
            "innodb_doublewrite",
            "innodb_flush_method",
            "max_connections",
            "tx_isolation",
            "transaction_isolation",
        ):
            rows = await _run(conn, "SHOW GLOBAL VARIABLES LIKE %s", (name,))
            if rows:
                info[name] = rows[0][1]
        return info
    finally:
        await close(conn)


async def _drop(conn: Any, name: str) -> None:
    """Drop database ``name`` after ending the connections still using it (ours: the database
    carries this run's pid), so a killed child's open transaction cannot block the drop."""
    rows = await _run(
        conn,
        "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
        (name,),
    )
    for (session_id,) in rows:
        with contextlib.suppress(OperationalError):  # it may have gone meanwhile
            await _run(conn, f"KILL CONNECTION {int(session_id)}")
    exists = await _run(
        conn, "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (name,)
    )
    if exists:  # (IF EXISTS alone would print the server's note about a missing database)
        await _run(conn, f"DROP DATABASE IF EXISTS {quote_ident(name)}")


async def create_database(maintenance_url: str, name: str) -> None:
    conn = await connect(maintenance_url, database=False)
    try:
        await _drop(conn, name)  # a leftover of a killed run with the same pid
        await _run(conn, f"CREATE DATABASE {quote_ident(name)} CHARACTER SET utf8mb4")
    finally:
        await close(conn)


async def drop_databases(maintenance_url: str, names: list[str]) -> None:
    """Drop ``names`` (emptying the list as it goes)."""
    conn = await connect(maintenance_url, database=False)
    try:
        while names:
            await _drop(conn, names.pop())
    finally:
        await close(conn)


async def sweep_stale(maintenance_url: str, pattern: str) -> list[str]:
    """Drop databases matching ``pattern`` (``bench_<system>_<pid>``) whose pid is gone."""
    conn = await connect(maintenance_url, database=False)
    dropped = []
    try:
        rows = await _run(conn, "SELECT schema_name FROM information_schema.schemata")
        for (name,) in rows:
            if not re.fullmatch(pattern, name):
                continue
            if not harness.run_gone(name):
                continue
            await _drop(conn, name)
            dropped.append(name)
    finally:
        await close(conn)
    return dropped
