"""The worker process behind ``routemq-outbox work``: one :class:`.Worker` with what a process
around it needs: the job modules imported, signals, the metrics server, the event loop."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .config import MQTT_QUEUE
from .errors import ConfigurationError
from .job import registered_jobs
from .worker import Worker, WorkerObserver, WorkerSettings, log

__all__ = ["import_job_modules", "serve"]


def import_job_modules(modules: Sequence[str]) -> None:
    """Import the modules that define Job classes (the only way a job name becomes known)."""
    if os.getcwd() not in sys.path:
        # Like `python -m`: let `--import app.jobs` find the project the worker runs in.
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import job module {module!r}: {exc}") from exc
    _import_routemq_jobs(modules)


def _import_routemq_jobs(modules: Sequence[str]) -> None:
    """A RouteMQ application names its jobs package (``--import app.jobs``) and RouteMQ imports
    the modules in it: do the same, then teach the worker to run RouteMQ jobs."""
    if importlib.util.find_spec("routemq") is None:
        return
    packages = [name for name in modules if hasattr(sys.modules.get(name), "__path__")]
    if packages:
        from routemq.job_registry import discover_and_register_jobs

        for package in packages:
            discover_and_register_jobs(package)
    if "routemq.job" in sys.modules:
        importlib.import_module("routemq_outbox.routemq_driver")


def serve(settings: WorkerSettings, imports: Sequence[str] = ()) -> int:
    """Run a worker until it stops; the first SIGTERM/SIGINT stops it gracefully, a second
    one exits at once. With ``settings.metrics_port``, serve Prometheus metrics meanwhile.
    Returns the process exit code."""
    import_job_modules(imports)
    if MQTT_QUEUE in settings.queues:
        # The relay's job class is built in: -q mqtt needs no --import.
        import_job_modules(["routemq_outbox.mqtt"])
    if not registered_jobs():
        log.warning("no Job classes are imported: every job will fail as unknown (use --import)")
    observer: WorkerObserver | None = None
    stop_metrics: Callable[[], None] | None = None
    if settings.metrics_port is not None:
        from .metrics import WorkerMetrics, serve_metrics

        metrics = WorkerMetrics(settings.queues, interval=settings.metrics_interval)
        stop_metrics = serve_metrics(metrics, settings.metrics_port, settings.metrics_host)
        observer = metrics
        if MQTT_QUEUE in settings.queues:
            from .metrics import MqttCollector

            metrics.registry.register(MqttCollector())

    async def main() -> None:
        worker = Worker(settings, observer=observer)
        loop = asyncio.get_running_loop()
        received: list[signal.Signals] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum)
            if len(received) == 1:
                log.info(
                    "%s received: stopping; running jobs have %g s to finish "
                    "(send it again to exit at once)",
                    signum.name,
                    settings.grace,
                )
                worker.stop()
            else:
                log.warning("%s received again: exiting now", signum.name)
                os._exit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await worker.run()
        finally:
            if MQTT_QUEUE in settings.queues:
                from .mqtt import close_relay

                await close_relay()
        if worker.abandoned:
            # Job code that ignores cancellation would keep the event loop from closing
            # (it waits for every task): the worker is done, so the process ends here.
            log.warning("exiting with %d tasks of job code still running", worker.abandoned)
            logging.shutdown()
            os._exit(0)

    try:
        _run_event_loop(main())
    finally:
        if stop_metrics is not None:
            stop_metrics()
    return 0


def _run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the worker on uvloop where it is installed (a dependency except on Windows): its
    event loop costs a fraction of asyncio's per task and per socket read, which is most of a
    worker's own overhead on short jobs."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
