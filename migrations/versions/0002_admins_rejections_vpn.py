"""Admins, rejected management jobs, release flags and VPN session counts.

Expand-only: new tables, and new columns with server defaults, so a controller of the
previous release keeps working on this schema.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "admins",
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("added_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("email", name="pk_admins"),
    )
    op.create_table(
        "rejected_jobs",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("user_id", sa.String(128), server_default="", nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_rejected_jobs"),
    )
    op.create_index("ix_rejected_jobs_at", "rejected_jobs", ["at"])
    with op.batch_alter_table("releases") as batch:
        batch.add_column(
            sa.Column(
                "restarts_vpn_service", sa.Boolean(), server_default=sa.false(), nullable=False
            )
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("requested_by", sa.String(128), server_default="", nullable=False)
        )
    with op.batch_alter_table("gateways") as batch:
        batch.add_column(
            sa.Column("vpn_sessions", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("job_gateways") as batch:
        batch.add_column(
            sa.Column("vpn_sessions_dropped", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    for table, column in (
        ("job_gateways", "vpn_sessions_dropped"),
        ("gateways", "vpn_sessions"),
        ("jobs", "requested_by"),
        ("releases", "restarts_vpn_service"),
    ):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
    op.drop_index("ix_rejected_jobs_at", "rejected_jobs")
    op.drop_table("rejected_jobs")
    op.drop_table("admins")
