"""Job data is only data, and only what every engine stores.

- Settings (``max_tries``, ``timeout``, ...) never travel as data: refused on an instance at
  dispatch, ignored in a stored payload, honoured when ``__init__`` sets them, and checked
  when the worker loads the job; a row that cannot become a job, however it fails, fails once.
- What not every engine can store is refused at dispatch, naming the attribute: lone
  surrogates, and nesting beyond MariaDB's limit.
- Numbers come back as they went in, floats included (PostgreSQL's JSONB stores decimals).

Each test fails without the protection it covers.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import Job, dispatch, queue, testing
from routemq_outbox.errors import (
    DispatchError,
    InvalidJobSetting,
    InvalidQueueName,
    JobConstructionError,
    JobDefinitionError,
    MalformedPayload,
    UnserializableJob,
)
from routemq_outbox.execution import load
from routemq_outbox.job import MAX_PAYLOAD_DEPTH, encode_payload
from routemq_outbox.schema import jobs
from routemq_outbox.sql import Claimed

from .jobs import record
from .test_worker import count, drain, failed_rows, insert_raw, log_rows


class Echo(Job):
    """Records that it ran; ``value`` is whatever a test needs to carry."""

    job_name = "tests.payloads.echo"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.value: Any = None

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)


def echo(value: Any = None, key: str = "echo") -> Echo:
    job = Echo()
    job.key, job.value = key, value
    return job


class ConfiguredInInit(Job):
    """Settings given in ``__init__``, as RouteMQ's documentation writes them."""

    job_name = "tests.payloads.configured_in_init"

    def __init__(self) -> None:
        super().__init__()
        self.max_tries = 1
        self.timeout = 0.3
        self.key = ""

    async def handle(self) -> None:
        await record(self.key, "ran", self.attempt)
        await asyncio.sleep(30)


def with_init_settings(**settings: Any) -> type[Job]:
    """A job class whose ``__init__`` sets ``settings`` (one class per test)."""

    class SetsInInit(Job):
        job_name = "tests.payloads.sets_in_init"

        def __init__(self) -> None:
            super().__init__()
            for name, value in settings.items():
                setattr(self, name, value)

        async def handle(self) -> None:  # pragma: no cover - never runs
            raise AssertionError("a job with bad settings ran")

    return SetsInInit


async def jobs_rows(engine: AsyncEngine) -> list[sa.Row[Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(
                sa.cast(jobs.c.payload, sa.Text).label("payload"),
                jobs.c.available_at,
                jobs.c.created_at,
            ).order_by(jobs.c.id)
        )
        return list(result.all())


async def order_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one())


def claimed(payload: str) -> Claimed:
    return Claimed(id=1, queue="default", payload=payload, attempts=1, token=1)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tries", 5),
        ("max_tries", None),
        ("timeout", 30),  # an HTTP timeout, say
        ("timeout", "30"),
        ("retry_after", 1),
        ("backoff", "exponential"),
        ("backoff_max", 60),
        ("job_name", "os.system"),
    ],
)
async def test_a_setting_set_on_an_instance_is_refused_at_dispatch(
    engine: AsyncEngine, name: str, value: object
) -> None:
    job = echo()
    setattr(job, name, value)
    message = f"Echo: {name}={value!r} was set on this instance after Echo\\(\\) built it"
    with pytest.raises(InvalidJobSetting, match=message):
        await dispatch(job)
    with pytest.raises(InvalidJobSetting, match="set it on the class or in __init__"):
        await queue.bulk([echo(), job])
    assert await jobs_rows(engine) == []


@pytest.mark.parametrize(
    "name", ["attempt", "job_id", "scheduled_at", "handle", "failed", "retry_delay"]
)
async def test_names_the_worker_uses_are_not_data(engine: AsyncEngine, name: str) -> None:
    job = echo()
    job.__dict__[name] = 3  # attempt, job_id and scheduled_at are read-only properties
    with pytest.raises(InvalidJobSetting, match=f"attribute '{name}' is reserved"):
        await dispatch(job)
    assert await jobs_rows(engine) == []


