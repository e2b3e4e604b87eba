"""fleet: each device's desired twin, kept by the hub, and its version

Revision ID: 0007_device_desired
Revises: 0006_device_identity
Create Date: 2026-11-27

``devices.desired`` is the desired document the hub publishes, retained, on the device's
``desired`` topic: ``{"release": ..., "challenger": ..., "config": {...}}`` (see
docs/protocol.md). ``FleetService.set_desired`` merges a patch into it in one transaction and
bumps ``desired_version`` (0: nothing desired yet) whenever the document changes;
``desired_at`` is the hub time of that change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_device_desired"
down_revision: str | None = "0006_device_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # existing devices have nothing desired yet: an empty document at version 0
    op.add_column(
        "devices",
        sa.Column("desired", JSON_DOCUMENT, nullable=False, server_default=sa.text("'{}'")),
    )
    op.add_column(
        "devices",
        sa.Column("desired_version", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("devices", sa.Column("desired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_at")
        batch.drop_column("desired_version")
        batch.drop_column("desired")
