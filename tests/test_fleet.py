"""The fleet service: device twins from state and presence, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

from device_agent.protocol import Presence, StateReport
from edgeops.db import Database
from edgeops.errors import NotFoundError, ProtocolError
from edgeops.fleet import DeviceView, FleetService

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


class ManualClock:
    """The hub's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fleet(database: Database, clock: ManualClock) -> FleetService:
    return FleetService(database, clock=clock)


def state(device_id: str = "d-1", ts: float = 100.0, **fields: object) -> StateReport:
    document = {
        "schema": 1,
        "type": "state",
        "device_id": device_id,
        "agent_version": "0.1.0",
        "hardware": {"arch": "aarch64"},
        "ts": ts,
        **fields,
    }
    return StateReport.from_dict(document)


# -- state --------------------------------------------------------------------------------


def test_first_state_report_creates_the_device(fleet: FleetService) -> None:
    assert fleet.record_state(state(ts=100.0)) is True
    device = fleet.get_device("d-1")
    assert device.agent_version == "0.1.0"
    assert device.hardware == {"arch": "aarch64"}
    assert device.state_ts == 100.0
    assert device.online is False  # only presence says a device is online
    assert device.last_seen is None
    assert device.created_at == device.updated_at == T0


def test_newer_state_report_replaces_the_twin(fleet: FleetService, clock: ManualClock) -> None:
    fleet.record_state(state(ts=100.0))
    later = clock.advance(60)
    assert fleet.record_state(state(ts=160.0, agent_version="0.2.0", hardware={"arch": "armv7l"}))
    device = fleet.get_device("d-1")
    assert (device.agent_version, device.hardware, device.state_ts) == (
        "0.2.0",
        {"arch": "armv7l"},
        160.0,
    )
    assert device.reported["agent_version"] == "0.2.0"
    assert device.created_at == T0
    assert device.updated_at == later


def test_older_state_report_delivered_late_is_ignored(fleet: FleetService) -> None:
    assert fleet.record_state(state(ts=200.0, agent_version="0.2.0"))
    assert fleet.record_state(state(ts=150.0, agent_version="0.1.0")) is False
    device = fleet.get_device("d-1")
    assert (device.agent_version, device.state_ts) == ("0.2.0", 200.0)


def test_duplicate_state_report_is_applied_once(fleet: FleetService, clock: ManualClock) -> None:
    report = state(ts=100.0)
    assert fleet.record_state(report) is True
    clock.advance(5)
    assert fleet.record_state(report) is False  # QoS 1 redelivery
    assert fleet.get_device("d-1").updated_at == T0


def test_unknown_report_fields_survive_into_reported(fleet: FleetService) -> None:
    report = state(
        ts=100.0,
        slots={"a": {"model": "kws", "version": 3}},
        battery={"percent": 87, "charging": False},
        future_field=[1, "two", None],
    )
    fleet.record_state(report)
    reported = fleet.get_device("d-1").reported
    assert reported == report.to_dict()
    assert reported["battery"] == {"percent": 87, "charging": False}
    assert reported["future_field"] == [1, "two", None]
    assert StateReport.from_dict(reported) == report  # round-trips without loss


def test_report_with_nan_or_infinity_is_refused_as_malformed(fleet: FleetService) -> None:
    """Python's JSON parser accepts NaN and Infinity; JSON and JSONB do not."""
    with pytest.raises(ProtocolError, match="state report of 'd-1' cannot be stored as JSON"):
        fleet.record_state(state(ts=100.0, battery={"volts": float("nan")}))
    with pytest.raises(ProtocolError, match="state report of 'd-1' cannot be stored as JSON"):
        fleet.record_state(state(ts=float("inf")))
    with pytest.raises(ProtocolError, match="presence of 'd-1': field 'ts' must be a finite"):
        fleet.record_presence(Presence("d-1", online=True, ts=float("nan")))
    assert fleet.list_devices() == []


# -- presence -----------------------------------------------------------------------------


def test_presence_of_an_unknown_device_creates_it_online(fleet: FleetService) -> None:
    assert fleet.record_presence(Presence("d-9", online=True, ts=50.0)) is True
    device = fleet.get_device("d-9")
    assert device.online is True
    assert device.last_seen == T0
    assert device.presence_ts == 50.0
    assert (device.agent_version, device.hardware, device.reported) == (None, {}, {})


