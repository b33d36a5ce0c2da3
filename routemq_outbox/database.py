"""Engines: the one place that creates them, with the settings each engine family needs.

SQLite gets WAL (readers never wait for the writer), a busy timeout (writers queue instead of
failing with "database is locked"), and transactions that take the write lock with
``BEGIN IMMEDIATE`` just before their first write. IMMEDIATE waits for the lock (the busy
timeout). A DEFERRED transaction (SQLite's default ``BEGIN``) that has read cannot: its first
write needs its snapshot to be the newest, and once another connection has committed since
(a worker finishing a job, say) SQLite fails the write at once with "database is locked"
(SQLITE_BUSY_SNAPSHOT in WAL mode). Statements before a transaction's first write run on their
own, each seeing the latest commit, like PostgreSQL's READ COMMITTED: business code that reads,
then writes and dispatches, never fails that way beside a busy worker, and read-only work
never takes the write lock, so it never waits for (nor holds up) a writer. This differs from
Python's sqlite3 default only in what counts as a write (DDL, ``SAVEPOINT``, a ``WITH`` that
writes) and in IMMEDIATE. ``sqlite_begin`` chooses otherwise, per engine or as an execution
option of a connection (or of a session's bind): ``"immediate"`` begins at once, so the reads
too are protected from concurrent writes (for a read-modify-write that must not lose an
update), ``"deferred"`` gives a read-only transaction one snapshot. Every transaction the
library itself runs on SQLite starts with its write.

SQLite engines also refuse a database file that does not exist, so that a mistyped path is an
error instead of a new, empty database; ``create_file=True`` (what ``routemq-outbox migrate``
uses) creates it.

MySQL and MariaDB get READ COMMITTED, the level PostgreSQL uses by default. Under their own
default, REPEATABLE READ, InnoDB's locking reads and searched updates lock the gaps between
the index entries they scan as well (next-key locks), so a dispatch inserting next to a row a
worker is claiming or finishing waits for that worker's commit, and gap locks are the usual
ingredient of InnoDB deadlocks. READ COMMITTED locks only the rows a statement takes, and
releases at once the rows it reads but does not take. Connections are recycled after
``MYSQL_POOL_RECYCLE_S``, before the server's ``wait_timeout`` (or a proxy's idle limit)
closes them under the pool.

Every family bounds the whole connection attempt, handshake included, by
``CONNECT_TIMEOUT_S``: a server (or a proxy) that accepts the TCP connection and never answers
fails the attempt instead of hanging it.

PostgreSQL URLs may carry libpq's parameters (``?sslmode=require``, ``sslrootcert=…``,
``connect_timeout=…``, ``application_name=…``), as ``DATABASE_URL`` usually does. asyncpg takes
none of them as keyword arguments, so they are translated for it; a parameter that asyncpg
cannot honour is refused with a :class:`~routemq_outbox.errors.ConfigurationError` rather than
dropped. psycopg (the sync twins) hands them to libpq as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .config import async_url, database_url, dialect_family, redact, sync_url
from .errors import ConfigurationError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "BlockingSqlite",
    "SqliteBegin",
    "connection_engine",
    "connection_sync_engine",
    "create_engine",
    "create_sync_engine",
    "dispose_sync_engines",
]

_T = TypeVar("_T")

SQLITE_BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MYSQL_ISOLATION_LEVEL = "READ COMMITTED"
MYSQL_POOL_RECYCLE_S = 1800

SqliteBegin = Literal["first_write", "immediate", "deferred", "exclusive"]
"""How an SQLite transaction begins: see the module's docstring."""
SQLITE_BEGIN_OPTION = "sqlite_begin"
_SQLITE_BEGIN = {
    "first_write": "",
    "immediate": "BEGIN IMMEDIATE",
    "deferred": "BEGIN",
    "exclusive": "BEGIN EXCLUSIVE",
}
# Statements that only read: they may run before the transaction begins. Anything else (DML,
# DDL, SAVEPOINT, a PRAGMA that sets) is taken for a write, which costs at worst a lock.
_READING = re.compile(r"\s*\(*\s*(SELECT|VALUES|EXPLAIN|WITH|PRAGMA)\b", re.IGNORECASE)
_WRITING_WORD = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)

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


