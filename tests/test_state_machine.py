"""The job state machine, property-tested against a real database.

Hypothesis drives random sequences of the operations a job's life is made of, each one the
library's own code (``dispatch`` in a transaction that commits or rolls back, and the worker
statements of :mod:`routemq_outbox.sql`, judged by :mod:`routemq_outbox.execution`), against
a model of where every job should be. After every step the database must agree with the model:

- every dispatched job is in exactly one place: pending, reserved, failed (``failed_jobs``) or
  done (gone); a rolled-back job is nowhere;
- attempts never exceed ``max_tries``;
- a fenced-out worker (one whose job was taken over, or is long gone) changes nothing.

"Failed-job retry" moves a row from ``failed_jobs`` back to ``jobs`` with direct SQL here,
as an operator would; the CLI for it is another issue's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import FailJob, Job, RetryJob, dispatch
from routemq_outbox import sql as ops
from routemq_outbox.admin import retry_failed
from routemq_outbox.database import create_engine
from routemq_outbox.execution import Attempt, Verdict, judge_expired, run
from routemq_outbox.schema import db_now_plus, failed_jobs, jobs
from routemq_outbox.threads import ThreadRunner

LEASE = 60.0
EXAMPLES = 200
STEPS = 20
LIVE_JOBS = 4

T = TypeVar("T")

BEHAVIOURS = ["succeed", "raise", "retry_later", "fail_now"]
_behaviour = ["succeed"]  # what the next attempt of StateJob does; set by the machine
seen: Counter[str] = Counter()  # transitions taken, over all examples


async def _run(claimed: ops.Claimed) -> Any:
    """One attempt through the worker's own code (execution.run), in the current task."""
    attempt = Attempt(claimed)
    attempt.task = asyncio.current_task()
    return await run(attempt, threads=ThreadRunner())


class StateJob(Job):
    job_name = "tests.state_machine"
    max_tries = 3
    retry_after = 0  # a failed attempt is due again at once

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        kind = _behaviour[0]
        if kind == "raise":
            raise ValueError(f"attempt {self.attempt} of {self.key} failed")
        if kind == "retry_later":
            raise RetryJob("not yet", delay=3600)
        if kind == "fail_now":
            raise FailJob("no point trying again")


class OneTryJob(StateJob):
    """Its first attempt is its last: the paths that fail a job come up often."""

    job_name = "tests.state_machine_one_try"
    max_tries = 1


@dataclass
class Model:
    """Where one dispatched job should be."""

    place: str  # "pending" | "reserved" | "failed" | "done"
    max_tries: int
    attempts: int = 0
    due: bool = True  # pending: due now (else delayed)
    claimed: ops.Claimed | None = None  # reserved: what its worker holds
    expired: bool = False  # reserved: its lease ran out (not yet taken over)


@dataclass(frozen=True)
class Row:
    place: str
    attempts: int
    id: int | None = None
    token: int | None = None
    available_at: Any = None


Tables = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


async def snapshot(engine: AsyncEngine) -> Tables:
    """Every row of both tables, in full, to compare before and after a step."""
    async with engine.connect() as conn:
        job_rows = (
            await conn.execute(
                sa.select(
                    jobs.c.id,
                    jobs.c.queue,
                    sa.cast(jobs.c.payload, sa.Text),
                    jobs.c.attempts,
                    jobs.c.reserved_at,
                    jobs.c.available_at,
                    jobs.c.token,
                    jobs.c.lease_expires_at,
                ).order_by(jobs.c.id)
            )
        ).all()
        failed_rows = (
            await conn.execute(
                sa.select(
                    failed_jobs.c.job_id,
                    failed_jobs.c.uuid,
                    sa.cast(failed_jobs.c.payload, sa.Text),
                    failed_jobs.c.attempts,
                    failed_jobs.c.exception,
                ).order_by(failed_jobs.c.id)
            )
        ).all()
    return [tuple(r) for r in job_rows], [tuple(r) for r in failed_rows]


def key_of(payload: str) -> str:
    return str(json.loads(payload)["data"]["key"])


