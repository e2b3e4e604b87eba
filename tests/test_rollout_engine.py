"""The live rollout engine on a real database (SQLite and PostgreSQL): devices' outcomes come
as the bridge records them (update events through FleetService, telemetry windows through
TelemetryService); desired documents go to a recording publisher double."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_agent.protocol import Event, StateReport
from device_agent.telemetry import TelemetryWindow
from edgeops.db import Database
from edgeops.errors import NotFoundError
from edgeops.fleet import DeviceView, FleetService
from edgeops.monitor import TelemetryService
from edgeops.rollout import RolloutSpec, RolloutSpecError, dump_spec
from edgeops.rollout.engine import RolloutEngine, RolloutError
from edgeops.rollout.gates import js_divergence, psi
from tests.clitools import run_cli
from tests.fixtures.clock import Clock
from tests.fixtures.rollouts import OLD_TARGET, RELEASE, contract, make_spec, old_state
from tests.test_rollout_plan import hub_data_dir  # noqa: F401  (a fixture)


@dataclass
class Recorder:
    """A DesiredSink double: what was published, in order."""

    published: list[tuple[str, str | None]] = field(default_factory=list)

    def publish_many(self, devices: Sequence[DeviceView], wait_s: float = 10.0) -> list[str]:
        for device in devices:
            release = device.desired.get("release")
            self.published.append((device.device_id, release["target"] if release else None))
        return []

    def last(self, device_id: str) -> str | None:
        return [target for d, target in self.published if d == device_id][-1]


# How a simulated device answers being pointed at the release: None (silence) or the
# update states it reports, plus a telemetry window from the new model (or None).
Behaviour = Callable[[str], tuple[list[str], dict[str, Any] | None]]


def good_window() -> dict[str, Any]:
    return {"class_counts": [10] * 10, "latency_ms": {"p95": 11.0}, "errors": {}}


def healthy(device_id: str) -> tuple[list[str], dict[str, Any] | None]:
    return ["downloading", "verifying", "installing", "testing", "committed"], good_window()


class Fleet:
    """Devices recorded as the bridge would record them."""

    def __init__(self, database: Database, clock: Clock, count: int) -> None:
        self.fleet = FleetService(database, clock=clock)
        self.telemetry = TelemetryService(database, clock=clock)
        self.seq: dict[str, int] = {}
        self.window_seq: dict[str, int] = {}
        self.ids = [f"dev-{i:03d}" for i in range(count)]
        for device_id in self.ids:
            self.fleet.record_state(old_state(device_id, ts=1_700_000_000.0))
            # the previous release's telemetry: p95 10 ms
            self.window(device_id, "m-old", good_window() | {"latency_ms": {"p95": 10.0}})

    def event(self, device_id: str, state: str, reason: str | None = None) -> None:
        seq = self.seq[device_id] = self.seq.get(device_id, 0) + 1
        name = {"committed": "healthy", "rolling_back": "failed"}.get(state, "start")
        detail = {"state": state, "event": name, "target": RELEASE, "attempt": 1,
                  "reason": reason, "previous": "idle"}  # fmt: skip
        self.fleet.record_event(Event(device_id, seq, "update", 1_800_000_000.0 + seq, detail))

    def window(self, device_id: str, model_id: str, body: dict[str, Any]) -> None:
        seq = self.window_seq[device_id] = self.window_seq.get(device_id, 0) + 1
        samples = sum(body.get("class_counts", [])) or 100
        self.telemetry.record(
            TelemetryWindow(
                device_id=device_id,
                model_id=model_id,
                seq=seq,
                start_ts=1_800_000_000.0,
                end_ts=1_800_000_060.0,
                samples=samples,
                class_counts=body.get("class_counts", []),
                latency_ms=body.get("latency_ms", {}),
                errors=body.get("errors", {}),
            )
        )


def drive(
    engine: RolloutEngine,
    rollout_id: str,
    fleet: Fleet,
    recorder: Recorder,
    clock: Clock,
    behaviour: Behaviour,
    *,
    step_s: float = 10.0,
    max_ticks: int = 500,
) -> dict[str, Any]:
    """Tick until the rollout ends; each device answers once when first pointed at the
    release."""
    answered: set[str] = set()
    for _ in range(max_ticks):
        running = engine.tick()
        for device_id, target in list(recorder.published):
            if target == RELEASE and device_id not in answered:
                answered.add(device_id)
                states, window = behaviour(device_id)
                for state in states:
                    reason = "health: 5 runtime errors" if state == "rolling_back" else None
                    fleet.event(device_id, state, reason)
                if window is not None:
                    fleet.window(device_id, "m-new", window)
        if not running:
            break
        clock.advance(step_s)
    return engine.status(rollout_id)


@pytest.fixture
def setup(database: Database) -> Callable[[int], tuple[RolloutEngine, Fleet, Recorder, Clock]]:
    def make(count: int) -> tuple[RolloutEngine, Fleet, Recorder, Clock]:
        clock = Clock()
        fleet = Fleet(database, clock, count)
        recorder = Recorder()
        return RolloutEngine(database, recorder, clock=clock), fleet, recorder, clock

    return make


# -- success ----------------------------------------------------------------------------------


def test_canary_then_exponential_waves_succeed(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(20)
    spec = make_spec(
        gates={
            "soak_seconds": 60,
            "max_error_rate": 0.05,
            "max_crash_rate": 0.001,
            "max_latency_p95_ratio": 1.5,
            "divergence": {"metric": "psi", "max": 0.2},
            "min_shadow_agreement": 0.9,
        }
    )
    rollout_id = engine.create(spec, custom=contract())
    assert engine.status(rollout_id)["status"] == "running"
    assert recorder.published == []  # create targets nothing
    status = drive(engine, rollout_id, fleet, recorder, clock, healthy)
    assert status["status"] == "succeeded", status["reason"]
    assert [w["size"] for w in status["waves"]] == [2, 2, 4, 8, 4]
    assert all(w["state"] == "passed" for w in status["waves"])
    assert status["counts"]["succeeded"] == 20
    for device_id in fleet.ids:
        assert fleet.fleet.get_device(device_id).desired["release"] == {
            "target": RELEASE,
            "model_id": "m-new",
        }
    # waves were targeted in order: every canary device before any later one
    order = [d for d, t in recorder.published if t == RELEASE]
    canary = {d["device_id"] for d in engine.devices(rollout_id) if d["wave"] == 0}
    assert set(order[:2]) == canary
    gates = {g["name"]: g for g in status["waves"][0]["gates"]}
    assert gates["error_rate"]["value"] == 0.0 and gates["error_rate"]["passed"]
    assert gates["latency_p95_ratio"]["value"] == pytest.approx(1.1)
    assert gates["divergence_psi"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert gates["crash_rate"]["value"] == 0.0
    assert gates["shadow_agreement"]["passed"] and "skipped" in gates["shadow_agreement"]["note"]
    assert status["waves"][0]["gates_decided"]


def test_soak_holds_the_next_wave_back(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(6)
    rollout_id = engine.create(
        make_spec(gates={"soak_seconds": 300, "max_error_rate": 0.1}), custom=contract()
    )
    engine.tick()
    canary = [d for d, _ in recorder.published]
    assert len(canary) == 2
    for device_id in canary:
        fleet.event(device_id, "committed")
        fleet.window(device_id, "m-new", good_window())
    engine.tick()
    status = engine.status(rollout_id)
    assert status["waves"][0]["state"] == "soaking"
    assert status["waves"][0]["gates"][0]["value"] == 0.0
    clock.advance(299)
    engine.tick()
    assert len(recorder.published) == 2 and engine.status(rollout_id)["current_wave"] == 0
    clock.advance(1)
    engine.tick()  # soak over: promoted, and the next wave's first device targeted at once
    assert engine.status(rollout_id)["current_wave"] == 1
    assert len(recorder.published) == 3
    clock.advance(29)
    engine.tick()  # 2 a minute, evenly: the second one 30 s after the first
    assert len(recorder.published) == 3
    clock.advance(1)
    engine.tick()
    assert len(recorder.published) == 4


# -- abort ------------------------------------------------------------------------------------


def test_canary_failures_abort_and_roll_back(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(50)
    # half the fleet had a desired release already: that is what an abort sets back
    fleet.fleet.set_desired_many(fleet.ids[:25], {"release": {"target": OLD_TARGET}})
    spec = make_spec(
        waves={
            "canary": {"count": 10, "abort": {"min_devices": 10, "failure_percent": 10.0}},
            "exponential": {"base_rate_per_minute": 10, "increment_factor": 2.0},
        }
    )
    rollout_id = engine.create(spec, custom=contract())
    canary = {d["device_id"] for d in engine.devices(rollout_id) if d["wave"] == 0}
    failing = set(sorted(canary)[:2])  # 20 % of the canary fails its install

    def behaviour(device_id: str) -> tuple[list[str], dict[str, Any] | None]:
        if device_id in failing:
            return ["downloading", "testing", "rolling_back", "rolled_back"], None
        return healthy(device_id)

    status = drive(engine, rollout_id, fleet, recorder, clock, behaviour)
    assert status["status"] == "aborted"
    assert "wave 0 (canary): 2 of 10 finished devices failed" in status["reason"]
    assert status["counts"]["rolled_back"] == 10 and status["counts"]["pending"] == 40
    assert {d["device_id"] for d in status["failed"]} == failing
    for device_id in canary:
        device = fleet.fleet.get_device(device_id)
        assert device.desired["release"]["target"] == OLD_TARGET
        assert recorder.last(device_id) == OLD_TARGET
    # the devices that had no desired release get the one their active slot reported
    no_desired = sorted(canary - set(fleet.ids[:25]))
    if no_desired:
        assert fleet.fleet.get_device(no_desired[0]).desired["release"] == {
            "target": OLD_TARGET,
            "model_id": "m-old",
        }
    touched = {d for d, _ in recorder.published}
    assert touched == canary  # no device past the canary was ever targeted


def test_contract_refusals_count_as_rejected(setup: Any) -> None:
    engine, fleet, recorder, _ = setup(4)
    spec = make_spec(
        waves={
            "canary": {"count": 2},
            "abort": {"min_devices": 1, "failure_count": 1, "failure_types": ["rejected"]},
        }
    )
    rollout_id = engine.create(spec, custom=contract())
    engine.tick()
    first = recorder.published[0][0]
    fleet.fleet.record_event(
        Event(
            first,
            1,
            "update",
            1.0,
            {
                "state": "rolling_back",
                "event": "failed",
                "target": RELEASE,
                "reason": "memory: needs 1 GiB free",
            },
        )
    )
    engine.tick()
    status = engine.status(rollout_id)
    assert status["status"] == "aborted"
    assert status["failed"][0]["kind"] == "rejected"


# -- quality gates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "gate"),
    [
        # every install succeeds, but the model answers mostly class 0
        (
            {"class_counts": [80, 2, 2, 2, 2, 2, 2, 2, 2, 2], "latency_ms": {"p95": 10.0}},
            "divergence_psi",
        ),
        (
            {"class_counts": [10] * 10, "latency_ms": {"p95": 10.0}, "errors": {"runtime": 30}},
            "error_rate",
        ),
        ({"class_counts": [10] * 10, "latency_ms": {"p95": 25.0}}, "latency_p95_ratio"),
    ],
)
def test_a_degraded_release_is_stopped_by_its_gate(
    setup: Any, window: dict[str, Any], gate: str
) -> None:
    engine, fleet, recorder, clock = setup(10)
    spec = make_spec(
        gates={
            "soak_seconds": 60,
            "max_error_rate": 0.05,
            "max_latency_p95_ratio": 1.5,
            "divergence": {"metric": "psi", "max": 0.2},
        }
    )
    rollout_id = engine.create(spec, custom=contract())

    def degraded(device_id: str) -> tuple[list[str], dict[str, Any] | None]:
        return ["downloading", "committed"], window

    status = drive(engine, rollout_id, fleet, recorder, clock, degraded)
    assert status["status"] == "failed"
    assert f"quality gate {gate} failed" in status["reason"]
    assert status["counts"]["succeeded"] == 2 and status["counts"]["pending"] == 8
    failed = [g for g in status["waves"][0]["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == [gate]
    assert len({d for d, _ in recorder.published}) == 2  # promotion stopped at the canary
    # the operator rolls the canary back
    assert engine.abort(rollout_id) == 2
    assert all(target == OLD_TARGET for _, target in recorder.published[2:])


def test_no_telemetry_from_the_new_release_fails_the_gate(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(4)
    rollout_id = engine.create(
        make_spec(gates={"soak_seconds": 30, "max_error_rate": 0.05}), custom=contract()
    )
    status = drive(engine, rollout_id, fleet, recorder, clock, lambda d: (["committed"], None))
    assert status["status"] == "failed"
    assert "no telemetry from the new release" in status["reason"]


def test_divergence_formulas() -> None:
    assert psi([10, 10], [10, 10]) == pytest.approx(0.0, abs=1e-9)
    assert js_divergence([10, 10], [10, 10]) == pytest.approx(0.0, abs=1e-9)
    assert js_divergence([1000, 0], [0, 1000]) == pytest.approx(1.0, abs=1e-3)
    assert psi([90, 10], [50, 50]) == pytest.approx(0.4 * __import__("math").log(9), rel=1e-3)


# -- timeouts, pause, resume, abort -----------------------------------------------------------


def test_silent_devices_time_out(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(6)
    rollout_id = engine.create(make_spec(device_timeout_seconds=60), custom=contract())
    status = drive(engine, rollout_id, fleet, recorder, clock, lambda d: ([], None))
    assert status["status"] == "aborted"
    assert status["counts"]["rolled_back"] == 2
    assert all(d["kind"] == "timed_out" for d in status["failed"])
    assert clock.now - datetime(2026, 11, 27, 12, 0, tzinfo=UTC) >= timedelta(seconds=60)


def test_timeouts_that_do_not_abort_fail_the_success_condition(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(6)
    spec = make_spec(
        device_timeout_seconds=60,
        waves={"abort": {"failure_count": 5, "failure_types": ["failed"]}},
    )
    rollout_id = engine.create(spec, custom=contract())
    status = drive(engine, rollout_id, fleet, recorder, clock, lambda d: ([], None))
    assert status["status"] == "failed"
    assert "0 of 2 devices succeeded" in status["reason"]


def test_pause_resume_and_abort(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(6)
    rollout_id = engine.create(make_spec(device_timeout_seconds=60), custom=contract())
    engine.tick()
    canary = [d for d, _ in recorder.published]
    engine.pause(rollout_id)
    assert engine.status(rollout_id)["status"] == "paused"
    with pytest.raises(RolloutError, match="paused, not running"):
        engine.pause(rollout_id)
    clock.advance(600)  # far past the device timeout, but paused
    for device_id in canary:
        fleet.event(device_id, "committed")
    assert engine.tick() == 0
    assert engine.status(rollout_id)["counts"]["targeted"] == 2  # nothing decided while paused
    engine.resume(rollout_id)
    with pytest.raises(RolloutError, match="running, not paused"):
        engine.resume(rollout_id)
    engine.tick()  # outcomes read, no timeouts: the pause did not count
    status = engine.status(rollout_id)
    assert status["counts"]["succeeded"] == 2 and status["current_wave"] == 1
    assert engine.abort(rollout_id, "enough") == 3  # the canary and wave 1's first device
    status = engine.status(rollout_id)
    assert status["status"] == "aborted" and status["reason"] == "enough"
    for device_id in {d for d, _ in recorder.published}:
        assert recorder.last(device_id) == OLD_TARGET
    with pytest.raises(RolloutError, match="nothing to abort"):
        engine.abort(rollout_id)
    assert engine.tick() == 0


def test_an_abort_interrupted_half_way_is_finished_by_aborting_again(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _, recorder, _ = setup(6)
    rollout_id = engine.create(make_spec(), custom=contract())
    engine.tick()
    canary = sorted(d for d, _ in recorder.published)
    assert len(canary) == 2

    def hub_stops(ids: list[str], previous: object) -> None:
        raise RuntimeError("the hub stopped")

    monkeypatch.setattr(engine, "_set_release", hub_stops)
    with pytest.raises(RuntimeError, match="hub stopped"):
        engine.abort(rollout_id, "bad canary")
    status = engine.status(rollout_id)
    assert status["status"] == "aborted" and status["counts"]["targeted"] == 2
    monkeypatch.undo()
    assert engine.abort(rollout_id) == 2  # finishes the roll-back
    status = engine.status(rollout_id)
    assert status["counts"]["rolled_back"] == 2 and status["reason"] == "bad canary"
    for device_id in canary:
        assert recorder.last(device_id) == OLD_TARGET
    with pytest.raises(RolloutError, match="nothing to abort"):
        engine.abort(rollout_id)


def test_tick_is_idempotent(setup: Any) -> None:
    engine, _, recorder, _ = setup(6)
    rollout_id = engine.create(make_spec(), custom=contract())
    engine.tick()
    engine.tick()
    engine.tick()
    assert len(recorder.published) == 2
    assert engine.status(rollout_id)["counts"]["targeted"] == 2


# -- bad input --------------------------------------------------------------------------------


def test_bad_ids_and_nothing_to_roll_out(setup: Any) -> None:
    engine, fleet, _, _ = setup(3)
    for call in (engine.status, engine.pause, engine.resume, engine.abort, engine.advance):
        with pytest.raises(NotFoundError, match="rollout 'r-nope' not found"):
            call("r-nope")
    fleet.fleet.record_state(StateReport("odd-1", "0.1.0", hardware={"arch": "riscv64"}, ts=1.0))
    with pytest.raises(RolloutSpecError, match="selection: no compatible device"):
        engine.create(make_spec(selection={"hardware": {"arch": "riscv64"}}), custom=contract())
    rollout_id = engine.create(make_spec(), custom=contract())
    excluded = engine.status(rollout_id)["excluded"]
    assert excluded == [{"device_id": "odd-1", "kind": "hardware", "reason": excluded[0]["reason"]}]


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_create_status_pause_resume_abort(hub_data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from tests.test_rollout_plan import spec as plan_spec

    spec_file = tmp_path / "rollout.yaml"
    spec_file.write_text(dump_spec(plan_spec(selection={"tags": {"site": "berlin"}}), "yaml"))
    created = run_cli("edgeops", "rollout", "create", str(spec_file))
    assert created.returncode == 0, created.stderr
    rollout_id = created.stdout.strip()
    assert rollout_id.startswith("r-")
    status = run_cli("edgeops", "rollout", "status", rollout_id, "--json")
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["status"] == "running" and document["counts"]["excluded"] == 3
    human = run_cli("edgeops", "rollout", "status", rollout_id)
    assert "canary" in human.stdout and "running" in human.stdout
    for command, expected in (("pause", "paused"), ("resume", "resumed"), ("abort", "aborted")):
        result = run_cli("edgeops", "rollout", command, rollout_id)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout
    again = run_cli("edgeops", "rollout", "resume", rollout_id)
    assert again.returncode == 1 and "aborted, not paused" in again.stderr
    missing = run_cli("edgeops", "rollout", "status", "r-nope")
    assert missing.returncode == 1 and "rollout 'r-nope' not found" in missing.stderr
    listed = json.loads(run_cli("edgeops", "rollout", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [rollout_id]


def test_cli_run_ticks_until_the_end(
    hub_data_dir: Path,  # noqa: F811
    tmp_path: Path,
    mosquitto_url: str,
) -> None:
    """``rollout run`` against a real broker: nobody answers, the canary times out, the
    rollout aborts and its canary gets the previous release back (published)."""
    from tests.test_rollout_plan import spec as plan_spec

    spec_file = tmp_path / "rollout.json"
    rollout = plan_spec(selection={"tags": {"site": "berlin"}}, device_timeout_seconds=1)
    spec_file.write_text(dump_spec(rollout, "json"))
    rollout_id = run_cli("edgeops", "rollout", "create", str(spec_file)).stdout.strip()
    env = {"EDGEOPS_MQTT_URL": mosquitto_url}
    result = run_cli("edgeops", "rollout", "run", rollout_id, "--interval", "0.2", env=env)
    assert result.returncode == 1, result.stderr
    assert f"rollout {rollout_id} aborted: wave 0 (canary)" in result.stderr
    status = json.loads(run_cli("edgeops", "rollout", "status", rollout_id, "--json").stdout)
    assert status["counts"]["rolled_back"] == 1 and status["failed"][0]["kind"] == "timed_out"
    watched = run_cli("edgeops", "rollout", "status", rollout_id, "--watch", timeout=30)
    assert watched.returncode == 0 and "aborted" in watched.stdout  # ended: shown once
    no_broker = run_cli("edgeops", "rollout", "run", rollout_id)
    assert no_broker.returncode == 2 and "no broker configured" in no_broker.stderr


# -- overlapping waves and devices another rollout holds -----------------------------------------


def drive_slowly(
    engine: RolloutEngine,
    rollout_id: str,
    fleet: Fleet,
    recorder: Recorder,
    clock: Clock,
    answer: Callable[[str], list[str]],
    *,
    after_ticks: int,
    max_ticks: int = 500,
) -> tuple[dict[str, Any], list[tuple[int, int, int]]]:
    """Like :func:`drive`, but each device answers ``after_ticks`` ticks after it was first
    pointed at the release; also returns, per tick, (current wave, devices targeted of
    earlier waves, devices targeted of the current one)."""
    pointed: dict[str, int] = {}
    answered: set[str] = set()
    seen: list[tuple[int, int, int]] = []
    for tick in range(max_ticks):
        running = engine.tick()
        for device_id, target in list(recorder.published):
            if target == RELEASE and device_id not in pointed:
                pointed[device_id] = tick
        for device_id, since in pointed.items():
            if device_id not in answered and tick - since >= after_ticks:
                answered.add(device_id)
                for state in answer(device_id):
                    reason = "health: 5 runtime errors" if state == "rolling_back" else None
                    fleet.event(device_id, state, reason)
        status = engine.status(rollout_id)
        current = max((w["index"] for w in status["waves"] if w["state"] != "pending"), default=0)
        devices = engine.devices(rollout_id)
        earlier = sum(1 for d in devices if d["status"] == "targeted" and d["wave"] < current)
        now = sum(1 for d in devices if d["status"] == "targeted" and d["wave"] == current)
        seen.append((current, earlier, now))
        if not running:
            break
        clock.advance(10.0)
    return engine.status(rollout_id), seen


def notified_spec(**changes: Any) -> RolloutSpec:
    return make_spec(
        waves={
            "canary": {"count": 2},
            "exponential": {
                "base_rate_per_minute": 12,
                "increment_factor": 2.0,
                "max_rate_per_minute": 48,
                "rate_increase_criteria": {"notified": 4},
            },
            "abort": {"min_devices": 2, "failure_percent": 40.0},
        },
        **changes,
    )


def test_without_gates_a_wave_hands_over_once_notified_and_every_wave_is_still_checked(
    setup: Any,
) -> None:
    engine, fleet, recorder, clock = setup(14)
    rollout_id = engine.create(notified_spec(), custom=contract())

    def committed(device_id: str) -> list[str]:
        return ["downloading", "testing", "committed"]

    status, seen = drive_slowly(
        engine, rollout_id, fleet, recorder, clock, committed, after_ticks=3
    )
    assert status["status"] == "succeeded", status["reason"]
    assert [w["size"] for w in status["waves"]] == [2, 4, 4, 4]
    assert status["counts"]["succeeded"] == 14
    # a later exponential wave ran while devices of the one before were still updating
    assert any(current >= 2 and earlier > 0 for current, earlier, _ in seen), seen
    # the canary never overlaps: nothing past it was targeted while it ran
    assert all(earlier == 0 for current, earlier, _ in seen if current == 1), seen


def test_an_overlapped_wave_that_fails_still_aborts_the_rollout(setup: Any) -> None:
    engine, fleet, recorder, clock = setup(14)
    rollout_id = engine.create(notified_spec(), custom=contract())
    first_wave = {d["device_id"] for d in engine.devices(rollout_id) if d["wave"] == 1}

    def answer(device_id: str) -> list[str]:
        if device_id in first_wave:
            return ["downloading", "testing", "rolling_back", "rolled_back"]
        return ["downloading", "testing", "committed"]

    status, _ = drive_slowly(engine, rollout_id, fleet, recorder, clock, answer, after_ticks=3)
    assert status["status"] == "aborted"
    assert status["reason"].startswith("wave 1 (exponential): ")
    # every device the rollout had targeted got its previous release back
    targeted = {d for d, t in recorder.published if t == RELEASE}
    assert targeted - first_wave  # the next wave had started before the failures came in
    for device_id in targeted:
        assert recorder.last(device_id) == OLD_TARGET


@pytest.mark.parametrize("why", ["gates", "succeeded"])
def test_with_gates_or_on_succeeded_devices_a_wave_waits_for_its_devices(
    setup: Any, why: str
) -> None:
    if why == "gates":
        spec = notified_spec(gates={"soak_seconds": 0, "max_error_rate": 0.5})
    else:
        spec = make_spec(
            waves={
                "canary": {"count": 2},
                "exponential": {
                    "base_rate_per_minute": 12,
                    "increment_factor": 2.0,
                    "rate_increase_criteria": {"succeeded": 4},
                },
            }
        )
    engine, fleet, recorder, clock = setup(10)
    rollout_id = engine.create(spec, custom=contract())

    def answer(device_id: str) -> list[str]:
        fleet.window(device_id, "m-new", good_window())
        return ["downloading", "testing", "committed"]

    status, seen = drive_slowly(engine, rollout_id, fleet, recorder, clock, answer, after_ticks=3)
    assert status["status"] == "succeeded", status["reason"]
    assert all(earlier == 0 for _, earlier, _ in seen), seen


def test_devices_another_rollout_still_updates_are_excluded_as_busy(setup: Any) -> None:
    engine, fleet, _, _ = setup(6)
    first = engine.create(make_spec(), custom=contract())
    engine.tick()  # the canary is targeted; the rest pending: all six are the first's
    with pytest.raises(RolloutSpecError, match="no compatible device"):
        engine.create(make_spec(name="digits-2-again"), custom=contract())
    engine.abort(first)
    second = engine.create(make_spec(name="digits-2-again"), custom=contract())
    assert {d["status"] for d in engine.devices(second)} == {"pending"}
    busy = engine.busy_devices()
    assert set(busy) == set(fleet.ids) and set(busy.values()) == {second}
