"""The controller's first schema: releases, gateways, jobs and their events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here rather than imported from the models: a revision is a snapshot and
# must not change when the models move on.
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("notes", sa.Text(), server_default="", nullable=False),
        sa.Column("published_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_releases"),
    )
    op.create_table(
        "gateways",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("first_seen", _TS, nullable=False),
        sa.Column("last_seen", _TS, nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("listen", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gateways"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("target_version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), server_default="cli", nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("deadline", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("request_id", name="uq_jobs_request_id"),
    )
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_table(
        "job_gateways",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("gateway_id", sa.String(64), nullable=False),
        sa.Column("command_id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("from_version", sa.String(64), nullable=False),
        sa.Column("to_version", sa.String(64), nullable=False),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_gateways_job_id_jobs"),
        sa.PrimaryKeyConstraint("job_id", "gateway_id", name="pk_job_gateways"),
        sa.UniqueConstraint("command_id", name="uq_job_gateways_command_id"),
    )
    op.create_index("ix_job_gateways_gateway_id", "job_gateways", ["gateway_id"])
    op.create_table(
        "job_events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("gateway_id", sa.String(64), nullable=True),
        sa.Column("gateway_state", sa.String(16), nullable=True),
        sa.Column("job_state", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_events_job_id_jobs"),
        sa.PrimaryKeyConstraint("seq", name="pk_job_events"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_events_job_id_seq", "job_events", ["job_id", "seq"])
    op.create_table(
        "seen_messages",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_seen_messages"),
    )
    op.create_index("ix_seen_messages_at", "seen_messages", ["at"])


def downgrade() -> None:
    for table in ("seen_messages", "job_events", "job_gateways", "jobs", "gateways", "releases"):
        op.drop_table(table)
