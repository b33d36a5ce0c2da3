"""The Job base class, the registry of job names, and the payload format.

A payload is the JSON text ``{"job": "<stable name>", "data": {<public attributes>}}``. The
name defaults to ``module.QualName`` and can be pinned with ``job_name = "..."`` on the class,
so that stored rows survive a refactor. A worker turns names back into classes only through the
registry, which holds the Job subclasses its process has imported: a payload can never make the
worker import a module or call anything that is not a Job.

A job's *settings* (``queue``, ``max_tries``, ``timeout``, ...) are never data. They belong to
the class, or to ``__init__``, which the worker runs again when it rebuilds the job: so nothing
in a payload can change how the worker treats a job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, NamedTuple

from . import backoff
from .errors import (
    MAX_DELAY_SECONDS,
    InvalidDelay,
    InvalidJobSetting,
    InvalidQueueName,
    InvalidSchedule,
    JobConstructionError,
    JobDefinitionError,
    MalformedPayload,
    NotAJob,
    PayloadTooLarge,
    UnknownJob,
    UnserializableJob,
)
from .keys import KEY_SETTINGS, check_key_settings
from .schedules import Schedule
from .schema import PRIORITY_MAX, PRIORITY_MIN, QUEUE_NAME_MAX, SCHEDULE_NAME_MAX

__all__ = [
    "MAX_DELAY_SECONDS",
    "MAX_PAYLOAD_DEPTH",
    "MAX_STORED_DEPTH",
    "SETTINGS",
    "Decoded",
    "Job",
    "check_priority",
    "check_retry_delay",
    "decode_payload",
    "encode_payload",
    "instantiate",
    "job_data",
    "registered_jobs",
    "scheduled_jobs",
    "validate_queue_name",
]

_registry: dict[str, type[Job]] = {}

SETTINGS = frozenset(
    {
        "queue",
        "max_tries",
        "timeout",
        "retry_after",
        "backoff",
        "backoff_max",
        "job_name",
        "schedule",
        "priority",
        *KEY_SETTINGS,
    }
)
"""The attributes that configure a job. They are never stored as data: ``queue`` has its own
column, and the worker takes the others from the class and ``__init__``."""

# What the worker gives a running job and calls on it. Data by these names would hide it.
_API = frozenset({"attempt", "job_id", "scheduled_at", "handle", "failed", "retry_delay"})
# An instance carrying one of these is looked at closely (a queue set per dispatch is fine).
_CHECKED = (SETTINGS - {"queue"}) | _API

MAX_PAYLOAD_DEPTH = 30
"""How deeply a payload may nest lists and dicts, counting its own two levels (the envelope
and ``data``): an attribute's value may nest 28. MariaDB refuses JSON nested 32 deep."""


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
    if not name.isascii() and _lone_surrogate(name) is not None:
        raise InvalidQueueName(f"queue name {name!r} contains a lone surrogate")
    if name != name.strip():
        # MySQL and MariaDB compare strings ignoring trailing spaces ("emails " would be the
        # queue "emails"); a name padded with whitespace is a mistake on any engine.
        raise InvalidQueueName(f"queue name {name!r} starts or ends with whitespace")
    return name


