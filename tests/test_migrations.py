"""The migrations build exactly the schema the models define, up and down, installed or not."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from routemq_outbox.config import sync_url
from routemq_outbox.database import create_sync_engine
from routemq_outbox.migrate import VERSION_TABLE, downgrade, head_revision, revisions, upgrade
from routemq_outbox.schema import include_object, metadata

from .conftest import BACKENDS, DB_URL_FIXTURES, EMPTY_DB_URL_FIXTURES, ROOT

TABLES = ("jobs", "failed_jobs", "schedule_slots", "paused_queues", "workers")
IN_TABLES = "(" + ", ".join(f"'{table}'" for table in TABLES) + ")"


def dump_schema(url: str) -> dict[str, Any]:
    """Everything that defines our tables, as the database itself reports it."""
    engine = create_sync_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            schema: dict[str, Any] = {}
            for table in TABLES:
                schema[table] = {
                    "columns": [
                        (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                        for c in inspector.get_columns(table)
                    ],
                    "pk": inspector.get_pk_constraint(table)["constrained_columns"],
                    "unique": sorted(
                        (u["name"], tuple(u["column_names"]))
                        for u in inspector.get_unique_constraints(table)
                    ),
                    "checks": sorted(
                        (c["name"], " ".join(c["sqltext"].split()))
                        for c in inspector.get_check_constraints(table)
                    ),
                }
            if conn.dialect.name == "postgresql":
                rows = conn.execute(
                    sa.text(
                        "SELECT indexname, indexdef FROM pg_indexes "
                        f"WHERE tablename IN {IN_TABLES} "
                        "ORDER BY indexname"
                    )
                )
            elif conn.dialect.name in ("mysql", "mariadb"):
                rows = conn.execute(
                    sa.text(
                        "SELECT CONCAT(table_name, '.', index_name), GROUP_CONCAT(CONCAT("
                        "column_name, ' ', non_unique, ' ', index_type) ORDER BY seq_in_index) "
                        "FROM information_schema.statistics WHERE table_schema = DATABASE() "
                        f"AND table_name IN {IN_TABLES} "
                        "GROUP BY table_name, index_name ORDER BY 1"
                    )
                )
                for table in TABLES:
                    # engine, charset, collations, defaults, CHECKs: the table as the server
                    # would recreate it, less its indexes (above; listed in creation order here)
                    ddl = conn.execute(sa.text(f"SHOW CREATE TABLE {table}")).one()[1]
                    lines = [line for line in ddl.splitlines() if not line.startswith("  KEY ")]
                    schema[table]["ddl"] = re.sub(r" AUTO_INCREMENT=\d+", "", "\n".join(lines))
            else:
                rows = conn.execute(
                    sa.text(
                        "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                        f"AND tbl_name IN {IN_TABLES} ORDER BY name"
                    )
                )
            schema["indexes"] = [(name, " ".join(str(sql).split())) for name, sql in rows]
    finally:
        engine.dispose()
    return schema


def create_from_models(url: str) -> None:
    engine = create_sync_engine(url, create_file=True)
    with engine.begin() as conn:
        metadata.create_all(conn)
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def two_empty_databases(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    if request.param == "mariadb":
        make = request.getfixturevalue("mysql_database")
        return make(), make()
    migrated = request.getfixturevalue("empty_pg_url")
    models = request.getfixturevalue("pg_url")
    downgrade(models, "base")  # the per-test database comes migrated: empty it
    engine = create_sync_engine(models)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
    engine.dispose()
    return migrated, models


def test_migrations_build_exactly_the_models(two_empty_databases: tuple[str, str]) -> None:
    by_migrations, by_models = two_empty_databases
    upgrade(by_migrations)
    create_from_models(by_models)

    engine = create_sync_engine(by_migrations)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "version_table": VERSION_TABLE,
                "include_object": include_object(conn.dialect.name),
            },
        )
        assert compare_metadata(context, metadata) == []
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == (
            head_revision()
        )
    engine.dispose()
    migrated = dump_schema(by_migrations)
    assert migrated == dump_schema(by_models)
    if "ddl" in migrated["jobs"]:  # MySQL/MariaDB: no partial indexes, a claim index of its own
        assert (
            "jobs.ix_jobs_claim_by_priority_mysql",
            "queue 1 BTREE,reserved_at 1 BTREE,priority 1 BTREE,available_at 1 BTREE,id 1 BTREE",
        ) in migrated["indexes"]
        assert "ENGINE=InnoDB" in migrated["jobs"]["ddl"]
        assert "COLLATE=utf8mb4_bin" in migrated["failed_jobs"]["ddl"]
    else:
        assert any(
            "WHERE (reserved_at IS NULL)" in d or "WHERE reserved_at IS NULL" in d
            for _, d in migrated["indexes"]
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_tests_database_is_an_exact_copy_of_a_migrated_one(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """The per-test databases (cloned from a template) are what the migrations build."""
    clone = request.getfixturevalue(DB_URL_FIXTURES[backend])
    fresh = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    upgrade(fresh)
    assert dump_schema(clone) == dump_schema(fresh)


def test_mysql_ddl_can_be_printed_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    upgrade("mysql://app@db.invalid/app", sql=True)
    ddl = capsys.readouterr().out
    assert "CREATE TABLE jobs" in ddl
    assert (
        "ALTER TABLE jobs ADD INDEX ix_jobs_claim_by_priority_mysql "
        "(queue, reserved_at, priority, available_at, id), ALGORITHM=INPLACE, LOCK=NONE" in ddl
    )
    assert "ENGINE=InnoDB" in ddl
    assert "ix_jobs_claim ON" not in ddl


def alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env={**os.environ, "ROUTEMQ_OUTBOX_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tables(url: str) -> set[str]:
    engine = create_sync_engine(url)
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    return names


@pytest.mark.parametrize("backend", BACKENDS)
def test_alembic_upgrade_and_downgrade_in_the_checkout(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    up = alembic("upgrade", "head", url=url)
    assert up.returncode == 0, up.stderr
    assert {"jobs", "failed_jobs", VERSION_TABLE} <= tables(url)
    down = alembic("downgrade", "base", url=url)
    assert down.returncode == 0, down.stderr
    assert tables(url) & {"jobs", "failed_jobs"} == set()
    again = alembic("upgrade", "head", url=url)
    assert again.returncode == 0, again.stderr
    assert {"jobs", "failed_jobs"} <= tables(url)


async def test_upgrade_is_idempotent_and_callable_from_async_code(sqlite_url: str) -> None:
    await asyncio.to_thread(upgrade, sqlite_url)  # already at head: nothing to do
    await asyncio.to_thread(upgrade, sqlite_url)
    assert {"jobs", "failed_jobs"} <= tables(sqlite_url)


APP_MODELS = """
import sqlalchemy as sa

