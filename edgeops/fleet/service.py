"""The fleet service: device twins from state and presence messages, one transaction each.

MQTT delivers at least once, and a retained message comes again on every subscription, so
the same message can arrive twice and an older one after a newer one. Each device row keeps
the device's ``ts`` of the last applied state report and presence; a message is applied only
if it is newer, so replays and duplicates change nothing. The check and the write are one
``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` statement: hub processes sharing one
PostgreSQL cannot interleave between them.

A document that cannot be ordered or stored (a ``ts`` or a value that is NaN or infinite,
which Python's JSON parser accepts but JSON and PostgreSQL's JSONB do not) raises
:class:`~edgeops.errors.ProtocolError`, so receivers drop and count it like other malformed
input.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from device_agent.protocol import Presence, StateReport, validate_device_id
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import NotFoundError, ProtocolError
from edgeops.fleet.models import Device, DeviceView

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the hub's current time, aware UTC."""

# How a proposed row (``excluded``) decides whether it replaces the stored one.
Applies = Callable[[sa.ColumnCollection[str, Any]], ColumnElement[bool]]


class FleetService:
    """Records what devices report and answers what the fleet looks like."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def record_state(self, report: StateReport) -> bool:
        """Store ``report`` as the device's reported twin, creating the device if unknown.

        Returns False, changing nothing, if the stored report is as new or newer (``ts``).
        Online status and ``last_seen`` are left to presence: a retained state report is
        redelivered while the device may be long gone.
        """
        reported = report.to_dict()
        _require_json(reported, f"state report of {report.device_id!r}")
        now = self._clock()
        changes = {
            "agent_version": report.agent_version,
            "hardware": dict(report.hardware),
            "reported": reported,
            "state_ts": report.ts,
            "updated_at": now,
        }
        new_row = {"online": False, "last_seen": None, "presence_ts": None, "created_at": now}
        applied = self._upsert(
            validate_device_id(report.device_id),
            changes,
            new_row,
            lambda proposed: sa.or_(
                col(Device.state_ts).is_(None), col(Device.state_ts) < proposed.state_ts
            ),
        )
        if not applied:
            log.debug(
                "state report of %s at ts %s is not newer; ignored", report.device_id, report.ts
            )
        return applied

    def record_presence(self, presence: Presence) -> bool:
        """Set the device online or offline, creating it if unknown; ``last_seen`` is now.

        Returns False, changing nothing, if the stored presence is newer (``ts``). At equal
        ``ts`` offline wins over online: a last will stamped with the same time as the
        online message of its session ends that session.
        """
        if not math.isfinite(presence.ts):
            raise ProtocolError(
                f"presence of {presence.device_id!r}: field 'ts' must be a finite number, "
                f"got {presence.ts!r}"
            )
        now = self._clock()
        changes = {
            "online": presence.online,
            "last_seen": now,
            "presence_ts": presence.ts,
            "updated_at": now,
        }
        new_row: dict[str, Any] = {
            "agent_version": None,
            "hardware": {},
            "reported": {},
            "state_ts": None,
            "created_at": now,
        }
        applied = self._upsert(
            validate_device_id(presence.device_id),
            changes,
            new_row,
            lambda proposed: sa.or_(
                col(Device.presence_ts).is_(None),
                col(Device.presence_ts) < proposed.presence_ts,
                sa.and_(
                    col(Device.presence_ts) == proposed.presence_ts,
                    col(Device.online),
                    sa.not_(proposed.online),
                ),
            ),
        )
        if not applied:
            log.debug(
                "presence of %s at ts %s is not newer; ignored", presence.device_id, presence.ts
            )
        return applied

    def list_devices(self) -> list[DeviceView]:
        """Every known device, sorted by device id (code point order, on any database)."""
        with self._db.session() as session:
            devices = session.exec(select(Device)).all()
            views = [DeviceView.from_device(device) for device in devices]
        return sorted(views, key=lambda view: view.device_id)

    def get_device(self, device_id: str) -> DeviceView:
        """The device ``device_id``; NotFoundError if the hub never heard of it."""
        with self._db.session() as session:
            device = session.get(Device, device_id)
            if device is None:
                raise NotFoundError(f"device {device_id!r} not found")
            return DeviceView.from_device(device)

    def _upsert(
        self,
        device_id: str,
        changes: Mapping[str, Any],
        new_row: Mapping[str, Any],
        applies: Applies,
    ) -> bool:
        """Insert the device, or apply ``changes`` where ``applies``; True if a row was written."""
        with self._db.session() as session:
            insert = _insert(session).values(device_id=device_id, **changes, **new_row)
            upsert = insert.on_conflict_do_update(
                index_elements=[col(Device.device_id)],
                set_={name: insert.excluded[name] for name in changes},
                where=applies(insert.excluded),
            ).returning(col(Device.device_id))
            return session.exec(upsert).first() is not None


def _require_json(document: Mapping[str, Any], what: str) -> None:
    """Refuse what JSON (and so PostgreSQL's JSONB) cannot hold, on every backend alike."""
    try:
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what} cannot be stored as JSON: {exc}") from exc


def _insert(session: Session) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into devices in the dialect of ``session``, which knows ON CONFLICT."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(Device)
    return sqlite.insert(Device)
