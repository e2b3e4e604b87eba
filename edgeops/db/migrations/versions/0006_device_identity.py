"""fleet: device identities (broker credentials) and the operator's device tags

Revision ID: 0006_device_identity
Revises: 0005_device_events
Create Date: 2026-11-27

``edgeops devices enroll NAME --tags k=v`` creates the device row with its ``tags`` and a
``device_credentials`` row: the salted PBKDF2-SHA512 hash of the device's broker password (the
password is shown once and stored nowhere). Revoking sets ``revoked_at``; the row stays, so
the history is kept and the name can be enrolled again later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_device_identity"
down_revision: str | None = "0005_device_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # existing rows (devices known from their reports) get no tags
    op.add_column(
        "devices",
        sa.Column("tags", JSON_DOCUMENT, nullable=False, server_default=sa.text("'{}'")),
    )
    op.create_table(
        "device_credentials",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_device_credentials_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_credentials"),
    )


def downgrade() -> None:
    op.drop_table("device_credentials")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("tags")
