"""Prometheus metrics: counted in a worker in this process, and scraped from a real one."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
import urllib.request

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import FailJob, Job, Worker, WorkerSettings, queue
from routemq_outbox import metrics as metrics_module
from routemq_outbox.database import create_engine
from routemq_outbox.metrics import WorkerMetrics
from routemq_outbox.sql import claim

from . import jobs as test_jobs
from .conftest import free_port
from .processes import SpawnWorker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


class Counted(Job):
    """No database of its own: the worker runs in this process."""

    job_name = "tests.metrics.counted"
    max_tries = 2
    retry_after = 0

    def __init__(self) -> None:
        super().__init__()
        self.fate = "succeed"

    async def handle(self) -> None:
        if self.fate == "fail once" and self.attempt == 1:
            raise ValueError("first attempt fails")
        if self.fate == "give up":
            raise FailJob("hopeless")


def counted(fate: str) -> Counted:
    job = Counted()
    job.fate = fate
    return job


async def test_a_worker_counts_what_it_does(db_url: str, engine: AsyncEngine) -> None:
    await queue.bulk([counted("succeed") for _ in range(7)])
    await queue.bulk([counted("fail once") for _ in range(3)], queue="other")
    await queue.bulk([counted("give up") for _ in range(2)], queue="other")
    await queue.push(counted("succeed"), queue="not-served")
    await queue.later(3600, counted("succeed"))

    registry = CollectorRegistry()
    metrics = WorkerMetrics(("default", "other"), registry=registry, interval=60)
    settings = WorkerSettings(
        database_url=db_url, queues=("default", "other"), sleep=0.05, stop_when_empty=True
    )
    worker = Worker(settings, observer=metrics)
    await asyncio.wait_for(worker.run(), 60)

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    job = "tests.metrics.counted"
    assert get("routemq_outbox_jobs_processed_total", queue="default", job=job) == 7
    assert get("routemq_outbox_jobs_succeeded_total", queue="default", job=job) == 7
    assert get("routemq_outbox_jobs_retried_total", queue="default", job=job) == 0
    assert get("routemq_outbox_jobs_processed_total", queue="other", job=job) == 8
    assert get("routemq_outbox_jobs_succeeded_total", queue="other", job=job) == 3
    assert get("routemq_outbox_jobs_retried_total", queue="other", job=job) == 3
    assert get("routemq_outbox_jobs_failed_total", queue="other", job=job) == 2
    assert get("routemq_outbox_job_duration_seconds_count", queue="other", job=job) == 8
    stats = worker.stats
    assert (stats.succeeded, stats.retried, stats.failed) == (10, 3, 2)
    claimed = sum(
        get("routemq_outbox_claim_batch_size_sum", queue=name) or 0 for name in ("default", "other")
    )
    assert claimed == stats.claimed == 15
    # the depth gauges were refreshed when the worker started (for the queues it serves)
    assert get("routemq_outbox_queue_jobs", queue="default", state="delayed") == 1
    assert get("routemq_outbox_queue_jobs", queue="not-served", state="pending") is None
    assert get("routemq_outbox_worker_up") == 0  # it stopped

    await metrics.refresh(engine)
    assert get("routemq_outbox_queue_jobs", queue="default", state="pending") == 0
    assert get("routemq_outbox_queue_jobs", queue="default", state="delayed") == 1
    assert get("routemq_outbox_queue_jobs", queue="other", state="failed") == 2
    assert get("routemq_outbox_queue_oldest_due_age_seconds", queue="other") == 0


async def test_a_failed_depth_refresh_keeps_the_gauges_and_the_worker_going(
    db_url: str,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await queue.push(counted("succeed"))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(("default",), registry=registry, interval=60)
    await metrics.refresh(engine)
    labels = {"queue": "default", "state": "pending"}
    assert registry.get_sample_value("routemq_outbox_queue_jobs", labels) == 1

    async def broken(*args: object) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(metrics_module.sql, "queue_counts", broken)
    await metrics.refresh(engine)  # must not raise: the observer task would die with it
    assert "could not refresh the queue depth metrics" in caplog.text
    assert any(r.exc_info for r in caplog.records if "could not refresh" in r.getMessage())
    assert registry.get_sample_value("routemq_outbox_queue_jobs", labels) == 1


async def test_a_rescued_job_counts_as_retried_without_a_duration(
    db_url: str, engine: AsyncEngine
) -> None:
    await queue.push(counted("succeed"))
    async with engine.connect() as conn:  # a worker that died holding the job
        await claim(conn, "default", 1, secrets.randbits(63), lease=0.01)
    await asyncio.sleep(0.1)

    registry = CollectorRegistry()
    metrics = WorkerMetrics(("default",), registry=registry)
    worker = Worker(WorkerSettings(database_url=db_url, sleep=0.05, max_time=2), observer=metrics)
    await asyncio.wait_for(worker.run(), 60)

    labels = {"queue": "default", "job": "tests.metrics.counted"}
    get = registry.get_sample_value
    assert get("routemq_outbox_jobs_retried_total", labels) == 1  # taken over, back to pending
    assert get("routemq_outbox_jobs_succeeded_total", labels) == 1  # then run, here
    assert get("routemq_outbox_jobs_processed_total", labels) == 2
    assert get("routemq_outbox_job_duration_seconds_count", labels) == 1
    assert get("routemq_outbox_claim_batch_size_sum", {"queue": "default"}) == 1


# ----------------------------------------------------------------------------- a real worker


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return samples_of(response.read().decode())


async def scrape_until(port: int, done: object, timeout: float, what: str) -> Samples:
    """Scrape until ``done(samples)``; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = await asyncio.to_thread(scrape, port)
        except OSError:
            samples = {}  # not serving yet
        if samples and done(samples):  # type: ignore[operator]
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_the_metrics_endpoint_reports_what_happened_in_a_run_of_1000_jobs(
    pg_url: str, spawn: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTEMQ_OUTBOX_DATABASE_URL", pg_url)
    engine = create_engine(pg_url)
    async with engine.begin() as conn:
        await conn.execute(sa.text(test_jobs.CREATE_LOG))
    records, flaky, doomed = 900, 60, 40
    batch: list[Job] = []
    for i in range(records):
        job = test_jobs.Record()
        job.key = f"record-{i}"
        batch.append(job)
    for i in range(flaky):
        flaky_job = test_jobs.Flaky()
        flaky_job.key, flaky_job.failures = f"flaky-{i}", 1
        batch.append(flaky_job)
    await queue.bulk(batch)
    failing = []
    for i in range(doomed):
        failing_job = test_jobs.AlwaysFails()
        failing_job.key = f"doomed-{i}"
        failing.append(failing_job)
    await queue.bulk(failing, queue="other")
    attempts = records + 2 * flaky + 3 * doomed  # AlwaysFails has max_tries = 3

    port = free_port()
    worker = spawn(
        pg_url,
        *("--queue", "default", "--queue", "other", "--concurrency", "20", "--sleep", "0.1"),
        *("--metrics-port", str(port), "--metrics-host", "127.0.0.1"),
        *("--metrics-interval", "0.5"),
    )
    processed = "routemq_outbox_jobs_processed_total"
    progress = []

    def finished(samples: Samples) -> bool:
        progress.append(total(samples, processed))
        return progress[-1] >= attempts

    samples = await scrape_until(port, finished, 180, f"{attempts} processed attempts")
    assert any(0 < seen < attempts for seen in progress), f"never scraped mid-run: {progress}"
    assert progress == sorted(progress), "a counter went down"

    def count(name: str, queue_name: str, job: str) -> float | None:
        return value(samples, name, queue=queue_name, job=job)

    assert count(processed, "default", "tests.record") == records
    assert count("routemq_outbox_jobs_succeeded_total", "default", "tests.record") == records
    assert count(processed, "default", "tests.flaky") == 2 * flaky
    assert count("routemq_outbox_jobs_succeeded_total", "default", "tests.flaky") == flaky
    assert count("routemq_outbox_jobs_retried_total", "default", "tests.flaky") == flaky
    assert count("routemq_outbox_jobs_failed_total", "default", "tests.flaky") == 0
    assert count(processed, "other", "tests.always_fails") == 3 * doomed
    assert count("routemq_outbox_jobs_retried_total", "other", "tests.always_fails") == 2 * doomed
    assert count("routemq_outbox_jobs_failed_total", "other", "tests.always_fails") == doomed
    assert count("routemq_outbox_jobs_succeeded_total", "other", "tests.always_fails") == 0
    assert total(samples, "routemq_outbox_jobs_processed_total") == attempts
    assert total(samples, "routemq_outbox_job_duration_seconds_count") == attempts
    assert total(samples, "routemq_outbox_claim_batch_size_sum") == attempts  # one claim each
    assert value(samples, "routemq_outbox_worker_up") == 1

    # what the database says happened
    async with engine.connect() as conn:
        ran = dict(
            (
                await conn.execute(
                    sa.text(
                        "SELECT split_part(job_key, '-', 1), count(*) FROM job_log "
                        "WHERE event = 'ran' GROUP BY 1"
                    )
                )
            ).all()
        )
        failed = (await conn.execute(sa.text("SELECT count(*) FROM failed_jobs"))).scalar_one()
        left = (await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one()
    assert ran == {"record": records, "flaky": 2 * flaky, "doomed": 3 * doomed}
    assert (failed, left) == (doomed, 0)

    # the depth gauges catch up within the refresh interval
    def drained(samples: Samples) -> bool:
        return value(samples, "routemq_outbox_queue_jobs", queue="other", state="failed") == doomed

    samples = await scrape_until(port, drained, 30, "the depth gauges to refresh")
    for name in ("default", "other"):
        for state in ("pending", "delayed", "reserved"):
            assert value(samples, "routemq_outbox_queue_jobs", queue=name, state=state) == 0
        assert value(samples, "routemq_outbox_queue_oldest_due_age_seconds", queue=name) == 0
    assert value(samples, "routemq_outbox_queue_jobs", queue="default", state="failed") == 0

    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0, worker.log()
    assert f"serving Prometheus metrics on http://127.0.0.1:{port}/metrics" in worker.log()
    await engine.dispose()


async def test_a_busy_metrics_port_is_a_clear_error(pg_url: str, spawn: SpawnWorker) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = spawn(pg_url, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        assert await asyncio.to_thread(worker.wait, 30) == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in worker.log()
