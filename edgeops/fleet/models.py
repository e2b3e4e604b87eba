"""The fleet's tables and read models: one device twin per row (reported and desired), and the
devices' events.

DeviceBase      the fields every device form shares
├── Device      the ``devices`` table
└── DeviceView  what services hand out (API, CLI): plain data, ``to_dict()`` for JSON
DeviceEventBase     what a stored event records
├── DeviceEventRecord   the ``device_events`` table, primary key (device_id, seq)
└── DeviceEventView     what services hand out
DeviceCredential    the ``device_credentials`` table: a device's broker identity (hash only)
IdentityView        a device with the state of its identity, what ``edgeops devices`` shows
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from edgeops.db.types import JSONDocument, UTCDateTime, utcnow

DEVICE_ID_MAX_LENGTH = 63  # as device_agent.protocol.DEVICE_ID_PATTERN allows


class DeviceBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=DEVICE_ID_MAX_LENGTH)
    online: bool = Field(default=False, description="as last said by its presence topic")
    last_seen: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="hub time of the last applied presence"
    )
    agent_version: str | None = Field(default=None, description="from the last state report")
    hardware: dict[str, str] = Field(
        default_factory=dict, sa_type=JSONDocument, description="hardware tags, name -> value"
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        sa_type=JSONDocument,
        description="the operator's tags from enrollment, name -> value (rollout targets)",
    )
    reported: dict[str, Any] = Field(
        default_factory=dict,
        sa_type=JSONDocument,
        description="the whole last applied state report, unknown fields included",
    )
    state_ts: float | None = Field(default=None, description="ts of the last applied report")
    presence_ts: float | None = Field(default=None, description="ts of the last applied presence")
    update_state: str | None = Field(
        default=None, max_length=32, description="updater state of the newest update event"
    )
    update_seq: int | None = Field(
        default=None, sa_type=sa.BigInteger, description="seq of the newest applied update event"
    )
    desired: dict[str, Any] = Field(
        default_factory=dict,
        sa_type=JSONDocument,
        description="the desired twin the hub publishes: release, challenger, config",
    )
    desired_version: int = Field(
        default=0,
        sa_type=sa.BigInteger,
        description="bumped by every change of the desired twin (0: nothing desired yet)",
    )
    desired_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="hub time of the last desired change"
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Device(DeviceBase, table=True):
    """A device twin as stored. Written by :class:`~edgeops.fleet.FleetService` only."""

    __tablename__ = "devices"


class DeviceView(DeviceBase):
    """A device as services hand it out, detached from any session."""

    @classmethod
    def from_device(cls, device: Device) -> Self:
        return cls.model_validate(device, from_attributes=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings in UTC."""
        return self.model_dump(mode="json")


EVENT_NAME_MAX_LENGTH = 64


class DeviceEventBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=DEVICE_ID_MAX_LENGTH)
    seq: int = Field(
        primary_key=True,
        sa_type=sa.BigInteger,
        sa_column_kwargs={"autoincrement": False},
        description="the device's persistent sequence number of the message",
    )
    event: str = Field(max_length=EVENT_NAME_MAX_LENGTH, index=True, description="event name")
    ts: float = Field(description="device time (Unix seconds) of the event")
    detail: dict[str, Any] = Field(
        default_factory=dict, sa_type=JSONDocument, description="the event's detail object"
    )
    received_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, description="hub time it was stored"
    )


class DeviceEventRecord(DeviceEventBase, table=True):
    """A stored event. Written by :class:`~edgeops.fleet.FleetService` only."""

    __tablename__ = "device_events"


class DeviceEventView(DeviceEventBase):
    """An event as services hand it out, detached from any session."""

    @classmethod
    def from_record(cls, record: DeviceEventRecord) -> Self:
        return cls.model_validate(record, from_attributes=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings in UTC."""
        return self.model_dump(mode="json")


PASSWORD_HASH_MAX_LENGTH = 255


class DeviceCredential(SQLModel, table=True):
    """A device's broker identity: user name = device id, a salted hash of its password.

    Written by :class:`~edgeops.fleet.IdentityService` only. The password itself is shown once
    at enrollment and stored nowhere. A revoked identity keeps its row (``revoked_at`` set)
    and is left out of the broker's password file.
    """

    __tablename__ = "device_credentials"

    device_id: str = Field(
        primary_key=True,
        max_length=DEVICE_ID_MAX_LENGTH,
        foreign_key="devices.device_id",
        ondelete="CASCADE",
    )
    password_hash: str = Field(
        max_length=PASSWORD_HASH_MAX_LENGTH,
        description="Mosquitto $7$ hash: PBKDF2-SHA512, salted (edgeops.broker.auth)",
    )
    enrolled_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class IdentityView(DeviceView):
    """A device and the state of its broker identity; never the password hash."""

    identity: str = Field(description="active, revoked, or none (never enrolled)")
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None

    @classmethod
    def from_rows(cls, device: Device, credential: DeviceCredential | None) -> Self:
        view = DeviceView.from_device(device).model_dump()
        if credential is None:
            return cls(**view, identity="none")
        return cls(
            **view,
            identity="revoked" if credential.revoked_at is not None else "active",
            enrolled_at=credential.enrolled_at,
            revoked_at=credential.revoked_at,
        )
