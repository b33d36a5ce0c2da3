"""Prometheus metrics for a worker: ``routemq-outbox work --metrics-port PORT``.

:class:`WorkerMetrics` is a :class:`~routemq_outbox.worker.WorkerObserver`. The worker tells
it of every claim and every recorded outcome (a dictionary look-up and a few increments, no
I/O), and its ``watch`` task refreshes the queue depth gauges of the worker's queues every
``interval`` seconds with the statement of ``routemq-outbox stats``.

Metric names (the counters are exposed with the ``_total`` suffix):

- ``routemq_outbox_jobs_processed_total{queue,job}``: attempts whose outcome was recorded:
  succeeded, retried or failed (the sum of the next three)
- ``routemq_outbox_jobs_succeeded_total{queue,job}``
- ``routemq_outbox_jobs_retried_total{queue,job}``: put back to pending for another attempt
  (including jobs taken over from a worker that stopped heartbeating)
- ``routemq_outbox_jobs_failed_total{queue,job}``: moved to failed_jobs
- ``routemq_outbox_job_duration_seconds{queue,job}``: histogram of the attempts run here
- ``routemq_outbox_claim_batch_size{queue}``: histogram of jobs per (non-empty) claim
- ``routemq_outbox_queue_jobs{queue,state}``: gauge; state is pending, delayed, reserved or
  failed
- ``routemq_outbox_queue_oldest_due_age_seconds{queue}``: gauge; 0 when nothing is due
- ``routemq_outbox_worker_up``: gauge, 1 while the worker runs

``job`` is the job's stable name, or ``unknown`` for a row that could not be loaded (the
name in a bad payload is not trusted as a label).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from . import sql
from .errors import ConfigurationError, brief
from .execution import Outcome, Verdict
from .worker import TRANSIENT, Worker

__all__ = ["STATES", "WorkerMetrics", "serve_metrics"]

log = logging.getLogger("routemq_outbox.metrics")

STATES = ("pending", "delayed", "reserved", "failed")
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    float("inf"),
)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, float("inf"))
UNKNOWN_JOB = "unknown"


class _JobSeries(NamedTuple):
    processed: Counter
    succeeded: Counter
    retried: Counter
    failed: Counter
    duration: Histogram


class WorkerMetrics:
    """The metrics of one worker, in ``registry`` (a new one, with the process collectors,
    unless given: pass ``prometheus_client.REGISTRY`` to join an application's own)."""

    def __init__(
        self,
        queues: Sequence[str],
        *,
        registry: CollectorRegistry | None = None,
        interval: float = 15.0,
    ) -> None:
        if interval <= 0:
            raise ConfigurationError(f"metrics interval must be > 0, got {interval!r}")
        if registry is None:
            registry = CollectorRegistry()
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        self.queues = tuple(queues)
        self.interval = interval
        by_job = ["queue", "job"]
        self.processed = Counter(
            "routemq_outbox_jobs_processed",
            "Attempts whose outcome was recorded: succeeded, retried or failed.",
            by_job,
            registry=registry,
        )
        self.succeeded = Counter(
            "routemq_outbox_jobs_succeeded",
            "Jobs that succeeded (and were deleted).",
            by_job,
            registry=registry,
        )
        self.retried = Counter(
            "routemq_outbox_jobs_retried",
            "Jobs put back to pending for another attempt.",
            by_job,
            registry=registry,
        )
        self.failed = Counter(
            "routemq_outbox_jobs_failed",
            "Jobs moved to failed_jobs.",
            by_job,
            registry=registry,
        )
        self.duration = Histogram(
            "routemq_outbox_job_duration_seconds",
            "How long the attempts run by this worker took.",
            by_job,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.claim_batch = Histogram(
            "routemq_outbox_claim_batch_size",
            "Jobs claimed by one claim statement (claims that found none are not counted).",
            ["queue"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.depth = Gauge(
            "routemq_outbox_queue_jobs",
            "Jobs of the queue by state (pending: due now), refreshed periodically.",
            ["queue", "state"],
            registry=registry,
        )
        self.oldest_due_age = Gauge(
            "routemq_outbox_queue_oldest_due_age_seconds",
            "Seconds the oldest due job of the queue has waited (0: none due).",
            ["queue"],
            registry=registry,
        )
        self.up = Gauge("routemq_outbox_worker_up", "1 while the worker runs.", registry=registry)
        self._series: dict[tuple[str, str], _JobSeries] = {}
        self._batches = {name: self.claim_batch.labels(name) for name in self.queues}

    # ------------------------------------------------------------------ the worker's hooks

    def claimed(self, queue: str, count: int) -> None:
        batch = self._batches.get(queue)
        if batch is None:
            batch = self._batches[queue] = self.claim_batch.labels(queue)
        batch.observe(count)

    def recorded(self, claimed: sql.Claimed, outcome: Outcome, *, ran: bool) -> None:
        name = outcome.job.job_name if outcome.job is not None else UNKNOWN_JOB
        series = self._series.get((claimed.queue, name))
        if series is None:
            series = self._series[(claimed.queue, name)] = self._series_of(claimed.queue, name)
        series.processed.inc()
        verdict = outcome.verdict
        if verdict is Verdict.DONE:
            series.succeeded.inc()
        elif verdict is Verdict.RETRY:
            series.retried.inc()
        else:
            series.failed.inc()
        if ran:
            series.duration.observe(outcome.duration)

    def _series_of(self, queue: str, name: str) -> _JobSeries:
        return _JobSeries(
            self.processed.labels(queue, name),
            self.succeeded.labels(queue, name),
            self.retried.labels(queue, name),
            self.failed.labels(queue, name),
            self.duration.labels(queue, name),
        )

    async def watch(self, worker: Worker) -> None:
        """Worker up, and the depth gauges refreshed every ``interval`` s, until cancelled."""
        self.up.set(1)
        try:
            while True:
                await self.refresh(worker.engine)
                await asyncio.sleep(self.interval)
        finally:
            self.up.set(0)

    async def refresh(self, engine: AsyncEngine) -> None:
        """Set the depth gauges of the worker's queues from the database."""
        try:
            counts = await sql.queue_counts(engine, self.queues)
        except TRANSIENT as exc:
            log.warning("could not refresh the queue depth metrics (%s)", brief(exc))
            return
        except Exception:  # the gauges keep their last values; the next round tries again
            log.exception("could not refresh the queue depth metrics")
            return
        for row in counts:
            for state in STATES:
                self.depth.labels(row.queue, state).set(getattr(row, state))
            self.oldest_due_age.labels(row.queue).set(row.oldest_due_age or 0.0)


def serve_metrics(metrics: WorkerMetrics, port: int, host: str = "0.0.0.0") -> Callable[[], None]:  # noqa: S104
    """Serve ``metrics`` over HTTP (any path, e.g. ``/metrics``) from a background thread;
    returns the function that stops the server."""
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


class MqttCollector(Collector):
    """The MQTT relay's figures, read from :data:`routemq_outbox.mqtt.stats` at each scrape."""

    def collect(self) -> Iterator[Metric]:
        from .mqtt import stats

        yield CounterMetricFamily(
            "routemq_outbox_mqtt_published",
            "Messages the broker acknowledged (QoS 0: sent).",
            value=stats.published,
        )
        yield CounterMetricFamily(
            "routemq_outbox_mqtt_retried",
            "Publishes sent again because the connection was lost before the broker's ack.",
            value=stats.retried,
        )
        yield CounterMetricFamily(
            "routemq_outbox_mqtt_rejected",
            "Publishes the broker refused with a failure reason code.",
            value=stats.rejected,
        )
        yield GaugeMetricFamily(
            "routemq_outbox_mqtt_broker_connected",
            "1 while the relay holds a connection to the broker.",
            value=int(stats.connected),
        )
        yield CounterMetricFamily(
            "routemq_outbox_mqtt_outages",
            "Times the broker became unreachable.",
            value=stats.outages,
        )
