"""The fleet simulator: real agents in worker processes roll onto a release, faults included.

Everything is real: a private Mosquitto from the shipped configuration, the hub's release
repository with two releases (the new one's contract allows only ``arch=x86_64``), the hub's
fetch server, bridge (recording every device's state in SQLite), the rollout planner and
``edgeops.fleet.deploy``; 20 simulated devices in 2 processes, 4 of them ``armv7l``.
No timed assertions: every wait is for a state, with a generous limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeops.errors import ConfigError
from edgeops.fleet.simulator import (
    CRASH_AFTER_ACTIVATION,
    DEGRADE_ACCURACY,
    FAIL_INSTALL,
    FleetSimulator,
    SimSetup,
    assign_faults,
    make_devices,
    parse_hardware_mix,
    release_bundle,
    samples_for,
)
from tests.fixtures.fleet import FleetHub, open_fleet_hub
from tests.fixtures.trust import ReleaseModels, wait_for

pytestmark = pytest.mark.mosquitto


def test_hardware_mix_and_faults_are_exact_and_seeded() -> None:
    mix = parse_hardware_mix("arch=x86_64:0.8,arch=armv7l+board=rpi:0.2")
    assert mix == [({"arch": "x86_64"}, 0.8), ({"arch": "armv7l", "board": "rpi"}, 0.2)]
    devices = make_devices(
        50, lambda d: "mqtt://127.0.0.1:1", hardware_mix=mix, faults={FAIL_INSTALL: 0.1}, seed=3
    )
    assert sum(d.hardware["arch"] == "armv7l" for d in devices) == 10
    assert sum(d.fault == FAIL_INSTALL for d in devices) == 5
    again = make_devices(
        50, lambda d: "mqtt://127.0.0.1:1", hardware_mix=mix, faults={FAIL_INSTALL: 0.1}, seed=3
    )
    assert again == devices
    faults = assign_faults([f"d{i}" for i in range(10)], {FAIL_INSTALL: 0.2, DEGRADE_ACCURACY: 0.3})
    assert sorted(faults.values()).count(DEGRADE_ACCURACY) == 3
    for bad in ("arch=x86_64", "arch:0.5", "arch=x86_64:-1", "arch=x86_64:0"):
        with pytest.raises(ConfigError):
            parse_hardware_mix(bad)
    with pytest.raises(ConfigError, match="unknown fault"):
        assign_faults(["a"], {"explode": 0.5})


@pytest.fixture
def hub(tmp_path: Path, mosquitto: Any, release_models: ReleaseModels) -> Iterator[FleetHub]:
    with open_fleet_hub(
        tmp_path, mosquitto.url, release_models, new_hardware={"arch": ["x86_64"]}
    ) as fleet_hub:
        yield fleet_hub


def test_small_fleet_rolls_onto_a_release_with_faults(hub: FleetHub, mosquitto: Any) -> None:
    from edgeops.fleet.deploy import apply_deploy, plan_deploy
    from edgeops.hub import DesiredPublisher
    from edgeops.rollout import parse_spec, plan_rollout, release_contract

    champion = release_bundle(hub.repository, hub.old, hub.workdir / "champion")
    samples = samples_for(hub.factory.datasets, champion, hub.workdir / "samples.npz")
    setup = SimSetup(
        data_dir=hub.workdir / "fleet",
        trust_root=Path(hub.repository.root_json_path),
        champion=champion,
        champion_target=hub.old,
        samples=samples,
        rate_hz=5.0,
        heartbeat_s=2.0,
        window_seconds=2.0,
        update_health_s=0.5,
    )
    mix = parse_hardware_mix("arch=x86_64:0.8,arch=armv7l:0.2")
    devices = make_devices(
        20,
        lambda device_id: mosquitto.url,
        hardware_mix=mix,
        faults={FAIL_INSTALL: 0.125, CRASH_AFTER_ACTIVATION: 0.125, DEGRADE_ACCURACY: 0.125},
        seed=7,
        fault_pool=lambda device: device.hardware.get("arch") == "x86_64",
    )
    by_fault = {d.device_id: d.fault for d in devices}
    armv7 = {d.device_id for d in devices if d.hardware["arch"] == "armv7l"}
    assert len(armv7) == 4
    assert sorted(f for f in by_fault.values() if f) == sorted(
        [FAIL_INSTALL] * 2 + [CRASH_AFTER_ACTIVATION] * 2 + [DEGRADE_ACCURACY] * 2
    )

    sim = FleetSimulator(setup, devices, processes=2)
    sim.start()
    try:
        ids = {d.device_id for d in devices}

        def reported() -> bool:
            return (
                sum(
                    1
                    for view in hub.fleet.list_devices()
                    if view.device_id in ids and view.agent_version and view.hardware
                )
                == 20
            )

        wait_for(reported, timeout=120, what="every simulated device reported to the hub")
        snapshot = sim.wait(lambda s: s.count(on_target=hub.old) == 20, 60)
        assert snapshot is not None, sim.poll().summary()
        assert snapshot.summary()["samples"] > 0  # the synthetic sources feed the agents

        spec = parse_spec(
            f"""
