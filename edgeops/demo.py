"""``edgeops demo``: the whole closed loop on one machine, zero setup.

drift -> detection -> retraining -> canary -> promotion, with every part real:

1. **Models.** The built-in digits dataset; an MLP trained one epoch and compressed to full
   int8 is the *factory* model every device ships with; the same MLP trained properly
   (``--epochs``) and compressed is *v1*. Both are signed into a fresh TUF repository.
2. **Hub.** A broker (the embedded one unless ``EDGEOPS_MQTT_URL`` is set), the hub's bridge
   (state, events and telemetry into a fresh SQLite database, telemetry checked against the
   releases), its fetch server, desired-state publisher, rollout engine and drift watch, the
   continuous-training pipeline behind it (:mod:`edgeops.pipelines.ct`).
3. **Fleet.** ``--devices`` real device agents (:mod:`edgeops.fleet.simulator`: each its own
   MQTT connection, state, slots, offline buffer and LiteRT interpreter) streaming digits
   samples (the training split) at ``RATE_HZ``, telemetry windows of ``WINDOW_S`` with every
   raw sample kept for retraining.
4. **Rollout of v1:** a canary, then exponential waves, behind quality gates.
5. **Drift.** After ``--steady`` seconds every device's sensor changes its gain and offset
   (``--gain``/``--offset``: a fleet-wide recalibration), the moment is recorded.
6. **Detection.** The drift watch evaluates every ``DRIFT_WINDOW_S``; its first ``drift``
   verdict is the event, whose ``retrain`` action starts the continuous-training pipeline
   exactly as ``edgeops hub serve`` does (:func:`edgeops.hub.serve._ct_starter`, the
   policy's parameters): it waits for ``--samples`` raw samples sent since the drift, labels
   them (the simulated oracle, which sees through the sensor change as a person looking at
   the images would), retrains on the reference data plus the new data, compresses,
   evaluates against the champion, registers, releases, and starts a canary rollout with
   quality gates.
7. **Promotion.** When that rollout has reached every device, the pipeline makes the
   challenger the registry's production version.

The timeline printed at the end gives the time from the drift to its detection and to the
improved model on every device, and the accuracy of the models on the held-out test split
(which no model trained on): the champion before the drift, the champion under the drift,
the promoted model under the drift. Everything lives in a fresh directory under
``<data dir>/demo/``. ``--headless`` ends after the loop; otherwise the fleet keeps running
until Ctrl-C. Every child process is stopped on every way out.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeops.config import Settings
from edgeops.errors import EdgeOpsError

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.fleet.simulator import FleetSimulator
    from edgeops.registry import ModelVersionView, Registry
    from edgeops.rollout.engine import RolloutEngine

__all__ = ["DemoOptions", "run_demo"]

MODEL_NAME = "digits-mlp"
RATE_HZ = 10.0  # samples a second per device
WINDOW_S = 2.0  # telemetry window
DRIFT_WINDOW_S = 10.0  # the drift watch's evaluation window, and how often it evaluates
TICK_S = 0.5  # rollout engine
POLL_S = 0.25
MIN_ACCURACY_RECOVERY_PP = 2.0


@dataclass(frozen=True)
class DemoOptions:
    """What ``edgeops demo`` does; see the module docstring."""

    devices: int = 12
    processes: int = 2
    headless: bool = True
    epochs: int = 15
    steady_s: float = 20.0
    gain: float = 0.5
    offset: float = 6.0
    samples: int = 3000
    timeout_s: float = 540.0
    seed: int = 0


@dataclass
class Timeline:
    """Moments of the run, in seconds since it started, printed as they happen."""

    say: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)
    lines: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, key: str | None, text: str) -> float:
        at = time.monotonic() - self.started
        if key is not None:
            self.marks[key] = at
        self.lines.append((at, text))
        self.say(f"[{at:6.1f} s] {text}")
        return at


class DemoError(EdgeOpsError):
    """The loop did not complete: which step, and why."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so children are stopped either way."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(settings: Settings, options: DemoOptions, *, console: Console, as_json: bool) -> int:
    """Run the closed loop; returns the exit code (0: the loop closed)."""

    def say(text: str) -> None:
        if not as_json:
            console.print(text, highlight=False, soft_wrap=True)

    run_dir = _fresh_directory(settings.data_dir / "demo")
    timeline = Timeline(say)
    timeline.mark(None, f"demo directory {run_dir}")
    try:
        with _sigterm_as_interrupt():
            result = _loop(settings, options, run_dir, timeline, say)
    except KeyboardInterrupt:
        say("interrupted; every child process was stopped")
        return 130
    result["timeline"] = [{"t_s": round(t, 2), "what": text} for t, text in timeline.lines]
    result["directory"] = str(run_dir)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if as_json:
        console.print_json(json.dumps(result, sort_keys=True))
    else:
        _print_summary(console, result)
    return 0


