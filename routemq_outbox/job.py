"""The Job base class, the registry of job names, and the payload format.

A payload is the JSON text ``{"job": "<stable name>", "data": {<public attributes>}}``. The
name defaults to ``module.QualName`` and can be pinned with ``job_name = "..."`` on the class,
so that stored rows survive a refactor. A worker turns names back into classes only through the
registry, which holds the Job subclasses its process has imported: a payload can never make the
worker import a module or call anything that is not a Job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, ClassVar

from . import backoff
from .errors import (
    MAX_DELAY_SECONDS,
    InvalidDelay,
    InvalidQueueName,
    JobConstructionError,
    JobDefinitionError,
    MalformedPayload,
    NotAJob,
    PayloadTooLarge,
    UnknownJob,
    UnserializableJob,
)
from .schema import QUEUE_NAME_MAX

__all__ = [
    "MAX_DELAY_SECONDS",
    "Job",
    "check_retry_delay",
    "decode_payload",
    "encode_payload",
    "instantiate",
    "registered_jobs",
    "validate_queue_name",
]

_registry: dict[str, type[Job]] = {}

# Attributes that configure the job rather than carry its data: the queue lives in its own
# column, and the context the worker attaches (attempt, id) is never stored.
_NOT_DATA = frozenset({"queue"})


def validate_queue_name(name: object) -> str:
    """Return ``name`` if it is a valid queue name, else raise :class:`InvalidQueueName`."""
    if not isinstance(name, str):
        raise InvalidQueueName(f"queue name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidQueueName("queue name must not be empty")
    if len(name) > QUEUE_NAME_MAX:
        raise InvalidQueueName(
            f"queue name is {len(name)} characters long; the limit is {QUEUE_NAME_MAX}"
        )
    if "\x00" in name:
        # PostgreSQL text cannot hold NUL: refuse it on every engine rather than fail (or,
        # for a worker's --queue, retry forever) with a driver error on one of them.
        raise InvalidQueueName(f"queue name {name!r} contains a NUL character")
    if name != name.strip():
        # MySQL and MariaDB compare strings ignoring trailing spaces ("emails " would be the
        # queue "emails"); a name padded with whitespace is a mistake on any engine.
        raise InvalidQueueName(f"queue name {name!r} starts or ends with whitespace")
    return name


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_DELAY_RANGE = f"a number of seconds from 0 to {MAX_DELAY_SECONDS} (100 years)"


def _positive_number(cls: type, attribute: str, value: object, *, allow_zero: bool) -> None:
    ok = _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else "> 0"
        raise JobDefinitionError(
            f"{cls.__qualname__}.{attribute} must be a number {bound}, got {value!r}"
        )


def _delay_setting(cls: type, attribute: str, value: object) -> None:
    # Comparisons, which NaN fails and which never overflow (float() does, on huge ints).
    if not (_is_number(value) and 0 <= value <= MAX_DELAY_SECONDS):  # type: ignore[operator]
        raise JobDefinitionError(
            f"{cls.__qualname__}.{attribute} must be {_DELAY_RANGE}, got {value!r}"
        )


def check_retry_delay(value: object) -> float:
    """``value`` as the seconds to wait before a job's next attempt, or :class:`InvalidDelay`.

    For what a job's own ``retry_delay()`` returns. A negative number means "at once" (0.0);
    something that is not a number, NaN, or more than :data:`MAX_DELAY_SECONDS` (infinity
    included) is refused: no engine can store the due time it leads to, and a job parked for
    centuries is lost in all but name.
    """
    if not _is_number(value) or not value <= MAX_DELAY_SECONDS:  # type: ignore[operator]
        raise InvalidDelay(f"a retry delay must be {_DELAY_RANGE}, got {value!r:.80}")
    return float(max(0.0, value))  # type: ignore[call-overload]


class Job:
    """Base class for jobs. Public instance attributes are the job's data.

    Class attributes configure how the job runs::

        class SendNotificationJob(Job):
            queue = "notifications"   # queue it is dispatched to
            max_tries = 3             # attempts before it moves to failed_jobs
            timeout = 60              # seconds one attempt may take
            retry_after = 10          # seconds before the next attempt

            async def handle(self) -> None: ...
            async def failed(self, exc: BaseException) -> None: ...  # optional

    ``backoff = "exponential"`` doubles the delay after each failed attempt (with jitter, up to
    ``backoff_max`` seconds); override :meth:`retry_delay` for anything else. ``job_name`` pins
    the name the job is stored under (default ``module.QualName``).

    Jobs may run more than once (delivery is at-least-once): make ``handle()`` idempotent.
    """

    job_name: ClassVar[str]
    queue: str = "default"
    max_tries: int = 3
    timeout: float = 60
    retry_after: float = 10
    backoff: str = "fixed"
    backoff_max: float = 3600

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("job_name") or f"{cls.__module__}.{cls.__qualname__}"
        if not isinstance(name, str):
            raise JobDefinitionError(f"{cls.__qualname__}.job_name must be a string")
        cls.job_name = name
        _check_class_attributes(cls)
        known = _registry.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise JobDefinitionError(
                f"job name {name!r} of {cls.__module__}.{cls.__qualname__} is already used by "
                f"{known.__module__}.{known.__qualname__}; give one of them its own job_name"
            )
        # The same class defined again (a reload, a test helper) replaces the old one.
        _registry[name] = cls

    def __init__(self) -> None:
        pass

    async def handle(self) -> None:
        """Do the work. Raise to retry (until ``max_tries``), or raise RetryJob / FailJob."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle()")

    async def failed(self, exc: BaseException) -> None:
        """Called once, after the job moved to failed_jobs. Override to clean up or alert."""

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based) failed."""
        return backoff.delay(
            attempt,
            base=self.retry_after,
            exponential=self.backoff == "exponential",
            cap=self.backoff_max,
        )

    @property
    def attempt(self) -> int:
        """Which attempt this is (1-based) while the worker runs the job; 0 before."""
        return int(self.__dict__.get("_attempt", 0))

    @property
    def job_id(self) -> int | None:
        """The ``jobs.id`` of the row being run, while the worker runs the job."""
        value = self.__dict__.get("_job_id")
        return None if value is None else int(value)

    def __repr__(self) -> str:
        data = ", ".join(f"{k}={v!r}" for k, v in _data(self).items())
        return f"<{type(self).__qualname__} {data}>"


def _check_class_attributes(cls: type[Job]) -> None:
    validate_queue_name(cls.queue)
    if not isinstance(cls.max_tries, int) or isinstance(cls.max_tries, bool) or cls.max_tries < 1:
        raise JobDefinitionError(
            f"{cls.__qualname__}.max_tries must be an integer >= 1, got {cls.max_tries!r}"
        )
    _positive_number(cls, "timeout", cls.timeout, allow_zero=False)
    _delay_setting(cls, "retry_after", cls.retry_after)
    _delay_setting(cls, "backoff_max", cls.backoff_max)
    if cls.backoff not in ("fixed", "exponential"):
        raise JobDefinitionError(
            f"{cls.__qualname__}.backoff must be 'fixed' or 'exponential', got {cls.backoff!r}"
        )


def registered_jobs() -> dict[str, type[Job]]:
    """A copy of the name -> class registry."""
    return dict(_registry)


def _payload_encoder() -> Callable[[object], str]:
    """json's C encoder, built once. ``json.dumps`` builds one per call, which is a third of the
    cost of encoding a small payload; the standard encoder wherever the C one is missing or
    behaves differently (it is an implementation detail of CPython)."""
    standard = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    probe = {"n": [1, 1.5, None, True], "s": 'é\u2028"x"'}
    try:
        iterencode = make(  # type: ignore[misc]
            None,
            standard.default,
            json.encoder.encode_basestring,
            None,
            ":",
            ",",
            False,
            False,
            False,
        )
        if "".join(iterencode(probe, 0)) != standard.encode(probe):
            return standard.encode
    except Exception:
        return standard.encode
    return lambda document: "".join(iterencode(document, 0))


_encode = _payload_encoder()


def _data(job: Job) -> dict[str, Any]:
    return {k: v for k, v in vars(job).items() if not k.startswith("_") and k not in _NOT_DATA}


def _find_unserializable(
    value: Any, path: str, inside: frozenset[int] = frozenset()
) -> tuple[str, Any] | None:
    """The first place inside ``value`` that JSON cannot hold, as (path, value).

    A string holding NUL is JSON, but PostgreSQL's JSONB cannot store it; it is refused on
    every engine so that a job dispatches the same everywhere.
    """
    if isinstance(value, str):
        return (path, value) if "\x00" in value else None
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict | list | tuple):
        if id(value) in inside:
            return f"{path} (a reference to itself)", value
        inside = inside | {id(value)}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict) and (not isinstance(key, str) or "\x00" in key):
                return f"{path} key {key!r}", key
            found = _find_unserializable(item, f"{path}[{key!r}]", inside)
            if found:
                return found
        return None
    return path, value


def encode_payload(job: object, *, max_bytes: int) -> str:
    """The JSON text stored for ``job``; raises a DispatchError naming what is wrong."""
    if not isinstance(job, Job):
        raise NotAJob(
            f"expected an instance of a routemq_outbox.Job subclass, got {type(job).__name__}"
        )
    data = _data(job)
    try:
        text = _encode({"job": type(job).job_name, "data": data})
    except (TypeError, ValueError, RecursionError) as exc:
        for attribute, value in data.items():
            found = _find_unserializable(value, attribute)
            if found:
                path, bad = found
                where = f"attribute {attribute!r}" + ("" if path == attribute else f" at {path}")
                raise UnserializableJob(
                    f"{type(job).__qualname__}: {where} holds {type(bad).__name__} {bad!r:.80}, "
                    "which cannot be stored as JSON (use str, int, float, bool, None, list, dict)"
                ) from None
        raise UnserializableJob(f"{type(job).__qualname__}: {exc}") from None  # pragma: no cover
    if "\\u0000" in text:  # rare: only then look for the NUL, to name where it is
        _refuse_nul(job, data)
    # UTF-8 takes at most 4 bytes a character: only long texts need encoding to be measured.
    size = len(text) if len(text) * 4 <= max_bytes else len(text.encode())
    if size > max_bytes:
        raise PayloadTooLarge(
            f"{type(job).__qualname__}: payload is {size} bytes; the limit is {max_bytes} "
            "(ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES). Store large data elsewhere and pass its id"
        )
    return text


def _refuse_nul(job: Job, data: dict[str, Any]) -> None:
    for attribute, value in data.items():
        if "\x00" in attribute:
            where = f"attribute name {attribute!r}"
        else:
            found = _find_unserializable(value, attribute)
            if not found:
                continue
            path = found[0]
            where = f"attribute {attribute!r}" + ("" if path == attribute else f" at {path}")
        raise UnserializableJob(
            f"{type(job).__qualname__}: {where} holds a NUL character (\\x00), "
            "which PostgreSQL cannot store"
        )


def decode_payload(text: str | bytes) -> tuple[str, dict[str, Any]]:
    """Parse stored JSON text into (job name, data); raises MalformedPayload."""
    try:
        document = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise MalformedPayload(f"payload is not valid JSON ({exc}): {str(text)[:200]!r}") from None
    if not isinstance(document, dict):
        raise MalformedPayload(f"payload must be a JSON object, got {type(document).__name__}")
    name, data = document.get("job"), document.get("data", {})
    if not isinstance(name, str) or not name:
        raise MalformedPayload('payload has no job name: expected {"job": "<name>", "data": {}}')
    if not isinstance(data, dict):
        raise MalformedPayload(f"payload 'data' of job {name!r} must be a JSON object")
    private = sorted(key for key in data if key.startswith("_"))
    if private:
        raise MalformedPayload(f"payload of job {name!r} sets private attributes {private}")
    return name, data


def instantiate(name: str, data: dict[str, Any], queue: str) -> Job:
    """Build the job registered as ``name`` from its data; raises a JobLoadError."""
    cls = _registry.get(name)
    if cls is None:
        raise UnknownJob(
            f"unknown job {name!r}: no Job subclass with that name is imported in this worker "
            "(pass its module with --import)"
        )
    try:
        job = cls()
        for key, value in data.items():
            setattr(job, key, value)
    except Exception as exc:
        raise JobConstructionError(
            f"constructing {name} raised {type(exc).__name__}: {exc}"
        ) from exc
    job.queue = queue
    return job
