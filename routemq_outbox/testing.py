"""Helpers for your application's own tests: what was dispatched, and running it.

::

    from routemq_outbox import testing

    async def test_signup_sends_a_welcome_email(session):
        await sign_up(session, "ada@example.com")          # dispatches inside the session
        [job] = await testing.dispatched(SendWelcomeEmail, session=session)
        assert job.to == "ada@example.com"
        await session.commit()
        stats = await testing.work_off()                   # runs every due job, then returns
        assert stats.succeeded == 1

Both read the real ``jobs`` table: no fake queue to keep in step with the real one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from . import sql
from .config import database_url as configured_url
from .dispatch import AsyncTarget, SyncTarget, _run_async, _run_sync
from .job import Job, decode_payload, instantiate, registered_jobs, validate_queue_name
from .worker import Worker, WorkerSettings, WorkerStats

__all__ = ["dispatched", "dispatched_sync", "work_off"]

J = TypeVar("J", bound=Job)


async def dispatched(
    job_class: type[J] = Job,  # type: ignore[assignment]
    *,
    queue: str | None = None,
    session: AsyncTarget | None = None,
    connection: str | None = None,
) -> list[J]:
    """The jobs in ``jobs`` (waiting, delayed or held by a worker), oldest first, rebuilt from
    their payloads: every job, or those of ``job_class``, of one ``queue`` or all.

    With ``session=`` it sees that transaction's uncommitted dispatches too.
    """
    result = await _run_async(_statement(queue), session, connection)
    return _jobs(result.all(), job_class)


def dispatched_sync(
    job_class: type[J] = Job,  # type: ignore[assignment]
    *,
    queue: str | None = None,
    session: SyncTarget | None = None,
    connection: str | None = None,
) -> list[J]:
    """:func:`dispatched` for a blocking ``Session`` / ``Connection``."""
    return _jobs(_run_sync(_statement(queue), session, connection).all(), job_class)


async def work_off(
    queues: Sequence[str] = ("default",),
    *,
    database_url: str | None = None,
    engine: AsyncEngine | None = None,
    max_tries: int | None = None,
) -> WorkerStats:
    """Run every due job of ``queues`` in this process, as ``routemq-outbox work
    --stop-when-empty`` would, and return what happened. Delayed jobs stay; a job that fails
    is retried while attempts and due-ness allow (``max_tries`` overrides the jobs' own).

    It works on ``database_url`` (default: the configured database), through ``engine`` if
    given. The job classes must be imported, as for a worker.
    """
    settings = WorkerSettings(
        database_url=database_url or configured_url(),
        queues=tuple(queues),
        stop_when_empty=True,
        listen=False,
        max_tries=max_tries,
    )
    return await Worker(settings, engine=engine).run()


def _statement(queue: str | None) -> Any:
    if queue is not None:
        validate_queue_name(queue)
    return lambda dialect_name: (sql.jobs_statement(queue), {})


def _jobs(rows: Iterable[Any], job_class: type[J]) -> list[J]:
    known = registered_jobs()
    found: list[J] = []
    for queue, payload in rows:
        name, data, scheduled_at = decode_payload(payload)
        cls = known.get(name)
        if job_class is not Job and (cls is None or not issubclass(cls, job_class)):
            continue  # other jobs' classes need not even be imported
        job = instantiate(name, data, queue)  # an unknown name raises UnknownJob
        job.__dict__["_scheduled_at"] = scheduled_at
        found.append(job)  # type: ignore[arg-type]  # an instance of job_class, checked above
    return found
