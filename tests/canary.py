"""A module no worker may ever import: importing it, or calling into it, leaves a mark.

Hostile payloads name callables here. The worker resolves job names only in its registry of
imported Job classes; if it ever imported what a payload names instead, the file named by
``ROUTEMQ_OUTBOX_TEST_CANARY`` would appear (and ``<that file>.called`` if anything here ran).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from routemq_outbox import Job

_MARKER = os.environ.get("ROUTEMQ_OUTBOX_TEST_CANARY")
if _MARKER:
    Path(_MARKER).write_text(f"imported by process {os.getpid()}\n")


def touch(*args: Any, **kwargs: Any) -> None:
    if _MARKER:
        Path(_MARKER + ".called").write_text(f"called with {args!r} {kwargs!r}\n")


class Canary(Job):
    """A real Job class, but in a module the worker was not told to import."""

    async def handle(self) -> None:
        touch()
