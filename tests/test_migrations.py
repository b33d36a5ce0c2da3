"""The migrations build exactly the schema the models define, up and down, installed or not."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from routemq_outbox.database import create_sync_engine
from routemq_outbox.migrate import VERSION_TABLE, downgrade, head_revision, upgrade
from routemq_outbox.schema import include_object, metadata

from .conftest import BACKENDS, DB_URL_FIXTURES, EMPTY_DB_URL_FIXTURES, ROOT


def dump_schema(url: str) -> dict[str, Any]:
    """Everything that defines our tables, as the database itself reports it."""
    engine = create_sync_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            schema: dict[str, Any] = {}
            for table in ("jobs", "failed_jobs"):
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
                        "WHERE tablename IN ('jobs', 'failed_jobs') ORDER BY indexname"
                    )
                )
            elif conn.dialect.name in ("mysql", "mariadb"):
                rows = conn.execute(
                    sa.text(
                        "SELECT CONCAT(table_name, '.', index_name), GROUP_CONCAT(CONCAT("
                        "column_name, ' ', non_unique, ' ', index_type) ORDER BY seq_in_index) "
                        "FROM information_schema.statistics WHERE table_schema = DATABASE() "
                        "AND table_name IN ('jobs', 'failed_jobs') "
                        "GROUP BY table_name, index_name ORDER BY 1"
                    )
                )
                for table in ("jobs", "failed_jobs"):
                    # engine, charset, collations, defaults, CHECKs: the table as the server
                    # would recreate it, less its indexes (above; listed in creation order here)
                    ddl = conn.execute(sa.text(f"SHOW CREATE TABLE {table}")).one()[1]
                    lines = [line for line in ddl.splitlines() if not line.startswith("  KEY ")]
                    schema[table]["ddl"] = re.sub(r" AUTO_INCREMENT=\d+", "", "\n".join(lines))
            else:
                rows = conn.execute(
                    sa.text(
                        "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                        "AND tbl_name IN ('jobs', 'failed_jobs') ORDER BY name"
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
            "jobs.ix_jobs_claim_mysql",
            "queue 1 BTREE,reserved_at 1 BTREE,available_at 1 BTREE,id 1 BTREE",
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
    assert "CREATE INDEX ix_jobs_claim_mysql ON jobs (queue, reserved_at, available_at, id)" in ddl
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


@pytest.mark.slow
def test_installed_package_migrates_fresh_databases(tmp_path: Path, empty_pg_url: str) -> None:
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
        "CREATE INDEX ix_jobs_claim ON jobs (queue, available_at, id) WHERE reserved_at IS NULL"
        in ddl.stdout
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
    app = tmp_path / "app"
    app.mkdir()
    init = run(str(venv / "bin" / "alembic"), "init", "alembic", cwd=app)
    assert init.returncode == 0, init.stderr
    ini = app / "alembic.ini"
    text = ini.read_text().replace(
        "sqlalchemy.url = driver://user:pass@localhost/dbname",
        f"sqlalchemy.url = sqlite:///{app / 'app.db'}",
    )
    assert "\npath_separator = os\n" in text
    text = text.replace(
        "\npath_separator = os\n",
        "\npath_separator = space\n"
        "version_locations = %(here)s/alembic/versions routemq_outbox:migrations/versions\n",
    )
    ini.write_text(text)
    own = run(
        str(venv / "bin" / "alembic"),
        "revision",
        "-m",
        "app tables",
        "--head",
        "base",
        "--version-path",
        str(app / "alembic" / "versions"),
        cwd=app,
    )
    assert own.returncode == 0, own.stderr
    heads = run(str(venv / "bin" / "alembic"), "upgrade", "heads", cwd=app)
    assert heads.returncode == 0, heads.stderr
    assert "routemq_outbox_0001" in heads.stderr
    assert "routemq_outbox_0002" in heads.stderr
    assert {"jobs", "failed_jobs", "alembic_version"} <= tables(f"sqlite:///{app / 'app.db'}")


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
