"""Keeps one task's lease alive while it is evaluated (a heartbeat thread)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from service.worker.client import (
    ApiClient,
    ApiUnavailable,
    Backoff,
    LeaseLost,
    ProtocolError,
    Unauthorized,
)

log = logging.getLogger("fitnas.worker")


class LeaseKeeper(threading.Thread):
    """Heartbeats one task's lease every ``interval_s`` until stopped. A 409 sets
    ``lost``; an unreachable API is retried sooner (the lease may still be alive).

    Reports on the same lease go through :meth:`exclusive`, so that a heartbeat never
    races the final report (a heartbeat answered after the result was accepted would
    read as a lost lease)."""

    def __init__(
        self,
        api: ApiClient,
        task_id: str,
        lease_token: str,
        interval_s: float,
        lost: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"lease-{task_id}", daemon=True)
        self.api, self.task_id, self.lease_token = api, task_id, lease_token
        self.interval_s = max(0.05, float(interval_s))
        self.lost = lost or threading.Event()
        self.beats = 0
        self.errors = 0
        self.last_ok = time.monotonic()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold off heartbeats while the caller reports on this lease."""
        with self._lock:
            yield

    def finish(self) -> None:
        """The lease is over (reported, released or lost): no more heartbeats."""
        self._stop_event.set()

    def run(self) -> None:
        backoff = Backoff(base=min(0.5, self.interval_s / 4), cap=max(0.05, self.interval_s / 2))
        delay = self.interval_s
        while not self._stop_event.wait(delay):
            try:
                with self._lock:
                    if self._stop_event.is_set():
                        return
                    self.api.heartbeat(self.task_id, self.lease_token)
            except LeaseLost as exc:
                log.warning("task %s: lease lost (%s); dropping it", self.task_id, exc)
                self.lost.set()
                return
            except Unauthorized as exc:
                log.error("task %s: heartbeat refused (%s); dropping it", self.task_id, exc)
                self.lost.set()
                return
            except (ApiUnavailable, ProtocolError, ValueError) as exc:
                self.errors += 1
                delay = backoff.next()
                log.warning(
                    "task %s: heartbeat failed (%s); %.0f s since the last good one; "
                    "retrying in %.1f s", self.task_id, exc,
                    time.monotonic() - self.last_ok, delay,
                )
                continue
            self.beats += 1
            self.last_ok = time.monotonic()
            log.debug("task %s: lease extended (heartbeat %d)", self.task_id, self.beats)
            backoff.reset()
            delay = self.interval_s

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