metadata = sa.MetaData()
orders = sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True))
"""


def embed_in_an_application(
    run: Callable[..., subprocess.CompletedProcess[str]], app: Path, url: str
) -> None:
    """The README's recipe: an application's alembic applies our revisions beside its own, its
    autogenerate leaves our tables alone, and ``routemq-outbox migrate`` knows it has nothing
    to do. ``run(*args, cwd=...)`` runs ``alembic`` and ``routemq-outbox`` of the install
    under test."""
    app.mkdir()
    init = run("alembic", "init", "alembic", cwd=app)
    assert init.returncode == 0, init.stderr
    ini = app / "alembic.ini"
    text = ini.read_text().replace(
        "sqlalchemy.url = driver://user:pass@localhost/dbname",
        "sqlalchemy.url = " + sync_url(url).render_as_string(hide_password=False),
    )
    assert "\npath_separator = os\n" in text
    text = text.replace(
        "\npath_separator = os\n",
        "\npath_separator = space\n"
        "version_locations = %(here)s/alembic/versions routemq_outbox:migrations/versions\n",
    )
    ini.write_text(text)
    (app / "models.py").write_text(APP_MODELS)
    env = app / "alembic" / "env.py"
    text = env.read_text().replace(
        "target_metadata = None",
        "from models import metadata as target_metadata\n"
        "from routemq_outbox.migrate import include_object",
    )
    assert text.count("target_metadata=target_metadata") == 2
    text = text.replace(
        "target_metadata=target_metadata",
        "target_metadata=target_metadata, include_object=include_object",
    )
    env.write_text(text)
    versions = str(app / "alembic" / "versions")

    def alembic_ok(*args: str) -> str:
        result = run("alembic", *args, cwd=app)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    alembic_ok(
        "revision",
        "-m",
        "app",
        "--head",
        "base",
        "--rev-id",
        "app_0001",
        "--version-path",
        versions,
    )
    assert f"{head_revision()} (routemq_outbox) (head)" in alembic_ok("heads")
    upgraded = alembic_ok("upgrade", "heads")
    assert "routemq_outbox_0001" in upgraded
    assert head_revision() in upgraded
    assert {"jobs", "failed_jobs", "alembic_version"} <= tables(url)
    assert VERSION_TABLE not in tables(url)

    alembic_ok(
        "revision", "--autogenerate", "-m", "orders", "--head", "app_0001", "--rev-id", "app_0002"
    )
    generated = next((app / "alembic" / "versions").glob("app_0002_*.py")).read_text()
    assert "op.create_table('orders'" in generated
    for ours in ("jobs", "schedule_slots", "ix_", VERSION_TABLE):
        assert ours not in generated, generated
    alembic_ok("upgrade", "heads")

    migrated = run("routemq-outbox", "migrate", "--database-url", url, cwd=app)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stderr.endswith(
        f"database schema is at {head_revision()} (head), recorded in alembic_version by "
        "your application's alembic\n"
    ), migrated.stderr
    assert VERSION_TABLE not in tables(url)
    assert run("routemq-outbox", "health", "--database-url", url, cwd=app).returncode == 0

    alembic_ok("downgrade", "routemq_outbox@-1")
    behind = run("routemq-outbox", "migrate", "--database-url", url, cwd=app)
    assert behind.returncode == 2
    assert behind.stderr == (
        "routemq-outbox: your application's alembic applies routemq-outbox's migrations "
        f"(alembic_version is at {revisions()[-2]}): run `alembic upgrade heads` there to "
        f"reach {head_revision()}\n"
    )
    health = run("routemq-outbox", "health", "--database-url", url, cwd=app)
    assert health.returncode == 1
    assert "run `alembic upgrade heads` in your application" in health.stderr
    assert VERSION_TABLE not in tables(url)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_applications_alembic_embeds_our_migrations(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With this checkout's own install, which is editable: ``routemq_outbox:migrations/
    versions`` must name a directory that exists there too, or alembic drops our branch."""
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    bin_dir = Path(sys.executable).parent

    def run(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / command), *args],
            cwd=cwd,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    embed_in_an_application(run, tmp_path / "app", url)


