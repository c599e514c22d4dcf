"""Worker tokens have a role (latency or trainer) and tasks a kind (latency or quality):
trainers lease the training of candidates that the latency workers found within budget.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fitnas_worker_tokens") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=False,
                                   server_default="latency"))
    with op.batch_alter_table("fitnas_tasks") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False,
                                   server_default="latency"))
        batch.drop_constraint("uq_fitnas_tasks_job_id_trial_number", type_="unique")
        batch.create_unique_constraint("uq_fitnas_tasks_job_id_trial_number_kind",
                                       ["job_id", "trial_number", "kind"])


def downgrade() -> None:
    with op.batch_alter_table("fitnas_tasks") as batch:
        batch.drop_constraint("uq_fitnas_tasks_job_id_trial_number_kind", type_="unique")
        batch.create_unique_constraint("uq_fitnas_tasks_job_id_trial_number",
                                       ["job_id", "trial_number"])
        batch.drop_column("kind")
    with op.batch_alter_table("fitnas_worker_tokens") as batch:
        batch.drop_column("role")
