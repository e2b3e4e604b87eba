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
