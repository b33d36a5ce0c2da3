"""``transaction(session)``: dispatch into the caller's transaction without passing ``session=``.

Code that cannot pass a session to each call (RouteMQ's ``dispatch(job)`` and
``queue.push(...)`` through the ``outbox`` queue driver, or helpers written before the outbox)
still inserts its jobs in the caller's transaction inside this block: a context variable holds
the session, and the driver and :func:`routemq_outbox.dispatch` read it when they are given no
``session=``. A context variable, not a global, so that concurrent requests each see their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = ["current_session", "transaction"]

_session: ContextVar[AsyncSession | AsyncConnection | None] = ContextVar(
    "routemq_outbox_session", default=None
)


def current_session() -> AsyncSession | AsyncConnection | None:
    """The session bound by the innermost :func:`transaction` block, or None outside one."""
    return _session.get()


@asynccontextmanager
async def transaction(
    session: AsyncSession | AsyncConnection,
) -> AsyncIterator[AsyncSession | AsyncConnection]:
    """Make jobs dispatched in this block part of ``session``'s transaction.

    If ``session`` is already in a transaction, the block joins it and leaves committing to
    its owner. Otherwise the block begins one, commits it when the block ends, and rolls it
    back (with every job dispatched in it) if the block raises.
    """
    if not isinstance(session, AsyncSession | AsyncConnection):
        raise TypeError(
            f"transaction() takes an AsyncSession or AsyncConnection, got {type(session).__name__}"
        )
    token = _session.set(session)
    try:
        if session.in_transaction():
            yield session
        else:
            async with session.begin():
                yield session
    finally:
        _session.reset(token)
