"""The monitor's table: one row per telemetry window a device sent.

TelemetryWindowBase     what a stored window records
├── TelemetryWindowRecord   the ``telemetry_windows`` table, primary key (device_id, seq)
└── TelemetryWindowView     what services hand out; ``to_dict()`` for JSON, ``document()``

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

__all__ = ["TelemetryWindowBase", "TelemetryWindowRecord", "TelemetryWindowView"]

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
