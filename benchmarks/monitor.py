"""Watching processes and the machine: a worker's memory, and what else uses the CPUs.

Everything here reads Linux's /proc (psutil stands in for the RSS elsewhere). The suite runs on
2 cores that PostgreSQL shares, so what other processes do during a run is part of what its
numbers mean; it is measured and reported, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ForeignLoad", "RssSampler", "machine_busy"]


# ---------------------------------------------------------------------------------- machine


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def machine_busy(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the machine is *before* the suite starts, and the load average.

    Every number here is a share of 2 cores also used by PostgreSQL: anything else running
    (a test suite, a build) changes them. This is recorded, and a warning printed, so that a
    noisy result can be told from a regression.
    """
    before = _cpu_jiffies()
    await asyncio.sleep(seconds)
    after = _cpu_jiffies()
    busy = None
    if before and after and after[1] > before[1]:
        busy = (after[0] - before[0]) / (after[1] - before[1])
    load = None
    with contextlib.suppress(OSError, ValueError):
        load = float(Path("/proc/loadavg").read_text().split()[0])
    return {"cpu_busy_share": busy, "loadavg_1min": load, "cpus": os.cpu_count()}


class ForeignLoad:
    """CPU time used during the run by processes that are neither ours nor the server's.

    The suite's numbers assume it has the machine (and the database server) to itself. Every
    second this sums the CPU ticks of all other processes (not in the suite's own session or its
    children's sessions, not named like the server: ``postgres``, or ``mariadbd``/``mysqld``
    on MariaDB), so a report can say how much else was running. Work that others' clients cause
    inside the server is not counted: this is a lower bound.
    """

    def __init__(
        self,
        own_sessions: Callable[[], set[int]],
        server_processes: frozenset[str] = frozenset({"postgres"}),
        interval: float = 1.0,
    ) -> None:
        self.own_sessions = own_sessions
        self.server_processes = server_processes
        self.interval = interval
        self.ticks = 0
        self.started = time.perf_counter()  # again in start(): only the run itself counts
        self._seen: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start_tick = 0.0

    def _scan(self) -> dict[int, tuple[int, int]]:
        """pid -> (CPU ticks used, start time in ticks since boot) of every foreign process."""
        own = self.own_sessions()
        usage: dict[int, tuple[int, int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            # Fields after the command (0-based): 3 session, 11 utime, 12 stime, 19 starttime.
            # Session 0 is the kernel's own threads (I/O on our behalf, among others).
            if comm in self.server_processes or int(fields[3]) in own or int(fields[3]) == 0:
                continue
            usage[int(entry.name)] = (int(fields[11]) + int(fields[12]), int(fields[19]))
        return usage

    def _sample(self, *, first: bool = False) -> None:
        usage = self._scan()
        if not first:
            for pid, (ticks, started) in usage.items():
                if pid in self._seen:
                    self.ticks += max(0, ticks - self._seen[pid])
                elif started >= self._start_tick:
                    self.ticks += ticks  # born during the run: all of its CPU is in it
        self._seen = {pid: ticks for pid, (ticks, _) in usage.items()}

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._sample()

    def start(self) -> None:
        self.started = time.perf_counter()
        if not os.path.isdir("/proc"):
            return
        with contextlib.suppress(OSError, ValueError):
            uptime = float(Path("/proc/uptime").read_text().split()[0])
            self._start_tick = uptime * self._hz
        self._sample(first=True)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task is None:
            return {}
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sample()
        seconds = time.perf_counter() - self.started
        cpu = self.ticks / self._hz
        return {
            "foreign_cpu_seconds": cpu,
            "foreign_cpu_share": cpu / seconds / (os.cpu_count() or 1) if seconds else None,
        }


# ------------------------------------------------------------------------------------- RSS


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in KiB (empty once the process is gone).

    Linux's /proc gives the kernel's high-water mark; elsewhere psutil gives the current RSS
    only, so the peak is then the highest sample.
    """
    values: dict[str, int] = {}
    if not os.path.exists("/proc/self/status"):
        import psutil

        with contextlib.suppress(psutil.Error):
            values["VmRSS"] = psutil.Process(pid).memory_info().rss // 1024
        return values
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


class RssSampler:
    """Samples a process's resident memory until it exits.

    VmHWM is the kernel's own high-water mark, so even a spike between two samples is
    counted; it vanishes with the process, so it is read on every sample and the last value
    read before exit is kept. VmRSS samples give the curve (first, peak, last).
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.hwm_kib = 0
        self.rss_kib: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            values = _status_kib(self.pid)
            if not values:
                return  # exited (or a zombie, which has no memory fields)
            self.hwm_kib = max(self.hwm_kib, values.get("VmHWM", 0))
            if "VmRSS" in values:
                self.rss_kib.append(values["VmRSS"])
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self) -> dict[str, float]:
        mib = 1024.0
        peak_rss = max(self.rss_kib, default=0)
        return {
            "peak_mib": max(self.hwm_kib, peak_rss) / mib,
            "hwm_mib": self.hwm_kib / mib,
            "first_rss_mib": (self.rss_kib[0] if self.rss_kib else 0) / mib,
            "last_rss_mib": (self.rss_kib[-1] if self.rss_kib else 0) / mib,
            "samples": len(self.rss_kib),
        }
