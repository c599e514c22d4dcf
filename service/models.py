"""SQLAlchemy models. Every table is ``fitnas_``-prefixed so Optuna's unprefixed tables
(and its ``alembic_version``) can live in the same database; our Alembic version table is
``fitnas_alembic_version``.

A job's ``status`` and a task's ``state`` hold the values of ``JobStatus`` and
``TaskState``; their state machines are described in ``service/states.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service import clock
from service.states import JobStatus, TaskKind, TaskState, WorkerRole

PREFIX = "fitnas_"
VERSION_TABLE = "fitnas_alembic_version"


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now() -> datetime:
    return clock.utcnow()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    """A user's bearer key. Keys made with the same name belong to the same user
    (``owner``), so a key can be rotated without losing the jobs."""

    __tablename__ = "fitnas_api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Target(Base):
    """A named device class (e.g. ``cpu-x86-4t``, ``jetson-orin``): the workers that serve
    it are interchangeable for measurement."""

    __tablename__ = "fitnas_targets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=_now)


class WorkerToken(Base):
    __tablename__ = "fitnas_worker_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    target: Mapped[str] = mapped_column(ForeignKey("fitnas_targets.name"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    role: Mapped[str] = mapped_column(String(16), default=WorkerRole.LATENCY,
                                      server_default=WorkerRole.LATENCY.value)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Worker(Base):
    __tablename__ = "fitnas_workers"
    __table_args__ = (UniqueConstraint("token_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    target: Mapped[str] = mapped_column(ForeignKey("fitnas_targets.name"), index=True)
    token_id: Mapped[str] = mapped_column(ForeignKey("fitnas_worker_tokens.id"))
    name: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(64), default="cpu")
    runtimes: Mapped[list[Any]] = mapped_column(default=list)
    fingerprint: Mapped[dict[str, Any]] = mapped_column(default=dict)
    registered_at: Mapped[datetime] = mapped_column(default=_now)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=_now)


class Job(Base):
    __tablename__ = "fitnas_jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index("ix_fitnas_jobs_owner_created_at", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    target: Mapped[str] = mapped_column(ForeignKey("fitnas_targets.name"))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    config: Mapped[dict[str, Any]] = mapped_column()
    trials: Mapped[int] = mapped_column(Integer)
    parallelism: Mapped[int] = mapped_column(Integer)
    study_name: Mapped[str] = mapped_column(String(200), unique=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    pareto: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    winner: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    finalized_at: Mapped[datetime | None] = mapped_column(default=None)
    lock_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lock_expires_at: Mapped[datetime | None] = mapped_column(default=None)


class Task(Base):
    """One measurement of one trial (``kind`` latency), or its training (``kind``
    quality, queued once the latency met every budget): what a worker leases."""

    __tablename__ = "fitnas_tasks"
    __table_args__ = (
        UniqueConstraint("job_id", "trial_number", "kind"),
        Index("ix_fitnas_tasks_target_state_created_at", "target", "state", "created_at"),
        Index("ix_fitnas_tasks_state_lease_expires_at", "state", "lease_expires_at"),
        Index("ix_fitnas_tasks_job_id_state", "job_id", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fitnas_jobs.id", ondelete="CASCADE"))
    trial_number: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(ForeignKey("fitnas_targets.name"))
    kind: Mapped[str] = mapped_column(String(16), default=TaskKind.LATENCY,
                                      server_default=TaskKind.LATENCY.value)
    runtime: Mapped[str] = mapped_column(String(32), default="eager")
    state: Mapped[str] = mapped_column(String(16), default=TaskState.QUEUED)
    task: Mapped[dict[str, Any]] = mapped_column()
    cache_key: Mapped[str] = mapped_column(String(64))
    attempts_used: Mapped[int] = mapped_column(Integer, default=0)
    lease_token_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # token hashes of leases that expired on this task (service/leases.py: a late result)
    expired_leases: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    worker_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    leased_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    told_at: Mapped[datetime | None] = mapped_column(default=None)


class Measurement(Base):
    """The measurement cache shared by every job: key = MeasureSettings.key(spec hash,
    target) (spec, target, device, runtime, input shape, batch, dtype, layout, threads,
    reference)."""

    __tablename__ = "fitnas_measurements"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(64), index=True)
    spec_hash: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    runtime: Mapped[str | None] = mapped_column(String(32), default=None)
    outcome: Mapped[dict[str, Any]] = mapped_column()
    source_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class PredictorObservation(Base):
    """What the per-target latency predictor learned from (search/predictor.py owns the
    layout): one measured spec per target key (target + measurement settings)."""

    __tablename__ = "fitnas_predictor_observations"

    target_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(100), index=True)
    features: Mapped[str] = mapped_column(Text)
    ratio: Mapped[float | None] = mapped_column(Float, default=None)
    ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class PredictorStateRow(Base):
    """The fitted predictor of one target key and its bookkeeping (JSON)."""

    __tablename__ = "fitnas_predictors"

    target_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(100), index=True)
    n: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text)
    refit_at: Mapped[float | None] = mapped_column(Float, default=None)
