"""End-to-end rollouts: the live rollout engine drives real simulated agents through a broker.

Everything is real: a private Mosquitto from the shipped configuration, the hub's release
repository, fetch server, bridge (recording every device's state and events in SQLite) and
desired-state publisher (tests/fixtures/fleet.py), and :class:`RolloutEngine` ticked in the
test the way ``edgeops hub serve`` ticks it. Every device is the real agent
(:class:`edgeops.fleet.simulator.SimAgent`) with its own MQTT connection, slots and updater,
running real models on LiteRT, in two simulator processes.

The specs use a canary and one exponential wave whose base rate (1000 a minute) makes every
device of a wave due at once. No timed assertions: every wait is for a state, with a
generous limit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeops.fleet.simulator import FAIL_INSTALL, make_devices, parse_hardware_mix
from edgeops.rollout import parse_spec
from tests.fixtures.fleet import FleetHub, open_fleet_hub, run_rollout, start_fleet
from tests.fixtures.trust import ReleaseModels, wait_for

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

AT_REST = ("idle", "committed", "rolled_back")


def _url_of(mosquitto: Any) -> Callable[[str], str]:
    """Every simulated device's broker URL: the test's Mosquitto."""
    url = str(mosquitto.url)
    return lambda device_id: url


# -- 1. failed installs in the canary ----------------------------------------------------------


def test_failed_installs_in_the_canary_abort_the_rollout_and_roll_it_back(
    tmp_path: Path, mosquitto: Any, release_models: ReleaseModels
) -> None:
    """With 20 % of the canary failing to install, the rollout aborts at the canary.

    10 devices; the canary is the first 5 by id (no seed), and exactly one of them (20 %)
    fails to write the new model into its inactive slot. The canary's abort condition
    (20 % after all 5 finished) trips once every canary device finished: the failing one
    rolled itself back, the 4 others committed the new release. The engine then sets every
    targeted device's desired release back to the old one; the 4 devices that committed the
    new release install the old one again (a regular update to the old target: download,
    install into the inactive slot, smoke test, switch, health check, commit) and report it;
    the failing one already runs the old release and starts nothing. The exponential wave is
    never targeted.
    """
    with open_fleet_hub(tmp_path / "hub", mosquitto.url, release_models) as hub:
        ids = [f"sim-{i:04d}" for i in range(1, 11)]
        canary = set(ids[:5])
        devices = make_devices(
            10,
            _url_of(mosquitto),
            faults={FAIL_INSTALL: 0.2},
            seed=3,
            fault_pool=lambda device: device.device_id in canary,
        )
        assert [d.device_id for d in devices] == ids
        failing = {d.device_id for d in devices if d.fault == FAIL_INSTALL}
        assert len(failing) == 1 and failing <= canary
        spec = parse_spec(
            f"""
name: canary-abort
release: {hub.new}
waves:
  canary:
    count: 5
    abort: {{min_devices: 5, failure_percent: 20.0}}
  exponential: {{base_rate_per_minute: 1000, increment_factor: 2.0}}
