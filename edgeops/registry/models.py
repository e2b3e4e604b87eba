"""The registry's tables and read models: runs, and the model versions they produce.

RunBase                 what a run records
├── Run                 the ``runs`` table
└── RunView             what services hand out; ``to_dict()`` for JSON (+ ids of its models)
ModelVersionBase        what a model version records
├── ModelVersion        the ``model_versions`` table
└── ModelVersionView    what services hand out; ``to_dict()`` for JSON

The artifact itself is not in the database: ``artifact_sha256`` addresses it in the
content-addressed :class:`~edgeops.store.ArtifactStore`. ``dataset_version`` is a dataset
version id kept as plain text (no foreign key: datasets live in their own package).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from edgeops.db.types import JSONDocument, UTCDateTime, utcnow

__all__ = [
    "MODEL_FORMATS",
    "MODEL_NAME_MAX_LENGTH",
    "ModelVersion",
    "ModelVersionView",
    "Run",
    "RunStatus",
    "RunView",
]

MODEL_NAME_MAX_LENGTH = 100
MODEL_FORMATS = ("keras", "tflite", "onnx")
ID_MAX_LENGTH = 16  # "m-" / "r-" and 12 hex digits


class RunStatus:
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# -- runs -------------------------------------------------------------------------------------


class RunBase(SQLModel):
    id: str = Field(primary_key=True, max_length=ID_MAX_LENGTH, description="r-<12 hex>")
    kind: str = Field(max_length=64, description="what ran: train, compress, search ...")
    status: str = Field(max_length=16, description="running, succeeded or failed")
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    logs: list[str] = Field(default_factory=list, sa_type=JSONDocument)
    error: str | None = Field(default=None, sa_type=sa.Text, description="why it failed")
    code_version: str = Field(description="git:<commit>[+dirty] or package:<version>")
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_s: float | None = Field(default=None, description="ended_at - started_at")


class Run(RunBase, table=True):
    """One recorded piece of work (training, compression, ...). Written by the Registry only."""

    __tablename__ = "runs"


class RunView(RunBase):
    """A run as services hand it out, with the ids of the model versions it registered."""

    model_ids: list[str] = Field(default_factory=list)

    @classmethod
    def from_run(cls, run: Run, model_ids: list[str]) -> Self:
        return cls.model_validate({**run.model_dump(), "model_ids": model_ids})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings in UTC."""
        return self.model_dump(mode="json")


# -- model versions -----------------------------------------------------------------------------


class ModelVersionBase(SQLModel):
    id: str = Field(primary_key=True, max_length=ID_MAX_LENGTH, description="m-<12 hex>")
    name: str = Field(max_length=MODEL_NAME_MAX_LENGTH)
    seq: int = Field(description="1, 2, 3 ... per name, in registration order")
    stage: str = Field(max_length=16, description="candidate, staging, production, archived")
    format: str = Field(max_length=16, description="keras, tflite or onnx")
    artifact_sha256: str = Field(max_length=64, description="address in the artifact store")
    size_bytes: int = Field(sa_type=sa.BigInteger)
    run_id: str = Field(foreign_key="runs.id", max_length=ID_MAX_LENGTH, index=True)
    dataset_version: str = Field(max_length=128)
    parent_id: str | None = Field(
        default=None, foreign_key="model_versions.id", max_length=ID_MAX_LENGTH
    )
    code_version: str
    config: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="architecture/training/compression"
    )
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    card: dict[str, Any] | None = Field(
        default=None, sa_type=JSONDocument, description="ModelCard.to_dict()"
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelVersion(ModelVersionBase, table=True):
    """A registered model version. Written by the Registry only."""

    __tablename__ = "model_versions"
    __table_args__ = (
        sa.UniqueConstraint("name", "seq", name="uq_model_versions_name_seq"),
        # at most one production version per name, whatever the callers do
        sa.Index(
            "uq_model_versions_one_production",
            "name",
            unique=True,
            sqlite_where=sa.text("stage = 'production'"),
            postgresql_where=sa.text("stage = 'production'"),
        ),
    )


class ModelVersionView(ModelVersionBase):
    """A model version as services hand it out, detached from any session."""

    @classmethod
    def from_model(cls, model: ModelVersion) -> Self:
        return cls.model_validate(model, from_attributes=True)

    @property
    def ref(self) -> str:
        """``NAME:SEQ``, the human name of this version."""
        return f"{self.name}:{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings in UTC."""
        return self.model_dump(mode="json")
