"""registry: runs and model versions

Revision ID: 0003_registry
Revises: 0002_datasets
Create Date: 2026-11-27

A run records one piece of work (training, compression ...): parameters, metrics, log lines,
start, end, duration, status and the code version. A model version points at the run that
made it, at its parent model version (compression, fine-tuning) and, as plain text without a
foreign key, at the dataset version it was trained on. Its artifact lives in the
content-addressed store under ``artifact_sha256``. At most one version of a name is in
production (a partial unique index, on SQLite and PostgreSQL alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_registry"
down_revision: str | None = "0002_datasets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
PRODUCTION = sa.text("stage = 'production'")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("params", JSON_DOCUMENT, nullable=False),
        sa.Column("metrics", JSON_DOCUMENT, nullable=False),
        sa.Column("logs", JSON_DOCUMENT, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("code_version", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(length=16), nullable=False),
        sa.Column("dataset_version", sa.String(length=128), nullable=False),
        sa.Column("parent_id", sa.String(length=16), nullable=True),
        sa.Column("code_version", sa.String(), nullable=False),
        sa.Column("config", JSON_DOCUMENT, nullable=False),
        sa.Column("metrics", JSON_DOCUMENT, nullable=False),
        sa.Column("card", JSON_DOCUMENT, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_model_versions_run_id_runs"),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name="fk_model_versions_parent_id_model_versions",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("name", "seq", name="uq_model_versions_name_seq"),
    )
    op.create_index("ix_model_versions_run_id", "model_versions", ["run_id"], unique=False)
    op.create_index(
        "uq_model_versions_one_production",
        "model_versions",
        ["name"],
        unique=True,
        sqlite_where=PRODUCTION,
        postgresql_where=PRODUCTION,
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_production", table_name="model_versions")
    op.drop_index("ix_model_versions_run_id", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("runs")
