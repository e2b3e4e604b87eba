"""Telemetry ingest: the hub stores every window once, through a real broker and database."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.buffer import BufferDrain, OfflineBuffer
from device_agent.link import Backoff, MqttEndpoint, MqttLink
from device_agent.protocol import Channel, device_topic, encode, subscription
from edgeops.broker import MosquittoProcess
from edgeops.db import Database
from edgeops.errors import ProtocolError
from edgeops.fleet import FleetService
from edgeops.hub import HubBridge
from edgeops.monitor import TelemetryService
from tests.fixtures.mqtt import wait_subscribed
from tests.fixtures.telemetry import window

# -- the service -------------------------------------------------------------------------------


def test_a_window_is_stored_once_and_a_duplicate_changes_nothing(database: Database) -> None:
    telemetry = TelemetryService(database)
    first = window("d-1", 1, extra={"note": "kept"})
    assert telemetry.record(first)
    assert not telemetry.record(window("d-1", 1, samples=99))  # same (device, seq)
    assert telemetry.record(window("d-2", 1))  # another device's seq 1
    assert telemetry.count() == 2 and telemetry.count("d-1") == 1 and telemetry.count("x") == 0
    [stored] = telemetry.list_windows("d-1")
    assert (stored.seq, stored.samples, stored.model_id) == (1, 10, "m-1")
    assert stored.document() == first
    assert stored.received_at.tzinfo is not None


def test_a_batch_compares_each_window_with_the_one_kept_under_its_seq(database: Database) -> None:
    telemetry = TelemetryService(database)
    first, other = window("d-1", 1), window("d-1", 1, samples=99)
    assert telemetry.record_many([first]).stored == 1
    # the other window before the redelivery: each is compared with the stored one
    outcome = telemetry.record_many([other, first, window("d-2", 1)])
    assert (outcome.stored, outcome.duplicates, outcome.replayed) == (1, 1, [("d-1", 1)])
    # both under a new (device, seq): the first in the batch is kept
    outcome = telemetry.record_many([window("d-3", 1), window("d-3", 1, samples=7)])
    assert (outcome.stored, outcome.duplicates, outcome.replayed) == (1, 0, [("d-3", 1)])
    [stored] = telemetry.list_windows("d-3")
    assert stored.samples == 10 and telemetry.list_windows("d-1")[0].document() == first


def test_list_windows_gives_the_newest_in_sequence_order(database: Database) -> None:
    telemetry = TelemetryService(database)
    for seq in (3, 1, 5, 2, 4):
        telemetry.record(window("d-1", seq))
    assert [w.seq for w in telemetry.list_windows("d-1", limit=3)] == [3, 4, 5]
    assert [w.seq for w in telemetry.list_windows("d-1")] == [1, 2, 3, 4, 5]
    big = 1_795_780_000_000  # a seq continued from the clock after buffer corruption
    assert telemetry.record(window("d-1", big))
    assert telemetry.list_windows("d-1", limit=1)[0].seq == big


def test_a_window_that_cannot_be_stored_as_json_is_a_protocol_error(database: Database) -> None:
    telemetry = TelemetryService(database)
    with pytest.raises(ProtocolError, match="cannot be stored as JSON"):
        telemetry.record(window("d-1", 1, cpu_percent=math.nan))
    with pytest.raises(ProtocolError, match="'seq' must be at least 1"):
        telemetry.record(window("d-1", 0))
    assert telemetry.count() == 0


# -- through the broker ------------------------------------------------------------------------


@pytest.fixture
def bridge(mosquitto_url: str, database: Database) -> Iterator[HubBridge]:
    hub = HubBridge(MqttEndpoint.parse(mosquitto_url), FleetService(database))
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def device(mosquitto_url: str) -> Iterator[MqttLink]:
    link = MqttLink(
        MqttEndpoint.parse(mosquitto_url),
        client_id="ingest-dev",
        backoff=Backoff(initial_s=0.1, maximum_s=0.5),
    )
    link.start(wait_s=10)
    yield link
    link.stop()


def pump_until(
    bridge: HubBridge,
    done: Callable[[], bool],
    *,
    also: Callable[[], object] = lambda: None,
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        also()
        bridge.pump(0.05)
        if done():
            return
    raise AssertionError("condition not reached in time")


def test_the_bridge_records_windows_ignores_duplicates_and_drops_garbage(
    bridge: HubBridge, device: MqttLink
) -> None:
    topic = device_topic("d-1", Channel.TELEMETRY)
    wait_subscribed(bridge.link, topic)
    for seq in (1, 2, 2, 1, 3):
        device.publish(topic, encode(window("d-1", seq)), wait_s=5)
    device.publish(topic, b"{not json", wait_s=5)
    spoof = encode(window("victim", 9))
    device.publish(topic, spoof, wait_s=5)
    bad = window("d-1", 4).to_dict() | {"class_counts": [-1]}
    device.publish(topic, json.dumps(bad).encode(), wait_s=5)
    telemetry = bridge.telemetry
    pump_until(bridge, lambda: bridge.dispatcher.dropped["telemetry"] == 3)
    assert [w.seq for w in telemetry.list_windows("d-1")] == [1, 2, 3]
    assert bridge.duplicate_windows == 2 and telemetry.count() == 3


def test_buffered_windows_survive_a_broker_restart_and_arrive_exactly_once(
    bridge: HubBridge, device: MqttLink, mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """The device keeps producing windows while the broker is down and is itself restarted;
    afterwards the hub holds windows 1..N, each once."""
    telemetry = bridge.telemetry
    topic = device_topic("d-9", Channel.TELEMETRY)
    wait_subscribed(bridge.link, topic)
    path = tmp_path / "agent" / "telemetry.db"
    buf = OfflineBuffer(path)
    drain = BufferDrain(buf, device)

    def produce(count: int) -> None:
        for _ in range(count):
            buf.append(topic, window("d-9", 0).payload_factory(buf.take_dropped))

    produce(40)
    pump_until(bridge, lambda: telemetry.count("d-9") == 40, also=drain.pump)

    produce(10)
    drain.pump()  # in flight when the broker goes down: the acknowledgements may be lost
    mosquitto.stop()
    produce(20)
    for _ in range(10):
        drain.pump()
        time.sleep(0.05)
    assert len(buf) >= 20
    buf.close()  # the agent restarts during the outage; its buffer stays on disk
    buf = OfflineBuffer(path)
    assert buf.last_seq == 70
    drain = BufferDrain(buf, device)
    produce(5)

    mosquitto.start()
    assert device.wait_connected(30)
    pump_until(
        bridge,
        lambda: telemetry.count("d-9") == 75 and len(buf) == 0,
        also=drain.pump,
        timeout=90,
    )
    seqs = [w.seq for w in telemetry.list_windows("d-9", limit=1000)]
    assert seqs == list(range(1, 76))
    assert bridge.store_errors == 0 and buf.dropped_total == 0
    buf.close()


def test_windows_sent_while_the_hub_is_away_wait_for_it_at_the_broker(
    mosquitto_url: str, database: Database, device: MqttLink, tmp_path: Path
) -> None:
    """The hub's session is persistent: the broker queues what it acknowledged to the device
    while the hub was stopped, and hands it over when the hub is back."""
    endpoint = MqttEndpoint.parse(mosquitto_url)
    topic = device_topic("d-5", Channel.TELEMETRY)
    first = HubBridge(endpoint, FleetService(database))
    first.start()
    wait_subscribed(first.link, topic)
    first.stop()
    buf = OfflineBuffer(tmp_path / "t.db")
    for _ in range(10):
        buf.append(topic, window("d-5", 0).payload_factory())
    assert BufferDrain(buf, device).flush(10.0)  # the broker has them all; the device forgot
    buf.close()
    second = HubBridge(endpoint, FleetService(database))
    second.start()
    try:
        pump_until(second, lambda: second.telemetry.count("d-5") == 10)
        assert [w.seq for w in second.telemetry.list_windows("d-5")] == list(range(1, 11))
    finally:
        second.stop()


def test_the_hub_subscribes_to_every_devices_telemetry(bridge: HubBridge) -> None:
    assert subscription(Channel.TELEMETRY) == "edgeops/v1/dev/+/telemetry"
    wait_subscribed(bridge.link, device_topic("any-device", Channel.TELEMETRY))
