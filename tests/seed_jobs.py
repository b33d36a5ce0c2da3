"""The application's job classes that the samples of RouteMQ's "Dispatching Jobs" page import
(``from app.jobs.… import …``), written for routemq-outbox."""

from __future__ import annotations

from routemq_outbox import Job


class SendNotificationJob(Job):
    queue = "notifications"

    def __init__(self) -> None:
        super().__init__()
        self.user_id: int | None = None
        self.message: str | None = None

    async def handle(self) -> None:
        pass


class SendEmailJob(Job):
    queue = "emails"

    async def handle(self) -> None:
        pass


class GenerateReportJob(Job):
    queue = "reports"

    async def handle(self) -> None:
        pass


class ProcessOrderJob(Job):
    async def handle(self) -> None:
        pass


class LogMessageJob(Job):
    async def handle(self) -> None:
        pass


class ProcessHighTempJob(Job):
    async def handle(self) -> None:
        pass


class CreateProfileJob(Job):
    async def handle(self) -> None:
        pass


class SendSMSJob(Job):
    async def handle(self) -> None:
        pass


class ExternalAPIJob(Job):
    async def handle(self) -> None:
        pass