async def test_settings_given_in_init_configure_the_job_and_never_travel(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    job = ConfiguredInInit()
    job.key = "configured"
    job.max_tries = 1  # the value __init__ gives: harmless
    await dispatch(job)
    (row,) = await jobs_rows(engine)
    assert json.loads(row.payload)["data"] == {"key": "configured"}

    await drain(db_url)
    (failed,) = await failed_rows(engine)
    # One attempt (not the class's 3), cut off after 0.3 s (not the class's 60).
    assert failed.attempts == 1
    assert failed.exception.startswith(
        "routemq_outbox.errors.JobTimeout: attempt 1 ran longer than its 0.3 s timeout"
    ), failed.exception
    assert [(r.job_key, r.attempt) for r in await log_rows(engine)] == [("configured", 1)]


async def test_settings_in_a_stored_payload_are_ignored(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    """Rows written before settings were kept out of payloads carry them as data: the class
    decides, and the job runs (max_tries=null once held such a job forever)."""
    data = {
        "key": "stored",
        "max_tries": None,
        "timeout": "30",
        "retry_after": -1,
        "backoff": "sideways",
        "backoff_max": None,
        "queue": "elsewhere",
        "job_name": "os.system",
    }
    await insert_raw(engine, json.dumps({"job": Echo.job_name, "data": data}))
    worker = await drain(db_url)
    assert [(r.job_key, r.attempt) for r in await log_rows(engine)] == [("stored", 1)]
    assert worker.stats.succeeded == 1
    assert await failed_rows(engine) == []

    job = load(claimed(json.dumps({"job": Echo.job_name, "data": data})))
    assert (job.max_tries, job.timeout, job.retry_after, job.queue) == (3, 60, 10, "default")


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("max_tries", None, "must be an integer >= 1, got None"),
        ("max_tries", "3", "must be an integer >= 1, got '3'"),
        ("max_tries", True, "must be an integer >= 1, got True"),
        ("timeout", "30", "must be a number of seconds > 0, got '30'"),
        ("timeout", math.inf, "must be a number of seconds > 0, got inf"),
        ("retry_after", -1, "must be a number of seconds from 0 to 3153600000 (100 years)"),
        ("backoff_max", 1e12, "must be a number of seconds from 0 to 3153600000 (100 years)"),
        ("backoff", "linear", "must be 'fixed' or 'exponential', got 'linear'"),
    ],
)
async def test_bad_settings_from_init_are_refused_at_dispatch_and_fail_a_stored_job_once(
    db_url: str, engine: AsyncEngine, setting: str, value: object, problem: str
) -> None:
    cls = with_init_settings(**{setting: value})
    with pytest.raises(InvalidJobSetting) as refused:
        await dispatch(cls())
    assert str(refused.value).startswith(f"{cls.__qualname__}.{setting} {problem}")
    assert await jobs_rows(engine) == []

    # A row dispatched before a deploy changed __init__: the worker fails it once.
    await insert_raw(engine, json.dumps({"job": cls.job_name, "data": {}}))
    worker = await drain(db_url, lease=1)
    (failed,) = await failed_rows(engine)
    assert failed.exception.startswith(
        "routemq_outbox.errors.JobConstructionError: tests.payloads.sets_in_init: "
        f"{cls.__qualname__}().{setting} {problem}"
    ), failed.exception
    assert failed.attempts == 1
    assert worker.stats.failed == 1
    assert await count(engine, jobs) == 0


def test_settings_a_setter_derives_from_data_are_checked_at_load() -> None:
    class FromOptions(Job):
        job_name = "tests.payloads.from_options"

        @property
        def options(self) -> dict[str, Any]:
            return {"timeout": self.timeout}

        @options.setter
        def options(self, value: dict[str, Any]) -> None:
            self.timeout = value["timeout"]

    good = load(
        claimed('{"job": "tests.payloads.from_options", "data": {"options": {"timeout": 5}}}')
    )
    assert good.timeout == 5
    with pytest.raises(JobConstructionError, match=r"FromOptions\(\)\.timeout must be a number"):
        load(
            claimed('{"job": "tests.payloads.from_options", "data": {"options": {"timeout": "5"}}}')
        )


# ----------------------------------------------------------------------------- loading