device_timeout_seconds: 120
"""
        )
        sim = start_fleet(hub, hub.sim_setup(), devices)
        try:
            engine = hub.engine()
            rollout_id = engine.create(spec)
            waves = engine.status(rollout_id)["waves"]
            assert [(w["kind"], w["size"]) for w in waves] == [("canary", 5), ("exponential", 5)]

            status, _ = run_rollout(engine, rollout_id, sim)
            assert status["status"] == "aborted", status
            assert status["reason"].startswith("wave 0 (canary): 1 of 5 finished devices failed")
            assert [w["state"] for w in status["waves"]] == ["aborted", "pending"]
            rows = {row["device_id"]: row for row in engine.devices(rollout_id)}
            for device_id in ids:
                row = rows[device_id]
                if device_id in canary:
                    assert row["status"] == "rolled_back", row
                    assert row["previous_release"]["target"] == hub.old, row
                    # the desired twin is set back at the hub, as it was before the rollout
                    desired = hub.fleet.get_device(device_id).desired
                    assert desired["release"] == row["previous_release"], desired
                else:  # never targeted: no desired release, no update
                    assert row["status"] == "pending", row
                    assert row["wave"] == 1, row
                    assert hub.desired_target(device_id) is None, device_id
            assert [f["device_id"] for f in status["failed"]] == sorted(failing)
            assert "install" in status["failed"][0]["reason"], status["failed"]

            committed_new = canary - failing

            def rolled_back_by_agents(device_id: str) -> bool:
                states = [(e.get("target"), e.get("state")) for e in hub.update_events(device_id)]
                if device_id in failing:
                    return (hub.new, "rolled_back") in states
                if (hub.new, "committed") not in states:
                    return False
                after = states[states.index((hub.new, "committed")) :]
                return (hub.old, "committed") in after

            for device_id in sorted(canary):
                wait_for(
                    partial(rolled_back_by_agents, device_id),
                    timeout=120,
                    what=f"{device_id} reported its way back to the old release",
                )
            final = sim.wait(
                lambda s: all(
                    s.devices[i].update_state in AT_REST and s.devices[i].active_target == hub.old
                    for i in ids
                ),
                120,
            )
            assert final is not None, sim.poll().summary()
            for device_id in ids:
                device = final.devices[device_id]
                assert device.active_target == hub.old, device
                if device_id in failing:  # rolled itself back; the old release is active
                    assert device.update_state == "rolled_back", device
                    assert "install" in (device.last_reason or ""), device
                elif device_id in committed_new:  # installed the old release again
                    assert device.update_state == "committed", device
                else:
                    assert device.update_state == "idle", device
                    assert not hub.update_events(device_id), device_id
            # nothing changed since: the rollout stays aborted, the next wave untouched
            engine.tick()
            assert engine.status(rollout_id)["counts"]["pending"] == 5
        finally:
            stopped = sim.stop()
        assert sim.left_running == 0
        assert not stopped.summary()["errors"]


# -- 2. a release whose accuracy is broken on purpose ------------------------------------------


@pytest.fixture(scope="module")
def int8_new_model(release_models: ReleaseModels) -> str:
    """The new release's model compressed to full int8 (its registry id)."""
    from edgeops.compress import CompressService

    factory = release_models.factory
    view = CompressService(factory.datasets, factory.registry).compress(
        release_models.new_ref, quantize="int8", max_loss_pp=100.0, progress=False
    )
    return str(view.id)


