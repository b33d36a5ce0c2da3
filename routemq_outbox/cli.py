"""The ``routemq-outbox`` command. Each command parses, builds settings, calls one function.

The worker is :func:`routemq_outbox.process.serve`, the schema :mod:`routemq_outbox.migrate`,
and everything an operator does to the queue :mod:`routemq_outbox.admin`; this module only
turns their results into text (or JSON) and exit codes: 0 done, 1 not done (unknown ids or
queues, an unhealthy or unreachable database, a declined confirmation), 2 bad usage or
configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import sqlalchemy.exc
import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from . import admin, scheduler
from .config import (
    DEFAULT_CONNECTION,
    MQTT_QUEUE,
    database_url,
    imports_from_env,
    notify_enabled,
    redact,
)
from .database import create_engine
from .errors import DatabaseNotReady, OutboxError, brief
from .logs import configure_logging
from .migrate import upgrade
from .process import import_job_modules, serve
from .worker import WorkerSettings

T = TypeVar("T")

WORKER_PANEL = "Workers"
MONITORING_PANEL = "Monitoring"
FAILED_PANEL = "Failed jobs"
MAINTENANCE_PANEL = "Maintenance"
SCHEDULE_PANEL = "Periodic jobs"

app = typer.Typer(
    name="routemq-outbox",
    help="A transactional outbox job queue on your own SQL database.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _group(name: str, help: str, panel: str) -> typer.Typer:
    """A subcommand group (``failed list``, ``schedule run``, ...) of the main app."""
    group = typer.Typer(
        help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    app.add_typer(group, name=name, rich_help_panel=panel)
    return group


failed_app = _group("failed", "List, show, retry and delete failed jobs.", FAILED_PANEL)
jobs_app = _group(
    "jobs", "List, show and cancel waiting and running jobs, or run them now.", MONITORING_PANEL
)
schedule_app = _group(
    "schedule", "List the periodic jobs, or enqueue one run of one now.", SCHEDULE_PANEL
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
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
QueueFilter = Annotated[
    str | None,
    typer.Option("--queue", "-q", metavar="NAME", help="Only this queue.", show_default=False),
]
JobImports = Annotated[
    list[str] | None,
    typer.Option(
        "--import",
        "-i",
        metavar="MODULE",
        help="Module defining Job classes; repeatable (also ROUTEMQ_OUTBOX_IMPORT).",
    ),
]
FailedRefs = Annotated[
    list[str],
    typer.Argument(metavar="ID", help="Failed job ids (or uuids).", show_default=False),
]


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"routemq-outbox: {message}", err=True)
    return typer.Exit(code)


# Numbers beyond these are typing mistakes, and some would fail deep inside a driver or the
# database (a LIMIT past 64 bits, an interval past the calendar): refuse them while parsing.
INT64_MAX = 2**63 - 1
MAX_SECONDS = 365 * 86400.0
MAX_IN_FLIGHT = 10_000  # jobs run, claimed or prefetched at once by one worker


def _whole(low: int, high: int) -> Callable[[typer.CallbackParam, int | None], int | None]:
    """A typer callback: the option's integer must be from ``low`` to ``high``."""

    def check(param: typer.CallbackParam, value: int | None) -> int | None:
        if value is not None and not low <= value <= high:
            raise _fail(f"{param.opts[0]} must be a whole number from {low} to {high}, got {value}")
        return value

    return check


def _seconds(
    *, zero_ok: bool = False
) -> Callable[[typer.CallbackParam, float | None], float | None]:
    """A typer callback: the option's seconds must be finite, above 0 (or 0 too), and at most
    a year."""

    def check(param: typer.CallbackParam, value: float | None) -> float | None:
        if value is None or (0 <= value <= MAX_SECONDS and (zero_ok or value > 0)):
            return value  # nan fails every comparison, and inf the last
        low = "from 0 to" if zero_ok else "above 0 and at most"
        raise _fail(
            f"{param.opts[0]} must be a number of seconds {low} {MAX_SECONDS:.0f} (a year), "
            f"got {value:g}"
        )

    return check