def _merge_options(options: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The caller's options over ours; ``connect_args`` (and asyncpg's ``server_settings``
    inside them) are merged key by key, so that passing one does not drop the others."""
    merged = {**options, **kwargs}
    if "connect_args" in options and "connect_args" in kwargs:
        ours, theirs = options["connect_args"], kwargs["connect_args"]
        connect_args = {**ours, **theirs}
        if "server_settings" in ours and "server_settings" in theirs:
            connect_args["server_settings"] = {
                **ours["server_settings"],
                **theirs["server_settings"],
            }
        merged["connect_args"] = connect_args
    return merged


# ----------------------------------------------------------------------------- SQLite


def _sqlite_begin(mode: str) -> str:
    try:
        return _SQLITE_BEGIN[mode]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"sqlite_begin must be one of {', '.join(_SQLITE_BEGIN)}, got {mode!r}"
        ) from None


def _sqlite_file(url: URL) -> Path | None:
    """The file an SQLite URL opens, or None for an in-memory database or a ``file:`` URI
    (whose own ``mode=`` says whether it may be created)."""
    database = url.database
    if not database or database == ":memory:" or "uri" in url.query:
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def _only_reads(statement: str) -> bool:
    match = _READING.match(statement)
    if match is None:
        return False
    word = match[1].upper()
    if word == "WITH":
        return _WRITING_WORD.search(statement) is None
    if word == "PRAGMA":
        return "=" not in statement
    return True


def _sqlite_setup(sync_engine: Engine, begin: str, file: Path | None) -> None:
    @event.listens_for(sync_engine, "do_connect")
    def _refuse_a_missing_file(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        # Checked at each connect, not when the engine is made: an application may make its
        # engine at import time and migrate at start-up.
        if file is not None and not file.exists():
            raise ConfigurationError(
                f"no SQLite database at {file.absolute()}: check the database URL, or "
                "create the database with routemq-outbox migrate"
            )

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Take transaction control from the driver, so that every BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    def _begin_of(connection: sa.Connection) -> str | None:
        """The connection's BEGIN ("" to begin at the first write), None for none at all."""
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return None
        mode = options.get(SQLITE_BEGIN_OPTION)
        return begin if mode is None else _sqlite_begin(mode)

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        statement = _begin_of(connection)
        if statement:
            connection.exec_driver_sql(statement)

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _before_first_write(
        connection: sa.Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if (
            connection.in_transaction()
            and not _driver(connection).in_transaction
            and not _only_reads(statement)
            and _begin_of(connection) == ""
        ):
            cursor.execute("BEGIN IMMEDIATE")


def _driver(connection: sa.Connection) -> Any:
    """The driver's own connection (sqlite3's, or aiosqlite's, which mirrors its state)."""
    return connection.connection.driver_connection


# ----------------------------------------------------------------------------- PostgreSQL

# libpq parameters that asyncpg understands only inside a DSN, not as arguments of connect():
# they travel in a DSN that holds nothing else (the explicit arguments win over a DSN's).
_ASYNCPG_DSN_PARAMETERS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
    }
)
_SSL_FILES = frozenset({"sslcert", "sslkey", "sslrootcert", "sslcrl"})
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq parameters that are settings of the server session, sent when connecting.
_STARTUP_SETTINGS = frozenset({"application_name", "options"})
# libpq parameters whose values ask for nothing that a connection without them lacks.
_HARMLESS: dict[str, frozenset[str] | None] = {
    "fallback_application_name": None,  # any value: routemq-outbox names its connections
    "channel_binding": frozenset({"disable", "prefer"}),
    "gssencmode": frozenset({"disable", "prefer"}),
}
# What SQLAlchemy's asyncpg dialect takes from the URL itself, besides connect()'s arguments.
_SQLALCHEMY_ASYNCPG_PARAMETERS = frozenset({"prepared_statement_cache_size", "host", "port"})


def _asyncpg_arguments() -> frozenset[str]:
    import asyncpg

    return frozenset(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}


