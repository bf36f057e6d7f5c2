"""The broker users an admin allowed to publish management jobs (``upgradectl jobs
allow-publisher USER``), when and by whom.

Expand-only: a new table, which older controllers never read.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_publishers",
        sa.Column("broker_user", sa.String(255), nullable=False),
        sa.Column("allowed_at", _TS, nullable=False),
        sa.Column("allowed_by", sa.String(128), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("broker_user", name="pk_job_publishers"),
    )


def downgrade() -> None:
    op.drop_table("job_publishers")
