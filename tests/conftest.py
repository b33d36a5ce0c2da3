"""Fixtures: every test gets fresh, migrated databases.

PostgreSQL: the server named by ``ROUTEMQ_OUTBOX_TEST_POSTGRESQL`` (e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``; CI sets it), else the one at
127.0.0.1:5432 if the postgres user may connect to it, else a throwaway server that
pytest-postgresql starts (as root, one that runs as the postgres user, since PostgreSQL refuses
root). Either way the migrations run once into a template database and each test gets its own
clone.

SQLite: the migrated file is made once per session and copied for each test.

MySQL/MariaDB: the server named by ``ROUTEMQ_OUTBOX_TEST_MYSQL`` (e.g.
``mysql://root@127.0.0.1:3306/test``; CI sets it), else one at 127.0.0.1:3306 if it answers;
without either, the MariaDB tests are skipped, saying why. The migrations run once into a
template database; each test gets a new database with ``CREATE TABLE … LIKE`` each template
table (and its rows: the migration version), dropped after the test.

``db_url`` parametrises a test over every backend; a suite that takes it (or ``engine``)
runs on all of them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from pytest_postgresql import factories
from pytest_postgresql.janitor import DatabaseJanitor
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from routemq_outbox.config import redact
from routemq_outbox.database import create_engine, create_sync_engine, dispose_sync_engines
from routemq_outbox.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
PG_ENV = "ROUTEMQ_OUTBOX_TEST_POSTGRESQL"
MYSQL_ENV = "ROUTEMQ_OUTBOX_TEST_MYSQL"
MYSQL_SERVER = os.environ.get(MYSQL_ENV, "")
MYSQL_LOCAL = "mysql://root@127.0.0.1:3306/test"
TEST_DBNAME = f"routemq_outbox_test_{os.getpid()}"
PG_LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _migrate_template(
    host: str, port: int, user: str, dbname: str, password: str | None = None, **_: Any
) -> None:
    url = sa.URL.create("postgresql+asyncpg", user, password, host, int(port), dbname)
    upgrade(url.render_as_string(hide_password=False))


def _noproc(url: sa.URL) -> Callable[..., Any]:
    return factories.postgresql_noproc(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        dbname=TEST_DBNAME,
        maintenance_dbname=url.database or "postgres",
        load=[_migrate_template],
    )


def _local_pg_answers() -> bool:
    try:
        psycopg.connect(PG_LOCAL, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


PRIVATE_PG_PORT = free_port()
_pg_named = _noproc(make_url(os.environ.get(PG_ENV) or PG_LOCAL))
_pg_private = _noproc(make_url(f"postgresql://postgres@127.0.0.1:{PRIVATE_PG_PORT}/postgres"))
_pg_proc = factories.postgresql_proc(dbname=TEST_DBNAME, load=[_migrate_template])


@pytest.fixture(scope="session")
def _private_pg_running() -> Iterator[None]:
    """pytest-postgresql's own server cannot run as root: as root, run one as the postgres
    user, as the reliability tests do."""
    from .processes import PrivatePostgres

    server = PrivatePostgres(port=PRIVATE_PG_PORT)
    try:
        server.start()
        yield
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Any:
    """The PostgreSQL server of the tests: the one ROUTEMQ_OUTBOX_TEST_POSTGRESQL names, else
    the one at 127.0.0.1:5432 if it lets the postgres user in, else a throwaway server."""
    if os.environ.get(PG_ENV) or _local_pg_answers():
        return request.getfixturevalue("_pg_named")
    if os.geteuid() == 0:
        request.getfixturevalue("_private_pg_running")
        return request.getfixturevalue("_pg_private")
    if shutil.which("pg_ctl") is None and shutil.which("pg_config") is None:
        pytest.skip(f"PostgreSQL is not installed: install it, or set {PG_ENV}")
    return request.getfixturevalue("_pg_proc")


_pg_client = factories.postgresql("pg_server")


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """URL of a fresh, migrated PostgreSQL database for this test."""
    conn = request.getfixturevalue("_pg_client")
    info = conn.info
    url = sa.URL.create(
        "postgresql+asyncpg", info.user, info.password or None, info.host, info.port, info.dbname
    )
    return url.render_as_string(hide_password=False)


@pytest.fixture
def empty_pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database (no tables), dropped after the test."""
    request.getfixturevalue("pg_url")  # the same checks and server
    server = request.getfixturevalue("pg_server")
    name = f"{TEST_DBNAME}_empty"
    janitor = DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        dbname=name,
        maintenance_dbname=server.maintenance_dbname,
        password=server.password,
    )
    with janitor:
        url = sa.URL.create(
            "postgresql+asyncpg",
            server.user,
            server.password or None,
            server.host,
            int(server.port),
            name,
        )
        yield url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """URL of a fresh, migrated SQLite database file for this test."""
    path = tmp_path / "outbox.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def empty_sqlite_url(tmp_path: Path) -> str:
    """URL of a new, empty SQLite database file."""
    return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"


