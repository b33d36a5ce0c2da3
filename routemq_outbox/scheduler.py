"""Enqueueing periodic jobs: every worker takes part, none leads.

Each worker that imported a job class with a ``schedule`` runs a :class:`Scheduler` beside its
claim loop. A slot (job name, time) is enqueued by inserting a row into ``schedule_slots`` in
the transaction that inserts the job; the row's primary key lets exactly one transaction of
all the workers' do so. Whatever a worker's own clock says, slots are due by the database's
clock, and they are computed from the schedule alone, so every worker agrees on them.

What a worker enqueues:

- every slot due since its previous check of the database clock. Checks come when the next
  slot is due, and at least once a minute;
- when it starts (or after more than two minutes without a successful check): of the slots
  due since the newest one that any worker enqueued, the ``catch_up`` most recent (default 1).
  A schedule that was never enqueued, or whose definition changed, has missed nothing: it
  starts with its next slot.

Slot rows are pruned once they are a day old, each schedule's newest kept: that row is where
a starting worker looks for what was missed, and no worker ever enqueues a slot older than it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import sql
from .config import max_payload_bytes
from .errors import UnknownSchedule
from .errors import brief as _brief
from .faults import Backoff
from .job import Job, encode_payload, job_data, scheduled_jobs
from .keys import job_keys
from .schedules import Schedule

__all__ = [
    "SLOT_RETENTION",
    "ScheduleInfo",
    "Scheduler",
    "list_schedules",
    "run_now",
]

log = logging.getLogger("routemq_outbox.scheduler")

SLOT_RETENTION = timedelta(days=1)
"""How long slot rows are kept (each schedule's newest for good)."""

_MAX_SLEEP = 60.0  # seconds between checks of the database clock when nothing is due
_CONTINUITY = timedelta(seconds=120)  # a longer silence counts as a restart: catch_up applies
_LAG = 0.005  # seconds past a slot to wake at, so that the database's clock has reached it
_PRUNE_EVERY = 3600.0


@dataclass
class _Entry:
    name: str
    cls: type[Job]
    schedule: Schedule
    next_slot: datetime | None = None  # the first slot after the last successful check


Clock = Callable[[AsyncConnection], Awaitable[datetime]]


class Scheduler:
    """Enqueues each due slot of ``classes`` (job name -> class with a schedule) once.

    ``clock`` reads the time slots are due by: the database's (a fixed one in tests).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        classes: dict[str, type[Job]],
        *,
        notify: bool,
        clock: Clock = sql.database_now,
    ) -> None:
        self._engine = engine
        self._notify = notify
        self._clock = clock
        self._entries = [
            _Entry(name, cls, cls.schedule)
            for name, cls in sorted(classes.items())
            if cls.schedule is not None
        ]
        self._checked: datetime | None = None  # database time of the last successful check
        self._prune_at = time.monotonic() + random.uniform(0, _PRUNE_EVERY)  # workers apart

    async def run(self, stopping: asyncio.Event) -> None:
        """Check and enqueue until ``stopping`` is set; database errors are retried."""
        log.info(
            "scheduling %d periodic jobs: %s",
            len(self._entries),
            ", ".join(f"{e.name} ({e.schedule.definition})" for e in self._entries),
        )
        backoff = Backoff()
        while not stopping.is_set():
            try:
                pause = await self.check()
                backoff.reset()
            except Exception as exc:
                pause = backoff.next()
                log.warning(
                    "scheduling periodic jobs failed (%s); retrying in %.1f s", _brief(exc), pause
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), pause)

    async def check(self) -> float:
        """Enqueue what is due now; returns the seconds until the next slot (at most a
        minute). On an error, the slots of this check are due again at the next one."""
        async with self._engine.connect() as conn:
            # Reads on their own, without a transaction: a check that finds nothing due is
            # one short statement.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            now = await self._clock(conn)
            checked = self._checked
            if checked is None or not checked <= now <= checked + _CONTINUITY:
                due = await self._missed(conn, now)
            else:
                due = [(e, slot) for e in self._entries for slot in self._since(e, checked, now)]
        prune = time.monotonic() >= self._prune_at
        if due or prune:
            async with self._engine.connect() as conn:
                for entry, slot in sorted(due, key=lambda pair: pair[1]):
                    await self._enqueue(conn, entry, slot)
                if prune:
                    await sql.prune_slots(conn, SLOT_RETENTION.total_seconds())
                    self._prune_at = time.monotonic() + _PRUNE_EVERY
        for entry in self._entries:
            if entry.next_slot is None or entry.next_slot <= now:
                entry.next_slot = entry.schedule.next_after(now)
        self._checked = now
        soonest = min(entry.next_slot for entry in self._entries if entry.next_slot is not None)
        return min(_MAX_SLEEP, (soonest - now).total_seconds() + _LAG)

    @staticmethod
    def _since(entry: _Entry, checked: datetime, now: datetime) -> list[datetime]:
        if entry.next_slot is not None and entry.next_slot > now:
            return []  # the common case, without asking the schedule
        return entry.schedule.between(checked, now)

    async def _missed(self, conn: AsyncConnection, now: datetime) -> list[tuple[_Entry, datetime]]:
        newest = await sql.latest_slots(conn, [entry.name for entry in self._entries])
        due: list[tuple[_Entry, datetime]] = []
        for entry in self._entries:
            found = newest.get(entry.name)
            if found is None or found.definition != entry.schedule.definition:
                continue  # new, or changed by a deploy: it starts with its next slot
            missed = entry.schedule.latest(now, found.slot, entry.schedule.catch_up)
            if len(missed) > 1 or (missed and missed[0] < now - _CONTINUITY):
                log.info("%s: running %d missed slots from %s", entry.name, len(missed), missed[0])
            due.extend((entry, slot) for slot in missed)
        return due

    async def _enqueue(self, conn: AsyncConnection, entry: _Entry, slot: datetime) -> None:
        try:
            job = entry.cls()
            payload = encode_payload(job, max_bytes=max_payload_bytes(), scheduled_at=slot)
            keys = job_keys(job, job_data)
        except Exception as exc:
            log.error(
                "periodic job %s: the slot %s cannot be enqueued: %s",
                entry.name,
                slot.isoformat(),
                _brief(exc),
            )
            return
        taken = await sql.enqueue_slot(
            conn,
            schedule=entry.name,
            slot=slot,
            definition=entry.schedule.definition,
            queue=entry.cls.queue,
            payload=payload,
            notify=self._notify,
            keys=keys,
        )
        if taken:
            log.debug("enqueued %s for %s", entry.name, slot.isoformat())


class ScheduleInfo(NamedTuple):
    """A schedule as ``routemq-outbox schedule list`` shows it."""

    name: str
    definition: str
    queue: str
    catch_up: int
    last_slot: datetime | None  # the newest slot enqueued, by any definition of the schedule
    next_slot: datetime


async def list_schedules(engine: AsyncEngine) -> list[ScheduleInfo]:
    """Each imported schedule, with its last enqueued and next slot (database clock)."""
    classes = scheduled_jobs()
    async with engine.connect() as conn:
        now = await sql.database_now(conn)
        newest = await sql.latest_slots(conn, sorted(classes))
    found = []
    for name, cls in sorted(classes.items()):
        schedule = cls.schedule
        assert schedule is not None
        last = newest.get(name)
        found.append(
            ScheduleInfo(
                name,
                schedule.definition,
                cls.queue,
                schedule.catch_up,
                None if last is None else last.slot,
                schedule.next_after(now),
            )
        )
    return found


async def run_now(engine: AsyncEngine, name: str, *, notify: bool) -> datetime:
    """Enqueue one run of the periodic job ``name`` now, outside its schedule: it takes no
    slot, so the schedule's own runs go on as before. Its ``scheduled_at`` is the database's
    current time, which this returns."""
    cls = scheduled_jobs().get(name)
    if cls is None:
        known = ", ".join(sorted(scheduled_jobs())) or "none is imported"
        raise UnknownSchedule(f"no periodic job is named {name!r} (periodic jobs: {known})")
    async with engine.connect() as conn, conn.begin():
        now = await sql.database_now(conn)
        job = cls()
        payload = encode_payload(job, max_bytes=max_payload_bytes(), scheduled_at=now)
        await sql.insert_one(
            conn, cls.queue, payload, job_keys(job, job_data), notify=notify, priority=cls.priority
        )
    return now
