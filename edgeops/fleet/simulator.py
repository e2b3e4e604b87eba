"""A fleet simulator: N real device agents in a few processes, with injected faults.

Every simulated device is the real :class:`device_agent.daemon.AgentDaemon` (a thin subclass,
:class:`SimAgent`, adds the fault hooks): its own :class:`MqttLink` connection with its own
client id (and its own credentials when the broker wants them: :func:`enroll_fleet`), its own
state directory (slots, update state, offline buffer, TUF metadata), its own champion
interpreter, and a synthetic source that feeds real samples through it, so telemetry flows.
Agents run in threads, ``agents / processes`` of them in each of ``processes`` worker
processes (``spawn``: no inherited threads or sockets).

Faults, assigned by fraction with a seed (exact counts, each device at most one fault):

=========================  ====================================================================
``fail_install``           writing the new model into the inactive slot fails: the updater's
                           ``installing`` step is refused and the update is rolled back
``crash_after_activation`` the agent dies (no clean shutdown: no flush, no offline presence)
                           whenever it runs the new model while still ``testing``: at the
                           champion swap, and at the first turn after each restart; its
                           runner restarts it as a supervisor would, so the updater counts the
                           boots and rolls back after ``MAX_TESTING_BOOTS`` (a crash loop)
``degrade_accuracy``       once the new model is the champion, the synthetic source's class
                           mix and noise shift, so the output distribution the telemetry
                           reports diverges while every install succeeds
=========================  ====================================================================

Cost: the agents share nothing but the process (each loads its own interpreter, a small
int8 model is about 0.6 MiB of RSS per agent). To keep 1,000 of them on two cores, each
worker changes three things for its own process only:

* the agent loop's sample budget (``SimSetup.sample_budget_s``, 0.25 s instead of 50 ms): an
  idle agent with a slow source wakes less often; MQTT events still wake it at once;
* the interpreter's thread switch interval (``switch_interval_s``, 20 ms instead of 5 ms):
  hundreds of agent threads would otherwise spend the cores handing the GIL around;
* no fsync (``fsync=False``, :data:`device_agent.fsio.SYNC`): the simulated devices' flash is
  one disk here, whose journal would serialize every device's fsyncs as no real fleet's are.
  Writes stay atomic (temp file + rename); the power-cut tests check durability with fsync.

paho's ``select()`` cannot watch descriptors above 1,023, and each agent holds a few (its
socket, paho's wake-up pair, its offline buffer), so keep a worker below about 140 agents.

Each worker reports a :class:`DeviceStatus` per agent every ``status_interval_s`` (only the
ones that changed since it last sent them, and every one when it stops; an agent's active
target is read from its slot pointer again only when that file changed);
:class:`FleetSimulator` keeps the newest and sums them (:meth:`FleetSimulator.summary`).

    sim = FleetSimulator(setup, devices, processes=2)
    sim.start()                                    # returns once every worker runs
    sim.wait(lambda s: s.count(on_target=new) >= 19, timeout_s=120)
    sim.stop()                                     # every agent stops cleanly
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from types import FrameType
from typing import Any

from edgeops.errors import ConfigError

__all__ = [
    "FAULTS",
    "DeviceStatus",
    "FleetSimulator",
    "FleetSnapshot",
    "SimDevice",
    "SimSetup",
    "assign_faults",
    "assign_hardware",
    "enroll_fleet",
    "make_devices",
    "parse_hardware_mix",
    "release_bundle",
    "samples_for",
]

log = logging.getLogger(__name__)

FAIL_INSTALL = "fail_install"
CRASH_AFTER_ACTIVATION = "crash_after_activation"
DEGRADE_ACCURACY = "degrade_accuracy"
FAULTS = (FAIL_INSTALL, CRASH_AFTER_ACTIVATION, DEGRADE_ACCURACY)

CRASH_AFTER_S = 0.0  # the new model runs this long in ``testing`` before the agent dies
RESTART_DELAY_S = 0.3  # a supervisor's restart delay
START_TIMEOUT_S = 120.0
MAX_FAILURES = 5  # unexpected agent deaths before a device is given up
SENSOR_POLL_S = 0.2  # how often a worker looks for a new sensor gain and offset


# -- what to simulate ------------------------------------------------------------------------


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: its id, broker URL (with its credentials), tags and fault."""

    device_id: str
    mqtt_url: str
    hardware: dict[str, str] = field(default_factory=dict)
    fault: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class SimSetup:
    """What every simulated device shares (picklable: it goes to the worker processes).

    ``champion`` is the bundle every device ships with (slot a), ``champion_target`` the
    release target it came from; ``samples`` an NPZ of raw samples ``x`` and labels ``y`` for
    the synthetic source. ``degraded_mix`` (label -> weight) and ``degraded_noise`` are the
    source's drift once a ``degrade_accuracy`` device runs the new model.
    """

    data_dir: Path
    trust_root: Path
    champion: Path
    champion_target: str
    samples: Path
    rate_hz: float = 2.0
    heartbeat_s: float = 10.0
    window_seconds: float = 10.0
    raw_sample_rate: float = 0.0
    update_health_s: float = 2.0
    shutdown_grace_s: float = 2.0
    degraded_mix: dict[int, float] = field(default_factory=lambda: {0: 8.0, 1: 8.0})
    degraded_noise: float = 0.35
    status_interval_s: float = 1.0
    sample_budget_s: float | None = 0.25
    start_interval_s: float = 0.02
    switch_interval_s: float | None = 0.02
    fsync: bool = False
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class DeviceStatus:
    """What a worker reports of one agent."""

    device_id: str
    fault: str | None
    running: bool
    crashes: int
    update_state: str
    active_target: str | None
    champion: str | None
    samples: int
    windows: int
    last_reason: str | None = None
    error: str | None = None
    failures: int = 0