class MySQLServer:
    """The MySQL/MariaDB server of the tests, and the databases made on it."""

    def __init__(self, url: sa.URL) -> None:
        self.url = url
        self.admin = create_sync_engine(url, poolclass=NullPool)
        self._names = itertools.count(1)

    def version(self) -> str:
        with self.admin.connect() as conn:
            return str(conn.exec_driver_sql("SELECT VERSION()").scalar_one())

    def url_of(self, database: str) -> str:
        """The asyncio URL of ``database`` on this server."""
        driver = f"{self.url.get_backend_name()}+asyncmy"
        return self.url.set(drivername=driver, database=database).render_as_string(
            hide_password=False
        )

    def create(self, template: str | None = None) -> str:
        """A new database, empty or with the tables (and rows) of ``template``."""
        name = f"{TEST_DBNAME}_{next(self._names)}"
        with self.admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
            if template is not None:
                tables = conn.exec_driver_sql(f"SHOW TABLES FROM `{template}`").scalars().all()
                for table in tables:
                    conn.exec_driver_sql(
                        f"CREATE TABLE `{name}`.`{table}` LIKE `{template}`.`{table}`"
                    )
                    conn.exec_driver_sql(
                        f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{template}`.`{table}`"
                    )
        return name

    def drop(self, name: str) -> None:
        """Drop ``name``; connections still in a transaction on it are killed first."""
        with self.admin.connect() as conn:
            conn.exec_driver_sql("SET SESSION lock_wait_timeout = 10")
            try:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
                return
            except sa.exc.OperationalError:
                pass  # a leftover transaction holds a table lock
            ids = conn.exec_driver_sql(
                "SELECT id FROM information_schema.PROCESSLIST WHERE db = %s AND id <> "
                "CONNECTION_ID()",
                (name,),
            ).scalars()
            for connection_id in ids:
                conn.exec_driver_sql(f"KILL {int(connection_id)}")
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")

    def close(self) -> None:
        self.admin.dispose()


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MySQLServer]:
    """The server named by ROUTEMQ_OUTBOX_TEST_MYSQL, else a local one; skip if there is none."""
    server = MySQLServer(make_url(MYSQL_SERVER or MYSQL_LOCAL))
    try:
        server.version()
    except (sa.exc.DBAPIError, OSError) as exc:
        server.close()
        if MYSQL_SERVER:
            pytest.fail(f"{MYSQL_ENV}={redact(MYSQL_SERVER)} cannot be reached: {exc}")
        pytest.skip(
            f"no MySQL/MariaDB server answers at {redact(MYSQL_LOCAL)} ({type(exc).__name__}): "
            f"start one there, or set {MYSQL_ENV} to the URL of one"
        )
    yield server
    server.close()


@pytest.fixture(scope="session")
def mysql_template(mysql_server: MySQLServer) -> Iterator[str]:
    """A migrated database, the model of each test's own."""
    name = mysql_server.create()
    try:
        upgrade(mysql_server.url_of(name))
        yield name
    finally:
        mysql_server.drop(name)


@pytest.fixture
def mysql_database(mysql_server: MySQLServer) -> Iterator[Callable[..., str]]:
    """Makes databases on the MySQL/MariaDB server (``template=`` to clone one), returns their
    URLs, and drops them after the test."""
    made: list[str] = []

    def make(template: str | None = None) -> str:
        made.append(mysql_server.create(template))
        return mysql_server.url_of(made[-1])

    yield make
    for name in made:
        mysql_server.drop(name)


@pytest.fixture
def mariadb_url(mysql_database: Callable[..., str], mysql_template: str) -> str:
    """URL of a fresh, migrated MySQL/MariaDB database for this test."""
    return mysql_database(mysql_template)


@pytest.fixture
def empty_mariadb_url(mysql_database: Callable[..., str]) -> str:
    """URL of a new, empty MySQL/MariaDB database (no tables), dropped after the test."""
    return mysql_database()


BACKENDS = ["postgresql", "sqlite", "mariadb"]
# backend -> the fixture giving a fresh migrated database of it / an empty one
DB_URL_FIXTURES = {"postgresql": "pg_url", "sqlite": "sqlite_url", "mariadb": "mariadb_url"}
EMPTY_DB_URL_FIXTURES = {
    "postgresql": "empty_pg_url",
    "sqlite": "empty_sqlite_url",
    "mariadb": "empty_mariadb_url",
}


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh migrated database of each backend, also set as the configured default."""
    url: str = request.getfixturevalue(DB_URL_FIXTURES[request.param])
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sync_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = create_sync_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _no_stray_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up the developer's own database settings."""
    for name in list(os.environ):
        test_servers = (PG_ENV, MYSQL_ENV)
        if (name.startswith("ROUTEMQ_OUTBOX_") and name not in test_servers) or (
            name == "DATABASE_URL"
        ):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _dispose_shared_sync_engines() -> Iterator[None]:
    """Close the blocking engines dispatch_sync opened without a session, before the test's
    database is dropped. (The async ones close with the test's event loop.)"""
    yield
    dispose_sync_engines()


@pytest.fixture
async def orders(engine: AsyncEngine) -> None:
    """An ``orders`` table for the business writes that share a transaction with a dispatch."""
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))


@pytest.fixture
async def log_table(engine: AsyncEngine) -> None:
    """The ``job_log`` table that the jobs of tests/jobs.py write to."""
    from .jobs import CREATE_LOG

    async with engine.begin() as conn:
        await conn.execute(sa.text(CREATE_LOG))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start worker processes (``spawn(url, *args, env=None)``); killed after the test."""
    from .processes import WorkerProcess

    started: list[WorkerProcess] = []

    def spawn_worker(url: str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(url, *args, log_dir=tmp_path, env=env)
        started.append(worker)
        return worker

    yield spawn_worker
    for worker in started:
        worker.kill()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m routemq_outbox ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "routemq_outbox", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
