"""rollouts: the live rollout engine's rollouts and their devices

Revision ID: 0008_rollouts
Revises: 0007_device_desired
Create Date: 2026-11-27

``rollouts`` holds one rollout (spec, release, planned waves, gate results, status, the
current wave); ``rollout_devices`` one row per selected device: its wave and position,
status (pending, targeted, succeeded, failed, timed_out, rolled_back, excluded), why, the
desired release it had before (what an abort sets back) and the event and telemetry sequence
numbers when it was targeted (only later ones count for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_rollouts"
down_revision: str | None = "0007_device_desired"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("spec", JSON_DOCUMENT, nullable=False),
        sa.Column("release", JSON_DOCUMENT, nullable=False),
        sa.Column("waves", JSON_DOCUMENT, nullable=False),
        sa.Column("gates", JSON_DOCUMENT, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wave_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.String(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
    )
    op.create_index("ix_rollouts_name", "rollouts", ["name"], unique=False)
    op.create_index("ix_rollouts_status", "rollouts", ["status"], unique=False)
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.String(length=1024), nullable=True),
        sa.Column("previous_release", JSON_DOCUMENT, nullable=True),
        sa.Column("previous_model", sa.String(length=128), nullable=True),
        sa.Column("event_seq", sa.BigInteger(), nullable=True),
        sa.Column("window_seq", sa.BigInteger(), nullable=True),
        sa.Column("outcome_seq", sa.BigInteger(), nullable=True),
        sa.Column("targeted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_devices"),
    )


def downgrade() -> None:
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollouts_status", table_name="rollouts")
    op.drop_index("ix_rollouts_name", table_name="rollouts")
    op.drop_table("rollouts")
