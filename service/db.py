"""Engine, sessions and the one place that retries a busy database.

SQLite (the embedded default) is made safe for several concurrent writers:

* WAL journal (readers never block the writer), ``synchronous=NORMAL``, a generous
  ``busy_timeout`` and foreign keys on, set on every new connection;
* write transactions start with ``BEGIN IMMEDIATE``: they take the write lock up front,
  so a transaction never has to upgrade a read snapshot to a write lock (the case the
  busy handler cannot wait out, which surfaces as "database is locked");
* :meth:`Database.run` retries a whole transaction when the database still reports
  locked/busy (or, on PostgreSQL, a deadlock or serialization failure), with jittered
  backoff, so no such error reaches a client.

Every transaction here is short: the scheduler does its Optuna work between our
transactions, never inside one.
"""

from __future__ import annotations

import contextvars
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow as utcnow  # the service's clock seam, re-exported

log = logging.getLogger("fitnas.db")

T = TypeVar("T")

_IMMEDIATE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fitnas_sqlite_immediate", default=False
)

_LOCKED_MESSAGES = ("database is locked", "database is busy", "database table is locked")
_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def new_id() -> str:
    """A short random row id (64 bits, hex)."""
    return secrets.token_hex(8)


class DatabaseConfigError(ValueError):
    """The database URL cannot work (one line, meant for a person)."""


def is_retryable(exc: BaseException) -> bool:
    """A transient lock/busy/deadlock error: the transaction can simply run again."""
    if isinstance(exc, OperationalError):
        msg = str(exc.orig if exc.orig is not None else exc).lower()
        if any(m in msg for m in _LOCKED_MESSAGES):
            return True
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if sqlstate in _RETRY_SQLSTATES:
            return True
    return False


def error_status(exc: DBAPIError) -> int:
    """The HTTP status for a database error: 503 (retry later) only when the database is
    unreachable or unavailable; 422 when the request's data does not fit a column (SQL
    state class 22), 409 for a constraint (class 23); 500 for anything else (a bug)."""
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                   or "")
    if sqlstate.startswith("22") or isinstance(exc, DataError):
        return 422
    if sqlstate.startswith("23") or isinstance(exc, IntegrityError):
        return 409
    if (exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
            or sqlstate.startswith(("08", "53", "57", "40"))):
        return 503
    return 500


def _sqlite_setup(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
        # Take transaction control away from the sqlite3 module: we emit BEGIN ourselves.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if _IMMEDIATE.get() else "BEGIN")


def make_engine(url: str, *, busy_timeout_ms: int = 30_000, pool_size: int = 10) -> Engine:
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise DatabaseConfigError(f"cannot parse database URL {url!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise DatabaseConfigError(
                "an in-memory SQLite database cannot be shared by the API, scheduler and "
                "CLI; use a file, e.g. sqlite:///./fitnas.db"
            )
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
            pool_size=pool_size,
            max_overflow=2 * pool_size,
            pool_pre_ping=False,
        )
        _sqlite_setup(engine, busy_timeout_ms)
        return engine
    return create_engine(
        parsed, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True
    )


class Database:
    """An engine plus a session factory; :meth:`run` is how everything talks to it."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_ms: int = 30_000,
        pool_size: int = 10,
        retry_for_s: float = 60.0,
    ) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms=busy_timeout_ms, pool_size=pool_size)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.retry_for_s = retry_for_s
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=True)
        self.retries = 0  # transactions re-run after a transient lock error (for tests/metrics)

    @classmethod
    def from_settings(cls, settings) -> Database:
        return cls(
            settings.database_url,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            pool_size=settings.db_pool_size,
            retry_for_s=settings.db_lock_retry_s,
        )

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error. No retry here: use
        :meth:`run` for anything a client waits on."""
        token = _IMMEDIATE.set(write and self.is_sqlite)
        try:
            with self._sessions() as s:
                try:
                    yield s
                    s.commit()
                except BaseException:
                    s.rollback()
                    raise
        finally:
            _IMMEDIATE.reset(token)

    def run(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        """Run ``fn(session)`` in one transaction, re-running it on a transient lock,
        busy, deadlock or serialization error. ``fn`` must touch nothing but the DB."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.02
        while True:
            try:
                with self.session(write=write) as s:
                    return fn(s)
            except DBAPIError as exc:
                if not is_retryable(exc) or time.monotonic() >= deadline:
                    raise
                self.retries += 1
                log.debug("transient database error, retrying: %s", exc.orig)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def json_safe(obj: Any) -> Any:
    """Round-trip through JSON-able types (datetimes to ISO strings)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj
