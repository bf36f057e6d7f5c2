"""Operators' client certificates: the name each was issued to (never reused), its role,
the serial of the one certificate issued under that name, its end, and revocation.

Expand-only: a new table, which older controllers never read.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "operator_certificates",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("created_by", sa.String(128), server_default="", nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_operator_certificates"),
        sa.UniqueConstraint("serial", name="uq_operator_certificates_serial"),
    )


def downgrade() -> None:
    op.drop_table("operator_certificates")
