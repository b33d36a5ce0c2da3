"""A RouteMQ application on routemq-outbox.

Python 3.12+, with ``pip install 'routemq-outbox[routemq]'``::

    cd examples/routemq_app && python main.py

``QUEUE_CONNECTION=outbox`` points RouteMQ's ``dispatch()`` at the outbox. An MQTT handler writes
an order and dispatches its job in one transaction; a bad order rolls back both. Then
``routemq-outbox work --import app.jobs`` runs the RouteMQ job classes unchanged.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATABASE = Path(tempfile.mkdtemp()) / "shop.db"
# Before RouteMQ is imported: it reads QUEUE_CONNECTION once.
os.environ["QUEUE_CONNECTION"] = "outbox"
os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"] = f"sqlite+aiosqlite:///{DATABASE}"
sys.path.insert(0, str(HERE))

import sqlalchemy as sa  # noqa: E402
from app.controllers.order_controller import OrderController  # noqa: E402
from app.models import metadata, orders  # noqa: E402

from routemq_outbox.database import connection_engine  # noqa: E402
from routemq_outbox.migrate import upgrade  # noqa: E402


async def receive_orders() -> None:
    async with connection_engine("default").begin() as conn:
        await conn.run_sync(metadata.create_all)
    print(
        "1. order o-1 arrives:", await OrderController.handle_new_order("o-1", {"items": 2}, None)
    )
    try:
        await OrderController.handle_new_order("o-2", {"items": 0}, None)
    except ValueError as exc:
        print(f"2. order o-2 is refused ({exc}): neither the order nor its job exists")


async def show() -> None:
    async with connection_engine("default").connect() as conn:
        rows = (await conn.execute(sa.select(orders.c.id, orders.c.status))).all()
        jobs = (await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one()
    print(f"   orders: {[tuple(row) for row in rows]}; jobs waiting: {jobs}")


def main() -> None:
    upgrade(os.environ["ROUTEMQ_OUTBOX_DATABASE_URL"])
    asyncio.run(receive_orders())
    asyncio.run(show())
    print("3. a worker runs the RouteMQ job:")
    worker = [
        sys.executable,
        "-m",
        "routemq_outbox",
        "work",
        "--import",
        "app.jobs.process_order_job",
    ]
    subprocess.run(
        [*worker, "--queue", "orders", "--stop-when-empty", "--sleep", "0.1"], cwd=HERE, check=True
    )
    asyncio.run(show())


if __name__ == "__main__":
    main()
