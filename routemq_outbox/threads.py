"""Threads for plain ``def`` job code (``handle()`` and ``failed()``), apart from asyncio's.

asyncio's default executor is shared with everything else on the loop, has a fixed number of
threads, and is joined at exit. Job code needs the opposite: a call that hangs (a socket read
without a timeout) must neither starve the calls after it nor keep the process alive once the
worker has stopped, and an attempt's timeout must count from the moment its code starts, not
from when it was queued. So every call gets a thread at once: an idle one if there is one, else
a new one; the threads are daemons, and one that is idle for a while ends.

The number of threads busy at once is bounded by the worker's slots, plus the calls that never
returned (which :attr:`ThreadRunner.hung` counts, for the worker to report).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadRunner"]

_IDLE_SECONDS = 30.0  # an idle thread ends after this long


class _Call:
    __slots__ = ("function", "future", "loop")

    def __init__(
        self,
        function: Callable[[], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.function = function
        self.future = future
        self.loop = loop


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting attempt was cancelled (its timeout, or shutdown)
        return
    if error is None:
        future.set_result(result)
    else:
        # A BaseException (SystemExit, KeyboardInterrupt) raised by job code goes back as a
        # value and is raised by the awaiting coroutine, where run() judges it like any other.
        future.set_result(_Raised(error))


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ThreadRunner:
    """Runs blocking callables in daemon threads, one call per thread at a time."""

    def __init__(self, name: str = "routemq-outbox job") -> None:
        self._name = name
        self._idle: list[queue.SimpleQueue[_Call | None]] = []
        self._lock = threading.Lock()
        self._busy = 0
        self._count = 0

    @property
    def busy(self) -> int:
        """Threads running a call now (those whose caller gave up included)."""
        return self._busy

    async def run(self, function: Callable[[], Any]) -> Any:
        """Call ``function()`` in a thread and return its result (or raise its exception).

        Cancelling the awaiting task stops the wait at once; the thread runs on until the call
        returns (Python cannot stop a thread), and its result is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submit(_Call(function, future, loop))
        result = await future
        if isinstance(result, _Raised):
            raise result.error
        return result

    def _submit(self, call: _Call) -> None:
        with self._lock:
            self._busy += 1
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                self._count += 1
                number = self._count
        if inbox is not None:
            inbox.put(call)
            return
        inbox = queue.SimpleQueue()
        inbox.put(call)
        thread = threading.Thread(
            target=self._serve, args=(inbox,), name=f"{self._name} {number}", daemon=True
        )
        thread.start()

    def _serve(self, inbox: queue.SimpleQueue[_Call | None]) -> None:
        while True:
            try:
                call = inbox.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                # A call was handed to this thread just as it timed out: serve it.
                call = inbox.get()
            if call is None:
                return
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.function()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                call.loop.call_soon_threadsafe(_settle, call.future, result, error)
            del call, result, error
            with self._lock:
                self._busy -= 1
                self._idle.append(inbox)
