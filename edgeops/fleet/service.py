"""The fleet service: device twins from state, presence and event messages, one transaction each,
and the desired twin the hub keeps for every device (:meth:`FleetService.set_desired`).

MQTT delivers at least once, and a retained message comes again on every subscription, so
the same message can arrive twice and an older one after a newer one. Each device row keeps
the device's ``ts`` of the last applied state report and presence; a message is applied only
if it is newer, so replays and duplicates change nothing. The check and the write are one
``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` statement: hub processes sharing one
PostgreSQL cannot interleave between them.

Events are stored once per (device_id, seq) (``INSERT ... ON CONFLICT DO NOTHING``); an
``update`` event also sets the device's ``update_state`` if its seq is the newest seen, in the
same transaction.

A document that cannot be ordered or stored (a ``ts`` or a value that is NaN or infinite,
which Python's JSON parser accepts but JSON and PostgreSQL's JSONB do not) raises
:class:`~edgeops.errors.ProtocolError`, so receivers drop and count it like other malformed
input.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from device_agent.protocol import Event, Presence, StateReport, validate_device_id
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import ConfigError, DatabaseError, NotFoundError, ProtocolError
from edgeops.fleet.desired import TwinView, encode_desired, merge_desired, validate_patch
from edgeops.fleet.models import Device, DeviceEventRecord, DeviceEventView, DeviceView

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the hub's current time, aware UTC."""

# How a proposed row (``excluded``) decides whether it replaces the stored one.
Applies = Callable[[sa.ColumnCollection[str, Any]], ColumnElement[bool]]


