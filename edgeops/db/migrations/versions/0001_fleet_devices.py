"""fleet: the devices table, one row per device twin

Revision ID: 0001
Revises:
Create Date: 2025-11-27

A device row is created by the first state report or presence message of that device.
``state_ts`` and ``presence_ts`` hold the device's own timestamp of the last applied
message of each kind, so older (re)deliveries can be recognised and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON object: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("agent_version", sa.String(), nullable=True),
        sa.Column("hardware", JSON_DOCUMENT, nullable=False),
        sa.Column("reported", JSON_DOCUMENT, nullable=False),
        sa.Column("state_ts", sa.Float(), nullable=True),
        sa.Column("presence_ts", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )


def downgrade() -> None:
    op.drop_table("devices")