def _admin(database: str | None, call: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run one admin function on a fresh engine; its errors become messages and exit codes:
    2 for bad input (a name or id that is not there included), 1 for database trouble."""
    url = database or database_url()

    async def main() -> T:
        engine = create_engine(url)
        try:
            return await call(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except OutboxError as exc:
        raise _fail(str(exc)) from None
    except admin.DATABASE_ERRORS as exc:
        raise _fail(admin.database_problem(url, exc), 1) from None


def _print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: int) -> None:
    """Columns padded to fit; the ``right`` columns after the first are numbers."""
    cells = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = [
            cell.rjust(width) if 0 < i <= right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        typer.echo("  ".join(line).rstrip())


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ------------------------------------------------------------------------------- workers


@app.command(rich_help_panel=WORKER_PANEL)
def work(
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue", "-q", metavar="NAME", help="Queue to work; repeat for more, earlier first."
        ),
    ] = None,
    imports: JobImports = None,
    database: DatabaseUrl = None,
    concurrency: Annotated[
        int,
        typer.Option(help="Jobs run at once in this process.", callback=_whole(1, MAX_IN_FLIGHT)),
    ] = 10,
    sleep: Annotated[
        float, typer.Option(help="Seconds between polls when idle.", callback=_seconds())
    ] = 1.0,
    max_jobs: Annotated[
        int | None,
        typer.Option(
            help="Exit 0 after this many jobs.", show_default=False, callback=_whole(1, INT64_MAX)
        ),
    ] = None,
    max_time: Annotated[
        float | None,
        typer.Option(
            help="Exit 0 after this many seconds.", show_default=False, callback=_seconds()
        ),
    ] = None,
    stop_when_empty: Annotated[
        bool, typer.Option("--stop-when-empty", help="Exit 0 once no job is due.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds per attempt, overriding the jobs' own.",
            show_default=False,
            callback=_seconds(),
        ),
    ] = None,
    max_tries: Annotated[
        int | None,
        typer.Option(
            help="Attempts per job, overriding the jobs' own.",
            show_default=False,
            # attempts are counted in a 32-bit column
            callback=_whole(1, 2**31 - 1),
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(help="Most jobs claimed per statement.", callback=_whole(1, MAX_IN_FLIGHT)),
    ] = 100,
    prefetch: Annotated[
        int | None,
        typer.Option(
            help="Jobs claimed ahead to wait for a free slot (default: --concurrency; 0: none).",
            show_default=False,
            callback=_whole(0, MAX_IN_FLIGHT),
        ),
    ] = None,
    lease: Annotated[
        float,
        typer.Option(help="Seconds a claim lasts without a heartbeat.", callback=_seconds()),
    ] = 60.0,
    grace: Annotated[
        float,
        typer.Option(
            help="Seconds running jobs get to finish at shutdown.", callback=_seconds(zero_ok=True)
        ),
    ] = 30.0,
    listen: Annotated[
        bool, typer.Option(help="PostgreSQL: wake on NOTIFY instead of waiting for the poll.")
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="Serve Prometheus metrics on this port.",
            show_default=False,
            callback=_whole(1, 65535),
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="Address the metrics server listens on.")
    ] = "0.0.0.0",  # noqa: S104 - scrapers run elsewhere
    metrics_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between refreshes of the queue depth gauges.", callback=_seconds()
        ),
    ] = 15.0,
    log_format: Annotated[
        LogFormat, typer.Option(help="Log lines as text, or as JSON objects for log shippers.")
    ] = LogFormat.text,
    quiet: Annotated[bool, typer.Option("--quiet", help="Log warnings and errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug lines too.")] = False,
    schedules: Annotated[
        bool, typer.Option(help="Enqueue the due slots of the periodic jobs imported.")
    ] = True,
    mqtt_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Broker of the MQTT relay (-q mqtt): mqtt://user:pass@host:1883 or mqtts://... "
            "[env: ROUTEMQ_OUTBOX_MQTT_URL]",
            show_default=False,
        ),
    ] = None,
    mqtt_ca_file: Annotated[
        str | None,
        typer.Option(
            metavar="PATH",
            help="CA certificates for mqtts:// instead of the system's "
            "[env: ROUTEMQ_OUTBOX_MQTT_CA_FILE]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a worker: claim due jobs, run them, retry them, fail them."""
    if quiet and verbose:
        raise _fail("--quiet and --verbose exclude each other")
    configure_logging(log_format.value, quiet=quiet, verbose=verbose)
    try:
        if MQTT_QUEUE in (queue or []):
            from . import mqtt

            mqtt.require_client()
            broker = mqtt.configure(mqtt_url, mqtt_ca_file)
            mqtt.log.info("relaying queue %r to MQTT broker %s", MQTT_QUEUE, broker.url)
        elif mqtt_url is not None or mqtt_ca_file is not None:
            raise _fail(
                f"--mqtt-url and --mqtt-ca-file are for the MQTT relay: add -q {MQTT_QUEUE}"
            )
        settings = WorkerSettings(
            database_url=database or database_url(),
            queues=tuple(queue or ["default"]),
            concurrency=concurrency,
            batch_size=batch_size,
            prefetch=prefetch,
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
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            metrics_interval=metrics_interval,
            schedules=schedules,
        )
        code = serve(settings, [*(imports or []), *imports_from_env()])
    except DatabaseNotReady as exc:
        raise _fail(str(exc), 1) from None
    except OutboxError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


# ------------------------------------------------------------------------------- monitoring


@app.command(rich_help_panel=MONITORING_PANEL)
def stats(queue: QueueFilter = None, as_json: AsJson = False, database: DatabaseUrl = None) -> None:
    """Jobs per queue: pending (due now), delayed, reserved, failed, oldest due job's age."""

    async def read(engine: AsyncEngine) -> tuple[list[admin.QueueCounts], set[str]]:
        return await admin.queue_stats(engine, queue), await admin.paused_queues(engine)

    counts, paused = _admin(database, read)
    if as_json:
        _print_json(
            {
                "queues": [
                    {
                        "queue": row.queue,
                        "pending": row.pending,
                        "delayed": row.delayed,
                        "reserved": row.reserved,
                        "failed": row.failed,
                        "oldest_due_age_seconds": row.oldest_due_age,
                        "paused": row.queue in paused,
                    }
                    for row in counts
                ]
            }
        )
    elif not counts:
        typer.echo("no jobs and no failed jobs")
    else:
        _print_table(
            ("QUEUE", "PENDING", "DELAYED", "RESERVED", "FAILED", "OLDEST DUE"),
            [
                (
                    r.queue + (" (paused)" if r.queue in paused else ""),
                    r.pending,
                    r.delayed,
                    r.reserved,
                    r.failed,
                    _age(r.oldest_due_age),
                )
                for r in counts
            ],
            right=5,
        )
    if queue is not None and all(
        r.pending + r.delayed + r.reserved + r.failed == 0 for r in counts
    ):
        typer.echo(f"routemq-outbox: no job or failed job is in queue {queue!r}", err=True)


@app.command(rich_help_panel=MONITORING_PANEL)
def size(
    queue: Annotated[str, typer.Argument(metavar="[QUEUE]", help="Queue to count.")] = "default",
    database: DatabaseUrl = None,
) -> None:
    """Print the number of jobs waiting in QUEUE (due or delayed), for scripts."""
    typer.echo(_admin(database, lambda engine: admin.queue_size(engine, queue)))


@app.command(rich_help_panel=MONITORING_PANEL)
def health(
    database: DatabaseUrl = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the database.", callback=_seconds())
    ] = 10.0,
) -> None:
    """Exit 0 if the database answers and its schema is at head, 1 otherwise."""
    report = _admin(database, lambda engine: admin.check_health(engine, within=timeout))
    if not report.ok:
        raise _fail(report.message, 1)
    typer.echo(f"ok: {report.message} ({report.revision})")


