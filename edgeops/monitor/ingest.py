"""Telemetry ingest that scales out: validation, a release catalogue, batched workers.

    catalogue = ReleaseCatalogue(repository_for(settings))  # open without a repository
    validator = TelemetryValidator(catalogue)
    window = validator.decode(topic, payload)  # or TelemetryRejectedError (.reason)

    worker = IngestWorker(endpoint, database, catalogue=catalogue, client_id="hub-ingest-1")
    worker.start(); worker.run(stop_event); worker.stop(); worker.stats

    report = run_ingest(settings, workers=2)  # ``edgeops hub ingest``

**Sharing the stream.** Every worker (and the hub's bridge) subscribes to telemetry through
the MQTT shared subscription ``$share/edgeops/edgeops/v1/dev/+/telemetry``
(:func:`telemetry_share`): the broker hands each window to one member of the group (Mosquitto
2.0.11 does so for MQTT 3.1.1 clients, round robin). A worker's session is persistent
(``clean_session=False``, a stable client id): while it is away the broker keeps queueing its
share for it, and hands the queue over when it reconnects. A worker that is gone for good
strands its share until the broker expires the session (``persistent_client_expiration``,
14 days as shipped), so restart workers under the same ids. Mosquitto 2.0.11 does not
restore ``$share`` subscriptions from its persistence file after a restart (verified): what
is published after the restart and before the members re-subscribe reaches no one.

**Nothing is lost, nothing is stored twice.** A worker acknowledges (PUBACK) a window only
after the transaction holding it committed (paho's manual acknowledgements), so a worker
killed between receipt and commit gets the window again from the broker (with the DUP flag)
when it reconnects. The write is one multi-row ``INSERT ... ON CONFLICT DO NOTHING`` per batch
(up to ``batch_max`` windows, or what arrived within ``batch_ms`` of the first), keyed by
(device_id, seq), so a window delivered again is stored once, whichever worker gets it.
Mosquitto sends a client at most ``max_inflight_messages`` unacknowledged messages (100 as
shipped), so batches hold at most that many.

**Validation, before anything is stored.** A window is rejected, counted by reason
(:data:`REASONS`) and never stored when

* ``malformed``: not JSON, another schema, a field of the wrong type or missing, a model id
  longer than the table allows;
* ``device_mismatch``: the payload names another device than its topic;
* ``negative_count``: any count (samples, histogram bins, errors ...) below zero;
* ``unknown_release``: its model id is not the model id of any release in the hub's release
  repository (:class:`ReleaseCatalogue`);
* ``feature_bins``: ``feature_counts`` has not as many features, or a feature not as many
  bins, as the release's reference statistics (no reference: it must be empty);
* ``class_bins``: ``class_counts`` is longer than the release's number of classes;
* ``confidence_bins``: ``confidence_counts`` is neither empty nor one bin per interval of the
  release's confidence edges (:data:`~device_agent.sketch.CONFIDENCE_EDGES` without them);
* ``replayed_seq``: another window under a (device, seq) already stored.

A window identical to the stored one is a *duplicate* (a redelivery), counted apart, not a
rejection.

**Without a release repository** (the hub never ran ``edgeops keys init``, or a worker runs
where the trust directory is not), the catalogue is *open*: the hub cannot know which model
ids were released, so windows are not checked against a release -- model id, feature, class
and confidence bins pass -- while every other check holds. The demo, the tests and a hub
that delivers models by other means work this way. Once a repository exists, it is the
catalogue (re-read when it changes), and only its releases' model ids are accepted.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import FrameType
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.errors import ProtocolError
from device_agent.link import MqttEndpoint, TlsFiles, configure_client
from device_agent.protocol import (
    QOS,
    Channel,
    decode_object,
    parse_topic,
    subscription,
)
from device_agent.sketch import CONFIDENCE_EDGES, ReferenceStats, SketchError
from device_agent.telemetry import TelemetryWindow
from edgeops.db import Database
from edgeops.errors import BrokerError, ConfigError, DatabaseError, EdgeOpsError
from edgeops.monitor.models import MODEL_ID_MAX_LENGTH
from edgeops.monitor.service import TelemetryService

if TYPE_CHECKING:
    from edgeops.config import Settings
    from edgeops.trust import TrustRepository

__all__ = [
    "REASONS",
    "SHARE_GROUP",
    "IngestReport",
    "IngestStats",
    "IngestWorker",
    "ReleaseCatalogue",
    "ReleaseShape",
    "TelemetryRejectedError",
    "TelemetryValidator",
    "run_ingest",
    "telemetry_share",
]

log = logging.getLogger(__name__)

SHARE_GROUP = "edgeops"
"""The shared-subscription group of the hub's bridge and the ingest workers."""

