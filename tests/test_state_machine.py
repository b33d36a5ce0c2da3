"""The job state machine, property-tested against a real database.

Hypothesis drives random sequences of the operations a job's life is made of, each one the
library's own code (``dispatch`` in a transaction that commits or rolls back, and the worker
statements of :mod:`routemq_outbox.sql`, judged by :mod:`routemq_outbox.execution`), against
a model of where every job should be. After every step the database must agree with the model:

- every dispatched job is in exactly one place: pending, reserved, failed (``failed_jobs``) or
  done (gone); a rolled-back job is nowhere;
- attempts never exceed ``max_tries``;
- a fenced-out worker (one whose job was taken over, or is long gone) changes nothing;
- ``failed_jobs`` holds a job only once its attempts are used up, or for an error that no
  retry can mend (``FailJob``, an outcome the database refuses to record).

Beside these anonymous workers, one real :class:`~routemq_outbox.Worker` ("the worker") claims,
runs and records jobs with its own bookkeeping, stepped by the machine: its attempts end when
the machine says, its leases may run out under a running attempt (as in an event-loop stall)
and be taken over, by another worker or by itself, and it may claim the same job again
meanwhile; its ``failed()`` hooks may hang; it may crash holding jobs claimed ahead, started or
not, counted or not (attempts of jobs claimed ahead are counted lazily); and its writes may
fail for a moment or be refused for good. Further invariants hold for it:

- what it holds is exactly its live claims, plus the claims it lost whose attempts still run
  (those change nothing when they end); a job it runs under a live claim is reserved to that
  claim;
- each job it moved to ``failed_jobs`` has had its ``failed()`` hook called once (or waiting
  for a free hook slot); a hook that hangs holds back neither heartbeats nor rescues;
- a crash spends only the attempts the database counted: a job claimed ahead and not yet run
  (or run for less than the counting delay) has spent none.

"Failed-job retry" moves a row from ``failed_jobs`` back to ``jobs`` with direct SQL here,
as an operator would; the CLI for it is another issue's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
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

from routemq_outbox import FailJob, Job, RetryJob, Worker, WorkerSettings, dispatch, faults
from routemq_outbox import sql as ops
from routemq_outbox import worker as worker_module
from routemq_outbox.admin import retry_failed
from routemq_outbox.database import create_engine
from routemq_outbox.execution import Attempt, Verdict, judge_expired, run
from routemq_outbox.schema import db_now_plus, failed_jobs, jobs
from routemq_outbox.threads import ThreadRunner

LEASE = 60.0
EXAMPLES = 200
ROUNDS = 3  # runs of EXAMPLES at most, until every essential step has happened
STEPS = 20
LIVE_JOBS = 4

T = TypeVar("T")

BEHAVIOURS = ["succeed", "raise", "retry_later", "fail_now"]
WRITES = ["ok", "transient", "refused"]  # how the worker's write of an outcome goes
# What an attempt run by the machine itself does; unset in the worker's tasks, whose attempts
# wait for the machine to say (through the job's ``gate``).
_behaviour: ContextVar[str | None] = ContextVar("_behaviour", default=None)
_hooks_hang = [False]  # whether a failed() hook that starts now never returns
hook_calls: Counter[str] = Counter()  # failed() hooks called, by job key
hanging: set[asyncio.Task[Any]] = set()  # hooks that will never return by themselves
seen: Counter[str] = Counter()  # transitions taken, over all examples


async def _run(claimed: ops.Claimed, behaviour: str) -> Any:
    """One attempt through the worker's own code (execution.run), in the current task."""
    attempt = Attempt(claimed)
    attempt.task = asyncio.current_task()
    # (Reset after: the machine's steps share one context, the worker's tasks inherit it.)
    token = _behaviour.set(behaviour)
    try:
        return await run(attempt, threads=ThreadRunner())
    finally:
        _behaviour.reset(token)


