"""Database URLs are never shown with their password: not in logs, not in exception messages,
not in CLI output, whatever shape the URL has and whatever goes wrong with the database."""

from __future__ import annotations

import asyncio
import logging
import traceback

import pytest
from sqlalchemy.engine import make_url

from routemq_outbox import Worker, WorkerSettings, dispatch
from routemq_outbox.config import async_url, dialect_family, redact, sync_url
from routemq_outbox.database import create_engine
from routemq_outbox.errors import ConfigurationError

from .conftest import free_port, run_cli
from .test_worker import record

SECRET = "Zq8-s3cr3t-Pw"  # distinctive: any occurrence in output is a leak


def unreachable_urls() -> dict[str, str]:
    """URLs carrying SECRET that no database answers, in the shapes people write them."""
    port = free_port()  # nothing listens there
    return {
        "refused port": f"postgresql://app:{SECRET}@127.0.0.1:{port}/app",
        "unknown host": f"postgresql://app:{SECRET}@no-such-host.invalid/app",
        "password in query": f"postgresql://app@127.0.0.1:{port}/app?password={SECRET}",
        "unescaped @ in password": f"postgresql://app:x@{SECRET}@127.0.0.1:{port}/app",
        "percent-escaped": f"postgresql://app:{SECRET}%40x@127.0.0.1:{port}/app",
    }


def malformed_urls() -> dict[str, str]:
    return {
        "port not a number": f"postgresql://app:{SECRET}@db:port/app",
        "missing slash": f"postgresql:/app:{SECRET}@db/app",
        "unknown backend": f"oracle://app:{SECRET}@db/app",
    }


def assert_hidden(text: str) -> None:
    assert SECRET not in text, f"the password leaked:\n{text}"
    assert SECRET.lower() not in text.lower()


# ----------------------------------------------------------------------------- redact


@pytest.mark.parametrize("name", [*unreachable_urls(), *malformed_urls()])
def test_redact_hides_the_password_of_every_shape_of_url(name: str) -> None:
    url = {**unreachable_urls(), **malformed_urls()}[name]
    shown = redact(url)
    assert_hidden(shown)
    assert "***" in shown
    if name not in malformed_urls():
        assert_hidden(redact(make_url(url)))
        assert_hidden(redact(async_url(url)))
        assert_hidden(redact(sync_url(url)))


def test_redact_keeps_what_is_not_secret() -> None:
    url = "postgresql+asyncpg://app:pw@db.example:5433/shop?sslmode=require&password=pw"
    assert redact(url) == (
        "postgresql+asyncpg://app:***@db.example:5433/shop?password=***&sslmode=require"
    )
    assert redact("sqlite+aiosqlite:///var/lib/app/outbox.db") == (
        "sqlite+aiosqlite:///var/lib/app/outbox.db"
    )
    assert redact("postgresql://app@db/shop") == "postgresql://app@db/shop"


@pytest.mark.parametrize("name", list(malformed_urls()))
def test_configuration_errors_about_a_url_hide_its_password(name: str) -> None:
    url = malformed_urls()[name]
    with pytest.raises(ConfigurationError) as caught:
        dialect_family(url)
    assert_hidden(str(caught.value))
    assert_hidden("".join(traceback.format_exception(caught.value)))
    with pytest.raises(ConfigurationError) as caught:
        create_engine(url)
    assert_hidden("".join(traceback.format_exception(caught.value)))


def test_settings_and_engines_print_without_the_password() -> None:
    for url in unreachable_urls().values():
        assert_hidden(repr(WorkerSettings(database_url=url)))
        assert_hidden(str(WorkerSettings(database_url=url)))
        assert_hidden(repr(create_engine(url)))


# ----------------------------------------------------------------------------- the library


@pytest.mark.parametrize("name", list(unreachable_urls()))
async def test_errors_from_an_unreachable_database_hide_the_password(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = unreachable_urls()[name]
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", url)
    with pytest.raises(Exception) as caught:  # whatever the driver raises, as it raises it
        await asyncio.wait_for(dispatch(record("never")), 60)
    assert not isinstance(caught.value, TimeoutError), "the connection attempt never failed"
    assert_hidden(repr(caught.value))
    assert_hidden("".join(traceback.format_exception(caught.value)))


async def test_an_in_process_worker_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="routemq_outbox")
    for url in unreachable_urls().values():
        worker = Worker(WorkerSettings(database_url=url, max_time=1.5, sleep=0.1))
        await asyncio.wait_for(worker.run(), 60)
    text = caplog.text + "".join(
        "".join(traceback.format_exception(r.exc_info[1])) for r in caplog.records if r.exc_info
    )
    assert_hidden(text)
    assert "worker started: database=postgresql://app:***@127.0.0.1" in text
    assert "claiming failed" in text
    assert "LISTEN connection lost" in text


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("name", list(unreachable_urls()))
def test_migrate_reports_an_unreachable_database_in_one_line_without_the_password(
    name: str,
) -> None:
    url = unreachable_urls()[name]
    results = [run_cli("migrate", "--database-url", url)]
    if name == "refused port":
        results.append(run_cli("migrate", env={"ROUTEMQ_OUTBOX_DATABASE_URL": url}))
    for result in results:
        assert_hidden(result.stdout + result.stderr)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("routemq-outbox: cannot migrate postgresql://app")
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", list(malformed_urls()))
def test_cli_refuses_a_malformed_url_without_the_password(name: str) -> None:
    url = malformed_urls()[name]
    commands = [["migrate"]]
    if name == "port not a number":
        commands += [["migrate", "--sql"], ["work", "--max-time", "1"]]
    for args in commands:
        result = run_cli(*args, "--database-url", url)
        assert_hidden(result.stdout + result.stderr)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr


def test_migrate_sql_prints_ddl_but_not_the_password() -> None:
    result = run_cli("migrate", "--sql", "--database-url", unreachable_urls()["refused port"])
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE jobs" in result.stdout
    assert_hidden(result.stdout + result.stderr)


@pytest.mark.parametrize("name", ["refused port", "unknown host", "password in query"])
def test_work_against_an_unreachable_database_never_prints_the_password(name: str) -> None:
    """The other shapes are covered by the in-process worker test above."""
    url = unreachable_urls()[name]
    options = ["--max-time", "2", "--sleep", "0.2"]
    results = [run_cli("work", "--database-url", url, *options)]
    if name == "refused port":
        results.append(run_cli("work", *options, env={"ROUTEMQ_OUTBOX_DATABASE_URL": url}))
    for result in results:
        output = result.stdout + result.stderr
        assert_hidden(output)
        assert result.returncode == 0, output
        assert "worker started: database=postgresql://app" in output
        assert "claiming failed" in output  # the errors are reported, just not the password
