"""Whether a job's operator allowed a downgrade, carried in each command so a gateway can
refuse one that would take it back to an older version than it runs by then; and when each
command was confirmed published, so a dispatch cut short is finished later.

Expand-only: new columns with defaults, which older controllers never read.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("allow_downgrade", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("job_gateways") as batch:
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_gateways") as batch:
        batch.drop_column("published_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("allow_downgrade")
