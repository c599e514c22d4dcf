"""The per-target latency predictor: its observations and its fitted state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fitnas_predictor_observations",
        sa.Column("target_key", sa.String(64), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("target", sa.String(100), nullable=False),
        sa.Column("features", sa.Text(), nullable=False),
        sa.Column("ratio", sa.Float(), nullable=True),
        sa.Column("ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("target_key", "spec_hash",
                                name="pk_fitnas_predictor_observations"),
    )
    op.create_index("ix_fitnas_predictor_observations_target",
                    "fitnas_predictor_observations", ["target"])
    op.create_table(
        "fitnas_predictors",
        sa.Column("target_key", sa.String(64), nullable=False),
        sa.Column("target", sa.String(100), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("refit_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("target_key", name="pk_fitnas_predictors"),
    )
    op.create_index("ix_fitnas_predictors_target", "fitnas_predictors", ["target"])


def downgrade() -> None:
    op.drop_index("ix_fitnas_predictors_target", table_name="fitnas_predictors")
    op.drop_table("fitnas_predictors")
    op.drop_index("ix_fitnas_predictor_observations_target",
                  table_name="fitnas_predictor_observations")
    op.drop_table("fitnas_predictor_observations")
