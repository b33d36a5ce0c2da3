"""Due times every engine stores, and a dispatch clock that starts at the dispatch.

- Delays go from 0 to 100 years and datetimes from 1970-01-01 UTC to 100 years from now:
  anything else is refused before anything is sent, so the caller's transaction goes on.
- Retry delays share the bound: a job class, a RetryJob, and what the worker stores.
- A delay counts from the dispatch call, not from the start of its transaction.

Each test fails without the protection it covers.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, RetryJob, dispatch, queue
from routemq_outbox.errors import MAX_DELAY_SECONDS, InvalidDelay, JobDefinitionError
from routemq_outbox.job import check_retry_delay
from routemq_outbox.schema import db_now

from .test_payloads import jobs_rows, order_count


class Later(Job):
    job_name = "tests.delays.later"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:  # pragma: no cover - never run here
        pass


def a_job(key: str = "later") -> Later:
    job = Later()
    job.key = key
    return job


# ----------------------------------------------------------------------------- delays


def far_future() -> datetime:
    return datetime.now(UTC) + timedelta(days=365 * 101)


@pytest.mark.parametrize(
    "delay",
    [
        pytest.param(1e13, id="1e13 s"),
        pytest.param(MAX_DELAY_SECONDS + 1, id="100 years and a second"),
        pytest.param(10**400, id="an int too large for a float"),
        pytest.param(math.inf, id="inf"),
        pytest.param(timedelta(days=3_650_000), id="timedelta of 10,000 years"),
        pytest.param(
            datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))), id="year 10000 UTC"
        ),
        pytest.param(datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), id="year 0"),
        pytest.param(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), id="before 1970"),
        pytest.param("far future", id="101 years from now"),
    ],
)
async def test_due_times_no_engine_stores_are_refused_before_anything_is_sent(
    engine: AsyncEngine, orders: None, delay: Any
) -> None:
    delay = far_future() if delay == "far future" else delay
    async with engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (1)"))
        with pytest.raises(InvalidDelay, match="100 years"):
            await queue.later(delay, a_job(), session=conn)
        with pytest.raises(InvalidDelay, match="100 years"):
            await queue.bulk([a_job()], delay=delay, session=conn)
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (2)"))
    assert await order_count(engine) == 2
    assert await jobs_rows(engine) == []


async def test_the_bounds_themselves_are_stored(engine: AsyncEngine) -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    await queue.later(MAX_DELAY_SECONDS, a_job())
    await queue.later(timedelta(seconds=MAX_DELAY_SECONDS - 60), a_job())
    await queue.later(epoch, a_job())
    first, second, third = await jobs_rows(engine)
    for row, seconds in ((first, MAX_DELAY_SECONDS), (second, MAX_DELAY_SECONDS - 60)):
        assert abs((row.available_at - row.created_at).total_seconds() - seconds) < 1
    assert third.available_at == epoch


def test_retry_delays_are_bounded_where_they_are_set() -> None:
    with pytest.raises(JobDefinitionError, match=r"retry_after must be .*, got 1000000000000.0"):

        class FarFuture(Job):
            retry_after = 1e12

    with pytest.raises(JobDefinitionError, match="backoff_max must be"):

        class FarCap(Job):
            backoff = "exponential"
            backoff_max = MAX_DELAY_SECONDS + 1

    for bad in (math.inf, math.nan, MAX_DELAY_SECONDS + 1, -1, "10", True):
        with pytest.raises(InvalidDelay, match="RetryJob delay must be a number of seconds"):
            RetryJob(delay=bad)  # type: ignore[arg-type]
    assert RetryJob(delay=MAX_DELAY_SECONDS).delay == MAX_DELAY_SECONDS


def test_check_retry_delay_is_what_the_worker_stores() -> None:
    assert check_retry_delay(10) == 10.0
    assert check_retry_delay(MAX_DELAY_SECONDS) == float(MAX_DELAY_SECONDS)
    assert check_retry_delay(-5) == 0.0  # "at once"
    assert check_retry_delay(-math.inf) == 0.0
    assert check_retry_delay(-(10**400)) == 0.0
    for bad in (math.inf, math.nan, MAX_DELAY_SECONDS + 1, 10**400, None, "10", True):
        with pytest.raises(InvalidDelay, match="a retry delay must be a number of seconds"):
            check_retry_delay(bad)


# ----------------------------------------------------------------------------- the clock


async def test_a_delay_counts_from_the_dispatch_not_from_the_start_of_its_transaction(
    engine: AsyncEngine, orders: None
) -> None:
    """PostgreSQL's now() is the transaction's start: a job dispatched with a 10 s delay a
    minute into a transaction would be due 50 s early."""
    async with engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (1)"))
        started = (await conn.execute(sa.select(db_now()))).scalar_one()
        await asyncio.sleep(1.5)
        await queue.later(10, a_job(key="later"), session=conn)
        await dispatch(a_job(key="now"), session=conn)
        await queue.bulk([a_job(key="bulk 1"), a_job(key="bulk 2")], delay=10, session=conn)
    rows = await jobs_rows(engine)
    for row in rows:
        assert row.created_at - started >= timedelta(seconds=1.4), (row, started)
    due = [round((r.available_at - r.created_at).total_seconds(), 2) for r in rows]
    assert due == [10.0, 0.0, 10.0, 10.0]
