"""Schedules of periodic jobs, ``cron(...)`` and ``every(...)``, and the slots they give.

A *slot* is one moment a schedule runs at, as an aware UTC datetime. Slots are a pure function
of the schedule and of the times asked about, never of a clock: every worker derives the same
slots, and the database's unique key on (job name, slot) lets exactly one of them enqueue each
(see :mod:`.scheduler`).

Cron expressions and their time-zone arithmetic are cronsim's: it has no dependencies, is
typed, and handles daylight saving time as Debian's cron does, which is what people who write
cron lines expect: a job at a fixed time that falls in the hour skipped in spring runs once, at
the end of the jump; one in the hour repeated in autumn runs once, the first time.

Intervals count from the Unix epoch in UTC, so ``every(hours=1)`` runs on the hour and
``every(minutes=15)`` at :00, :15, :30 and :45, on every worker alike. Use ``cron`` for times
of the local day.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .errors import MAX_DELAY_SECONDS

__all__ = ["MAX_CATCH_UP", "Cron", "Every", "Schedule", "cron", "every"]

MAX_CATCH_UP = 1000
"""The most missed slots a schedule may run after an outage: past that, a burst is surely a
mistake."""

_EXPRESSION_MAX = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# The most a time zone's offset changes at once: reverse iteration through such a change may
# place a slot late, so a search backwards starts this much earlier and goes forwards.
_LARGEST_SHIFT = timedelta(hours=3)


class Schedule(ABC):
    """When a periodic job runs. Build one with :func:`cron` or :func:`every`.

    ``catch_up`` is how many of the slots missed while no worker ran are run when one starts
    again: the most recent ones (0: none).
    """

    def __init__(self, catch_up: int) -> None:
        self.catch_up = catch_up

    @property
    @abstractmethod
    def definition(self) -> str:
        """The schedule in words, stored with each slot: a changed one is a new schedule."""

    @abstractmethod
    def problem(self) -> str | None:
        """What makes this schedule impossible to run, or None."""

    @abstractmethod
    def between(self, after: datetime, until: datetime) -> list[datetime]:
        """The slots later than ``after`` and no later than ``until``, in order."""

    @abstractmethod
    def latest(self, until: datetime, after: datetime, count: int) -> list[datetime]:
        """The ``count`` most recent slots later than ``after`` and no later than ``until``,
        in order."""

    def next_after(self, moment: datetime) -> datetime:
        """The first slot later than ``moment``."""
        span = timedelta(days=1)
        while True:
            found = self.between(moment, moment + span)
            if found:
                return found[0]
            span *= 2

    def _catch_up_problem(self) -> str | None:
        value = self.catch_up
        if isinstance(value, bool) or not isinstance(value, int):
            return f"catch_up must be a whole number, got {value!r}"
        if not 0 <= value <= MAX_CATCH_UP:
            return f"catch_up must be from 0 to {MAX_CATCH_UP}, got {value}"
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.definition} catch_up={self.catch_up}>"


class Cron(Schedule):
    """A cron expression (five fields) in a time zone."""

    def __init__(self, expression: str, timezone: str, catch_up: int) -> None:
        super().__init__(catch_up)
        self.expression = " ".join(expression.split()) if isinstance(expression, str) else ""
        self.raw = expression
        self.timezone = timezone

    @property
    def definition(self) -> str:
        return f"cron {self.expression} {self.timezone}"

    def problem(self) -> str | None:
        if not isinstance(self.raw, str):
            return f"a cron expression must be a string, got {type(self.raw).__name__}"
        if len(self.expression) > _EXPRESSION_MAX:
            return f"the cron expression is longer than {_EXPRESSION_MAX} characters"
        if len(self.expression.split()) != 5:
            return (
                f"cron expression {self.raw!r} must have five fields "
                "(minute hour day-of-month month day-of-week)"
            )
        if not isinstance(self.timezone, str):
            return f"timezone must be a name such as 'Europe/Berlin', got {self.timezone!r}"
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return f"unknown time zone {self.timezone!r}"
        try:
            next(CronSim(self.expression, datetime.now(zone)))
        except CronSimError as exc:
            return f"invalid cron expression {self.raw!r}: {exc}"
        except StopIteration:
            return f"cron expression {self.raw!r} never matches"
        return self._catch_up_problem()

    def _iterate(self, start: datetime, *, reverse: bool = False) -> CronSim:
        return CronSim(self.expression, start.astimezone(ZoneInfo(self.timezone)), reverse)

    def between(self, after: datetime, until: datetime) -> list[datetime]:
        found: list[datetime] = []
        for moment in self._iterate(after):
            slot = moment.astimezone(UTC)
            if slot > until:
                break
            # In the hour repeated in autumn, a fixed-time job's slot is its first occurrence,
            # which may lie before a start in the second one: it is not later than ``after``.
            if slot > after:
                found.append(slot)
        return found

    def latest(self, until: datetime, after: datetime, count: int) -> list[datetime]:
        if count <= 0:
            return []
        # Backwards to the count-th slot before ``until``, then forwards from a little earlier,
        # so that the slots are exactly those ``between`` gives.
        start = until.replace(microsecond=0) + timedelta(seconds=1)
        lower = after
        for seen, moment in enumerate(self._iterate(start, reverse=True), 1):
            slot = moment.astimezone(UTC)
            if slot <= after:
                break
            if seen >= count:
                lower = max(after, slot - _LARGEST_SHIFT)
                break
        return self.between(lower, until)[-count:]


class Every(Schedule):
    """A fixed interval, counted from the Unix epoch (UTC)."""

    def __init__(self, interval: timedelta, catch_up: int, refusal: str | None = None) -> None:
        super().__init__(catch_up)
        self.interval = interval
        self.refusal = refusal

    @property
    def definition(self) -> str:
        return f"every {self.interval}"

    def problem(self) -> str | None:
        if self.refusal is not None:
            return self.refusal
        seconds = self.interval.total_seconds()
        if seconds < 1:
            return f"an interval must be at least one second, got {seconds:g} s"
        if seconds > MAX_DELAY_SECONDS:
            return f"an interval must be at most {MAX_DELAY_SECONDS} s (100 years)"
        return self._catch_up_problem()

    def _index(self, moment: datetime) -> int:
        """How many whole intervals lie between the epoch and ``moment``."""
        return (moment - _EPOCH) // _MICROSECOND // (self.interval // _MICROSECOND)

    def _slot(self, index: int) -> datetime:
        return _EPOCH + self.interval * index

    def between(self, after: datetime, until: datetime) -> list[datetime]:
        return [self._slot(i) for i in range(self._index(after) + 1, self._index(until) + 1)]

    def latest(self, until: datetime, after: datetime, count: int) -> list[datetime]:
        last = self._index(until)
        first = max(self._index(after) + 1, last - count + 1)
        return [self._slot(i) for i in range(first, last + 1)]

    def next_after(self, moment: datetime) -> datetime:
        return self._slot(self._index(moment) + 1)


def cron(expression: str, *, timezone: str = "UTC", catch_up: int = 1) -> Cron:
    """Run at the times a five-field cron expression names, in ``timezone`` (an IANA name).

    ``catch_up``: how many of the slots missed while no worker ran to run when one starts.
    The expression is checked when the job class is defined.
    """
    return Cron(expression, timezone, catch_up)


def every(
    *,
    days: float = 0,
    hours: float = 0,
    minutes: float = 0,
    seconds: float = 0,
    catch_up: int = 1,
) -> Every:
    """Run every so long (at least one second), on multiples of it since the Unix epoch.

    ``catch_up``: how many of the slots missed while no worker ran to run when one starts.
    """
    try:
        interval = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except (TypeError, ValueError, OverflowError) as exc:
        # Refused when the class is defined, where the message can name it.
        wanted = f"days={days!r}, hours={hours!r}, minutes={minutes!r}, seconds={seconds!r}"
        return Every(timedelta(0), catch_up, f"every({wanted}) is not an interval: {exc}")
    return Every(interval, catch_up)
