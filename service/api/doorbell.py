"""Wakes this process's waiting long polls when its scheduler queues a task.

A worker's ``POST /v1/tasks/lease`` waits for a task by reading the task table every
``lease_poll_interval_s``. When the scheduler of the same process has just queued one,
that wait is pure latency on every candidate (a result arrives, the tick tells it and
queues the next task, and the worker that is waiting finds it up to a poll interval
later). The scheduler rings the doorbell after a tick that queued tasks; every long poll
of this process waiting at that moment re-reads at once. Polls served by other replicas
still find the task at their next read: the doorbell is a shortcut, never the only way.

:meth:`Doorbell.ring` is thread-safe (the scheduler ticks in a worker thread);
:meth:`Doorbell.wait` runs on the API's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class Doorbell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self.rings = 0

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True when the doorbell rang meanwhile."""
        with self._lock:
            loop = asyncio.get_running_loop()
            if self._loop is not loop or self._event is None:
                self._loop, self._event = loop, asyncio.Event()
            event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
            return True
        return False

    def ring(self) -> None:
        """Wake every poll waiting now (from any thread)."""
        with self._lock:
            self.rings += 1
            loop, event = self._loop, self._event
            self._event = None  # the next waiter waits on a new event
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(event.set)
