"""Upgrade paths and soaks: the lowest version a release upgrades from, each gateway's
path through intermediate releases in a job with the hop it is on, a job's soak period
after each swap, and each gateway's health as its soak reported it.

Expand-only: new columns whose defaults mean what a release and a job always did (any
version upgrades straight to the target), which older controllers never read.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("min_from", sa.String(64), nullable=True))
    with op.batch_alter_table("job_gateways") as batch:
        batch.add_column(sa.Column("path", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("hop", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("health", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("soak_s", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("soak_s")
    with op.batch_alter_table("job_gateways") as batch:
        batch.drop_column("health")
        batch.drop_column("hop")
        batch.drop_column("path")
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("min_from")
