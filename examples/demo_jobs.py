"""The jobs of the demo. The worker imports this module (``--import demo_jobs``)."""

from __future__ import annotations

import sqlalchemy as sa

from routemq_outbox import Job
from routemq_outbox.database import connection_engine


class SendNotificationJob(Job):
    """Records a notification as sent. Jobs may run twice: the insert ignores duplicates."""

    job_name = "demo.send_notification"
    queue = "notifications"

    def __init__(self) -> None:
        super().__init__()
        self.order_id: int | None = None
        self.message: str | None = None

    async def handle(self) -> None:
        async with connection_engine("default").begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO notifications (order_id, message) VALUES (:order_id, :message)"
                    " ON CONFLICT (order_id) DO NOTHING"
                ),
                {"order_id": self.order_id, "message": self.message},
            )


class FlakyJob(Job):
    """Fails on its first attempt, succeeds on the second."""

    job_name = "demo.flaky"
    queue = "notifications"
    retry_after = 0

    async def handle(self) -> None:
        if self.attempt == 1:
            raise ConnectionError("the mail server hung up (attempt 1)")


class DoomedJob(Job):
    """Always fails: after max_tries attempts it lands in failed_jobs."""

    job_name = "demo.doomed"
    queue = "notifications"
    max_tries = 2
    retry_after = 0

    async def handle(self) -> None:
        raise ValueError(f"card declined (attempt {self.attempt})")

    async def failed(self, exc: BaseException) -> None:
        print(f"    DoomedJob.failed() called once: {exc}")
