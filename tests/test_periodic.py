"""Periodic jobs: schedules refused at class definition, slots across daylight saving time,
each slot enqueued once by any number of schedulers, missed slots, pruning, and workers."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from routemq_outbox import Job, Worker, WorkerSettings, cron, dispatch, every, sql
from routemq_outbox import job as job_module
from routemq_outbox.errors import InvalidJobSetting, InvalidSchedule, MalformedPayload
from routemq_outbox.job import decode_payload, scheduled_jobs
from routemq_outbox.scheduler import SLOT_RETENTION, Scheduler, run_now
from routemq_outbox.schedules import Schedule
from routemq_outbox.schema import PARKED_AT, failed_jobs, jobs, schedule_slots

from .conftest import DB_URL_FIXTURES
from .processes import SpawnWorker

HOUR = timedelta(hours=1)


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    """Periodic classes defined by a test leave the registry with it: every Worker made later
    in this process would schedule them."""
    before = job_module.registered_jobs()
    yield
    job_module._registry.clear()
    job_module._registry.update(before)


# ------------------------------------------------------------------------- definitions


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        (cron("61 * * * *"), "invalid cron expression '61 * * * *'"),
        (cron("0 3 * *"), "must have five fields"),
        (cron("0 0 30 2 *"), "invalid cron expression"),
        (cron("0 3 * * *", timezone="Mars/Olympus_Mons"), "unknown time zone 'Mars/Olympus_Mons'"),
        (every(seconds=0.5), "at least one second, got 0.5 s"),
        (every(), "at least one second, got 0 s"),
        (every(seconds=math.nan), "is not an interval"),
        (every(minutes=1, catch_up=-1), "catch_up must be from 0 to 1000"),
        (every(minutes=1, catch_up=True), "catch_up must be a whole number"),
        ("0 3 * * *", "must be cron(...) or every(...)"),
    ],
)
def test_a_bad_schedule_is_refused_when_the_class_is_defined(schedule: Any, problem: str) -> None:
    with pytest.raises(InvalidSchedule) as refused:
        type("Nightly", (Job,), {"job_name": "tests.periodic.refused", "schedule": schedule})
    assert str(refused.value).startswith("Nightly.schedule"), refused.value
    assert problem in str(refused.value)
    assert "tests.periodic.refused" not in scheduled_jobs()


def test_a_periodic_jobs_name_must_fit_the_slot_table() -> None:
    with pytest.raises(InvalidSchedule, match="may be 255 characters long"):
        type("Long", (Job,), {"job_name": "x" * 256, "schedule": every(minutes=1)})


# -------------------------------------------------------------------- slots and time zones


def walk(schedule: Schedule, start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    """The slots a worker checking every ``step`` enqueues from ``start`` to ``end``, the clock
    being a fixed time source stepped by hand."""
    found = []
    checked = start
    while checked < end:
        now = min(end, checked + step)
        found += schedule.between(checked, now)
        checked = now
    return found


@pytest.mark.parametrize(
    ("zone", "days"),
    [
        ("Europe/Berlin", ("2026-03-29", "2026-10-25")),  # 02:00 -> 03:00, 03:00 -> 02:00
        ("America/New_York", ("2026-03-08", "2026-11-01")),
    ],
)
@pytest.mark.parametrize("expression", ["30 2 * * *", "0 2 * * *", "0 3 * * *", "59 1 * * *"])
@pytest.mark.parametrize("step", [timedelta(seconds=50), timedelta(minutes=7), HOUR])
def test_a_dst_transition_neither_skips_nor_doubles_a_daily_slot(
    zone: str, days: tuple[str, str], expression: str, step: timedelta
) -> None:
    schedule = cron(expression, timezone=zone)
    assert schedule.problem() is None
    tz = ZoneInfo(zone)
    for day in days:
        middle = datetime.fromisoformat(day).replace(tzinfo=tz)
        start, end = middle - timedelta(days=3), middle + timedelta(days=3)
        slots = walk(schedule, start.astimezone(UTC), end.astimezone(UTC), step)
        local_days = [slot.astimezone(tz).date() for slot in slots]
        assert len(slots) == len(set(slots)) == 6, slots
        assert local_days == sorted(set(local_days)), slots  # one a day, every day
        assert slots == schedule.between(start, end)
        # What a worker starting after an outage sees: the same slots, counted backwards.
        assert schedule.latest(end, start, 6) == slots
        assert schedule.latest(end, start, 2) == slots[-2:]


def test_intervals_count_from_the_epoch_whatever_the_time_asked_about() -> None:
    schedule = every(minutes=15)
    start = datetime(2026, 12, 1, 10, 7, 3, 123456, tzinfo=UTC)
    assert schedule.next_after(start) == datetime(2026, 12, 1, 10, 15, tzinfo=UTC)
    slots = walk(schedule, start, start + timedelta(hours=2), timedelta(seconds=41))
    assert slots == [
        datetime(2026, 12, 1, 10, 15, tzinfo=UTC) + i * timedelta(minutes=15) for i in range(8)
    ]
    assert schedule.latest(start + timedelta(hours=2), start, 3) == slots[-3:]
    assert schedule.latest(start + timedelta(hours=2), slots[-2], 3) == slots[-1:]


# -------------------------------------------------------------------------- scheduled_at


def test_scheduled_at_cannot_come_from_a_producer() -> None:
    class Report(Job):
        job_name = "tests.periodic.report"
        schedule = every(hours=1)

    job = Report()
    with pytest.raises(AttributeError):
        job.scheduled_at = datetime.now(UTC)  # type: ignore[misc]
    job.__dict__["scheduled_at"] = "2026-01-01T00:00:00+00:00"
    with pytest.raises(InvalidJobSetting, match="'scheduled_at' is reserved"):
        asyncio.run(dispatch(job, connection="default"))
    sneaked = '{"job": "tests.periodic.report", "data": {"scheduled_at": "2026-01-01T00:00:00Z"}}'
    with pytest.raises(MalformedPayload, match=r"reserved attributes \['scheduled_at'\]"):
        decode_payload(sneaked)
    for bad in ('"yesterday"', '"2026-01-01T00:00:00"', "12"):
        with pytest.raises(MalformedPayload, match="scheduled_at that is not an aware ISO time"):
            decode_payload(
                f'{{"job": "tests.periodic.report", "data": {{}}, "scheduled_at": {bad}}}'
            )
    assert decode_payload('{"job": "x", "data": {}}').scheduled_at is None


# ----------------------------------------------------------------------- in the database


def hourly(name: str = "tests.periodic.hourly", **options: Any) -> type[Job]:
    return type(
        "Hourly",
        (Job,),
        {"job_name": name, "queue": "periodic", "schedule": every(hours=1, **options)},
    )


async def db_time(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        return await sql.database_now(conn)


async def take(
    engine: AsyncEngine, name: str, slot: datetime, definition: str, age: timedelta | None = None
) -> None:
    """A slot row as a worker would have written it ``age`` ago."""
    async with engine.begin() as conn:
        values: dict[str, Any] = {"schedule": name, "slot": slot, "definition": definition}
        if age is not None:
            values["created_at"] = await sql.database_now(conn) - age
        await conn.execute(sa.insert(schedule_slots).values(values))


async def enqueued(engine: AsyncEngine) -> list[tuple[str, datetime | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(sa.cast(jobs.c.payload, sa.Text)).order_by(jobs.c.id))
        return [(d.name, d.scheduled_at) for d in map(decode_payload, rows.scalars())]


async def taken(engine: AsyncEngine) -> list[tuple[str, datetime]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(schedule_slots.c.schedule, schedule_slots.c.slot).order_by(
                schedule_slots.c.schedule, schedule_slots.c.slot
            )
        )
        return [(row.schedule, row.slot) for row in rows]


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


async def test_each_slot_is_enqueued_once_however_many_schedulers_check(
    engine: AsyncEngine,
) -> None:
    cls = hourly()
    assert cls.schedule is not None
    current = floor_hour(await db_time(engine))
    await take(engine, cls.job_name, current - 3 * HOUR, cls.schedule.definition)
    schedulers = [Scheduler(engine, {cls.job_name: cls}, notify=False) for _ in range(4)]
    await asyncio.gather(*(s.check() for s in schedulers))
    await asyncio.gather(*(s.check() for s in schedulers))
    assert await enqueued(engine) == [(cls.job_name, current)]
    assert await taken(engine) == [(cls.job_name, current - 3 * HOUR), (cls.job_name, current)]


@pytest.mark.parametrize("catch_up", [0, 1, 3])
async def test_catch_up_runs_the_most_recent_missed_slots(
    engine: AsyncEngine, catch_up: int
) -> None:
    cls = hourly(catch_up=catch_up)
    assert cls.schedule is not None
    current = floor_hour(await db_time(engine))
    await take(engine, cls.job_name, current - 10 * HOUR, cls.schedule.definition)
    await Scheduler(engine, {cls.job_name: cls}, notify=False).check()
    expected = [current - i * HOUR for i in reversed(range(catch_up))]
    assert await enqueued(engine) == [(cls.job_name, slot) for slot in expected]


async def test_a_new_or_changed_schedule_starts_with_its_next_slot(engine: AsyncEngine) -> None:
    new, changed = hourly("tests.periodic.new"), hourly("tests.periodic.changed")
    current = floor_hour(await db_time(engine))
    await take(engine, changed.job_name, current - 5 * HOUR, "every 0:30:00")
    scheduler = Scheduler(engine, {c.job_name: c for c in (new, changed)}, notify=False)
    pause = await scheduler.check()
    assert await enqueued(engine) == []
    assert 0 < pause <= 60


async def test_a_finished_or_deleted_job_does_not_free_its_slot(engine: AsyncEngine) -> None:
    cls = hourly()
    assert cls.schedule is not None
    current = floor_hour(await db_time(engine))
    await take(engine, cls.job_name, current - 2 * HOUR, cls.schedule.definition)
    await Scheduler(engine, {cls.job_name: cls}, notify=False).check()
    assert len(await enqueued(engine)) == 1
    async with engine.begin() as conn:
        await conn.execute(sa.delete(jobs))
    await Scheduler(engine, {cls.job_name: cls}, notify=False).check()
    assert await enqueued(engine) == []


async def test_a_slot_whose_job_cannot_be_inserted_stays_free(engine: AsyncEngine) -> None:
    slot = floor_hour(await db_time(engine))
    async with engine.connect() as conn:
        with pytest.raises(sa.exc.DBAPIError):  # the CHECK on the queue name
            await sql.enqueue_slot(
                conn,
                schedule="tests.periodic.hourly",
                slot=slot,
                definition="every 1:00:00",
                queue="",
                payload='{"job": "tests.periodic.hourly", "data": {}}',
                notify=False,
            )
    assert await taken(engine) == []


async def test_pruning_keeps_each_schedules_newest_slot(engine: AsyncEngine) -> None:
    old = SLOT_RETENTION + HOUR
    current = floor_hour(await db_time(engine))
    for hours_ago in (30, 29, 28):
        await take(engine, "a", current - hours_ago * HOUR, "every 1:00:00", old)
    await take(engine, "b", current - 40 * HOUR, "every 1:00:00", old)
    await take(engine, "b", current - 39 * HOUR, "every 1:00:00", old)
    await take(engine, "b", current - 38 * HOUR, "every 1:00:00", timedelta(minutes=5))
    async with engine.connect() as conn:
        await sql.prune_slots(conn, SLOT_RETENTION.total_seconds())
    assert await taken(engine) == [
        ("a", current - 28 * HOUR),
        ("b", current - 38 * HOUR),
    ]


async def test_a_periodic_run_knows_its_slot_and_retries_and_fails_like_any_job(
    engine: AsyncEngine, db_url: str
) -> None:
    seen: list[tuple[int, datetime | None]] = []

    class Flaky(Job):
        job_name = "tests.periodic.flaky"
        queue = "periodic"
        max_tries = 2
        retry_after = 0
        schedule = every(hours=1)

        async def handle(self) -> None:
            seen.append((self.attempt, self.scheduled_at))
            raise RuntimeError("down")

    assert Flaky.schedule is not None
    current = floor_hour(await db_time(engine))
    await take(engine, Flaky.job_name, current - HOUR, Flaky.schedule.definition)
    await Scheduler(engine, {Flaky.job_name: Flaky}, notify=False).check()
    settings = WorkerSettings(
        database_url=db_url, queues=("periodic",), stop_when_empty=True, schedules=False
    )
    await Worker(settings, engine=engine).run()
    assert seen == [(1, current), (2, current)]
    async with engine.connect() as conn:
        payload = (
            await conn.execute(sa.select(sa.cast(failed_jobs.c.payload, sa.Text)))
        ).scalar_one()
    assert decode_payload(payload).scheduled_at == current
    assert json.loads(payload)["scheduled_at"] == current.isoformat()


async def test_a_worker_schedules_the_periodic_jobs_it_imported_unless_told_not_to(
    engine: AsyncEngine, db_url: str
) -> None:
    class Often(Job):
        job_name = "tests.periodic.often"
        queue = "periodic"
        schedule = every(seconds=1)

    settings = WorkerSettings(database_url=db_url, queues=("default",), sleep=0.1, max_time=2.5)
    await Worker(dataclasses.replace(settings, schedules=False), engine=engine).run()
    assert await enqueued(engine) == []
    await Worker(settings, engine=engine).run()
    runs = await enqueued(engine)
    assert runs, "nothing was enqueued in 2.5 s"
    assert {name for name, _ in runs} == {Often.job_name}
    assert len({slot for _, slot in runs}) == len(runs)


@pytest.mark.parametrize("step", [timedelta(seconds=90), timedelta(minutes=10)])
async def test_a_fixed_clock_across_dst_enqueues_each_daily_slot_once(
    sqlite_url: str, step: timedelta
) -> None:
    """The scheduler itself, on a real database, its clock a fixed time source stepped by hand
    through both transitions of a year: checks 90 s apart enqueue every slot since the previous
    check; 10 minutes apart, each check is a restart that runs the latest missed slot."""
    from routemq_outbox.database import create_engine

    class Nightly(Job):
        job_name = "tests.periodic.nightly"
        queue = "periodic"
        schedule = cron("30 2 * * *", timezone="Europe/Berlin")

    assert Nightly.schedule is not None
    engine = create_engine(sqlite_url)
    clock = {"now": datetime(2026, 1, 1, tzinfo=UTC)}

    async def fixed(conn: AsyncConnection) -> datetime:
        return clock["now"]

    try:
        for the_day_before in (
            datetime(2026, 3, 28, 1, 30, tzinfo=UTC),
            datetime(2026, 10, 24, 0, 30, tzinfo=UTC),
        ):
            await take(engine, Nightly.job_name, the_day_before, Nightly.schedule.definition)
            scheduler = Scheduler(engine, {Nightly.job_name: Nightly}, notify=False, clock=fixed)
            clock["now"] = the_day_before + timedelta(hours=18)
            while clock["now"] < the_day_before + timedelta(days=2, hours=3):
                await scheduler.check()
                clock["now"] += step
        slots = [slot for _, slot in await enqueued(engine)]
        berlin = [slot.astimezone(ZoneInfo("Europe/Berlin")).isoformat() for slot in slots]
        assert berlin == [
            "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that night: at the jump
            "2026-03-30T02:30:00+02:00",
            "2026-10-25T02:30:00+02:00",  # 02:30 comes twice that night: the first time
            "2026-10-26T02:30:00+01:00",
        ]
    finally:
        await engine.dispose()


async def test_a_failed_check_loses_no_slot_but_a_long_silence_is_an_outage(
    sqlite_url: str,
) -> None:
    from routemq_outbox.database import create_engine

    class Often(Job):
        job_name = "tests.periodic.often"
        queue = "periodic"
        schedule = every(seconds=1)

    t0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
    second = timedelta(seconds=1)
    times = iter([t0, None, t0 + 3.5 * second, t0 + 300.5 * second])

    async def clock(conn: AsyncConnection) -> datetime:
        moment = next(times)
        if moment is None:
            raise ConnectionError("the database went away")
        return moment

    engine = create_engine(sqlite_url)
    try:
        scheduler = Scheduler(engine, {Often.job_name: Often}, notify=False, clock=clock)
        await scheduler.check()  # a new schedule: it starts with its next slot
        with pytest.raises(ConnectionError):
            await scheduler.check()
        await scheduler.check()  # every slot since the last check that worked
        assert [slot for _, slot in await enqueued(engine)] == [t0 + i * second for i in (1, 2, 3)]
        await scheduler.check()  # nearly five minutes later: an outage, catch_up=1
        assert [slot for _, slot in await enqueued(engine)][3:] == [t0 + 300 * second]
    finally:
        await engine.dispose()


# ------------------------------------------------------------------- real worker processes


@pytest.mark.parametrize("backend", ["postgresql", "sqlite", "mariadb"])
async def test_worker_processes_enqueue_each_second_once_through_kills_and_restarts(
    backend: str, request: pytest.FixtureRequest, spawn: SpawnWorker
) -> None:
    """Three workers with an every(seconds=1) job for about ten seconds; two of them are
    SIGKILLed a few seconds in and restarted: every slot is enqueued, each exactly once."""
    from routemq_outbox.database import create_engine

    url = request.getfixturevalue(DB_URL_FIXTURES[backend])
    engine = create_engine(url)
    args = ("--import", "tests.periodic_jobs", "--sleep", "0.2")
    try:
        workers = [spawn(url, *args) for _ in range(3)]

        async def slots() -> list[datetime]:
            return [slot for _, slot in await enqueued(engine) if slot is not None]

        async def wait_for_slots(count: int) -> None:
            deadline = time.monotonic() + 60
            while len(await slots()) < count:
                assert time.monotonic() < deadline, "\n".join(w.log() for w in workers)
                await asyncio.sleep(0.1)

        await wait_for_slots(4)
        for worker in workers[:2]:
            worker.signal(signal.SIGKILL)
            await asyncio.to_thread(worker.wait, 10)
        await asyncio.sleep(1)
        workers += [spawn(url, *args) for _ in range(2)]
        await wait_for_slots(11)
        for worker in workers[2:]:
            worker.signal(signal.SIGTERM)
        for worker in workers[2:]:
            assert await asyncio.to_thread(worker.wait, 60) == 0, worker.log()
        found = await slots()
        assert len(found) == len(set(found)), f"a slot was enqueued twice: {sorted(found)}"
        found.sort()
        gaps = [b - a for a, b in itertools.pairwise(found)]
        assert set(gaps) == {timedelta(seconds=1)}, f"slots missing: {found}"
        assert [slot for _, slot in await taken(engine)] == found
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------------ CLI


async def test_cli_lists_schedules_and_runs_one_now_without_taking_a_slot(db_url: str) -> None:
    from routemq_outbox.database import create_engine

    from .conftest import run_cli
    from .periodic_jobs import EverySecond

    assert EverySecond.schedule is not None
    engine = create_engine(db_url)
    try:
        last = (await db_time(engine)).replace(microsecond=0) - timedelta(minutes=5)
        await take(engine, EverySecond.job_name, last, EverySecond.schedule.definition)
        where = ("--import", "tests.periodic_jobs", "--database-url", db_url)

        listed = await asyncio.to_thread(run_cli, "schedule", "list", "--json", *where)
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)["schedules"]
        assert row["name"] == EverySecond.job_name
        assert (row["schedule"], row["queue"], row["catch_up"]) == ("every 0:00:01", "periodic", 1)
        assert datetime.fromisoformat(row["last_slot"]) == last
        assert datetime.fromisoformat(row["next_slot"]) > last + timedelta(minutes=5)
        table = await asyncio.to_thread(run_cli, "schedule", "list", *where)
        assert table.stdout.splitlines()[1].split()[:4] == [
            EverySecond.job_name,
            "every",
            "0:00:01",
            "periodic",
        ]

        ran = await asyncio.to_thread(run_cli, "schedule", "run", EverySecond.job_name, *where)
        assert ran.returncode == 0, ran.stderr
        ((name, scheduled_at),) = await enqueued(engine)
        assert name == EverySecond.job_name
        assert ran.stdout == f"enqueued {name} (scheduled_at {scheduled_at.isoformat()})\n"
        assert await taken(engine) == [(EverySecond.job_name, last)]

        unknown = await asyncio.to_thread(run_cli, "schedule", "run", "reports.nightly", *where)
        assert unknown.returncode == 2
        assert "no periodic job is named 'reports.nightly'" in unknown.stderr
        none = await asyncio.to_thread(run_cli, "schedule", "list", "--database-url", db_url)
        assert none.returncode == 1
        assert "no periodic job is imported" in none.stderr
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------ job keys


def keyed(**keys: Any) -> type[Job]:
    """An hourly job whose data (set in ``__init__``) makes its unique or serial key."""

    def __init__(self: Job) -> None:
        self.report = "daily"  # type: ignore[attr-defined]

    return type(
        "Keyed",
        (Job,),
        {
            "job_name": "tests.periodic.keyed",
            "queue": "periodic",
            "schedule": every(hours=1),
            "__init__": __init__,
            **keys,
        },
    )


async def test_periodic_runs_honour_a_unique_key(engine: AsyncEngine) -> None:
    cls = keyed(unique_by=("report",))
    assert cls.schedule is not None
    await run_now(engine, cls.job_name, notify=False)
    await run_now(engine, cls.job_name, notify=False)  # an equal job waits: nothing more
    assert len(await enqueued(engine)) == 1
    # A slot due while the equal job waits is taken, and its run skipped as a duplicate.
    current = floor_hour(await db_time(engine))
    await take(engine, cls.job_name, current - 2 * HOUR, cls.schedule.definition)
    await Scheduler(engine, {cls.job_name: cls}, notify=False).check()
    assert len(await taken(engine)) == 2
    assert len(await enqueued(engine)) == 1
    async with engine.connect() as conn:
        keys = (await conn.execute(sa.select(jobs.c.unique_key))).scalars().all()
    assert keys == ['q:["tests.periodic.keyed",["daily"]]']


async def test_periodic_runs_honour_a_serial_key(engine: AsyncEngine) -> None:
    cls = keyed(serial_by=("report",))
    assert cls.schedule is not None
    await run_now(engine, cls.job_name, notify=False)
    current = floor_hour(await db_time(engine))
    await take(engine, cls.job_name, current - 2 * HOUR, cls.schedule.definition)
    await Scheduler(engine, {cls.job_name: cls}, notify=False).check()
    async with engine.connect() as conn:
        found = (await conn.execute(sa.select(jobs.c.available_at).order_by(jobs.c.id))).all()
    assert [row.available_at == PARKED_AT for row in found] == [False, True]