def test_last_will_sets_an_online_device_offline(fleet: FleetService, clock: ManualClock) -> None:
    fleet.record_presence(Presence("d-1", online=True, ts=100.0))
    gone = clock.advance(90)
    assert fleet.record_presence(Presence("d-1", online=False, ts=160.0)) is True
    device = fleet.get_device("d-1")
    assert device.online is False
    assert device.last_seen == gone


def test_last_will_stamped_like_its_online_message_still_wins(fleet: FleetService) -> None:
    """At equal ts, offline beats online: the will ends the session it was registered for."""
    fleet.record_presence(Presence("d-1", online=True, ts=100.0))
    assert fleet.record_presence(Presence("d-1", online=False, ts=100.0)) is True
    assert fleet.record_presence(Presence("d-1", online=True, ts=100.0)) is False  # redelivery
    assert fleet.get_device("d-1").online is False


def test_older_presence_delivered_late_is_ignored(fleet: FleetService) -> None:
    fleet.record_presence(Presence("d-1", online=True, ts=200.0))
    assert fleet.record_presence(Presence("d-1", online=False, ts=150.0)) is False
    device = fleet.get_device("d-1")
    assert (device.online, device.presence_ts) == (True, 200.0)


def test_state_and_presence_do_not_overwrite_each_other(fleet: FleetService) -> None:
    fleet.record_state(state(ts=100.0))
    fleet.record_presence(Presence("d-1", online=True, ts=101.0))
    fleet.record_state(state(ts=102.0, health="degraded"))
    device = fleet.get_device("d-1")
    assert device.online is True
    assert (device.state_ts, device.presence_ts) == (102.0, 101.0)
    assert device.reported["health"] == "degraded"


# -- reading ------------------------------------------------------------------------------


def test_list_devices_sorted_by_device_id(fleet: FleetService) -> None:
    ids = ["beta", "Zulu", "alpha.2", "alpha-1", "10", "alpha"]
    for device_id in ids:
        fleet.record_presence(Presence(device_id, online=True, ts=1.0))
    assert [d.device_id for d in fleet.list_devices()] == sorted(ids)
    assert sorted(ids) == ["10", "Zulu", "alpha", "alpha-1", "alpha.2", "beta"]


def test_list_devices_of_an_empty_fleet(fleet: FleetService) -> None:
    assert fleet.list_devices() == []


def test_get_device_of_an_unknown_id_raises_not_found(fleet: FleetService) -> None:
    with pytest.raises(NotFoundError, match=r"^device 'ghost' not found$"):
        fleet.get_device("ghost")


def test_device_view_to_dict_is_json_ready(fleet: FleetService) -> None:
    fleet.record_state(state(ts=100.5))
    fleet.record_presence(Presence("d-1", online=True, ts=101.0))
    data = fleet.get_device("d-1").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["last_seen"] == "2025-06-01T08:00:00Z"
    assert DeviceView.model_validate(data) == fleet.get_device("d-1")


# -- several hub processes ----------------------------------------------------------------


def test_concurrent_hubs_keep_the_newest_report(database_url: str, database: Database) -> None:
    """Hubs sharing one database, each with its own engine, race on the same devices."""
    timestamps = [float(ts) for ts in range(1, 41)]
    random.Random(7).shuffle(timestamps)
    hubs = [Database(database_url) for _ in range(4)]
    errors: list[BaseException] = []

    def run(hub: Database, share: list[float]) -> None:
        service = FleetService(hub)
        try:
            for ts in share:
                service.record_state(state("d-1", ts=ts, agent_version=f"v{ts:.0f}"))
                service.record_presence(Presence("d-1", online=ts % 2 == 0, ts=ts))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(hub, timestamps[i :: len(hubs)]))
        for i, hub in enumerate(hubs)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for hub in hubs:
            hub.dispose()
    assert errors == []
    device = FleetService(database).get_device("d-1")
    assert (device.state_ts, device.agent_version) == (40.0, "v40")
    assert (device.presence_ts, device.online) == (40.0, True)
