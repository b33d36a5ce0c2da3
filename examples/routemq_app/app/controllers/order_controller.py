"""An MQTT handler that writes an order and dispatches its job in one transaction."""

from __future__ import annotations

from typing import Any

from routemq.queue.queue_manager import dispatch
from sqlalchemy.ext.asyncio import AsyncSession

from routemq_outbox import transaction
from routemq_outbox.database import connection_engine

from ..jobs.process_order_job import ProcessOrderJob
from ..models import orders


class OrderController:
    @staticmethod
    async def handle_new_order(
        order_id: str, payload: dict[str, Any], client: Any
    ) -> dict[str, str]:
        async with AsyncSession(connection_engine("default")) as session, transaction(session):
            await session.execute(
                orders.insert().values(id=order_id, items=payload["items"], status="new")
            )
            job = ProcessOrderJob()
            job.order_id = order_id
            await dispatch(job)  # RouteMQ's own dispatch(), now in this transaction
            if payload["items"] <= 0:
                raise ValueError(f"order {order_id} has no items")  # rolls back order and job
        return {"status": "accepted", "order_id": order_id}