class FleetService:
    """Records what devices report, keeps what the hub wants of them (the desired twin), and
    answers what the fleet looks like."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    @property
    def database(self) -> Database:
        """The database the fleet is kept in."""
        return self._db

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

    def record_event(self, event: Event) -> bool:
        """Store ``event`` once; False, changing nothing, if (device, seq) is already stored.

        An ``update`` event whose ``detail.state`` is a string also becomes the device's
        ``update_state`` (creating the device if unknown), unless a newer update event (higher
        seq) was applied already.
        """
        device_id = validate_device_id(event.device_id)
        if event.seq < 1:
            raise ProtocolError(f"event of {device_id!r}: field 'seq' must be at least 1")
        if not math.isfinite(event.ts):
            raise ProtocolError(f"event {event.seq} of {device_id!r}: field 'ts' is not finite")
        _require_json(event.detail, f"event {event.seq} of {device_id!r}")
        now = self._clock()
        row = {
            "device_id": device_id,
            "seq": event.seq,
            "event": event.event,
            "ts": event.ts,
            "detail": dict(event.detail),
            "received_at": now,
        }
        state = event.detail.get("state") if event.event == "update" else None
        if state is not None and (not isinstance(state, str) or not 0 < len(state) <= 32):
            raise ProtocolError(
                f"update event {event.seq} of {device_id!r}: detail 'state' must be a short "
                f"string, got {state!r}"
            )
        with self._db.session() as session:
            insert = (
                _insert_event(session)
                .values(**row)
                .on_conflict_do_nothing(
                    index_elements=[col(DeviceEventRecord.device_id), col(DeviceEventRecord.seq)]
                )
                .returning(col(DeviceEventRecord.seq))
            )
            stored = session.exec(insert).first() is not None
            if stored and state is not None:
                upsert = _insert(session).values(
                    device_id=device_id,
                    update_state=state,
                    update_seq=event.seq,
                    updated_at=now,
                    online=False,
                    last_seen=None,
                    agent_version=None,
                    hardware={},
                    reported={},
                    state_ts=None,
                    presence_ts=None,
                    created_at=now,
                )
                upsert = upsert.on_conflict_do_update(
                    index_elements=[col(Device.device_id)],
                    set_={
                        "update_state": upsert.excluded.update_state,
                        "update_seq": upsert.excluded.update_seq,
                        "updated_at": upsert.excluded.updated_at,
                    },
                    where=sa.or_(
                        col(Device.update_seq).is_(None),
                        col(Device.update_seq) < upsert.excluded.update_seq,
                    ),
                )
                session.exec(upsert)
        if not stored:
            log.debug("event %d of %s is a duplicate; ignored", event.seq, device_id)
        return stored

    def list_events(
        self, device_id: str, *, event: str | None = None, limit: int | None = None
    ) -> list[DeviceEventView]:
        """The stored events of ``device_id`` (only ``event`` ones if given), oldest first."""
        query = select(DeviceEventRecord).where(col(DeviceEventRecord.device_id) == device_id)
        if event is not None:
            query = query.where(col(DeviceEventRecord.event) == event)
        query = query.order_by(col(DeviceEventRecord.seq))
        if limit is not None:
            query = query.limit(limit)
        with self._db.session() as session:
            return [DeviceEventView.from_record(r) for r in session.exec(query).all()]

    def last_event(self, device_id: str, event: str) -> DeviceEventView | None:
        """The newest stored ``event`` of ``device_id`` (highest sequence number), if any."""
        query = (
            select(DeviceEventRecord)
            .where(col(DeviceEventRecord.device_id) == device_id)
            .where(col(DeviceEventRecord.event) == event)
            .order_by(col(DeviceEventRecord.seq).desc())
            .limit(1)
        )
        with self._db.session() as session:
            record = session.exec(query).first()
            return DeviceEventView.from_record(record) if record is not None else None

    def list_devices(self) -> list[DeviceView]:
        """Every known device, sorted by device id (code point order, on any database)."""
        with self._db.session() as session:
            devices = session.exec(select(Device)).all()
            views = [DeviceView.from_device(device) for device in devices]
        return sorted(views, key=lambda view: view.device_id)

    def count_by_presence(self) -> dict[str, int]:
        """How many devices are ``online`` and ``offline`` (as their presence last said;
        never heard from counts as offline): one grouped count (the hub's metrics)."""
        query = select(col(Device.online), sa.func.count()).group_by(col(Device.online))
        with self._db.session() as session:
            rows = session.exec(query).all()
        counts = {"online": 0, "offline": 0}
        for online, count in rows:
            counts["online" if online else "offline"] += int(count)
        return counts

    def get_device(self, device_id: str) -> DeviceView:
        """The device ``device_id``; NotFoundError if the hub never heard of it."""
        with self._db.session() as session:
            device = session.get(Device, device_id)
            if device is None:
                raise NotFoundError(f"device {device_id!r} not found")
            return DeviceView.from_device(device)

    # -- the desired twin ------------------------------------------------------------------

    def set_desired(self, device_id: str, patch: Mapping[str, Any]) -> DeviceView:
        """Merge ``patch`` into the desired twin of ``device_id``; the device as stored after.

        See :func:`~edgeops.fleet.desired.merge_desired` for the fields and how they merge.
        One transaction; ``desired_version`` goes up by one if the document changed (a patch
        that changes nothing leaves version and time as they were). DesiredStateError (a
        ConfigError) names a bad field; NotFoundError if the hub does not know the device.
        The document is not published here (see :class:`edgeops.hub.DesiredPublisher`).
        """
        return self.set_desired_many([device_id], patch)[0]

    def set_desired_many(
        self, device_ids: Sequence[str], patch: Mapping[str, Any]
    ) -> list[DeviceView]:
        """:meth:`set_desired` for every device in ``device_ids``, all in one transaction.

        Nothing is written unless every device is known (NotFoundError names the unknown
        ones) and the patch is valid. The rows are locked before they are read, and each
        version moves from the value read to one more, checked by the UPDATE itself: a
        concurrent change by another hub process is never overwritten (the transaction is
        retried on the new values instead).
        """
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise ConfigError("no device given")
        validate_patch(patch)
        for attempt in range(1, _DESIRED_ATTEMPTS + 1):
            try:
                return self._set_desired(ids, patch)
            except _ConcurrentChangeError as exc:
                if attempt == _DESIRED_ATTEMPTS:
                    raise DatabaseError(
                        f"desired state of {exc.device_id!r} kept changing concurrently; try again"
                    ) from None
                log.info("desired state of %s changed meanwhile; retrying", exc.device_id)
        raise AssertionError("unreachable")

    def twin(self, device_id: str) -> TwinView:
        """Desired and reported twin of ``device_id`` and where they differ."""
        return TwinView.of(self.get_device(device_id))

    def _set_desired(self, ids: list[str], patch: Mapping[str, Any]) -> list[DeviceView]:
        now = self._clock()
        with self._db.session() as session:
            # Lock first: an UPDATE that changes nothing takes the rows' locks on PostgreSQL
            # and the write lock on SQLite (waiting for it, where a read-then-write upgrade
            # would fail at once), so the rows read below stay as read until commit.
            session.exec(
                sa.update(Device)
                .where(col(Device.device_id).in_(ids))
                .values(desired_version=col(Device.desired_version))
                .execution_options(synchronize_session=False)
            )
            query = select(Device).where(col(Device.device_id).in_(ids))
            found = {device.device_id: device for device in session.exec(query).all()}
            missing = [device_id for device_id in ids if device_id not in found]
            if missing:
                raise NotFoundError(
                    f"unknown device{'s' if len(missing) > 1 else ''}: "
                    + ", ".join(repr(device_id) for device_id in missing)
                    + " (devices are known once enrolled or once they reported)"
                )
            views = []
            for device_id in ids:
                device = found[device_id]
                view = DeviceView.from_device(device)
                merged = merge_desired(device.desired, patch)
                if merged == device.desired:
                    views.append(view)
                    continue
                version = device.desired_version + 1
                changes = {
                    "desired": merged,
                    "desired_version": version,
                    "desired_at": now,
                    "updated_at": now,
                }
                view = view.model_copy(update=changes)
                encode_desired(view)  # refuse what the protocol cannot carry, before writing
                written = session.exec(
                    sa.update(Device)
                    .where(
                        col(Device.device_id) == device_id,
                        col(Device.desired_version) == device.desired_version,
                    )
                    .values(**changes)
                    .returning(col(Device.device_id))
                    .execution_options(synchronize_session=False)
                ).first()
                if written is None:
                    raise _ConcurrentChangeError(device_id)
                views.append(view)
        return views

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


_DESIRED_ATTEMPTS = 5


class _ConcurrentChangeError(Exception):
    """Another transaction changed a device's desired twin after this one read it."""

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.device_id = device_id


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


def _insert_event(session: Session) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into device_events in the dialect of ``session``."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(DeviceEventRecord)
    return sqlite.insert(DeviceEventRecord)
