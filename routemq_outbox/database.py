"""Engines: the one place that creates them, with the settings each engine family needs.

SQLite gets WAL (readers never wait for the writer), a busy timeout (writers queue instead of
failing with "database is locked"), and a real BEGIN for every transaction instead of the
driver's habit of starting one only before the first write (so reads inside a transaction see
one snapshot). Every transaction the library itself runs starts with its write, which takes the
write lock at once: two writers never deadlock upgrading a read lock.

MySQL and MariaDB get READ COMMITTED, the level PostgreSQL uses by default. Under their own
default, REPEATABLE READ, InnoDB's locking reads and searched updates lock the gaps between
the index entries they scan as well (next-key locks), so a dispatch inserting next to a row a
worker is claiming or finishing waits for that worker's commit, and gap locks are the usual
ingredient of InnoDB deadlocks. READ COMMITTED locks only the rows a statement takes, and
releases at once the rows it reads but does not take. Connections are recycled after
``MYSQL_POOL_RECYCLE_S``, before the server's ``wait_timeout`` (or a proxy's idle limit)
closes them under the pool.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .config import async_url, database_url, dialect_family, redact, sync_url
from .errors import ConfigurationError

__all__ = ["connection_engine", "connection_sync_engine", "create_engine", "create_sync_engine"]

SQLITE_BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MYSQL_ISOLATION_LEVEL = "READ COMMITTED"
MYSQL_POOL_RECYCLE_S = 1800

_DRIVER_PACKAGES = {
    "asyncpg": "asyncpg",
    "psycopg": "psycopg[binary]",
    "aiosqlite": "aiosqlite",
    "asyncmy": "asyncmy",
    "aiomysql": "aiomysql",
    "pymysql": "PyMySQL",
}
_EXTRAS = {"asyncmy": "mysql", "pymysql": "mysql", "psycopg": "sync"}


def _driver_missing(url: URL, exc: BaseException) -> ConfigurationError:
    driver = url.get_driver_name()
    package = _DRIVER_PACKAGES.get(driver, driver)
    if driver in _EXTRAS:
        package = f'"routemq-outbox[{_EXTRAS[driver]}]"'
    return ConfigurationError(
        f"the database driver {driver!r} for {redact(url)} is not installed "
        f"(pip install {package}): {exc}"
    )


def _family_options(url: URL) -> dict[str, Any]:
    """Engine options each family needs, before the caller's own."""
    family = dialect_family(url)
    if family == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if family == "mysql":
        return {"isolation_level": MYSQL_ISOLATION_LEVEL, "pool_recycle": MYSQL_POOL_RECYCLE_S}
    return {}


def _sqlite_setup(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Take transaction control from the driver, so that BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")


def create_engine(
    url: str | URL, *, pool_size: int = 5, worker: bool = False, **kwargs: Any
) -> AsyncEngine:
    """An AsyncEngine for ``url`` (any driver is swapped for the asyncio one).

    ``worker=True`` is for the worker's own bookkeeping. On PostgreSQL its commits do not wait
    for the WAL flush (``synchronous_commit = off``): a database crash can forget the last
    fraction of a second of claims and deletions, which at worst runs a job again, as
    at-least-once delivery allows, and in exchange a commit costs no disk wait. Jobs
    themselves, and producers, keep full durability.

    Keyword arguments go to :func:`~sqlalchemy.ext.asyncio.create_async_engine` and win over
    the settings above (``isolation_level="REPEATABLE READ"`` restores MySQL's default).
    """
    target = async_url(url)
    options = _family_options(target)
    if "poolclass" not in kwargs:
        options.update(pool_size=pool_size, max_overflow=pool_size)
    if dialect_family(target) == "postgresql" and target.get_driver_name() == "asyncpg":
        settings = {"application_name": "routemq-outbox" + (" worker" if worker else "")}
        if worker:
            settings["synchronous_commit"] = "off"
        # A connection attempt that hangs (a server going down or coming up, a network
        # partition) fails after this long and is retried, rather than stall a loop for the
        # driver's default minute.
        options["connect_args"] = {"server_settings": settings, "timeout": CONNECT_TIMEOUT_S}
    options.update(kwargs)
    try:
        engine = create_async_engine(target, **options)
    except (ImportError, NoSuchModuleError) as exc:
        raise _driver_missing(target, exc) from None
    if dialect_family(target) == "sqlite":
        _sqlite_setup(engine.sync_engine)
    return engine


def create_sync_engine(url: str | URL, **kwargs: Any) -> Engine:
    """A blocking Engine for ``url``, for the ``*_sync`` dispatch twins."""
    target = sync_url(url)
    options = {"pool_pre_ping": True, **_family_options(target)}
    options.update(kwargs)
    try:
        engine = sa.create_engine(target, **options)
    except (ImportError, NoSuchModuleError) as exc:
        raise _driver_missing(target, exc) from None
    if dialect_family(target) == "sqlite":
        _sqlite_setup(engine)
    return engine


# Engines used when a dispatch call gets no session: one per event loop (an asyncio connection
# belongs to the loop that opened it) and URL. The URL is read from the environment on every
# call, so changing it (as tests do) takes effect at once.
_async_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncEngine]] = (
    weakref.WeakKeyDictionary()
)
_sync_engines: dict[str, Engine] = {}
_sync_lock = threading.Lock()


def connection_engine(connection: str) -> AsyncEngine:
    """The shared AsyncEngine of the named connection, for the running event loop."""
    url = database_url(connection)
    per_loop = _async_engines.setdefault(asyncio.get_running_loop(), {})
    engine = per_loop.get(url)
    if engine is None:
        engine = per_loop[url] = create_engine(url, pool_pre_ping=True)
    return engine


def connection_sync_engine(connection: str) -> Engine:
    """The shared blocking Engine of the named connection."""
    url = database_url(connection)
    with _sync_lock:
        engine = _sync_engines.get(url)
        if engine is None:
            engine = _sync_engines[url] = create_sync_engine(url)
    return engine
