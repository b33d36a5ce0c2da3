"""Every exception routemq-outbox raises derives from :class:`OutboxError`.

The tree::

    OutboxError
    ├── ConfigurationError          bad or missing configuration (URL, driver, connection name)
    ├── JobDefinitionError          a Job subclass is declared wrongly (name clash, bad attribute)
    │   └── InvalidSchedule         (also a ValueError) its schedule cannot be run
    ├── DispatchError               the job was refused at dispatch; nothing was inserted
    │   ├── InvalidQueueName        (also a ValueError)
    │   ├── InvalidDelay            (also a ValueError)
    │   ├── NotAJob                 (also a TypeError)
    │   ├── UnserializableJob       (also a TypeError)
    │   ├── InvalidJobSetting       (also a ValueError)
    │   ├── InvalidJobKey           (also a ValueError) a unique or serial key cannot be used
    │   ├── PayloadTooLarge         (also a ValueError)
    │   └── InvalidMessage          (also a ValueError) an MQTT message's topic, QoS, ... is bad
    ├── JobLoadError                a stored row could not be turned back into a job
    │   ├── MalformedPayload
    │   ├── UnknownJob
    │   └── JobConstructionError
    ├── JobTimeout                  an attempt ran longer than its timeout
    ├── LeaseExpired                the worker running the last attempt stopped heartbeating
    ├── OutcomeNotRecorded          the database refused to record an attempt's outcome
    ├── BrokerRejected              the MQTT broker refused a message (a reason code >= 0x80)
    ├── DatabaseNotReady            the database cannot serve the queue (e.g. not migrated)
    ├── RetryJob                    raised by handle() to ask for another attempt later
    ├── FailJob                     raised by handle() to fail the job now, without more attempts
    ├── Cancelled                   an operator cancelled the job (what failed_jobs records)
    └── NotFound                    an operator command named something that is not there
        ├── UnknownQueue            (also a LookupError) no job or failed job is in that queue
        ├── UnknownJobId            (also a LookupError) ids the jobs table does not hold
        ├── UnknownFailedJob        (also a LookupError) ids or uuids failed_jobs does not hold
        └── UnknownSchedule         (also a LookupError) no imported job has that schedule

A class's docstring is its default message, so ``raise UnknownJob()`` still says something.
:func:`brief` turns any exception into one line for logs and messages.
"""

from __future__ import annotations

__all__ = [
    "MAX_DELAY_SECONDS",
    "BrokerRejected",
    "Cancelled",
    "ConfigurationError",
    "DatabaseNotReady",
    "DispatchError",
    "FailJob",
    "InvalidDelay",
    "InvalidJobKey",
    "InvalidJobSetting",
    "InvalidMessage",
    "InvalidQueueName",
    "InvalidSchedule",
    "JobConstructionError",
    "JobDefinitionError",
    "JobLoadError",
    "JobTimeout",
    "LeaseExpired",
    "MalformedPayload",
    "NotAJob",
    "NotFound",
    "OutboxError",
    "OutcomeNotRecorded",
    "PayloadTooLarge",
    "RetryJob",
    "UnknownFailedJob",
    "UnknownJob",
    "UnknownJobId",
    "UnknownQueue",
    "UnknownSchedule",
    "UnserializableJob",
    "brief",
]

MAX_DELAY_SECONDS = 100 * 365 * 24 * 3600
"""The longest any job may be made to wait (100 years): a dispatch delay, a retry delay, a
job's ``retry_after`` or ``backoff_max``. Beyond it a due time is surely a mistake, and far
beyond it no engine can store the time (MariaDB's DATETIME ends with the year 9999)."""