def _asyncpg_url(url: URL, settings: dict[str, str]) -> tuple[URL, dict[str, Any]]:
    """The URL without the libpq parameters asyncpg cannot take, and the connect arguments
    they become (``settings``: the server settings to send, updated in place)."""
    try:
        accepted = _asyncpg_arguments() | _SQLALCHEMY_ASYNCPG_PARAMETERS
    except ImportError:
        return url, {}  # create_async_engine names the missing driver
    dsn: dict[str, str] = {}
    connect_args: dict[str, Any] = {}
    for name, raw in url.query.items():
        if name in accepted:
            continue
        value = raw if isinstance(raw, str) else raw[-1]
        if name in _ASYNCPG_DSN_PARAMETERS:
            _check_ssl_parameter(url, name, value)
            dsn[name] = value
        elif name in _STARTUP_SETTINGS:
            settings[name] = value
        elif name == "connect_timeout":
            try:
                seconds = float(value)
            except ValueError:
                seconds = 0.0
            if not seconds > 0:
                raise ConfigurationError(
                    f"invalid database URL {redact(url)!r}: connect_timeout must be a positive "
                    f"number of seconds, got {value!r}"
                )
            connect_args["timeout"] = seconds
        elif name in _HARMLESS and value in (_HARMLESS[name] or {value}):
            pass
        else:
            shown = f"{name}={value}" if name in _HARMLESS else name  # a value may be secret
            raise ConfigurationError(
                f"unsupported database URL parameter {shown!r} in {redact(url)!r}: "
                "asyncpg (the async PostgreSQL driver) cannot honour it, remove it (of libpq's "
                "parameters it takes sslmode, sslrootcert, sslcert, sslkey, sslcrl, "
                "sslpassword, connect_timeout, application_name and options)"
            )
    if dsn:
        connect_args["dsn"] = "postgresql://?" + urlencode(dsn)
    translated = url.difference_update_query([name for name in url.query if name not in accepted])
    return translated, connect_args


def _check_ssl_parameter(url: URL, name: str, value: str) -> None:
    """Refuse now, in one line, what asyncpg would refuse at every connection attempt."""
    if name == "sslmode" and value not in _SSLMODES:
        raise ConfigurationError(
            f"invalid database URL {redact(url)!r}: sslmode must be one of "
            f"{', '.join(_SSLMODES)}, got {value!r}"
        )
    if name in _SSL_FILES and value != "system" and not Path(value).expanduser().is_file():
        # asyncpg's own error is a FileNotFoundError that names no file.
        raise ConfigurationError(f"invalid database URL {redact(url)!r}: no {name} file {value}")


# ----------------------------------------------------------------------------- MySQL


