"""The service's clock. Lease expiry, heartbeats, worker liveness, scheduling locks and job
timestamps all read :func:`utcnow` from here, so that a test can move time
(:class:`ManualClock`, :func:`use`) instead of sleeping until a lease runs out.

Waiting itself (the lease long poll, the scheduler's interval) still runs on the
monotonic wall clock: it is how long a request is held, not when a lease ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta


def _system() -> datetime:
    return datetime.now(UTC)


_source: Callable[[], datetime] = _system


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return _source()


class ManualClock:
    """A clock that stands still until moved: ``advance(seconds)``."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or _system()

    def __call__(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        self._now += timedelta(seconds=seconds)
        return self._now


@contextmanager
def use(clock: Callable[[], datetime]) -> Iterator[Callable[[], datetime]]:
    """Make ``clock`` the source of :func:`utcnow` for every thread until the block ends."""
    global _source
    previous, _source = _source, clock
    try:
        yield clock
    finally:
        _source = previous
