"""Unique and serial keys through a job's whole life, property-tested against a real database.

Hypothesis drives random sequences of dispatches (committed or rolled back, with a unique key,
a serial key, both or neither) and of the worker's statements (claim, success, retry, failure,
lease expiry and takeover, failed-job retry, housekeeping), against a model. After every step:

- every job dispatched, committed and not a duplicate is in exactly one place (waiting,
  reserved, failed or done) and holds the keys the model says;
- a dispatch is a duplicate exactly when an equal job holds its unique key, and then names it;
- of the live jobs of a serial key, only the first is due (the others are parked), and a claim
  takes only due jobs: the next job of a key becomes due exactly when the one before it
  succeeds or moves to ``failed_jobs``, never from housekeeping (no promotion is ever missed).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, dispatch
from routemq_outbox import sql as ops
from routemq_outbox.admin import retry_failed
from routemq_outbox.database import create_engine
from routemq_outbox.schema import PARKED_AT, db_now_plus, failed_jobs, jobs

T = TypeVar("T")
LEASE = 60.0
SERIAL_KEYS = [None, "s1", "s2"]
UNIQUE_KEYS = [None, "u1", "u2"]
seen: Counter[str] = Counter()


class QueuedJob(Job):
    """Unique (with ``unique_key=``) while it waits."""

    job_name = "tests.keys_state"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:  # the machine plays the worker with its statements
        raise NotImplementedError


class ActiveJob(QueuedJob):
    """Unique while it waits or runs."""

    job_name = "tests.keys_state_active"
    unique_while = "active"


@dataclass
class Model:
    place: str  # "pending" | "reserved" | "failed" | "done"
    id: int
    serial: str | None
    unique: str | None
    active: bool
    holds_key: bool  # its unique key is in jobs.unique_key
    claimed: ops.Claimed | None = None


class KeysStateMachine(RuleBasedStateMachine):
    runner: asyncio.Runner
    engine: AsyncEngine

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, Model] = {}
        self.numbers = itertools.count(1)
        self.tokens = itertools.count(1)
        self.wait(self._clean())

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    async def _clean(self) -> None:
        async with self.engine.begin() as conn:
            for table in ("jobs", "failed_jobs", "unique_windows", "serial_keys"):
                await conn.execute(sa.text(f"DELETE FROM {table}"))

    def live(self, place: str | None = None) -> list[str]:
        return sorted(
            k
            for k, m in self.models.items()
            if m.place in ("pending", "reserved") and (place is None or m.place == place)
        )

    def in_place(self, place: str) -> list[str]:
        return sorted(k for k, m in self.models.items() if m.place == place)

    def heads(self) -> set[str]:
        """Live jobs first in their serial key (and live jobs without one)."""
        found: set[str] = set()
        first: dict[str, int] = {}
        for key in self.live():
            model = self.models[key]
            if model.serial is None:
                found.add(key)
            elif model.serial not in first or model.id < first[model.serial]:
                first[model.serial] = model.id
        found.update(k for k in self.live() if self.models[k].id in first.values())
        return found

    def release_key(self, model: Model) -> None:
        model.holds_key = False

    # ------------------------------------------------------------------ dispatch

    @precondition(lambda self: len(self.live()) < 6)
    @rule(
        commit=st.integers(0, 4).map(bool),
        serial=st.sampled_from(SERIAL_KEYS),
        unique=st.sampled_from(UNIQUE_KEYS),
        active=st.booleans(),
    )
    def dispatch_a_job(
        self, commit: bool, serial: str | None, unique: str | None, active: bool
    ) -> None:
        key = f"job-{next(self.numbers)}"
        job = ActiveJob() if active else QueuedJob()
        job.key = key
        stored = None if unique is None else ("a:" if active else "q:") + unique
        holder = next(
            (
                m
                for m in self.models.values()
                if stored is not None
                and m.holds_key
                and m.unique is not None
                and ("a:" if m.active else "q:") + m.unique == stored
            ),
            None,
        )

        async def go() -> ops.Inserted | None:
            async with self.engine.connect() as conn:
                transaction = await conn.begin()
                result = await dispatch(job, session=conn, unique_key=unique, serial_key=serial)
                await (transaction.commit() if commit else transaction.rollback())
                return None if result is None else ops.Inserted(result.id, result.duplicate)

        result = self.wait(go())
        if serial is None and unique is None:
            assert result is None
            seen["plain dispatch"] += 1
            if commit:
                self.models[key] = Model("pending", self.id_of(key), None, None, active, False)
            return
        assert result is not None
        if holder is not None:
            assert result == ops.Inserted(holder.id, True), (result, holder)
            seen["duplicate"] += 1
            return
        assert not result.duplicate
        if commit:
            self.models[key] = Model(
                "pending", result.id, serial, unique, active, stored is not None
            )
            seen["keyed dispatch committed"] += 1
            if serial is not None and any(
                m.serial == serial for k, m in self.models.items() if k != key and k in self.live()
            ):
                seen["parked"] += 1
        else:
            seen["keyed dispatch rolled back"] += 1

    def id_of(self, key: str) -> int:
        async def go() -> int:
            async with self.engine.connect() as conn:
                rows = await conn.execute(sa.select(jobs.c.id, sa.cast(jobs.c.payload, sa.Text)))
                return int(next(i for i, p in rows if json.loads(p)["data"]["key"] == key))

        return self.wait(go())

    # ------------------------------------------------------------------ the worker

    @precondition(lambda self: self.live("pending"))
    @rule(limit=st.integers(1, 6))
    def claim(self, limit: int) -> None:
        eligible = self.heads() & set(self.live("pending"))

        async def go() -> list[ops.Claimed]:
            async with self.engine.connect() as conn:
                return await ops.claim(conn, "default", limit, next(self.tokens), LEASE)

        got = self.wait(go())
        keys = {json.loads(c.payload)["data"]["key"] for c in got}
        assert keys <= eligible, f"claimed {keys - eligible}, which are not due"
        assert len(keys) == min(limit, len(eligible))
        for claimed in got:
            model = self.models[json.loads(claimed.payload)["data"]["key"]]
            assert claimed.serial_key == model.serial
            model.place, model.claimed = "reserved", claimed
            if not model.active:
                self.release_key(model)  # a queued-only key leaves with the claim
        seen["claimed"] += len(got)

    def held(self) -> list[str]:
        return self.live("reserved")

    @precondition(lambda self: self.live("reserved"))
    @rule(data=st.data(), outcome=st.sampled_from(["succeed", "retry", "fail"]))
    def outcome(self, data: st.DataObject, outcome: str) -> None:
        key = data.draw(st.sampled_from(self.held()))
        model = self.models[key]
        claimed = model.claimed
        assert claimed is not None
        pair = (claimed.id, claimed.token)

        async def go() -> int | bool:
            async with self.engine.connect() as conn:
                if outcome == "succeed" and claimed.serial_key is not None:
                    return await ops.finish_serial(conn, [(*pair, claimed.serial_key)])
                if outcome == "succeed":
                    return await ops.finish(conn, [pair])
                if outcome == "retry":
                    return await ops.release(conn, [pair], delay=0)
                record = ops.FailedRecord(
                    f"{key}-{claimed.token}",
                    "default",
                    "default",
                    claimed.payload,
                    "x",
                    1,
                    claimed.id,
                )
                return await ops.move_to_failed(
                    conn, claimed.token, record, serial_key=claimed.serial_key
                )

        assert self.wait(go()) in (1, True)
        seen[f"{outcome}{' (serial)' if model.serial else ''}"] += 1
        if outcome == "retry":
            model.place, model.claimed = "pending", None
        else:
            model.place, model.claimed = ("done" if outcome == "succeed" else "failed"), None
            self.release_key(model)

    @precondition(lambda self: self.live("reserved"))
    @rule(data=st.data(), then_fail=st.booleans())
    def lease_expires_and_is_taken_over(self, data: st.DataObject, then_fail: bool) -> None:
        key = data.draw(st.sampled_from(self.held()))
        model = self.models[key]

        async def go() -> list[ops.Claimed]:
            async with self.engine.begin() as conn:
                await conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == model.id)
                    .values(lease_expires_at=db_now_plus(sa.literal(-1.0, sa.Float())))
                )
            async with self.engine.connect() as conn:
                return await ops.rescue_expired(conn, 10, next(self.tokens), LEASE, ["default"])

        (rescued,) = self.wait(go())
        assert (rescued.id, rescued.serial_key) == (model.id, model.serial)
        model.claimed = rescued
        seen["taken over"] += 1

    @precondition(lambda self: self.in_place("failed"))
    @rule(data=st.data())
    def failed_retry(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.in_place("failed")))
        model = self.models[key]

        async def go() -> int:
            async with self.engine.connect() as conn:
                failed_id = (
                    await conn.execute(
                        sa.select(failed_jobs.c.id).where(failed_jobs.c.job_id == model.id)
                    )
                ).scalar_one()
            return await retry_failed(self.engine, [failed_id])

        assert self.wait(go()) == 1
        # Back without its keys: it collides with nothing and waits behind nothing.
        model.place, model.serial, model.unique, model.holds_key = "pending", None, None, False
        model.id = self.id_of(key)
        seen["failed retry"] += 1

    @precondition(lambda self: self.live())
    @rule()
    def housekeeping(self) -> None:
        async def go() -> ops.Housekept:
            async with self.engine.connect() as conn:
                return await ops.housekeep(conn)

        done = self.wait(go())
        assert done.promoted_keys == 0, "a promotion was missed"
        seen["housekeeping"] += 1

    # ------------------------------------------------------------------ invariants

    @invariant()
    def the_database_agrees(self) -> None:
        async def go() -> list[Any]:
            async with self.engine.connect() as conn:
                return list(
                    (
                        await conn.execute(
                            sa.select(
                                jobs.c.id,
                                sa.cast(jobs.c.payload, sa.Text),
                                jobs.c.reserved_at,
                                jobs.c.available_at,
                                jobs.c.unique_key,
                                jobs.c.serial_key,
                                jobs.c.serial_due_at,
                            ).order_by(jobs.c.id)
                        )
                    ).all()
                )

        rows = self.wait(go())
        found = {json.loads(row[1])["data"]["key"]: row for row in rows}
        assert set(found) == set(self.live()), (set(found), self.live())
        heads = self.heads()
        for key, (
            id_,
            _,
            reserved_at,
            available_at,
            unique_key,
            serial_key,
            due_at,
        ) in found.items():
            model = self.models[key]
            assert id_ == model.id
            assert (reserved_at is not None) == (model.place == "reserved")
            assert serial_key == model.serial
            expected_key = None
            if model.holds_key and model.unique is not None:
                expected_key = ("a:" if model.active else "q:") + model.unique
            assert unique_key == expected_key, (key, unique_key, model)
            parked = key not in heads
            assert (available_at == PARKED_AT) == parked, (key, available_at, model)
            assert (due_at is not None) == parked


@pytest.fixture
def machine_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


def test_keys_state_machine(db_url: str, machine_runner: asyncio.Runner) -> None:
    engine = create_engine(db_url)
    seen.clear()
    KeysStateMachine.runner = machine_runner
    KeysStateMachine.engine = engine
    try:
        run_state_machine_as_test(
            KeysStateMachine,
            settings=settings(
                max_examples=150,
                deadline=None,
                stateful_step_count=30,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        machine_runner.run(engine.dispose())
    print(f"keys state machine on {db_url.split(':')[0]}:", dict(sorted(seen.items())))
    essential = {
        "duplicate",
        "keyed dispatch committed",
        "keyed dispatch rolled back",
        "parked",
        "succeed (serial)",
        "fail (serial)",
        "retry (serial)",
        "taken over",
        "failed retry",
    }
    assert essential <= set(seen), f"never exercised: {essential - set(seen)}"
