"""Real processes for the tests: worker processes, and a private PostgreSQL server that a test
may restart without disturbing anything else."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ROOT, free_port


class WorkerProcess:
    """``python -m routemq_outbox work --import tests.jobs …`` with its output in a file."""

    def __init__(self, url: str, *args: str, log_dir: Path, env: dict[str, str] | None = None):
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        self._log_file = self.log_path.open("w")
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routemq_outbox",
                "work",
                "--import",
                "tests.jobs",
                "--database-url",
                url,
                *args,
            ],
            cwd=ROOT,
            env={**os.environ, "ROUTEMQ_OUTBOX_DATABASE_URL": url, **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not exit within {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log(self) -> str:
        self._log_file.flush()
        return self.log_path.read_text()


SpawnWorker = Callable[..., WorkerProcess]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _postgres_bindir() -> Path | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


class PrivatePostgres:
    """A PostgreSQL server of our own, on a free port, that a test may stop and restart.

    As root (CI), the server runs as the ``postgres`` user, since PostgreSQL refuses root.
    """

    def __init__(self, *settings: str, port: int | None = None) -> None:
        """``settings`` are extra server settings, e.g. ``"max_connections=300"``."""
        self.settings = settings
        bindir = _postgres_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bindir = bindir
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="routemq-outbox-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {setting}" for setting in self.settings)
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def terminate(process: subprocess.Popen[bytes] | WorkerProcess) -> None:
    popen = process.popen if isinstance(process, WorkerProcess) else process
    if popen.poll() is None:
        popen.send_signal(signal.SIGKILL)
        popen.wait(10)