@pytest.mark.slow
def test_installed_package_migrates_fresh_databases(
    tmp_path: Path, empty_pg_url: str, empty_sqlite_url: str
) -> None:
    """``pip install .`` into a fresh virtualenv, then ``routemq-outbox migrate`` works from
    outside the checkout, the demo of the README runs, and a user's own alembic environment
    can apply our revisions through ``version_locations``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr
    cli = str(venv / "bin" / "routemq-outbox")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str, cwd: Path = elsewhere) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
        return subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    ddl = run(cli, "migrate", "--sql", "--database-url", "postgresql://x@localhost/x")
    assert ddl.returncode == 0, ddl.stderr
    assert "CREATE TABLE jobs" in ddl.stdout
    assert (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_jobs_claim_by_priority "
        "ON jobs (queue, priority, available_at, id) WHERE reserved_at IS NULL" in ddl.stdout
    )

    for url in (empty_pg_url, f"sqlite:///{elsewhere / 'fresh.db'}"):
        result = run(cli, "migrate", "--database-url", url)
        assert result.returncode == 0, result.stderr
        assert {"jobs", "failed_jobs"} <= tables(url)

    demo = run(str(venv / "bin" / "python"), str(ROOT / "examples" / "demo.py"))
    assert demo.returncode == 0, demo.stderr
    assert "notifications sent: [(1, 'your teapot has shipped')]" in demo.stdout
    assert "jobs left in the queue: 0" in demo.stdout
    assert "failed_jobs: queue=notifications attempts=2" in demo.stdout

    # A user's own alembic environment, with our revisions on their own branch beside theirs.
    embed_in_an_application(
        lambda command, *args, cwd: run(str(venv / "bin" / command), *args, cwd=cwd),
        tmp_path / "app",
        empty_sqlite_url,
    )


def test_postgresql_jobs_table_gets_churn_autovacuum_settings(empty_pg_url: str) -> None:
    def options() -> set[str]:
        engine = create_sync_engine(empty_pg_url)
        try:
            with engine.connect() as conn:
                query = "SELECT reloptions FROM pg_class WHERE relname = 'jobs'"
                return set(conn.execute(sa.text(query)).scalar_one() or [])
        finally:
            engine.dispose()

    upgrade(empty_pg_url)
    assert options() == {
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_analyze_scale_factor=0",
        "autovacuum_analyze_threshold=1000",
        "autovacuum_vacuum_cost_delay=0",
    }
    downgrade(empty_pg_url, "routemq_outbox_0001")
    assert options() == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_schedule_slots_revision_upgrades_a_populated_database(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    before = "routemq_outbox_0002"
    upgrade(url, before)
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO jobs (queue, payload) VALUES ('q', '{\"job\": \"x\"}')")
            )
        assert "schedule_slots" not in tables(url)
        upgrade(url)
        assert "schedule_slots" in tables(url)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT queue FROM jobs")).scalars().all() == ["q"]
            conn.execute(
                sa.text(
                    "INSERT INTO schedule_slots (schedule, slot, definition) "
                    "VALUES ('a', '2026-12-01 03:00:00', 'every 1:00:00')"
                )
            )
        downgrade(url, before)
        assert "schedule_slots" not in tables(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT queue FROM jobs")).scalars().all() == ["q"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_job_keys_revision_upgrades_a_populated_database(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    before = "routemq_outbox_0004"
    upgrade(url, before)
    engine = create_sync_engine(url)
    select = sa.text("SELECT queue, unique_key, serial_key, serial_due_at FROM jobs ORDER BY id")
    try:
        with engine.begin() as conn:
            for queue in ("a", "b"):
                conn.execute(
                    sa.text('INSERT INTO jobs (queue, payload) VALUES (:q, \'{"job": "x"}\')'),
                    {"q": queue},
                )
        upgrade(url)
        assert {"unique_windows", "serial_keys"} <= tables(url)
        with engine.begin() as conn:
            assert conn.execute(select).all() == [("a", None, None, None), ("b", None, None, None)]
            # The unique index holds any number of rows without a key, and one per key.
            conn.execute(sa.text("UPDATE jobs SET unique_key = 'k' WHERE queue = 'a'"))
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text("UPDATE jobs SET unique_key = 'k' WHERE queue = 'b'"))
        downgrade(url, before)
        assert not {"unique_windows", "serial_keys"} & tables(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT queue FROM jobs ORDER BY id")).scalars().all() == [
                "a",
                "b",
            ]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_job_counts_revision_upgrades_a_populated_database(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    before = "routemq_outbox_0006"
    upgrade(url, before)
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO jobs (queue, payload) VALUES ('q', '{\"job\": \"x\"}')")
            )
        assert "job_counts" not in tables(url)
        upgrade(url)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT queue FROM jobs")).scalars().all() == ["q"]
            conn.execute(sa.text("INSERT INTO job_counts (minute, queue) VALUES (1, 'q')"))
            row = conn.execute(sa.text("SELECT succeeded, failed FROM job_counts")).one()
            assert tuple(row) == (0, 0)
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO job_counts (minute, queue) VALUES (1, 'q')"))
        downgrade(url, before)
        assert "job_counts" not in tables(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT queue FROM jobs")).scalars().all() == ["q"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_control_plane_revision_upgrades_a_populated_database(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(EMPTY_DB_URL_FIXTURES[backend])
    before = "routemq_outbox_0005"
    upgrade(url, before)
    engine = create_sync_engine(url)
    select = sa.text("SELECT queue, priority, cancel_requested, worker_id FROM jobs ORDER BY id")
    try:
        with engine.begin() as conn:
            for queue in ("a", "b"):
                conn.execute(
                    sa.text('INSERT INTO jobs (queue, payload) VALUES (:q, \'{"job": "x"}\')'),
                    {"q": queue},
                )
        upgrade(url)
        assert {"paused_queues", "workers"} <= tables(url)
        with engine.begin() as conn:
            assert [tuple(row) for row in conn.execute(select)] == [
                ("a", 0, False, None),
                ("b", 0, False, None),
            ]
            conn.execute(sa.text("UPDATE jobs SET priority = 9 WHERE queue = 'a'"))
        # MariaDB reports a failed CHECK as an OperationalError, the others as an IntegrityError.
        refused = (sa.exc.IntegrityError, sa.exc.OperationalError)
        with pytest.raises(refused, match="priority_range"), engine.begin() as conn:
            conn.execute(sa.text("UPDATE jobs SET priority = 10 WHERE queue = 'b'"))
        with pytest.raises(refused, match="priority_range"), engine.begin() as conn:
            conn.execute(sa.text("UPDATE jobs SET priority = -1 WHERE queue = 'b'"))
        downgrade(url, before)
        assert not {"paused_queues", "workers"} & tables(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT queue FROM jobs ORDER BY id")).scalars().all() == [
                "a",
                "b",
            ]
        upgrade(url)  # and up again, from what the downgrade left
        if backend == "sqlite":  # the rebuilt table never reuses the id of a deleted job
            with engine.connect() as conn:
                ddl = conn.execute(
                    sa.text("SELECT sql FROM sqlite_master WHERE name = 'jobs'")
                ).scalar_one()
            assert "AUTOINCREMENT" in ddl
    finally:
        engine.dispose()
