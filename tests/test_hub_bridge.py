"""The hub's bridge: device state and presence through a real broker into the database."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from device_agent.link import MqttEndpoint, MqttLink
from device_agent.protocol import Channel, Presence, StateReport, device_topic, encode
from edgeops.fleet import FleetService
from edgeops.hub import HubBridge


@pytest.fixture
def bridge(mosquitto_url: str, database: Any) -> Iterator[HubBridge]:
    hub = HubBridge(MqttEndpoint.parse(mosquitto_url), FleetService(database))
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def device(mosquitto_url: str) -> Iterator[MqttLink]:
    link = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="bridge-dev")
    link.start(wait_s=10)
    yield link
    link.stop()


def _pump_until(bridge: HubBridge, predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bridge.pump(0.1)
        if predicate():
            return
    raise AssertionError("condition not reached")


def test_state_and_presence_are_recorded(bridge: HubBridge, device: MqttLink) -> None:
    fleet = bridge.fleet
    device.publish(
        device_topic("d-1", Channel.PRESENCE), encode(Presence("d-1", True)), retain=True, wait_s=5
    )
    report = StateReport("d-1", "0.1.0", hardware={"arch": "aarch64"})
    device.publish(device_topic("d-1", Channel.STATE), encode(report), retain=True, wait_s=5)
    _pump_until(bridge, lambda: fleet.list_devices() and fleet.get_device("d-1").agent_version)
    stored = fleet.get_device("d-1")
    assert stored.online and stored.hardware == {"arch": "aarch64"}


def test_malformed_and_spoofed_payloads_are_counted_and_dropped(
    bridge: HubBridge, device: MqttLink
) -> None:
    spoof = encode(StateReport("victim", "0.1.0"))
    device.publish(device_topic("attacker", Channel.STATE), spoof, wait_s=5)
    device.publish(device_topic("d-2", Channel.STATE), b"\x00\x01garbage", wait_s=5)
    wrong_schema = json.dumps({"schema": 99, "type": "state"}).encode()
    device.publish(device_topic("d-2", Channel.PRESENCE), wrong_schema, wait_s=5)
    good = encode(Presence("d-2", True))
    device.publish(device_topic("d-2", Channel.PRESENCE), good, wait_s=5)
    _pump_until(bridge, lambda: bool(bridge.fleet.list_devices()))
    assert [d.device_id for d in bridge.fleet.list_devices()] == ["d-2"]
    assert bridge.dispatcher.dropped == {"state": 2, "presence": 1}


def test_killed_agent_is_recorded_offline_through_its_will(
    bridge: HubBridge, mosquitto_url: str, isolated_environment: Any
) -> None:
    """The will carries its connection's start time, the same ts as that connection's
    online presence; the hub's ordering lets it win, so a dead device goes offline."""
    import subprocess

    from tests.clitools import BIN

    agent = subprocess.Popen(
        [str(BIN / "edgeops-agent"), "run", "--device-id", "doomed-1", "--mqtt-url",
         mosquitto_url, "--data-dir", str(isolated_environment)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    fleet = bridge.fleet
    try:
        _pump_until(bridge, lambda: any(d.online for d in fleet.list_devices()))
        online_ts = fleet.get_device("doomed-1").presence_ts
    finally:
        agent.kill()
        agent.wait(timeout=10)
    _pump_until(bridge, lambda: not fleet.get_device("doomed-1").online, timeout=60)
    assert fleet.get_device("doomed-1").presence_ts == online_ts


def test_a_late_will_of_an_older_connection_does_not_end_a_newer_one(
    bridge: HubBridge, device: MqttLink
) -> None:
    topic = device_topic("d-3", Channel.PRESENCE)
    device.publish(topic, encode(Presence("d-3", True, ts=200.0)), wait_s=5)
    device.publish(topic, encode(Presence("d-3", False, ts=100.0)), wait_s=5)
    device.publish(device_topic("d-4", Channel.PRESENCE), encode(Presence("d-4", True)), wait_s=5)
    _pump_until(bridge, lambda: len(bridge.fleet.list_devices()) == 2)
    assert bridge.fleet.get_device("d-3").online