class StateJob(Job):
    job_name = "tests.state_machine"
    max_tries = 3
    retry_after = 0  # a failed attempt is due again at once

    gate: asyncio.Future[str]  # set when run by the worker: the machine decides its end

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        kind = _behaviour.get()
        if kind is None:
            self.gate = asyncio.get_running_loop().create_future()
            kind = await self.gate
        if kind == "raise":
            raise ValueError(f"attempt {self.attempt} of {self.key} failed")
        if kind == "retry_later":
            raise RetryJob("not yet", delay=3600)
        if kind == "fail_now":
            raise FailJob("no point trying again")

    async def failed(self, exc: BaseException) -> None:
        hook_calls[self.key] += 1
        if _hooks_hang[0]:
            task = asyncio.current_task()
            assert task is not None
            hanging.add(task)
            try:
                await asyncio.get_running_loop().create_future()  # only its timeout ends it
            finally:
                hanging.discard(task)


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
    # reserved: by "another" (anonymous) worker, by "the worker" (the machine's real one), or
    # by a "dead" one (the real worker, crashed). For the real worker: whether the attempt is
    # counted in the database, and whether it runs (then as attempt number ``run_attempt``).
    holder: str = "another"
    counted: bool = True
    started: bool = False
    run_attempt: int = 0


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


_Key = tuple[int, int]  # (job id, token): one claim


