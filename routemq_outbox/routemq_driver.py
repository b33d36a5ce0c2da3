"""RouteMQ on the outbox: the ``outbox`` queue driver, and RouteMQ jobs on our worker.

RouteMQ (``pip install 'routemq-outbox[routemq]'``, Python 3.12+) finds this driver through the
``routemq.queue_drivers`` entry point; ``QUEUE_CONNECTION=outbox`` makes it the default. Its
``dispatch(job)``, ``queue.push/later/bulk`` then insert into our ``jobs`` table: inside
``async with routemq_outbox.transaction(session):`` in the caller's transaction, elsewhere in a
short transaction of their own on the configured database. RouteMQ's ``QueueWorker`` drains
them through the driver, or ``routemq-outbox work --import app.jobs`` runs them with batched
claims and leases.

A RouteMQ job is stored in our envelope as ``{"job": "routemq", "data": {"payload": <RouteMQ's
own payload>}}``. RouteMQ's payload carries the job's class and its settings (``max_tries``,
``timeout``, ``retry_after``, backoff); our worker honours them, and rebuilds the job with
RouteMQ's own ``Job.unserialize``, so RouteMQ's rules for data hold unchanged: private names and
its deny list are never set. Unlike RouteMQ, a class that is not registered with
``@Job.register`` is refused even when ``ROUTEMQ_JOB_ALLOWLIST_DISABLED`` is set: the worker
never imports a module a payload names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import admin, sql
from .ambient import current_session
from .config import DEFAULT_CONNECTION, max_payload_bytes
from .database import connection_engine
from .dispatch import insert_payloads
from .dispatch import queue as outbox_queue
from .errors import (
    NotFound,
    PayloadTooLarge,
    UnknownJob,
    UnserializableJob,
)
from .execution import Verdict, describe, judge_expired
from .job import Job

try:
    from routemq.job import Job as RouteMQBaseJob
    from routemq.queue.queue_driver import QueueDriver
    from routemq.settings import load_queue_reliability_settings, load_queue_retry_settings
except ImportError as exc:  # pragma: no cover - only where RouteMQ is absent
    raise ImportError(
        "routemq_outbox.routemq_driver needs RouteMQ (Python 3.12+): "
        "pip install 'routemq-outbox[routemq]'"
    ) from exc

__all__ = ["JOB_NAME", "OutboxQueue", "RouteMQJob", "routemq_payload", "wrap"]

log = logging.getLogger("routemq_outbox.routemq")

JOB_NAME = "routemq"
"""The job name under which RouteMQ jobs are stored."""

DEFAULT_TIMEOUT = 60
"""Seconds an attempt may take when a RouteMQ job says 0, as RouteMQ's worker defaults."""