# -- hardware mix and faults -------------------------------------------------------------------


def parse_hardware_mix(text: str | None) -> list[tuple[dict[str, str], float]]:
    """``"arch=x86_64:0.8,arch=armv7l:0.2"`` as ``[({"arch": "x86_64"}, 0.8), ...]``.

    An entry is ``key=value[+key=value...]:weight``; weights are normalised. ConfigError
    naming the entry that does not parse.
    """
    if text is None or not text.strip():
        return []
    mix: list[tuple[dict[str, str], float]] = []
    for raw in text.split(","):
        item = raw.strip()
        tags_text, sep, weight_text = item.rpartition(":")
        if not sep or not tags_text:
            raise ConfigError(f"hardware mix entry {item!r}: expected key=value:weight")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"hardware mix entry {item!r}: weight is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"hardware mix entry {item!r}: weight must be >= 0")
        tags: dict[str, str] = {}
        for pair in tags_text.split("+"):
            key, eq, value = pair.strip().partition("=")
            if not eq or not key.strip() or not value.strip():
                raise ConfigError(f"hardware mix entry {item!r}: {pair!r} is not key=value")
            tags[key.strip()] = value.strip()
        mix.append((tags, weight))
    if not any(weight > 0 for _, weight in mix):
        raise ConfigError(f"hardware mix {text!r}: at least one weight must be above 0")
    return mix


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split by ``weights`` (largest remainder), summing to ``total``."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_hardware(
    count: int, mix: Sequence[tuple[dict[str, str], float]], seed: int = 0
) -> list[dict[str, str]]:
    """Hardware tags for ``count`` devices in the proportions of ``mix`` (seeded order)."""
    if not mix:
        return [{} for _ in range(count)]
    tags: list[dict[str, str]] = []
    for (entry, _), n in zip(mix, _apportion(count, [w for _, w in mix]), strict=True):
        tags.extend(dict(entry) for _ in range(n))
    random.Random(seed).shuffle(tags)
    return tags


def assign_faults(
    device_ids: Sequence[str], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, str]:
    """Device id -> fault: ``round(fraction * n)`` devices each, disjoint, seeded choice."""
    unknown = sorted(set(fractions) - set(FAULTS))
    if unknown:
        raise ConfigError(f"unknown fault(s) {', '.join(unknown)}; faults: {', '.join(FAULTS)}")
    for name, fraction in fractions.items():
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"fault fraction {name}={fraction} is not between 0 and 1")
    counts = {name: round(fractions.get(name, 0.0) * len(device_ids)) for name in FAULTS}
    if sum(counts.values()) > len(device_ids):
        raise ConfigError("fault fractions add up to more than the whole fleet")
    order = list(device_ids)
    random.Random(seed + 1).shuffle(order)
    faults: dict[str, str] = {}
    position = 0
    for name in FAULTS:
        for device_id in order[position : position + counts[name]]:
            faults[device_id] = name
        position += counts[name]
    return faults