def zero_last_layer(artifact: bytes) -> bytes:
    """``artifact`` (a full-int8 .tflite) with its output layer's int8 weight matrix zeroed.

    The weight matrix is the constant int8 tensor of shape ``(classes, inputs)`` feeding the
    output; its bytes are found verbatim in the flatbuffer (exactly once) and replaced by
    zeros, so the output layer is left with its bias: one class for every input.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=artifact)
    interpreter.allocate_tensors()
    classes = int(interpreter.get_output_details()[0]["shape"][-1])
    weights = [
        interpreter.get_tensor(t["index"])
        for t in interpreter.get_tensor_details()
        if np.dtype(t["dtype"]) == np.int8
        and len(t["shape"]) == 2
        and int(t["shape"][0]) == classes
        and int(t["shape"][1]) > 1
    ]
    assert len(weights) == 1, "expected one (classes, inputs) int8 weight matrix"
    raw = weights[0].tobytes()
    assert artifact.count(raw) == 1 and any(raw), "the weight bytes are not unique"
    return artifact.replace(raw, bytes(len(raw)))


def _predicted_histogram(artifact: bytes, x: np.ndarray, classes: int) -> list[int]:
    from edgeops.evaluate import load_runner

    runner = load_runner(artifact, "tflite")
    labels = [int(np.argmax(runner.run(sample[None]))) for sample in x]
    return [int(c) for c in np.bincount(labels, minlength=classes)]


def release_broken_conversion(hub: FleetHub, model_ref: str) -> tuple[str, str, dict[str, Any]]:
    """Release ``model_ref`` (full int8) as a broken conversion would: the artifact with its
    output layer zeroed, described by a card measured on that artifact (so its test vectors
    match what it computes) but carrying the good model's reference statistics and metrics.

    Returns the target path, the card's model id and evidence measured on the test split
    with LiteRT: the reference histogram and the good and broken models' predicted ones.
    """
    from edgeops.export import export_artifact
    from edgeops.export.card import build_card
    from edgeops.trust.release import build_custom, target_path

    factory = hub.factory
    view = factory.registry.get_model(model_ref)
    good = export_artifact(view, "tflite", registry=factory.registry, datasets=factory.datasets)
    assert good.card.quantization.mode == "int8"
    broken = zero_last_layer(good.artifact)
    arrays = factory.datasets.load(view.dataset_version)
    x = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
    y = np.asarray(arrays.y_test)
    card = build_card(
        name=good.card.name,
        artifact=broken,
        format="tflite",
        task=good.card.task,
        feature_rule=good.card.preprocessing,
        reference=good.card.reference,
        sample_inputs=x,
        sample_labels=y,
        metrics=good.card.metrics,
        lineage=good.card.lineage,
        model_id=good.card.model_id,
        version=good.card.version,
        extra=good.card.extra,
    )
    path = target_path(view.name, view.seq, "litert")
    hub.repository.add_target(path, broken, build_custom(card, "litert"))
    classes = len(good.card.reference["class_counts"])
    evidence = {
        "reference": list(good.card.reference["class_counts"]),
        "good": _predicted_histogram(good.artifact, x, classes),
        "broken": _predicted_histogram(broken, x, classes),
        "good_vectors": good.card.test_vectors,
        "broken_vectors": card.test_vectors,
    }
    return path, card.model_id, evidence


MAX_JS = 0.3


def test_a_release_broken_on_purpose_installs_everywhere_but_the_quality_gate_stops_it(
    tmp_path: Path, mosquitto: Any, release_models: ReleaseModels, int8_new_model: str
) -> None:
    """A release whose accuracy is broken on purpose installs, but the divergence gate stops it.

    The release is the new model compressed to full int8 and then broken the way a faulty
    conversion breaks a model: its output layer's int8 weight matrix is zeroed in the
    .tflite flatbuffer, so only the bias is left and every input gets the same class. Its
    card is what that converter would write: measured on the broken artifact (test vectors
    included, so the agent's smoke test passes and every install commits) but with the good
    model's reference statistics (the class histogram of the digits test split) and metrics.

    Nothing on the device can tell: the model loads, reproduces its card's vectors, answers
    every sample without an error and does not crash. What gives it away is the output
    distribution in the field: every prediction is one class, while the reference spreads
    over 10 classes. The gate is Jensen-Shannon divergence (bounded; a one-class output
    against a near-uniform 10-class reference is about 0.75), with a threshold (0.3) that
    the good int8 model stays well below: checked here on the whole test split, and with
    room for the sampling noise of the few dozen predictions a canary of three devices makes
    in its soak window. The error-rate and crash-rate gates pass: the failure
    is the distribution, not a crash or errors. The rollout ends ``failed`` at the canary,
    the gate named in its reason, and the exponential wave is never targeted.
    """
    from edgeops.rollout.gates import js_divergence

    with open_fleet_hub(tmp_path / "hub", mosquitto.url, release_models) as hub:
        broken, model_id, evidence = release_broken_conversion(hub, int8_new_model)
        # offline, on the test split with LiteRT: the gate fails for the right reason
        reference = evidence["reference"]
        assert js_divergence(evidence["good"], reference) < MAX_JS / 3, evidence["good"]
        assert sum(1 for count in evidence["broken"] if count) == 1, evidence["broken"]
        assert js_divergence(evidence["broken"], reference) > MAX_JS, evidence["broken"]
        assert evidence["broken_vectors"] != evidence["good_vectors"]

        ids = [f"sim-{i:04d}" for i in range(1, 7)]
        devices = make_devices(6, _url_of(mosquitto), seed=5)
        canary = set(ids[:3])
        spec = parse_spec(
            f"""
name: broken-conversion
release: {broken}
waves:
  canary: {{count: 3}}
  exponential: {{base_rate_per_minute: 1000, increment_factor: 2.0}}
device_timeout_seconds: 120
gates:
  soak_seconds: 8
  max_error_rate: 0.01
  max_crash_rate: 0.0
  divergence: {{metric: js, max: {MAX_JS}}}
"""
        )
        sim = start_fleet(hub, hub.sim_setup(), devices)
        try:
            engine = hub.engine()
            rollout_id = engine.create(spec)
            status, snapshot = run_rollout(engine, rollout_id, sim)

            assert status["status"] == "failed", status
            reason = status["reason"]
            assert reason.startswith("wave 0 (canary): quality gate divergence_js failed"), reason
            assert "error_rate" not in reason and "crash_rate" not in reason, reason
            canary_wave, next_wave = status["waves"]
            assert canary_wave["state"] == "failed" and canary_wave["gates_decided"]
            gates = {g["name"]: g for g in canary_wave["gates"]}
            assert set(gates) == {"error_rate", "crash_rate", "divergence_js"}, gates
            divergence = gates["divergence_js"]
            assert not divergence["passed"], divergence
            assert divergence["value"] is not None and divergence["value"] > MAX_JS, divergence
            assert gates["error_rate"]["passed"] and gates["error_rate"]["value"] == 0.0, gates
            assert gates["crash_rate"]["passed"] and gates["crash_rate"]["value"] == 0.0, gates
            assert next_wave["state"] == "pending" and next_wave["counts"] == {"pending": 3}

            # every canary install committed: the engine saw it, the hub stored it, and the
            # agents run the broken model as their champion
            rows = {row["device_id"]: row for row in engine.devices(rollout_id)}
            for device_id in ids:
                device = snapshot.devices[device_id]
                if device_id in canary:
                    assert rows[device_id]["status"] == "succeeded", rows[device_id]
                    events = hub.update_events(device_id)
                    assert any(
                        e.get("target") == broken and e.get("state") == "committed" for e in events
                    ), events
                    assert device.update_state == "committed", device
                    assert device.active_target == broken, device
                    assert device.champion == model_id, device
                    assert device.crashes == 0, device
                else:  # the next wave: never targeted
                    assert rows[device_id]["status"] == "pending", rows[device_id]
                    assert rows[device_id]["wave"] == 1, rows[device_id]
                    assert hub.desired_target(device_id) is None, device_id
                    assert not hub.update_events(device_id), device_id
                    assert device.update_state == "idle", device
                    assert device.active_target == hub.old, device
        finally:
            stopped = sim.stop()
        assert sim.left_running == 0
        assert not stopped.summary()["errors"]


# -- 3. a healthy rollout with incompatible hardware -------------------------------------------


def test_a_healthy_release_rolls_out_to_every_compatible_device(
    tmp_path: Path, mosquitto: Any, release_models: ReleaseModels
) -> None:
    """A canary and an exponential wave over 20 devices, 10 % of them ``armv7l`` while the
    release's contract allows only ``x86_64``: the planner excludes those 2 (listed with the
    contract's kind and reason by the engine's status), the 18 others pass both waves' gates
    and commit the release, and the rollout ends ``succeeded``."""
    arch = {"arch": ["x86_64"]}
    with open_fleet_hub(tmp_path / "hub", mosquitto.url, release_models, new_hardware=arch) as hub:
        devices = make_devices(
            20, _url_of(mosquitto), hardware_mix=parse_hardware_mix("arch=x86_64:9,arch=armv7l:1")
        )
        incompatible = {d.device_id for d in devices if d.hardware["arch"] == "armv7l"}
        assert len(incompatible) == 2
        compatible = sorted({d.device_id for d in devices} - incompatible)
        spec = parse_spec(
            f"""