name: sim-test
release: {hub.new}
waves:
  canary: {{percent: 10}}
  exponential: {{base_rate_per_minute: 10, increment_factor: 2}}
"""
        )
        plan = plan_rollout(
            spec, hub.fleet.list_devices(), release_contract(hub.repository, hub.new)
        )
        assert {e.device_id for e in plan.excluded} == armv7
        assert {e.kind for e in plan.excluded} == {"hardware"}
        compatible = [c.device_id for c in plan.compatible]
        assert len(compatible) == 16

        deploy = plan_deploy(hub.fleet, hub.repository, hub.new, compatible)
        with DesiredPublisher(hub.bridge.link.endpoint, client_id="sim-hub") as publisher:
            assert not apply_deploy(hub.fleet, publisher, deploy).unacknowledged

        at_rest = {"committed", "rolled_back"}
        done = sim.wait(
            lambda s: all(s.devices[i].update_state in at_rest for i in compatible), 240
        )
        assert done is not None, sim.poll().summary()
        final = {i: done.devices[i] for i in ids}
        for device_id, status in final.items():
            fault = by_fault[device_id]
            if device_id in armv7:
                assert status.update_state == "idle", status
                assert status.active_target == hub.old
            elif fault in (FAIL_INSTALL, CRASH_AFTER_ACTIVATION):
                assert status.update_state == "rolled_back", status
                assert status.active_target == hub.old, status
            else:  # no fault, or degraded accuracy: the install itself succeeds
                assert status.update_state == "committed", status
                assert status.active_target == hub.new, status
        crashed = [s for s in final.values() if s.fault == CRASH_AFTER_ACTIVATION]
        assert all(s.crashes >= 3 for s in crashed), crashed  # boots counted to a crash loop
        assert all("crash loop" in (s.last_reason or "") for s in crashed), crashed
        installs = [s for s in final.values() if s.fault == FAIL_INSTALL]
        assert all("install" in (s.last_reason or "") for s in installs), installs
        assert done.count(state="rolled_back") == 4
        assert done.count(on_target=hub.new) == 12
    finally:
        stopped = sim.stop()
    assert sim.left_running == 0
    assert all(not s.running for s in stopped.devices.values())
    assert not stopped.summary()["errors"]


def test_ctrl_c_while_reading_the_workers_queue_waits_for_the_whole_message() -> None:
    """A Ctrl-C inside the read is delivered once the message is read, not in its middle."""
    import os
    import signal
    import time

    from edgeops.fleet.simulator import _interrupts_held

    # Python's own handler, even where this process was started with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        read_whole = False
        with pytest.raises(KeyboardInterrupt), _interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: it only took note
            read_whole = True
        assert read_whole
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