def check_priority(priority: object) -> int:
    """Return ``priority`` if it is one (an integer from 0 to 9), else raise
    :class:`InvalidJobSetting` saying so."""
    problem = _setting_problem("priority", priority)
    if problem:
        raise InvalidJobSetting(f"priority {problem}")
    return priority  # type: ignore[return-value]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _setting_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the setting ``name``, or None. Range checks are
    comparisons, which NaN fails and which never overflow (float() does, on huge ints)."""
    if name == "max_tries":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else f"must be an integer >= 1, got {value!r}"
    if name == "priority":
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and PRIORITY_MIN <= value <= PRIORITY_MAX
        first, last = PRIORITY_MIN, PRIORITY_MAX
        return (
            None if ok else f"must be an integer from {first} (runs first) to {last}, got {value!r}"
        )
    if name == "backoff":
        ok = isinstance(value, str) and value in ("fixed", "exponential")
        return None if ok else f"must be 'fixed' or 'exponential', got {value!r}"
    if name == "timeout":
        ok = _is_number(value) and 0 < value < math.inf
        return None if ok else f"must be a number of seconds > 0, got {value!r}"
    if name in ("retry_after", "backoff_max"):
        ok = _is_number(value) and 0 <= value <= MAX_DELAY_SECONDS
        return None if ok else f"must be {_DELAY_RANGE}, got {value!r}"
    return None


_DELAY_RANGE = f"a number of seconds from 0 to {MAX_DELAY_SECONDS} (100 years)"


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
            priority = 0              # 0 (the default) runs first, then 1, ... 9

            async def handle(self) -> None: ...
            async def failed(self, exc: BaseException) -> None: ...  # optional

    ``backoff = "exponential"`` doubles the delay after each failed attempt (with jitter, up to
    ``backoff_max`` seconds); override :meth:`retry_delay` for anything else. ``job_name`` pins
    the name the job is stored under (default ``module.QualName``). ``schedule = cron(...)`` or
    ``every(...)`` makes it a periodic job, which every worker that imports the class enqueues
    once per slot (see :mod:`routemq_outbox.scheduler`).

    Settings are never stored with a job: the worker rebuilds it by calling the class with no
    arguments, then sets the stored data. A setting may also be given in ``__init__``
    (``self.max_tries = 5``), which runs there too; one set on an instance after that is
    refused at dispatch (:class:`~routemq_outbox.errors.InvalidJobSetting`), since it would
    not reach the worker. ``attempt``, ``job_id``, ``scheduled_at`` (the slot of a periodic
    run), ``handle``, ``failed`` and ``retry_delay`` are not data names either.

    Jobs may run more than once (delivery is at-least-once): make ``handle()`` idempotent.
    """

    job_name: ClassVar[str]
    queue: str = "default"
    max_tries: int = 3
    timeout: float = 60
    retry_after: float = 10
    backoff: str = "fixed"
    backoff_max: float = 3600
    priority: int = 0
    schedule: ClassVar[Schedule | None] = None
    unique_by: ClassVar[tuple[str, ...] | None] = None
    unique_while: ClassVar[str] = "queued"
    unique_for: ClassVar[float | timedelta | None] = None
    serial_by: ClassVar[tuple[str, ...] | None] = None

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
    def scheduled_at(self) -> datetime | None:
        """The slot (aware UTC) a periodic run belongs to: the same for every run of one slot,
        retries included, so that a job can be idempotent per slot. None for a dispatched job."""
        value = self.__dict__.get("_scheduled_at")
        return value if isinstance(value, datetime) else None

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
    check_key_settings(cls)
    name = cls.job_name
    if "\x00" in name or _lone_surrogate(name) is not None:
        raise JobDefinitionError(f"{cls.__qualname__}.job_name {name!r} cannot be stored")
    for setting in sorted(SETTINGS - {"queue", "job_name"}):
        problem = _setting_problem(setting, getattr(cls, setting))
        if problem:
            raise JobDefinitionError(f"{cls.__qualname__}.{setting} {problem}")
    schedule = cls.schedule
    if schedule is None:
        return
    if not isinstance(schedule, Schedule):
        raise InvalidSchedule(
            f"{cls.__qualname__}.schedule must be cron(...) or every(...), got {schedule!r:.80}"
        )
    problem = schedule.problem()
    if problem:
        raise InvalidSchedule(f"{cls.__qualname__}.schedule: {problem}")
    if len(name) > SCHEDULE_NAME_MAX:
        raise InvalidSchedule(
            f"{cls.__qualname__}: the job name of a periodic job may be {SCHEDULE_NAME_MAX} "
            f"characters long, {name!r:.80} has {len(name)}"
        )


