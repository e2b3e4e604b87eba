"""The hub's MQTT bridge: device state, presence, telemetry and events in, through the services,
to the DB.

The bridge owns one :class:`MqttLink` with the hub's own identity. :meth:`pump` runs on the
owner's thread, decodes what the link queued and calls the services, the messages waiting
together in one transaction (:meth:`edgeops.db.Database.batch`); malformed payloads are
counted and dropped by the dispatcher.

The link keeps a persistent session (``clean_session=False``): while the hub is away (its own
restart, or a broker restart with persistence, as shipped) the broker queues the QoS 1
telemetry published meanwhile for it, so a device that deleted a window from its offline
buffer on the broker's acknowledgement does not lose it.

With ``share_group`` (``edgeops hub serve`` passes ``"edgeops"``), telemetry comes through
the shared subscription of the ingest workers (:func:`edgeops.monitor.ingest.telemetry_share`):
with ``edgeops hub ingest`` running beside the hub, the broker splits the windows between the
bridge and the workers. Without it the bridge takes every window. Mosquitto 2.0.11 does not
restore shared subscriptions from its persistence file after a restart (verified): windows
published between the broker's restart and the members' reconnect reach no one, which a
plain subscription of a persistent session does not suffer (docs/architecture.md, Ingest).
The bridge checks windows as the workers do (:class:`~edgeops.monitor.ingest.TelemetryValidator`,
against the ``catalogue`` of releases; without one it is open) and writes those of a batch of
messages with one INSERT; :attr:`HubBridge.ingest` counts them, rejections by reason.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy as sa

from device_agent.dispatch import Dispatcher
from device_agent.errors import LinkError
from device_agent.link import Connected, Disconnected, Message, MqttEndpoint, MqttLink, TlsFiles
from device_agent.protocol import (
    QOS,
    Channel,
    Document,
    Event,
    Presence,
    StateReport,
    subscription,
)
from device_agent.telemetry import TelemetryWindow
from edgeops.errors import BrokerError, DatabaseError, ProtocolError
from edgeops.fleet import FleetService
from edgeops.monitor import TelemetryService
from edgeops.monitor.ingest import (
    MALFORMED,
    REPLAYED_SEQ,
    STATS_EVERY_S,
    IngestStats,
    ReleaseCatalogue,
    TelemetryRejectedError,
    TelemetryValidator,
    store_batch,
    telemetry_share,
)

log = logging.getLogger(__name__)

BATCH_MAX = 50  # messages recorded in one transaction at most (others wait their turn)


class HubBridge:
    """Subscribes to every device's ``state``, ``presence``, ``events`` and ``telemetry`` (this
    one through the share group ``share_group`` if given), and records them (events once per
    (device, seq); ``update`` events set the update state; telemetry as the ingest workers
    do).

    ``telemetry`` defaults to a :class:`TelemetryService` on the fleet service's database;
    ``catalogue`` to an open one (no release checks).
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        fleet: FleetService,
        *,
        telemetry: TelemetryService | None = None,
        catalogue: ReleaseCatalogue | None = None,
        client_id: str = "edgeops-hub",
        tls: TlsFiles | None = None,
        share_group: str | None = None,
    ) -> None:
        self.fleet = fleet
        self.telemetry = telemetry if telemetry is not None else TelemetryService(fleet.database)
        self.validator = TelemetryValidator(catalogue or ReleaseCatalogue(None))
        self.link = MqttLink(endpoint, client_id=client_id, tls=tls, clean_session=False)
        self.dispatcher = Dispatcher()
        self.store_errors = 0
        self.duplicate_events = 0  # events delivered again, ignored
        self.ingest = IngestStats()
        """telemetry that reached the validator: stored, duplicates, rejected by reason"""
        self._pending: list[TelemetryWindow] = []  # checked windows of the current batch
        self.dispatcher.on(Channel.STATE, self._on_state)
        self.dispatcher.on(Channel.PRESENCE, self._on_presence)
        self.dispatcher.on_raw(Channel.TELEMETRY, self._on_telemetry)
        self.dispatcher.on(Channel.EVENTS, self._on_event)
        for channel in (Channel.STATE, Channel.PRESENCE, Channel.EVENTS):
            self.link.subscribe(subscription(channel), QOS)
        telemetry_filter = (
            subscription(Channel.TELEMETRY) if share_group is None else telemetry_share(share_group)
        )
        self.link.subscribe(telemetry_filter, QOS)

    @property
    def duplicate_windows(self) -> int:
        """Telemetry windows delivered again (identical to the stored one), ignored."""
        return self.ingest.duplicates

    def telemetry_stats(self) -> IngestStats:
        """:attr:`ingest` plus the telemetry payloads the dispatcher dropped before the
        validator saw them (not JSON, another schema, a bad topic), as ``malformed``."""
        stats = self.ingest.copy()
        checked = sum(stats.rejected.values()) - stats.rejected[REPLAYED_SEQ]
        undecodable = self.dispatcher.dropped[Channel.TELEMETRY.value] - checked
        if undecodable > 0:
            stats.rejected[MALFORMED] += undecodable
            stats.received += undecodable
        return stats

    def start(self, wait_s: float = 10.0) -> None:
        """Connect; raise BrokerError naming the broker if it cannot be reached in time."""
        try:
            self.link.start(wait_s=wait_s)
        except LinkError as exc:
            raise BrokerError(str(exc)) from None

    def pump(self, timeout_s: float = 0.2) -> int:
        """Handle queued events for up to ``timeout_s``; returns how many were handled.

        The messages waiting in the inbox are recorded in batches of up to
        :data:`BATCH_MAX` in one transaction each (a fleet reporting at once would otherwise
        cost a commit per message); if a batch fails, its messages are recorded again one
        by one (every write is idempotent), so one bad message costs only itself.
        """
        handled = 0
        deadline = time.monotonic() + timeout_s
        while True:
            first = self.link.get(timeout_s=max(0.0, deadline - time.monotonic()))
            if first is None:
                return handled
            batch = [first]
            while len(batch) < BATCH_MAX and (event := self.link.get(timeout_s=0)) is not None:
                batch.append(event)
            handled += len(batch)
            messages: list[Message] = []
            for event in batch:
                if isinstance(event, Connected):
                    log.info("hub connected to %s", self.link.endpoint.url)
                elif isinstance(event, Disconnected):
                    log.warning("hub disconnected from broker (%s); reconnecting", event.reason)
                else:
                    messages.append(event)
            self._record(messages)

    def _record(self, messages: list[Message]) -> None:
        if len(messages) > 1:
            dispatcher = self.dispatcher
            counts = (dispatcher.dropped.copy(), dispatcher.handled.copy())
            before = (self.ingest.copy(), self.duplicate_events)
            try:
                with self.fleet.database.batch():
                    for message in messages:
                        self.dispatcher.dispatch(message)
                    self._flush_telemetry()
                return
            except Exception as exc:  # noqa: BLE001 - replayed one by one below, which raises again
                log.debug("batch of %d messages failed (%s); one by one", len(messages), exc)
                # the replay counts every message again: forget what the batch counted
                dispatcher.dropped, dispatcher.handled = counts
                self.ingest, self.duplicate_events = before
                self._pending = []
        for message in messages:
            try:
                self.dispatcher.dispatch(message)
                self._flush_telemetry()
            except (DatabaseError, ProtocolError, sa.exc.SQLAlchemyError) as exc:
                # the database is down, or refused this one message: this delivery is lost;
                # agents re-publish their state every heartbeat, and retained messages come
                # again on reconnect; a telemetry window is lost (QoS 1 was acknowledged on
                # receipt; the ingest workers acknowledge after the commit). The bridge goes
                # on with the next message.
                self._pending = []
                self.store_errors += 1
                log.error("could not record message on %s: %s", message.topic, exc)

    def _flush_telemetry(self) -> None:
        """Write the windows checked since the last flush (inside the caller's batch)."""
        if self._pending:
            pending, self._pending = self._pending, []
            store_batch(self.telemetry, pending, self.ingest)

    def run(self, stop: threading.Event, stats_every_s: float = STATS_EVERY_S) -> None:
        """Pump until ``stop`` is set (for a background thread); logs the telemetry counters
        every ``stats_every_s`` when they changed."""
        next_line, last = time.monotonic() + stats_every_s, ""
        while not stop.is_set():
            self.pump(0.25)
            if time.monotonic() >= next_line:
                next_line = time.monotonic() + stats_every_s
                line = self.telemetry_stats().line()
                if line != last:
                    log.info("hub telemetry: %s", line)
                    last = line

    def stop(self) -> None:
        self.link.stop()

    def _on_state(self, device_id: str, document: Document) -> None:
        assert isinstance(document, StateReport)
        self.fleet.record_state(document)

    def _on_presence(self, device_id: str, document: Document) -> None:
        assert isinstance(document, Presence)
        self.fleet.record_presence(document)

    def _on_telemetry(self, device_id: str, data: dict[str, Any]) -> None:
        self.ingest.received += 1
        try:
            window = self.validator.check(device_id, data)
        except TelemetryRejectedError as exc:
            self.ingest.rejected[exc.reason] += 1
            raise  # the dispatcher logs, counts and drops it
        self._pending.append(window)

    def _on_event(self, device_id: str, document: Document) -> None:
        assert isinstance(document, Event)
        if not self.fleet.record_event(document):
            self.duplicate_events += 1
