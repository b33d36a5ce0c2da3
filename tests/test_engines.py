"""The engines routemq-outbox makes: the shared ones of calls without a session (disposed with
their event loop, never shared with a forked child), SQLite's transactions beside a busy
worker, the bound on every connection attempt, the libpq parameters of PostgreSQL URLs, and
SQLite files that do not exist."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from routemq_outbox import Worker, admin, database, dispatch, dispatch_sync, queue
from routemq_outbox.config import dialect_family
from routemq_outbox.database import (
    connection_engine,
    connection_sync_engine,
    create_engine,
    create_sync_engine,
)
from routemq_outbox.errors import ConfigurationError
from routemq_outbox.migrate import upgrade

from .conftest import run_cli
from .jobs import CREATE_LOG
from .processes import PrivatePostgres, wait_until
from .test_worker import record, settings

# ----------------------------------------------------------------------------- shared engines


@pytest.fixture
def small_server() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server that takes 20 connections (17 for ordinary users), migrated."""
    server = PrivatePostgres("max_connections=20")
    server.start()
    upgrade(server.url())
    yield server
    server.close()


def backends(server: PrivatePostgres) -> int:
    """Connections the library holds open on ``server`` (dispatch names them)."""
    engine = create_sync_engine(server.url(), poolclass=NullPool)
    with engine.connect() as conn:
        count = conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": "routemq-outbox"},
        ).scalar_one()
    engine.dispose()
    return int(count)


