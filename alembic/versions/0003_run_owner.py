"""ingestion run owner: the host and process id that started each run, so runs of dead processes can be marked crashed

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain nullable ADD COLUMNs on both databases: no table rebuild (ingestion_runs is referenced).
    op.add_column("ingestion_runs", sa.Column("host", sa.String(length=255), nullable=True))
    op.add_column("ingestion_runs", sa.Column("pid", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("ingestion_runs", "pid")
    op.drop_column("ingestion_runs", "host")