# ------------------------------------------------------------------------------- control

JobIds = Annotated[list[int], typer.Argument(metavar="ID", help="Job ids.", show_default=False)]


def _job_ids(ids: list[int] | None) -> list[int]:
    for job_id in ids or ():
        if not 1 <= job_id <= INT64_MAX:
            raise _fail(f"job id must be a whole number from 1 to {INT64_MAX}, got {job_id}")
    return list(ids or ())


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


@jobs_app.command("list")
def jobs_list(
    queue: QueueFilter = None,
    state: Annotated[
        str | None,
        typer.Option(metavar="STATE", help="pending, delayed or running.", show_default=False),
    ] = None,
    job: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only jobs of this name.", show_default=False)
    ] = None,
    after: Annotated[
        int | None,
        typer.Option(
            metavar="ID", help="Start after this job id (the next page).", show_default=False
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Show at most this many.", callback=_whole(1, admin.MAX_JOB_PAGE))
    ] = 50,
    as_json: AsJson = False,
    database: DatabaseUrl = None,
) -> None:
    """Waiting and running jobs by id, a page at a time."""
    if state is not None and state not in ("pending", "delayed", "running"):
        raise _fail(f"--state must be pending, delayed or running, got {state!r}")
    if after is not None:
        _job_ids([after])
    page = _admin(
        database,
        lambda engine: admin.list_jobs(
            engine, queue=queue, state=state, job=job, after=after, limit=limit
        ),
    )
    if as_json:
        _print_json(
            {"jobs": [j.as_dict(full=False) for j in page.jobs], "next_after": page.next_after}
        )
        return
    if not page.jobs:
        typer.echo("no jobs")
        return
    _print_table(
        ("ID", "QUEUE", "JOB", "STATE", "PRIORITY", "ATTEMPTS", "DUE AT (UTC)"),
        [
            (
                j.id,
                j.queue,
                j.job or "?",
                j.state + (" (cancelling)" if j.cancel_requested else ""),
                j.priority,
                j.attempts,
                _when(j.available_at),
            )
            for j in page.jobs
        ],
        right=0,
    )
    if page.next_after is not None:
        typer.echo(f"(more: --after {page.next_after})", err=True)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.")],
    as_json: AsJson = False,
    database: DatabaseUrl = None,
) -> None:
    """Everything about one waiting or running job."""
    _job_ids([job_id])
    job = _admin(database, lambda engine: admin.show_job(engine, job_id))
    if as_json:
        _print_json(job.as_dict())
        return
    fields = [
        ("id", job.id),
        ("queue", job.queue),
        ("job", job.job or "? (unreadable payload)"),
        ("state", job.state + (" (cancel requested)" if job.cancel_requested else "")),
        ("priority", job.priority),
        ("attempts", job.attempts),
        ("due at", job.available_at.isoformat()),
        ("created at", job.created_at.isoformat()),
        ("lease ends", job.reserved_until.isoformat() if job.reserved_until else "-"),
        ("unique key", job.unique_key or "-"),
        ("serial key", job.serial_key or "-"),
    ]
    for name, value in fields:
        typer.echo(f"{name + ':':<12}{value}")
    payload = job.as_dict()["payload"]
    text = json.dumps(payload, indent=2, ensure_ascii=False) if job.job else job.payload
    typer.echo("payload:\n" + _indent(text))


