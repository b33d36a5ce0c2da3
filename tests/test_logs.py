"""Log formats of the worker process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from routemq_outbox.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("routemq_outbox").setLevel(logging.NOTSET)


def test_json_lines_carry_job_fields_and_tracebacks(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    log = logging.getLogger("routemq_outbox.worker")
    log.info("job x id=%d done", 7, extra={"job": "x", "id": 7, "outcome": "succeeded"})
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        logging.getLogger("app.jobs").exception("a job's own line: %s", "ünïcode")
    logging.getLogger("routemq_outbox.worker").debug("not shown")

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == {"ts", "level", "logger", "message", "job", "id", "outcome"}
    assert (first["level"], first["logger"], first["message"]) == (
        "INFO",
        "routemq_outbox.worker",
        "job x id=7 done",
    )
    assert (first["job"], first["id"], first["outcome"]) == ("x", 7, "succeeded")
    assert second["message"] == "a job's own line: ünïcode"
    assert second["level"] == "ERROR"
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert second["exception"].endswith("RuntimeError: kaput")
    assert "job" not in second


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ["INFO routemq_outbox.worker", "WARNING app"]),
        ({"quiet": True}, ["WARNING app"]),
        (
            {"verbose": True},
            ["DEBUG routemq_outbox.worker", "INFO routemq_outbox.worker", "WARNING app"],
        ),
    ],
)
def test_levels(stream: io.StringIO, options: dict[str, bool], expected: list[str]) -> None:
    configure_logging("text", stream=stream, **options)
    logging.getLogger("routemq_outbox.worker").debug("d")
    logging.getLogger("routemq_outbox.worker").info("i")
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")  # never echoes statements
    logging.getLogger("app").debug("d")  # --verbose is about routemq-outbox's own lines
    logging.getLogger("app").warning("w")
    lines = [" ".join(line.split()[2:4]).rstrip(":") for line in stream.getvalue().splitlines()]
    assert lines == expected


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="exclude"):
        configure_logging(quiet=True, verbose=True)