MALFORMED = "malformed"
DEVICE_MISMATCH = "device_mismatch"
NEGATIVE_COUNT = "negative_count"
UNKNOWN_RELEASE = "unknown_release"
FEATURE_BINS = "feature_bins"
CLASS_BINS = "class_bins"
CONFIDENCE_BINS = "confidence_bins"
REPLAYED_SEQ = "replayed_seq"
REASONS = (
    MALFORMED,
    DEVICE_MISMATCH,
    NEGATIVE_COUNT,
    UNKNOWN_RELEASE,
    FEATURE_BINS,
    CLASS_BINS,
    CONFIDENCE_BINS,
    REPLAYED_SEQ,
)
"""Why a window is rejected (see the module docstring)."""

BATCH_MAX = 100  # as Mosquitto's max_inflight_messages in deploy/mosquitto/mosquitto.conf
BATCH_MS = 50.0
STATS_EVERY_S = 30.0


def telemetry_share(group: str = SHARE_GROUP) -> str:
    """The shared subscription to every device's telemetry: ``$share/<group>/<filter>``."""
    if not group or any(c in group for c in "/+#"):
        raise ConfigError(f"shared subscription group {group!r} must be a plain topic level")
    return f"$share/{group}/{subscription(Channel.TELEMETRY)}"


class TelemetryRejectedError(ProtocolError):
    """A telemetry window that is not stored; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- the release catalogue ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseShape:
    """The histogram shapes a release's telemetry must have (from its model card)."""

    feature_bins: tuple[int, ...]
    """bins of each feature of the reference (empty: no reference, no feature counts)"""
    classes: int | None
    """number of classes (None: unknown, not checked)"""
    confidence_bins: int
    """bins of the confidence histogram"""

    @classmethod
    def of_card(cls, card: Mapping[str, Any]) -> ReleaseShape:
        """The shape of a card's reference statistics and output spec."""
        reference: ReferenceStats | None = None
        raw = card.get("reference")
        if isinstance(raw, Mapping) and raw:
            try:
                reference = ReferenceStats.from_dict(raw)
            except SketchError as exc:
                log.warning("model %s: reference statistics ignored: %s", card.get("model_id"), exc)
        classes: int | None = None
        if reference is not None and reference.class_counts is not None:
            classes = len(reference.class_counts)
        else:
            output = card.get("output_spec")
            shape = output.get("shape") if isinstance(output, Mapping) else None
            last = shape[-1] if isinstance(shape, list) and shape else None
            if isinstance(last, int) and not isinstance(last, bool) and last > 0:
                classes = max(2, last)  # one output: a binary classifier's probability
        edges = reference.confidence_edges if reference is not None else None
        return cls(
            feature_bins=tuple(len(e) + 1 for e in reference.feature_edges) if reference else (),
            classes=classes,
            confidence_bins=len(edges if edges is not None else CONFIDENCE_EDGES) + 1,
        )