@jobs_app.command("cancel")
def jobs_cancel(
    ids: Annotated[
        list[int] | None,
        typer.Argument(metavar="ID", help="Job ids.", show_default=False),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue", "-q", metavar="NAME", help="Every job of this queue.", show_default=False
        ),
    ] = None,
    job: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="With --queue: only jobs of this name.", show_default=False
        ),
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option(metavar="TEXT", help="Recorded in failed_jobs.", show_default=False),
    ] = None,
    database: DatabaseUrl = None,
) -> None:
    """Cancel jobs: waiting ones move to failed_jobs as Cancelled; running ones are stopped by
    their worker within about a second, and recorded the same way. None is retried."""
    if bool(ids) == (queue is not None):
        raise _fail("give the ids of the jobs to cancel, or --queue (not both)")
    if job is not None and queue is None:
        raise _fail("--job goes with --queue")
    if ids:
        wanted = _job_ids(ids)
        result = _admin(
            database,
            lambda engine: admin.cancel_jobs(engine, wanted, reason=reason, missing_ok=False),
        )
    else:
        assert queue is not None
        result = _admin(
            database,
            lambda engine: admin.cancel_matching(engine, queue=queue, job=job, reason=reason),
        )
    typer.echo(
        f"cancelled {_plural(len(result.deleted), 'waiting job')} (moved to failed_jobs); "
        f"asked the workers of {_plural(len(result.stopping), 'running job')} to stop them"
    )
    if result.missing:
        missing = ", ".join(map(str, result.missing))
        typer.echo(
            f"routemq-outbox: not in jobs (finished, failed or cancelled): {missing}", err=True
        )


