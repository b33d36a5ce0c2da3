"""routemq-outbox: a transactional outbox job queue on your own SQL database.

Jobs are dispatched inside your database transaction and exist exactly when it commits.
Delivery is at-least-once: a job may run more than once, so make ``handle()`` idempotent.
"""

from importlib.metadata import PackageNotFoundError, version

from .ambient import transaction
from .dispatch import Queue, dispatch, dispatch_sync, queue
from .errors import FailJob, OutboxError, RetryJob
from .job import Job
from .schedules import cron, every
from .schema import DEFAULT_PRIORITY, PRIORITY_MAX, PRIORITY_MIN
from .worker import Worker, WorkerSettings

try:
    __version__ = version("routemq-outbox")
except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_PRIORITY",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "FailJob",
    "Job",
    "OutboxError",
    "Queue",
    "RetryJob",
    "Worker",
    "WorkerSettings",
    "__version__",
    "cron",
    "dispatch",
    "dispatch_sync",
    "every",
    "queue",
    "transaction",
]
