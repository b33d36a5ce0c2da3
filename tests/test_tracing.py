"""OpenTelemetry: the trace context travels with the job from dispatch to handle(), on every
backend, through testing.work_off() and through a worker process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

pytest.importorskip("opentelemetry.sdk", reason="the otel extra and opentelemetry-sdk are absent")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from routemq_outbox import Job, dispatch, queue, testing, tracing
from routemq_outbox.schema import jobs

from . import jobs as test_jobs


class Traced(Job):
    """Opens a span of its own inside handle() (tests/otel_setup.py has its twin)."""

    job_name = "tests.traced"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        with trace.get_tracer("tests").start_as_current_span(f"inside {self.key}"):
            pass


def _unset_provider() -> None:
    # What opentelemetry's own test utilities do: the API lets a provider be set only once.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK exporting to memory, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _unset_provider()
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    _unset_provider()


def traced(key: str) -> Traced:
    job = Traced()
    job.key = key
    return job


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def payloads(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(sa.cast(jobs.c.payload, sa.Text())))
        return [json.loads(text) for text in rows.scalars()]


async def test_a_job_dispatched_in_a_span_runs_in_a_span_of_the_same_trace(
    db_url: str, engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    with trace.get_tracer("tests").start_as_current_span("request") as request:
        async with AsyncSession(engine) as session, session.begin():
            await dispatch(traced("a"), session=session)
    [stored] = await payloads(engine)
    assert set(stored["trace"]) >= {"traceparent"}

    stats = await testing.work_off()
    assert stats.succeeded == 1

    trace_id = request.get_span_context().trace_id
    [send] = named(spans, "send default")
    [process] = named(spans, "process default")
    [inside] = named(spans, "inside a")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent.span_id == request.get_span_context().span_id
    assert send.attributes["messaging.system"] == "routemq_outbox"
    assert send.attributes["messaging.destination.name"] == "default"
    assert process.kind is SpanKind.CONSUMER
    assert {send.context.trace_id, process.context.trace_id, inside.context.trace_id} == {trace_id}
    assert process.parent.span_id == send.context.span_id
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    assert inside.parent.span_id == process.context.span_id
    attributes = dict(process.attributes)
    assert attributes["messaging.system"] == "routemq_outbox"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == "default"
    assert attributes["routemq_outbox.job.attempt"] == 1
    assert attributes["routemq_outbox.job.name"] == "tests.traced"
    assert int(attributes["messaging.message.id"]) > 0
    assert process.status.status_code is StatusCode.UNSET


async def test_retries_give_a_span_per_attempt_and_a_failed_job_ends_in_error(
    db_url: str, engine: AsyncEngine, spans: InMemorySpanExporter, log_table: None
) -> None:
    flaky = test_jobs.Flaky()
    flaky.key = "flaky"
    flaky.failures = 1
    doomed = test_jobs.AlwaysFails()
    doomed.key = "doomed"
    await queue.push(flaky, queue="flaky")
    await queue.push(doomed, queue="doomed")
    await testing.work_off(["flaky", "doomed"])

    attempts = sorted(
        named(spans, "process flaky"), key=lambda s: s.attributes["routemq_outbox.job.attempt"]
    )
    assert [s.attributes["routemq_outbox.job.attempt"] for s in attempts] == [1, 2]
    first, second = attempts
    assert first.status.status_code is StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception"]
    assert first.events[0].attributes["exception.message"] == "flaky failure 1"
    assert first.attributes["routemq_outbox.job.outcome"] == "retry"
    assert second.status.status_code is StatusCode.UNSET
    assert not second.events
    [send] = named(spans, "send flaky")
    assert {s.parent.span_id for s in attempts} == {send.context.span_id}

    failed = sorted(
        named(spans, "process doomed"), key=lambda s: s.attributes["routemq_outbox.job.attempt"]
    )
    assert len(failed) == 3
    assert all(s.status.status_code is StatusCode.ERROR for s in failed)
    assert failed[-1].attributes["routemq_outbox.job.outcome"] == "fail"
    assert "failed" in (failed[-1].status.description or "")


async def test_bulk_is_one_producer_span_whose_context_every_job_carries(
    db_url: str, engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    await queue.bulk([traced("1"), traced("2"), traced("3")])
    [send] = named(spans, "send default")
    assert send.attributes["messaging.batch.message_count"] == 3
    parents = {p["trace"]["traceparent"][:-3] for p in await payloads(engine)}  # flags aside
    assert parents == {f"00-{send.context.trace_id:032x}-{send.context.span_id:016x}"}


async def test_without_an_sdk_nothing_is_added(db_url: str, engine: AsyncEngine) -> None:
    assert not tracing.enabled()
    await dispatch(traced("plain"))
    [stored] = await payloads(engine)
    assert "trace" not in stored


def test_without_the_api_tracing_is_off(
    monkeypatch: pytest.MonkeyPatch, spans: InMemorySpanExporter
) -> None:
    assert tracing.enabled()
    monkeypatch.setattr(tracing, "trace", None)
    assert not tracing.enabled()


async def test_a_worker_process_continues_the_trace(
    sqlite_url: str,
    spawn: Any,
    tmp_path: Path,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", sqlite_url)
    exported = tmp_path / "spans.jsonl"
    with trace.get_tracer("tests").start_as_current_span("request") as request:
        await dispatch(traced("in-process"))
    worker = spawn(
        sqlite_url,
        "--import",
        "tests.otel_setup",
        "--stop-when-empty",
        "--sleep",
        "0.1",
        env={"ROUTEMQ_OUTBOX_TEST_SPANS": str(exported)},
    )
    assert worker.wait(60) == 0, worker.log()
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    by_name = {span["name"]: span for span in lines}
    trace_id = f"0x{request.get_span_context().trace_id:032x}"
    assert by_name["process default"]["context"]["trace_id"] == trace_id
    assert by_name["process default"]["kind"] == "SpanKind.CONSUMER"
    assert by_name["inside in-process"]["context"]["trace_id"] == trace_id
    [send] = named(spans, "send default")
    assert by_name["process default"]["parent_id"] == f"0x{send.context.span_id:016x}"


async def test_a_keyed_dispatch_carries_the_trace_too(
    db_url: str, engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    first = await dispatch(traced("k"), unique_key="order-1")
    again = await dispatch(traced("k"), unique_key="order-1")
    assert first is not None
    assert again is not None
    assert (again.id, again.duplicate) == (first.id, True)
    [stored] = await payloads(engine)
    [send, _] = named(spans, "send default")
    assert stored["trace"]["traceparent"][3:35] == f"{send.context.trace_id:032x}"