@jobs_app.command("run-now")
def jobs_run_now(ids: JobIds, database: DatabaseUrl = None) -> None:
    """Make waiting jobs due now (all of them, or none if an id is not in jobs)."""
    wanted = _job_ids(ids)
    done = _admin(database, lambda engine: admin.run_now(engine, wanted))
    typer.echo(f"made {_plural(len(done), 'job')} due now")


QueueName = Annotated[str, typer.Argument(metavar="QUEUE", help="Queue name.")]


@app.command(rich_help_panel=MAINTENANCE_PANEL)
def pause(queue: QueueName, database: DatabaseUrl = None) -> None:
    """Stop every worker claiming from QUEUE (they finish what they hold) until resume."""
    _admin(database, lambda engine: admin.pause_queue(engine, queue))
    typer.echo(f"paused queue {queue!r}")


@app.command(rich_help_panel=MAINTENANCE_PANEL)
def resume(queue: QueueName, database: DatabaseUrl = None) -> None:
    """Let workers claim from a paused QUEUE again."""
    _admin(database, lambda engine: admin.resume_queue(engine, queue))
    typer.echo(f"resumed queue {queue!r}")


@app.command(rich_help_panel=MONITORING_PANEL)
def queues(as_json: AsJson = False, database: DatabaseUrl = None) -> None:
    """Each queue's state (running or paused) and its jobs."""
    found = _admin(database, admin.list_queues)
    if as_json:
        _print_json({"queues": [dataclasses.asdict(q) for q in found]})
        return
    if not found:
        typer.echo("no queues")
        return
    _print_table(
        ("QUEUE", "STATE", "PENDING", "DELAYED", "RUNNING", "FAILED", "OLDEST DUE"),
        [
            (
                q.name,
                "paused" if q.paused else "active",
                q.pending,
                q.delayed,
                q.running,
                q.failed,
                _age(q.oldest_due_age),
            )
            for q in found
        ],
        right=0,
    )


@app.command(rich_help_panel=MONITORING_PANEL)
def workers(as_json: AsJson = False, database: DatabaseUrl = None) -> None:
    """Worker processes: live ones with the jobs they run, then those gone silent."""
    found = _admin(database, admin.list_workers)
    if as_json:
        _print_json({"workers": [w.as_dict() for w in found]})
        return
    if not found:
        typer.echo("no workers")
        return
    _print_table(
        ("WORKER", "STATE", "HOST", "PID", "QUEUES", "CONCURRENCY", "LAST SEEN (UTC)", "RUNNING"),
        [
            (
                w.id[:8],
                "alive" if w.alive else "gone",
                w.host,
                w.pid,
                ",".join(w.queues),
                w.concurrency,
                _when(w.last_seen),
                ",".join(map(str, w.running)) or "-",
            )
            for w in found
        ],
        right=0,
    )


# ------------------------------------------------------------------------------- periodic jobs


def _import_jobs(imports: list[str] | None) -> None:
    try:
        import_job_modules([*(imports or []), *imports_from_env()])
    except OutboxError as exc:
        raise _fail(str(exc)) from None


