"""Runs one measurement in a fresh interpreter: ``python -m benchmarks.child '<json spec>'``.

The spec names ``module:function`` (an async function taking keyword arguments and returning a
JSON-able dict), its keyword arguments, and the event loop to run it on. The result is printed
as one ``RESULT {...}`` line on stdout, which :meth:`Session.run_child` reads back.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    module_name, _, function_name = spec["target"].partition(":")
    function: Callable[..., Awaitable[dict[str, Any]]] = getattr(
        importlib.import_module(module_name), function_name
    )
    coroutine = function(**spec.get("kwargs", {}))
    if spec.get("loop") == "uvloop":
        # Only for workers whose own CLI runs on uvloop: PgQueuer's `pgq run` and
        # `routemq-outbox work` do.
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def main() -> None:
    result = _run(json.loads(sys.argv[1]))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
