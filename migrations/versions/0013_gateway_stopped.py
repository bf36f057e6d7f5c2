"""Whether a gateway said it stops: its last message was a heartbeat marked ``stopping``
(a clean stop, not a handover), so it is OFFLINE at once rather than after three missed
heartbeats.

Expand-only: a column with a default, which older controllers never read.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateways") as batch:
        batch.add_column(
            sa.Column("stopped", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("gateways") as batch:
        batch.drop_column("stopped")
