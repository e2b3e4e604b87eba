"""The rollout engine's tables: one row per rollout, one per device of a rollout.

RolloutRecord        the ``rollouts`` table
RolloutDeviceRecord  the ``rollout_devices`` table, primary key (rollout_id, device_id)

Written by :class:`edgeops.rollout.engine.RolloutEngine` only, one transaction per state
change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from edgeops.db.types import JSONDocument, UTCDateTime, utcnow

__all__ = [
    "DEVICE_STATUSES",
    "ROLLOUT_STATUSES",
    "RolloutDeviceRecord",
    "RolloutRecord",
]

ROLLOUT_STATUSES = ("running", "paused", "aborted", "succeeded", "failed")
DEVICE_STATUSES = (
    "pending",
    "targeted",
    "succeeded",
    "failed",
    "timed_out",
    "rolled_back",
    "excluded",
)
REASON_MAX_LENGTH = 1024


class RolloutRecord(SQLModel, table=True):
    """A rollout: its spec, the release it sends, its waves and where it stands."""

    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=63, index=True)
    spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSONDocument)
    release: dict[str, Any] = Field(
        default_factory=dict,
        sa_type=JSONDocument,
        description="target, model_id and the card's reference class histogram",
    )
    waves: list[Any] = Field(
        default_factory=list, sa_type=JSONDocument, description="the planned waves"
    )
    gates: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="gate results by wave index"
    )
    status: str = Field(max_length=16, index=True)
    current_wave: int = Field(default=0)
    wave_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    wave_finished_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="every device of the wave finished"
    )
    paused_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reason: str | None = Field(default=None, max_length=REASON_MAX_LENGTH)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RolloutDeviceRecord(SQLModel, table=True):
    """One device of a rollout: its wave, where it stands, and what to roll it back to."""

    __tablename__ = "rollout_devices"

    rollout_id: str = Field(primary_key=True, max_length=32)
    device_id: str = Field(primary_key=True, max_length=63)
    wave: int | None = Field(default=None, description="None for an excluded device")
    position: int = Field(default=0, description="order within its wave")
    status: str = Field(max_length=16)
    kind: str | None = Field(
        default=None,
        max_length=32,
        description="why excluded (contract kind) or how it failed (failed, rejected)",
    )
    reason: str | None = Field(default=None, max_length=REASON_MAX_LENGTH)
    previous_release: dict[str, Any] | None = Field(
        default=None, sa_type=JSONDocument, description="desired release before targeting"
    )
    previous_model: str | None = Field(default=None, max_length=128)
    event_seq: int | None = Field(
        default=None, sa_type=sa.BigInteger, description="newest event seq when targeted"
    )
    window_seq: int | None = Field(
        default=None, sa_type=sa.BigInteger, description="newest telemetry seq when targeted"
    )
    outcome_seq: int | None = Field(
        default=None, sa_type=sa.BigInteger, description="seq of the event that decided it"
    )
    targeted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