def _check_instance_settings(job: Job, attributes: dict[str, Any]) -> None:
    """Refuse settings on ``job`` that the worker would not see, and bad ones it would.

    Settings never travel with the job: the worker rebuilds it by calling its class, so a
    setting is honoured only if that call gives the same value, as when ``__init__`` sets it.
    """
    cls = type(job)
    reserved = sorted(_API.intersection(attributes))
    if reserved:
        raise InvalidJobSetting(
            f"{cls.__qualname__}: attribute {reserved[0]!r} is reserved (the worker sets or "
            f"calls job.{reserved[0]}); give the data another name"
        )
    try:
        rebuilt = vars(cls())
    except Exception as exc:
        raise InvalidJobSetting(
            f"{cls.__qualname__}: the worker builds jobs by calling {cls.__qualname__}(), "
            f"which raised {type(exc).__name__}: {exc}"
        ) from exc
    for name in sorted(_CHECKED.intersection(attributes)):
        value = attributes[name]
        if name not in rebuilt or rebuilt[name] != value:
            raise InvalidJobSetting(
                f"{cls.__qualname__}: {name}={value!r:.80} was set on this instance after "
                f"{cls.__qualname__}() built it. {name} is a job setting, not data, and the "
                f"worker rebuilds the job by calling {cls.__qualname__}(), which gives "
                f"{rebuilt.get(name, getattr(cls, name, None))!r:.80}: set it on the class or "
                "in __init__, or give the data another name"
            )
        problem = _setting_problem(name, value)
        if problem:
            raise InvalidJobSetting(f"{cls.__qualname__}.{name} {problem}")


def registered_jobs() -> dict[str, type[Job]]:
    """A copy of the name -> class registry."""
    return dict(_registry)


def scheduled_jobs() -> dict[str, type[Job]]:
    """The registered job classes that have a schedule, by name."""
    return {name: cls for name, cls in _registry.items() if cls.schedule is not None}


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
    return {k: v for k, v in vars(job).items() if not k.startswith("_") and k not in SETTINGS}


job_data = _data
"""The data attributes of a job: what its payload stores."""


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (UTF-8 cannot encode one), or None."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (\\x00), which PostgreSQL cannot store"
    surrogate = None if text.isascii() else _lone_surrogate(text)
    if surrogate is not None:
        return f"holds a lone surrogate ({surrogate!r}), which UTF-8 cannot encode"
    return None


def _key_problem(key: object) -> str | None:
    if isinstance(key, str):
        return _text_problem(key)
    if key is None or isinstance(key, int) or (isinstance(key, float) and math.isfinite(key)):
        return None  # json writes these as strings
    return f"is a {type(key).__name__}, which a JSON object's key cannot be"


