"""Gateway enrollments: the one-time code (its sha256 and expiry), the client
certificate issued for it (serial and end), the gateway's broker user, and revocation.

Expand-only: a new table, which older controllers never read.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "gateway_enrollments",
        sa.Column("gateway_id", sa.String(64), nullable=False),
        sa.Column("code_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("created_by", sa.String(128), server_default="", nullable=False),
        sa.Column("code_expires_at", _TS, nullable=False),
        sa.Column("enrolled_at", _TS, nullable=True),
        sa.Column("certificate_serial", sa.String(64), server_default="", nullable=False),
        sa.Column("certificate_expires_at", _TS, nullable=True),
        sa.Column("broker_user", sa.String(255), server_default="", nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("gateway_id", name="pk_gateway_enrollments"),
    )


def downgrade() -> None:
    op.drop_table("gateway_enrollments")