def _fresh_directory(parent: Path) -> Path:
    """A new directory ``parent/<UTC time>`` (``-2``, ``-3`` ... if taken)."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for attempt in range(1, 1000):
        candidate = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise DemoError(f"no free directory name under {parent}")


def _loop(
    settings: Settings,
    options: DemoOptions,
    run_dir: Path,
    timeline: Timeline,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from device_agent.link import MqttEndpoint
    from edgeops.compress import CompressService
    from edgeops.fleet import FleetService
    from edgeops.fleet.simulator import (
        FleetSimulator,
        SimSetup,
        make_devices,
        release_bundle,
        samples_for,
    )
    from edgeops.hub import DesiredPublisher, HubBridge
    from edgeops.hub.serve import _ct_starter, pipeline_runner
    from edgeops.hub.stores import open_stores
    from edgeops.monitor.ingest import ReleaseCatalogue
    from edgeops.monitor.watch import DriftService, RepositoryReleases
    from edgeops.rollout.engine import RolloutEngine
    from edgeops.train import TrainService
    from edgeops.trust import FetchServer, release_model, repository_for

    # the hub's own layout, under the run's directory
    hub_settings = settings.model_copy(update={"data_dir": run_dir, "database_url": None})
    with ExitStack() as stack:
        stores = stack.enter_context(open_stores(hub_settings.database, hub_settings.artifacts_dir))
        datasets, registry, database = stores.datasets(), stores.registry(), stores.database

        # 1. models -----------------------------------------------------------------------
        dataset = datasets.register_builtin("digits")
        trainer = TrainService(datasets, registry)
        compressor = CompressService(datasets, registry)

        def model(epochs: int) -> ModelVersionView:
            keras = trainer.train(
                dataset.version, "mlp", epochs=epochs, seed=options.seed, name=MODEL_NAME,
                progress=False, evaluate_on_runtime=False,
            )  # fmt: skip
            return compressor.compress(keras.id, quantize="int8", progress=False)

        factory = model(1)
        champion = model(options.epochs)
        timeline.mark(
            "trained",
            f"trained and compressed {champion.ref} (int8) and the factory model "
            f"{factory.ref} on {dataset.name}",
        )
        registry.promote(champion.id, "staging")
        registry.promote(champion.id, "production")

        repository = repository_for(hub_settings)
        repository.init(run_dir / "offline-root-keys")
        factory_release = release_model(
            repository, factory.id, registry=registry, datasets=datasets
        )
        v1 = release_model(repository, champion.id, registry=registry, datasets=datasets)
        timeline.mark("signed", f"signed {factory_release.path} and {v1.path} (TUF)")

        # 2. broker and hub ---------------------------------------------------------------
        url = _broker(settings, run_dir, stack)
        endpoint = MqttEndpoint.parse(url)
        fleet = FleetService(database)
        bridge = HubBridge(
            endpoint, fleet, client_id="demo-hub", catalogue=ReleaseCatalogue(repository)
        )
        bridge.start()
        stack.callback(bridge.stop)
        fetch = FetchServer(repository.repository_dir, endpoint, client_id="demo-hub-fetch")
        fetch.start()
        stack.callback(fetch.stop)
        publisher = DesiredPublisher(endpoint, client_id="demo-hub")
        publisher.start()
        stack.callback(publisher.stop)
        engine = RolloutEngine(database, publisher, repository=repository)
        # the drift watch and its retrain action as `edgeops hub serve` wires them: an onset
        # starts the continuous-training pipeline, which waits for fresh samples, retrains,
        # releases, rolls out behind gates and promotes
        watch = DriftService(database, RepositoryReleases(repository))
        runner = pipeline_runner(hub_settings, database)
        watch.retrainer = _ct_starter(runner, watch)
        watch.set_policy(
            champion.name,
            action="retrain",
            window_s=DRIFT_WINDOW_S,
            config={"min_samples": 100},
            retrain=_ct_parameters(options, dataset.version, len_devices=options.devices),
        )
        hub = _HubThreads(bridge, engine, watch)
        hub.start()
        stack.callback(hub.stop)
        timeline.mark("hub", f"hub up: broker {endpoint.url}, bridge, fetch server, engine, watch")

        # 3. fleet ------------------------------------------------------------------------
        bundle = release_bundle(repository, factory_release.path, run_dir / "factory")
        samples = samples_for(datasets, bundle, run_dir / "samples.npz", split="train")
        setup = SimSetup(
            data_dir=run_dir / "fleet",
            trust_root=Path(repository.root_json_path),
            champion=bundle,
            champion_target=factory_release.path,
            samples=samples,
            rate_hz=RATE_HZ,
            heartbeat_s=5.0,
            window_seconds=WINDOW_S,
            raw_sample_rate=RATE_HZ * WINDOW_S,
            update_health_s=1.0,
            sample_budget_s=None,
        )
        devices = make_devices(options.devices, lambda _: url, prefix="demo", seed=options.seed)
        sim = FleetSimulator(setup, devices, processes=options.processes)
        sim.start()
        stack.callback(sim.stop)
        ids = [d.device_id for d in devices]
        _wait(
            lambda: (
                sim.poll().count(on_target=factory_release.path) == len(ids)
                and _reported(fleet, ids)
            ),
            options.timeout_s,
            "every device to boot on the factory model and report to the hub",
        )
        timeline.mark("fleet", f"{len(ids)} devices online, running {factory_release.path}")

        # 4. rollout of v1 ----------------------------------------------------------------
        first = _rollout(engine, v1.path, factory.id, len(ids), name="demo-v1")
        timeline.mark(None, f"rollout {first} of {v1.path}: canary, then exponential waves")
        _finish_rollout(engine, first, sim, v1.path, len(ids), options.timeout_s)
        timeline.mark("v1", f"v1 on every device ({v1.path})")

        # 5. steady streaming, then the drift ---------------------------------------------
        time.sleep(options.steady_s)
        if watch.events():
            raise DemoError(
                f"the drift watch reported drift before any was injected: "
                f"{watch.events()[0].report}"
            )
        quiet = _evaluations(database, "no_drift")
        sim.set_sensor(gain=options.gain, offset=options.offset)
        drift_at = timeline.mark(
            "drift",
            f"drift injected: every sensor reads x * {options.gain:g} + {options.offset:g}",
        )

        # 6. detection; the CT run it starts; the challenger's rollout and promotion --------
        _wait(lambda: bool(watch.events()), options.timeout_s, "the drift watch to detect it")
        event = watch.events()[-1]
        timeline.mark(
            "detected",
            f"drift detected for {event.model_id} ({event.samples} samples): "
            + ", ".join(
                (event.report.get("drifted_outputs") or [])
                + (event.report.get("drifted_features") or [])[:4]
            ),
        )
        # the watch records the event before its retrain action has run (status pending)
        _wait(
            lambda: watch.events()[-1].action_result.get("status") != "pending",
            options.timeout_s,
            "the drift watch's retrain action",
        )
        event = watch.events()[-1]
        run_id = event.action_result.get("pipeline_run")
        if not run_id:
            raise DemoError(f"the retrain action did not start a run: {event.action_result}")
        timeline.mark(
            "ct",
            f"continuous-training run {run_id} started; it waits for {options.samples} "
            "fresh samples",
        )
        for step, text in (
            ("collect", "collected the samples the drifted fleet sent"),
            ("decide", ""),
            ("rollout", ""),
        ):
            outputs = _wait_step(runner, run_id, step, options.timeout_s)
            if step == "decide":
                scores = runner.get(run_id).step("evaluate").outputs or {}
                text = (
                    f"challenger {outputs.get('challenger')}: "
                    f"{scores.get('challenger_score', 0):.3f} vs champion "
                    f"{scores.get('champion_score', 0):.3f} on recent samples; "
                    f"{outputs.get('reason', '')}"
                )
                timeline.mark("challenger", text)
            elif step == "rollout":
                if not outputs.get("rollout"):
                    raise DemoError(f"the challenger was not rolled out: {outputs.get('reason')}")
                timeline.mark(None, f"canary rollout {outputs['rollout']} with quality gates")
            else:
                timeline.mark(None, f"{text}: {outputs.get('samples')}")
        _wait(
            lambda: runner.get(run_id).status not in ("pending", "running"),
            options.timeout_s,
            f"continuous-training run {run_id} to end",
        )
        run = runner.get(run_id)
        promoted = run.step("promote").outputs or {}
        if run.status != "succeeded" or not promoted.get("promoted"):
            raise DemoError(
                f"continuous-training run {run_id} {run.status}: "
                f"{run.error or promoted.get('reason')}"
            )
        target = str((run.step("release").outputs or {})["target"])
        _wait(
            lambda: sim.poll().count(on_target=target) == len(ids),
            options.timeout_s,
            f"every device to run {target}",
        )
        challenger_id = str(promoted["model"])
        timeline.mark("promoted", f"{target} on every device; {challenger_id} in production")

        # 7. the figures ------------------------------------------------------------------
        challenger = registry.get_model(challenger_id)
        before = _accuracy(datasets, registry, champion)
        during = _accuracy(datasets, registry, champion, options.gain, options.offset)
        after = _accuracy(datasets, registry, challenger, options.gain, options.offset)
        marks = timeline.marks
        if not options.headless:
            _linger(say)
        return {
            "devices": len(ids),
            "drift": {"gain": options.gain, "offset": options.offset},
            "seconds": {
                "drift_to_detection": round(marks["detected"] - drift_at, 1),
                "drift_to_every_device_improved": round(marks["promoted"] - drift_at, 1),
                "total": round(time.monotonic() - timeline.started, 1),
            },
            "accuracy": {
                "before_drift": round(before, 4),
                "during_drift": round(during, 4),
                "after_promotion": round(after, 4),
                "recovered_within_pp": MIN_ACCURACY_RECOVERY_PP,
                "recovered": (before - after) * 100.0 <= MIN_ACCURACY_RECOVERY_PP,
            },
            "no_drift_evaluations_before_drift": quiet,
            "drift_event": event.to_dict(),
            "pipeline_run": run.to_dict(),
            "models": {"factory": factory.id, "champion": champion.id, "promoted": challenger_id},
        }


def _linger(say: Callable[[str], None]) -> None:
    """Keep the hub and the fleet running until Ctrl-C (the figures follow)."""
    say("the loop is closed; the fleet keeps running: Ctrl-C ends the demo")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("stopping every child process")


def _ct_parameters(options: DemoOptions, dataset: str, *, len_devices: int) -> dict[str, Any]:
    """The retrain action's continuous-training parameters (the policy's ``retrain``)."""
    per_window = int(RATE_HZ * WINDOW_S)
    return {
        # the simulated oracle knows the sensor change, as a person looking at the
        # images would see through it
        "labeler": {
            "kind": "oracle",
            "dataset": dataset,
            "sensor": {"gain": options.gain, "offset": options.offset},
        },
        "min_samples": min(options.samples, 500),
        "max_samples": options.samples,
        "max_windows": 2 * options.samples // per_window + len_devices,
        "wait_seconds": options.timeout_s,
        "holdout": 0.2,
        "epochs": options.epochs * 3,  # more data, two sensors: longer
        "margin": 0.02,
        "seed": options.seed,
        "rollout": {
            "canary_count": max(1, len_devices // 6),
            "base_rate_per_minute": 120,
            "increment_factor": 2.0,
            "device_timeout_seconds": 120,
            "soak_seconds": 6,
            "promote_wait_seconds": int(options.timeout_s),
            "max_error_rate": 0.01,
            "max_latency_p95_ratio": 5.0,
            "max_psi": 0.5,
        },
    }


def _wait_step(runner: Any, run_id: str, step: str, timeout_s: float) -> dict[str, Any]:
    """Wait until ``step`` of the run succeeded; its outputs. DemoError if the run ended
    without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = runner.get(run_id)
        found = run.step(step)
        if found.status == "succeeded":
            return dict(found.outputs or {})
        if run.status not in ("pending", "running"):
            raise DemoError(f"continuous-training run {run_id} {run.status}: {run.error}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for step {step}")
        time.sleep(POLL_S)


