"""The ``routemq-outbox`` command. Each command parses, builds settings, calls one function."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import sqlalchemy.exc
import typer

from .config import DEFAULT_CONNECTION, database_url, imports_from_env, redact
from .errors import OutboxError
from .migrate import upgrade
from .worker import WorkerSettings, serve

app = typer.Typer(
    name="routemq-outbox",
    help="A transactional outbox job queue on your own SQL database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        help="Database URL (default: ROUTEMQ_OUTBOX_DATABASE_URL, DATABASE_URL, or SQLite).",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"routemq-outbox: {message}", err=True)
    return typer.Exit(code)


@app.command()
def work(
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue", "-q", metavar="NAME", help="Queue to work; repeat for more, earlier first."
        ),
    ] = None,
    imports: Annotated[
        list[str] | None,
        typer.Option(
            "--import",
            "-i",
            metavar="MODULE",
            help="Module defining Job classes; repeatable (also ROUTEMQ_OUTBOX_IMPORT).",
        ),
    ] = None,
    database: DatabaseUrl = None,
    concurrency: Annotated[int, typer.Option(help="Jobs run at once in this process.")] = 10,
    sleep: Annotated[float, typer.Option(help="Seconds between polls when idle.")] = 1.0,
    max_jobs: Annotated[
        int | None, typer.Option(help="Exit 0 after this many jobs.", show_default=False)
    ] = None,
    max_time: Annotated[
        float | None, typer.Option(help="Exit 0 after this many seconds.", show_default=False)
    ] = None,
    stop_when_empty: Annotated[
        bool, typer.Option("--stop-when-empty", help="Exit 0 once no job is due.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds per attempt, overriding the jobs' own.", show_default=False),
    ] = None,
    max_tries: Annotated[
        int | None,
        typer.Option(help="Attempts per job, overriding the jobs' own.", show_default=False),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Most jobs claimed per statement.")] = 100,
    lease: Annotated[float, typer.Option(help="Seconds a claim lasts without a heartbeat.")] = 60.0,
    grace: Annotated[
        float, typer.Option(help="Seconds running jobs get to finish at shutdown.")
    ] = 30.0,
    listen: Annotated[
        bool, typer.Option(help="PostgreSQL: wake on NOTIFY instead of waiting for the poll.")
    ] = True,
) -> None:
    """Run a worker: claim due jobs, run them, retry them, fail them."""
    _configure_logging()
    try:
        settings = WorkerSettings(
            database_url=database or database_url(),
            queues=tuple(queue or ["default"]),
            concurrency=concurrency,
            batch_size=batch_size,
            sleep=sleep,
            max_jobs=max_jobs,
            max_time=max_time,
            stop_when_empty=stop_when_empty,
            timeout=timeout,
            max_tries=max_tries,
            lease=lease,
            grace=grace,
            listen=listen,
            connection_name=DEFAULT_CONNECTION,
        )
        code = serve(settings, [*(imports or []), *imports_from_env()])
    except OutboxError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def migrate(
    database: DatabaseUrl = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the DDL instead of running it.")
    ] = False,
    revision: Annotated[str, typer.Option(help="Revision to upgrade to.")] = "head",
) -> None:
    """Create or upgrade the jobs and failed_jobs tables."""
    url = database or database_url()
    try:
        upgrade(url, revision, sql=sql)
    except OutboxError as exc:
        raise _fail(str(exc)) from None
    except (sqlalchemy.exc.DBAPIError, OSError) as exc:
        # Unreachable, refused, unknown host, bad credentials: one line naming the database
        # (password hidden) instead of a driver traceback.
        raise _fail(f"cannot migrate {redact(url)}: {_first_line(exc)}", 1) from None
    if not sql:
        typer.echo(f"database schema is at {revision}", err=True)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    app()
