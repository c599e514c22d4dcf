"""Stop signals of the worker program, caught from its first line of Python to its exit.

``docker stop`` (and a test harness) sends SIGTERM whenever it likes: while the
interpreter is still importing the command line, between tasks, or when the worker is
already on its way out. Python's default for SIGTERM kills the process (exit -15) with
its lease still held, so the worker program installs :func:`install` before anything
heavy is imported (``service/cli/__init__.py``) and keeps it until the process ends.

A signal that arrives while no worker listens (start-up, shutdown) is recorded; the
worker's main loop takes them over with :func:`listen`, which first replays what was
recorded. Import-light on purpose: the standard library only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pending: list[int] = []
_listener: Callable[[int, Any], None] | None = None
_installed = False


def _handle(signum: int, frame: Any) -> None:
    if _listener is not None:
        _listener(signum, frame)
    else:
        _pending.append(signum)


def install() -> None:
    """Catch SIGTERM and SIGINT for the rest of this process (main thread only): for a
    program whose work ends with the worker's loop (``fitnas worker``)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)
    _installed = True


def installed() -> bool:
    return _installed


def pending() -> list[int]:
    """The signals recorded while nobody listened (oldest first)."""
    return list(_pending)


@contextlib.contextmanager
def listen(callback: Callable[[int, Any], None]) -> Iterator[None]:
    """Route stop signals to ``callback`` inside the block, replaying those recorded
    before it. Installs the handlers if the program has not (a worker run from Python);
    then the previous handlers come back at the end. Otherwise the program is on its way
    out: the signals are ignored from then on, because the interpreter's finalization
    would put back the default action (death by SIGTERM) of a handler that stayed."""
    global _listener, _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    own = not _installed
    old = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if own else {}
    if own:
        install()
    _listener = callback
    try:
        while _pending:
            callback(_pending.pop(0), None)
        yield
    finally:
        _listener = None
        if own:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            _installed = False
        else:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
