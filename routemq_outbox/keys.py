"""Unique and serial keys: what a job class declares, and the keys of one job.

A unique key is the job's name and the values of its ``unique_by`` attributes as canonical
JSON (``["accounts.sync",[42]]``), or the ``unique_key=`` given to ``dispatch``. It is stored
behind a two-character prefix that says until when it holds: ``q:`` while the job waits
(the claim that starts the job drops it), ``a:`` while the job waits or runs (it leaves with
the row). A serial key is built the same way from ``serial_by``, or given as ``serial_key=``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from .errors import InvalidJobKey, JobDefinitionError
from .schema import KEY_MAX

__all__ = [
    "KEY_SETTINGS",
    "NO_KEYS",
    "UNIQUE_ACTIVE",
    "UNIQUE_QUEUED",
    "JobKeys",
    "check_key_settings",
    "job_keys",
    "validate_key",
]

KEY_SETTINGS = frozenset({"unique_by", "unique_while", "unique_for", "serial_by"})

UNIQUE_QUEUED = "q:"
UNIQUE_ACTIVE = "a:"
_PREFIX = {"queued": UNIQUE_QUEUED, "active": UNIQUE_ACTIVE}
_LONGEST_WINDOW = 100 * 365 * 24 * 3600


class JobKeys(NamedTuple):
    """The keys of one job: the stored unique key (with its prefix), how long it stays taken
    after dispatch (seconds, or None), and the serial key."""

    unique_key: str | None = None
    unique_for: float | None = None
    serial_key: str | None = None


NO_KEYS = JobKeys()


def _attribute_names(cls_name: str, setting: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise JobDefinitionError(
            f"{cls_name}.{setting} must be a tuple of attribute names, got {value!r:.80}"
        )
    names = tuple(value)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise JobDefinitionError(
            f"{cls_name}.{setting} must name at least one attribute, each a non-empty string, "
            f"got {value!r:.80}"
        )
    return names


def window_seconds(cls_name: str, value: object) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (
        not isinstance(seconds, int | float)
        or isinstance(seconds, bool)
        or not 0 < seconds <= _LONGEST_WINDOW
        or math.isnan(seconds)
    ):
        raise JobDefinitionError(
            f"{cls_name}.unique_for must be None, or seconds or a timedelta > 0 and at most "
            f"100 years, got {value!r:.80}"
        )
    return float(seconds)


def check_key_settings(cls: type[Any]) -> None:
    """Refuse a class whose key settings cannot work, when it is defined."""
    name = cls.__qualname__
    _attribute_names(name, "unique_by", cls.unique_by)
    _attribute_names(name, "serial_by", cls.serial_by)
    if cls.unique_while not in _PREFIX:
        raise JobDefinitionError(
            f"{name}.unique_while must be 'queued' or 'active', got {cls.unique_while!r:.80}"
        )
    window_seconds(name, cls.unique_for)


def validate_key(what: str, key: object) -> str:
    """``key`` if it can be a unique or serial key, else :class:`InvalidJobKey`."""
    if not isinstance(key, str):
        raise InvalidJobKey(f"{what} must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidJobKey(f"{what} must not be empty")
    if len(key) > KEY_MAX:
        raise InvalidJobKey(f"{what} is {len(key)} characters long; the limit is {KEY_MAX}")
    if "\x00" in key:
        raise InvalidJobKey(f"{what} {key!r:.80} contains a NUL character")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise InvalidJobKey(f"{what} {key!r:.80} contains a lone surrogate") from None
    if key != key.rstrip(" "):
        # MySQL and MariaDB compare strings ignoring trailing spaces.
        raise InvalidJobKey(f"{what} {key!r:.80} ends with a space")
    return key


def _derived(job: Any, setting: str, names: tuple[str, ...], data: dict[str, Any]) -> str:
    cls = type(job)
    values = []
    for name in names:
        if name not in data:
            raise InvalidJobKey(
                f"{cls.__qualname__}.{setting} names {name!r}, which this job has no data "
                f"attribute called (it has: {', '.join(sorted(data)) or 'none'})"
            )
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidJobKey(
                f"{cls.__qualname__}.{name} is part of its {setting} key and must be a str or "
                f"int, got {type(value).__name__}"
            )
        values.append(value)
    text = json.dumps([cls.job_name, values], ensure_ascii=False, separators=(",", ":"))
    return validate_key(f"the {setting} key of {cls.__qualname__}", text)


def job_keys(
    job: Any,
    data: Callable[[Any], dict[str, Any]],
    unique_key: str | None = None,
    serial_key: str | None = None,
) -> JobKeys:
    """The keys of ``job``: those given, else those its class derives from its data (which
    ``data(job)`` returns). Raises :class:`InvalidJobKey` for a key that cannot be used."""
    cls = type(job)
    unique_by = cls.unique_by
    if unique_key is None and serial_key is None and not unique_by and not cls.serial_by:
        return NO_KEYS
    if unique_key is not None:
        unique = validate_key("unique_key", unique_key)
    elif unique_by:
        unique = _derived(job, "unique_by", tuple(unique_by), data(job))
    else:
        unique = None
    if serial_key is not None:
        serial: str | None = validate_key("serial_key", serial_key)
    elif cls.serial_by:
        serial = _derived(job, "serial_by", tuple(cls.serial_by), data(job))
    else:
        serial = None
    if unique is None and serial is None:
        return NO_KEYS
    return JobKeys(
        None if unique is None else _PREFIX[cls.unique_while] + unique,
        None if unique is None else window_seconds(cls.__qualname__, cls.unique_for),
        serial,
    )
