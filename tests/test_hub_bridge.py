"""The hub's bridge: device state and presence through a real broker into the database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from device_agent.link import MqttEndpoint, MqttLink
from device_agent.protocol import Channel, Event, Presence, StateReport, device_topic, encode
from edgeops.errors import DatabaseError
from edgeops.fleet import FleetService
from edgeops.hub import HubBridge
from tests.fixtures.mqtt import wait_subscribed
from tests.fixtures.telemetry import window


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


# -- bursts are recorded in batches -----------------------------------------------------------


def burst(device_id: str) -> list[tuple[str, bytes]]:
    """What one device reports at once: its state, two events and two telemetry windows."""
    return [
        (device_topic(device_id, Channel.STATE), encode(StateReport(device_id, "0.2.0"))),
        (device_topic(device_id, Channel.EVENTS), encode(Event(device_id, 1, "started", 10.0))),
        (device_topic(device_id, Channel.EVENTS), encode(Event(device_id, 2, "ready", 11.0))),
        (device_topic(device_id, Channel.TELEMETRY), encode(window(device_id, 1))),
        (device_topic(device_id, Channel.TELEMETRY), encode(window(device_id, 2))),
    ]


def publish_and_wait_queued(
    bridge: HubBridge, device: MqttLink, messages: list[tuple[str, bytes]]
) -> None:
    """Publish ``messages`` and return once the bridge's link has received them all (queued,
    not yet handled), so one pump finds the whole burst waiting."""
    wait_subscribed(bridge.link, device_topic("probe-dev", Channel.STATE))
    before = bridge.link.stats.messages_in
    for topic, payload in messages:
        device.publish(topic, payload, wait_s=5)
    deadline = time.monotonic() + 30
    while bridge.link.stats.messages_in < before + len(messages):
        assert time.monotonic() < deadline, "the burst did not reach the bridge"
        time.sleep(0.02)


def commits_on(bridge: HubBridge) -> list[int]:
    """One entry per commit made by this thread on the bridge's database, from now on."""
    me = threading.get_ident()
    commits: list[int] = []

    def on_commit(connection: sa.Connection) -> None:
        if threading.get_ident() == me:
            commits.append(me)

    sa.event.listen(bridge.fleet.database.engine, "commit", on_commit)
    return commits


def assert_burst_stored(bridge: HubBridge, device_id: str) -> None:
    assert bridge.fleet.get_device(device_id).agent_version == "0.2.0"
    events = bridge.fleet.list_events(device_id)
    assert [(e.seq, e.event) for e in events] == [(1, "started"), (2, "ready")]
    assert [w.seq for w in bridge.telemetry.list_windows(device_id)] == [1, 2]


def test_a_burst_from_several_devices_is_stored_completely_in_few_transactions(
    bridge: HubBridge, device: MqttLink
) -> None:
    devices = ["b-1", "b-2", "b-3", "b-4"]
    messages = [m for device_id in devices for m in burst(device_id)]
    publish_and_wait_queued(bridge, device, messages)
    commits = commits_on(bridge)

    assert bridge.pump(0.5) == len(messages)

    # the burst was waiting: one transaction (two if the last message was still on its way
    # into the inbox when the pump looked), not one per message
    assert 1 <= len(commits) <= 2
    assert [d.device_id for d in bridge.fleet.list_devices()] == devices
    for device_id in devices:
        assert_burst_stored(bridge, device_id)
    assert bridge.store_errors == 0 and not bridge.dispatcher.dropped
    assert bridge.dispatcher.handled == {"state": 4, "events": 8, "telemetry": 8}


@pytest.mark.parametrize(
    "failure",
    [
        DatabaseError("database test failed: the disk is full"),
        sa.exc.IntegrityError("INSERT INTO devices ...", {}, Exception("refused")),
    ],
    ids=["database-error", "integrity-error"],
)
def test_when_one_message_fails_the_batch_the_others_are_stored_one_by_one(
    bridge: HubBridge, device: MqttLink, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    record_state = bridge.fleet.record_state

    def record_state_failing_for_one_device(report: StateReport) -> bool:
        if report.device_id == "broken":
            raise failure
        return record_state(report)

    monkeypatch.setattr(bridge.fleet, "record_state", record_state_failing_for_one_device)
    first, second = burst("f-1"), burst("f-2")
    messages = [
        *first,
        (device_topic("f-1", Channel.TELEMETRY), b"{not json"),  # dropped, once
        (device_topic("f-1", Channel.TELEMETRY), encode(window("f-1", 1))),  # again
        (device_topic("broken", Channel.STATE), encode(StateReport("broken", "0.2.0"))),
        *second,
    ]
    publish_and_wait_queued(bridge, device, messages)

    assert bridge.pump(0.5) == len(messages)

    assert [d.device_id for d in bridge.fleet.list_devices()] == ["f-1", "f-2"]
    assert_burst_stored(bridge, "f-1")
    assert_burst_stored(bridge, "f-2")
    assert bridge.store_errors == 1  # the one message the database refused
    # counted once each, though the failed batch had handled them before the replay
    assert bridge.dispatcher.dropped == {"telemetry": 1}
    assert bridge.duplicate_windows == 1
    assert bridge.dispatcher.handled == {"state": 2, "events": 4, "telemetry": 5}
