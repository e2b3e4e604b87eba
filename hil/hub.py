"""The rig's hub: a whole EdgeOps hub in this process, for test plans to drive.

:class:`RigHub` runs what ``edgeops hub serve`` runs, on a directory of its own:

- its own Mosquitto (:class:`edgeops.broker.MosquittoProcess`: the shipped configuration,
  127.0.0.1, a free port, persistence in ``<workdir>/broker``), which
  :meth:`RigHub.restart_broker` stops and starts again on the same port and data directory
  (the "broker restart" fault: retained messages and persistent sessions survive);
- a SQLite database (``<workdir>/hub/edgeops.db``) and the content-addressed artifact store,
  with the built-in ``digits`` dataset registered on first use;
- a TUF release repository (``<workdir>/hub/trust``), its offline root key in
  ``<workdir>/offline-root-keys``; :attr:`RigHub.trust_root` is the ``root.json`` devices are
  provisioned with;
- in threads: the MQTT bridge (state, presence, events and telemetry into the database,
  telemetry checked against the released cards), the fetch server devices download releases
  from, the timestamp refresher, and the rollout engine ticking every :data:`TICK_S` seconds
  with its desired-state publisher.

Models are trained and compressed by the hub's own services (:meth:`RigHub.digits_model`)
and released by :func:`edgeops.trust.release_model` (:meth:`RigHub.release`);
:meth:`RigHub.release_firmware` publishes firmware generated from any .tflite under any card
(a firmware whose weights differ from what its card and test vectors describe, for
instance), signed like every other target.

Fleet operations go through the same services as the CLI: :meth:`RigHub.deploy` is
``edgeops devices deploy``, :meth:`RigHub.rollout` creates a rollout the running engine
carries out. What the hub recorded is read back from its database: reported twins
(:meth:`RigHub.device_state`), events, and the telemetry windows stored per device, with the
windows received again and dropped (:meth:`RigHub.telemetry_duplicates`) and the sequence
numbers that never arrived (:meth:`RigHub.sequence_gaps`: the agent numbers windows and
events with one counter).

Every failure is a :class:`RigHubError` (one line). :meth:`RigHub.close` (or leaving the
``with`` block, whichever way) stops every thread, link and child process the hub started.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from device_agent.fsio import atomic_write_bytes
from device_agent.telemetry import TelemetryWindow
from edgeops.errors import EdgeOpsError
from edgeops.fleet import FleetService
from edgeops.fleet.models import DeviceView
from edgeops.monitor import TelemetryService
from edgeops.monitor.service import RecordOutcome
from hil.errors import HilError

if TYPE_CHECKING:
    from device_agent.card import ModelCard
    from edgeops.broker import MosquittoProcess
    from edgeops.data import DatasetService
    from edgeops.db import Database
    from edgeops.hub import DesiredPublisher, HubBridge
    from edgeops.registry import ModelVersionView, Registry
    from edgeops.rollout.engine import RolloutEngine
    from edgeops.trust import TrustRepository

__all__ = ["ModelPair", "RigHub", "RigHubError"]

log = logging.getLogger(__name__)

TICK_S = 0.5
"""How often the rollout engine ticks (the hub's own default is every second)."""
POLL_S = 0.1
"""How often the waiting methods look again."""
DIGITS_MODEL = "digits-mlp"
"""The registry name of :meth:`RigHub.digits_model`'s float versions."""
FINISHED_ROLLOUT = ("succeeded", "failed", "aborted")


class RigHubError(HilError):
    """The rig's hub could not do what it was asked; the message says what and why."""


@dataclass(frozen=True)
class ModelPair:
    """A model trained by the hub (``keras``, float) and its full-int8 compression (``int8``),
    both registered."""

    keras: ModelVersionView
    int8: ModelVersionView

    @property
    def keras_id(self) -> str:
        return self.keras.id

    @property
    def int8_id(self) -> str:
        return self.int8.id


class _CountingTelemetry(TelemetryService):
    """The hub's telemetry service, counting per device the windows it did not store
    because an identical one was stored (a redelivery) or another one under the same
    sequence number was (a replayed number).

    The hub itself counts these only for all devices together
    (:attr:`edgeops.hub.HubBridge.ingest`). Each batch is written device by device, every
    write inside the bridge's one transaction. A batch whose transaction fails is replayed
    one message at a time by the bridge; duplicates it held would be counted again then
    (the rig's local SQLite database does not fail that way).
    """

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.duplicates: Counter[str] = Counter()
        self.replayed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record_many(self, windows: Sequence[TelemetryWindow]) -> RecordOutcome:
        by_device: dict[str, list[TelemetryWindow]] = {}
        for window in windows:
            by_device.setdefault(window.device_id, []).append(window)
        total = RecordOutcome()
        counted: list[tuple[str, RecordOutcome]] = []
        for device_id, group in by_device.items():
            outcome = super().record_many(group)
            total.stored += outcome.stored
            total.duplicates += outcome.duplicates
            total.replayed.extend(outcome.replayed)
            counted.append((device_id, outcome))
        with self._lock:
            for device_id, outcome in counted:
                self.duplicates[device_id] += outcome.duplicates
                self.replayed[device_id] += len(outcome.replayed)
        return total


class RigHub:
    """A hub in this process on ``workdir`` (see the module docstring).

    ``seed`` seeds training and compression. Use it as a context manager, or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(self, workdir: Path, *, seed: int = 0) -> None:
        self.workdir = Path(workdir)
        self.seed = seed
        self._stack: ExitStack | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._broker: MosquittoProcess | None = None
        self._models: dict[int, ModelPair] = {}
        self._dataset_version: str | None = None
        self._lock = threading.RLock()
        # set by start()
        self._database: Database | None = None
        self._registry: Registry | None = None
        self._datasets: DatasetService | None = None
        self._repository: TrustRepository | None = None
        self._fleet: FleetService | None = None
        self._telemetry: _CountingTelemetry | None = None
        self._bridge: HubBridge | None = None
        self._publisher: DesiredPublisher | None = None
        self._engine: RolloutEngine | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and every hub service; RigHubError (everything started so far
        stopped again) if one cannot start."""
        if self._stack is not None:
            raise RigHubError(f"the rig's hub in {self.workdir} is already running")
        stack = ExitStack()
        self._stack = stack
        try:
            self._start(stack)
        except BaseException as exc:
            self.close()
            if isinstance(exc, EdgeOpsError):
                raise RigHubError(f"the rig's hub did not start: {exc}") from None
            raise
        return self

    def _start(self, stack: ExitStack) -> None:
        from device_agent.link import MqttEndpoint
        from edgeops.broker import MosquittoProcess
        from edgeops.config import Settings
        from edgeops.hub import DesiredPublisher, HubBridge
        from edgeops.hub.serve import run_every
        from edgeops.hub.stores import open_stores
        from edgeops.monitor.ingest import ReleaseCatalogue
        from edgeops.rollout.engine import RolloutEngine
        from edgeops.trust import FetchServer, TimestampRefresher, repository_for

        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = Settings(data_dir=self.workdir / "hub", database_url=None)
        stores = stack.enter_context(open_stores(settings.database, settings.artifacts_dir))
        self._database = stores.database
        self._registry, self._datasets = stores.registry(), stores.datasets()
        repository = repository_for(settings)
        if not repository.exists():
            repository.init(self.workdir / "offline-root-keys")
        self._repository = repository

        broker = MosquittoProcess(self.workdir / "broker")
        self._broker = broker
        stack.callback(self._stop_broker)
        broker.start()
        endpoint = MqttEndpoint.parse(broker.url)

        self._fleet = FleetService(stores.database)
        self._telemetry = _CountingTelemetry(stores.database)
        bridge = HubBridge(
            endpoint,
            self._fleet,
            telemetry=self._telemetry,
            catalogue=ReleaseCatalogue(repository),
            client_id="rig-hub",
        )
        bridge.start()
        stack.callback(bridge.stop)
        self._bridge = bridge
        fetch = FetchServer(repository.repository_dir, endpoint, client_id="rig-hub-fetch")
        fetch.start()
        stack.callback(fetch.stop)
        refresher = TimestampRefresher(repository, interval_s=settings.trust_refresh_interval_s)
        refresher.start()
        stack.callback(refresher.stop)
        publisher = DesiredPublisher(endpoint, client_id="rig-hub")
        publisher.start()
        stack.callback(publisher.stop)
        self._publisher = publisher
        self._engine = RolloutEngine(stores.database, publisher, repository=repository)

        self._stop.clear()
        stack.callback(self._stop_threads)
        pump = threading.Thread(
            target=bridge.run, args=(self._stop,), name="rig-hub-bridge", daemon=True
        )
        pump.start()
        self._threads = [pump, run_every(TICK_S, self._engine.tick, self._stop, "rig-hub-engine")]

    def _stop_threads(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._threads = []

    def _stop_broker(self) -> None:
        from edgeops.errors import BrokerError

        if self._broker is not None:
            try:
                self._broker.stop()
            except BrokerError as exc:  # it had died by itself: stopped all the same
                log.warning("%s", exc)

    def close(self) -> None:
        """Stop every thread, link and child process; safe to call twice."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the parts -------------------------------------------------------------------------

    def _need(self, part: Any, what: str) -> Any:
        if part is None or self._stack is None:
            raise RigHubError(f"the rig's hub in {self.workdir} is not running ({what})")
        return part

    @property
    def database(self) -> Database:
        database: Database = self._need(self._database, "database")
        return database

    @property
    def registry(self) -> Registry:
        registry: Registry = self._need(self._registry, "registry")
        return registry

    @property
    def datasets(self) -> DatasetService:
        datasets: DatasetService = self._need(self._datasets, "datasets")
        return datasets

    @property
    def repository(self) -> TrustRepository:
        repository: TrustRepository = self._need(self._repository, "release repository")
        return repository

    @property
    def fleet(self) -> FleetService:
        fleet: FleetService = self._need(self._fleet, "fleet")
        return fleet

    @property
    def engine(self) -> RolloutEngine:
        engine: RolloutEngine = self._need(self._engine, "rollout engine")
        return engine

    @property
    def bridge(self) -> HubBridge:
        bridge: HubBridge = self._need(self._bridge, "bridge")
        return bridge

    # -- the broker ------------------------------------------------------------------------

    @property
    def broker(self) -> MosquittoProcess:
        broker: MosquittoProcess = self._need(self._broker, "broker")
        return broker

    @property
    def broker_port(self) -> int:
        return self.broker.port

    @property
    def broker_url(self) -> str:
        """``mqtt://127.0.0.1:<port>``: what devices connect to."""
        return self.broker.url

    def restart_broker(self, down_s: float = 0.0) -> None:
        """Stop the broker (it saves its persistence file), wait ``down_s`` seconds, and start
        it again on the same port and data directory; the hub's links reconnect by
        themselves. RigHubError if it does not come back."""
        from edgeops.broker import MosquittoProcess
        from edgeops.errors import BrokerError

        old = self.broker
        if down_s < 0:
            raise RigHubError(f"down_s must not be negative, got {down_s:g}")
        try:
            old.stop()
        except BrokerError as exc:  # it had died by itself: started again all the same
            log.warning("%s", exc)
        time.sleep(down_s)
        # a fresh process object with the port given: never moved to another free port
        broker = MosquittoProcess(old.data_dir, port=old.port, host=old.host)
        self._broker = broker
        try:
            broker.start()
        except BrokerError as exc:
            raise RigHubError(f"the broker did not come back on port {old.port}: {exc}") from None

    # -- trust -----------------------------------------------------------------------------

    @property
    def trust_root(self) -> Path:
        """The newest ``root.json``: what devices are provisioned with."""
        return Path(self.repository.root_json_path)

    # -- models ----------------------------------------------------------------------------

    def _digits(self) -> str:
        if self._dataset_version is None:
            self._dataset_version = self.datasets.register_builtin("digits").version
        return self._dataset_version

    def digits_model(self, epochs: int = 2) -> ModelPair:
        """The digits MLP trained ``epochs`` epochs (seeded) and compressed to full int8
        (post-training, kept whatever its accuracy), both registered (``digits-mlp``, and
        the name the compressor gives its version); made once per epochs count and RigHub."""
        with self._lock:
            if epochs in self._models:
                return self._models[epochs]
            from edgeops.compress import CompressService
            from edgeops.train import TrainService

            dataset = self._digits()
            try:
                keras = TrainService(self.datasets, self.registry).train(
                    dataset, "mlp", epochs=epochs, seed=self.seed, name=DIGITS_MODEL,
                    progress=False, evaluate_on_runtime=False,
                )  # fmt: skip
                int8 = CompressService(self.datasets, self.registry).compress(
                    keras.id, quantize="int8", max_loss_pp=100.0, seed=self.seed, progress=False
                )
            except EdgeOpsError as exc:
                raise RigHubError(f"the digits model could not be made: {exc}") from None
            pair = ModelPair(keras, int8)
            self._models[epochs] = pair
            return pair

    def release(
        self,
        model_id: str,
        *,
        runtime: str = "litert",
        firmware: str | None = None,
        hardware: Mapping[str, Sequence[str]] | None = None,
    ) -> str:
        """Release a registered model (:func:`edgeops.trust.release_model`): ``litert``,
        ``onnx``, ``mcu``, or with ``firmware`` (runtime ``mcu``) the firmware generated for
        that target; ``hardware`` is the target's hardware contract. The target path."""
        from edgeops.trust import release_model

        try:
            released = release_model(
                self.repository,
                model_id,
                registry=self.registry,
                datasets=self.datasets,
                runtime=runtime,
                hardware=hardware,
                firmware=firmware,
            )
        except EdgeOpsError as exc:
            raise RigHubError(f"{model_id} was not released: {exc}") from None
        return released.path

    def model_card(self, model_id: str) -> ModelCard:
        """The ``tflm`` card of a registered full-int8 model, as :meth:`release` makes it
        for firmware: what :meth:`release_firmware` takes."""
        from edgeops.export import UnsupportedExportError, export_artifact

        try:
            view = self.registry.get_model(model_id)
            return export_artifact(
                view, "tflite", registry=self.registry, datasets=self.datasets, runtime="tflm"
            ).card
        except (EdgeOpsError, UnsupportedExportError) as exc:
            raise RigHubError(f"no tflm card for {model_id}: {exc}") from None

    def model_tflite(self, model_id: str) -> bytes:
        """The stored .tflite of a registered model."""
        try:
            view = self.registry.get_model(model_id)
        except EdgeOpsError as exc:
            raise RigHubError(str(exc)) from None
        if view.format != "tflite":
            raise RigHubError(f"{model_id} is a .{view.format} model, not a .tflite one")
        return bytes(self.registry.load_artifact(model_id))

    def release_firmware(
        self,
        tflite: bytes,
        card: ModelCard,
        target: str,
        name: str,
        *,
        hardware: Mapping[str, Sequence[str]] | None = None,
    ) -> str:
        """Publish the firmware generated for ``target`` from ``tflite``, under ``card``
        (the ``tflm`` card of :meth:`model_card`, its test vectors included), as the next
        version of ``name``: ``{name}/{n}/mcu/firmware-{target}.tar``, signed like any
        release. Nothing checks that ``tflite`` is the model ``card`` describes. The
        target path."""
        from edgeops.trust import build_custom
        from edgeops.trust.release import build_firmware_release, check_firmware_target
        from edgeops.trust.release import target_path as make_target_path

        repository = self.repository
        try:
            check_firmware_target("mcu", target)
            taken = [
                int(parts[1])
                for t in repository.targets()
                if len(parts := t.path.split("/")) == 4 and parts[0] == name and parts[1].isdigit()
            ]
            seq = max(taken, default=0) + 1
            path = make_target_path(name, seq, "mcu", firmware=target)
            tflm_card = dataclasses.replace(card, runtime="tflm")
            released, archive = build_firmware_release(
                bytes(tflite), tflm_card, target, prefix=f"{name}-{seq}-{target}"
            )
            repository.add_target(path, archive, build_custom(released, "mcu", hardware))
        except EdgeOpsError as exc:
            raise RigHubError(f"firmware {name} for {target} was not released: {exc}") from None
        return path

    def bundle(self, target_path: str, dest: Path) -> Path:
        """The device-side bundle of a released target in ``dest`` (the signed bytes and its
        card, :func:`edgeops.fleet.simulator.release_bundle`): a board's factory model."""
        from edgeops.fleet.simulator import release_bundle

        try:
            return release_bundle(self.repository, target_path, Path(dest))
        except EdgeOpsError as exc:
            raise RigHubError(f"no bundle of {target_path}: {exc}") from None

    def target_bytes(self, target_path: str) -> bytes:
        """The signed bytes of a released target."""
        try:
            target = self.repository.get_target(target_path)
        except EdgeOpsError as exc:
            raise RigHubError(str(exc)) from None
        return self.repository.target_file_path(target).read_bytes()

    def firmware_image(self, target_path: str, dest: Path) -> Path:
        """The ``firmware.elf`` inside a firmware target's tar, written (atomically) to
        ``dest`` (a file, or ``dest/firmware.elf`` if ``dest`` is a directory). RigHubError
        if the target is not a firmware archive or holds no ELF (generated for a target QEMU
        does not run, or released without the Arm toolchain)."""
        data = self.target_bytes(target_path)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                members = [m for m in archive.getmembers() if m.name.endswith("/firmware.elf")]
                if not members or not members[0].isfile():
                    raise RigHubError(f"target {target_path} holds no firmware.elf")
                extracted = archive.extractfile(members[0])
                assert extracted is not None  # a regular file
                elf = extracted.read()
        except tarfile.TarError as exc:
            raise RigHubError(f"target {target_path} is not a firmware archive: {exc}") from None
        dest = Path(dest)
        path = dest / "firmware.elf" if dest.is_dir() else dest
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, elf, mode=0o755)
        return path

    # -- fleet -----------------------------------------------------------------------------

    def deploy(self, device_ids: Iterable[str], target_path: str) -> list[str]:
        """Point the devices at a release, as ``edgeops devices deploy`` does: their desired
        release set in one transaction and published, retained. The ids of devices whose
        desired document the broker did not acknowledge (the hub does not publish it again
        by itself). RigHubError for an unknown release or device (nothing changed), or if
        the publisher cannot hand the documents to its link (the desired state is stored
        then: deploy again once the broker is back)."""
        from edgeops.fleet.deploy import apply_deploy, plan_deploy

        publisher: DesiredPublisher = self._need(self._publisher, "desired-state publisher")
        try:
            plan = plan_deploy(self.fleet, self.repository, target_path, list(device_ids))
            return apply_deploy(self.fleet, publisher, plan).unacknowledged
        except EdgeOpsError as exc:
            raise RigHubError(f"deploy of {target_path}: {exc}") from None

    def rollout(
        self,
        target_path: str,
        device_ids: Iterable[str],
        *,
        current_model: str | None,
        name: str,
        canary: int = 1,
        gates: Mapping[str, Any] | None = None,
        rate_per_minute: int = 600,
        device_timeout_s: int = 120,
    ) -> str:
        """Create a rollout of ``target_path`` to ``device_ids`` only (those running
        ``current_model``, if given): a canary of ``canary`` devices, then exponential waves
        from ``rate_per_minute``, behind ``gates`` (the spec's ``gates`` object). The running
        engine carries it out; its id. RigHubError for an unknown device, or a spec or
        selection the planner refuses."""
        from edgeops.rollout.engine import RolloutEngine
        from edgeops.rollout.spec import parse_spec

        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise RigHubError(f"rollout {name}: no device given")
        document: dict[str, Any] = {
            "name": name,
            "release": target_path,
            "waves": {
                "canary": {"count": canary},
                "exponential": {"base_rate_per_minute": rate_per_minute, "increment_factor": 2.0},
            },
            "device_timeout_seconds": device_timeout_s,
            "gates": dict(gates or {}),
        }
        if current_model is not None:
            document["selection"] = {"current_model": current_model}
        try:
            for device_id in ids:
                self.fleet.get_device(device_id)
            spec = parse_spec(json.dumps(document), "json")
            # an engine that plans on the named devices only; the running one carries it out
            creator = RolloutEngine(self.database, None, repository=self.repository)
            creator.fleet = _SelectedFleet(self.database, ids)
            return creator.create(spec)
        except EdgeOpsError as exc:
            raise RigHubError(f"rollout {name} of {target_path}: {exc}") from None

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        """The engine's status document of a rollout."""
        try:
            return self.engine.status(rollout_id)
        except EdgeOpsError as exc:
            raise RigHubError(str(exc)) from None

    def wait_rollout(self, rollout_id: str, timeout_s: float) -> dict[str, Any]:
        """Wait until the rollout succeeded, failed or was aborted; its status document.
        RigHubError (with its counts) if it is still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.rollout_status(rollout_id)
            if status["status"] in FINISHED_ROLLOUT:
                return status
            if time.monotonic() >= deadline:
                raise RigHubError(
                    f"rollout {rollout_id} still {status['status']} after {timeout_s:g} s: "
                    f"devices {status['counts']}"
                )
            time.sleep(POLL_S)

    def device_state(self, device_id: str) -> dict[str, Any]:
        """What the hub knows of a device: presence, the target and model its active slot
        runs (reported), the update state, the newest update event's reason, the desired
        target, and the whole reported twin. RigHubError if the hub never heard of it."""
        from edgeops.fleet.desired import active_release

        try:
            view = self.fleet.get_device(device_id)
        except EdgeOpsError as exc:
            raise RigHubError(str(exc)) from None
        reported = dict(view.reported)
        target, model_id = active_release(reported)
        updates = self.fleet.list_events(device_id, event="update")
        newest = updates[-1].detail if updates else {}
        desired = view.desired.get("release")
        return {
            "device_id": view.device_id,
            "online": view.online,
            "agent_version": view.agent_version,
            "hardware": dict(view.hardware),
            "target": target,
            "model_id": model_id,
            "update_state": view.update_state or reported.get("update_state"),
            "update_reason": newest.get("reason"),
            "update_target": newest.get("target"),
            "desired_target": desired.get("target") if isinstance(desired, dict) else None,
            "reported": reported,
        }

    def events(self, device_id: str, event: str | None = None) -> list[dict[str, Any]]:
        """The device's events the hub stored (only ``event`` ones if given), oldest first:
        ``{"seq", "event", "ts", "detail"}``."""
        return [
            {"seq": view.seq, "event": view.event, "ts": view.ts, "detail": dict(view.detail)}
            for view in self.fleet.list_events(device_id, event=event)
        ]

    def wait_devices(
        self,
        device_ids: Iterable[str],
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float,
    ) -> dict[str, dict[str, Any]]:
        """Wait until ``predicate`` holds for the :meth:`device_state` of every device (a
        device the hub has not heard of yet does not hold); their states. RigHubError
        naming the devices it does not hold for after ``timeout_s``."""
        ids = list(dict.fromkeys(device_ids))
        deadline = time.monotonic() + timeout_s
        while True:
            states: dict[str, dict[str, Any]] = {}
            waiting: list[str] = []
            for device_id in ids:
                try:
                    state = self.device_state(device_id)
                except RigHubError:
                    waiting.append(device_id)
                    continue
                states[device_id] = state
                if not predicate(state):
                    waiting.append(device_id)
            if not waiting:
                return states
            if time.monotonic() >= deadline:
                shown = ", ".join(
                    f"{d} ({_brief(states[d]) if d in states else 'never reported'})"
                    for d in waiting
                )
                raise RigHubError(f"devices not there after {timeout_s:g} s: {shown}")
            time.sleep(POLL_S)

    # -- telemetry -------------------------------------------------------------------------

    def telemetry_windows(self, device_id: str) -> list[int]:
        """The sequence numbers of the telemetry windows the hub stored for the device,
        ascending (each stored once: (device, seq) is the table's key)."""
        from sqlmodel import col, select

        from edgeops.monitor.models import TelemetryWindowRecord

        query = (
            select(TelemetryWindowRecord.seq)
            .where(col(TelemetryWindowRecord.device_id) == device_id)
            .order_by(col(TelemetryWindowRecord.seq))
        )
        with self.database.session() as session:
            return [int(seq) for seq in session.exec(query).all()]

    def sequence_gaps(self, device_id: str, last_seq: int | None = None) -> list[int]:
        """The sequence numbers from 1 to ``last_seq`` (default: the highest the hub has)
        that the hub stored neither as a telemetry window nor as an event of the device.

        The agent numbers its telemetry windows and its events with one counter (one
        offline buffer), so a window's number is missing from :meth:`telemetry_windows`
        where an event took it; a window lost on the way is a number missing from both."""
        from sqlmodel import col, select

        from edgeops.fleet.models import DeviceEventRecord

        query = select(DeviceEventRecord.seq).where(col(DeviceEventRecord.device_id) == device_id)
        with self.database.session() as session:
            seen = {int(seq) for seq in session.exec(query).all()}
        seen.update(self.telemetry_windows(device_id))
        top = last_seq if last_seq is not None else max(seen, default=0)
        return [seq for seq in range(1, top + 1) if seq not in seen]

    def telemetry_duplicates(self, device_id: str) -> int:
        """Windows of the device the hub received again, identical to the stored one, and
        dropped (redeliveries), since this RigHub started."""
        telemetry: _CountingTelemetry = self._need(self._telemetry, "telemetry")
        return telemetry.duplicates[device_id]

    def telemetry_replayed(self, device_id: str) -> int:
        """Windows of the device the hub refused because another window was stored under
        their sequence number, since this RigHub started."""
        telemetry: _CountingTelemetry = self._need(self._telemetry, "telemetry")
        return telemetry.replayed[device_id]

    def telemetry_stats(self) -> dict[str, Any]:
        """The bridge's telemetry counters for all devices: received, stored, duplicates,
        rejected by reason."""
        return self.bridge.telemetry_stats().to_dict()


class _SelectedFleet(FleetService):
    """The fleet as the rollout planner sees it: only the named devices."""

    def __init__(self, database: Database, device_ids: Sequence[str]) -> None:
        super().__init__(database)
        self._ids = set(device_ids)

    def list_devices(self) -> list[DeviceView]:
        return [view for view in super().list_devices() if view.device_id in self._ids]


def _brief(state: Mapping[str, Any]) -> str:
    return (
        f"target {state.get('target')}, update {state.get('update_state')}"
        + (f": {state['update_reason']}" if state.get("update_reason") else "")
        + ("" if state.get("online") else ", offline")
    )
