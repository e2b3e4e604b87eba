"""The monitor's tables: telemetry windows, drift policies and drift evaluations.

TelemetryWindowBase     what a stored window records
├── TelemetryWindowRecord   the ``telemetry_windows`` table, primary key (device_id, seq)
└── TelemetryWindowView     what services hand out; ``to_dict()`` for JSON, ``document()``
DriftPolicyRecord       ``drift_policies``: how a model's releases are watched, and the action
DriftEvaluationRecord   ``drift_evaluations``: every evaluation; ``onset`` marks drift events

The whole window document (unknown fields included) is kept in ``window``; the columns
beside it are the ones queries filter and sort by.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from device_agent.telemetry import TelemetryWindow
from edgeops.db.types import JSONDocument, UTCDateTime, utcnow

__all__ = [
    "DriftEvaluationRecord",
    "DriftEvaluationView",
    "DriftPolicyRecord",
    "DriftPolicyView",
    "TelemetryWindowBase",
    "TelemetryWindowRecord",
    "TelemetryWindowView",
]

DEVICE_ID_MAX_LENGTH = 63  # as device_agent.protocol.DEVICE_ID_PATTERN allows
MODEL_ID_MAX_LENGTH = 128


class TelemetryWindowBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=DEVICE_ID_MAX_LENGTH)
    seq: int = Field(
        primary_key=True,
        sa_type=sa.BigInteger,
        sa_column_kwargs={"autoincrement": False},
        description="the device's persistent sequence number of the window",
    )
    model_id: str = Field(
        max_length=MODEL_ID_MAX_LENGTH, index=True, description="the champion's model id"
    )
    start_ts: float = Field(description="device time (Unix seconds) the window opened")
    end_ts: float = Field(description="device time (Unix seconds) the window closed")
    samples: int = Field(description="predictions in the window")
    window: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="the whole window document"
    )
    received_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, description="hub time it was stored"
    )


class TelemetryWindowRecord(TelemetryWindowBase, table=True):
    """A stored window. Written by :class:`~edgeops.monitor.TelemetryService` only."""

    __tablename__ = "telemetry_windows"
    # drift evaluations read one model's windows received in a time range; the hub's metrics
    # and the API's summaries read the newest windows of all models
    __table_args__ = (
        sa.Index("ix_telemetry_windows_model_received", "model_id", "received_at"),
        sa.Index("ix_telemetry_windows_received", "received_at"),
    )


class TelemetryWindowView(TelemetryWindowBase):
    """A window as services hand it out, detached from any session."""

    @classmethod
    def from_record(cls, record: TelemetryWindowRecord) -> Self:
        return cls.model_validate(record, from_attributes=True)

    def document(self) -> TelemetryWindow:
        """The window as the protocol document the device sent."""
        return TelemetryWindow.from_dict(self.window)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings in UTC."""
        return self.model_dump(mode="json")


# -- drift -------------------------------------------------------------------------------------

MODEL_NAME_MAX_LENGTH = 128
COHORT_MAX_LENGTH = 128
ACTION_MAX_LENGTH = 16
URL_MAX_LENGTH = 2048
TAG_KEY_MAX_LENGTH = 63


class DriftPolicyBase(SQLModel):
    model_name: str = Field(
        primary_key=True, max_length=MODEL_NAME_MAX_LENGTH, description="the card's model name"
    )
    action: str = Field(
        default="none",
        max_length=ACTION_MAX_LENGTH,
        description="on drift: none (record only), notify (webhook) or retrain (CT pipeline)",
    )
    webhook_url: str | None = Field(default=None, max_length=URL_MAX_LENGTH)
    cohort_tag: str | None = Field(
        default=None,
        max_length=TAG_KEY_MAX_LENGTH,
        description="the device tag whose values split the fleet into cohorts (None: one)",
    )
    window_s: float = Field(default=600.0, description="evaluation window, seconds")
    config: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="DriftConfig.to_dict()"
    )
    retrain: dict[str, Any] = Field(
        default_factory=dict,
        sa_type=JSONDocument,
        description="the retrain action's continuous-training parameters (labeler, margin ...)",
    )
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DriftPolicyRecord(DriftPolicyBase, table=True):
    """How one model's releases are watched. Written by the drift service only."""

    __tablename__ = "drift_policies"


class DriftPolicyView(DriftPolicyBase):
    @classmethod
    def from_record(cls, record: DriftPolicyRecord) -> Self:
        return cls.model_validate(record, from_attributes=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class DriftEvaluationBase(SQLModel):
    model_id: str = Field(max_length=MODEL_ID_MAX_LENGTH, index=True)
    model_name: str | None = Field(default=None, max_length=MODEL_NAME_MAX_LENGTH)
    cohort: str = Field(
        max_length=COHORT_MAX_LENGTH, description="'*' or '<tag>=<value>' of the devices compared"
    )
    evaluated_at: datetime = Field(sa_type=UTCDateTime, index=True)
    window_start: datetime = Field(sa_type=UTCDateTime)
    window_end: datetime = Field(sa_type=UTCDateTime)
    devices: int = Field(description="devices whose windows were aggregated")
    windows: int = Field(description="telemetry windows aggregated")
    samples: int = Field(description="predictions in those windows")
    verdict: str = Field(max_length=16, description="drift, no_drift or insufficient")
    onset: bool = Field(
        default=False, description="the first drift verdict after one that was not (an event)"
    )
    report: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="DriftReport.to_dict()"
    )
    action: str | None = Field(default=None, max_length=ACTION_MAX_LENGTH)
    action_result: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="what the action did"
    )


class DriftEvaluationRecord(DriftEvaluationBase, table=True):
    """One evaluation of one release and cohort; ``onset`` rows are the drift events."""

    __tablename__ = "drift_evaluations"
    id: int | None = Field(default=None, primary_key=True)


class DriftEvaluationView(DriftEvaluationBase):
    id: int

    @classmethod
    def from_record(cls, record: DriftEvaluationRecord) -> Self:
        return cls.model_validate(record, from_attributes=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
