"""OpenTelemetry traces from dispatch to ``handle()`` (the optional ``otel`` extra).

At dispatch the current trace context (W3C ``traceparent`` / ``tracestate``) is stored in the
job's payload under ``"trace"``, inside a producer span ``send <queue>``. Each attempt then runs
in a consumer span ``process <queue>`` whose parent is that context (and which links to it, as
the messaging conventions ask), so the job's own spans land in the producer's trace. An attempt
that raises records the exception and ends with an error status, whether it will be retried or
has failed for good.

Nothing here costs anything unless the application has installed an OpenTelemetry SDK: without
``opentelemetry-api`` the import below fails once, and without an SDK the API's tracer provider
is a proxy, which :func:`enabled` checks before any work is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .execution import Outcome
    from .sql import Claimed

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # the extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]

__all__ = ["SYSTEM", "TRACE_KEY", "carrier_of", "enabled", "inject", "process_span", "send_span"]

SYSTEM = "routemq_outbox"
"""``messaging.system`` of every span."""
TRACE_KEY = "trace"
"""The payload key that holds the producer's trace context."""

_INSTRUMENTATION = "routemq_outbox"


_MISSING = object()
# A provider named by this variable is made on the first get_tracer_provider() call.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_NOT_RECORDING = () if trace is None else (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def enabled() -> bool:
    """Whether spans are recorded: the API is installed and an SDK's provider is set.

    Every dispatch and attempt asks, so it reads the API's global rather than calling
    ``get_tracer_provider()``, which looks up an environment variable each time it finds none
    set (over a microsecond); the public call is kept for what the global cannot tell.
    """
    if trace is None:
        return False
    provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
    if provider is _MISSING or (provider is None and _PROVIDER_FROM_ENV):
        provider = trace.get_tracer_provider()
    return provider is not None and not isinstance(provider, _NOT_RECORDING)


def _tracer() -> Any:
    from . import __version__

    return trace.get_tracer(_INSTRUMENTATION, __version__)


def inject(payload: str) -> str:
    """``payload`` (a JSON object's text) with the current trace context under ``"trace"``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return payload
    # Appended to the text rather than re-encoded: the payload was checked and encoded once.
    return payload[:-1] + f',"{TRACE_KEY}":' + json.dumps(carrier, separators=(",", ":")) + "}"


@contextmanager
def send_span(rows: Sequence[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    """A producer span around inserting ``rows`` (queue, payload); yields the rows with its
    context stored in each payload."""
    queues = sorted({queue for queue, _ in rows})
    destination = queues[0] if len(queues) == 1 else "(several)"
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": destination,
    }
    if len(rows) > 1:
        attributes["messaging.batch.message_count"] = len(rows)
    with _tracer().start_as_current_span(
        f"send {destination}", kind=SpanKind.PRODUCER, attributes=attributes
    ):
        yield [(queue, inject(payload)) for queue, payload in rows]


def carrier_of(payload: str | bytes) -> dict[str, str]:
    """The trace context stored in ``payload``, or an empty dict."""
    try:
        document = json.loads(payload)
    except (TypeError, ValueError, RecursionError):
        return {}
    carrier = document.get(TRACE_KEY) if isinstance(document, dict) else None
    if not isinstance(carrier, dict):
        return {}
    return {k: v for k, v in carrier.items() if isinstance(k, str) and isinstance(v, str)}


async def process_span(claimed: Claimed, attempt: Callable[[], Awaitable[Outcome]]) -> Outcome:
    """Run ``attempt`` (one attempt of ``claimed``) in a consumer span and record its outcome."""
    from .execution import Verdict

    parent = propagate.extract(carrier_of(claimed.payload))
    producer = trace.get_current_span(parent).get_span_context()
    links = [Link(producer)] if producer.is_valid else []
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": claimed.queue,
        "messaging.message.id": str(claimed.id),
        "routemq_outbox.job.attempt": claimed.attempts,
    }
    with _tracer().start_as_current_span(
        f"process {claimed.queue}",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        outcome = await attempt()
        if outcome.job is not None:
            span.set_attribute("routemq_outbox.job.name", type(outcome.job).job_name)
        span.set_attribute("routemq_outbox.job.outcome", outcome.verdict.value)
        if outcome.verdict in (Verdict.RETRY, Verdict.FAIL) and outcome.error is not None:
            span.record_exception(outcome.error)
            what = "will be retried" if outcome.verdict is Verdict.RETRY else "failed"
            span.set_status(Status(StatusCode.ERROR, f"{type(outcome.error).__name__}; {what}"))
        return outcome
