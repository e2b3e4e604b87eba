"""The agent daemon: one MQTT identity, its models, its input source and its telemetry.

The daemon owns one :class:`MqttLink`. Its main loop runs on the caller's thread and is the
only code that acts on events; paho's callbacks merely fill the link's inbox, and the input
source is polled with a timeout (its own threads, if any, only queue requests). Each turn of the
loop handles every queued link event, then polls the source and runs samples for at most
``SAMPLE_BUDGET_S`` (so a busy source never starves MQTT; an idle one is waited on for that
long), closes a telemetry window when it is due, pumps the
offline buffer to the broker and re-publishes the state when the heartbeat is due.

On every (re)connect the agent publishes, retained, ``presence`` = online and its reported
``state`` (with the loaded champion and challenger in ``slots``); the broker publishes the
retained offline presence (the last will) if the device vanishes.

With ``model_dir`` the agent loads the champion bundle and opens the configured source.
Each sample is run through the champion, answered to the source (when it can take answers)
and fed to the :class:`WindowAggregator`. A challenger named by the desired state
(``{"challenger": {"model_id": ..., "path": ...}}``, the path under ``models_dir``) runs on
the same inputs; its outputs are never returned, only its agreement with the champion and
its latency go into the window's ``shadow`` field. Windows and events are written to the
:class:`OfflineBuffer` first and deleted only once the broker acknowledged them.

The champion is the bundle in the active model slot (``<state_dir>/slots``; the configured
``model_dir`` seeds slot a on the first start). A desired ``release`` hands the update to the
:class:`~device_agent.updater.service.UpdateService`: it runs on a worker thread, ``fetch/res``
payloads go to its fetcher, every transition is an ``update`` event through the offline
buffer, and the champion swap it asks for is done here, on the main loop, between samples.
``state`` reports ``update_state`` and the slots.

With an ``[mcu]`` table the agent is the gateway of a microcontroller board
(:class:`~device_agent.gateway.Gateway`): it reports the ``firmware`` runtime (and the board's
port and image in ``state.board``), a firmware bundle's champion is the board (samples go to
it over the serial port), the update's smoke test is the conformance test on the board
(reported as a ``conformance`` event), and at start-up the board is flashed with the active
slot's image if it runs another one.

Bad input (wrong shape, NaN, garbage from the source, a malformed desired document) is
answered with an error where the source can take answers, counted in the window's ``errors``
and never stops the loop.

On stop (SIGTERM) it answers the requests already queued by sources that take requests
(http, mqtt, stdin), stops the source, closes the current window, flushes the buffer for as
long as the broker acknowledges within ``shutdown_grace_s`` (the rest stays on disk for the
next start), publishes offline presence, waits for the broker's acknowledgement, and
disconnects cleanly.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from device_agent._version import __version__
from device_agent.buffer import BufferDrain, OfflineBuffer
from device_agent.config import AgentSettings
from device_agent.dispatch import Dispatcher
from device_agent.errors import AgentError, LinkError, ProtocolError
from device_agent.fsio import atomic_write_json
from device_agent.gateway import Gateway
from device_agent.health import HealthEndpoint
from device_agent.link import Connected, Disconnected, Message, MqttLink, Will
from device_agent.protocol import (
    QOS,
    SCHEMA_VERSION,
    Channel,
    Presence,
    StateReport,
    device_topic,
    encode,
)
from device_agent.runtime import InputError, ModelBundle, Runtime
from device_agent.shadow import RUN_ERRORS, ChallengerSlot, ChallengerSpec
from device_agent.shadow import ChallengerError as ChallengerError  # re-exported
from device_agent.sources import Sample, Source, open_source, reply_document
from device_agent.telemetry import WindowAggregator
from device_agent.updater.contract import FIRMWARE_CARD_RUNTIME, installed_runtimes
from device_agent.updater.machine import UpdateState
from device_agent.updater.service import UpdateService
from device_agent.updater.updater import LOCAL_RUNTIMES, ChampionHealth, Runtimes, Transition

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0
# update states after which the retained state report is published again (see _report_update)
_STATE_REPORTED = frozenset(
    {UpdateState.TESTING, UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.IDLE}
)
SAMPLE_BUDGET_S = 0.05  # samples run per loop turn before link events are looked at again
ANSWERING_SOURCES = frozenset({"http", "mqtt", "stdin"})  # someone waits for each sample
DROP_EVENT_INTERVAL_S = 60.0  # at most one "buffer_dropped" event per interval
CHAMPION_RETRY_S = 30.0  # a champion whose attached board failed at start is tried again
EVENT_TYPE = "event"


def detect_hardware() -> dict[str, str]:
    """Hardware tags this agent can find out by itself; configured tags override them."""
    tags = {"arch": platform.machine() or "unknown", "os": platform.system().lower() or "unknown"}
    mem = _meminfo_bytes("MemTotal")
    if mem is not None:
        tags["ram_mib"] = str(mem // (1024 * 1024))
    return tags


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def event_payload(device_id: str, seq: int, event: str, ts: float, detail: dict[str, Any]) -> bytes:
    """The wire form of an ``events`` message (schema 1, type ``event``)."""
    document = {
        "schema": SCHEMA_VERSION,
        "type": EVENT_TYPE,
        "device_id": device_id,
        "seq": seq,
        "event": event,
        "ts": ts,
        "detail": detail,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


class AgentDaemon:
    """Connects as one device, runs its models on its source and reports what it sees."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.hardware = {**detect_hardware(), **settings.hardware}
        # an attached board ([mcu]) serves firmware bundles; others run in this process
        self.gateway: Gateway | None = None
        self.runtimes: Runtimes = LOCAL_RUNTIMES
        if settings.mcu is not None:
            self.gateway = Gateway(settings.mcu, settings.state_dir, event=self._board_event)
            self.runtimes = self.gateway
        self._runtimes = sorted(
            installed_runtimes() | ({FIRMWARE_CARD_RUNTIME} if self.gateway else set())
        )
        self.dispatcher = Dispatcher()
        self.desired: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._state_published_at: float | None = None
        self._connection_ts = 0.0
        self.link = MqttLink(
            settings.endpoint,
            client_id=self.device_id,
            tls=settings.tls_files,
            will=self._next_will,
        )
        self.link.subscribe(device_topic(self.device_id, Channel.DESIRED), QOS)
        self.dispatcher.on_raw(Channel.DESIRED, self._on_desired)
        self._fetch_res_topic = device_topic(self.device_id, Channel.FETCH_RES)
        self.link.subscribe(self._fetch_res_topic, QOS)
        # the updater's thread waits for these: straight to its fetcher, not behind the loop
        self.link.route(self._fetch_res_topic, self._deliver_fetch)
        self._state_changed = threading.Event()  # set by the updater's thread: re-publish
        self.updates = UpdateService(
            settings,
            self.hardware,
            swap=self._swap_champion,
            health=self._champion_health,
            report=self._report_update,
            send_fetch=self._send_fetch,
            wake=self.link.nudge,
            runtimes=self.runtimes,
        )

        # inference: set up by run()
        self.champion: Runtime | None = None
        self.champion_bundle: ModelBundle | None = None
        self._challenger_slot = ChallengerSlot()
        self.source: Source | None = None
        self._source_shape: tuple[int, ...] = ()
        self.aggregator: WindowAggregator | None = None
        self.buffer: OfflineBuffer | None = None
        self.drain: BufferDrain | None = None
        self.samples_total = 0
        self.windows_total = 0
        self.errors: Counter[str] = Counter()
        self._champion_errors_base = 0  # errors["runtime"] when the champion was installed
        self._model_error: str | None = None
        self._source_error: str | None = None
        # (when, bundle dir): the champion's load failed on its attached board; tried again
        self._champion_retry: tuple[float, Path] | None = None
        self._source_done = False  # exhausted, or failed for good
        self._source_exhausted_handled = False
        self._source_errors_seen: Counter[str] = Counter()
        self._window_activity = 0  # samples + errors in the open window
        self._drop_event_total = 0  # buffer.dropped_total already reported as an event
        self._drop_event_at = float("-inf")
        self._health_endpoint: HealthEndpoint | None = None
        self._health_doc: dict[str, Any] = {}
        self._health_lock = threading.Lock()
        self._health_written_at = float("-inf")

    def _next_will(self) -> Will:
        """The will for the connection about to be made, stamped with its start time.

        The online presence of that connection carries the same ``ts``; the hub lets an
        offline presence win a tie, so this will ends exactly this connection, while a will
        of an older connection that arrives late (older ``ts``) changes nothing.
        """
        self._connection_ts = round(time.time(), 3)
        offline = Presence(self.device_id, online=False, ts=self._connection_ts)
        return Will(device_topic(self.device_id, Channel.PRESENCE), encode(offline))

    @property
    def health_file(self) -> Path:
        return self.settings.state_dir / "health.json"

    @property
    def health_port(self) -> int | None:
        """The port of the local health endpoint once it listens (0 in settings: any)."""
        return self._health_endpoint.port if self._health_endpoint else None

    @property
    def challenger(self) -> Runtime | None:
        """The challenger running in shadow mode, if any."""
        return self._challenger_slot.runtime

    @property
    def challenger_path(self) -> Path | None:
        """The bundle directory the challenger was loaded from, if any."""
        return self._challenger_slot.path

    def stop(self) -> None:
        """Ask the main loop to drain and exit (safe from signal handlers and other threads)."""
        self._stop.set()  # no nudge: a queue's lock is not safe in a signal handler

    def run(self) -> int:
        """Run until :meth:`stop`; returns the process exit code."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("agent %s starting, broker %s", self.device_id, self.link.endpoint.url)
        self._open_buffer()
        try:
            champion_dir = self.updates.boot()  # the resume map runs before any model loads
            self._start_inference(champion_dir)
            self._start_health_server()
            self.link.start()
            self._write_health("connecting")
            self.updates.start()
            while not self._stop.is_set():
                self._turn()
        finally:
            self._shutdown()
        return 0

    # -- start -----------------------------------------------------------------------------

    def _open_buffer(self) -> None:
        path = self.settings.state_dir / "buffer.sqlite3"
        self.buffer = OfflineBuffer(path, max_items=self.settings.buffer_max_items)
        self.drain = BufferDrain(self.buffer, self.link)
        self._drop_event_total = self.buffer.dropped_total
        moved = self.buffer.recovered_from_corruption
        if moved is not None:
            log.error("offline buffer %s was corrupt; moved to %s, started afresh", path, moved)
            self._event("buffer_corruption_recovered", path=str(path), moved_to=str(moved))

    def _start_inference(self, model_dir: Path | None) -> None:
        """Load the champion from ``model_dir`` (the active slot, else the configured
        bundle) and open the source; a failure is reported, never fatal."""
        if model_dir is None:
            return
        self._champion_retry = None
        try:
            bundle = ModelBundle.load(model_dir)
            # a firmware bundle: the board is flashed first if it runs another image (a
            # power cut between a flash and the end of a rollback left it so)
            runtime = self.runtimes.open(bundle)
        except AgentError as exc:
            self._model_error = str(exc)
            log.error("champion model in %s not loaded: %s", model_dir, exc)
            self._event("model_load_failed", role="champion", path=str(model_dir), error=str(exc))
            if getattr(exc, "kind", None) == "transport":
                # an attached board unplugged or busy at start: tried again, not given up
                self._champion_retry = (time.monotonic() + CHAMPION_RETRY_S, model_dir)
            return
        self._install_champion(bundle, runtime)
        log.info("champion %s loaded (%s)", runtime.model_id, runtime.name)
        if self.settings.source is None:
            log.warning("no source configured: the champion waits for nothing to run on")
            return
        self._open_source(bundle)

    def _open_source(self, bundle: ModelBundle) -> None:
        """Open the configured source for the raw input shape of ``bundle``'s rule (at start,
        or when the first champion arrives by an update); a failure is reported, not fatal."""
        assert self.settings.source is not None
        kind = self.settings.source.kind
        try:
            self.source = open_source(self.settings.source, bundle.rule.input_shape)
            self._source_shape = bundle.rule.input_shape
        except AgentError as exc:  # a missing file, a port in use: reported, not fatal
            self._source_error = str(exc)
            log.error("source %s not opened: %s", kind, exc)
            self._event("source_failed", kind=kind, error=str(exc))
            return
        self._source_error = None
        log.info("source %s open", kind)

    def _retry_champion(self) -> None:
        """Load the champion again once its retry is due (its attached board failed)."""
        retry = self._champion_retry
        if retry is not None and self.champion is None and time.monotonic() >= retry[0]:
            self._start_inference(retry[1])
            self._state_changed.set()

    def _install_champion(self, bundle: ModelBundle, runtime: Runtime) -> None:
        self._champion_retry = None
        self._champion_errors_base = self.errors["runtime"]  # counted from here on
        self.champion_bundle, self.champion = bundle, runtime
        self._model_error = None
        self.aggregator = WindowAggregator(
            self.device_id,
            runtime.model_id,
            bundle.reference,
            window_samples=self.settings.window_samples,
            window_seconds=self.settings.window_seconds,
            raw_sample_rate=self.settings.raw_sample_rate,
        )

    # -- the updater's hooks ---------------------------------------------------------------

    def _swap_champion(self, bundle_dir: Path | None) -> None:
        """Replace the champion with the bundle in ``bundle_dir`` (main loop thread only).

        AgentError, the old champion kept, if the new one does not load or cannot serve the
        open source (another raw input shape).
        """
        if bundle_dir is None:
            bundle, runtime = None, None
        else:
            bundle = ModelBundle.load(bundle_dir)
            if self.source is not None and bundle.rule.input_shape != self.source_shape:
                raise AgentError(
                    f"the model in {bundle_dir} takes raw samples of shape "
                    f"{list(bundle.rule.input_shape)}, the source gives {list(self.source_shape)}"
                )
            runtime = self.runtimes.open(bundle)
        if self._window_activity:
            self._close_window()  # a window speaks of one champion
        old = self.champion
        if bundle is None or runtime is None:
            self._champion_errors_base = self.errors["runtime"]
            self.champion_bundle, self.champion, self.aggregator = None, None, None
        else:
            self._install_champion(bundle, runtime)
            log.info("champion %s activated from %s", runtime.model_id, bundle_dir)
            if self.source is None and self.settings.source is not None:
                # the first champion came by an update (the device booted without a model):
                # the source opens now, for that model's raw input shape
                self._open_source(bundle)
        if old is not None:
            old.close()
        self._state_changed.set()

    @property
    def source_shape(self) -> tuple[int, ...]:
        """The raw sample shape the open source was opened with."""
        return self._source_shape

    def _champion_health(self) -> ChampionHealth:
        """The champion and its runtime errors since it was installed (on this thread, at the
        swap: errors of the model it replaced never count against it)."""
        champion, base = self.champion, self._champion_errors_base
        return ChampionHealth(
            champion.model_id if champion else None, self.errors["runtime"] - base
        )

    def _report_update(self, transition: Transition) -> None:
        """An updater transition (worker thread): an ``update`` event, and a state re-publish
        where the update ends (``committed``, ``rolled_back``, ``idle``) or starts its test
        (``testing``); the steps in between reach the hub as the events, which carry the
        update state, and the champion swap re-publishes the slots it changed."""
        self._event("update", **transition.detail())
        if transition.state in _STATE_REPORTED:
            self._state_changed.set()
        self.link.nudge()  # the main loop sends them now, not when it next wakes

    def _board_event(self, event: str, detail: dict[str, Any]) -> None:
        """An event of the attached board (``conformance``; the updater's worker thread)."""
        self._event(event, **detail)
        self.link.nudge()

    def _deliver_fetch(self, payload: bytes) -> None:
        """A ``fetch/res`` frame (binary, not a JSON document), on the link's network thread:
        the fetcher only decodes its header and wakes the download waiting for it."""
        self.updates.deliver(payload)

    def _send_fetch(self, payload: bytes) -> None:
        """Publish a ``fetch/req``; LinkError while disconnected (paho would queue it, and
        flush every queued resend at the reconnect, each answered with a whole chunk)."""
        if not self.link.connected:
            raise LinkError("the MQTT link is down; fetch request not sent")
        self.link.publish(device_topic(self.device_id, Channel.FETCH_REQ), payload, qos=QOS)

    def _start_health_server(self) -> None:
        if self.settings.health_port is None:
            return
        endpoint = HealthEndpoint(self.health_snapshot, self.settings.health_port)
        endpoint.start()
        self._health_endpoint = endpoint
        log.info("health endpoint on http://127.0.0.1:%d/health", self.health_port)

    # -- the loop --------------------------------------------------------------------------

    def _turn(self) -> None:
        """One turn of the main loop."""
        self.updates.pump()
        self._retry_champion()
        if self.champion is None:
            event = self.link.get(timeout_s=0.25)
            if event is not None:
                self._handle(event)
        else:
            while (event := self.link.get(timeout_s=0)) is not None:
                self._handle(event)
            ready_at = None if self.source is None else self.source.ready_at()
            # work another thread asked for since the turn began (its nudge may have been
            # taken by the drain above): no waiting then
            limit = 0.0 if self._owes_work() else SAMPLE_BUDGET_S
            if self.source is None or self._source_done:
                event = self.link.get(timeout_s=limit)
                if event is not None:
                    self._handle(event)
            elif ready_at is not None and (wait := ready_at - time.monotonic()) > 0:
                # a paced source's next sample is not due yet: wait for MQTT events instead
                event = self.link.get(timeout_s=min(wait, limit))
                if event is not None:
                    self._handle(event)
            else:
                self._run_samples(self.source, SAMPLE_BUDGET_S)
            self._fold_source_errors()
            if self.aggregator is not None and self.aggregator.due(time.time()):
                self._close_window()
            self._check_source_exhausted()
        self._pump()
        self._heartbeat()

    def _owes_work(self) -> bool:
        """A state change to publish (while connected: offline it waits for the connection,
        whose event wakes the loop), a champion swap to make or a stop to carry out."""
        return (
            (self._state_changed.is_set() and self.link.connected)
            or self.updates.swap_pending()
            or self._stop.is_set()
        )

    def _run_samples(self, source: Source, budget_s: float) -> int:
        """Poll ``source`` and run its samples for up to ``budget_s``; how many ran."""
        deadline = time.monotonic() + budget_s
        done = 0
        while (remaining := deadline - time.monotonic()) > 0:
            ready_at = source.ready_at()
            if done and ready_at is not None and ready_at > time.monotonic():
                break  # the next one is not due: the loop waits for it on the link instead
            try:
                sample = source.poll(remaining)
            except (AgentError, OSError) as exc:
                log.error("source failed, no more samples from it: %s", exc)
                self._count_error("source_failed", exc)
                self._source_error = str(exc)
                self._event("source_failed", kind=source.kind, error=str(exc))
                self._source_done = True
                break
            if sample is None:
                self._source_done = source.exhausted
                break
            self._run_sample(sample)
            done += 1
        return done

    def _run_sample(self, sample: Sample) -> None:
        champion, aggregator = self.champion, self.aggregator
        if champion is None or aggregator is None:
            return
        try:
            prediction = champion.infer(sample.raw)
        except InputError as exc:
            self._sample_error("input", exc, sample)
            return
        except RUN_ERRORS as exc:
            self._sample_error("runtime", exc, sample)
            return
        self._reply(sample, reply_document(prediction, champion.model_id))
        self._fold_source_errors()  # errors that came before this sample, in its window
        try:  # the challenger's output never leaves the agent
            shadow = self._challenger_slot.run(sample.raw, prediction)
        except RUN_ERRORS as exc:
            self._count_error("shadow", exc)
            shadow = None
        aggregator.add(prediction, sample.raw, shadow=shadow)
        self.samples_total += 1
        self._window_activity += 1
        if aggregator.due(time.time()):
            self._close_window()

    def _sample_error(self, kind: str, exc: BaseException, sample: Sample) -> None:
        self._count_error(kind, exc)
        self._reply(sample, {"error": str(exc)})

    def _count_error(self, kind: str, exc: BaseException | None = None) -> None:
        self.errors[kind] += 1
        if self.aggregator is not None:
            self.aggregator.add_error(kind)
            self._window_activity += 1
        if exc is not None:
            log.debug("%s error: %s", kind, exc)

    def _reply(self, sample: Sample, body: dict[str, Any]) -> None:
        if sample.reply is None:
            return
        try:
            sample.reply(body)
        except (OSError, ValueError, AgentError) as exc:  # the application went away
            self._count_error("reply", exc)

    def _fold_source_errors(self) -> None:
        """Count the source's own errors (unparsable lines, wrong shapes) in the window."""
        if self.source is None:
            return
        current = self.source.errors  # replaced by the source on change, never mutated
        if current is self._source_errors_seen:
            return
        for kind, total in current.items():
            for _ in range(total - self._source_errors_seen[kind]):
                self._count_error(f"source_{kind}")
        self._source_errors_seen = current

    def _check_source_exhausted(self) -> None:
        if self._source_exhausted_handled or not self._source_done:
            return
        self._source_exhausted_handled = True
        self._fold_source_errors()
        log.info("source exhausted after %d samples", self.samples_total)
        if self._window_activity:
            self._close_window()
        self._write_health(self._status())

    # -- telemetry and events through the buffer -------------------------------------------

    def _close_window(self) -> None:
        aggregator, buffer = self.aggregator, self.buffer
        if aggregator is None or buffer is None:
            return
        window = aggregator.close_window(time.time())
        self._window_activity = 0
        # the loss at the bound is taken in the append's transaction: reported exactly once
        payload = window.payload_factory(buffer.take_dropped)
        try:
            buffer.append(device_topic(self.device_id, Channel.TELEMETRY), payload)
        except AgentError as exc:  # the disk is full or gone: this window is lost, counted
            self.errors["buffer"] += 1
            log.error("telemetry window of %d samples lost: %s", window.samples, exc)
            return
        self.windows_total += 1
        self._check_drops()

    def _check_drops(self) -> None:
        """Report, as an event, messages the full buffer dropped (at most once a minute)."""
        buffer = self.buffer
        if buffer is None or buffer.dropped_total <= self._drop_event_total:
            return
        now = time.monotonic()
        if now - self._drop_event_at < DROP_EVENT_INTERVAL_S:
            return
        dropped = buffer.dropped_total - self._drop_event_total
        self._drop_event_total = buffer.dropped_total
        self._drop_event_at = now
        log.warning("offline buffer full: %d oldest messages dropped", dropped)
        self._event(
            "buffer_dropped",
            dropped=dropped,
            dropped_total=buffer.dropped_total,
            max_items=self.settings.buffer_max_items,
        )

    def _event(self, event: str, /, **detail: Any) -> None:
        """Queue an ``events`` message in the offline buffer."""
        if self.buffer is None:
            return
        ts = round(time.time(), 3)

        def payload(seq: int) -> bytes:
            return event_payload(self.device_id, seq, event, ts, detail)

        try:
            self.buffer.append(device_topic(self.device_id, Channel.EVENTS), payload)
        except AgentError as exc:
            self.errors["buffer"] += 1
            log.error("event %s lost: %s", event, exc)

    def _pump(self) -> None:
        if self.drain is not None and self.link.connected:
            try:
                self.drain.pump()
            except AgentError as exc:  # the rows stay in the buffer for the next turn
                self.errors["buffer"] += 1
                log.error("offline buffer not drained: %s", exc)

    # -- events from the broker ------------------------------------------------------------

    def _handle(self, event: Message | Connected | Disconnected) -> None:
        if isinstance(event, Connected):
            log.info("connected to %s", self.link.endpoint.url)
            online = Presence(self.device_id, online=True, ts=self._connection_ts)
            self._publish(Channel.PRESENCE, encode(online))
            self._publish_state()
            self._write_health("connected")
        elif isinstance(event, Disconnected):
            log.warning("disconnected (%s); reconnecting", event.reason)
            self._write_health("connecting")
        else:
            self.dispatcher.dispatch(event)

    def _on_desired(self, device_id: str, document: dict[str, Any]) -> None:
        self.desired = document
        atomic_write_json(self.settings.state_dir / "desired.json", document)
        log.info("desired state received", extra={"desired_keys": sorted(document)})
        if self.set_challenger(document.get("challenger")):
            self._publish_state()
        try:
            self.updates.on_desired(document)
        except ProtocolError as exc:
            self._count_error("desired", exc)
            log.error("desired release refused: %s", exc)

    def set_challenger(self, spec: Any) -> bool:
        """Start, keep or stop the challenger named by ``spec``; True if the slots changed.

        ``spec`` is ``None`` (no challenger) or ``{"model_id": str, "path": str}`` with the
        bundle's path relative to (or inside) ``models_dir``. A bad spec or a bundle that does
        not load is reported as a ``model_load_failed`` event and leaves no challenger.
        """
        if not spec:
            return self._stop_challenger("desired state names no challenger")
        try:
            wanted = ChallengerSpec.parse(spec, self.settings.challenger_dir)
        except AgentError as exc:
            self._count_error("desired", exc)
            self._event("model_load_failed", role="challenger", error=str(exc))
            log.error("challenger refused: %s", exc)
            return self._stop_challenger("refused")
        if self._challenger_slot.holds(wanted):
            return False
        model_id, path = wanted.model_id, wanted.path
        changed = self._stop_challenger(f"replaced by {model_id}")
        try:
            runtime = self._challenger_slot.load(wanted, self.champion_bundle)
        except AgentError as exc:
            log.error("challenger %s in %s not loaded: %s", model_id, path, exc)
            self._event(
                "model_load_failed", role="challenger", model_id=model_id, path=str(path),
                error=str(exc),
            )  # fmt: skip
            return changed
        if self._window_activity:
            self._close_window()  # a window's shadow field speaks of one challenger
        self._challenger_slot.install(runtime, path)
        log.info("challenger %s started in shadow mode (%s)", model_id, runtime.name)
        self._event("challenger_started", model_id=model_id, path=str(path), runtime=runtime.name)
        return True

    def _stop_challenger(self, reason: str) -> bool:
        challenger = self._challenger_slot.runtime
        if challenger is None:
            return False
        if self._window_activity:
            self._close_window()
        self._challenger_slot.stop()
        log.info("challenger %s stopped: %s", challenger.model_id, reason)
        self._event("challenger_stopped", model_id=challenger.model_id, reason=reason)
        return True

    # -- state and health ------------------------------------------------------------------

    def slots(self) -> dict[str, Any]:
        """The loaded models and the A/B slots (``active``, ``a``, ``b``), as reported in
        ``state``."""
        slots: dict[str, Any] = self.updates.slots_report()
        for role, runtime in (("champion", self.champion), ("challenger", self.challenger)):
            if runtime is not None:
                slots[role] = {"model_id": runtime.model_id, "runtime": runtime.name}
        return slots

    def _heartbeat(self) -> None:
        due = (
            self._state_published_at is None
            or time.monotonic() - self._state_published_at >= self.settings.heartbeat_s
            or self._state_changed.is_set()
        )
        if due and self.link.connected:
            slots = self.slots()  # read once for both documents
            self._publish_state(slots)
            self._write_health("connected", slots)
        elif time.monotonic() - self._health_written_at >= self.settings.heartbeat_s:
            self._write_health(self._status())  # the counters stay current while offline

    def _publish_state(self, slots: dict[str, Any] | None = None) -> None:
        self._state_changed.clear()
        report = StateReport(
            device_id=self.device_id,
            agent_version=__version__,
            hardware=self.hardware,
            slots=self.slots() if slots is None else slots,
            update_state=str(self.updates.state),
            health="model_error" if self._model_error else "ok",
            free_memory_bytes=_meminfo_bytes("MemAvailable"),
            # what a rollout's pre-check matches a release's runtime against
            extra={"runtimes": self._runtimes, **self._board_report()},
        )
        self._publish(Channel.STATE, encode(report))
        self._state_published_at = time.monotonic()

    def _board_report(self) -> dict[str, Any]:
        """``{"board": {"port", "image_sha256"}}`` with an attached board, else nothing."""
        return {"board": self.gateway.describe()} if self.gateway is not None else {}

    def _publish(self, channel: Channel, payload: bytes) -> None:
        self.link.publish(
            device_topic(self.device_id, channel), payload, qos=QOS, retain=channel.retained
        )

    def _status(self) -> str:
        return "connected" if self.link.connected else "connecting"

    def health_snapshot(self) -> dict[str, Any]:
        """The last health document written (served by the health endpoint)."""
        with self._health_lock:
            return dict(self._health_doc)

    def _write_health(self, status: str, slots: dict[str, Any] | None = None) -> None:
        doc = {
            "device_id": self.device_id,
            "agent_version": __version__,
            "status": status,
            "ts": round(time.time(), 3),
            "broker": self.link.endpoint.url,
            "dropped_messages": dict(self.dispatcher.dropped),
            "desired_seen": self.desired is not None,
            "slots": self.slots() if slots is None else slots,
            "update_state": str(self.updates.state),
            "model_error": self._model_error,
            "source_error": self._source_error,
            "samples": self.samples_total,
            "errors": dict(self.errors),
            "windows": self.windows_total,
            "source_exhausted": self._source_exhausted_handled,
            "buffer_pending": len(self.buffer) if self.buffer else 0,
            "buffer_dropped_total": self.buffer.dropped_total if self.buffer else 0,
            "health_port": self.health_port,
        }
        with self._health_lock:
            self._health_doc = doc
        self._health_written_at = time.monotonic()
        atomic_write_json(self.health_file, doc, durable=False)  # a snapshot, rewritten

    # -- stop ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        self.updates.stop()  # an update in progress is resumed at the next start
        source = self.source
        if source is not None:
            if source.kind in ANSWERING_SOURCES and not self._source_done:
                # work in hand: requests already queued get their answers
                while time.monotonic() < deadline and self._run_samples(source, 0.0005):
                    pass
            source.close()
        self._fold_source_errors()
        if self._window_activity:
            self._close_window()
        self._flush(deadline)
        if self.link.connected:
            acked = self.link.publish(
                device_topic(self.device_id, Channel.PRESENCE),
                encode(Presence(self.device_id, online=False)),
                qos=QOS,
                retain=True,
                wait_s=ACK_TIMEOUT_S,
            )
            if not acked:
                log.warning("offline presence not acknowledged; the broker's will covers it")
        self.link.stop()
        for runtime in (self.challenger, self.champion):
            if runtime is not None:
                runtime.close()
        if self.gateway is not None:
            self.gateway.close()
        self._write_health("stopped")
        if self.buffer is not None:
            self.buffer.close()
        if self._health_endpoint is not None:
            self._health_endpoint.stop()
        log.info("agent %s stopped", self.device_id)

    def _flush(self, deadline: float) -> None:
        """Send what the buffer holds while the broker acknowledges, until ``deadline``."""
        buffer, drain = self.buffer, self.drain
        if buffer is None or drain is None:
            return
        try:
            if self.link.connected and drain.flush(max(0.0, deadline - time.monotonic())):
                return
        except AgentError as exc:
            log.error("offline buffer not flushed: %s", exc)
        left = len(buffer)
        if left:
            log.warning("%d messages stay in the offline buffer for the next start", left)