def nested(levels: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def deep_payload(levels: int) -> str:
    """A payload nesting ``levels`` lists, deeper than json itself can write."""
    return f'{{"job": "{Echo.job_name}", "data": {{"value": {"[" * levels}0{"]" * levels}}}}}'


class ExitsInInit(Job):
    job_name = "tests.payloads.exits_in_init"

    def __init__(self) -> None:
        raise SystemExit("no")


def test_anything_that_stops_a_row_becoming_a_job_is_a_job_load_error() -> None:
    deep = deep_payload(5000)
    with pytest.raises(MalformedPayload, match="payload nests lists and dicts more than 200"):
        load(claimed(deep))
    with pytest.raises(JobConstructionError, match="raised SystemExit: no"):
        load(claimed('{"job": "tests.payloads.exits_in_init", "data": {}}'))
    with pytest.raises(MalformedPayload, match=r"sets reserved attributes \['handle'\]"):
        load(claimed('{"job": "tests.payloads.echo", "data": {"handle": 1}}'))


def test_the_stored_depth_limit_is_the_same_on_every_python() -> None:
    from routemq_outbox.job import MAX_STORED_DEPTH, decode_payload

    # the envelope and "data" are two of the levels
    assert decode_payload(deep_payload(MAX_STORED_DEPTH - 2)).data["value"]
    with pytest.raises(MalformedPayload, match="more than 200 levels deep"):
        decode_payload(deep_payload(MAX_STORED_DEPTH - 1))
    with pytest.raises(MalformedPayload, match="more than 200 levels deep"):
        decode_payload(deep_payload(MAX_STORED_DEPTH - 1).encode())
    brackets = "[{" * 5000 + '\\"'  # inside a string, with an escaped quote: not nesting
    text = f'{{"job": "{Echo.job_name}", "data": {{"value": {json.dumps(brackets)}}}}}'
    assert decode_payload(text).data["value"] == brackets


@pytest.mark.parametrize("db_url", ["postgresql", "sqlite"], indirect=True)
async def test_a_stored_payload_too_deep_to_parse_fails_once(
    db_url: str, engine: AsyncEngine, log_table: None
) -> None:
    """MariaDB cannot store such a row; the others can, from before dispatch bounded nesting
    or from another writer."""
    await insert_raw(engine, deep_payload(5000))
    await dispatch(echo(key="after"))
    await drain(db_url, lease=1)
    (failed,) = await failed_rows(engine)
    assert failed.exception.startswith(
        "routemq_outbox.errors.MalformedPayload: payload nests lists and dicts more than 200"
    ), failed.exception[:300]
    assert failed.attempts == 1
    assert [r.job_key for r in await log_rows(engine)] == ["after"]
    assert await count(engine, jobs) == 0


# ----------------------------------------------------------------------------- text


SURROGATE_CASES = [
    ("name", "a\ud800b", "attribute 'name' holds a lone surrogate ('\\ud800')"),
    (
        "files",
        {"seen": ["ok", b"report-\xff.csv".decode("utf-8", "surrogateescape")]},
        "attribute 'files' at files['seen'][1] holds a lone surrogate ('\\udcff')",
    ),
    ("keys", {"\udc80": 1}, "attribute 'keys' at keys key '\\udc80' holds a lone surrogate"),
    ("\udfff", 1, "attribute name '\\udfff' holds a lone surrogate ('\\udfff')"),
]


@pytest.mark.parametrize(("attribute", "value", "message"), SURROGATE_CASES)
async def test_a_lone_surrogate_is_refused_at_dispatch_naming_where(
    engine: AsyncEngine, orders: None, attribute: str, value: Any, message: str
) -> None:
    job = echo()
    setattr(job, attribute, value)
    async with engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (1)"))
        with pytest.raises(UnserializableJob, match=re.escape(message)):
            await dispatch(job, session=conn)
        with pytest.raises(UnserializableJob, match="which UTF-8 cannot encode"):
            await queue.bulk([echo(), job], session=conn)
        # Refused before anything was sent: the transaction goes on and commits.
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (2)"))
    assert await order_count(engine) == 2
    assert await jobs_rows(engine) == []


async def test_text_every_engine_stores_still_goes_through(engine: AsyncEngine) -> None:
    value = {"astral": "🚀 \U0001d4b3", "accents": "été", "cjk": "日本語", "escaped": "\\ud800"}
    await dispatch(echo(value))
    (job,) = await testing.dispatched(Echo)
    assert job.value == value


async def test_a_queue_name_with_a_lone_surrogate_is_refused(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidQueueName, match="contains a lone surrogate"):
        await queue.push(echo(), queue="q\ud800")
    with pytest.raises(InvalidQueueName, match="contains a lone surrogate"):
        await queue.size("q\ud800")
    with pytest.raises(JobDefinitionError, match="job_name '\\\\ud800' cannot be stored"):

        class BadName(Job):
            job_name = "\ud800"


# ----------------------------------------------------------------------------- nesting


async def test_nesting_is_bounded_at_dispatch_on_every_engine(engine: AsyncEngine) -> None:
    deepest = MAX_PAYLOAD_DEPTH - 2  # the envelope and "data" are two levels
    lists, dicts = nested(deepest), {"a": 1}
    for _ in range(deepest - 1):
        dicts = {"a": dicts}
    await dispatch(echo(lists, key="lists"))
    await dispatch(echo(dicts, key="dicts"))  # MariaDB stores them
    assert [job.value for job in await testing.dispatched(Echo)] == [lists, dicts]

    too_deep = "attribute 'value' at value(\\[0\\])+ nests lists and dicts too deeply"
    limit = "a payload may nest 30 levels, its own 2 included \\(an attribute's value 28\\)"
    with pytest.raises(UnserializableJob, match=f"{too_deep}: {limit}"):
        await dispatch(echo(nested(deepest + 1)))
    with pytest.raises(UnserializableJob, match=too_deep):  # not a RecursionError
        await queue.bulk([echo(), echo(nested(5000))])
    circular: list[Any] = [1]
    circular.append(circular)
    with pytest.raises(UnserializableJob, match=r"at value\[1\] \(a reference to itself\)"):
        await dispatch(echo(circular))
    assert len(await jobs_rows(engine)) == 2


def test_many_shallow_containers_are_fine() -> None:
    """The count of brackets only decides whether to look: 40 siblings are 4 levels."""
    text = encode_payload(echo([{"sku": i, "tags": [i]} for i in range(40)]), max_bytes=1 << 20)
    assert text.count("[") + text.count("{") > MAX_PAYLOAD_DEPTH


# ----------------------------------------------------------------------------- numbers


FLOATS = [1e20, 1.5e300, 1e16, -1.7976931348623157e308, 12345678901234567890.0, 5e-324, 0.1, 1.0]
INTS = [2**70, 10**30, -(2**63), 0]


async def test_numbers_come_back_with_their_type_and_value(
    db_url: str, engine: AsyncEngine
) -> None:
    value = {"floats": FLOATS, "ints": INTS, "text": "1e+20 stays text", "1e+5": 1e5}
    await dispatch(echo(value))  # one row
    await queue.bulk([echo(value), echo(value)])  # PostgreSQL: one JSON text of all rows
    found = await testing.dispatched(Echo)
    assert len(found) == 3
    for job in found:
        assert [(type(v), v) for v in job.value["floats"]] == [(float, v) for v in FLOATS]
        assert [(type(v), v) for v in job.value["ints"]] == [(int, v) for v in INTS]
        assert job.value["text"] == "1e+20 stays text"
        assert job.value["1e+5"] == 1e5

    # The one number PostgreSQL cannot keep: a decimal has no negative zero (README).
    await queue.push(echo(-0.0), queue="zero")
    (zero,) = await testing.dispatched(Echo, queue="zero")
    assert type(zero.value) is float
    assert zero.value == 0.0
    expected_sign = 1.0 if db_url.startswith("postgresql") else -1.0
    assert math.copysign(1.0, zero.value) == expected_sign


def test_large_floats_are_written_without_an_exponent() -> None:
    text = encode_payload(echo([1e20, 2.5e-7, "e+1"]), max_bytes=1 << 20)
    assert '"value":[100000000000000000000.0,2.5e-07,"e+1"]' in text


def test_the_new_refusals_are_dispatch_errors() -> None:
    for error in (InvalidJobSetting, UnserializableJob):
        assert issubclass(error, DispatchError)
