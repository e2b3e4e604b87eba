"""data: the dataset_versions table, one row per dataset version

Revision ID: 0002_datasets
Revises: 0001
Create Date: 2026-11-27

A version is identified by the SHA-256 of its content (arrays, split, classes, feature rule;
see edgeops/data/content.py). The arrays live in the artifact store as one .npz, named by
``artifact_sha256``; the row holds the metadata, the feature rule and the reference
statistics of the training split.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_datasets"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A JSON document: JSONB on PostgreSQL, JSON (text) on SQLite.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("input_shape", JSON_DOCUMENT, nullable=False),
        sa.Column("classes", JSON_DOCUMENT, nullable=False),
        sa.Column("feature_names", JSON_DOCUMENT, nullable=True),
        sa.Column("split_sizes", JSON_DOCUMENT, nullable=False),
        sa.Column("split_seed", sa.Integer(), nullable=False),
        sa.Column("feature_rule", JSON_DOCUMENT, nullable=False),
        sa.Column("reference", JSON_DOCUMENT, nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_dataset_versions"),
    )
    with op.batch_alter_table("dataset_versions", schema=None) as batch_op:
        batch_op.create_index("ix_dataset_versions_name", ["name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dataset_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_dataset_versions_name")
    op.drop_table("dataset_versions")
