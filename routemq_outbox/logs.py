"""Logging for the worker process: readable text, or JSON lines for log shippers.

The worker logs one line per job outcome with the job's details attached as record attributes
(``job``, ``id``, ``queue``, ``attempt``, ``outcome``, ``duration_ms``); the JSON format puts
them in fields of their own, next to ``ts``, ``level``, ``logger`` and ``message``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JOB_FIELDS", "LOG_FORMATS", "JsonFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
JOB_FIELDS = ("job", "id", "queue", "attempt", "outcome", "duration_ms")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the job fields
    when the record has them, and exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(
    log_format: str = "text",
    *,
    quiet: bool = False,
    verbose: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Send the process's logs to ``stream`` (stderr) in ``log_format``.

    Default: INFO and up. ``quiet``: warnings and errors only. ``verbose``: routemq-outbox's
    own DEBUG lines too (other libraries stay at INFO, so SQLAlchemy does not echo every
    statement).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if quiet and verbose:
        raise ValueError("quiet and verbose exclude each other")
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, handlers=[handler], force=True
    )
    logging.getLogger("routemq_outbox").setLevel(logging.DEBUG if verbose else logging.NOTSET)