def _unstorable(
    value: Any, depth: int, inside: frozenset[int] = frozenset()
) -> tuple[str, str] | None:
    """The first thing inside ``value`` (at ``depth`` levels of nesting in the payload) that
    cannot be stored on every engine, as (its path below ``value``, what is wrong)."""
    if isinstance(value, str):
        problem = _text_problem(value)
        return ("", problem) if problem else None
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float) and math.isfinite(value):
        return None
    kind = type(value).__name__
    if not isinstance(value, dict | list | tuple):
        return "", (
            f"holds {kind} {value!r:.80}, which cannot be stored as JSON "
            "(use str, int, float, bool, None, list, dict)"
        )
    if id(value) in inside:
        return " (a reference to itself)", f"holds {kind} {value!r:.80}, which JSON cannot hold"
    if depth >= MAX_PAYLOAD_DEPTH:
        return "", (
            f"nests lists and dicts too deeply: a payload may nest {MAX_PAYLOAD_DEPTH} levels, "
            f"its own 2 included (an attribute's value {MAX_PAYLOAD_DEPTH - 2})"
        )
    inside |= {id(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        problem = _key_problem(key) if isinstance(value, dict) else None
        if problem:
            return f" key {key!r:.80}", problem
        found = _unstorable(item, depth + 1, inside)
        if found:
            return f"[{key!r:.80}]{found[0]}", found[1]
    return None


def _refusal(job: Job, data: dict[str, Any]) -> UnserializableJob | None:
    """The error naming what in ``job`` cannot be stored, or None if nothing is wrong."""
    for attribute, value in data.items():
        problem = _text_problem(attribute)
        if problem:
            where = f"attribute name {attribute!r}"
        else:
            found = _unstorable(value, 2)  # inside the envelope and its "data"
            if not found:
                continue
            path, problem = found
            where = f"attribute {attribute!r}" + (f" at {attribute}{path}" if path else "")
        return UnserializableJob(f"{type(job).__qualname__}: {where} {problem}")
    return None


_SHORTEST_TOO_DEEP = 2 * (MAX_PAYLOAD_DEPTH + 1) + len('"job":"","data":')
_CONTAINERS = (dict, list, tuple)
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _nests_deeper(value: dict[str, Any] | list[Any] | tuple[Any, ...], room: int) -> bool:
    """Whether the container ``value`` nests more than ``room`` levels (itself included)."""
    if room <= 0:
        return True
    for child in value.values() if isinstance(value, dict) else value:
        # Exact types first: isinstance() is the slow part of this walk.
        if type(child) in _SCALARS or not isinstance(child, _CONTAINERS):
            continue
        if _nests_deeper(child, room - 1):
            return True
    return False


# A float json wrote with a positive exponent (1e+20), or a string, which is left alone.
_EXPONENT_OR_STRING = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")|-?\d+(?:\.\d+)?e\+\d+')


def _positional(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1)
    # The same number without exponent, which keeps its ".0": PostgreSQL's JSONB stores
    # numbers as decimals and would give 1e+20 back as 100000000000000000000, an int.
    return f"{Decimal(match.group(0)):f}.0"


def encode_payload(job: object, *, max_bytes: int, scheduled_at: datetime | None = None) -> str:
    """The JSON text stored for ``job``; raises a DispatchError naming what is wrong.

    ``scheduled_at`` (a periodic run's slot) goes beside the data, where no attribute can put
    it: only the scheduler sets it.
    """
    if not isinstance(job, Job):
        raise NotAJob(
            f"expected an instance of a routemq_outbox.Job subclass, got {type(job).__name__}"
        )
    attributes = vars(job)
    if not _CHECKED.isdisjoint(attributes):
        _check_instance_settings(job, attributes)
    data = {k: v for k, v in attributes.items() if not k.startswith("_") and k not in SETTINGS}
    name = type(job).job_name
    envelope: dict[str, Any] = {"job": name, "data": data}
    if scheduled_at is not None:
        envelope["scheduled_at"] = scheduled_at.astimezone(UTC).isoformat()
    try:
        text = _encode(envelope)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _refusal(job, data) or UnserializableJob(f"{type(job).__qualname__}: {exc}") from None
    # Each check below is a scan in C of the text the encoder just wrote; the walk that
    # names the culprit runs only when one of them finds something.
    if "\\u0000" in text:  # a NUL, or a string holding a backslash then "u0000"
        refusal = _refusal(job, data)
        if refusal:
            raise refusal
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:
            raise _refusal(job, data) or UnserializableJob(
                f"{type(job).__qualname__}: {exc}"
            ) from None
    # Two bounds in C before any walk: nesting past the limit takes that many brackets
    # twice over, besides '"job":"<name>","data":', and no fewer brackets than levels.
    if (
        len(text) - len(name) >= _SHORTEST_TOO_DEEP
        and text.count("[") + text.count("{") > MAX_PAYLOAD_DEPTH
        and _nests_deeper(data, MAX_PAYLOAD_DEPTH - 1)  # "data" is the second level
    ):
        raise _refusal(job, data) or UnserializableJob(
            f"{type(job).__qualname__}: the payload nests more than {MAX_PAYLOAD_DEPTH} levels"
        )
    if "e+" in text:
        positional = _EXPONENT_OR_STRING.sub(_positional, text)
        size += len(positional) - len(text)
        text = positional
    if size > max_bytes:
        raise PayloadTooLarge(
            f"{type(job).__qualname__}: payload is {size} bytes; the limit is {max_bytes} "
            "(ROUTEMQ_OUTBOX_MAX_PAYLOAD_BYTES). Store large data elsewhere and pass its id"
        )
    return text


class Decoded(NamedTuple):
    """A stored payload, parsed."""

    name: str
    data: dict[str, Any]
    scheduled_at: datetime | None


MAX_STORED_DEPTH = 200
"""How deeply a stored payload may nest for a worker to read it. Dispatch never writes one
deeper than :data:`MAX_PAYLOAD_DEPTH`; this bounds rows from elsewhere, the same on every Python
(how deep ``json`` parses before a RecursionError differs: about 1000 levels on 3.11, several
thousand on 3.13)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def _nesting(text: str) -> int:
    """How deeply the JSON ``text`` nests (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _too_deep(text: str | bytes) -> bool:
    # Two scans in C first: a payload nests no deeper than it has brackets.
    opening = (b"[", b"{") if isinstance(text, bytes) else ("[", "{")
    if text.count(opening[0]) + text.count(opening[1]) <= MAX_STORED_DEPTH:  # type: ignore[arg-type]
        return False
    decoded = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return _nesting(decoded) > MAX_STORED_DEPTH


def decode_payload(text: str | bytes) -> Decoded:
    """Parse stored JSON text; raises MalformedPayload."""
    if isinstance(text, str | bytes) and _too_deep(text):
        raise MalformedPayload(
            f"payload nests lists and dicts more than {MAX_STORED_DEPTH} levels deep "
            f"(MAX_STORED_DEPTH): {str(text)[:200]!r}"
        )
    try:
        document = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(
            f"payload is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}): "
            f"{str(text)[:200]!r}"
        ) from None
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
    if not _API.isdisjoint(data):
        reserved = sorted(_API.intersection(data))
        raise MalformedPayload(f"payload of job {name!r} sets reserved attributes {reserved}")
    return Decoded(name, data, _slot(name, document.get("scheduled_at")))


def _slot(name: str, value: object) -> datetime | None:
    if value is None:
        return None
    try:
        slot = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        slot = None
    if slot is None or slot.utcoffset() is None:
        raise MalformedPayload(
            f"payload of job {name!r} has a scheduled_at that is not an aware ISO time: "
            f"{value!r:.80}"
        )
    return slot.astimezone(UTC)


def instantiate(name: str, data: dict[str, Any], queue: str) -> Job:
    """Build the job registered as ``name`` from its data; raises a JobLoadError.

    Settings in ``data`` are ignored: the class and ``__init__`` decide them. (Rows written
    before settings were kept out of payloads may carry them.) Settings ``__init__`` sets are
    checked here, since the worker acts on them.
    """
    cls = _registry.get(name)
    if cls is None:
        raise UnknownJob(
            f"unknown job {name!r}: no Job subclass with that name is imported in this worker "
            "(pass its module with --import)"
        )
    try:
        job = cls()
        for key, value in data.items():
            if key not in SETTINGS:
                setattr(job, key, value)
    except Exception as exc:
        raise JobConstructionError(
            f"constructing {name} raised {type(exc).__name__}: {exc}"
        ) from exc
    attributes = vars(job)
    if not _CHECKED.isdisjoint(attributes):
        for setting in sorted(_CHECKED.intersection(attributes)):
            problem = _setting_problem(setting, attributes[setting])
            if problem:
                raise JobConstructionError(f"{name}: {cls.__qualname__}().{setting} {problem}")
    job.queue = queue
    return job