class JobStateMachine(RuleBasedStateMachine):
    runner: asyncio.Runner
    engine: AsyncEngine

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, Model] = {}
        self.rolled_back: set[str] = set()
        self.stale: list[tuple[int, int]] = []  # (id, token) pairs whose holder was fenced out
        self.serial = itertools.count(1)
        self.tokens = itertools.count(1)
        self.wait(self._clean())
        self.tables: Tables = ([], [])

    # ------------------------------------------------------------------ plumbing

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    async def on(self, operation: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """One of the worker's operations, on a connection of its own, as the worker runs it."""
        async with self.engine.connect() as conn:
            return await operation(conn, *args, **kwargs)

    async def _clean(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sa.delete(jobs))
            await conn.execute(sa.delete(failed_jobs))

    def rows(self) -> dict[str, Row]:
        """Where each job is, by its key, after the last step (the invariant below reads the
        tables afresh after every step)."""
        job_rows, failed_rows = self.tables
        found: dict[str, Row] = {}
        for id_, _, payload, attempts, reserved_at, available_at, token, lease in job_rows:
            key = key_of(payload)
            assert key not in found, f"{key} is in jobs twice"
            assert (reserved_at is None) == (token is None) == (lease is None)
            place = "pending" if reserved_at is None else "reserved"
            found[key] = Row(place, attempts, id_, token, available_at)
        for _, _, payload, attempts, _ in failed_rows:
            key = key_of(payload)
            assert key not in found, f"{key} is in two places: {found[key].place} and failed"
            found[key] = Row("failed", attempts)
        return found

    def held(self, *, expired: bool | None = None) -> list[str]:
        return sorted(
            k
            for k, m in self.models.items()
            if m.place == "reserved" and (expired is None or m.expired == expired)
        )

    def due(self) -> list[str]:
        return sorted(k for k, m in self.models.items() if m.place == "pending" and m.due)

    def in_place(self, place: str) -> list[str]:
        return sorted(k for k, m in self.models.items() if m.place == place)

    def holding(self, key: str) -> ops.Claimed:
        claimed = self.models[key].claimed
        assert claimed is not None, f"{key} is not reserved"
        return claimed

    def fence_out(self, claimed: ops.Claimed) -> None:
        self.stale.append((claimed.id, claimed.token))

    # ------------------------------------------------------------------ dispatch

    @initialize(one_try=st.lists(st.booleans(), min_size=1, max_size=LIVE_JOBS - 1))
    def some_jobs_to_begin_with(self, one_try: list[bool]) -> None:
        for flag in one_try:
            self.dispatch_in_a_transaction(commit=True, delayed=False, one_try=flag)

    # One transaction in five rolls back, one job in five is delayed (not due for an hour).
    # A few live jobs at a time, so that each goes through a long history.
    @precondition(lambda self: len(self.due() + self.held()) < LIVE_JOBS)
    @rule(
        commit=st.integers(0, 4).map(bool),
        delayed=st.integers(0, 4).map(lambda n: n == 0),
        one_try=st.booleans(),
    )
    def dispatch_in_a_transaction(self, commit: bool, delayed: bool, one_try: bool) -> None:
        key = f"job-{next(self.serial)}"
        job = OneTryJob() if one_try else StateJob()
        job.key = key

        async def go() -> None:
            async with self.engine.connect() as conn:
                transaction = await conn.begin()
                await dispatch(job, delay=3600 if delayed else None, session=conn)
                await (transaction.commit() if commit else transaction.rollback())

        self.wait(go())
        seen["dispatch committed" if commit else "dispatch rolled back"] += 1
        if commit:
            self.models[key] = Model("pending", job.max_tries, due=not delayed)
        else:
            self.rolled_back.add(key)

    # ------------------------------------------------------------------ claim and run

    @precondition(lambda self: self.in_place("pending"))
    @rule(limit=st.integers(1, 4))
    def claim(self, limit: int) -> None:
        """Claim due jobs (there may be none: only delayed ones)."""
        token = next(self.tokens)
        due = sorted(
            (row.available_at, row.id, key)
            for key, row in self.rows().items()
            if row.place == "pending" and self.models[key].due
        )
        got = self.wait(self.on(ops.claim, StateJob.queue, limit, token, LEASE))
        # Alone on the database: exactly the oldest due jobs, never more than asked for.
        assert sorted(key_of(c.payload) for c in got) == sorted(k for *_, k in due[:limit])
        seen["claimed"] += len(got)
        for claimed in got:
            model = self.models[key_of(claimed.payload)]
            assert claimed.attempts == model.attempts + 1
            assert claimed.token == token
            model.place, model.attempts, model.claimed, model.expired = (
                "reserved",
                claimed.attempts,
                claimed,
                False,
            )
            assert model.attempts <= model.max_tries

    @precondition(lambda self: self.held())
    @rule(data=st.data(), behaviour=st.sampled_from(BEHAVIOURS))
    def run_an_attempt(self, data: st.DataObject, behaviour: str) -> None:
        """The holder runs the job (its lease may have run out, as long as nobody took it over)
        and writes the outcome down, as the worker does."""
        self.attempt(data.draw(st.sampled_from(self.held())), behaviour)

    def attempt(self, key: str, behaviour: str) -> None:
        model = self.models[key]
        claimed = self.holding(key)
        _behaviour[0] = behaviour
        outcome = self.wait(_run(claimed))
        last = claimed.attempts >= model.max_tries
        seen[f"attempt {behaviour}" + (" (last)" if last else "")] += 1
        if behaviour == "succeed":
            assert outcome.verdict is Verdict.DONE
            assert self.wait(self.on(ops.finish, [(claimed.id, claimed.token)])) == 1
            model.place = "done"
        elif behaviour == "fail_now" or last:
            assert outcome.verdict is Verdict.FAIL
            assert self.wait(self.move_to_failed(claimed, outcome.error))
            model.place = "failed"
        else:
            assert outcome.verdict is Verdict.RETRY
            pair = [(claimed.id, claimed.token)]
            assert self.wait(self.on(ops.release, pair, delay=outcome.delay)) == 1
            model.place, model.due = "pending", behaviour == "raise"
        model.claimed = None
        self.fence_out(claimed)

    @precondition(lambda self: self.in_place("pending"))
    @rule(behaviour=st.sampled_from([*BEHAVIOURS, "crash", "crash, taken over"]))
    def work_one(self, behaviour: str) -> None:
        """What a worker does most: claim a job and run an attempt of it, or die meanwhile
        (its lease then runs out, and maybe another worker takes the job over at once)."""
        before = set(self.held())
        self.claim(1)
        new = sorted(set(self.held()) - before)
        if new and behaviour.startswith("crash"):
            self.expire(new[0])
            if behaviour == "crash, taken over":
                self.rescue(4)
        elif new:
            self.attempt(new[0], behaviour)

    async def move_to_failed(self, claimed: ops.Claimed, error: BaseException | None) -> bool:
        record = ops.FailedRecord(
            uuid=str(uuid.uuid4()),
            connection="default",
            queue=claimed.queue,
            payload=claimed.payload,
            exception=repr(error),
            attempts=claimed.attempts,
            job_id=claimed.id,
        )
        return await self.on(ops.move_to_failed, claimed.token, record)

    @precondition(lambda self: self.held())
    @rule(data=st.data())
    def holder_shuts_down(self, data: st.DataObject) -> None:
        """A worker stopping hands its unfinished jobs back without spending their attempt."""
        token = data.draw(st.sampled_from(sorted({self.holding(k).token for k in self.held()})))
        keys = [k for k in self.held() if self.holding(k).token == token]
        pairs = [(self.holding(k).id, token) for k in keys]
        released = self.wait(self.on(ops.release, pairs, delay=None, refund_attempt=True))
        assert released == len(keys)
        seen["released at shutdown"] += len(keys)
        for key in keys:
            model = self.models[key]
            self.fence_out(self.holding(key))
            model.place, model.due, model.claimed = "pending", True, None
            model.attempts -= 1

    # ------------------------------------------------------------------ leases

    @precondition(lambda self: self.held())
    @rule()
    def heartbeat(self) -> None:
        pairs = [(self.holding(k).id, self.holding(k).token) for k in self.held()]
        assert self.wait(self.on(ops.extend_leases, pairs, LEASE)) == len(pairs)
        for key in self.held():
            self.models[key].expired = False

    @precondition(lambda self: self.held(expired=False))
    @rule(data=st.data())
    def lease_runs_out(self, data: st.DataObject) -> None:
        """Its worker stopped heartbeating (crashed, killed, blocked) and the lease ran out."""
        self.expire(data.draw(st.sampled_from(self.held(expired=False))))

    def expire(self, key: str) -> None:
        async def go(id_: int) -> None:
            async with self.engine.begin() as conn:
                await conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == id_)
                    .values(lease_expires_at=db_now_plus(sa.literal(-10.0, sa.Float())))
                )

        self.wait(go(self.holding(key).id))
        seen["lease ran out"] += 1
        self.models[key].expired = True

    @precondition(lambda self: self.held(expired=True))
    @rule(limit=st.integers(1, 4))
    def rescue(self, limit: int) -> None:
        """Another worker takes over expired leases, and only those: back to pending, or
        failed when the attempts are spent; the old holder is fenced out."""
        token = next(self.tokens)
        expired = self.held(expired=True)
        got = self.wait(self.on(ops.rescue_expired, limit, token, LEASE, [StateJob.queue]))
        assert len(got) == min(limit, len(expired))
        for rescued in got:
            key = key_of(rescued.payload)
            assert key in expired
            model = self.models[key]
            assert model.claimed is not None
            assert rescued.attempts == model.attempts  # a rescue is not an attempt
            self.fence_out(model.claimed)
            outcome = judge_expired(rescued)
            if model.attempts < model.max_tries:
                seen["rescued, back to pending"] += 1
                assert outcome.verdict is Verdict.RETRY
                pair = [(rescued.id, token)]
                assert self.wait(self.on(ops.release, pair, delay=outcome.delay)) == 1
                model.place, model.due = "pending", True
            else:
                seen["rescued, failed"] += 1
                assert outcome.verdict is Verdict.FAIL
                assert self.wait(self.move_to_failed(rescued, outcome.error))
                model.place = "failed"
            model.claimed, model.expired = None, False

    # ------------------------------------------------------------------ failed jobs

    @precondition(lambda self: self.in_place("failed"))
    @rule(data=st.data())
    def retry_a_failed_job(self, data: st.DataObject) -> None:
        """An operator sends a failed job back (``failed retry ID``): one transaction moves the
        row, attempts reset."""
        key = data.draw(st.sampled_from(self.in_place("failed")))

        async def move_back() -> None:
            async with self.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(
                            failed_jobs.c.id, sa.cast(failed_jobs.c.payload, sa.Text).label("p")
                        )
                    )
                ).all()
            (failed_id,) = [r.id for r in rows if key_of(r.p) == key]
            assert await retry_failed(self.engine, [failed_id]) == 1

        self.wait(move_back())
        seen["failed job retried"] += 1
        self.models[key] = Model("pending", self.models[key].max_tries, attempts=0, due=True)

    # ------------------------------------------------------------------ fencing

    @precondition(lambda self: self.stale)
    @rule(data=st.data(), operation=st.sampled_from(["finish", "release", "fail", "heartbeat"]))
    def fenced_out_worker_writes(self, data: st.DataObject, operation: str) -> None:
        """A worker that lost its job (taken over, or long since finished) tries to write its
        outcome with its old token: nothing changes."""
        job_id, token = data.draw(st.sampled_from(self.stale))
        before = self.tables
        pair = [(job_id, token)]
        if operation == "finish":
            changed: int | bool = self.wait(self.on(ops.finish, pair))
        elif operation == "release":
            changed = self.wait(
                self.on(ops.release, pair, delay=0, refund_attempt=data.draw(st.booleans()))
            )
        elif operation == "heartbeat":
            changed = self.wait(self.on(ops.extend_leases, pair, LEASE))
        else:
            record = ops.FailedRecord(str(uuid.uuid4()), "default", "default", "{}", "E", 1, job_id)
            changed = self.wait(self.on(ops.move_to_failed, token, record))
        assert not changed
        assert self.wait(snapshot(self.engine)) == before
        seen[f"fenced-out {operation}"] += 1

    # ------------------------------------------------------------------ invariants

    @invariant()
    def every_job_is_in_exactly_one_place(self) -> None:
        self.tables = self.wait(snapshot(self.engine))
        rows = self.rows()  # (also checks: at most one row per job across both tables)
        for key, model in self.models.items():
            row = rows.get(key)
            if model.place == "done":
                assert row is None, f"{key} is done but still in {row}"
                continue
            assert row is not None, f"{key} should be {model.place} but is nowhere"
            assert row.place == model.place, f"{key}: {row.place}, expected {model.place}"
            assert row.attempts == model.attempts, f"{key}: attempts {row.attempts}"
            if model.place == "reserved":
                assert model.claimed is not None
                assert (row.id, row.token) == (model.claimed.id, model.claimed.token)
        assert set(rows) <= set(self.models), f"unknown jobs {set(rows) - set(self.models)}"
        assert not self.rolled_back & set(rows), "a rolled-back dispatch left a job"

    @invariant()
    def attempts_never_exceed_max_tries(self) -> None:
        for key, model in self.models.items():
            assert 0 <= model.attempts <= model.max_tries, f"{key}: {model.attempts} attempts"


@pytest.fixture
def machine_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


def test_job_state_machine(db_url: str, machine_runner: asyncio.Runner) -> None:
    engine = create_engine(db_url)
    seen.clear()
    JobStateMachine.runner = machine_runner
    JobStateMachine.engine = engine
    try:
        run_state_machine_as_test(
            JobStateMachine,
            settings=settings(
                max_examples=EXAMPLES,
                deadline=None,
                stateful_step_count=STEPS,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        machine_runner.run(engine.dispose())
    print(f"state machine on {db_url.split(':')[0]}:", dict(sorted(seen.items())))
    # Not vacuous: every kind of step really happened.
    essential = {
        "dispatch committed",
        "dispatch rolled back",
        "claimed",
        *(f"attempt {b}" for b in BEHAVIOURS),
        "attempt raise (last)",
        "released at shutdown",
        "lease ran out",
        "rescued, back to pending",
        "rescued, failed",
        "failed job retried",
        *(f"fenced-out {op}" for op in ("finish", "release", "fail", "heartbeat")),
    }
    assert essential <= set(seen), f"never exercised: {essential - set(seen)}"
