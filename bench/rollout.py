"""Rollout figures of issue 6: N simulated devices, each with its own MQTT connection and
credentials, rolled onto a new release as a canary (1 %) and exponential waves, against the
same N devices receiving the same desired release all at once.

Setup, all real and on this machine, fresh for every run (broker, hub database, devices):

- a private Mosquitto from the shipped ``deploy/mosquitto/secure.conf`` (no anonymous
  clients); every device enrolled through :class:`edgeops.fleet.IdentityService` (its own
  user and password) and the broker's password and ACL files written by
  ``sync_broker_files``, so each device may only use its own topic subtree. One line is
  added to the ACL for the benchmark: the hub's user may read ``$SYS/#`` (for the
  connection count), and ``sys_interval 1`` is appended to the configuration;
- the hub in this process: its bridge (state, events, telemetry into SQLite), its fetch
  server (TUF metadata and targets over MQTT) and its desired-state publisher, each logging
  in with the hub's identity; this process never imports TensorFlow (the models are made
  in a child process first), so its RSS is the hub's;
- the release repository (:class:`edgeops.trust.TrustRepository`) with two digits MLPs
  (trained one epoch each here, compressed to full int8: about 12 KB), version 2's
  contract allowing only ``arch=x86_64``;
- ``N`` devices from :mod:`edgeops.fleet.simulator`: the real ``device_agent`` code, its
  own MQTT connection per device, in worker processes (CPU count, or one per 125 devices if
  that is more: ``--processes``), booting 50 a second per worker, 90 % ``arch=x86_64`` and
  10 % ``arch=armv7l``, each fed 0.2 samples/s (``--rate-hz``) by a synthetic source,
  telemetry windows of 60 s, the agent loop's sample budget raised to 5 s (``--budget-s``:
  how long an idle loop sleeps when nothing wakes it; MQTT events and the updater wake it at
  once), and the simulator's other per-process settings (see its module docstring).

Rollout: a rollout spec (1 % canary, then exponential waves: base rate 3,000/min, factor 2,
at most 24,000/min, the rate raised each time 300 more devices were notified, so waves of
up to 300 devices at 50, 100, 200, ... a second; no quality gate, so no soak window) carried
out by the live :class:`edgeops.rollout.engine.RolloutEngine` (``--driver engine``, the
default): it plans (selection, contract pre-check: the armv7l devices are excluded and
listed), targets each wave's devices at its rate, follows the devices' ``update`` events
and starts the next wave when every device of the previous one finished, ticked every 0.5
s. ``--driver deploy`` instead carries the planner's waves out through
:func:`edgeops.fleet.deploy.apply_deploy`, each wave published at once and the next one
started when every device of the previous one finished (the wave's abort condition checked).
Baseline: the same fleet (fresh) gets the same release in one ``apply_deploy``.

Measured from the hub's database (the devices' reported state, as the bridge records it):
wall time from the first publish until every compatible device reports the new target in
its active slot and ``update_state`` ``committed`` (its health check passed); devices per
minute; peak RSS of the hub process during that time; the broker's
``$SYS/broker/clients/connected`` (peak); the simulator's worker RSS and CPU.

Results go to bench/results/rollout.json and rollout.md (written atomically).

    python bench/rollout.py [--devices 100,1000] [--processes 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _results import run_meta, write_results

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_S = 60.0
AGENTS_PER_PROCESS = 125
INCOMPATIBLE_SHARE = 0.1
SYS_TOPIC = "$SYS/broker/clients/connected"
FLEET_UP_TIMEOUT_S = 900.0
STALL_S = 60.0
ROLLOUT_TIMEOUT_S = 900.0
SPEC = """
name: bench-rollout
release: {release}
waves:
  canary: {{percent: 1}}
  exponential:
    base_rate_per_minute: 3000
    increment_factor: 2.0
    max_rate_per_minute: 24000
    rate_increase_criteria: {{notified: 300}}
  abort: {{min_devices: 5, failure_percent: 20}}
