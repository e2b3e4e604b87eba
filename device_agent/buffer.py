"""The offline buffer: telemetry and events go to disk first, and leave only when acknowledged.

:class:`OfflineBuffer` is a bounded queue in one SQLite file (WAL mode, ``synchronous=FULL``:
a committed row survives a power cut). :meth:`OfflineBuffer.append` allocates the next
sequence number, asks the caller for the payload carrying it, and stores both in one
transaction, so a sequence number is never handed out twice, not even across restarts. A row
is deleted only by :meth:`OfflineBuffer.ack`, once the broker has acknowledged it.

:class:`BufferDrain` moves rows to the broker: it publishes pending rows with QoS 1, at most
``max_in_flight`` at a time, polls paho's ``MQTTMessageInfo`` of each, and acks (deletes) a
row once its PUBACK came. Rows whose acknowledgement had not come when the link went down
are published again after the reconnect. A row can therefore reach the broker twice; the
hub de-duplicates by (device id, sequence number), so every row is stored exactly once.

Bounds and losses:

* At most ``max_items`` rows are kept. An append beyond the bound deletes the oldest rows;
  how many is added to ``dropped_total`` and to the not yet reported count that
  :meth:`OfflineBuffer.take_dropped` hands out (both persisted). Called inside the payload
  factory, ``take_dropped`` is part of the append's transaction: the loss is reported in
  exactly one stored window.
* A database file SQLite cannot read (``file is not a database``, a malformed image) is moved
  aside to ``<name>.corrupt-<UTC timestamp>`` (with its ``-wal`` and ``-shm`` files), a fresh
  one is started and :attr:`OfflineBuffer.recovered_from_corruption` names the moved file so
  the daemon can report it. The fresh file continues the sequence from the current Unix time
  in milliseconds, which is above any number the lost file can have handed out: otherwise
  the hub would take new windows for duplicates of old ones.

One sequence counter per file: the daemon keeps telemetry in a buffer of its own when the
window numbers must run 1, 2, 3 ... without gaps (events in a second buffer).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from paho.mqtt.client import MQTTMessageInfo

from device_agent import fsio
from device_agent.errors import AgentError
from device_agent.link import MqttLink, acknowledged

__all__ = ["BufferDrain", "BufferError", "BufferedMessage", "OfflineBuffer"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_META_LAST_SEQ = "last_seq"
_META_DROPPED_TOTAL = "dropped_total"
_META_DROPPED_UNREPORTED = "dropped_unreported"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq        INTEGER PRIMARY KEY,
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    created_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class BufferError(AgentError):
    """The offline buffer cannot be used: its file cannot be opened or written."""


@dataclass(frozen=True)
class BufferedMessage:
    """One stored message: its sequence number, topic and payload."""

    seq: int
    topic: str
    payload: bytes


class OfflineBuffer:
    """A bounded, persistent queue of MQTT messages in one SQLite file (WAL mode).

    Thread-safe (one connection under a re-entrant lock). ``max_items`` bounds the rows kept.
    """

    def __init__(self, path: Path, *, max_items: int = 100_000) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise BufferError(f"max_items must be a positive integer, got {max_items!r}")
        self.path = Path(path)
        self.max_items = max_items
        self.recovered_from_corruption: Path | None = None
        """Where a corrupt file found at open was moved; None if there was none."""
        self._lock = threading.RLock()
        self._in_append = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferError(
                f"offline buffer {self.path}: cannot create its directory: {exc}"
            ) from exc
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                raise BufferError(f"offline buffer {self.path} cannot be opened: {exc}") from exc
            self.recovered_from_corruption = self._move_aside(exc)
            try:
                self._db = self._open()
            except sqlite3.Error as again:
                raise BufferError(
                    f"offline buffer {self.path}: a fresh file cannot be started: {again}"
                ) from again
            # continue above any seq the lost file can have handed out (see module docstring)
            with self._db:
                self._set_meta(_META_LAST_SEQ, int(time.time() * 1000))

    # -- queue -------------------------------------------------------------------------------

    def append(self, topic: str, payload_factory: Callable[[int], bytes]) -> int:
        """Store the payload ``payload_factory(seq)`` under the next sequence number.

        The factory runs inside the transaction: if it raises, nothing is stored and the
        number is not used. Beyond ``max_items`` rows the oldest are deleted and counted.
        Returns the sequence number.
        """
        with self._lock:
            try:
                with self._db:
                    seq = self._meta(_META_LAST_SEQ) + 1
                    self._in_append = True
                    try:
                        payload = payload_factory(seq)
                    finally:
                        self._in_append = False
                    if not isinstance(payload, bytes | bytearray | memoryview):
                        raise BufferError(
                            f"payload factory for {topic!r} returned "
                            f"{type(payload).__name__}, expected bytes"
                        )
                    self._db.execute(
                        "INSERT INTO messages (seq, topic, payload, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (seq, topic, bytes(payload), time.time()),
                    )
                    self._set_meta(_META_LAST_SEQ, seq)
                    self._trim()
            except sqlite3.Error as exc:
                raise BufferError(f"offline buffer {self.path}: cannot append: {exc}") from exc
            return seq

    def pending(self, limit: int = 100) -> list[BufferedMessage]:
        """The oldest ``limit`` stored messages, in sequence order."""
        with self._lock:
            rows = self._query(
                "SELECT seq, topic, payload FROM messages ORDER BY seq LIMIT ?", (limit,)
            )
        return [
            BufferedMessage(int(seq), str(topic), bytes(payload)) for seq, topic, payload in rows
        ]

    def ack(self, seq: int) -> bool:
        """Delete message ``seq`` (the broker has it); False if it was not stored (any more)."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several messages in one transaction; returns how many were stored."""
        batch = [(int(seq),) for seq in seqs]
        if not batch:
            return 0
        with self._lock:
            try:
                with self._db:
                    before = self._db.total_changes
                    self._db.executemany("DELETE FROM messages WHERE seq = ?", batch)
                    return self._db.total_changes - before
            except sqlite3.Error as exc:
                raise BufferError(f"offline buffer {self.path}: cannot delete: {exc}") from exc

    def take_dropped(self) -> int:
        """How many rows the bound dropped since the last call (persisted); resets it to 0.

        Call it inside an :meth:`append` payload factory to report the loss in that payload
        atomically: if the append fails, the count is kept for the next one.
        """
        with self._lock:
            try:
                if self._in_append:  # inside append's transaction
                    return self._take_dropped()
                with self._db:
                    return self._take_dropped()
            except sqlite3.Error as exc:
                raise BufferError(f"offline buffer {self.path}: cannot update: {exc}") from exc

    @property
    def dropped_total(self) -> int:
        """Rows dropped at the bound over the life of this file."""
        with self._lock:
            return self._meta(_META_DROPPED_TOTAL)

    @property
    def last_seq(self) -> int:
        """The last sequence number handed out (0 before the first append)."""
        with self._lock:
            return self._meta(_META_LAST_SEQ)

    def __len__(self) -> int:
        with self._lock:
            return int(self._query("SELECT COUNT(*) FROM messages", ())[0][0])

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close it."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("offline buffer %s: checkpoint at close failed: %s", self.path, exc)
            self._db.close()

    # -- internals -----------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL on a device; OFF only where device_agent.fsio.SYNC is off (the simulator)
            db.execute(f"PRAGMA synchronous={'FULL' if fsio.SYNC else 'OFF'}")
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {row}")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"offline buffer schema is {version}, expected {SCHEMA_VERSION}"
                )
            with db:
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, cause: BaseException) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            self.path.replace(target)
            for suffix in ("-wal", "-shm"):
                sidecar = self.path.with_name(self.path.name + suffix)
                if sidecar.exists():
                    sidecar.replace(target.with_name(target.name + suffix))
        except OSError as exc:
            raise BufferError(
                f"offline buffer {self.path} is corrupt ({cause}) and cannot be moved aside: {exc}"
            ) from exc
        log.error(
            "offline buffer %s is corrupt (%s); moved it to %s and started a fresh one",
            self.path,
            cause,
            target,
        )
        return target

    def _query(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise BufferError(f"offline buffer {self.path}: cannot read: {exc}") from exc

    def _meta(self, key: str) -> int:
        row = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return int(row[0][0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _trim(self) -> None:
        count = int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        excess = count - self.max_items
        if excess <= 0:
            return
        self._db.execute(
            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)",
            (excess,),
        )
        self._set_meta(_META_DROPPED_TOTAL, self._meta(_META_DROPPED_TOTAL) + excess)
        self._set_meta(_META_DROPPED_UNREPORTED, self._meta(_META_DROPPED_UNREPORTED) + excess)
        log.warning(
            "offline buffer %s is full (%d rows): dropped the %d oldest",
            self.path,
            self.max_items,
            excess,
        )

    def _take_dropped(self) -> int:
        dropped = self._meta(_META_DROPPED_UNREPORTED)
        if dropped:
            self._set_meta(_META_DROPPED_UNREPORTED, 0)
        return dropped


def _is_corruption(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text or "schema is" in text


class BufferDrain:
    """Publishes an :class:`OfflineBuffer` over a link and deletes what the broker acked.

    Call :meth:`pump` from the owner's loop; it never blocks. ``max_in_flight`` bounds the
    messages published and not yet acknowledged (keep it at or below the link's and the
    broker's in-flight window, 100 as shipped).
    """

    def __init__(self, buffer: OfflineBuffer, link: MqttLink, *, max_in_flight: int = 100) -> None:
        if max_in_flight < 1:
            raise BufferError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.buffer = buffer
        self.link = link
        self.max_in_flight = max_in_flight
        self.published = 0  # publishes handed to the link, re-sends included
        self.resent = 0  # publishes repeated after a reconnect
        self.acked = 0  # rows deleted after the broker's acknowledgement
        # seq -> (paho's message info, the link's connect count when it was published)
        self._in_flight: dict[int, tuple[MQTTMessageInfo, int]] = {}

    @property
    def in_flight(self) -> int:
        """Messages published and not yet acknowledged."""
        return len(self._in_flight)

    def pump(self) -> int:
        """Ack what the broker acknowledged, re-send what a lost connection left unacked,
        publish more pending rows while connected; returns the rows acked by this call."""
        done = [seq for seq, (info, _) in self._in_flight.items() if acknowledged(info)]
        for seq in done:
            del self._in_flight[seq]
        if done:
            self.buffer.ack_many(done)
            self.acked += len(done)
        if not self.link.connected:
            return len(done)
        generation = self.link.stats.connects
        stale = {seq for seq, (_, sent_in) in self._in_flight.items() if sent_in != generation}
        room = self.max_in_flight - (len(self._in_flight) - len(stale))
        if room <= 0:
            return len(done)
        for message in self.buffer.pending(len(self._in_flight) + room):
            if room <= 0:
                break
            if message.seq in self._in_flight and message.seq not in stale:
                continue
            try:
                info = self.link.publish_info(message.topic, message.payload)
            except AgentError as exc:
                log.warning("offline buffer: publish of seq %d failed: %s", message.seq, exc)
                break
            if message.seq in stale:
                self.resent += 1
                stale.discard(message.seq)
            self._in_flight[message.seq] = (info, generation)
            self.published += 1
            room -= 1
        for seq in stale:  # not re-sent this round (no room, or dropped at the bound)
            del self._in_flight[seq]
        return len(done)

    def flush(self, timeout_s: float, *, poll_s: float = 0.02) -> bool:
        """Pump until the buffer is empty or ``timeout_s`` passed; True if it is empty.

        For a clean stop: what the broker did not acknowledge in time stays on disk.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.pump()
            if not self._in_flight and len(self.buffer) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
