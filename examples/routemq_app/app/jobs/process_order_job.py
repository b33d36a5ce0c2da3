"""A RouteMQ job, exactly as a RouteMQ application writes it."""

from __future__ import annotations

import sqlalchemy as sa
from routemq.job import Job

from routemq_outbox.database import connection_engine

from ..models import orders


@Job.register
class ProcessOrderJob(Job):
    queue = "orders"
    max_tries = 3
    retry_after = 1

    def __init__(self) -> None:
        super().__init__()
        self.order_id = ""

    async def handle(self) -> None:
        # At-least-once: marking the order processed twice does no harm.
        async with connection_engine("default").begin() as conn:
            await conn.execute(
                sa.update(orders).where(orders.c.id == self.order_id).values(status="processed")
            )
        print(f"   processed order {self.order_id} (attempt {self.attempts})")