name: healthy
release: {hub.new}
waves:
  canary: {{percent: 10.0}}
  exponential: {{base_rate_per_minute: 1000, increment_factor: 2.0}}
device_timeout_seconds: 120
gates:
  soak_seconds: 5
  max_error_rate: 0.01
  max_crash_rate: 0.0
  divergence: {{metric: js, max: {MAX_JS}}}
"""
        )
        sim = start_fleet(hub, hub.sim_setup(), devices)
        try:
            engine = hub.engine()
            rollout_id = engine.create(spec)
            status, _ = run_rollout(engine, rollout_id, sim)

            assert status["status"] == "succeeded", status
            assert status["reason"] is None
            assert [(w["kind"], w["size"], w["state"]) for w in status["waves"]] == [
                ("canary", 2, "passed"),
                ("exponential", 16, "passed"),
            ]
            for wave in status["waves"]:
                assert wave["gates_decided"] and all(g["passed"] for g in wave["gates"]), wave
            assert status["counts"]["succeeded"] == 18
            assert status["counts"]["excluded"] == 2
            excluded = status["excluded"]
            assert {e["device_id"] for e in excluded} == incompatible
            assert all(e["kind"] == "hardware" and "arch" in e["reason"] for e in excluded)
            assert not status["failed"]

            final = sim.wait(
                lambda s: all(s.devices[i].active_target == hub.new for i in compatible), 60
            )
            assert final is not None, sim.poll().summary()
            for device_id, device in final.devices.items():
                if device_id in incompatible:  # never targeted
                    assert device.update_state == "idle", device
                    assert device.active_target == hub.old, device
                    assert hub.desired_target(device_id) is None, device_id
                else:
                    assert device.update_state == "committed", device
                    assert hub.desired_target(device_id) == hub.new, device_id
        finally:
            stopped = sim.stop()
        assert sim.left_running == 0
        assert not stopped.summary()["errors"]