def test_every_short_lived_event_loop_gives_its_connections_back(
    small_server: PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``asyncio.run(dispatch(…))`` per request or per script: each loop's engine is disposed
    when the loop ends, so the server's 17 connections last for any number of loops."""
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", small_server.url())
    for n in range(300):
        asyncio.run(queue.push(record(f"loop-{n}")))
        if n in (0, 150):
            assert backends(small_server) == 0

    def from_a_thread(n: int) -> None:  # a blocking handle() that runs a loop of its own
        asyncio.run(queue.push(record(f"thread-{n}")))

    with ThreadPoolExecutor(8) as threads:
        list(threads.map(from_a_thread, range(40)))
    assert asyncio.run(queue.size()) == 340
    assert backends(small_server) == 0


async def test_a_long_lived_loop_keeps_its_connection_between_dispatches(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", pg_url)
    await dispatch(record("first"))
    connects: list[object] = []
    sa.event.listen(
        connection_engine("default").sync_engine, "connect", lambda *args: connects.append(args)
    )
    for n in range(200):
        await dispatch(record(f"again-{n}"))
    assert connects == []
    assert await queue.size() == 201


def test_a_forked_child_opens_connections_of_its_own(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that reused the parent's pooled connection would talk over the parent's socket
    (the database cannot tell them apart); one forked while another thread creates an engine
    would wait forever for a lock that no thread of the child will release."""
    if dialect_family(db_url) == "sqlite":
        pytest.skip("an SQLite connection has no server side to tell the processes apart")
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", db_url)
    ask = "SELECT pg_backend_pid()" if "postgresql" in db_url else "SELECT CONNECTION_ID()"

    def session_id() -> int:
        with connection_sync_engine("default").connect() as conn:
            return int(conn.exec_driver_sql(ask).scalar_one())

    parent = session_id()
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with database._lock:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    holding.wait(10)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            answer = str(session_id()).encode()
        except BaseException as exc:
            answer = repr(exc).encode()
        os.write(write, answer)
        os._exit(0)
    release.set()
    holder.join()
    os.close(write)
    waited = 0.0
    while waited < 30 and os.waitpid(child, os.WNOHANG) == (0, 0):
        threading.Event().wait(0.1)
        waited += 0.1
    if waited >= 30:
        os.kill(child, 9)
        os.waitpid(child, 0)
    reply = os.read(read, 200).decode()
    os.close(read)
    assert reply.isdigit(), f"the child did not answer (deadlocked?): {reply!r}"
    assert int(reply) != parent
    assert session_id() == parent  # and the parent's connection is still its own


# ----------------------------------------------------------------------------- SQLite


async def _business(engine: Any, n: int) -> None:
    """A transaction that reads before it writes, and dispatches a job."""
    async with AsyncSession(engine) as session, session.begin():
        count = (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one()
        await asyncio.sleep(0.005)  # the business logic between the read and the write
        await session.execute(sa.text("INSERT INTO orders (n) VALUES (:n)"), {"n": count})
        await dispatch(record(f"order-{n}"), session=session)


def _prepare(url: str) -> None:
    engine = create_sync_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(CREATE_LOG)
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, n INTEGER)")
    engine.dispose()


def _ran(url: str) -> int:
    engine = create_sync_engine(url)
    with engine.connect() as conn:
        count = conn.exec_driver_sql("SELECT count(*) FROM job_log").scalar_one()
    engine.dispose()
    return int(count)


async def test_sqlite_transactions_that_read_first_commit_beside_a_busy_worker(
    sqlite_url: str, spawn: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    _prepare(sqlite_url)
    worker = spawn(sqlite_url, "--sleep", "0.01")
    await dispatch(record("warm-up"))
    await asyncio.to_thread(wait_until, lambda: _ran(sqlite_url) == 1, 60, "the worker")
    engine = create_engine(sqlite_url)
    failures = []
    for n in range(200):
        try:
            await _business(engine, n)
        except sa.exc.OperationalError as exc:
            failures.append(str(exc.orig))
    await engine.dispose()
    assert failures == []
    await asyncio.to_thread(wait_until, lambda: _ran(sqlite_url) == 201, 60, "the jobs")
    worker.kill()


def test_sqlite_sync_transactions_that_read_first_commit_beside_a_busy_worker(
    sqlite_url: str, spawn: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    _prepare(sqlite_url)
    worker = spawn(sqlite_url, "--sleep", "0.01")
    dispatch_sync(record("warm-up"))
    wait_until(lambda: _ran(sqlite_url) == 1, 60, "the worker")
    engine = create_sync_engine(sqlite_url)
    failures = []
    for n in range(200):
        try:
            with Session(engine) as session, session.begin():
                count = session.execute(sa.text("SELECT count(*) FROM orders")).scalar_one()
                threading.Event().wait(0.005)
                session.execute(sa.text("INSERT INTO orders (n) VALUES (:n)"), {"n": count})
                dispatch_sync(record(f"order-{n}"), session=session)
        except sa.exc.OperationalError as exc:
            failures.append(str(exc.orig))
    engine.dispose()
    assert failures == []
    wait_until(lambda: _ran(sqlite_url) == 201, 60, "the jobs")
    worker.kill()


def _write_lock_is_free(path: str) -> bool:
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()
    return True


async def test_sqlite_transactions_take_the_write_lock_at_their_first_write(
    sqlite_url: str,
) -> None:
    """Reads before it never hold up (nor wait for) a writer; ``sqlite_begin="immediate"``
    takes the lock at BEGIN, for a read-modify-write that must see no concurrent change."""
    path = sa.make_url(sqlite_url).database
    assert path is not None
    engine = create_engine(sqlite_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text("SELECT count(*) FROM jobs"))
        assert _write_lock_is_free(path)
        await queue.push(record("x"), session=conn)
        assert not _write_lock_is_free(path)
        # Another connection still reads, at once, what is committed.
        async with engine.connect() as reader:
            pending = await asyncio.wait_for(queue.size(session=reader), 10)
        assert pending == 0
    assert _write_lock_is_free(path)

    async with engine.connect() as conn:
        conn = await conn.execution_options(sqlite_begin="immediate")
        await conn.execute(sa.text("SELECT count(*) FROM jobs"))
        assert not _write_lock_is_free(path)
    session = AsyncSession(engine.execution_options(sqlite_begin="immediate"))
    async with session, session.begin():
        await session.execute(sa.text("SELECT 1"))
        assert not _write_lock_is_free(path)
    immediate = create_engine(sqlite_url, sqlite_begin="immediate")
    async with immediate.begin() as conn:
        await conn.execute(sa.text("SELECT 1"))
        assert not _write_lock_is_free(path)
    await immediate.dispose()

    async with engine.begin() as conn:  # DDL and savepoints are writes: in the transaction
        await conn.execute(sa.text("CREATE TABLE scratch (x INTEGER)"))
        async with conn.begin_nested() as savepoint:
            await conn.execute(sa.text("INSERT INTO scratch VALUES (1)"))
            await savepoint.rollback()
        await conn.rollback()
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    assert "scratch" not in tables
    await engine.dispose()
    with pytest.raises(ConfigurationError, match="sqlite_begin must be one of"):
        create_engine(sqlite_url, sqlite_begin="later")  # type: ignore[arg-type]


async def test_a_missing_sqlite_file_is_refused_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mistyped.db"
    url = f"sqlite:///{path}"
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    message = f"no SQLite database at {path}: check the database URL, or create"
    with pytest.raises(ConfigurationError, match=message):
        await dispatch(record("x"))
    with pytest.raises(ConfigurationError, match=message):
        dispatch_sync(record("x"))
    engine = create_engine(url)
    with pytest.raises(ConfigurationError, match=message):
        await admin.queue_stats(engine)
    await engine.dispose()
    caplog.set_level(logging.WARNING, "routemq_outbox")
    waiting = Worker(settings(url, max_time=1.0, stop_when_empty=False))
    stats = await asyncio.wait_for(waiting.run(), 60)
    assert stats.claimed == 0
    assert message in caplog.text  # a long-running worker waits for the database, saying why
    with pytest.raises(ConfigurationError, match=message):  # one told to stop does not
        await asyncio.wait_for(Worker(settings(url)).run(), 60)
    assert not path.exists()

    made = create_sync_engine(url, create_file=True)
    with made.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    made.dispose()
    assert path.exists()


# ----------------------------------------------------------------------------- connecting


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port where connections are accepted (by the kernel) and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(50)
        yield listener.getsockname()[1]


async def test_a_mysql_server_that_never_answers_fails_the_attempt(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "CONNECT_TIMEOUT_S", 0.5)
    url = f"mysql://app@127.0.0.1:{silent_server}/app"
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    engine = create_engine(url)
    expected = "Can't connect to MySQL server on '127.0.0.1' (no answer in 0.5 s)"
    with pytest.raises(sa.exc.OperationalError, match=re.escape(expected)):
        await asyncio.wait_for(admin.queue_stats(engine), 30)
    await engine.dispose()
    with pytest.raises(sa.exc.OperationalError, match=re.escape(expected)):
        await asyncio.wait_for(dispatch(record("x")), 30)

    outcome: list[BaseException] = []

    def blocking() -> None:
        try:
            dispatch_sync(record("x"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocking, daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert outcome, "dispatch_sync still waits for the server"
    assert isinstance(outcome[0], sa.exc.OperationalError)
    assert expected in str(outcome[0])


def test_the_handshake_bound_is_not_a_query_timeout(
    mariadb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "CONNECT_TIMEOUT_S", 0.5)
    engine = create_sync_engine(mariadb_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT SLEEP(1)").scalar_one() == 0
    engine.dispose()


# ----------------------------------------------------------------------------- URLs


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


async def _show(url: str, setting: str, **options: Any) -> str:
    engine = create_engine(url, **options)
    try:
        async with engine.connect() as conn:
            return str((await conn.exec_driver_sql(f"SHOW {setting}")).scalar_one())
    finally:
        await engine.dispose()


async def test_postgresql_urls_may_carry_libpq_parameters(pg_url: str) -> None:
    for mode in ("disable", "allow", "prefer"):
        assert await _show(_with_query(pg_url, f"sslmode={mode}"), "ssl") in ("on", "off")
    url = _with_query(
        pg_url,
        "sslmode=prefer&connect_timeout=5&application_name=shop&options=-c%20work_mem%3D5MB"
        "&channel_binding=prefer&fallback_application_name=other",
    )
    assert await _show(url, "application_name") == "shop"
    assert await _show(url, "work_mem") == "5MB"
    assert await _show(pg_url, "application_name") == "routemq-outbox"
    # connect_args of the caller's own join ours instead of replacing them.
    mine = {"connect_args": {"server_settings": {"work_mem": "6MB"}}}
    assert await _show(pg_url, "work_mem", **mine) == "6MB"
    assert await _show(pg_url, "application_name", **mine) == "routemq-outbox"

    # The sync twins' psycopg hands them to libpq unchanged.
    engine = create_sync_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW application_name").scalar_one() == "shop"
        assert conn.exec_driver_sql("SHOW work_mem").scalar_one() == "5MB"
    engine.dispose()


async def test_sslmode_require_on_a_server_without_ssl_says_so(pg_url: str) -> None:
    if await _show(pg_url, "ssl") == "on":
        pytest.skip("the test server has SSL")
    engine = create_engine(_with_query(pg_url, "sslmode=require"))
    with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
        await admin.queue_stats(engine)
    await engine.dispose()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("keepalives=1", "unsupported database URL parameter 'keepalives'"),
        ("channel_binding=require", "parameter 'channel_binding=require'"),
        ("sslmode=yes", "sslmode must be one of disable, allow, prefer, require, verify-ca"),
        ("sslmode=verify-full&sslrootcert=/no/ca.pem", "no sslrootcert file /no/ca.pem"),
        ("connect_timeout=soon", "connect_timeout must be a positive number of seconds"),
    ],
)
def test_postgresql_url_parameters_asyncpg_cannot_honour_are_refused(
    query: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("?", r"\?")):
        create_engine(f"postgresql://app@db.invalid/app?{query}")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@127.0.0.1:99999/app",
        "mysql://app@127.0.0.1:0/app",
        "postgresql://app@127.0.0.1/app?keepalives=1",
    ],
)
def test_the_cli_refuses_a_bad_url_in_one_line(url: str) -> None:
    result = run_cli("stats", "--database-url", url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("routemq-outbox: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "pw" not in result.stderr