def _mysql_async_setup(sync_engine: Engine, driver: str) -> None:
    connect = importlib.import_module(driver).connect

    @event.listens_for(sync_engine, "do_connect")
    def _bounded(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # The drivers' connect_timeout bounds the TCP connection only; the handshake that
        # follows waits for as long as the server likes.
        inner: Callable[..., Awaitable[Any]] = cparams.get("async_creator_fn") or connect
        error = dialect.loaded_dbapi.OperationalError
        host = cparams.get("host", "localhost")

        async def bounded(*args: Any, **kwargs: Any) -> Any:
            limit = CONNECT_TIMEOUT_S
            try:
                async with asyncio.timeout(limit):
                    return await inner(*args, **kwargs)
            except TimeoutError:
                raise error(
                    2003, f"Can't connect to MySQL server on {host!r} (no answer in {limit:g} s)"
                ) from None

        cparams["async_creator_fn"] = bounded


def _pymysql_setup(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "do_connect")
    def _bounded(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        # PyMySQL's connect_timeout bounds the TCP connection only, and its read timeout
        # (none by default) applies to the handshake: bound the handshake by this read
        # timeout, then give the connection the caller's own for its queries.
        limit = CONNECT_TIMEOUT_S
        after = cparams.get("read_timeout")
        cparams["read_timeout"] = limit
        cparams.setdefault("connect_timeout", limit)
        try:
            connection = dialect.loaded_dbapi.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            if "timed out" in str(exc):
                host = cparams.get("host", "localhost")
                raise dialect.loaded_dbapi.OperationalError(
                    2003, f"Can't connect to MySQL server on {host!r} (no answer in {limit:g} s)"
                ) from None
            raise
        connection._read_timeout = after
        return connection


# ----------------------------------------------------------------------------- engines


def create_engine(
    url: str | URL,
    *,
    pool_size: int = 5,
    worker: bool = False,
    sqlite_begin: SqliteBegin = "first_write",
    create_file: bool = False,
    **kwargs: Any,
) -> AsyncEngine:
    """An AsyncEngine for ``url`` (any driver is swapped for the asyncio one).

    ``worker=True`` is for the worker's own bookkeeping. On PostgreSQL its commits do not wait
    for the WAL flush (``synchronous_commit = off``): a database crash can forget the last
    fraction of a second of claims and deletions, which at worst runs a job again, as
    at-least-once delivery allows, and in exchange a commit costs no disk wait. Jobs
    themselves, and producers, keep full durability.

    SQLite: ``sqlite_begin`` is how transactions begin (``"first_write"``: with ``BEGIN
    IMMEDIATE`` just before their first write; see the module's docstring);
    ``create_file=True`` creates a missing database file instead of refusing it.

    Keyword arguments go to :func:`~sqlalchemy.ext.asyncio.create_async_engine` and win over
    the settings above (``isolation_level="REPEATABLE READ"`` restores MySQL's default).
    """
    target = async_url(url)
    family = dialect_family(target)
    begin = _sqlite_begin(sqlite_begin)
    options = _family_options(target)
    if "poolclass" not in kwargs:
        options.update(pool_size=pool_size, max_overflow=pool_size)
    if family == "postgresql" and target.get_driver_name() == "asyncpg":
        settings = {"application_name": "routemq-outbox" + (" worker" if worker else "")}
        if worker:
            settings["synchronous_commit"] = "off"
        target, translated = _asyncpg_url(target, settings)
        # A connection attempt that hangs (a server going down or coming up, a network
        # partition) fails after this long and is retried, rather than stall a loop for the
        # driver's default minute.
        options["connect_args"] = {
            "server_settings": settings,
            "timeout": CONNECT_TIMEOUT_S,
            **translated,
        }
    try:
        engine = create_async_engine(target, **_merge_options(options, kwargs))
    except (ImportError, NoSuchModuleError) as exc:
        raise _driver_missing(target, exc) from None
    if family == "sqlite":
        _sqlite_setup(engine.sync_engine, begin, None if create_file else _sqlite_file(target))
    elif family == "mysql":
        _mysql_async_setup(engine.sync_engine, target.get_driver_name())
    return engine


def create_sync_engine(
    url: str | URL,
    *,
    sqlite_begin: SqliteBegin = "first_write",
    create_file: bool = False,
    **kwargs: Any,
) -> Engine:
    """A blocking Engine for ``url``, for the ``*_sync`` dispatch twins. ``sqlite_begin`` and
    ``create_file`` are those of :func:`create_engine`."""
    target = sync_url(url)
    family = dialect_family(target)
    begin = _sqlite_begin(sqlite_begin)
    options = {"pool_pre_ping": True, **_family_options(target)}
    try:
        engine = sa.create_engine(target, **_merge_options(options, kwargs))
    except (ImportError, NoSuchModuleError) as exc:
        raise _driver_missing(target, exc) from None
    if family == "sqlite":
        _sqlite_setup(engine, begin, None if create_file else _sqlite_file(target))
    elif family == "mysql" and target.get_driver_name() == "pymysql":
        _pymysql_setup(engine)
    return engine


class _Blocking:
    """The part of AsyncConnection that the statements of :mod:`.sql` use, over a blocking
    connection: each call completes before it returns, so an operation awaiting only these
    never suspends."""

    def __init__(self, connection: sa.Connection) -> None:
        self._connection = connection

    @property
    def dialect(self) -> sa.Dialect:
        return self._connection.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._connection.execute(statement, parameters)

    async def execution_options(self, **options: Any) -> _Blocking:
        return _Blocking(self._connection.execution_options(**options))

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[None]:
        with self._connection.begin():
            yield


def _complete(operation: Awaitable[_T]) -> _T:
    """The result of an awaitable that completes without suspending."""
    steps = operation.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    steps.close()
    raise RuntimeError("an operation on a blocking connection tried to suspend")


class BlockingSqlite:
    """Runs operations of :mod:`.sql` whole on a thread, over blocking connections to an
    SQLite file.

    An SQLite write transaction holds the database's one write lock from its first write to
    its COMMIT. Over aiosqlite every statement, and the COMMIT, is a trip through the event
    loop, so job code that blocks the loop in between keeps every other process from writing:
    even the worker that would take the blocked job over once its lease runs out. On a thread
    the transaction ends whatever the loop does.
    """

    def __init__(self, engine: AsyncEngine, threads: int) -> None:
        self._engine = create_sync_engine(
            engine.url, poolclass=sa.pool.QueuePool, pool_size=threads, max_overflow=0
        )
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="routemq-outbox-sqlite")

    @staticmethod
    def usable(engine: AsyncEngine) -> bool:
        """Whether ``engine`` opens an SQLite file (an in-memory database exists only in its
        own connections, so another engine would not see it)."""
        return engine.dialect.name == "sqlite" and _sqlite_file(engine.url) is not None

    async def run(self, operation: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._run, operation)

    def _run(self, operation: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        with self._engine.connect() as connection:
            # Only the operations of .sql are run here, which await nothing but their
            # connection: the facade stands in for it.
            return _complete(operation(cast(AsyncConnection, _Blocking(connection))))

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        self._engine.dispose()


# ----------------------------------------------------------------------------- shared engines

# The engines that calls without a session use, by URL. The URL is read from the environment
# on every call, so changing it (as tests do) takes effect at once.
#
# Async engines are per event loop, since an asyncio connection belongs to the loop that
# opened it. A loop's engines are disposed when the loop shuts down: ``asyncio.run`` (and
# asyncio.Runner, uvloop.run, pytest-asyncio, asgiref) closes the loop's asynchronous
# generators before closing the loop, which is the only hook asyncio gives into a loop's end.
# Without it, the pooled connections of every short-lived loop (``asyncio.run(dispatch(…))``
# per request or per script) would stay open, and keep their loop alive, until the server
# ran out of connections. A loop closed without that step (a hand-written
# new_event_loop()/run_until_complete()/close() that skips loop.shutdown_asyncgens(), as
# asyncio's documentation asks) is forgotten the next time a new loop asks for an engine; its
# connections then close only when the garbage collector frees them, since nothing can be
# awaited on a closed loop.
_lock = threading.Lock()
_loop_engines: dict[asyncio.AbstractEventLoop, dict[str, AsyncEngine]] = {}
_loop_closers: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}
_sync_engines: dict[str, Engine] = {}


async def _dispose_at_loop_end(
    loop: asyncio.AbstractEventLoop, engines: dict[str, AsyncEngine]
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        with _lock:
            if _loop_engines.get(loop) is engines:
                del _loop_engines[loop]
                del _loop_closers[loop]
        if not loop.is_closed():  # closed: collected as garbage, with nothing to await on
            for engine in engines.values():
                await engine.dispose()


def _step(awaitable: Awaitable[Any]) -> None:
    """Run, from synchronous code, an awaitable that completes without suspending."""
    with contextlib.suppress(StopIteration):
        awaitable.__await__().send(None)


def _engines_of(loop: asyncio.AbstractEventLoop) -> dict[str, AsyncEngine]:
    engines = _loop_engines.get(loop)
    if engines is not None:
        return engines
    with _lock:
        closed = [other for other in _loop_engines if other.is_closed()]
        forgotten = [_loop_closers.pop(other) for other in closed]
        for other in closed:
            del _loop_engines[other]
        engines = _loop_engines[loop] = {}
        closer = _loop_closers[loop] = _dispose_at_loop_end(loop, engines)
    for old in forgotten:
        # Its loop is closed: closing the generator now (it awaits nothing then) spares the
        # loop's finalizer a call into a closed loop when the generator is collected.
        with contextlib.suppress(Exception):
            _step(old.aclose())
    # Run it up to its yield, here and now: asend() registers it with the running loop, whose
    # shutdown closes it, and the first step awaits nothing.
    _step(closer.asend(None))
    return engines


def connection_engine(connection: str) -> AsyncEngine:
    """The shared AsyncEngine of the named connection, for the running event loop; it is
    disposed when the loop shuts down."""
    url = database_url(connection)
    engines = _engines_of(asyncio.get_running_loop())
    engine = engines.get(url)
    if engine is None:
        engine = engines[url] = create_engine(url, pool_pre_ping=True)
    return engine


def connection_sync_engine(connection: str) -> Engine:
    """The shared blocking Engine of the named connection."""
    url = database_url(connection)
    with _lock:
        engine = _sync_engines.get(url)
        if engine is None:
            engine = _sync_engines[url] = create_sync_engine(url)
    return engine


def dispose_sync_engines() -> None:
    """Close the pooled connections of the shared blocking engines (those of ``dispatch_sync``
    and the other ``*_sync`` calls without ``session=``); later calls open new ones.

    For test suites that drop their databases, and for applications that shut down. The
    async calls' engines need nothing of the kind: each is disposed when its loop ends.
    """
    with _lock:
        engines = list(_sync_engines.values())
        _sync_engines.clear()
    for engine in engines:
        engine.dispose()


def _forget_engines_after_fork() -> None:
    """In a forked child: the parent's pooled connections are the parent's. Drop them unclosed
    (closing would end the parent's sessions too) and start with new pools."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for engine in _sync_engines.values():
        engine.dispose(close=False)
    for engines in _loop_engines.values():
        for async_engine in engines.values():
            async_engine.sync_engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_engines_after_fork)
