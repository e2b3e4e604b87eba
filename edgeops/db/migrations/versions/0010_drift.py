"""drift: policies per model, every evaluation of a release and cohort, and an index for them

Revision ID: 0010_drift
Revises: 0009_pipelines
Create Date: 2026-11-27

``drift_policies`` says how one model's releases are watched (cohort tag, evaluation window,
the detector's configuration) and what happens on drift (none, notify, retrain, with the
continuous-training parameters);
``drift_evaluations`` keeps every evaluation with its report, and marks with ``onset`` the
first drift verdict after one that was not: the drift events, with the action taken. The
evaluations read one model's telemetry windows by time received, hence the new index.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010_drift"
down_revision: str | None = "0009_pipelines"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "drift_policies",
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("webhook_url", sa.String(length=2048), nullable=True),
        sa.Column("cohort_tag", sa.String(length=63), nullable=True),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("config", JSON_DOCUMENT, nullable=False),
        sa.Column("retrain", JSON_DOCUMENT, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_name", name="pk_drift_policies"),
    )
    op.create_table(
        "drift_evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("cohort", sa.String(length=128), nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("onset", sa.Boolean(), nullable=False),
        sa.Column("report", JSON_DOCUMENT, nullable=False),
        sa.Column("action", sa.String(length=16), nullable=True),
        sa.Column("action_result", JSON_DOCUMENT, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drift_evaluations"),
    )
    op.create_index(
        "ix_drift_evaluations_model_id", "drift_evaluations", ["model_id"], unique=False
    )
    op.create_index(
        "ix_drift_evaluations_evaluated_at", "drift_evaluations", ["evaluated_at"], unique=False
    )
    op.create_index(
        "ix_telemetry_windows_model_received",
        "telemetry_windows",
        ["model_id", "received_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_telemetry_windows_model_received", table_name="telemetry_windows")
    op.drop_index("ix_drift_evaluations_evaluated_at", table_name="drift_evaluations")
    op.drop_index("ix_drift_evaluations_model_id", table_name="drift_evaluations")
    op.drop_table("drift_evaluations")
    op.drop_table("drift_policies")
