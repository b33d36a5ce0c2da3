"""Every code sample of RouteMQ's "Dispatching Jobs" page, run on routemq-outbox with only its
imports changed (tests/data/routemq-dispatching-jobs.md), on every backend.

``core.queue.queue_manager`` becomes ``routemq_outbox``; ``app.jobs.*`` (the application's own
jobs) becomes tests/seed_jobs.py; the names a sample uses without defining them (``job``,
``user_ids``, ``email``, …) are given, as the surrounding application would. ``core.controller``
and ``core.middleware`` are RouteMQ's MQTT framework, not its queue: those two samples import
them from RouteMQ, and are skipped where RouteMQ is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import routemq_outbox
from routemq_outbox.errors import ConfigurationError
from routemq_outbox.schema import jobs

from . import seed_jobs

PAGE = Path(__file__).parent / "data" / "routemq-dispatching-jobs.md"
SAMPLES = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)

IMPORTS = [
    (r"^from core\.queue\.queue_manager import ", "from routemq_outbox import "),
    (r"^from app\.jobs\.\w+ import ", "from tests.seed_jobs import "),
    (r"^from core\.(controller|middleware) import ", r"from routemq.\1 import "),
]


def with_our_imports(source: str) -> str:
    lines = []
    for line in source.splitlines():
        for pattern, replacement in IMPORTS:
            line = re.sub(pattern, replacement, line)
        lines.append(line)
    return "\n".join(lines)


class Then(NamedTuple):
    """What to call after the sample ran (its handlers), and how many jobs it leaves."""

    call: str | None
    jobs: int
    redis: bool = False  # pushes to connection="redis", which needs mapping to a database


# by position on the page (1-based)
EXPECTED: dict[int, Then] = {
    1: Then("await handle_message({'topic': 'orders'})", 1),
    2: Then(None, 3),  # default queue, "emails", and connection="database"
    3: Then(None, 3),
    4: Then(None, 3),
    5: Then("await OrderController.handle_new_order('o-1', {'items': 2}, None)", 1),
    6: Then("await QueueMiddleware().handle({'topic': 't', 'payload': {}}, next_handler)", 1),
    7: Then(
        "await handle_sensor_data('d-1', {'temperature': 35}, None)\n"
        "await handle_sensor_data('d-2', {'temperature': 20}, None)",
        1,
    ),
    8: Then(None, 0),
    9: Then(None, 1, redis=True),
    10: Then(None, 1, redis=True),
    11: Then(None, 2, redis=True),
    12: Then(None, 0, redis=True),
    13: Then("await handle_user_signup(7, 'new@example.com')", 3),
    14: Then(None, 3),
    15: Then(None, 1),
    16: Then("await send_to_external_api({'k': 1})", 1),
    17: Then(None, 1),
    18: Then(None, 1),
    19: Then(None, 0),  # defines handlers only
    20: Then(None, 2),
    21: Then(None, 4),
    22: Then(None, 0),  # sets queue names only
}


def placeholders() -> dict[str, Any]:
    """The names the samples take from their surroundings."""

    async def next_handler(context: dict[str, Any]) -> str:
        return "handled"

    async def process_order(order_data: Any) -> None:
        pass

    jobs_classes = {
        name: cls
        for name, cls in vars(seed_jobs).items()
        if inspect.isclass(cls) and name[0] != "_"
    }
    return {
        "__name__": "sample",
        **jobs_classes,
        "dispatch": routemq_outbox.dispatch,
        "queue": routemq_outbox.queue,
        "job": seed_jobs.SendEmailJob(),
        "jobs": [seed_jobs.SendEmailJob(), seed_jobs.SendEmailJob()],
        "delay": 60,
        "user_ids": [1, 2, 3],
        "email": "user@example.com",
        "subject": "Welcome!",
        "body": "Thanks for signing up!",
        "is_urgent": True,
        "is_normal": False,
        "order_id": "o-1",
        "huge_dictionary": {"lines": list(range(1000))},
        "email_job": seed_jobs.SendEmailJob(),
        "report_job": seed_jobs.GenerateReportJob(),
        "cleanup_job": seed_jobs.ProcessOrderJob(),
        "next_handler": next_handler,
        "process_order": process_order,
    }


async def run(source: str, namespace: dict[str, Any]) -> None:
    code = compile(source, "<sample>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result: Awaitable[None] | None = eval(code, namespace)
    if inspect.isawaitable(result):
        await result


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(jobs))).scalar())


def test_the_page_has_the_22_samples_counted() -> None:
    assert len(SAMPLES) == 22 == len(EXPECTED)
    changed = [
        n
        for n, source in enumerate(SAMPLES, 1)
        for before, after in zip(
            source.splitlines(), with_our_imports(source).splitlines(), strict=True
        )
        if before != after and not after.startswith("from ")
    ]
    assert changed == []  # only imports change


@pytest.mark.parametrize("number", range(1, 23))
async def test_a_sample_runs_with_only_its_imports_changed(
    number: int,
    db_url: str,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = with_our_imports(SAMPLES[number - 1])
    expected = EXPECTED[number]
    if "from routemq." in source and importlib.util.find_spec("routemq") is None:
        pytest.skip("imports RouteMQ's MQTT framework (Controller, Middleware): RouteMQ absent")
    then: Callable[[dict[str, Any]], Awaitable[None]] = lambda ns: run(expected.call or "", ns)  # noqa: E731

    if expected.redis:
        # As printed: a clear error, saying that jobs live in SQL and how to map the name.
        with pytest.raises(ConfigurationError) as refused:
            await run(source, placeholders())
        message = str(refused.value)
        assert "connection 'redis' is RouteMQ's Redis driver" in message
        assert "jobs live in your SQL database" in message
        assert "ROUTEMQ_OUTBOX_DATABASE_URL_REDIS" in message
        assert await count(engine) == 0
        # Mapped as the error says, it runs.
        monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL_REDIS", db_url)

    namespace = placeholders()
    await run(source, namespace)
    await then(namespace)
    assert await count(engine) == expected.jobs
    if number in (8, 17):
        assert capsys.readouterr().out  # the sample prints what it found or did
