"""The desired twin: patches, the stored document and its version, and the twin's differences,
on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from device_agent.protocol import StateReport
from device_agent.updater.service import parse_release
from edgeops.db import Database
from edgeops.errors import ConfigError, NotFoundError
from edgeops.fleet import DesiredStateError, FleetService, IdentityService
from edgeops.fleet.desired import (
    desired_document,
    encode_desired,
    merge_desired,
    twin_differences,
    validate_patch,
)

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
OLD = "digits-mlp/1/litert/model.tflite"
NEW = "digits-mlp/2/litert/model.tflite"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def fleet(database: Database) -> FleetService:
    identities = IdentityService(database)
    for name in ("d-1", "d-2", "d-3"):
        identities.enroll(name)
    return FleetService(database, clock=Clock())


def report(device_id: str = "d-1", ts: float = 100.0, **fields: Any) -> StateReport:
    return StateReport.from_dict(
        {
            "schema": 1,
            "type": "state",
            "device_id": device_id,
            "agent_version": "0.1.0",
            "hardware": {"arch": "x86_64"},
            "ts": ts,
            **fields,
        }
    )


def slots(target: str | None, model_id: str = "m-000000000001", **more: Any) -> dict[str, Any]:
    return {"active": "a", "a": {"target": target, "model_id": model_id}, **more}


# -- patches ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({}, "desired patch is empty"),
        ({"releases": None}, "unknown field 'releases'"),
        ({"release": "x"}, "desired release must be an object or null"),
        ({"release": {}}, "'target' must be a string"),
        ({"release": {"target": "../etc/passwd"}}, "is not a relative target path"),
        ({"release": {"target": "/abs/model.tflite"}}, "is not a relative target path"),
        ({"release": {"target": NEW, "model_id": 7}}, "'model_id' must be a string"),
        ({"challenger": {"path": "x"}}, "challenger: 'model_id' must be a string"),
        ({"challenger": {"model_id": "m", "path": "../x"}}, "challenger: 'path'"),
        ({"challenger": {"model_id": "m", "path": "/x"}}, "challenger: 'path'"),
        ({"config": [1]}, "desired config must be an object or null"),
        ({"config": {"x": float("nan")}}, "desired config cannot be sent as JSON"),
        ({"config": {1: 2}}, "desired config: object keys must be strings"),
    ],
)
def test_bad_patches_are_refused_naming_the_field(patch: dict[Any, Any], named: str) -> None:
    with pytest.raises(DesiredStateError) as caught:
        validate_patch(patch)
    assert named in str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI's exit code 2


def test_release_and_challenger_replace_config_merges() -> None:
    current = {
        "release": {"target": OLD, "model_id": "m-1"},
        "config": {"a": 1, "nested": {"x": 1, "y": 2}},
    }
    merged = merge_desired(current, {"release": {"target": NEW}})
    assert merged["release"] == {"target": NEW}  # the old model id does not linger
    assert merged["config"] == current["config"]
    merged = merge_desired(merged, {"config": {"a": None, "nested": {"y": 3}, "b": [1]}})
    assert merged["config"] == {"nested": {"x": 1, "y": 3}, "b": [1]}
    merged = merge_desired(merged, {"challenger": {"model_id": "m-2", "path": "m-2"}})
    assert merged["challenger"] == {"model_id": "m-2", "path": "m-2"}
    assert merge_desired(merged, {"config": None})["config"] == {}
    assert merge_desired(merged, {"challenger": None})["challenger"] is None
    assert current["config"] == {"a": 1, "nested": {"x": 1, "y": 2}}  # not changed in place


# -- the stored document ---------------------------------------------------------------------


def test_set_desired_stores_versions_and_publishes_nothing_by_itself(fleet: FleetService) -> None:
    assert fleet.get_device("d-1").desired_version == 0
    first = fleet.set_desired("d-1", {"release": {"target": NEW, "model_id": "m-2"}})
    assert first.desired == {"release": {"target": NEW, "model_id": "m-2"}}
    assert first.desired_version == 1 and first.desired_at is not None
    same = fleet.set_desired("d-1", {"release": {"target": NEW, "model_id": "m-2"}})
    assert (same.desired_version, same.desired_at) == (1, first.desired_at)  # no change
    second = fleet.set_desired("d-1", {"config": {"sample_rate": 5}})
    assert second.desired_version == 2
    assert second.desired == {
        "release": {"target": NEW, "model_id": "m-2"},
        "config": {"sample_rate": 5},
    }
    stored = fleet.get_device("d-1")
    assert (stored.desired, stored.desired_version) == (second.desired, 2)
    assert stored.to_dict()["desired_version"] == 2
    assert fleet.get_device("d-2").desired_version == 0


def test_the_wire_document_is_what_the_agent_reads(fleet: FleetService) -> None:
    view = fleet.set_desired("d-1", {"release": {"target": NEW, "model_id": "m-2"}})
    document = json.loads(encode_desired(view))
    assert document == desired_document(view)
    assert document["schema"] == 1 and document["type"] == "desired"
    assert document["device_id"] == "d-1" and document["version"] == 1
    assert document["challenger"] is None and document["config"] == {}
    assert parse_release(document["release"]) == NEW


def test_set_desired_many_is_all_or_nothing(fleet: FleetService) -> None:
    with pytest.raises(NotFoundError, match="unknown devices: 'ghost', 'spook'"):
        fleet.set_desired_many(["d-1", "ghost", "d-2", "spook"], {"release": {"target": NEW}})
    with pytest.raises(DesiredStateError):
        fleet.set_desired_many(["d-1", "d-2"], {"release": {"target": "../x"}})
    assert [fleet.get_device(d).desired_version for d in ("d-1", "d-2")] == [0, 0]
    views = fleet.set_desired_many(["d-2", "d-1", "d-2"], {"release": {"target": NEW}})
    assert [(v.device_id, v.desired_version) for v in views] == [("d-2", 1), ("d-1", 1)]
    with pytest.raises(NotFoundError, match="device 'nobody'"):
        fleet.twin("nobody")


def test_concurrent_hubs_lose_no_change(database_url: str, database: Database) -> None:
    """Hubs sharing one database, each with its own engine, patch one device at once."""
    IdentityService(database).enroll("d-1")
    hubs = [Database(database_url) for _ in range(4)]
    errors: list[BaseException] = []
    per_hub = 10

    def run(index: int, hub: Database) -> None:
        service = FleetService(hub)
        try:
            for n in range(per_hub):
                service.set_desired("d-1", {"config": {f"h{index}-{n}": n}})
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, hub)) for i, hub in enumerate(hubs)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for hub in hubs:
            hub.dispose()
    assert errors == []
    device = FleetService(database).get_device("d-1")
    assert device.desired_version == len(hubs) * per_hub
    assert len(device.desired["config"]) == len(hubs) * per_hub


# -- desired against reported ----------------------------------------------------------------


def test_twin_shows_where_desired_and_reported_differ(fleet: FleetService) -> None:
    twin = fleet.twin("d-1")
    assert twin.in_sync and twin.desired == {} and twin.reported == {}

    fleet.set_desired("d-1", {"release": {"target": NEW, "model_id": "m-2"}})
    twin = fleet.twin("d-1")
    assert [(d.field, d.desired, d.reported) for d in twin.differences] == [("release", NEW, None)]
    assert "has not reported yet" in twin.differences[0].note

    fleet.record_state(report(slots=slots(OLD), update_state="downloading", ts=101))
    twin = fleet.twin("d-1")
    assert [(d.field, d.desired, d.reported) for d in twin.differences] == [
        ("release", NEW, OLD),
        ("update_state", None, "downloading"),
    ]
    assert twin.to_dict()["in_sync"] is False

    fleet.record_state(report(slots=slots(NEW, "m-2"), update_state="committed", ts=102))
    assert fleet.twin("d-1").in_sync

    fleet.set_desired("d-1", {"challenger": {"model_id": "m-3", "path": "m-3"}})
    twin = fleet.twin("d-1")
    assert [(d.field, d.desired, d.reported) for d in twin.differences] == [
        ("challenger", "m-3", None)
    ]
    running = slots(NEW, "m-2", challenger={"model_id": "m-3", "runtime": "litert"})
    fleet.record_state(report(slots=running, update_state="committed", ts=103))
    assert fleet.twin("d-1").in_sync
    document = fleet.twin("d-1").to_dict()
    assert document["desired_version"] == 2 and document["differences"] == []
    json.dumps(document)  # JSON-ready


def test_a_rolled_back_release_and_garbage_slots_show_as_differences() -> None:
    desired = {"release": {"target": NEW}}
    rolled = twin_differences(desired, {"slots": slots(OLD)}, "rolled_back")
    assert [(d.field, d.reported) for d in rolled] == [("release", OLD)]
    assert "rolled back" in rolled[0].note
    # back on the old release after a rollback: nothing to do
    assert (
        twin_differences({"release": {"target": OLD}}, {"slots": slots(OLD)}, "rolled_back") == []
    )
    for garbage in ({"slots": "x"}, {"slots": {"active": "z"}}, {"slots": {"error": "bad"}}):
        (difference,) = twin_differences(desired, garbage, None)
        assert (difference.field, difference.reported) == ("release", None)
    # a seeded slot (no target path) runs a model but no release
    (difference,) = twin_differences(desired, {"slots": slots(None, "m-9")}, "idle")
    assert difference.reported is None and "m-9" in difference.note
