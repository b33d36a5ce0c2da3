"""What a worker writes down about a failure is storable on every engine, whatever the
exception says: NUL, lone surrogates and runaway lengths.

Each test fails without the protection it covers.
"""

from __future__ import annotations

import json

from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, queue
from routemq_outbox.execution import DESCRIBE_MAX_CHARS, describe
from routemq_outbox.schema import jobs

from .test_worker import count, drain, failed_rows

# ----------------------------------------------------------------------------- failures


class FailsWithUnstorableText(Job):
    job_name = "tests.failure_text.unstorable"
    max_tries = 1

    def __init__(self) -> None:
        super().__init__()
        self.kind = ""

    async def handle(self) -> None:
        if self.kind == "surrogate":  # a file name as os.listdir gives it
            raise ValueError(
                "cannot parse " + b"report-\xff.csv".decode("utf-8", "surrogateescape")
            )
        if self.kind == "nul":
            raise ValueError("unexpected record: A\x00B")
        raise ValueError("start " + "x" * 3_000_000 + " end")


def failing(kind: str) -> FailsWithUnstorableText:
    job = FailsWithUnstorableText()
    job.kind = kind
    return job


def test_describe_gives_text_every_engine_stores() -> None:
    def raised(exc: BaseException) -> BaseException:
        try:
            raise exc
        except BaseException as caught:
            return caught

    text = describe(raised(ValueError("a\x00b \udcff \ud800 é 🚀")))
    assert text.startswith("ValueError: a\\x00b \\udcff \\ud800 é 🚀\n\nTraceback")
    text.encode()  # no lone surrogate left
    assert "\x00" not in text

    long = describe(raised(ValueError("head " + "x" * 1_000_000 + " tail")))
    assert len(long) < DESCRIBE_MAX_CHARS + 100
    assert long.startswith("ValueError: head xxx")
    assert long.endswith("xxx tail")  # the last line of the traceback
    assert "characters left out ...]" in long


async def test_a_failure_whose_message_no_engine_stores_still_reaches_failed_jobs_once(
    db_url: str, engine: AsyncEngine
) -> None:
    await queue.bulk([failing("surrogate"), failing("nul"), failing("huge")])
    worker = await drain(db_url)
    failed = {json.loads(r.payload)["data"]["kind"]: r for r in await failed_rows(engine)}
    assert sorted(failed) == ["huge", "nul", "surrogate"]
    assert all(row.attempts == 1 for row in failed.values())
    assert failed["surrogate"].exception.startswith(
        "ValueError: cannot parse report-\\udcff.csv\n\nTraceback"
    )
    assert failed["nul"].exception.startswith("ValueError: unexpected record: A\\x00B\n")
    huge = failed["huge"].exception
    assert len(huge) < DESCRIBE_MAX_CHARS + 100
    assert huge.startswith("ValueError: start xxx")
    assert huge.endswith("xxx end")
    assert worker.stats.failed == 3
    assert await count(engine, jobs) == 0