def _utc(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


@schedule_app.command("list")
def schedule_list(
    imports: JobImports = None, as_json: AsJson = False, database: DatabaseUrl = None
) -> None:
    """Each periodic job imported: its schedule, queue, last slot enqueued and next slot."""
    _import_jobs(imports)
    found = _admin(database, scheduler.list_schedules)
    if as_json:
        _print_json(
            {
                "schedules": [
                    {
                        "name": row.name,
                        "schedule": row.definition,
                        "queue": row.queue,
                        "catch_up": row.catch_up,
                        "last_slot": None if row.last_slot is None else row.last_slot.isoformat(),
                        "next_slot": row.next_slot.isoformat(),
                    }
                    for row in found
                ]
            }
        )
    elif not found:
        raise _fail("no periodic job is imported (pass its module with --import)", 1)
    else:
        _print_table(
            ("NAME", "SCHEDULE", "QUEUE", "LAST SLOT (UTC)", "NEXT SLOT (UTC)"),
            [(r.name, r.definition, r.queue, _utc(r.last_slot), _utc(r.next_slot)) for r in found],
            right=0,
        )


@schedule_app.command("run")
def schedule_run(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The periodic job's name.")],
    imports: JobImports = None,
    database: DatabaseUrl = None,
) -> None:
    """Enqueue one run of the periodic job NAME now; its schedule goes on as before."""
    _import_jobs(imports)
    at = _admin(database, lambda engine: scheduler.run_now(engine, name, notify=notify_enabled()))
    typer.echo(f"enqueued {name} (scheduled_at {at.isoformat()})")


# ------------------------------------------------------------------------------- failed jobs


@failed_app.command("list")
def failed_list(
    queue: QueueFilter = None,
    limit: Annotated[
        int,
        typer.Option(
            help="Show at most this many, newest first.",
            callback=_whole(1, admin.MAX_LIST_LIMIT),
        ),
    ] = 50,
    as_json: AsJson = False,
    database: DatabaseUrl = None,
) -> None:
    """The most recent failed jobs."""
    page = _admin(database, lambda engine: admin.list_failed(engine, queue=queue, limit=limit))
    if as_json:
        _print_json({"total": page.total, "failed_jobs": [j.as_dict() for j in page.jobs]})
        return
    if not page.jobs:
        typer.echo("no failed jobs")
        return
    _print_table(
        ("ID", "QUEUE", "JOB", "ATTEMPTS", "FAILED AT (UTC)", "ERROR"),
        [
            (
                job.id,
                job.queue,
                job.job or "?",
                job.attempts,
                job.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
                job.error if len(job.error) <= 80 else job.error[:79] + "…",
            )
            for job in page.jobs
        ],
        right=0,
    )
    if page.total > len(page.jobs):
        typer.echo(
            f"(the {len(page.jobs)} newest of {page.total} failed jobs; see --limit)", err=True
        )


@failed_app.command("show")
def failed_show(
    ref: Annotated[str, typer.Argument(metavar="ID", help="Failed job id (or uuid).")],
    as_json: AsJson = False,
    database: DatabaseUrl = None,
) -> None:
    """Everything about one failed job: its payload and the whole traceback."""
    job = _admin(database, lambda engine: admin.show_failed(engine, ref))
    if as_json:
        _print_json(job.as_dict())
        return
    document = job.as_dict()
    payload = document["payload"]
    fields = [
        ("id", job.id),
        ("uuid", job.uuid),
        ("queue", job.queue),
        ("job", job.job or "? (unreadable payload)"),
        ("attempts", job.attempts),
        ("failed at", job.failed_at.isoformat()),
        ("connection", job.connection),
        ("jobs.id", job.job_id if job.job_id is not None else "-"),
    ]
    for name, value in fields:
        typer.echo(f"{name + ':':<12}{value}")
    text = json.dumps(payload, indent=2, ensure_ascii=False) if job.job else job.payload
    typer.echo("payload:\n" + _indent(text))
    typer.echo("exception:\n" + _indent(job.exception))


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line.strip() else "" for line in text.splitlines())


@failed_app.command("retry")
def failed_retry(
    refs: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID", help="Failed job ids (or uuids).", show_default=False),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every failed job.")] = False,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue", "-q", metavar="NAME", help="With --all: only this queue.", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            help="With --all: jobs moved per transaction.",
            callback=_whole(1, admin.MAX_RETRY_BATCH),
        ),
    ] = admin.RETRY_BATCH,
    database: DatabaseUrl = None,
) -> None:
    """Put failed jobs back on their queues, attempts reset, due now."""
    if bool(refs) == all_:
        raise _fail("give the ids of failed jobs to retry, or --all")
    if queue is not None and not all_:
        raise _fail("--queue goes with --all")
    moved = _admin(
        database,
        lambda engine: admin.retry_failed(
            engine, refs or (), all=all_, queue=queue, batch_size=batch_size
        ),
    )
    typer.echo(f"retried {_plural(moved, 'failed job')}")


@failed_app.command("forget")
def failed_forget(refs: FailedRefs, database: DatabaseUrl = None) -> None:
    """Delete failed jobs by id."""
    deleted = _admin(database, lambda engine: admin.forget_failed(engine, refs))
    typer.echo(f"deleted {_plural(deleted, 'failed job')}")


@failed_app.command("flush")
def failed_flush(queue: QueueFilter = None, database: DatabaseUrl = None) -> None:
    """Delete every failed job (of one queue)."""
    deleted = _admin(database, lambda engine: admin.flush_failed(engine, queue=queue))
    where = "" if queue is None else f" of queue {queue!r}"
    typer.echo(f"deleted {_plural(deleted, 'failed job')}{where}")


