"""Imported by a worker process (``--import tests.otel_setup``): an OpenTelemetry SDK that
writes each finished span as a line of JSON to the file in ``ROUTEMQ_OUTBOX_TEST_SPANS``, and a
job that opens a span of its own inside ``handle()``."""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from routemq_outbox import Job

_out = open(os.environ["ROUTEMQ_OUTBOX_TEST_SPANS"], "a", buffering=1)  # noqa: SIM115
_provider = TracerProvider()
_provider.add_span_processor(
    SimpleSpanProcessor(
        ConsoleSpanExporter(out=_out, formatter=lambda span: span.to_json(indent=None) + "\n")
    )
)
trace.set_tracer_provider(_provider)


class Traced(Job):
    """Opens a span named after its key inside handle()."""

    job_name = "tests.traced"

    def __init__(self) -> None:
        super().__init__()
        self.key = ""

    async def handle(self) -> None:
        with trace.get_tracer("tests").start_as_current_span(f"inside {self.key}"):
            pass
