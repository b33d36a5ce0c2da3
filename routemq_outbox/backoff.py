"""Retry delays: a pure function of the attempt that failed."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["delay"]


def delay(
    attempt: int,
    *,
    base: float,
    exponential: bool = False,
    cap: float = 3600.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Fixed: always ``base``. Exponential: ``base * 2**(attempt-1)`` capped at ``cap``, with
    "equal jitter" (half of it fixed, half random) so that jobs which failed together, say when
    a downstream service went away, do not all come back at the same instant.
    """
    if not exponential:
        return float(base)
    raw = min(float(cap), base * 2.0 ** min(max(attempt - 1, 0), 62))
    return raw / 2 + rand() * raw / 2
