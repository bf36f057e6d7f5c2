"""Each gateway's heartbeat interval, as its newest hello announced it, so OFFLINE is
judged against that gateway's own interval.

Expand-only: a nullable column, which older controllers never read (NULL: the gateway
announced none, and the default interval applies).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateways") as batch:
        batch.add_column(sa.Column("heartbeat_interval_ms", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gateways") as batch:
        batch.drop_column("heartbeat_interval_ms")
