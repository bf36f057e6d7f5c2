"""Rollouts: a job's waves, cap on gateways in flight, failure limit, its pending ending
(ABORTED or CANCELLED while gateways in flight finish), why it stopped, and when its
gateways may start; each gateway's wave; each gateway's high-availability peer and
whether it answers pre-checks.

Expand-only: new columns with defaults that mean what a job always did (one wave, no cap,
no limit), which older controllers never read.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("waves", sa.String(200), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("max_parallel", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("max_failures", sa.String(16), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("ending", sa.String(16), nullable=True))
        batch.add_column(sa.Column("stop_reason", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("not_before", _TS, nullable=True))
        batch.add_column(sa.Column("not_after", _TS, nullable=True))
        batch.add_column(sa.Column("window", sa.String(64), nullable=False, server_default=""))
    with op.batch_alter_table("job_gateways") as batch:
        batch.add_column(sa.Column("wave", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("gateways") as batch:
        batch.add_column(sa.Column("ha_peer", sa.String(64), nullable=True))
        batch.add_column(
            sa.Column("prechecks", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("gateways") as batch:
        batch.drop_column("prechecks")
        batch.drop_column("ha_peer")
    with op.batch_alter_table("job_gateways") as batch:
        batch.drop_column("wave")
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "window", "not_after", "not_before",
            "stop_reason", "ending", "max_failures", "max_parallel", "waves",
        ):  # fmt: skip
            batch.drop_column(column)