def _duration(text: str) -> float:
    try:
        return admin.parse_duration(text)
    except ValueError as exc:
        raise _fail(f"--older-than: {exc}") from None


@failed_app.command("prune")
def failed_prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Delete those that failed longer ago than this: 30m, 48h, 7d, 2w or seconds.",
            show_default=False,
        ),
    ],
    queue: QueueFilter = None,
    database: DatabaseUrl = None,
) -> None:
    """Delete failed jobs older than a given age."""
    seconds = _duration(older_than)
    deleted = _admin(database, lambda engine: admin.prune_failed(engine, seconds, queue=queue))
    typer.echo(f"deleted {_plural(deleted, 'failed job')} that failed more than {older_than} ago")


# ------------------------------------------------------------------------------- maintenance


@app.command(rich_help_panel=MAINTENANCE_PANEL)
def clear(
    queue: Annotated[str, typer.Argument(metavar="QUEUE", help="Queue to empty.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    database: DatabaseUrl = None,
) -> None:
    """Delete the waiting jobs (due and delayed) of QUEUE; running jobs are left alone."""

    def confirm(count: int) -> bool:
        if yes:
            return True
        return typer.confirm(f"Delete {_plural(count, 'waiting job')} of queue {queue!r}?")

    deleted = _admin(database, lambda engine: admin.clear_queue(engine, queue, confirm=confirm))
    if deleted is None:
        raise _fail("nothing was deleted", 1)
    typer.echo(f"deleted {_plural(deleted, 'waiting job')} of queue {queue!r}")


@app.command(rich_help_panel=MAINTENANCE_PANEL)
def migrate(
    database: DatabaseUrl = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the DDL instead of running it.")
    ] = False,
    revision: Annotated[
        str, typer.Option(help="Revision to upgrade to: head, or one of routemq-outbox's.")
    ] = "head",
) -> None:
    """Create or upgrade the jobs and failed_jobs tables (never downgrades)."""
    url = database or database_url()
    try:
        schema = upgrade(url, revision, sql=sql)
    except OutboxError as exc:
        raise _fail(str(exc)) from None
    except (sqlalchemy.exc.DBAPIError, OSError) as exc:
        # Unreachable, refused, unknown host, bad credentials: one line naming the database
        # (password hidden) instead of a driver traceback.
        raise _fail(f"cannot migrate {redact(url)}: {brief(exc)}", 1) from None
    if schema is not None:
        where = " (head)" if schema.at_head else ""
        if schema.embedded:
            where += f", recorded in {schema.table} by your application's alembic"
        typer.echo(f"database schema is at {schema.revision}{where}", err=True)


# ------------------------------------------------------------------------------- dashboard


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@app.command(rich_help_panel=MONITORING_PANEL)
def dashboard(
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", callback=_whole(1, 65535))] = 8787,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, change nothing.")
    ] = False,
    imports: JobImports = None,
    database: DatabaseUrl = None,
) -> None:
    """Serve the web dashboard: queues, jobs, failed jobs, workers, schedules, throughput.

    HTTP Basic with ROUTEMQ_OUTBOX_DASHBOARD_USER and ROUTEMQ_OUTBOX_DASHBOARD_PASSWORD; an
    address other than loopback needs them."""
    try:
        import uvicorn

        from .dashboard import create_app
        from .dashboard.app import PASSWORD_ENV, USER_ENV, credentials
    except ImportError as exc:
        raise _fail(
            f"the dashboard needs the dashboard extra ({exc.name} is missing): "
            'pip install "routemq-outbox[dashboard]"'
        ) from None
    try:
        login = credentials()
    except OutboxError as exc:
        raise _fail(str(exc)) from None
    if login is None and not _loopback(host):
        raise _fail(
            f"refusing to serve the dashboard on {host} without a password: set "
            f"{USER_ENV} and {PASSWORD_ENV}, or listen on 127.0.0.1"
        )
    _import_jobs(imports)
    url = database or database_url()
    application = create_app(create_engine(url), read_only=read_only)
    typer.echo(
        f"routemq-outbox dashboard on http://{host}:{port}/ for {redact(url)}"
        + (" (read-only)" if read_only else ""),
        err=True,
    )
    uvicorn.run(application, host=host, port=port, log_level="warning")


def main() -> None:
    app()
