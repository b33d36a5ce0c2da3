"""``transaction(session)``: dispatch without ``session=`` joins the block's transaction."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from routemq_outbox import dispatch, queue, transaction
from routemq_outbox.schema import jobs

from .test_worker import record


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(jobs))).scalar())


class Abandon(Exception):
    pass


async def test_dispatch_without_session_joins_the_block_and_its_rollback(
    db_url: str, engine: AsyncEngine
) -> None:
    with pytest.raises(Abandon):
        async with AsyncSession(engine) as session, transaction(session):
            await dispatch(record("a"))
            await queue.push(record("b"), queue="other")
            await queue.later(60, record("c"))
            await queue.bulk([record("d"), record("e")])
            assert await queue.size("default", session=session) == 4  # in the block's view
            raise Abandon
    assert await count(engine) == 0

    async with AsyncSession(engine) as session, transaction(session):
        await dispatch(record("f"))
        assert await count(engine) == 0  # not committed yet
    assert await count(engine) == 1

    await dispatch(record("g"))  # outside a block: commits on its own
    assert await count(engine) == 2


async def test_a_named_connection_or_session_is_not_overridden(
    db_url: str, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as outer, AsyncSession(engine) as other:
        with pytest.raises(Abandon):
            async with transaction(outer):
                async with other.begin():
                    await dispatch(record("x"), session=other)  # its own session commits
                await dispatch(record("y"), connection="default")  # its own transaction
                raise Abandon
    assert await count(engine) == 2


async def test_concurrent_blocks_each_see_their_own_session(
    db_url: str, engine: AsyncEngine
) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: concurrent write transactions wait")
    started = asyncio.Event()

    async def commits() -> None:
        async with AsyncSession(engine) as session, transaction(session):
            await started.wait()
            await dispatch(record("kept"))

    async def rolls_back() -> None:
        with pytest.raises(Abandon):
            async with AsyncSession(engine) as session, transaction(session):
                started.set()
                await dispatch(record("dropped"))
                await asyncio.sleep(0.05)
                raise Abandon

    await asyncio.gather(commits(), rolls_back())
    async with engine.connect() as conn:
        payloads = (await conn.execute(sa.select(sa.cast(jobs.c.payload, sa.Text)))).scalars()
        assert ["kept" in p for p in payloads] == [True]


async def test_transaction_takes_only_an_async_session_or_connection() -> None:
    with pytest.raises(TypeError, match="transaction\\(\\) takes an AsyncSession"):
        async with transaction("postgresql://"):  # type: ignore[arg-type]
            pass