def _evaluations(database: Any, verdict: str) -> int:
    import sqlalchemy as sa
    from sqlmodel import col, select

    from edgeops.monitor.models import DriftEvaluationRecord

    with database.session() as session:
        query = select(sa.func.count()).select_from(DriftEvaluationRecord)
        query = query.where(col(DriftEvaluationRecord.verdict) == verdict)
        return int(session.exec(query).one())


class _HubThreads:
    """The bridge's pump, the engine's tick and the watch's evaluations, in threads (as
    ``edgeops hub serve`` runs them: :func:`edgeops.hub.serve.run_every`)."""

    def __init__(self, bridge: Any, engine: RolloutEngine, watch: Any) -> None:
        self.bridge, self.engine, self.watch = bridge, engine, watch
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        from edgeops.hub.serve import run_every

        pump = threading.Thread(
            target=self.bridge.run, args=(self.stop_event,), name="demo-bridge", daemon=True
        )
        pump.start()
        self.threads = [
            pump,
            run_every(TICK_S, self.engine.tick, self.stop_event, "demo-engine"),
            run_every(DRIFT_WINDOW_S, self.watch.evaluate, self.stop_event, "demo-drift"),
        ]

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(10)


def _broker(settings: Settings, run_dir: Path, stack: ExitStack) -> str:
    if settings.mqtt_url:
        return settings.mqtt_url
    from edgeops.broker import EmbeddedBrokerProcess

    broker = EmbeddedBrokerProcess(log_path=run_dir / "broker.log")
    broker.start()
    stack.callback(broker.stop)
    return broker.url


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def _reported(fleet: Any, ids: list[str]) -> bool:
    wanted = set(ids)
    views = [d for d in fleet.list_devices() if d.device_id in wanted]
    return sum(1 for d in views if d.agent_version) == len(wanted)