def make_devices(
    count: int,
    url_of: Callable[[str], str],
    *,
    prefix: str = "sim",
    hardware_mix: Sequence[tuple[dict[str, str], float]] = (),
    faults: Mapping[str, float] | None = None,
    seed: int = 0,
    fault_pool: Callable[[SimDevice], bool] | None = None,
) -> list[SimDevice]:
    """``count`` devices ``<prefix>-00001`` ... with hardware from ``hardware_mix`` and
    faults by fraction; ``fault_pool`` limits which devices may get a fault (e.g. only those
    the release fits), the fractions then being of that pool."""
    width = max(4, len(str(count)))
    ids = [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]
    tags = assign_hardware(count, hardware_mix, seed)
    plain = [
        SimDevice(device_id, url_of(device_id), hw, None, seed * 100_003 + index)
        for index, (device_id, hw) in enumerate(zip(ids, tags, strict=True))
    ]
    pool = [d.device_id for d in plain if fault_pool is None or fault_pool(d)]
    assigned = assign_faults(pool, faults or {}, seed)
    return [
        SimDevice(d.device_id, d.mqtt_url, d.hardware, assigned.get(d.device_id), d.seed)
        for d in plain
    ]


def enroll_fleet(
    identities: Any, device_ids: Iterable[str], broker_url: str, tags: Mapping[str, str] | None
) -> dict[str, str]:
    """Enroll every device (:class:`edgeops.fleet.IdentityService`); id -> its agent URL
    with its own user and password. The caller syncs the broker's files afterwards."""
    urls = {}
    for device_id in device_ids:
        enrollment = identities.enroll(device_id, dict(tags or {}))
        urls[device_id] = enrollment.agent_url(broker_url)
    return urls


def release_bundle(repository: Any, target_path: str, dest: Path) -> Path:
    """The bundle a device installs for ``target_path`` of ``repository`` (a
    :class:`edgeops.trust.TrustRepository`): the signed target's bytes and its card."""
    import json
    import shutil

    from device_agent.card import ModelCard
    from device_agent.runtime import model_file_name
    from edgeops.trust import card_of

    target = repository.get_target(target_path)
    card = card_of(target.custom)
    dest.mkdir(parents=True, exist_ok=True)
    # the name a slot gives it: model.tflite, model.onnx, or firmware.tar for firmware
    name = model_file_name(ModelCard.from_dict(card))
    shutil.copyfile(repository.target_file_path(target), dest / name)
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def samples_for(datasets: Any, bundle: Path, dest: Path, split: str = "test") -> Path:
    """An NPZ (``x``, ``y``) of the raw samples of the dataset the bundle's card names
    (``lineage.dataset_version``), for the synthetic source."""
    import json

    import numpy as np

    card = json.loads((bundle / "card.json").read_text())
    version = (card.get("lineage") or {}).get("dataset_version")
    if not version:
        raise ConfigError(f"the card in {bundle} names no dataset version (lineage)")
    x, y = datasets.load(str(version)).split(split)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dest, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    return dest


# -- the agent with fault hooks ----------------------------------------------------------------


