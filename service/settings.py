"""Service configuration: environment variables prefixed ``FITNAS_``.

``get_settings()`` is cached; tests change the environment and call
``get_settings.cache_clear()``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from pydantic import Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.secrets import read_secret_file

DEFAULT_DATABASE_URL = "sqlite:///./fitnas.db"
# Optuna's studies live beside ours. With SQLite they get their own file: one file per
# writer keeps the scheduler's Optuna writes from queueing behind the API's writes. With
# PostgreSQL both may share one database (our tables are ``fitnas_``-prefixed and our
# Alembic version table is ``fitnas_alembic_version``; tests check they coexist).
DEFAULT_OPTUNA_SQLITE_URL = "sqlite:///./fitnas-optuna.db"


class FileVariables(PydanticBaseSettingsSource):
    """``FITNAS_<NAME>_FILE=/run/secrets/x`` sets ``FITNAS_<NAME>`` from the file, so that
    a password never has to be in the environment or on a command line. A plain
    ``FITNAS_<NAME>`` wins over its ``_FILE`` form."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        var = f"FITNAS_{field_name.upper()}_FILE"
        path = os.environ.get(var)
        if not path:
            return None, field_name, False
        return read_secret_file(var, path), field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(info, name)
            if value is not None:
                out[key] = value
        return out


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FITNAS_", extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, FileVariables(settings_cls), dotenv_settings,
                file_secret_settings)

    # ---- storage ----
    database_url: str = Field(DEFAULT_DATABASE_URL, description="fitnas tables (SQLAlchemy URL)")
    optuna_storage_url: str | None = Field(
        None,
        description="Optuna RDB storage; default: the database URL for PostgreSQL, "
        "'sqlite:///./fitnas-optuna.db' when the database is SQLite",
    )
    sqlite_busy_timeout_ms: int = Field(30_000, ge=0, le=600_000)
    db_pool_size: int = Field(10, ge=1, le=200)
    db_lock_retry_s: float = Field(60.0, ge=0, description="give up retrying a locked DB after")

    # ---- HTTP ----
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_require_auth: bool = Field(
        False, description="/metrics answers without auth unless this is set (then an API key)"
    )
    export_dir: str = Field("./fitnas-exports", description="on-demand export files")
    artifact_dir: str | None = Field(
        "./fitnas-artifacts", description="optuna-dashboard artifacts of finished jobs (each "
        "Pareto member's JSON, PyTorch and ONNX): give optuna-dashboard the same folder "
        "with --artifact-dir; empty: none")

    # ---- workers and leases ----
    lease_timeout_s: float = Field(60.0, gt=0, le=24 * 3600)
    heartbeat_interval_s: float = Field(10.0, gt=0, le=3600)
    worker_timeout_s: float = Field(
        45.0, gt=0, description="a worker is live while its last heartbeat is this recent"
    )
    max_attempts: int = Field(3, ge=1, le=100)
    max_lease_wait_s: float = Field(30.0, ge=0, le=300)
    lease_poll_interval_s: float = Field(0.25, gt=0, le=10)

    # ---- scheduler ----
    scheduler_enabled: bool = True
    scheduler_interval_s: float = Field(1.0, gt=0, le=600)
    # Short on purpose: the lock is renewed every third of it while its replica drives
    # the job, so another replica takes over a dead replica's job within this time.
    scheduler_lock_s: float = Field(10.0, gt=0, description="per-job scheduling lock lease")
    scheduler_max_asks_per_tick: int = Field(200, ge=1)

    # ---- limits ----
    max_trials: int = Field(10_000, ge=1)
    max_parallelism: int = Field(64, ge=1)
    max_page_size: int = Field(500, ge=1)
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, le=64 * 2**20,
        description="largest request body (413 above it, before it is read)")
    max_job_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 2**20,
        description="largest POST /v1/jobs body (a job with an inline design space)")
    max_result_body_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 2**20,
        description="largest worker result or failure report")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_interval_s >= self.lease_timeout_s:
            raise ValueError(
                f"FITNAS_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s}) must be shorter "
                f"than FITNAS_LEASE_TIMEOUT_S ({self.lease_timeout_s})"
            )
        if self.worker_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"FITNAS_WORKER_TIMEOUT_S ({self.worker_timeout_s}) must be longer than "
                f"FITNAS_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s})"
            )
        return self

    @property
    def optuna_url(self) -> str:
        if self.optuna_storage_url:
            return self.optuna_storage_url
        if self.database_url.startswith("sqlite"):
            if self.database_url == DEFAULT_DATABASE_URL:
                return DEFAULT_OPTUNA_SQLITE_URL
            # sqlite:///path/to/x.db -> sqlite:///path/to/x-optuna.db
            base = self.database_url
            if base.endswith(".db"):
                return base[: -len(".db")] + "-optuna.db"
            return base + "-optuna"
        return self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