class OutboxError(Exception):
    """routemq-outbox error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(OutboxError):
    """The configuration is invalid."""


class JobDefinitionError(OutboxError):
    """A Job subclass is declared wrongly."""


class InvalidSchedule(JobDefinitionError, ValueError):
    """A job's schedule is invalid: a bad cron expression, an unknown time zone, an interval
    under one second."""


class DispatchError(OutboxError):
    """The job was refused at dispatch; nothing was inserted."""


class InvalidQueueName(DispatchError, ValueError):
    """Queue names must be non-empty strings of at most 255 characters, without NUL."""


class InvalidDelay(DispatchError, ValueError):
    """A delay must be 0 to 100 years: seconds, a timedelta, or a timezone-aware datetime
    from 1970-01-01 UTC to 100 years from now."""


class NotAJob(DispatchError, TypeError):
    """Only instances of routemq_outbox.Job can be dispatched."""


class UnserializableJob(DispatchError, TypeError):
    """A job attribute cannot be stored as JSON."""


class InvalidJobSetting(DispatchError, ValueError):
    """A job setting (max_tries, timeout, ...) was set on the instance, or holds a bad value.

    Settings configure the job's class: they never travel with the job as data, so a value
    set on one instance after it was built would not reach the worker.
    """


class InvalidJobKey(DispatchError, ValueError):
    """A unique or serial key cannot be used: empty, too long, or made of values that are not
    strings or integers."""


class PayloadTooLarge(DispatchError, ValueError):
    """The job's payload is larger than the configured limit."""


class InvalidMessage(DispatchError, ValueError):
    """The MQTT message cannot be published: a bad topic, QoS, retain flag, key or property."""


class JobLoadError(OutboxError):
    """A stored job could not be loaded."""


class MalformedPayload(JobLoadError):
    """The stored payload is not a valid job payload."""


class UnknownJob(JobLoadError):
    """The payload names a job class this worker does not know."""


class JobConstructionError(JobLoadError):
    """The job class could not be instantiated from the payload."""


class JobTimeout(OutboxError):
    """The attempt ran longer than the job's timeout."""


class LeaseExpired(OutboxError):
    """The worker running the job's last attempt stopped heartbeating before it finished."""


class OutcomeNotRecorded(OutboxError):
    """The database refused to record the outcome of an attempt."""


class BrokerRejected(OutboxError):
    """The MQTT broker refused the message (its acknowledgement carried a failure reason)."""


class DatabaseNotReady(OutboxError):
    """The database cannot serve the queue: it is not migrated, or cannot be used at all."""


class RetryJob(OutboxError):
    """Raised by ``handle()`` to have the job attempted again later.

    ``delay`` is in seconds; ``None`` uses the job's own retry delay. The attempt still counts
    towards ``max_tries``.
    """

    def __init__(self, message: str | None = None, *, delay: float | None = None) -> None:
        if delay is not None:
            number = isinstance(delay, int | float) and not isinstance(delay, bool)
            if not number or not 0 <= delay <= MAX_DELAY_SECONDS:  # NaN compares False
                raise InvalidDelay(
                    f"RetryJob delay must be a number of seconds from 0 to {MAX_DELAY_SECONDS} "
                    f"(100 years), got {delay!r}"
                )
        super().__init__(message or "the job asked to be retried")
        self.delay = delay


class FailJob(OutboxError):
    """Raised by ``handle()`` to fail the job now: no more attempts, straight to failed_jobs."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "the job asked to fail")


class Cancelled(OutboxError):
    """The job was cancelled by an operator."""


class NotFound(OutboxError):
    """Nothing by that name is there."""


class UnknownQueue(NotFound, LookupError):
    """No job or failed job is in that queue."""


class UnknownJobId(NotFound, LookupError):
    """The jobs table holds no job with that id (it may have finished, failed or never been)."""


class UnknownFailedJob(NotFound, LookupError):
    """failed_jobs holds no job with that id or uuid."""


class UnknownSchedule(NotFound, LookupError):
    """No imported job class has a schedule by that name."""


_BRIEF_MAX = 500


def brief(exc: BaseException) -> str:
    """``Type: first line of the message``: an exception in one line, for logs and messages."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > _BRIEF_MAX:  # a log line, not a dump of whatever the message holds
        first = first[: _BRIEF_MAX - 1] + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