def _agent_classes() -> tuple[type[Any], type[BaseException]]:
    """SimAgent and SimulatedCrash, built on first use (device_agent imports are heavy)."""
    global _SIM_AGENT, _SIM_CRASH
    if _SIM_AGENT is not None and _SIM_CRASH is not None:
        return _SIM_AGENT, _SIM_CRASH
    from device_agent.daemon import AgentDaemon
    from device_agent.errors import AgentError
    from device_agent.sources import SyntheticSource
    from device_agent.updater.machine import UpdateState

    class SimulatedCrash(Exception):  # noqa: N818 - it is what it says
        """The agent dies here (power cut, segfault): no clean shutdown."""

    class SimAgent(AgentDaemon):
        """The real agent with the simulator's fault hooks (see the module docstring)."""

        def __init__(self, settings: Any, device: SimDevice, setup: SimSetup, base: str) -> None:
            super().__init__(settings)
            self.fault = device.fault
            self.setup = setup
            self.base_model_id = base
            self.crashed = False
            self._testing_since: float | None = None
            self.sensor: tuple[float, float] = (1.0, 0.0)  # gain, offset (FleetSimulator)
            if self.fault == FAIL_INSTALL:
                slots = self.updates.updater.slots

                def failing_write(
                    slot: str, model_file: Path, card: Any, card_json: bytes | None = None
                ) -> Any:
                    raise AgentError(f"simulated fault: writing slot {slot} failed (flash error)")

                slots.write = failing_write  # type: ignore[method-assign]

        def _new_model_running(self) -> bool:
            champion = self.champion
            return champion is not None and champion.model_id != self.base_model_id

        def _drift(self) -> None:
            if self.fault != DEGRADE_ACCURACY or not isinstance(self.source, SyntheticSource):
                return
            if self._new_model_running():
                self.source.set_drift(
                    noise=self.setup.degraded_noise, class_mix=self.setup.degraded_mix
                )
            else:
                labels = {int(c): 1.0 for c in self.source._by_class}
                self.source.set_drift(noise=0.0, class_mix=labels)

        def _start_inference(self, model_dir: Path | None) -> None:
            super()._start_inference(model_dir)
            self._drift()
            self.set_sensor(*self.sensor)

        def set_sensor(self, gain: float, offset: float) -> None:
            """The sensor's gain and offset from now on (a recalibration, a dirty lens)."""
            self.sensor = (gain, offset)
            if isinstance(self.source, SyntheticSource):
                self.source.set_drift(gain=gain, offset=offset)

        def _swap_champion(self, bundle_dir: Path | None) -> None:
            super()._swap_champion(bundle_dir)
            self._drift()
            self._crash_if_testing_new_model()

        def _crash_if_testing_new_model(self) -> None:
            if self.fault != CRASH_AFTER_ACTIVATION:
                return
            if self.updates.state == UpdateState.TESTING and self._new_model_running():
                now = time.monotonic()
                if self._testing_since is None:
                    self._testing_since = now
                if now - self._testing_since >= CRASH_AFTER_S:
                    self.crashed = True
                    raise SimulatedCrash(f"{self.device_id}: simulated crash after activation")
            else:
                self._testing_since = None

        def _turn(self) -> None:
            # checked before and after the turn, and right at the swap: the crash comes
            # before the health check can pass, however loaded the machine is
            self._crash_if_testing_new_model()
            super()._turn()
            self._crash_if_testing_new_model()

        def _shutdown(self) -> None:
            if not self.crashed:
                super()._shutdown()
                return
            # a crash: the updater's worker and the link die with the process; nothing is
            # flushed and no offline presence is sent (the next start finds the files as
            # they are)
            self.updates.stop()
            if self.source is not None:
                self.source.close()
            self.link.stop()
            for runtime in (self.challenger, self.champion):
                if runtime is not None:
                    runtime.close()
            if self.buffer is not None:
                self.buffer.close()

    _SIM_AGENT, _SIM_CRASH = SimAgent, SimulatedCrash
    return SimAgent, SimulatedCrash


_SIM_AGENT: type[Any] | None = None
_SIM_CRASH: type[BaseException] | None = None


