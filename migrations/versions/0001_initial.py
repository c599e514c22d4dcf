"""Initial schema: API keys, targets, worker tokens, workers, jobs, tasks, measurements.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk_target(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["target"], ["fitnas_targets.name"], name=f"fk_{table}_target_fitnas_targets"
    )


def upgrade() -> None:
    op.create_table(
        "fitnas_api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_fitnas_api_keys"),
        sa.UniqueConstraint("token_hash", name="uq_fitnas_api_keys_token_hash"),
    )
    op.create_index("ix_fitnas_api_keys_owner", "fitnas_api_keys", ["owner"])

    op.create_table(
        "fitnas_measurements",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=True),
        sa.Column("runtime", sa.String(32), nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("source_job_id", sa.String(32), nullable=True),
        sa.Column("hits", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("key", name="pk_fitnas_measurements"),
    )
    op.create_index("ix_fitnas_measurements_spec_hash", "fitnas_measurements", ["spec_hash"])
    op.create_index("ix_fitnas_measurements_target", "fitnas_measurements", ["target"])

    op.create_table(
        "fitnas_targets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_fitnas_targets"),
    )

    op.create_table(
        "fitnas_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("trials", sa.Integer(), nullable=False),
        sa.Column("parallelism", sa.Integer(), nullable=False),
        sa.Column("study_name", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("best", sa.JSON(), nullable=True),
        sa.Column("pareto", sa.JSON(), nullable=True),
        sa.Column("winner", sa.JSON(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("finalized_at", nullable=True),
        sa.Column("lock_owner", sa.String(200), nullable=True),
        _ts("lock_expires_at", nullable=True),
        _fk_target("fitnas_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_fitnas_jobs"),
        sa.UniqueConstraint(
            "owner", "idempotency_key", name="uq_fitnas_jobs_owner_idempotency_key"
        ),
        sa.UniqueConstraint("study_name", name="uq_fitnas_jobs_study_name"),
    )
    op.create_index("ix_fitnas_jobs_owner_created_at", "fitnas_jobs", ["owner", "created_at"])
    op.create_index("ix_fitnas_jobs_status", "fitnas_jobs", ["status"])

    op.create_table(
        "fitnas_worker_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        _fk_target("fitnas_worker_tokens"),
        sa.PrimaryKeyConstraint("id", name="pk_fitnas_worker_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_fitnas_worker_tokens_token_hash"),
    )
    op.create_index("ix_fitnas_worker_tokens_target", "fitnas_worker_tokens", ["target"])

    op.create_table(
        "fitnas_tasks",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("task", sa.JSON(), nullable=False),
        sa.Column("cache_key", sa.String(64), nullable=False),
        sa.Column("attempts_used", sa.Integer(), nullable=False),
        sa.Column("lease_token_hash", sa.String(64), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("worker_id", sa.String(32), nullable=True),
        _ts("created_at"),
        _ts("leased_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("last_error", sa.JSON(), nullable=True),
        _ts("told_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["fitnas_jobs.id"],
            name="fk_fitnas_tasks_job_id_fitnas_jobs",
            ondelete="CASCADE",
        ),
        _fk_target("fitnas_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_fitnas_tasks"),
        sa.UniqueConstraint("job_id", "trial_number", name="uq_fitnas_tasks_job_id_trial_number"),
    )
    op.create_index("ix_fitnas_tasks_job_id_state", "fitnas_tasks", ["job_id", "state"])
    op.create_index(
        "ix_fitnas_tasks_state_lease_expires_at", "fitnas_tasks", ["state", "lease_expires_at"]
    )
    op.create_index(
        "ix_fitnas_tasks_target_state_created_at",
        "fitnas_tasks",
        ["target", "state", "created_at"],
    )

    op.create_table(
        "fitnas_workers",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("runtimes", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.JSON(), nullable=False),
        _ts("registered_at"),
        _ts("last_heartbeat_at"),
        _fk_target("fitnas_workers"),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["fitnas_worker_tokens.id"],
            name="fk_fitnas_workers_token_id_fitnas_worker_tokens",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_fitnas_workers"),
        sa.UniqueConstraint("token_id", "name", name="uq_fitnas_workers_token_id_name"),
    )
    op.create_index("ix_fitnas_workers_target", "fitnas_workers", ["target"])


def downgrade() -> None:
    op.drop_table("fitnas_workers")
    op.drop_table("fitnas_tasks")
    op.drop_table("fitnas_worker_tokens")
    op.drop_table("fitnas_jobs")
    op.drop_table("fitnas_targets")
    op.drop_table("fitnas_measurements")
    op.drop_table("fitnas_api_keys")
