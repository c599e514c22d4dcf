"""Tasks remember the leases that expired on them, so that a worker cut off by an outage
longer than its lease can still deliver its finished result (or resume its lease).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fitnas_tasks") as batch:
        batch.add_column(sa.Column("expired_leases", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fitnas_tasks") as batch:
        batch.drop_column("expired_leases")