class _Runner:
    """Runs one device's agent in a thread and restarts it after a simulated crash."""

    def __init__(self, device: SimDevice, setup: SimSetup, base_model_id: str) -> None:
        self.device = device
        self.setup = setup
        self.base_model_id = base_model_id
        self.agent: Any = None
        self.crashes = 0
        self.failures = 0  # unexpected deaths (not the simulated crash)
        self.error: str | None = None
        self.sensor = (1.0, 0.0)  # gain, offset of the device's sensor
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=device.device_id, daemon=True)
        # the active target as last read, by the pointer file's (inode, size, mtime): every
        # switch replaces the file, so an unchanged stat means an unchanged pointer
        self._pointer_seen: tuple[tuple[int, int, int], str | None] | None = None

    def settings(self) -> Any:
        from device_agent.config import AgentSettings
        from device_agent.sources import SourceConfig

        setup, device = self.setup, self.device
        return AgentSettings(
            device_id=device.device_id,
            mqtt_url=device.mqtt_url,
            data_dir=setup.data_dir,
            hardware=device.hardware,
            trust_root_file=setup.trust_root,
            model_dir=setup.champion,
            source=SourceConfig(
                kind="synthetic", path=setup.samples, seed=device.seed, rate_hz=setup.rate_hz
            ),
            heartbeat_s=setup.heartbeat_s,
            window_seconds=setup.window_seconds,
            raw_sample_rate=setup.raw_sample_rate,
            update_health_s=setup.update_health_s,
            shutdown_grace_s=setup.shutdown_grace_s,
            dev_mode=True,
        )

    def provision(self) -> None:
        """Lay the device out as a factory ships it: slot a holds the champion, active."""
        import json
        import shutil

        slots = self.setup.data_dir / "agents" / self.device.device_id / "slots"
        if (slots / "active.json").exists():
            return
        slots.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.setup.champion, slots / "a", dirs_exist_ok=True)
        (slots / "b").mkdir(exist_ok=True)
        pointer = {"active": "a", "previous": None, "targets": {"a": self.setup.champion_target}}
        (slots / "active.json").write_text(json.dumps(pointer))

    def _run(self) -> None:
        sim_agent, crash = _agent_classes()
        try:
            self.provision()
            settings = self.settings()
        except Exception as exc:  # reported in the status; the others go on
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("device %s not started", self.device.device_id)
            return
        while not self._stop.is_set():
            try:
                self.agent = sim_agent(settings, self.device, self.setup, self.base_model_id)
                self.agent.sensor = self.sensor
                if self._stop.is_set():
                    return
                self.agent.run()
                return
            except crash:
                self.crashes += 1
            except Exception as exc:  # the agent died of a bug: restarted, as systemd would
                self.failures += 1
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("device %s died; restarting it", self.device.device_id)
                if self.failures >= MAX_FAILURES:
                    return
            self._stop.wait(RESTART_DELAY_S)

    def start(self) -> None:
        self.thread.start()

    def set_sensor(self, gain: float, offset: float) -> None:
        self.sensor = (gain, offset)
        agent = self.agent
        if agent is not None:
            agent.set_sensor(gain, offset)

    def stop(self) -> None:
        self._stop.set()
        agent = self.agent
        if agent is not None:
            agent.stop()

    def status(self) -> DeviceStatus:
        agent = self.agent
        if agent is None:
            return DeviceStatus(
                self.device.device_id, self.device.fault, False, self.crashes, "starting",
                None, None, 0, 0, None, self.error,
            )  # fmt: skip
        target = self._active_target(agent)
        champion = agent.champion
        record = agent.updates.updater.record
        return DeviceStatus(
            device_id=self.device.device_id,
            fault=self.device.fault,
            running=self.thread.is_alive(),
            crashes=self.crashes,
            update_state=str(record.state),
            active_target=target,
            champion=champion.model_id if champion is not None else None,
            samples=agent.samples_total,
            windows=agent.windows_total,
            last_reason=record.reason,
            error=self.error,
            failures=self.failures,
        )

    def _active_target(self, agent: Any) -> str | None:
        """The target of the agent's active slot, read again only when the pointer file
        changed (this runs for every agent every ``status_interval_s``)."""
        from device_agent.errors import AgentError

        slots = agent.updates.slots
        try:
            stat = slots.pointer_file.stat()
        except OSError:  # no pointer (yet), or being replaced on disk: next time
            return None
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        seen = self._pointer_seen
        if seen is not None and seen[0] == key:
            return seen[1]
        try:
            pointer = slots.pointer()
            target = pointer.target() if pointer is not None else None
        except (OSError, ValueError, AgentError):  # being replaced on disk: next time
            return None
        self._pointer_seen = (key, target)
        return target


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM in the main thread until the block ends, then deliver them.

    A KeyboardInterrupt raised while a message is half read from the workers' queue would
    leave its pipe out of step, and the next read (the one stopping the fleet) would wait
    for bytes that never come. Elsewhere, or in another thread, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _champion_model_id(bundle: Path) -> str:
    import json

    card = json.loads((bundle / "card.json").read_text())
    return str(card["model_id"])


