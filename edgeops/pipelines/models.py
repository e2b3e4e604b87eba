"""The pipeline runner's tables: one row per pipeline run, one per step of a run.

PipelineRunRecord   the ``pipeline_runs`` table
PipelineStepRecord  the ``pipeline_steps`` table, primary key (run_id, name)

Written by :class:`edgeops.pipelines.runner.PipelineRunner` only. A run is executed by the
process holding its lease (``lease_owner`` until ``lease_expires_at``); every write of a
step's outcome is made in the same transaction as a check that the lease is still held, so a
process that lost its lease cannot overwrite what the new holder records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field, SQLModel

from edgeops.db.types import JSONDocument, UTCDateTime, utcnow

__all__ = [
    "ERROR_MAX_LENGTH",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "PipelineRunRecord",
    "PipelineStepRecord",
]

RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
STEP_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
ERROR_MAX_LENGTH = 2048
OWNER_MAX_LENGTH = 128


class PipelineRunRecord(SQLModel, table=True):
    """One run of a named pipeline: its parameters, status and lease."""

    __tablename__ = "pipeline_runs"

    id: str = Field(primary_key=True, max_length=32)
    pipeline: str = Field(max_length=64, index=True)
    status: str = Field(max_length=16, index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    error: str | None = Field(default=None, max_length=ERROR_MAX_LENGTH)
    lease_owner: str | None = Field(
        default=None, max_length=OWNER_MAX_LENGTH, description="the process executing it"
    )
    lease_expires_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="another process may take over after"
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PipelineStepRecord(SQLModel, table=True):
    """One step of a run: where it stands, what it was given and what it produced."""

    __tablename__ = "pipeline_steps"

    run_id: str = Field(primary_key=True, max_length=32)
    name: str = Field(primary_key=True, max_length=64)
    position: int = Field(default=0, description="order of execution")
    status: str = Field(max_length=16)
    attempts: int = Field(default=0, description="attempts started, interrupted ones included")
    interruptions: int = Field(default=0, description="attempts cut off by a dead process")
    inputs: dict[str, Any] | None = Field(default=None, sa_type=JSONDocument)
    outputs: dict[str, Any] | None = Field(default=None, sa_type=JSONDocument)
    error: str | None = Field(default=None, max_length=ERROR_MAX_LENGTH)
    metadata_run_id: str | None = Field(
        default=None, max_length=16, description="the registry run of the last attempt"
    )
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_s: float | None = Field(default=None, description="of the last attempt")
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
