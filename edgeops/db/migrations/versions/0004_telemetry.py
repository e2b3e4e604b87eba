"""monitor: telemetry windows, one row per (device, seq)

Revision ID: 0004_telemetry
Revises: 0003_registry
Create Date: 2026-11-27

A device numbers its telemetry windows with a persistent sequence; (device_id, seq) is the
primary key, so a window delivered twice is stored once (``INSERT ... ON CONFLICT DO
NOTHING``). The whole window document is kept in ``window``; model id, the window's device
times and its sample count are columns for queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_telemetry"
down_revision: str | None = "0003_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "telemetry_windows",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("start_ts", sa.Float(), nullable=False),
        sa.Column("end_ts", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("window", JSON_DOCUMENT, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "seq", name="pk_telemetry_windows"),
    )
    op.create_index(
        "ix_telemetry_windows_model_id", "telemetry_windows", ["model_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_telemetry_windows_model_id", table_name="telemetry_windows")
    op.drop_table("telemetry_windows")
