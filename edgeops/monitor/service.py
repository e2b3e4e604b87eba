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
import math
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


SUMMARY_MAX_WINDOWS = 10_000
"""the most windows :meth:`TelemetryService.summary` adds up (the newest)"""
LATENCY_KEYS = ("p50", "p95", "p99")


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

    def count_received(self, since: datetime) -> tuple[int, int]:
        """How many windows are stored, and how many of them the hub received at or after
        ``since`` (aware UTC), the latter from the index on ``received_at`` (the hub's metrics)."""
        total = select(sa.func.count()).select_from(TelemetryWindowRecord)
        recent = total.where(col(TelemetryWindowRecord.received_at) >= since)  # an index range
        with self._db.session() as session:
            return int(session.exec(total).one()), int(session.exec(recent).one())

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

    def summary(
        self,
        *,
        model_id: str | None = None,
        device_id: str | None = None,
        since: datetime | None = None,
        max_windows: int = SUMMARY_MAX_WINDOWS,
    ) -> dict[str, Any]:
        """What the windows received after ``since`` (of one model and/or device, if given)
        add up to, JSON-ready; the newest ``max_windows`` of them if there are more
        (``truncated`` says so).

        ``windows``, ``devices``, ``samples``; ``first_received`` / ``last_received``;
        ``errors`` summed by kind and ``error_count``; ``class_counts`` summed (windows
        whose histogram has another length than the first one are left out of it);
        ``latency_ms``: of each of p50, p95 and p99 the sample-weighted mean of the
        windows' values and the largest one (None without values); ``models`` and the
        windows of each. One query, which reads only these fields of each window.
        """
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        window = col(TelemetryWindowRecord.window)
        query = sa.select(
            col(TelemetryWindowRecord.device_id),
            col(TelemetryWindowRecord.model_id),
            col(TelemetryWindowRecord.samples),
            col(TelemetryWindowRecord.received_at),
            window["latency_ms"],
            window["errors"],
            window["class_counts"],
        )
        if model_id is not None:
            query = query.where(col(TelemetryWindowRecord.model_id) == model_id)
        if device_id is not None:
            query = query.where(col(TelemetryWindowRecord.device_id) == device_id)
        if since is not None:
            query = query.where(col(TelemetryWindowRecord.received_at) > since)
        query = query.order_by(col(TelemetryWindowRecord.received_at).desc()).limit(max_windows + 1)
        with self._db.session() as session:
            rows = list(session.execute(query).all())
        truncated = len(rows) > max_windows
        rows = rows[:max_windows]
        devices: set[str] = set()
        models: dict[str, int] = {}
        errors: dict[str, int] = {}
        classes: list[int] | None = None
        latency: dict[str, list[tuple[float, int]]] = {q: [] for q in LATENCY_KEYS}
        samples = 0
        for device, model, count, _, latency_ms, window_errors, class_counts in rows:
            devices.add(str(device))
            models[str(model)] = models.get(str(model), 0) + 1
            samples += int(count)
            if isinstance(window_errors, dict):
                for kind, value in window_errors.items():
                    if _is_count(value):
                        errors[str(kind)] = errors.get(str(kind), 0) + int(value)
            if isinstance(class_counts, list) and all(_is_count(c) for c in class_counts):
                if classes is None:
                    classes = [int(c) for c in class_counts]
                elif len(classes) == len(class_counts):
                    classes = [a + int(b) for a, b in zip(classes, class_counts, strict=True)]
            if isinstance(latency_ms, dict):
                for key in LATENCY_KEYS:
                    value = latency_ms.get(key)
                    if isinstance(value, int | float) and _is_number(value) and int(count) > 0:
                        latency[key].append((float(value), int(count)))
        received = [row[3] for row in rows]
        return {
            "windows": len(rows),
            "truncated": truncated,
            "devices": len(devices),
            "samples": samples,
            "first_received": min(received).isoformat() if received else None,
            "last_received": max(received).isoformat() if received else None,
            "models": dict(sorted(models.items())),
            "errors": dict(sorted(errors.items())),
            "error_count": sum(errors.values()),
            "class_counts": classes or [],
            "latency_ms": {
                key: {
                    "mean": (
                        round(sum(v * n for v, n in values) / sum(n for _, n in values), 6)
                        if values
                        else None
                    ),
                    "max": max(v for v, _ in values) if values else None,
                }
                for key, values in latency.items()
            },
        }


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _insert(session: Session) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into telemetry_windows in the dialect of ``session`` (knows ON CONFLICT)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(TelemetryWindowRecord)
    return sqlite.insert(TelemetryWindowRecord)
