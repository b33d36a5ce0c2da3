"""Performance benchmarks of routemq-outbox against PgQueuer, procrastinate and raw SQL.

``python -m benchmarks --quick --json out.json`` from the command line, or
``benchmarks.run(quick=True)`` from Python (the test suite's entry point). See README.md.

This module stays import-light on purpose: worker processes import ``benchmarks.jobs``, which
imports this package first, and must not pay for the suite's modules.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def run(
    quick: bool = True,
    *,
    database_url: str | None = None,
    systems: tuple[str, ...] | None = None,
    json_path: str | None = None,
) -> dict[str, Any]:
    """Run the suite (blocking) and return every number, ratios, targets and ``problems``.

    ``problems`` lists every missing or insane measurement; callers treat a non-empty list as
    failure. Targets are reported in ``targets`` and never asserted. Must not be called from a
    running event loop (use :func:`benchmarks.suite.run_async` there).
    """
    import asyncio
    import json
    from pathlib import Path

    from .suite import DEFAULT_DATABASE_URL, run_async

    options: dict[str, Any] = {"quick": quick, "database_url": database_url or DEFAULT_DATABASE_URL}
    if systems is not None:
        options["systems"] = systems
    results = asyncio.run(run_async(**options))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results
