"""Update events reach the hub once: the fleet service on SQLite and PostgreSQL, the bridge
over a real private Mosquitto, and a real agent daemon running an update end to end (its TUF
client replaced by a local double; the TUF/MQTT transfer is tested in its own files)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import AgentSettings
from device_agent.daemon import AgentDaemon, event_payload
from device_agent.link import MqttEndpoint, MqttLink
from device_agent.protocol import Channel, Event, decode, device_topic, encode
from device_agent.runtime import ModelBundle
from device_agent.updater.service import UpdateService, parse_release
from edgeops.errors import ProtocolError
from edgeops.fleet import FleetService
from edgeops.hub import HubBridge
from tests.test_updater import TARGET, LocalRepository


def update_event(device_id: str, seq: int, state: str, **detail: Any) -> Event:
    body = {"state": state, "previous": "idle", "event": "start", "target": TARGET,
            "attempt": 1, "reason": None, **detail}  # fmt: skip
    return Event(device_id, seq, "update", 1795776000.0 + seq, body)


# -- the fleet service -----------------------------------------------------------------------


def test_events_are_stored_once_and_set_the_update_state(database: Any) -> None:
    fleet = FleetService(database)
    assert fleet.record_event(update_event("d-1", 5, "downloading"))
    assert not fleet.record_event(update_event("d-1", 5, "downloading"))  # QoS 1 repeat
    assert fleet.get_device("d-1").update_state == "downloading"  # created by the event
    assert fleet.record_event(update_event("d-1", 9, "committed"))
    assert fleet.record_event(update_event("d-1", 7, "testing"))  # late: stored, not applied
    assert fleet.record_event(Event("d-1", 8, "buffer_dropped", 1.0, {"dropped": 3}))
    device = fleet.get_device("d-1")
    assert (device.update_state, device.update_seq) == ("committed", 9)
    events = fleet.list_events("d-1")
    assert [e.seq for e in events] == [5, 7, 8, 9]
    assert events[0].detail["target"] == TARGET and events[2].event == "buffer_dropped"
    assert [e.seq for e in fleet.list_events("d-1", event="update")] == [5, 7, 9]
    assert fleet.list_events("d-2") == []


def test_event_for_a_known_device_keeps_its_twin(database: Any) -> None:
    from device_agent.protocol import StateReport

    fleet = FleetService(database)
    fleet.record_state(StateReport("d-3", "0.1.0", hardware={"arch": "aarch64"}, ts=10.0))
    fleet.record_event(update_event("d-3", 1, "rolled_back", reason="health: 3 errors"))
    device = fleet.get_device("d-3")
    assert device.update_state == "rolled_back" and device.hardware == {"arch": "aarch64"}
    assert device.agent_version == "0.1.0"


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (Event("d-4", 1, "update", math.nan, {}), "'ts' is not finite"),
        (Event("d-4", 2, "x", 1.0, {"v": math.inf}), "cannot be stored as JSON"),
        (update_event("d-4", 3, "x" * 40), "detail 'state' must be a short string"),
    ],
)
def test_unstorable_events_are_refused(database: Any, event: Event, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FleetService(database).record_event(event)


def test_event_documents_round_trip_and_refuse_bad_fields() -> None:
    from device_agent.errors import ProtocolError as WireError

    payload = event_payload("d-5", 3, "update", 12.5, {"state": "testing"})
    document = decode(Channel.EVENTS, payload)
    assert isinstance(document, Event) and document.detail == {"state": "testing"}
    assert decode(Channel.EVENTS, encode(document)) == document
    for bad, message in (
        ({"seq": 0}, "'seq' must be at least 1"),
        ({"detail": []}, "'detail' must be dict"),
        ({"event": ""}, "1-64 characters"),
    ):
        raw = {**json.loads(payload), **bad}
        with pytest.raises(WireError, match=message):
            decode(Channel.EVENTS, json.dumps(raw).encode())


def test_desired_release_is_checked() -> None:
    from device_agent.errors import ProtocolError as WireError

    assert parse_release(None) is None
    assert parse_release({"target": TARGET, "model_id": "m-1"}) == TARGET
    for bad in ("x", {"target": ""}, {"target": "../etc/passwd"}, {"target": "a//b"},
                {"target": "a b"}, {"target": "/abs/path"}, {"target": "a/" * 300}):  # fmt: skip
        with pytest.raises(WireError):
            parse_release(bad)


# -- the bridge ------------------------------------------------------------------------------


@pytest.fixture
def bridge(mosquitto_url: str, database: Any) -> Iterator[HubBridge]:
    hub = HubBridge(MqttEndpoint.parse(mosquitto_url), FleetService(database))
    hub.start()
    yield hub
    hub.stop()


def pump_until(bridge: HubBridge, predicate: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bridge.pump(0.1)
        if predicate():
            return
    raise AssertionError("condition not reached")


def test_bridge_records_events_once_and_drops_malformed(
    bridge: HubBridge, mosquitto_url: str
) -> None:
    device = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="events-dev")
    device.start(wait_s=10)
    try:
        topic = device_topic("e-1", Channel.EVENTS)
        first = encode(update_event("e-1", 1, "downloading"))
        for payload in (first, first, b"{garbage", encode(update_event("e-2", 2, "idle")),
                        encode(update_event("e-1", 2, "verifying"))):  # fmt: skip
            device.publish(topic, payload, wait_s=5)
        fleet = bridge.fleet
        pump_until(bridge, lambda: len(fleet.list_events("e-1")) == 2 and bridge.dispatcher.dropped)
        pump_until(bridge, lambda: bridge.duplicate_events == 1)
    finally:
        device.stop()
    assert fleet.get_device("e-1").update_state == "verifying"
    assert bridge.dispatcher.dropped == {"events": 2}  # garbage, and e-2 on e-1's topic
    assert [d.device_id for d in fleet.list_devices()] == ["e-1"]


# -- a real daemon, end to end ---------------------------------------------------------------


@pytest.fixture
def hub(bridge: HubBridge) -> Iterator[HubBridge]:
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    yield bridge
    stop.set()
    thread.join(10)


def wait_for(predicate: Callable[[], Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_daemon_updates_and_the_hub_sees_every_transition(
    hub: HubBridge,
    mosquitto_url: str,
    tmp_path: Path,
    int8_model_dir: Path,
    float_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = LocalRepository(tmp_path / "repo", tmp_path / "downloads")
    repo.add(TARGET, float_model_dir)
    monkeypatch.setattr(UpdateService, "_make_trust", lambda self: repo)
    settings = AgentSettings(
        device_id="upd-1", mqtt_url=mosquitto_url, data_dir=tmp_path / "data",
        model_dir=int8_model_dir, heartbeat_s=0.5, update_health_s=0.5,
    )  # fmt: skip
    daemon = AgentDaemon(settings)
    thread = threading.Thread(target=daemon.run, name="daemon-under-test")
    thread.start()
    controller = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="controller")
    controller.start(wait_s=10)
    fleet = hub.fleet
    new_model = ModelBundle.load(float_model_dir).model_id
    try:
        wait_for(lambda: daemon.champion is not None)
        assert daemon.slots()["active"] == "a"
        desired = {"schema": 1, "type": "desired", "release": {"target": TARGET}}
        controller.publish(
            device_topic("upd-1", Channel.DESIRED), json.dumps(desired).encode(),
            retain=True, wait_s=5,
        )  # fmt: skip

        def committed() -> bool:
            devices = fleet.list_devices()
            return bool(devices) and devices[0].update_state == "committed"

        wait_for(committed)
        assert daemon.champion is not None and daemon.champion.model_id == new_model
        wait_for(
            lambda: (fleet.get_device("upd-1").reported.get("slots") or {}).get("active") == "b"
        )
    finally:
        controller.stop()
        daemon.stop()
        thread.join(60)
    assert not thread.is_alive()
    events = fleet.list_events("upd-1", event="update")
    assert [e.detail["state"] for e in events] == [
        "downloading", "verifying", "installing", "testing", "committed",
    ]  # fmt: skip
    assert all(e.detail["target"] == TARGET for e in events)
    reported = fleet.get_device("upd-1").reported
    assert reported["update_state"] == "committed"
    assert reported["slots"]["b"] == {"target": TARGET, "model_id": new_model}
    assert reported["slots"]["champion"]["model_id"] == new_model
    pointer = json.loads((settings.state_dir / "slots" / "active.json").read_text())
    assert pointer == {"active": "b", "previous": "a", "targets": {"b": TARGET}}

    # a restart runs the new model from slot b, not the configured model_dir
    again = AgentDaemon(settings)
    champion_dir = again.updates.boot()
    assert champion_dir == settings.state_dir / "slots" / "b"
