"""Shared fixtures for the service tests.

* ``db_url``: a fresh, empty database per test module, parametrized over SQLite (a temp
  file) and PostgreSQL (a uniquely named database made through
  ``FITNAS_TEST_POSTGRES_URL`` and dropped afterwards; skipped when that is unset).
* ``migrated_url``: the same, upgraded to the current schema.
* ``make_settings``: Settings for the test database (scheduler off, fast timings).
* ``client``: a TestClient of ``create_app()``; helpers to make keys and worker tokens.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator

import pytest

with warnings.catch_warnings():
    # starlette's TestClient warns about httpx once, at import; nothing to act on here
    warnings.simplefilter("ignore")
    import fastapi.testclient  # noqa: F401

PG_URL = os.environ.get("FITNAS_TEST_POSTGRES_URL")
PG_SKIP = "FITNAS_TEST_POSTGRES_URL is not set"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _pg_admin_engine():
    from sqlalchemy import create_engine, pool

    return create_engine(PG_URL, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")


def create_pg_database() -> str:
    """A new, empty PostgreSQL database; returns its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"fitnas_test_{uuid.uuid4().hex[:12]}"
    engine = _pg_admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            # a throwaway database needs no fsync per commit (Optuna commits a lot)
            conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit TO off'))
    finally:
        engine.dispose()
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from service.studies import forget_storage

    forget_storage(url)
    name = make_url(url).database
    engine = _pg_admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def _fresh_db(kind: str, tmp_path_factory) -> Iterator[str]:
    if kind == "sqlite":
        folder = tmp_path_factory.mktemp("db")
        url = f"sqlite:///{folder}/fitnas.db"
        yield url
        from service.studies import forget_storage

        forget_storage(f"sqlite:///{folder}/fitnas-optuna.db")
        return
    if not PG_URL:
        pytest.skip(PG_SKIP)
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="module", params=BACKENDS)
def db_url(request, tmp_path_factory) -> Iterator[str]:
    yield from _fresh_db(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def migrated_url(db_url) -> str:
    import migrations

    migrations.upgrade(db_url)
    return db_url


def optuna_url_for(db_url: str) -> str:
    """SQLite: a separate file beside the database; PostgreSQL: the same database (which
    proves that Optuna's tables and ours coexist)."""
    if db_url.startswith("sqlite:///"):
        return db_url[: -len(".db")] + "-optuna.db"
    return db_url


@pytest.fixture
def make_settings(migrated_url, tmp_path):
    from service.settings import Settings

    def make(**overrides):
        values = {
            "database_url": migrated_url,
            "optuna_storage_url": optuna_url_for(migrated_url),
            "scheduler_enabled": False,
            "scheduler_interval_s": 0.1,
            "lease_timeout_s": 30.0,
            "heartbeat_interval_s": 5.0,
            "worker_timeout_s": 30.0,
            "max_attempts": 3,
            "lease_poll_interval_s": 0.05,
            "export_dir": str(tmp_path / "exports"),
            "artifact_dir": str(tmp_path / "artifacts"),
            "db_pool_size": 5,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings):
    return make_settings()


def _finish_active_jobs(db) -> None:
    """Tests share a module database: leave no job for the next test's scheduler."""
    from sqlalchemy import update

    from service.db import utcnow
    from service.models import Job, Task

    def op(s):
        now = utcnow()
        s.execute(
            update(Task).where(Task.state.in_(("queued", "leased")))
            .values(state="cancelled", told_at=now)
        )
        s.execute(
            update(Job).where(Job.status.in_(("queued", "running")))
            .values(status="cancelled", finished_at=now, finalized_at=now)
        )
        s.execute(
            update(Job).where(Job.status == "cancelled", Job.finalized_at.is_(None))
            .values(finalized_at=now)
        )

    db.run(op)


@pytest.fixture
def app(settings):
    from service.api.app import create_app

    return create_app(settings)


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c
        _finish_active_jobs(app.state.db)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def user_key(app):
    """(owner, headers) for a new user."""
    from service.tokens import create_api_key

    owner = unique("user")
    token, _ = create_api_key(app.state.db, owner)
    return owner, {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_worker_token(app):
    from service.tokens import create_worker_token

    def make(target: str | None = None, role: str = "latency") -> tuple[str, dict[str, str]]:
        target = target or unique("t")
        token, _ = create_worker_token(app.state.db, target, role=role)
        return target, {"Authorization": f"Bearer {token}"}

    return make