def wrap(payload: str) -> str:
    """Our envelope around a payload RouteMQ serialised; raises a DispatchError."""
    try:
        document = json.loads(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnserializableJob(f"RouteMQ payload is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("class"), str):
        raise UnserializableJob(
            'RouteMQ payload must be a JSON object naming its job: {"class": "module.Class", ...}'
        )
    text = json.dumps(
        {"job": JOB_NAME, "data": {"payload": document}},
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    )
    limit = max_payload_bytes()
    if len(text.encode()) > limit:
        raise PayloadTooLarge(
            f"RouteMQ job {document['class']}: payload is {len(text.encode())} bytes; the limit "
            f"is {limit} (ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES)"
        )
    return text


def routemq_payload(stored: str | bytes) -> str | None:
    """The RouteMQ payload inside a stored envelope, or None if it holds no RouteMQ job."""
    try:
        document = json.loads(stored)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("job") != JOB_NAME:
        return None
    data = document.get("data")
    inner = data.get("payload") if isinstance(data, dict) else None
    return json.dumps(inner) if isinstance(inner, dict) else None


class RouteMQJob(Job):
    """A RouteMQ job run by our worker; its settings come from RouteMQ's payload."""

    job_name = JOB_NAME

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_routemq"] = None

    @property
    def payload(self) -> dict[str, Any]:
        """RouteMQ's payload of the job."""
        return dict(self.__dict__.get("_document") or {})

    @payload.setter
    def payload(self, document: dict[str, Any]) -> None:
        name = document.get("class") if isinstance(document, dict) else None
        if name not in RouteMQBaseJob._allowed_classes:
            raise UnknownJob(
                f"unknown RouteMQ job {name!r}: no class registered with @Job.register by that "
                "name is imported in this worker (pass its module with --import)"
            )
        job = RouteMQBaseJob.unserialize(json.dumps(document))
        self.__dict__["_routemq"] = job
        self.__dict__["_document"] = document
        # As RouteMQ's worker: the payload's settings, a timeout of 0 meaning its default.
        self.max_tries = job.max_tries
        self.timeout = job.timeout or DEFAULT_TIMEOUT
        self.retry_after = job.retry_after

    @property
    def routemq(self) -> Any:
        """The RouteMQ job instance."""
        return self.__dict__["_routemq"]

    async def handle(self) -> None:
        job = self.routemq
        job.job_id = self.job_id
        job.attempts = self.attempt
        await job.handle()

    async def failed(self, exc: BaseException) -> None:
        await self.routemq.failed(exc)

    def retry_delay(self, attempt: int) -> float:
        # The job's backoff settings, else the worker-wide ones from RouteMQ's environment.
        settings = load_queue_retry_settings()
        return float(
            self.routemq.get_retry_delay(
                attempt,
                backoff_enabled=settings.backoff_enabled,
                max_delay=settings.max_delay,
                jitter=settings.jitter,
            )
        )


def _job_id(job_id: int | str) -> int:
    return int(job_id)


class OutboxQueue(QueueDriver):  # type: ignore[misc,unused-ignore]
    """RouteMQ's ``QueueDriver`` on the outbox tables (``QUEUE_CONNECTION=outbox``).

    A popped job is held under a lease (RouteMQ's ``QUEUE_VISIBILITY_TIMEOUT``, 300 s by
    default, or what its worker passes to ``reap_expired``) that ``heartbeat`` extends.
    ``release``, ``delete`` and ``failed`` act on it only while this driver still holds it, so
    a worker whose lease ran out cannot touch a job another worker has taken since. ``failed``
    moves the held job to failed_jobs in one transaction, and the ``delete`` RouteMQ's worker
    sends after it finds nothing left.
    """

    connection_name = "outbox"

    def __init__(self, connection: str = DEFAULT_CONNECTION) -> None:
        self._connection = connection
        self._held: dict[int, sql.Claimed] = {}
        self._lease = float(load_queue_reliability_settings().visibility_timeout)

    def _engine(self) -> AsyncEngine:
        return connection_engine(self._connection)

    async def _with(self, operation: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
        async with self._engine().connect() as conn:
            return await operation(conn)

    async def push(self, payload: str, queue: str = "default", delay: int = 0) -> None:
        session = current_session()  # inside ``async with transaction(session):``
        await insert_payloads(
            [(queue, wrap(payload))],
            delay=delay or None,
            session=session,
            connection=None if session is not None else self._connection,
        )

    async def pop(self, queue: str = "default") -> dict[str, Any] | None:
        token = secrets.randbits(63)
        claimed = await self._with(lambda conn: sql.claim(conn, queue, 1, token, self._lease))
        if not claimed:
            return None
        job = claimed[0]
        payload = routemq_payload(job.payload)
        if payload is None:
            # RouteMQ's worker would delete a payload it cannot read: keep it, in failed_jobs.
            error = UnknownJob(
                f"job id={job.id} in queue {job.queue!r} is not a RouteMQ job, so RouteMQ's "
                "worker cannot run it: retry it from failed_jobs and run it with "
                f"`routemq-outbox work --queue {job.queue}`"
            )
            await self._move_to_failed(job, job.payload, describe(error), self.connection_name)
            log.warning("%s; moved to failed_jobs", error)
            return None
        self._held[job.id] = job
        return {"id": job.id, "payload": payload, "attempts": job.attempts}

    async def release(self, job_id: int | str, queue: str, delay: int = 0) -> None:
        job = self._held.pop(_job_id(job_id), None)
        if job is not None:
            pair = [(job.id, job.token)]
            await self._with(lambda conn: sql.release(conn, pair, delay=float(delay)))

    async def delete(self, job_id: int | str, queue: str) -> None:
        job = self._held.pop(_job_id(job_id), None)
        if job is None:
            return
        if job.serial_key is not None:  # the next job of its key becomes due
            held = [(job.id, job.token, job.serial_key)]
            await self._with(lambda conn: sql.finish_serial(conn, held))
        else:
            await self._with(lambda conn: sql.finish(conn, [(job.id, job.token)]))

    async def heartbeat(self, job_id: int | str, queue: str) -> bool:
        job = self._held.get(_job_id(job_id))
        if job is None:
            return False
        pair = [(job.id, job.token)]
        # RouteMQ's worker cancels its heartbeat task when the job ends, possibly mid-write:
        # let the write finish rather than abandon a connection in the middle of it.
        extend = self._with(lambda conn: sql.extend_leases(conn, pair, self._lease))
        return bool(await asyncio.shield(extend))

    async def failed(self, connection: str, queue: str, payload: str, exception: str) -> None:
        # RouteMQ's worker calls this for the job it runs, then deletes that job: move the
        # held job now, so that it is never in both tables nor in neither.
        held = [job for job in self._held.values() if job.queue == queue]
        if held:
            job = held[-1]
            del self._held[job.id]
            await self._move_to_failed(job, wrap(payload), exception, connection)
            return
        record = sql.FailedRecord(
            str(uuid.uuid4()), connection, queue, wrap(payload), exception, 0, 0
        )
        await self._with(lambda conn: sql.insert_failed(conn, record))

    async def _move_to_failed(
        self, job: sql.Claimed, payload: str, exception: str, connection: str
    ) -> bool:
        record = sql.FailedRecord(
            str(uuid.uuid4()), connection, job.queue, payload, exception, job.attempts, job.id
        )
        return bool(
            await self._with(
                lambda conn: sql.move_to_failed(conn, job.token, record, serial_key=job.serial_key)
            )
        )

    async def size(self, queue: str = "default") -> int:
        return await outbox_queue.size(queue, connection=self._connection)

    async def stats(self, queue: str = "default") -> dict[str, Any]:
        (counts,) = await sql.queue_counts(self._engine(), [queue])
        return {
            "queue": queue,
            "ready": counts.pending,
            "reserved": counts.reserved,
            "delayed": counts.delayed,
            "failed": counts.failed,
            "oldest_ready_age_seconds": counts.oldest_due_age or 0.0,
        }

    async def reap_expired(self, queue: str = "default", visibility_timeout: int = 300) -> int:
        """Take back jobs whose worker stopped heartbeating: to pending while attempts remain,
        else to failed_jobs. RouteMQ's visibility timeout becomes this driver's lease."""
        self._lease = float(visibility_timeout)
        token = secrets.randbits(63)
        reaped = 0
        while True:
            found = await self._with(
                lambda conn: sql.rescue_expired(conn, 100, token, self._lease, [queue])
            )
            for job in found:
                outcome = judge_expired(job)
                if outcome.verdict is Verdict.FAIL and outcome.error is not None:
                    await self._move_to_failed(
                        job, job.payload, describe(outcome.error), self.connection_name
                    )
                else:
                    await self._back_to_pending(job)
            reaped += len(found)
            if len(found) < 100:
                return reaped

    async def _back_to_pending(self, job: sql.Claimed) -> None:
        pair = [(job.id, job.token)]
        await self._with(lambda conn: sql.release(conn, pair, delay=None))

    async def list_failed_jobs(self, queue: str | None = None) -> list[dict[str, Any]]:
        page = await admin.list_failed(self._engine(), queue=queue, limit=admin.MAX_LIST_LIMIT)
        return [_failed(job) for job in reversed(page.jobs)]

    async def get_failed_job(self, job_id: int | str) -> dict[str, Any] | None:
        try:
            return _failed(await admin.show_failed(self._engine(), job_id))
        except NotFound:
            return None

    async def retry_failed_job(self, job_id: int | str) -> bool:
        try:
            return bool(await admin.retry_failed(self._engine(), [job_id]))
        except NotFound:
            return False

    async def forget_failed_job(self, job_id: int | str) -> bool:
        try:
            return bool(await admin.forget_failed(self._engine(), [job_id]))
        except NotFound:
            return False

    async def flush_failed_jobs(self, queue: str | None = None) -> int:
        try:
            return await admin.flush_failed(self._engine(), queue=queue)
        except NotFound:
            return 0


def _failed(job: admin.FailedJob) -> dict[str, Any]:
    """A failed job as RouteMQ's database driver describes one."""
    return {
        "id": job.id,
        "uuid": job.uuid,
        "connection": job.connection,
        "queue": job.queue,
        "payload": routemq_payload(job.payload) or job.payload,
        "exception": job.exception,
        "attempts": job.attempts,
        "failed_at": job.failed_at.isoformat(),
    }