def _worker(
    setup: SimSetup,
    devices: list[SimDevice],
    out: Any,
    stop: MpEvent,
    sensor: Any,
) -> None:
    """One worker process: its agents in threads, statuses to ``out`` until ``stop``;
    ``sensor`` (shared: generation, gain, offset) is applied to every agent when it changes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    logging.basicConfig(level=setup.log_level, format="%(asctime)s %(name)s %(message)s")
    base = _champion_model_id(setup.champion)
    _agent_classes()  # import once, before the threads race for it
    if not setup.fsync:
        import device_agent.fsio

        # the simulated devices' flash is this one disk: see device_agent.fsio
        device_agent.fsio.SYNC = False
    if setup.switch_interval_s is not None:
        # hundreds of agent threads share this interpreter: handing the GIL over every
        # 5 ms (Python's default) spends the cores on context switches, not on the agents
        sys.setswitchinterval(setup.switch_interval_s)
    if setup.sample_budget_s is not None:
        import device_agent.daemon

        # each agent's loop turns 1/budget times a second while its source is idle; the
        # agent's 50 ms keeps one device responsive, but 1,000 of them on two cores would
        # spend the machine on empty turns (this process only)
        device_agent.daemon.SAMPLE_BUDGET_S = setup.sample_budget_s
    runners = [_Runner(device, setup, base) for device in devices]
    generation = 0.0
    sent: dict[str, DeviceStatus] = {}

    def report(every: bool = False) -> None:
        """Send the statuses that changed since they were last sent (``every``: all)."""
        changed = []
        for runner in runners:
            status = runner.status()
            if every or sent.get(status.device_id) != status:
                sent[status.device_id] = status
                changed.append(asdict(status))
        if changed:
            out.put(("status", changed))

    def follow_sensor() -> None:
        nonlocal generation
        with sensor.get_lock():
            current, gain, offset = sensor[0], sensor[1], sensor[2]
        if current != generation:
            generation = current
            for runner in runners:
                runner.set_sensor(gain, offset)

    out.put(("started", os.getpid(), len(runners)))
    try:
        # devices boot one after the other (``start_interval_s`` apart in each worker), as
        # a fleet does: 500 agents loading their models at the same instant only fight
        # over the GIL
        reported = time.monotonic()
        for runner in runners:
            if stop.wait(setup.start_interval_s):
                break
            follow_sensor()
            runner.start()
            if time.monotonic() - reported >= setup.status_interval_s:
                report()
                reported = time.monotonic()
        while not stop.wait(min(setup.status_interval_s, SENSOR_POLL_S)):
            follow_sensor()
            if time.monotonic() - reported >= setup.status_interval_s:
                report()
                reported = time.monotonic()
    finally:
        for runner in runners:
            runner.stop()
        deadline = time.monotonic() + setup.shutdown_grace_s + 10.0
        for runner in runners:
            if runner.thread.ident is not None:
                runner.thread.join(max(0.1, deadline - time.monotonic()))
        report(every=True)
        out.put(("stopped", os.getpid(), sum(r.thread.is_alive() for r in runners)))
        out.close()
        out.join_thread()


# -- the parent --------------------------------------------------------------------------------


@dataclass
class FleetSnapshot:
    """The newest status of every device."""

    devices: dict[str, DeviceStatus]

    def count(
        self,
        *,
        on_target: str | None = None,
        state: str | None = None,
        fault: str | bool | None = False,
    ) -> int:
        """Devices matching every given criterion (``fault=False``: any fault)."""
        return sum(
            1
            for d in self.devices.values()
            if (on_target is None or d.active_target == on_target)
            and (state is None or d.update_state == state)
            and (fault is False or d.fault == fault)
        )

    def summary(self) -> dict[str, Any]:
        devices = self.devices.values()
        by_fault: dict[str, Counter[str]] = {}
        for d in devices:
            by_fault.setdefault(d.fault or "none", Counter())[d.update_state] += 1
        return {
            "devices": len(self.devices),
            "running": sum(d.running for d in devices),
            "update_states": dict(Counter(d.update_state for d in devices)),
            "active_targets": dict(Counter(d.active_target or "-" for d in devices)),
            "by_fault": {fault: dict(states) for fault, states in sorted(by_fault.items())},
            "crashes": sum(d.crashes for d in devices),
            "agent_failures": sum(d.failures for d in devices),
            "samples": sum(d.samples for d in devices),
            "windows": sum(d.windows for d in devices),
            "errors": sorted({d.error for d in devices if d.error}),
        }


class FleetSimulator:
    """Runs ``devices`` in ``processes`` worker processes (see the module docstring)."""

    def __init__(
        self, setup: SimSetup, devices: Sequence[SimDevice], *, processes: int | None = None
    ) -> None:
        if not devices:
            raise ConfigError("simulate at least one device")
        self.setup = setup
        self.devices = list(devices)
        count = processes if processes is not None else (os.cpu_count() or 1)
        self.processes = max(1, min(count, len(self.devices)))
        self._ctx = multiprocessing.get_context("spawn")
        self._queue: Any = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._sensor: Any = self._ctx.Array("d", [0.0, 1.0, 0.0])  # generation, gain, offset
        self._procs: list[Any] = []
        self._status: dict[str, DeviceStatus] = {
            d.device_id: DeviceStatus(d.device_id, d.fault, False, 0, "starting", None, None, 0, 0)
            for d in self.devices
        }
        self.worker_pids: list[int] = []
        self.left_running = 0

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the workers; returns once each has started its agents."""
        self.setup.data_dir.mkdir(parents=True, exist_ok=True)
        shares = [self.devices[i :: self.processes] for i in range(self.processes)]
        for index, share in enumerate(shares):
            proc = self._ctx.Process(
                target=_worker,
                args=(self.setup, share, self._queue, self._stop, self._sensor),
                name=f"fleet-sim-{index}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        deadline = time.monotonic() + timeout_s
        while len(self.worker_pids) < len(self._procs):
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the simulator's workers did not start within {timeout_s} s")
            if any(p.exitcode is not None for p in self._procs):
                self.stop()
                raise ConfigError("a simulator worker exited while starting")
            self.poll(0.2)

    def poll(self, timeout_s: float = 0.0) -> FleetSnapshot:
        """Take what the workers reported (waiting up to ``timeout_s`` for the first)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with _interrupts_held():
                    kind, *rest = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "status":
                for item in rest[0]:
                    status = DeviceStatus(**item)
                    self._status[status.device_id] = status
            elif kind == "started":
                self.worker_pids.append(int(rest[0]))
            elif kind == "stopped":
                self.left_running += int(rest[1])
            deadline = time.monotonic()  # drain what is there, then return
        return FleetSnapshot(dict(self._status))

    def wait(
        self,
        predicate: Callable[[FleetSnapshot], bool],
        timeout_s: float,
        on_progress: Callable[[FleetSnapshot], None] | None = None,
    ) -> FleetSnapshot | None:
        """Poll until ``predicate`` holds (the snapshot) or ``timeout_s`` passed (None)."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = self.poll(0.25)
            if on_progress is not None:
                on_progress(snapshot)
            if predicate(snapshot):
                return snapshot
            if time.monotonic() >= deadline:
                return None

    def set_sensor(self, gain: float = 1.0, offset: float = 0.0) -> None:
        """Every device's sensor reads ``x * gain + offset`` from now on (within
        :data:`SENSOR_POLL_S`): the covariate shift of a fleet-wide recalibration or a new
        sensor batch. ``gain=1, offset=0`` is the sensor as shipped."""
        for name, value in (("gain", gain), ("offset", offset)):
            if not math.isfinite(value):
                raise ConfigError(f"sensor {name} must be a finite number, got {value}")
        with self._sensor.get_lock():
            self._sensor[0] += 1.0
            self._sensor[1] = float(gain)
            self._sensor[2] = float(offset)

    def rss_bytes(self) -> int:
        """The summed VmRSS of the worker processes."""
        total = 0
        for pid in self.worker_pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def stop(self, timeout_s: float = 60.0) -> FleetSnapshot:
        """Stop every agent cleanly (offline presence, buffers flushed) and the workers."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in self._procs) and time.monotonic() < deadline:
            self.poll(0.2)
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
        snapshot = self.poll(0.0)
        self._procs = []
        return snapshot

    def __enter__(self) -> FleetSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
