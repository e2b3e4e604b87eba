"""fleet: device events, one row per (device, seq), and each device's update state

Revision ID: 0005_device_events
Revises: 0004_telemetry
Create Date: 2026-11-27

An agent numbers its events with the persistent sequence of its offline buffer; (device_id,
seq) is the primary key, so an event delivered twice is stored once (``INSERT ... ON
CONFLICT DO NOTHING``). ``devices.update_state`` is the updater state named by the device's
newest ``update`` event, ``devices.update_seq`` that event's seq (an older event delivered
late changes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_device_events"
down_revision: str | None = "0004_telemetry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "device_events",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("detail", JSON_DOCUMENT, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "seq", name="pk_device_events"),
    )
    op.create_index("ix_device_events_event", "device_events", ["event"], unique=False)
    op.add_column("devices", sa.Column("update_state", sa.String(length=32), nullable=True))
    op.add_column("devices", sa.Column("update_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("update_seq")
        batch.drop_column("update_state")
    op.drop_index("ix_device_events_event", table_name="device_events")
    op.drop_table("device_events")