device_timeout_seconds: 300
"""


def _status(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the models (in a child process: TensorFlow stays out of the hub's RSS) -------------------


def prepare(root: Path, seed: int) -> dict[str, Any]:
    """Train two digits MLPs, compress them to int8, release both; the paths."""
    from edgeops.compress import CompressService
    from edgeops.data import DatasetService
    from edgeops.db import Database
    from edgeops.fleet.simulator import release_bundle, samples_for
    from edgeops.registry import Registry
    from edgeops.store import ArtifactStore
    from edgeops.train import TrainService
    from edgeops.trust import TrustRepository, release_model

    database = Database(f"sqlite:///{root / 'models.db'}")
    database.upgrade()
    store = ArtifactStore(root / "artifacts")
    datasets = DatasetService(database, store)
    registry = Registry(database, store)
    datasets.register_builtin("digits", seed=seed)
    trainer = TrainService(datasets, registry)
    compressor = CompressService(datasets, registry)
    refs = []
    for offset in (0, 1):
        keras = trainer.train(
            "digits", "mlp", epochs=1, seed=seed + offset, name="digits-mlp-bench",
            progress=False, evaluate_on_runtime=False,
        )  # fmt: skip
        refs.append(compressor.compress(keras.id, quantize="int8", progress=False).id)
    repository = TrustRepository(root / "trust")
    repository.init(root / "offline-root-keys")
    old = release_model(repository, refs[0], registry=registry, datasets=datasets)
    new = release_model(
        repository, refs[1], registry=registry, datasets=datasets, hardware={"arch": ["x86_64"]}
    )
    champion = release_bundle(repository, old.path, root / "champion")
    samples = samples_for(datasets, champion, root / "samples.npz")
    database.dispose()
    return {
        "trust_dir": str(root / "trust"),
        "old": old.path,
        "new": new.path,
        "champion": str(champion),
        "samples": str(samples),
        "model_bytes": (champion / "model.tflite").stat().st_size,
    }


def _prepare_child(root: str, seed: int, out: Any) -> None:
    out.put(prepare(Path(root), seed))


# -- one run: broker, hub, fleet, rollout ------------------------------------------------------


class Peak(threading.Thread):
    """Samples a value every ``interval_s`` and keeps the peak."""

    def __init__(self, read: Any, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.interval_s = interval_s
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.peak = max(self.peak, self.read())

    def finish(self) -> int:
        self.done.set()
        self.join(5)
        self.peak = max(self.peak, self.read())
        return self.peak


def run_once(
    root: Path, lab: dict[str, Any], devices: int, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    from device_agent.link import Message, MqttEndpoint, MqttLink
    from edgeops.broker import MosquittoProcess
    from edgeops.broker.auth import HUB_USER, BrokerAuthFiles, new_password
    from edgeops.broker.mosquitto import SECURE_CONFIG
    from edgeops.db import Database
    from edgeops.fleet import FleetService, IdentityService
    from edgeops.fleet.deploy import apply_deploy, plan_deploy
    from edgeops.fleet.simulator import (
        FleetSimulator,
        SimSetup,
        enroll_fleet,
        make_devices,
        parse_hardware_mix,
    )
    from edgeops.hub import DesiredPublisher, HubBridge
    from edgeops.rollout import parse_spec, plan_rollout, release_contract
    from edgeops.rollout.plan import current_target_of
    from edgeops.trust import FetchServer, TrustRepository

    root.mkdir(parents=True)
    repository = TrustRepository(Path(lab["trust_dir"]))
    old, new = lab["old"], lab["new"]
    database = Database(f"sqlite:///{root / 'hub.db'}")
    database.upgrade()
    fleet = FleetService(database)
    identities = IdentityService(database)

    # identities and the broker
    files = BrokerAuthFiles(root / "passwd", root / "acl")
    hub_password = new_password()
    broker = MosquittoProcess(
        root / "broker",
        template=SECURE_CONFIG,
        password_file=files.password_file,
        acl_file=files.acl_file,
        extra_config="sys_interval 1\n",
    )
    base_url = broker.url
    mix = parse_hardware_mix(
        f"arch=x86_64:{1 - INCOMPATIBLE_SHARE},arch=armv7l:{INCOMPATIBLE_SHARE}"
    )
    prefix = "sim-w" if mode == "waves" else "sim-b"
    ids = [f"{prefix}-{i:0{max(4, len(str(devices)))}d}" for i in range(1, devices + 1)]
    enroll_started = time.perf_counter()
    urls = enroll_fleet(identities, ids, base_url, {"fleet": "bench"})
    identities.sync_broker_files(files, hub_password)
    with files.acl_file.open("a") as acl:  # the benchmark's monitor: the connection count
        acl.write("topic read $SYS/#\n")
    enroll_s = time.perf_counter() - enroll_started
    broker.start()
    hub_url = base_url.replace("mqtt://", f"mqtt://{HUB_USER}:{hub_password}@")
    endpoint = MqttEndpoint.parse(hub_url)

    bridge = HubBridge(endpoint, fleet, client_id=HUB_USER)
    bridge.start()
    stop_bridge = threading.Event()
    bridge_thread = threading.Thread(target=bridge.run, args=(stop_bridge,), daemon=True)
    bridge_thread.start()
    server = FetchServer(repository.repository_dir, endpoint, client_id=f"{HUB_USER}-fetch")
    server.start()
    publisher = DesiredPublisher(endpoint, client_id=HUB_USER)
    publisher.start()
    monitor = MqttLink(endpoint, client_id=f"{HUB_USER}-monitor")
    monitor.subscribe(SYS_TOPIC, 0)
    monitor.start(wait_s=10)
    connections = {"now": 0, "peak": 0}

    def read_connections() -> int:
        while (event := monitor.get(timeout_s=0)) is not None:
            if isinstance(event, Message) and event.topic == SYS_TOPIC:
                with contextlib.suppress(ValueError):
                    connections["now"] = int(event.payload)
        connections["peak"] = max(connections["peak"], connections["now"])
        return connections["now"]

    setup = SimSetup(
        data_dir=root / "fleet",
        trust_root=Path(repository.root_json_path),
        champion=Path(lab["champion"]),
        champion_target=old,
        samples=Path(lab["samples"]),
        rate_hz=args.rate_hz,
        heartbeat_s=30.0,
        window_seconds=60.0,
        sample_budget_s=args.budget_s,
        update_health_s=args.health_s,
    )
    fleet_devices = make_devices(
        devices, lambda device_id: urls[device_id], prefix=prefix, hardware_mix=mix,
        seed=args.seed,
    )  # fmt: skip
    assert [d.device_id for d in fleet_devices] == ids
    # a few hundred agent threads per interpreter at most: more only fight over its GIL
    processes = args.processes or max(os.cpu_count() or 1, -(-devices // AGENTS_PER_PROCESS))
    sim = FleetSimulator(setup, fleet_devices, processes=processes)
    result: dict[str, Any] = {"devices": devices, "mode": mode, "enroll_and_sync_s": enroll_s}
    try:
        up_started = time.perf_counter()
        sim.start()
        wanted = set(ids)

        def reported() -> list[Any]:
            return [
                view
                for view in fleet.list_devices()
                if view.device_id in wanted and view.agent_version and view.hardware
                and view.online
            ]  # fmt: skip

        count, progress_at = 0, time.perf_counter()
        while count < devices:
            sim.poll(0.5)
            read_connections()
            now_count = len(reported())
            if now_count > count:
                count, progress_at = now_count, time.perf_counter()
            if time.perf_counter() - progress_at > STALL_S:
                break  # the planner excludes the silent ones as ``unreported``
            if time.perf_counter() - up_started > FLEET_UP_TIMEOUT_S:
                raise RuntimeError(f"only {count} of {devices} devices reported")
        result["fleet_up_s"] = time.perf_counter() - up_started
        result["reported_before_rollout"] = count
        cpu_before, idle_started = _cpu_seconds(sim.worker_pids), time.perf_counter()
        time.sleep(5.0)  # idle: a few $SYS periods, the workers' CPU
        sim.poll(0.0)
        result["simulator_idle_cores"] = (_cpu_seconds(sim.worker_pids) - cpu_before) / (
            time.perf_counter() - idle_started
        )
        read_connections()
        result["broker_connections_before"] = connections["now"]

        spec = parse_spec(SPEC.format(release=new))
        plan = plan_rollout(spec, fleet.list_devices(), release_contract(repository, new))
        compatible = [device.device_id for device in plan.compatible]
        waves = [list(wave.devices) for wave in plan.waves] if mode == "waves" else [compatible]
        result["compatible"] = len(compatible)
        result["excluded"] = [device.to_dict() for device in plan.excluded]
        result["waves"] = [len(wave) for wave in waves]
        abort = spec.waves.abort

        def committed(view: Any) -> bool:
            """On the new model: it is in the active slot and passed its health check."""
            return current_target_of(view) == new and str(view.update_state) == "committed"

        rss = Peak(lambda: _status("VmRSS"))
        conns = Peak(read_connections, interval_s=0.25)
        rss.start()
        conns.start()
        started = time.perf_counter()
        cpu_started, hub_cpu_started = _cpu_seconds(sim.worker_pids), time.process_time()
        wave_times: list[float] = []
        tick_times: list[float] = []
        aborted = None
        engine_status: dict[str, Any] | None = None
        if mode == "waves" and args.driver == "engine":
            from edgeops.rollout.engine import RolloutEngine

            engine = RolloutEngine(database, publisher, repository=repository)
            rollout_id = engine.create(spec)
            deadline = time.perf_counter() + ROLLOUT_TIMEOUT_S
            wave_started, current_wave = started, 0
            while True:
                tick_started = time.perf_counter()
                engine.tick()
                tick_times.append(time.perf_counter() - tick_started)
                engine_status = engine.status(rollout_id)
                passed = engine_status["current_wave"] != current_wave
                if passed:  # a wave passed
                    wave_times.append(time.perf_counter() - wave_started)
                    wave_started, current_wave = time.perf_counter(), engine_status["current_wave"]
                if engine_status["status"] != "running":
                    if not passed:  # the last wave ended with the rollout
                        wave_times.append(time.perf_counter() - wave_started)
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the rollout still runs: {engine_status['counts']}")
                time.sleep(0.5)
                sim.poll(0.0)
            if engine_status["status"] != "succeeded":
                aborted = f"{engine_status['status']}: {engine_status['reason']}"
            # the engine follows update events; the figure is the devices' reported state
            while not aborted and (
                sum(1 for v in fleet.list_devices() if committed(v)) < len(compatible)
            ):
                if time.perf_counter() > deadline:
                    aborted = "not every compatible device committed in time"
                    break
                time.sleep(0.5)
                sim.poll(0.0)
        else:
            for index, wave in enumerate(waves):
                wave_started = time.perf_counter()
                deploy = plan_deploy(fleet, repository, new, wave)
                missing = apply_deploy(fleet, publisher, deploy).unacknowledged
                if missing:
                    raise RuntimeError(f"desired state not acknowledged for {len(missing)} devices")
                pending = set(wave)
                failed: set[str] = set()
                deadline = time.perf_counter() + ROLLOUT_TIMEOUT_S
                while pending:
                    for view in fleet.list_devices():
                        if view.device_id not in pending:
                            continue
                        if committed(view):
                            pending.discard(view.device_id)
                        elif str(view.update_state) in ("rolled_back", "failed"):
                            pending.discard(view.device_id)
                            failed.add(view.device_id)
                    finished = len(wave) - len(pending)
                    if abort.aborts(finished, len(failed)):
                        aborted = f"wave {index}: {len(failed)} of {finished} failed"
                        break
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"wave {index}: {len(pending)} devices never finished")
                    if pending:
                        time.sleep(0.5)  # listing 1,000 devices costs the hub; twice a second
                        sim.poll(0.0)
                wave_times.append(time.perf_counter() - wave_started)
                if aborted:
                    break
        wall = time.perf_counter() - started
        sim_cpu = _cpu_seconds(sim.worker_pids) - cpu_started
        result["simulator_cpu_s"] = sim_cpu
        result["hub_cpu_s"] = time.process_time() - hub_cpu_started
        result["agent_cpu_s_per_update"] = (sim_cpu - result["simulator_idle_cores"] * wall) / max(
            1, len(compatible)
        )
        result["phases"] = _phases(root / "hub.db", started)
        result["hub_rss_peak_bytes"] = rss.finish()
        result["broker_connections_peak"] = conns.finish()
        on_new = sum(1 for v in fleet.list_devices() if committed(v))
        snapshot = sim.wait(lambda s: s.count(on_target=new) >= len(compatible), 10.0)
        snapshot = snapshot or sim.poll(0.5)
        result.update(
            wall_s=wall,
            devices_per_minute=len(compatible) / wall * 60.0,
            wave_s=wave_times,
            engine_tick_s=sorted(tick_times),
            aborted=aborted,
            driver=args.driver if mode == "waves" else "deploy",
            engine=engine_status,
            on_new_model=on_new,
            simulator_rss_bytes=sim.rss_bytes(),
            simulator_processes=sim.processes,
            fetch_requests=server.stats.requests,
            fetch_bytes=server.stats.bytes_served,
            bridge_store_errors=bridge.store_errors,
            fleet=snapshot.summary(),
        )
    finally:
        stopped = sim.stop()
        result["left_running"] = sim.left_running
        result["stopped_devices_running"] = sum(s.running for s in stopped.devices.values())
        monitor.stop()
        publisher.stop()
        server.stop()
        stop_bridge.set()
        bridge_thread.join(10)
        bridge.stop()
        broker.stop()
        database.dispose()
    return result


def _phases(database: Path, since: float) -> dict[str, Any]:
    """Median seconds of each update step, from the ``update`` events the hub recorded."""
    import json
    import sqlite3
    import statistics

    steps = ("downloading", "verifying", "installing", "testing", "committed")
    seen: dict[str, dict[str, float]] = {}
    with contextlib.closing(sqlite3.connect(database)) as db:
        for device_id, ts, detail in db.execute(
            "SELECT device_id, ts, detail FROM device_events WHERE event = 'update'"
        ):
            state = json.loads(detail).get("state") if isinstance(detail, str) else None
            if state in steps:
                when = ts if isinstance(ts, float | int) else _epoch(str(ts))
                seen.setdefault(device_id, {})[state] = when
    phases: dict[str, Any] = {}
    for first, then in itertools.pairwise(steps):
        spans = [d[then] - d[first] for d in seen.values() if first in d and then in d]
        if spans:
            phases[f"{first}->{then}"] = round(statistics.median(spans), 3)
    return phases


def _epoch(text: str) -> float:
    import datetime

    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


# -- report ------------------------------------------------------------------------------------


def markdown(document: dict[str, Any]) -> str:
    mib = 1024 * 1024
    meta = document["meta"]
    driver = (
        "the live `RolloutEngine` (ticked every 0.5 s)"
        if document["driver"] == "engine"
        else "`edgeops.fleet.deploy`, each wave when the previous one finished"
    )
    lines = [
        "# Rollouts (issue 6)",
        "",
        f"{meta['when']}, {meta['machine']}, {meta['cores']} cores, Python {meta['python']}. "
        f"`{meta['command']}` ({meta['seconds']:.0f} s in all).",
        "",
        "Each device: the real agent (its own MQTT connection with its own "
        "credentials on Mosquitto from `deploy/mosquitto/secure.conf`), a "
        f"{document['model_bytes']:,}-byte int8 model, TUF-verified download over MQTT, "
        f"A/B slots, a {document['health_s']:g} s health check before the commit. "
        f"{INCOMPATIBLE_SHARE:.0%} of the devices are armv7l, which the new release's "
        "contract excludes. *waves*: canary 1 %, then exponential waves of up to 300 "
        "devices at 50, 100, 200, ... a second "
        f"through {driver} (no quality gate, so no soak window). *all at once* (baseline): "
        "the same release to every compatible device in one `apply_deploy`, fresh fleet.",
        "",
        "| devices | mode | compatible | excluded | waves | wall s | devices/min | "
        "peak hub RSS MiB | broker connections | simulator RSS MiB | goal |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in document["runs"]:
        goal = ""
        if row["devices"] >= 1000 and row["mode"] == "waves":
            goal = "met" if row["wall_s"] < GOAL_S else "missed"
            goal += f" (< {GOAL_S:.0f} s)"
        lines.append(
            f"| {row['devices']:,} | {row['mode']} | {row['compatible']:,} | "
            f"{len(row['excluded'])} | {'+'.join(str(n) for n in row['waves'])} | "
            f"{row['wall_s']:.1f} | {row['devices_per_minute']:,.0f} | "
            f"{row['hub_rss_peak_bytes'] / mib:.0f} | {row['broker_connections_peak']:,} | "
            f"{row['simulator_rss_bytes'] / mib:.0f} | {goal} |"
        )
    lines += ["", "Excluded devices (listed in rollout.json with their reasons):", ""]
    for row in document["runs"]:
        if row["mode"] != "waves":
            continue
        kinds: dict[str, int] = {}
        for item in row["excluded"]:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        sample = row["excluded"][0]["reason"] if row["excluded"] else "-"
        lines.append(f"- {row['devices']:,} devices: {kinds}; e.g. {sample}")
    lines += ["", "Seconds each wave took, from its first device targeted to the next wave's:", ""]
    for row in document["runs"]:
        if row["mode"] == "waves" and row["wave_s"]:
            waves_s = ", ".join(f"{w:.1f}" for w in row["wave_s"])
            lines.append(f"- {row['devices']:,} devices: {waves_s}")
    lines += [
        "",
        "Where the time goes (medians of the hub's recorded `update` events, seconds; CPU "
        "of the simulator's workers while rolling out, less their idle rate):",
        "",
        "| devices | mode | idle agents, cores | agent CPU s per update | hub CPU s | "
        "downloading | verifying | installing | testing (incl. health check) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in document["runs"]:
        phases = row["phases"]
        cells = [
            phases.get(key, float("nan"))
            for key in (
                "downloading->verifying",
                "verifying->installing",
                "installing->testing",
                "testing->committed",
            )
        ]
        lines.append(
            f"| {row['devices']:,} | {row['mode']} | {row['simulator_idle_cores']:.2f} | "
            f"{row['agent_cpu_s_per_update']:.2f} | {row['hub_cpu_s']:.1f} | "
            + " | ".join(f"{cell:.2f}" for cell in cells)
            + " |"
        )
    if document.get("skipped"):
        lines += ["", f"Not run: {document['skipped']}"]
    lines += [
        "",
        "Broker connections: `$SYS/broker/clients/connected` (devices + the hub's bridge, "
        "fetch server, publisher and this monitor). Hub RSS: VmRSS of the process running "
        "the bridge, fetch server, publisher and the wave driver (no TensorFlow in it). "
        "Simulator RSS: the worker processes holding the agents.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Writes bench/results/rollout.json and rollout.md.",
    )
    parser.add_argument("--devices", default="100,1000", help="fleet sizes (default 100,1000)")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help=f"simulator processes (default: CPU count, more for over "
        f"{AGENTS_PER_PROCESS} devices each)",
    )
    parser.add_argument("--rate-hz", type=float, default=0.2, help="samples/s per device")
    parser.add_argument(
        "--budget-s", type=float, default=5.0, help="agent loop's sample budget (s)"
    )
    parser.add_argument("--health-s", type=float, default=2.0, help="agent health check (s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--modes", default="waves,all_at_once", help="what to run")
    parser.add_argument(
        "--driver",
        choices=("engine", "deploy"),
        default="engine",
        help="waves through the RolloutEngine, or edgeops.fleet.deploy with the planner's waves",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.devices.split(",") if part.strip()]
    started = time.perf_counter()
    command = "python bench/rollout.py" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in (("devices", args.devices), ("processes", args.processes))
        if v != parser.get_default(k)
    )
    work = Path(tempfile.mkdtemp(prefix="edgeops-rollout-bench-"))
    document: dict[str, Any] = {"runs": [], "health_s": args.health_s, "driver": args.driver}
    try:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_prepare_child, args=(str(work / "lab"), args.seed, out))
        (work / "lab").mkdir()
        child.start()
        lab = out.get(timeout=900)
        child.join(60)
        document["model_bytes"] = lab["model_bytes"]
        per_agent: float | None = None
        idle_per_agent: float | None = None
        cores = os.cpu_count() or 1
        for size in sorted(sizes):
            if per_agent is not None and idle_per_agent is not None:
                need = per_agent * size * 1.5
                idle = idle_per_agent * size
                if need > _mem_available() * 0.7 or idle > cores * 0.75:
                    document["skipped"] = (
                        f"{size:,} devices: about {need / 2**30:.1f} GiB of memory "
                        f"({per_agent / 2**20:.2f} MiB per agent measured; "
                        f"{_mem_available() / 2**30:.1f} GiB available) and "
                        f"{idle:.1f} cores for the idle agents alone ({idle_per_agent * 100:.2f} "
                        f"cores per 100 agents measured; {cores} cores here)"
                    )
                    continue
            for mode in args.modes.split(","):
                print(f"{size} devices, {mode} ...", flush=True)
                row = run_once(work / f"{size}-{mode}", lab, size, mode, args)
                document["runs"].append(row)
                print(
                    f"  {row['compatible']} compatible on the new model in "
                    f"{row['wall_s']:.1f} s ({row['devices_per_minute']:.0f}/min)",
                    flush=True,
                )
                document["meta"] = run_meta(command, time.perf_counter() - started, seed=args.seed)
                write_results(args.out, "rollout", document, markdown(document))  # so far
                per_agent = max(per_agent or 0.0, row["simulator_rss_bytes"] / size)
                idle_per_agent = max(idle_per_agent or 0.0, row["simulator_idle_cores"] / size)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    document["meta"] = run_meta(command, time.perf_counter() - started, seed=args.seed)
    write_results(args.out, "rollout", document, markdown(document))
    print(f"see {args.out / 'rollout.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