def _rollout(engine: RolloutEngine, target: str, current_model: str, total: int, name: str) -> str:
    from edgeops.rollout import parse_spec

    spec = parse_spec(
        json.dumps(
            {
                "name": name,
                "release": target,
                "selection": {"current_model": current_model},
                "waves": {
                    "canary": {"count": max(1, total // 6)},
                    "exponential": {"base_rate_per_minute": 120, "increment_factor": 2.0},
                },
                "device_timeout_seconds": 120,
                "gates": {"soak_seconds": 4, "max_error_rate": 0.01},
            }
        ),
        "json",
    )
    return engine.create(spec)


def _finish_rollout(
    engine: RolloutEngine,
    rollout_id: str,
    sim: FleetSimulator,
    target: str,
    total: int,
    timeout_s: float,
) -> None:
    """Wait until the rollout succeeded and every device runs ``target``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = engine.status(rollout_id)
        if status["status"] in ("failed", "aborted"):
            raise DemoError(
                f"rollout {rollout_id} {status['status']}: {status.get('reason')}; "
                f"devices: {status['counts']}"
            )
        on_target = sim.poll().count(on_target=target)
        if status["status"] == "succeeded" and on_target == total:
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"rollout {rollout_id} still {status['status']} after {timeout_s:.0f} s: "
                f"{status['counts']}; {on_target} of {total} devices run {target}"
            )
        time.sleep(POLL_S)


def _accuracy(
    datasets: DatasetService,
    registry: Registry,
    model: ModelVersionView,
    gain: float = 1.0,
    offset: float = 0.0,
) -> float:
    """The model's accuracy on the digits test split (no model trained on it), its raw
    samples read by a sensor with ``gain`` and ``offset``, through the model's own feature
    rule, on LiteRT."""
    from edgeops.evaluate import evaluate_artifact

    version = datasets.resolve(model.dataset_version)
    reference = datasets.load("digits")
    x, y = reference.split("test")
    drifted = np.asarray(x, dtype=np.float32) * gain + offset
    report = evaluate_artifact(
        registry.load_artifact(model.id),
        model.format,
        version.feature_rule.apply(drifted),
        np.asarray(y),
        latency_repeats=1,
    )
    return float(report.to_dict()["accuracy"])


def _print_summary(console: Console, result: dict[str, Any]) -> None:
    seconds, accuracy = result["seconds"], result["accuracy"]
    table = Table("", "value", title="Closed loop", show_header=False)
    table.add_row("devices", str(result["devices"]))
    table.add_row("drift to detection", f"{seconds['drift_to_detection']:.1f} s")
    table.add_row(
        "drift to the improved model on every device",
        f"{seconds['drift_to_every_device_improved']:.1f} s",
    )
    table.add_row("accuracy before the drift", f"{accuracy['before_drift']:.1%}")
    table.add_row("accuracy during the drift (champion)", f"{accuracy['during_drift']:.1%}")
    table.add_row("accuracy after promotion", f"{accuracy['after_promotion']:.1%}")
    verdict = "yes" if accuracy["recovered"] else "NO"
    table.add_row(f"recovered within {accuracy['recovered_within_pp']:g} pp", verdict)
    table.add_row("total", f"{seconds['total']:.0f} s")
    console.print(table)
    console.print(f"everything is in {result['directory']}", highlight=False)