class ReleaseCatalogue:
    """Model id -> :class:`ReleaseShape` of every release in the hub's repository, cached.

    Read when first asked, again every ``max_age_s``, and at once (at most every
    ``retry_s``) when asked for a model id it does not know, so a new release is accepted
    within ``retry_s`` and a flood of unknown ids costs one read a second. If a read fails
    (a repository being rewritten), the last good catalogue stays (none yet: no release is
    known, windows are refused until a read succeeds). ``repository`` None, or
    a directory without a repository: the catalogue is *open* (see the module docstring).
    """

    def __init__(
        self,
        repository: TrustRepository | None,
        *,
        max_age_s: float = 30.0,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repository = repository
        self.max_age_s = max_age_s
        self.retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._shapes: dict[str, tuple[ReleaseShape, ...]] | None = None  # None: open
        self._cards: dict[str, Mapping[str, Any]] = {}
        self._loaded_at: float | None = None
        self.loads = 0

    @property
    def is_open(self) -> bool:
        """True without a release repository: no window is checked against a release."""
        self._refresh(force=False)
        return self._shapes is None

    def model_ids(self) -> list[str]:
        """The released model ids (empty when open)."""
        self._refresh(force=False)
        return sorted(self._shapes or ())

    def shapes(self, model_id: str) -> tuple[ReleaseShape, ...] | None:
        """The shapes of ``model_id``'s releases; None when open; TelemetryRejectedError
        (``unknown_release``) if no release has this model id."""
        self._refresh(force=False)
        if self._shapes is not None and model_id not in self._shapes:
            self._refresh(force=True)
        known = self._shapes
        if known is None:
            return None
        found = known.get(model_id)
        if found is None:
            raise TelemetryRejectedError(
                UNKNOWN_RELEASE, f"model {model_id!r} is not the model of any release"
            )
        return found

    def _refresh(self, *, force: bool) -> None:
        now = self._clock()
        with self._lock:
            age = None if self._loaded_at is None else now - self._loaded_at
            if age is not None and age < (self.retry_s if force else self.max_age_s):
                return
            first = self._loaded_at is None
            self._loaded_at = now
            try:
                self._shapes = self._read()
                self.loads += 1
            except (EdgeOpsError, KeyError, ValueError, OSError) as exc:
                if first:
                    # a repository that cannot be read yet knows no release: windows are
                    # refused (not stored unchecked) until a read succeeds
                    self._shapes = {}
                log.warning("release catalogue not read (keeping the last one): %s", exc)

    def card(self, model_id: str) -> Mapping[str, Any] | None:
        """The card of ``model_id``'s newest release (None: no release, or open)."""
        self._refresh(force=False)
        if self._shapes is not None and model_id not in self._shapes:
            self._refresh(force=True)
        return self._cards.get(model_id)

    def _read(self) -> dict[str, tuple[ReleaseShape, ...]] | None:
        from edgeops.trust import released_cards

        repository = self.repository
        if repository is None or not repository.exists():
            self._cards = {}
            return None
        cards = released_cards(repository)
        shapes: dict[str, list[ReleaseShape]] = {}
        for model_id, found in cards.items():
            for card in found:
                shape = ReleaseShape.of_card(card)
                if shape not in shapes.setdefault(model_id, []):
                    shapes[model_id].append(shape)
        self._cards = {model_id: found[-1] for model_id, found in cards.items()}
        return {model_id: tuple(found) for model_id, found in shapes.items()}


# -- validation --------------------------------------------------------------------------------

_COUNT_LISTS = ("class_counts", "confidence_counts")


class TelemetryValidator:
    """Turns a payload into a :class:`TelemetryWindow` fit to store, or TelemetryRejectedError."""

    def __init__(self, catalogue: ReleaseCatalogue) -> None:
        self.catalogue = catalogue

    def decode(self, topic: str, payload: bytes) -> TelemetryWindow:
        """Decode and check the payload of a telemetry message published on ``topic``."""
        try:
            device_id, channel = parse_topic(topic)
            if channel is not Channel.TELEMETRY:
                raise ProtocolError(f"topic {topic!r} is not a telemetry topic")
            data = decode_object(payload)
        except ProtocolError as exc:
            raise TelemetryRejectedError(MALFORMED, str(exc)) from None
        return self.check(device_id, data)

    def check(self, device_id: str, data: Mapping[str, Any]) -> TelemetryWindow:
        """Check a decoded JSON object received on ``device_id``'s telemetry topic."""
        if data.get("type") != TelemetryWindow.TYPE:
            raise TelemetryRejectedError(
                MALFORMED, f"payload has type {data.get('type')!r}, expected 'telemetry'"
            )
        _refuse_negative_counts(data)
        try:
            window = TelemetryWindow.from_dict(data)
        except ProtocolError as exc:
            raise TelemetryRejectedError(MALFORMED, str(exc)) from None
        if window.device_id != device_id:
            raise TelemetryRejectedError(
                DEVICE_MISMATCH,
                f"payload names device {window.device_id!r} but was published on "
                f"{device_id!r}'s topic",
            )
        if not window.model_id or len(window.model_id) > MODEL_ID_MAX_LENGTH:
            raise TelemetryRejectedError(
                MALFORMED, f"model id must hold 1-{MODEL_ID_MAX_LENGTH} characters"
            )
        shapes = self.catalogue.shapes(window.model_id)
        if shapes is not None:
            _check_shape(window, shapes)
        return window


def _refuse_negative_counts(data: Mapping[str, Any]) -> None:
    def negative(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value < 0

    found: list[str] = []
    for name in ("samples", "dropped_windows", "rss_bytes"):
        if negative(data.get(name)):
            found.append(name)
    for name in _COUNT_LISTS:
        values = data.get(name)
        if isinstance(values, list) and any(negative(v) for v in values):
            found.append(name)
    rows = data.get("feature_counts")
    if isinstance(rows, list) and any(
        isinstance(row, list) and any(negative(v) for v in row) for row in rows
    ):
        found.append("feature_counts")
    errors = data.get("errors")
    if isinstance(errors, dict) and any(negative(v) for v in errors.values()):
        found.append("errors")
    if found:
        raise TelemetryRejectedError(NEGATIVE_COUNT, f"negative counts in {', '.join(found)}")


def _check_shape(window: TelemetryWindow, shapes: tuple[ReleaseShape, ...]) -> None:
    """Accept ``window`` if it fits one of its model's release shapes; else the first misfit."""
    first: TelemetryRejectedError | None = None
    for shape in shapes:
        problem = _misfit(window, shape)
        if problem is None:
            return
        first = first or problem
    assert first is not None
    raise first


def _misfit(window: TelemetryWindow, shape: ReleaseShape) -> TelemetryRejectedError | None:
    bins = tuple(len(row) for row in window.feature_counts)
    if bins != shape.feature_bins:
        return TelemetryRejectedError(
            FEATURE_BINS,
            f"feature_counts has {len(bins)} features with {list(bins)[:8]} bins; the "
            f"release's reference has {len(shape.feature_bins)} features with "
            f"{list(shape.feature_bins)[:8]} bins",
        )
    if shape.classes is not None and len(window.class_counts) > shape.classes:
        return TelemetryRejectedError(
            CLASS_BINS,
            f"class_counts has {len(window.class_counts)} classes; the release has {shape.classes}",
        )
    if len(window.confidence_counts) not in (0, shape.confidence_bins):
        return TelemetryRejectedError(
            CONFIDENCE_BINS,
            f"confidence_counts has {len(window.confidence_counts)} bins; the release's "
            f"confidence histogram has {shape.confidence_bins}",
        )
    return None


# -- counters ----------------------------------------------------------------------------------


@dataclass
class IngestStats:
    """What an ingest path did with the telemetry it received."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    store_retries: int = 0
    """batches written again after the database failed"""
    store_errors: int = 0
    """windows the database refused alone (not stored)"""

    def add(self, other: IngestStats) -> None:
        self.received += other.received
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.rejected.update(other.rejected)
        self.batches += other.batches
        self.store_retries += other.store_retries
        self.store_errors += other.store_errors

    def copy(self) -> IngestStats:
        return dataclasses.replace(self, rejected=self.rejected.copy())

    def to_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": {reason: self.rejected[reason] for reason in REASONS},
            "batches": self.batches,
            "store_retries": self.store_retries,
            "store_errors": self.store_errors,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IngestStats:
        return cls(
            received=int(data["received"]),
            stored=int(data["stored"]),
            duplicates=int(data["duplicates"]),
            rejected=Counter({k: int(v) for k, v in dict(data["rejected"]).items() if v}),
            batches=int(data["batches"]),
            store_retries=int(data["store_retries"]),
            store_errors=int(data["store_errors"]),
        )

    def line(self) -> str:
        """One line for logs and the command's output."""
        rejected = ", ".join(f"{r} {self.rejected[r]}" for r in REASONS if self.rejected[r])
        return (
            f"received {self.received}, stored {self.stored}, duplicates {self.duplicates}, "
            f"rejected {sum(self.rejected.values())}"
            + (f" ({rejected})" if rejected else "")
            + f", batches {self.batches}, store errors {self.store_errors}"
        )


def store_batch(
    telemetry: TelemetryService, windows: list[TelemetryWindow], stats: IngestStats
) -> None:
    """Write ``windows`` in one transaction and count the outcome in ``stats``; raises what
    the service raises (nothing is stored then)."""
    outcome = telemetry.record_many(windows)
    stats.stored += outcome.stored
    stats.duplicates += outcome.duplicates
    if outcome.replayed:
        stats.rejected[REPLAYED_SEQ] += len(outcome.replayed)
    for device_id, seq in outcome.replayed[:3]:
        log.warning(
            "telemetry window %d of %s rejected: another window with that sequence number "
            "is stored",
            seq,
            device_id,
        )


# -- one worker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Delivery:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes


class IngestWorker:
    """One MQTT connection in the telemetry share group, writing batches to the database.

    ``client_id`` must be stable across restarts (the broker keeps the session's queue under
    it). :meth:`run` is the loop; :attr:`stats` its counters.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        database: Database,
        *,
        client_id: str,
        catalogue: ReleaseCatalogue,
        group: str = SHARE_GROUP,
        batch_max: int = BATCH_MAX,
        batch_ms: float = BATCH_MS,
        tls: TlsFiles | None = None,
        keepalive_s: int = 30,
        stats_every_s: float = STATS_EVERY_S,
    ) -> None:
        if batch_max < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_max}")
        if not batch_ms >= 0:
            raise ConfigError(f"batch wait must be at least 0 ms, got {batch_ms}")
        self.endpoint = endpoint
        self.client_id = client_id
        self.filter = telemetry_share(group)
        self.batch_max = batch_max
        self.batch_s = batch_ms / 1000.0
        self.stats_every_s = stats_every_s
        self.stats = IngestStats()
        self.telemetry = TelemetryService(database)
        self.validator = TelemetryValidator(catalogue)
        self.last_error: str | None = None
        self._inbox: queue.Queue[_Delivery] = queue.Queue()
        self._generation = 0  # connections so far; acknowledgements go to the one they came on
        self._connected = threading.Event()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        client.manual_ack_set(True)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        configure_client(client, endpoint, tls)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._keepalive_s = keepalive_s

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, wait_s: float = 10.0) -> None:
        """Connect and subscribe; BrokerError naming the broker if not connected in time."""
        try:
            self._client.connect_async(
                self.endpoint.host, self.endpoint.port, keepalive=self._keepalive_s
            )
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to MQTT broker {self.endpoint.url}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(wait_s):
            self._client.loop_stop()
            cause = self.last_error or "no answer"
            raise BrokerError(f"cannot connect to MQTT broker {self.endpoint.url}: {cause}")

    def stop(self) -> None:
        """Disconnect cleanly (what is not acknowledged comes again on the next connect)."""
        self._client.disconnect()
        self._client.loop_stop()

    def run(self, stop: threading.Event) -> None:
        """Take batches until ``stop`` is set; then write and acknowledge what arrived."""
        next_line = time.monotonic() + self.stats_every_s
        while not stop.is_set():
            batch = self._collect(0.25)
            if batch:
                self._handle(batch, stop)
            if time.monotonic() >= next_line:
                next_line = time.monotonic() + self.stats_every_s
                log.info("ingest %s: %s", self.client_id, self.stats.line())
        while batch := self._collect(0.0):
            if not self._handle(batch, None):
                break

    # -- batches -------------------------------------------------------------------------------

    def _collect(self, wait_s: float) -> list[_Delivery]:
        try:
            first = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=remaining) if remaining > 0 else None
            except queue.Empty:
                item = None
            if item is None:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            batch.append(item)
        return batch

    def _handle(self, batch: list[_Delivery], stop: threading.Event | None) -> bool:
        """Validate, write, acknowledge. False if the database stayed down until ``stop``
        (or at once with ``stop`` None): nothing acknowledged, the broker sends it again."""
        stats = self.stats.copy()
        stats.received += len(batch)
        windows: list[TelemetryWindow] = []
        for delivery in batch:
            try:
                windows.append(self.validator.decode(delivery.topic, delivery.payload))
            except TelemetryRejectedError as exc:
                stats.rejected[exc.reason] += 1
                log.debug("telemetry on %s rejected (%s): %s", delivery.topic, exc.reason, exc)
        attempt = 0
        while True:
            try:
                if windows:
                    self._write(windows, stats)
                break
            except DatabaseError as exc:
                stats.store_retries += 1
                delay = min(10.0, 0.5 * 2**attempt)
                attempt += 1
                log.error(
                    "ingest %s: %s; batch written again in %.1f s", self.client_id, exc, delay
                )
                if stop is None or stop.wait(delay):
                    return False
        stats.batches += 1
        self.stats = stats
        for delivery in batch:
            if delivery.generation == self._generation:
                self._client.ack(delivery.mid, delivery.qos)
        return True

    def _write(self, windows: list[TelemetryWindow], stats: IngestStats) -> None:
        try:
            store_batch(self.telemetry, windows, stats)
            return
        except DatabaseError:
            raise
        except (sa.exc.SQLAlchemyError, ProtocolError) as exc:
            log.warning("batch of %d refused (%s); one by one", len(windows), exc)
        for window in windows:  # only the window the database refuses is lost
            try:
                store_batch(self.telemetry, [window], stats)
            except DatabaseError:
                raise
            except ProtocolError as exc:
                stats.rejected[MALFORMED] += 1
                log.debug("telemetry window dropped: %s", exc)
            except sa.exc.SQLAlchemyError as exc:
                stats.store_errors += 1
                log.error(
                    "telemetry window %d of %s refused: %s", window.seq, window.device_id, exc
                )

    # -- paho callbacks (network thread): record and enqueue only --------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code.getName()}"
            return
        self._generation += 1
        client.subscribe(self.filter, QOS)
        self.last_error = None
        self._connected.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        self._connected.clear()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._inbox.put(
            _Delivery(self._generation, msg.mid, msg.qos, msg.topic, bytes(msg.payload))
        )


# -- worker processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestOptions:
    batch_max: int = BATCH_MAX
    batch_ms: float = BATCH_MS
    connect_timeout_s: float = 10.0
    stats_every_s: float = STATS_EVERY_S
    group: str = SHARE_GROUP


@dataclass
class IngestReport:
    """What ``edgeops hub ingest`` did: each worker's counters (since its last start)."""

    workers: dict[str, IngestStats]
    restarts: int = 0
    catalogue: str = ""

    @property
    def total(self) -> IngestStats:
        total = IngestStats()
        for stats in self.workers.values():
            total.add(stats)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": {name: stats.to_dict() for name, stats in self.workers.items()},
            "total": self.total.to_dict(),
            "restarts": self.restarts,
            "catalogue": self.catalogue,
        }


def worker_client_id(base: str, index: int) -> str:
    """The stable client id of worker ``index`` (1-based)."""
    suffix = f"-ingest-{index}"
    return base[: 64 - len(suffix)] + suffix


def describe_catalogue(catalogue: ReleaseCatalogue) -> str:
    if catalogue.is_open:
        where = catalogue.repository.root_dir if catalogue.repository is not None else "none"
        return f"open (no release repository at {where}): release checks off"
    return f"{len(catalogue.model_ids())} released model(s)"


def _worker_main(settings: Settings, index: int, options: IngestOptions, conn: Connection) -> None:
    """A worker process: runs until SIGINT/SIGTERM, then sends its counters on ``conn``."""
    from edgeops.trust import repository_for

    name = worker_client_id(settings.mqtt_client_id, index)
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def stopping(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopping)
    database = Database(settings.database)
    try:
        endpoint = settings.mqtt_endpoint
        if endpoint is None:
            raise ConfigError("no broker configured: set EDGEOPS_MQTT_URL")
        database.check()
        worker = IngestWorker(
            endpoint,
            database,
            client_id=name,
            catalogue=ReleaseCatalogue(repository_for(settings)),
            group=options.group,
            batch_max=options.batch_max,
            batch_ms=options.batch_ms,
            tls=settings.tls_files,
            stats_every_s=options.stats_every_s,
        )
        worker.start(wait_s=options.connect_timeout_s)
    except EdgeOpsError as exc:
        conn.send({"error": str(exc), "kind": type(exc).__name__})
        database.dispose()
        raise SystemExit(2) from None
    conn.send({"started": os.getpid(), "client_id": name, "filter": worker.filter})
    try:
        worker.run(stop)
    finally:
        worker.stop()
        database.dispose()
        conn.send({"stats": worker.stats.to_dict()})
    log.info("ingest %s stopped: %s", name, worker.stats.line())


@dataclass
class _Child:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    pid: int | None = None
    stats: IngestStats | None = None
    error: str | None = None
    kind: str = ""


def run_ingest(
    settings: Settings,
    *,
    workers: int = 1,
    options: IngestOptions | None = None,
    on_event: Callable[[str], None] = lambda line: None,
    stop: threading.Event | None = None,
) -> IngestReport:
    """Run ``workers`` worker processes until SIGINT/SIGTERM (or ``stop``); their counters.

    A worker that dies (killed, crashed) is started again under its client id, so its
    queued share is not stranded. A worker that cannot start (broker or database
    unreachable) stops them all: BrokerError / DatabaseError naming the cause.
    """
    from edgeops.trust import repository_for

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    options = options or IngestOptions()
    telemetry_share(options.group)  # ConfigError before anything starts
    if settings.mqtt_endpoint is None:
        raise ConfigError(
            "no broker configured: set EDGEOPS_MQTT_URL (or run `edgeops broker` and point "
            "EDGEOPS_MQTT_URL at it)"
        )
    database = Database(settings.database)
    try:
        database.check()
        database.upgrade()
    finally:
        database.dispose()
    _check_broker(settings, options.connect_timeout_s)
    catalogue = describe_catalogue(ReleaseCatalogue(repository_for(settings)))
    on_event(f"release catalogue: {catalogue}")
    stop = stop or threading.Event()
    context = multiprocessing.get_context("spawn")

    def launch(index: int) -> _Child:
        parent, child = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker_main,
            args=(settings, index, options, child),
            name=f"ingest-{index}",
            daemon=False,
        )
        process.start()
        child.close()
        return _Child(index, process, parent)

    def stopping(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
    children = {index: launch(index) for index in range(1, workers + 1)}
    finished: dict[str, IngestStats] = {}
    restarts = 0
    fatal: _Child | None = None
    try:
        while not stop.is_set() and fatal is None:
            for child in list(children.values()):
                alive = child.process.is_alive()  # before reading: a dead child sent all
                _read(child, on_event)
                if child.error is not None:
                    fatal = child
                    break
                if not alive and not stop.is_set():
                    on_event(
                        f"worker {child.index} (pid {child.pid}) ended "
                        f"(exit code {child.process.exitcode}); starting it again"
                    )
                    child.conn.close()
                    restarts += 1
                    if stop.wait(1.0):  # no tight loop if a worker keeps dying
                        break
                    children[child.index] = launch(child.index)
            stop.wait(0.2)
    finally:
        for child in children.values():
            if child.process.is_alive() and child.process.pid is not None:
                os.kill(child.process.pid, signal.SIGTERM)
        for child in children.values():
            child.process.join(timeout=30)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
            _read(child, on_event)
            child.conn.close()
            if child.stats is not None:
                finished[worker_client_id(settings.mqtt_client_id, child.index)] = child.stats
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if fatal is not None:
        errors: dict[str, type[EdgeOpsError]] = {
            "BrokerError": BrokerError,
            "ConfigError": ConfigError,
            "DatabaseError": DatabaseError,
        }
        raise errors.get(fatal.kind, EdgeOpsError)(f"worker {fatal.index}: {fatal.error}")
    return IngestReport(finished, restarts=restarts, catalogue=catalogue)


def _check_broker(settings: Settings, wait_s: float) -> None:
    """Connect once with the settings' credentials: BrokerError saying why, before any
    worker process is started."""
    from device_agent.errors import LinkError
    from device_agent.link import MqttLink

    endpoint = settings.mqtt_endpoint
    assert endpoint is not None
    link = MqttLink(
        endpoint,
        client_id=worker_client_id(settings.mqtt_client_id, 0).replace("ingest-0", "ingest-check"),
        tls=settings.tls_files,
    )
    try:
        link.start(wait_s=wait_s)
    except LinkError as exc:
        raise BrokerError(str(exc)) from None
    link.stop()


def _read(child: _Child, on_event: Callable[[str], None]) -> None:
    """Take what ``child`` has sent so far."""
    try:
        while child.conn.poll():
            message = child.conn.recv()
            if "started" in message:
                child.pid = int(message["started"])
                on_event(
                    f"worker {child.index} started: pid {child.pid}, client id "
                    f"{message['client_id']}, subscribed to {message['filter']}"
                )
            elif "error" in message:
                child.error = str(message["error"])
                child.kind = str(message.get("kind", ""))
            elif "stats" in message:
                child.stats = IngestStats.from_dict(message["stats"])
    except (EOFError, OSError):
        pass
