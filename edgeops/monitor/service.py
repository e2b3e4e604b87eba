"""The telemetry service: windows from devices into the database, each stored once.

MQTT delivers at least once, and a device's offline buffer publishes a window again when
the broker's acknowledgement was lost with the connection, so the same window can arrive
several times, from one hub process or from several sharing the database. The device's
sequence number identifies a window: the row's primary key is (device_id, seq), and the
write is one ``INSERT ... ON CONFLICT DO NOTHING``, so a duplicate changes nothing, on SQLite
and PostgreSQL alike, without a race between a check and a write.

A window that cannot be stored as JSON (NaN or infinite numbers, which Python's parser
accepts but JSON and PostgreSQL's JSONB do not) raises :class:`~edgeops.errors.ProtocolError`,
so receivers drop and count it like other malformed input.

:meth:`TelemetryService.record_many` stores a batch with one multi-row INSERT and tells a
*duplicate* (the very window already stored: a redelivery) from a *replayed* sequence number
(another window under a (device, seq) already stored); neither changes what is stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from device_agent.protocol import validate_device_id
from device_agent.telemetry import TelemetryWindow
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import ProtocolError
from edgeops.monitor.models import TelemetryWindowRecord, TelemetryWindowView

__all__ = ["RecordOutcome", "TelemetryService"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the hub's current time, aware UTC."""


@dataclass
class RecordOutcome:
    """What :meth:`TelemetryService.record_many` did with a batch."""

    stored: int = 0
    """windows written"""
    duplicates: int = 0
    """windows identical to one already stored (or earlier in the batch): nothing to do"""
    replayed: list[tuple[str, int]] = field(default_factory=list)
    """(device, seq) of windows that differ from the window stored under that key"""


class TelemetryService:
    """Stores telemetry windows idempotently and reads them back."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def record(self, window: TelemetryWindow) -> bool:
        """Store ``window``; returns False, changing nothing, if (device, seq) is stored."""
        row = self._row(window)
        device_id = row["device_id"]
        with self._db.session() as session:
            insert = (
                _insert(session)
                .values(**row)
                .on_conflict_do_nothing(
                    index_elements=[
                        col(TelemetryWindowRecord.device_id),
                        col(TelemetryWindowRecord.seq),
                    ]
                )
                .returning(col(TelemetryWindowRecord.seq))
            )
            stored = session.exec(insert).first() is not None
        if not stored:
            log.debug("telemetry window %d of %s is a duplicate; ignored", window.seq, device_id)
        return stored

    def record_many(self, windows: Sequence[TelemetryWindow]) -> RecordOutcome:
        """Store a batch in one transaction: one multi-row ``INSERT ... ON CONFLICT DO
        NOTHING``; the windows whose (device, seq) was taken are read back and compared, so
        the outcome tells duplicates from replayed sequence numbers.

        ProtocolError (nothing stored) if any window cannot be stored (see :meth:`record`);
        receivers validate first. A database failure raises and stores nothing.
        """
        outcome = RecordOutcome()
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        others: list[dict[str, Any]] = []  # more windows under a (device, seq) of this batch
        for window in windows:
            row = self._row(window)
            key = (row["device_id"], row["seq"])
            if key in rows:
                others.append(row)
            else:
                rows[key] = row
        if not rows:
            return outcome
        device_id, seq = col(TelemetryWindowRecord.device_id), col(TelemetryWindowRecord.seq)
        with self._db.session() as session:
            insert = (
                _insert(session)
                .values(list(rows.values()))
                .on_conflict_do_nothing(index_elements=[device_id, seq])
                .returning(device_id, seq)
            )
            written = {(str(d), int(s)) for d, s in session.exec(insert).all()}
            taken = [key for key in rows if key not in written]
            kept = {key: rows[key]["window"] for key in written}
            if taken:
                query = select(device_id, seq, col(TelemetryWindowRecord.window)).where(
                    device_id.in_({d for d, _ in taken}), seq.in_({s for _, s in taken})
                )
                found = {(d, s): doc for d, s, doc in session.exec(query).all()}
                kept.update((key, found.get(key)) for key in taken)
        outcome.stored = len(written)
        # Each window not written is compared with the one kept under its (device, seq):
        # the same window is a redelivery, another one a replayed sequence number.
        for row in [rows[key] for key in taken] + others:
            key = (row["device_id"], row["seq"])
            if kept.get(key) == row["window"]:
                outcome.duplicates += 1
            else:
                outcome.replayed.append(key)
        return outcome

    def _row(self, window: TelemetryWindow) -> dict[str, Any]:
        """The table row of ``window``; ProtocolError if it cannot be stored."""
        device_id = validate_device_id(window.device_id)
        if window.seq < 1:
            raise ProtocolError(
                f"telemetry window of {device_id!r}: field 'seq' must be at least 1, "
                f"got {window.seq}"
            )
        document = window.to_dict()
        try:
            json.dumps(document, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(
                f"telemetry window {window.seq} of {device_id!r} cannot be stored as JSON: {exc}"
            ) from exc
        return {
            "device_id": device_id,
            "seq": window.seq,
            "model_id": window.model_id,
            "start_ts": window.start_ts,
            "end_ts": window.end_ts,
            "samples": window.samples,
            "window": document,
            "received_at": self._clock(),
        }

    def count(self, device_id: str | None = None) -> int:
        """How many windows are stored, of one device or of all."""
        query = select(sa.func.count()).select_from(TelemetryWindowRecord)
        if device_id is not None:
            query = query.where(col(TelemetryWindowRecord.device_id) == device_id)
        with self._db.session() as session:
            return int(session.exec(query).one())

    def list_windows(self, device_id: str, limit: int = 100) -> list[TelemetryWindowView]:
        """The newest ``limit`` windows of ``device_id``, in sequence order (oldest first)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        query = (
            select(TelemetryWindowRecord)
            .where(col(TelemetryWindowRecord.device_id) == device_id)
            .order_by(col(TelemetryWindowRecord.seq).desc())
            .limit(limit)
        )
        with self._db.session() as session:
            records = session.exec(query).all()
            views = [TelemetryWindowView.from_record(record) for record in records]
        return views[::-1]


def _insert(session: Session) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into telemetry_windows in the dialect of ``session`` (knows ON CONFLICT)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(TelemetryWindowRecord)
    return sqlite.insert(TelemetryWindowRecord)