class JobStateMachine(RuleBasedStateMachine):
    runner: asyncio.Runner
    engine: AsyncEngine
    url: str

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, Model] = {}
        self.rolled_back: set[str] = set()
        self.stale: list[_Key] = []  # (id, token) pairs whose holder was fenced out
        self.serial = itertools.count(1)
        self.tokens = itertools.count(1)
        self.wait(self._clean())
        self.tables: Tables = ([], [])
        self.lost: set[_Key] = set()  # claims of the machine's worker that were taken over
        self.failures: Counter[str] = Counter()  # jobs its worker moved to failed_jobs
        hook_calls.clear()
        _hooks_hang[0] = False
        self.worker, self.completer = self.wait(self._new_worker())

    def teardown(self) -> None:
        self.wait(self._kill_worker())
        _hooks_hang[0] = False

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

    def held(self, *, expired: bool | None = None, holder: str | None = None) -> list[str]:
        return sorted(
            k
            for k, m in self.models.items()
            if m.place == "reserved"
            and (expired is None or m.expired == expired)
            and (holder is None or m.holder == holder)
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

    def taken_over(self, model: Model) -> None:
        """Its holder's claim is void; the machine's worker may still run its attempt (or
        have it claimed ahead), which must then change nothing."""
        assert model.claimed is not None
        self.fence_out(model.claimed)
        if model.holder == "the worker":
            self.lost.add((model.claimed.id, model.claimed.token))
            seen["worker's claim taken over"] += 1
        model.holder = "another"

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

    @precondition(lambda self: self.held(holder="another"))
    @rule(data=st.data(), behaviour=st.sampled_from(BEHAVIOURS))
    def run_an_attempt(self, data: st.DataObject, behaviour: str) -> None:
        """The holder runs the job (its lease may have run out, as long as nobody took it over)
        and writes the outcome down, as the worker does."""
        self.attempt(data.draw(st.sampled_from(self.held(holder="another"))), behaviour)

    def attempt(self, key: str, behaviour: str) -> None:
        model = self.models[key]
        claimed = self.holding(key)
        outcome = self.wait(_run(claimed, behaviour))
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
        before = set(self.held(holder="another"))
        self.claim(1)
        new = sorted(set(self.held(holder="another")) - before)
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

    @precondition(lambda self: self.held(holder="another"))
    @rule(data=st.data())
    def holder_shuts_down(self, data: st.DataObject) -> None:
        """A worker stopping hands its unfinished jobs back without spending their attempt."""
        mine = self.held(holder="another")
        token = data.draw(st.sampled_from(sorted({self.holding(k).token for k in mine})))
        keys = [k for k in mine if self.holding(k).token == token]
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

    @precondition(lambda self: self.held(holder="another"))
    @rule()
    def heartbeat(self) -> None:
        mine = self.held(holder="another")
        pairs = [(self.holding(k).id, self.holding(k).token) for k in mine]
        assert self.wait(self.on(ops.extend_leases, pairs, LEASE)) == len(pairs)
        for key in mine:
            self.models[key].expired = False

    @precondition(lambda self: self.held(expired=False))
    @rule(data=st.data())
    def lease_runs_out(self, data: st.DataObject) -> None:
        """Its worker stopped heartbeating (crashed, killed, or, for the machine's worker, an
        event loop that stalled) and the lease ran out."""
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
            self.taken_over(model)
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

    # ------------------------------------------------------------------ the machine's worker

    async def _new_worker(self) -> tuple[Worker, asyncio.Task[None]]:
        """A worker with its bookkeeping and its completer, but no loops of its own: the
        machine claims, counts, heartbeats and rescues through its methods, step by step."""
        settings = WorkerSettings(
            self.url, queues=(StateJob.queue,), concurrency=2, prefetch=2, lease=LEASE
        )
        worker = Worker(settings, engine=self.engine)
        worker._open()
        return worker, asyncio.create_task(worker._completer())

    async def _kill_worker(self) -> None:
        """Kill -9: the worker's tasks end where they are, with no write of any kind."""
        worker = self.worker
        worker._starting = False
        tasks = [*worker._running, *worker._hooks.running, self.completer]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await worker._close()

    def worker_step(self, step: Awaitable[Any]) -> None:
        """One step of the worker, then let it settle: every attempt it runs waits for the
        machine, every hook that started hangs or is over, nothing is left to delete."""

        async def go() -> None:
            # A step that hangs (behind a hook, say) fails, however busy the machine.
            await asyncio.wait_for(step, 60)
            deadline = time.monotonic() + 60
            while not self.settled():
                assert time.monotonic() < deadline, "the worker does not settle"
                await asyncio.sleep(0.001)

        self.wait(go())
        self.follow_starts()

    def settled(self) -> bool:
        worker = self.worker
        for attempt in worker._running.values():
            job = attempt.job
            if not isinstance(job, StateJob) or "gate" not in vars(job) or job.gate.done():
                return False
        if worker._done or worker_module._DONE in worker._held.values():
            return False
        for task, hook in worker._hooks.running.items():
            waits_for_a_slot = hook.deadline == math.inf and worker._hooks._slots.locked()
            if task not in hanging and not waits_for_a_slot:
                return False
        return True

    def pair(self, key: str) -> _Key:
        claimed = self.holding(key)
        return claimed.id, claimed.token

    def running(self) -> dict[_Key, Attempt]:
        return {(a.claimed.id, a.claimed.token): a for a in self.worker._running.values()}

    def follow_starts(self) -> None:
        """Jobs claimed ahead start whenever a slot frees: as attempt number attempts + 1,
        not counted in the database yet."""
        running = self.running()
        for key in self.held(holder="the worker"):
            model = self.models[key]
            claimed = self.holding(key)
            if not model.started and (claimed.id, claimed.token) in running:
                model.started = True
                model.run_attempt = model.attempts + (0 if model.counted else 1)
                assert running[(claimed.id, claimed.token)].claimed.attempts == model.run_attempt

    def worker_runs(self, *, lost: bool) -> list[_Key]:
        """The worker's attempts waiting for the machine: of live claims, or of lost ones."""
        return sorted(k for k in self.running() if (k in self.lost) == lost)

    @precondition(lambda self: self.due())
    @rule(limit=st.integers(1, 4))
    def worker_claims(self, limit: int) -> None:
        """The worker claims as its slots and prefetch buffer allow: jobs for free slots start
        at once, their attempt counted; the others wait, their attempt not counted."""
        worker = self.worker
        wanted = min(limit, worker._budget())
        if wanted <= 0:
            return
        before = set(worker._held)
        self.worker_step(worker._claim(wanted))
        ahead = {(c.id, c.token): c for c in worker._waiting}
        running = self.running()
        for pair in set(worker._held) - before:
            counted = pair in running and pair not in worker._uncounted
            claimed = running[pair].claimed if pair in running else ahead[pair]
            model = self.models[key_of(claimed.payload)]
            assert model.place == "pending"
            model.place, model.claimed, model.expired = "reserved", claimed, False
            model.holder, model.counted, model.started = "the worker", counted, False
            model.attempts += counted
            seen["worker claimed" + ("" if counted else " ahead")] += 1
        self.follow_starts()

    @precondition(lambda self: self.worker_runs(lost=False))
    @rule(
        data=st.data(),
        behaviour=st.sampled_from(BEHAVIOURS),
        write=st.sampled_from(WRITES),
        hang=st.booleans(),
    )
    def worker_attempt_ends(
        self, data: st.DataObject, behaviour: str, write: str, hang: bool
    ) -> None:
        """An attempt of the worker ends and it records the outcome; the write may fail once
        for a moment, or be refused for good (then a retry fails the job, a failure is
        stored with its text escaped). A failure starts the job's failed() hook."""
        pair = data.draw(st.sampled_from(self.worker_runs(lost=False)))
        attempt = self.running()[pair]
        key = key_of(attempt.claimed.payload)
        model = self.models[key]
        last = model.run_attempt >= model.max_tries
        failing = behaviour == "fail_now" or (behaviour != "succeed" and last)
        statement = (
            "finish" if behaviour == "succeed" else "move_to_failed" if failing else "release"
        )
        if statement == "finish" and write == "refused":
            write = "transient"  # deletes are retried whatever the error: nothing to refuse
        self.hooks_hang(hang)
        with faulty(statement, write):
            self.end_attempt(attempt, behaviour)
        seen[f"worker attempt {behaviour}" + (" (last)" if last else "")] += 1
        seen[f"worker {statement} {write}"] += 1
        if behaviour == "succeed":
            model.place = "done"
        elif failing or (statement == "release" and write == "refused"):
            model.place, model.attempts = "failed", model.run_attempt
            self.failures[key] += 1
            if hanging and self.held(holder="the worker"):
                self.worker_heartbeats()  # its hook hangs: the leases must be renewed all the same
        else:
            model.place, model.attempts = "pending", model.run_attempt
            model.due = behaviour == "raise"
        assert model.claimed is not None
        self.fence_out(model.claimed)  # its claim is over: the worker must hold nothing of it
        model.claimed, model.holder = None, "another"

    @precondition(lambda self: self.due() or self.worker_runs(lost=False))
    @rule(
        data=st.data(),
        behaviour=st.sampled_from(BEHAVIOURS),
        write=st.sampled_from(WRITES),
        hang=st.booleans(),
    )
    def worker_works(self, data: st.DataObject, behaviour: str, write: str, hang: bool) -> None:
        """What the worker does most: claim what its slots allow, and end an attempt."""
        if self.due():
            self.worker_claims(4)
        if self.worker_runs(lost=False):
            self.worker_attempt_ends(data, behaviour, write, hang)

    def end_attempt(self, attempt: Attempt, behaviour: str) -> None:
        async def end() -> None:
            assert isinstance(attempt.job, StateJob)
            attempt.job.gate.set_result(behaviour)
            assert attempt.task is not None
            await asyncio.wait([attempt.task])

        self.worker_step(end())

    @precondition(lambda self: self.worker_runs(lost=True))
    @rule(data=st.data(), behaviour=st.sampled_from(BEHAVIOURS))
    def lost_attempt_ends(self, data: st.DataObject, behaviour: str) -> None:
        """An attempt whose claim was taken over (the job may since have been claimed again
        by this same worker) ends: whatever it records is fenced out, and what the worker
        holds for the job's new claim stays."""
        self.end_lost(data.draw(st.sampled_from(self.worker_runs(lost=True))), behaviour)

    def end_lost(self, pair: _Key, behaviour: str) -> None:
        before, hooks = self.wait(snapshot(self.engine)), Counter(hook_calls)
        self.end_attempt(self.running()[pair], behaviour)
        assert self.wait(snapshot(self.engine)) == before
        assert hook_calls == hooks, "a hook ran for a failure that was not recorded"
        assert pair not in self.worker._held
        self.lost.discard(pair)
        again = any(self.holding(k).id == pair[0] for k in self.held(holder="the worker"))
        seen["lost attempt ended" + (", job claimed again" if again else "")] += 1

    @precondition(
        lambda self: any(not self.models[k].counted for k in self.held(holder="the worker"))
    )
    @rule()
    def worker_counts_attempts(self) -> None:
        """Jobs started from those claimed ahead have run for the counting delay: the worker
        counts their attempt in the database."""
        worker = self.worker

        async def count() -> None:
            counter = asyncio.create_task(worker._counter())
            while worker._uncounted:
                await asyncio.sleep(0.001)
            worker._closed.set()  # the counter ends its round, then stops
            await counter
            worker._closed.clear()

        saved, worker_module._COUNT_AFTER = worker_module._COUNT_AFTER, 0.0
        try:
            self.worker_step(count())
        finally:
            worker_module._COUNT_AFTER = saved
        for key in self.held(holder="the worker"):
            model = self.models[key]
            if model.started and not model.counted:
                model.counted, model.attempts = True, model.attempts + 1
                seen["worker counted an attempt"] += 1

    @precondition(lambda self: bool(self.held(holder="the worker") or hanging))
    @rule()
    def worker_heartbeats(self) -> None:
        """The worker extends the leases of what it holds, hooks hanging or not."""
        self.worker_step(self.worker._heartbeat())
        for key in self.held(holder="the worker"):
            self.models[key].expired = False
        if self.held(holder="the worker"):
            seen["worker heartbeat" + (" while a hook hangs" if hanging else "")] += 1

    @precondition(lambda self: self.worker_runs(lost=False))
    @rule(
        data=st.data(),
        by_itself=st.booleans(),
        then=st.sampled_from([None, *BEHAVIOURS]),
    )
    def worker_stalls_and_claims_again(
        self, data: st.DataObject, by_itself: bool, then: str | None
    ) -> None:
        """The worker's event loop stalls past a running job's lease; the job is taken over
        (by another worker, or by the worker itself once it runs again) and, due at once,
        claimed again by the same worker while the first attempt still runs; that attempt
        may end ``then``."""
        pair = data.draw(st.sampled_from(self.worker_runs(lost=False)))
        (key,) = [k for k in self.held(holder="the worker") if pair == self.pair(k)]
        self.expire(key)
        if by_itself:
            self.worker_rescues(hang=False)
        else:
            self.rescue(4)
        if self.models[key].place == "pending":
            self.worker_claims(4)
        if then is not None:
            self.end_lost(pair, then)

    @precondition(lambda self: self.held(expired=True))
    @rule(hang=st.booleans())
    def worker_rescues(self, hang: bool) -> None:
        """The worker takes over every expired lease (its own too): back to pending, or
        failed (with the job's hook) when its attempts are spent."""
        expired = self.held(expired=True)
        self.hooks_hang(hang)
        self.worker_step(self.worker._rescue())
        for key in expired:
            model = self.models[key]
            self.taken_over(model)
            if model.attempts < model.max_tries:
                model.place, model.due = "pending", True
                seen["worker rescued, back to pending"] += 1
            else:
                model.place = "failed"
                self.failures[key] += 1
                seen["worker rescued, failed"] += 1
            model.claimed, model.expired = None, False

    @precondition(lambda self: bool(hanging))
    @rule()
    def hooks_time_out(self) -> None:
        """The hooks that hang reach their timeout: the watchdog cancels them."""
        later = time.monotonic() + StateJob.timeout + 1
        hooks = self.worker._hooks

        async def watch() -> None:
            hooks.watch(later, worker_module._CANCEL_WAIT)

        timed_out = set(hanging)
        self.worker_step(watch())
        # (A hook waiting for a slot may start meanwhile, and hang in its turn.)
        assert not timed_out & hanging, "a hook outlived its timeout"
        seen["hooks timed out"] += 1

    # Only while it holds a claim whose attempt is not counted: the crash of interest (any
    # other is a lease running out, as above).
    @precondition(
        lambda self: any(not self.models[k].counted for k in self.held(holder="the worker"))
    )
    @rule()
    def worker_crashes(self) -> None:
        """The worker is killed; its leases run out later. What it claimed ahead, started or
        not, keeps the attempts the database counted: none for those not yet counted."""
        for hook in self.worker._hooks.running.values():
            if hook.deadline == math.inf:  # waiting for a slot: dies with the worker, unrun
                self.failures[key_of(hook.claimed.payload)] -= 1
        self.wait(self._kill_worker())
        for key in self.held(holder="the worker"):
            model = self.models[key]
            what = "started" if model.started else "not started"
            seen[f"crash, claimed ahead and {what}" if not model.counted else "crash"] += 1
            model.holder = "dead"
            if not model.expired:
                self.expire(key)
        self.lost.clear()
        self.worker, self.completer = self.wait(self._new_worker())

    def hooks_hang(self, hang: bool) -> None:
        _hooks_hang[0] = hang

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
        for _, _, payload, attempts, exception in self.tables[1]:
            model = self.models[key_of(payload)]
            assert attempts >= model.max_tries or any(
                reason in exception for reason in ("FailJob", "OutcomeNotRecorded")
            ), f"failed with attempts left: {exception}"

        self.check_the_worker()

    def check_the_worker(self) -> None:
        """What the machine's worker holds, runs, and ran hooks for (after the tables were
        read)."""
        worker = self.worker
        live = {(self.holding(k).id, self.holding(k).token) for k in self.held(holder="the worker")}
        held = set(worker._held)
        assert live <= held, f"the worker dropped its claims {live - held}"
        assert held - live <= self.lost, f"the worker holds claims it lost: {held - live}"
        rows = {(r[0], r[6]) for r in self.tables[0]}
        for pair, attempt in self.running().items():
            key = key_of(attempt.claimed.payload)
            assert pair in self.lost or pair in rows, f"{key} runs, yet is not reserved to it"
        hooks = worker._hooks.running.values()
        waiting = Counter(key_of(h.claimed.payload) for h in hooks if h.deadline == math.inf)
        for key in set(self.failures) | set(hook_calls):
            failed = self.failures[key]
            assert hook_calls[key] + waiting[key] == failed, f"{key}: {hook_calls[key]} hooks"

    @invariant()
    def attempts_never_exceed_max_tries(self) -> None:
        for key, model in self.models.items():
            assert 0 <= model.attempts <= model.max_tries, f"{key}: {model.attempts} attempts"


class Refused(sa.exc.DataError):
    """What the database raises for a value it cannot store: permanent."""


@contextlib.contextmanager
def faulty(statement: str, write: str) -> Iterator[None]:
    """The worker's next ``statement`` fails once: for a moment ("transient") or for good
    ("refused"), then works again (a refused failure is written again with its text
    escaped; a refused retry is not written again, the job is failed instead)."""
    if write == "ok":
        yield
        return
    real = getattr(ops, statement)
    error: Exception = (
        ConnectionResetError("connection reset")
        if write == "transient"
        else Refused("INSERT ...", {}, ValueError("value cannot be stored"))
    )

    async def once(*args: Any, **kwargs: Any) -> Any:
        setattr(ops, statement, real)
        raise error

    setattr(ops, statement, once)
    try:
        yield
    finally:
        setattr(ops, statement, real)


# Every kind of step a run of the machine must have taken (see test_job_state_machine).
ESSENTIAL = {
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
    "worker claimed",
    "worker claimed ahead",
    *(f"worker attempt {b}" for b in BEHAVIOURS),
    "worker attempt raise (last)",
    *(f"worker {s} transient" for s in ("finish", "release", "move_to_failed")),
    *(f"worker {s} refused" for s in ("release", "move_to_failed")),
    "worker counted an attempt",
    "worker's claim taken over",
    "lost attempt ended, job claimed again",
    "worker heartbeat while a hook hangs",
    "worker rescued, back to pending",
    "worker rescued, failed",
    "hooks timed out",
    "crash, claimed ahead and not started",
    "crash, claimed ahead and started",
}


@pytest.fixture
def machine_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


def test_job_state_machine(
    db_url: str, machine_runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(db_url)
    seen.clear()
    JobStateMachine.runner = machine_runner
    JobStateMachine.engine = engine
    JobStateMachine.url = db_url
    # A write that failed for a moment is tried again at once, not after half a second.
    monkeypatch.setattr(faults.Backoff, "next", lambda self: 0.001)
    try:
        # Not vacuous: every kind of step below must really happen. A few need a rare
        # sequence (a crash while a job claimed ahead waits for a slot, say), which some
        # runs of EXAMPLES miss: more examples are run then, up to ROUNDS runs in all, with
        # the steps seen counted over every run.
        for _ in range(ROUNDS):
            run_state_machine_as_test(
                JobStateMachine,
                settings=settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    stateful_step_count=STEPS,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
            if set(seen) >= ESSENTIAL:
                break
    finally:
        machine_runner.run(engine.dispose())
    print(f"state machine on {db_url.split(':')[0]}:", dict(sorted(seen.items())))
    assert set(seen) >= ESSENTIAL, f"never exercised: {ESSENTIAL - set(seen)}"
