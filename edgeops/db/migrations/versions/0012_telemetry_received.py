"""telemetry received index: the newest windows of all models, read by the hub's metrics and
the API's telemetry summaries

Revision ID: 0012_telemetry_received
Revises: 0011_api_tokens
Create Date: 2026-11-28

``/metrics`` counts the windows received in the last minute, and ``GET
/api/v1/telemetry/summary`` reads the newest windows since a time; without this index both
scan the whole ``telemetry_windows`` table (the drift index leads with ``model_id``).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012_telemetry_received"
down_revision: str | None = "0011_api_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_telemetry_windows_received", "telemetry_windows", ["received_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_telemetry_windows_received", table_name="telemetry_windows")
