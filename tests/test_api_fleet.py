"""The fleet side of the API: devices (list, twin, events, enrollment, revocation),
rollouts (create from a spec, status, pause, resume, abort), telemetry summaries, drift
(status, events, histograms, policies) and pipeline runs, over HTTP on a real database,
with the services the CLI uses behind every route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from device_agent.protocol import Event, Presence
from device_agent.telemetry import TelemetryWindow
from edgeops.api import create_app
from edgeops.api.context import ApiContext
from edgeops.config import Settings
from edgeops.db import Database
from edgeops.monitor.watch import DriftService, ReleaseInfo
from edgeops.rollout.models import RolloutRecord
from edgeops.trust.errors import MetadataError
from tests.fixtures.rollouts import OLD_TARGET, RELEASE, contract, make_spec, old_state

SPEC: dict[str, Any] = {
    "name": "digits-2",
    "release": RELEASE,
    "waves": {
        "canary": {"count": 1},
        "exponential": {"base_rate_per_minute": 2, "increment_factor": 2.0},
    },
    "gates": {"soak_seconds": 0},
}


@dataclass
class Hub:
    context: ApiContext
    client: TestClient
    viewer: dict[str, str]
    operator: dict[str, str]

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(f"/api/v1{path}", headers=self.viewer, **kwargs)

    def post(self, path: str, *, as_viewer: bool = False, **kwargs: Any) -> Any:
        headers = {**(self.viewer if as_viewer else self.operator), **kwargs.pop("headers", {})}
        return self.client.post(f"/api/v1{path}", headers=headers, **kwargs)

    def add_device(self, device_id: str, *, online: bool = True, ts: float = 1.0) -> None:
        """A device as the bridge records it: a state report (running the old release)
        and a presence."""
        fleet = self.context.fleet
        fleet.record_state(old_state(device_id, ts=ts))
        fleet.record_presence(Presence(device_id=device_id, online=online, ts=ts))

    def rollout_rows(self) -> int:
        with self.context.database.session() as session:
            return len(session.exec(select(RolloutRecord)).all())


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_hub(database: Database, data_dir: Path) -> Hub:
    context = ApiContext(Settings(data_dir=data_dir), database)
    return Hub(
        context,
        TestClient(create_app(context)),
        _bearer(context.tokens.create("v", "viewer")[1]),
        _bearer(context.tokens.create("o", "operator")[1]),
    )


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        yield make_hub(database, tmp_path / "data")
    finally:
        database.dispose()


class FakeRepository:
    """A release repository holding one target, ``RELEASE``, with the engine tests'
    compatibility contract."""

    def get_target(self, path: str) -> Any:
        if path != RELEASE:
            raise MetadataError(f"target {path!r} is not in the targets metadata")
        return SimpleNamespace(path=RELEASE, custom=contract())

    def targets(self) -> list[Any]:
        return [self.get_target(RELEASE)]


# -- devices -----------------------------------------------------------------------------------


def test_devices_list_twin_and_events(hub: Hub) -> None:
    hub.add_device("dev-b", online=False)
    hub.add_device("dev-a")
    hub.context.fleet.record_event(
        Event("dev-a", 1, "update", 2.0, {"state": "downloading", "target": RELEASE})
    )

    listed = hub.get("/devices")
    assert listed.status_code == 200
    devices = listed.json()
    assert [d["device_id"] for d in devices] == ["dev-a", "dev-b"]
    first = devices[0]
    assert first["online"] is True and devices[1]["online"] is False
    assert first["identity"] == "none"
    assert first["active_release"] == OLD_TARGET and first["active_model"] == "m-old"
    assert first["update_state"] == "downloading"
    assert first["hardware"] == {"arch": "aarch64"}

    twin = hub.get("/devices/dev-a").json()
    assert twin["device_id"] == "dev-a" and twin["online"] is True
    assert twin["reported"]["slots"]["a"]["target"] == OLD_TARGET
    assert twin["desired"] == {} and twin["desired_version"] == 0
    assert twin["identity"] == "none"
    assert [d["field"] for d in twin["differences"]] == ["update_state"]
    assert twin["last_update"] == {"state": "downloading", "target": RELEASE, "ts": 2.0}
    assert twin["last_conformance"] is None
    # a gateway's rolled-back firmware: the newest update and conformance events say why
    failed = {"passed": False, "failed": [3], "reason": "test vector 3 differs by 9 steps"}
    hub.context.fleet.record_event(Event("dev-a", 3, "conformance", 4.0, failed))
    hub.context.fleet.record_event(
        Event("dev-a", 4, "update", 5.0, {"state": "rolled_back", "reason": "smoke_test: ..."})
    )
    twin = hub.get("/devices/dev-a").json()
    assert twin["last_update"]["state"] == "rolled_back" and twin["last_update"]["ts"] == 5.0
    assert twin["last_conformance"] == {**failed, "ts": 4.0}

    events = hub.get("/devices/dev-a/events").json()
    assert [(e["seq"], e["event"], e["detail"].get("state")) for e in events] == [
        (1, "update", "downloading"),
        (3, "conformance", None),
        (4, "update", "rolled_back"),
    ]
    assert hub.get("/devices/dev-a/events", params={"event": "error"}).json() == []

    for path in ("/devices/ghost", "/devices/ghost/events", "/devices/ghost/telemetry"):
        missing = hub.get(path)
        assert missing.status_code == 404, path
        assert "ghost" in missing.json()["detail"]
    assert hub.get("/devices/not%20an%20id").status_code == 422
    assert hub.get("/devices/dev-a/events", params={"limit": 0}).status_code == 422


def test_enroll_shows_the_password_once_and_revoke(hub: Hub) -> None:
    created = hub.post("/devices", json={"device_id": "cam-1", "tags": {"site": "berlin"}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["username"] == "cam-1" and len(body["password"]) >= 16
    assert body["agent_config"]["mqtt_url"] == f"mqtt://cam-1:{body['password']}@127.0.0.1:1883"
    assert body["tags"] == {"site": "berlin"} and body["identity"] == "active"
    listed = {d["device_id"]: d for d in hub.get("/devices").json()}
    assert listed["cam-1"]["identity"] == "active" and listed["cam-1"]["tags"] == body["tags"]
    assert "password" not in listed["cam-1"]
    assert body["password"] not in hub.get("/devices/cam-1").text

    again = hub.post("/devices", json={"device_id": "cam-1"})
    assert again.status_code == 409 and "already enrolled" in again.json()["detail"]

    bad_tag = hub.post("/devices", json={"device_id": "cam-2", "tags": {"-x": "1"}})
    assert bad_tag.status_code == 400 and "'-x'" in bad_tag.json()["detail"]
    reserved = hub.post("/devices", json={"device_id": "edgeops-hub"})
    assert reserved.status_code == 400 and "reserved" in reserved.json()["detail"]
    bad_url = hub.post(
        "/devices", json={"device_id": "cam-2", "broker_url": "mqtt://u:p@broker:1883"}
    )
    assert bad_url.status_code == 400 and bad_url.json()["detail"].startswith("broker_url")
    assert hub.post("/devices", json={"device_id": "cam 2"}).status_code == 422
    assert hub.post("/devices", json={"device_id": "cam-2"}, as_viewer=True).status_code == 403
    assert [d["device_id"] for d in hub.get("/devices").json()] == ["cam-1"]  # nothing else

    with_url = hub.post(
        "/devices", json={"device_id": "cam-3", "broker_url": "mqtts://broker.example:8883"}
    ).json()
    assert with_url["agent_config"]["mqtt_url"].startswith("mqtts://cam-3:")

    revoked = hub.post("/devices/cam-1/revoke")
    assert revoked.status_code == 200
    assert revoked.json()["identity"] == "revoked" and revoked.json()["changed"] is True
    assert hub.post("/devices/cam-1/revoke").json()["changed"] is False
    assert hub.post("/devices/cam-1/revoke", as_viewer=True).status_code == 403
    assert hub.post("/devices/ghost/revoke").status_code == 404
    hub.add_device("never-enrolled")
    assert hub.post("/devices/never-enrolled/revoke").status_code == 404


def test_the_list_and_the_summary_read_json_fields_on_every_database(
    database: Database, tmp_path: Path
) -> None:
    """The fleet list and the telemetry summary pick fields out of JSON columns in SQL
    (SQLite's JSON, PostgreSQL's JSONB)."""
    hub = make_hub(database, tmp_path / "data")
    hub.add_device("dev-a")
    assert hub.post("/devices", json={"device_id": "dev-b", "tags": {"site": "x"}}).is_success
    hub.context.telemetry.record(_window("dev-a", 1, errors={"input": 1}))
    devices = hub.get("/devices").json()
    assert [(d["device_id"], d["identity"], d["active_release"]) for d in devices] == [
        ("dev-a", "none", OLD_TARGET),
        ("dev-b", "active", None),
    ]
    summary = hub.get("/telemetry/summary", params={"device_id": "dev-a"}).json()
    assert summary["windows"] == 1 and summary["errors"] == {"input": 1}
    assert summary["class_counts"] == [10] * 10
    assert summary["latency_ms"]["p99"] == {"mean": 20.0, "max": 20.0}


# -- rollouts ----------------------------------------------------------------------------------


def test_pause_resume_abort_over_http(hub: Hub) -> None:
    for index in range(3):
        hub.add_device(f"dev-{index}")
    rollout_id = hub.context.rollouts.create(make_spec(), custom=contract())

    listed = hub.get("/rollouts").json()
    assert [(r["id"], r["status"], r["release"]) for r in listed] == [
        (rollout_id, "running", RELEASE)
    ]
    status = hub.get(f"/rollouts/{rollout_id}").json()
    assert status["status"] == "running" and status["counts"]["pending"] == 3
    assert status["waves"][0]["kind"] == "canary"
    devices = hub.get(f"/rollouts/{rollout_id}/devices").json()
    assert sorted(d["device_id"] for d in devices) == ["dev-0", "dev-1", "dev-2"]

    assert hub.post(f"/rollouts/{rollout_id}/pause", as_viewer=True).status_code == 403
    paused = hub.post(f"/rollouts/{rollout_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert hub.context.rollouts.status(rollout_id)["status"] == "paused"
    twice = hub.post(f"/rollouts/{rollout_id}/pause")
    assert twice.status_code == 409 and "not running" in twice.json()["detail"]

    resumed = hub.post(f"/rollouts/{rollout_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "running"
    assert hub.post(f"/rollouts/{rollout_id}/resume").status_code == 409

    aborted = hub.post(f"/rollouts/{rollout_id}/abort", json={"reason": "bad canary"})
    assert aborted.status_code == 200
    assert aborted.json() == {"id": rollout_id, "status": "aborted", "rolled_back": 0}
    assert hub.get(f"/rollouts/{rollout_id}").json()["reason"] == "bad canary"

    finished = hub.post(f"/rollouts/{rollout_id}/pause")
    assert finished.status_code == 409
    assert finished.json()["detail"] == f"rollout {rollout_id} is aborted, not running"
    assert hub.post(f"/rollouts/{rollout_id}/abort").status_code == 409
    assert hub.post(f"/rollouts/{rollout_id}/abort", json={"reason": ""}).status_code == 422

    for path in ("", "/devices"):
        missing = hub.get(f"/rollouts/r-0000000000{path}")
        assert missing.status_code == 404 and "r-0000000000" in missing.json()["detail"]
    for action in ("pause", "resume", "abort"):
        assert hub.post(f"/rollouts/r-0000000000/{action}").status_code == 404


def test_create_rollout_from_a_spec(hub: Hub) -> None:
    for index in range(3):
        hub.add_device(f"dev-{index}")

    no_repository = hub.post("/rollouts", json=SPEC)
    assert no_repository.status_code == 409, no_repository.text
    assert hub.rollout_rows() == 0

    hub.context.__dict__["repository"] = FakeRepository()
    hub.context.__dict__.pop("rollouts")  # made again, on this repository
    bad_factor = json.loads(json.dumps(SPEC))
    bad_factor["waves"]["exponential"]["increment_factor"] = 9.0
    cases: list[tuple[Any, str]] = [
        (bad_factor, "waves.exponential.increment_factor: "),
        ({**SPEC, "colour": "blue"}, "colour: unknown field"),
        ({**SPEC, "release": "digits/9/litert/model.tflite"}, "release: unknown release"),
        ({**SPEC, "selection": {"tags": {"site": "mars"}}}, "selection"),
        ({k: v for k, v in SPEC.items() if k != "waves"}, "waves: missing"),
        ({**SPEC, "name": 7}, "name: "),
    ]
    for document, start in cases:
        refused = hub.post("/rollouts", json=document)
        assert refused.status_code == 422, (document, refused.text)
        assert refused.json()["detail"].startswith(start), refused.json()
    nan = hub.post(
        "/rollouts",
        content=b'{"name": "x", "release": "y", "seed": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= nan.status_code < 500
    assert hub.post("/rollouts", json=[1, 2]).status_code == 422
    assert hub.post("/rollouts", json=SPEC, as_viewer=True).status_code == 403
    assert hub.rollout_rows() == 0  # nothing half-written

    created = hub.post("/rollouts", json=SPEC)
    assert created.status_code == 201, created.text
    document = created.json()
    assert document["status"] == "running" and document["release"]["target"] == RELEASE
    assert document["counts"]["pending"] == 3
    assert hub.get("/rollouts").json()[0]["id"] == document["id"]

    busy = hub.post("/rollouts", json={**SPEC, "name": "again"})
    assert busy.status_code == 422 and busy.json()["detail"].startswith("selection")
    assert hub.rollout_rows() == 1


# -- telemetry ---------------------------------------------------------------------------------


def _window(device_id: str, seq: int, **fields: Any) -> TelemetryWindow:
    values: dict[str, Any] = {
        "device_id": device_id,
        "model_id": "m-new",
        "seq": seq,
        "start_ts": 1_800_000_000.0,
        "end_ts": 1_800_000_060.0,
        "samples": 100,
        "class_counts": [10] * 10,
        "latency_ms": {"p50": 5.0, "p95": 10.0, "p99": 20.0},
        "errors": {},
    }
    values.update(fields)
    return TelemetryWindow(**values)


def test_telemetry_summary_and_newest_windows(hub: Hub) -> None:
    hub.add_device("dev-a")
    hub.add_device("dev-b")
    telemetry = hub.context.telemetry
    telemetry.record(_window("dev-a", 1))
    telemetry.record(_window("dev-a", 2, samples=300, latency_ms={"p95": 30.0}))
    telemetry.record(_window("dev-b", 1, errors={"runtime": 2}, class_counts=[1] * 10))

    summary = hub.get("/telemetry/summary").json()
    assert summary["windows"] == 3 and summary["devices"] == 2
    assert summary["samples"] == 500 and summary["truncated"] is False
    assert summary["errors"] == {"runtime": 2} and summary["error_count"] == 2
    assert summary["class_counts"] == [21] * 10
    assert summary["models"] == {"m-new": 3}
    # p95: sample-weighted mean (10*100 + 30*300 + 10*100) / 500
    assert summary["latency_ms"]["p95"] == {"mean": 22.0, "max": 30.0}
    assert summary["latency_ms"]["p50"] == {"mean": 5.0, "max": 5.0}

    of_a = hub.get("/telemetry/summary", params={"device_id": "dev-a"}).json()
    assert of_a["windows"] == 2 and of_a["samples"] == 400
    assert hub.get("/telemetry/summary", params={"model_id": "m-old"}).json()["windows"] == 0
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    later = hub.get("/telemetry/summary", params={"since": future}).json()
    assert later["windows"] == 0 and later["latency_ms"]["p95"]["mean"] is None
    naive = hub.get("/telemetry/summary", params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 422 and "since" in naive.text
    assert hub.get("/telemetry/summary", params={"since": "yesterday"}).status_code == 422

    newest = hub.get("/devices/dev-a/telemetry", params={"limit": 1}).json()
    assert [(w["seq"], w["samples"]) for w in newest] == [(2, 300)]
    both = hub.get("/devices/dev-a/telemetry").json()
    assert [w["seq"] for w in both] == [1, 2]
    assert both[0]["window"]["class_counts"] == [10] * 10
    assert hub.get("/devices/dev-a/telemetry", params={"limit": 5000}).status_code == 422


# -- drift -------------------------------------------------------------------------------------


def test_drift_status_events_histograms(hub: Hub) -> None:
    releases = {
        "m-new": ReleaseInfo(
            model_id="m-new",
            name="digits",
            reference={
                "feature_edges": [[0.5]],
                "feature_counts": [[500, 500]],
                "class_counts": [100] * 10,
            },
        )
    }
    hub.context.__dict__["drift"] = DriftService(hub.context.database, releases.get)
    hub.add_device("dev-a")
    for seq in range(1, 4):
        hub.context.telemetry.record(_window("dev-a", seq, feature_counts=[[60, 40]]))
    assert hub.get("/drift/status").json() == []
    evaluations = hub.context.drift.evaluate()
    assert len(evaluations) == 1

    status = hub.get("/drift/status").json()
    assert [(s["model_id"], s["cohort"]) for s in status] == [("m-new", "*")]
    assert status[0]["verdict"] in ("drift", "no_drift", "insufficient")
    assert hub.get("/drift/status", params={"model_id": "m-other"}).json() == []
    events = hub.get("/drift/events", params={"limit": 5}).json()
    assert [e["onset"] for e in events] == [True] * len(events)
    assert hub.get("/drift/events", params={"limit": 0}).status_code == 422

    histograms = hub.get("/drift/histograms", params={"model_id": "m-new"}).json()
    assert histograms["windows"] == 3 and histograms["samples"] == 300
    assert histograms["features"] == [
        {"name": "0", "edges": [0.5], "reference": [500, 500], "live": [180, 120]}
    ]
    classes = histograms["outputs"][0]
    assert classes["name"] == "classes"
    assert classes["reference"] == [100] * 10 and classes["live"] == [30] * 10
    missing = hub.get("/drift/histograms", params={"model_id": "m-new", "cohort": "site=x"})
    assert missing.status_code == 404 and "site=x" in missing.json()["detail"]
    assert hub.get("/drift/histograms").status_code == 422


def test_drift_policies(hub: Hub) -> None:
    default = hub.get("/drift/policies/digits").json()
    assert default["stored"] is False and default["action"] == "none"
    assert hub.get("/drift/policies").json() == []

    body = {"action": "notify", "webhook_url": "https://hooks.example/drift", "window_s": 300}
    assert hub.client.put(
        "/api/v1/drift/policies/digits", json=body, headers=hub.viewer
    ).status_code == (403)
    stored = hub.client.put("/api/v1/drift/policies/digits", json=body, headers=hub.operator)
    assert stored.status_code == 200, stored.text
    assert stored.json()["stored"] is True and stored.json()["window_s"] == 300.0
    assert hub.get("/drift/policies/digits").json()["webhook_url"] == body["webhook_url"]
    assert [p["model_name"] for p in hub.get("/drift/policies").json()] == ["digits"]

    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"action": "notify"}, 400, "webhook_url"),
        ({"action": "notify", "webhook_url": "ftp://x/y"}, 400, "webhook_url"),
        ({"action": "retrain"}, 400, "retrain"),
        ({"config": {"alpha": 7}}, 400, "config"),
        ({"action": "explode"}, 422, "action"),
        ({"window_s": 0}, 422, "window_s"),
        ({"colour": "blue"}, 422, "colour"),
    ]
    for document, code, field in refusals:
        refused = hub.client.put(
            "/api/v1/drift/policies/other", json=document, headers=hub.operator
        )
        assert refused.status_code == code, (document, refused.text)
        assert field in refused.text
    assert [p["model_name"] for p in hub.get("/drift/policies").json()] == ["digits"]

    deleted = hub.client.delete("/api/v1/drift/policies/digits", headers=hub.operator)
    assert deleted.status_code == 204
    again = hub.client.delete("/api/v1/drift/policies/digits", headers=hub.operator)
    assert again.status_code == 404 and "digits" in again.json()["detail"]
    assert hub.client.delete("/api/v1/drift/policies/x", headers=hub.viewer).status_code == 403


# -- pipelines ---------------------------------------------------------------------------------


def test_pipeline_runs(hub: Hub, tmp_path: Path) -> None:
    assert hub.get("/pipelines/runs").json() == []
    started = hub.post("/pipelines/runs", json={"model": "digits", "margin": 0.01})
    assert started.status_code == 202, started.text
    run = started.json()
    assert run["status"] == "pending" and run["pipeline"] == "ct"
    assert run["params"]["model"] == "digits" and run["params"]["margin"] == 0.01
    assert run["params"]["labeler"] == {"kind": "oracle", "noise": 0.0}
    assert run["steps"] and {s["status"] for s in run["steps"]} == {"pending"}
    # pending with no lease: what the hub's resume loop (PipelineRunner.resume) executes
    assert run["lease_owner"] is None

    assert [r["id"] for r in hub.get("/pipelines/runs").json()] == [run["id"]]
    assert hub.get("/pipelines/runs", params={"pipeline": "other"}).json() == []
    assert hub.get(f"/pipelines/runs/{run['id']}").json()["id"] == run["id"]

    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"model": "digits", "holdout": 2}, 422, "holdout"),
        ({"margin": 0.1}, 422, "model"),
        ({"model": "digits", "labeler": {"kind": "psychic"}}, 422, "labeler"),
        ({"model": "digits", "runtime": "jvm"}, 422, "runtime"),
        ({"model": "digits", "hardware": {"arch": ["x86_64", ""]}}, 400, "hardware"),
        ({"model": "digits", "hardware": {"arch": ["a|b"]}}, 400, "hardware"),
        (
            {"model": "digits", "labeler": {"kind": "file", "path": str(tmp_path / "none.csv")}},
            400,
            "labeler.path",
        ),
    ]
    for document, code, field in refusals:
        refused = hub.post("/pipelines/runs", json=document)
        assert refused.status_code == code, (document, refused.text)
        assert field in refused.text
    assert hub.post("/pipelines/runs", json={"model": "x"}, as_viewer=True).status_code == 403
    assert len(hub.get("/pipelines/runs").json()) == 1  # nothing else recorded

    # labelled files: only under <data dir>/labels, and a refusal repeats nothing of a file
    secret = tmp_path / "creds.csv"
    secret.write_text("AKIAEXAMPLESECRET,hunter2\n1,2\n")
    for path in (str(secret), "../creds.csv"):
        body = {"model": "digits", "labeler": {"kind": "file", "path": path, "label_column": "x"}}
        refused = hub.post("/pipelines/runs", json=body)
        assert refused.status_code == 400 and "labels directory" in refused.text, refused.text
        assert "AKIA" not in refused.text and "hunter2" not in refused.text
    labels = hub.context.settings.data_dir / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "planted.csv").write_text("AKIAEXAMPLESECRET,hunter2\n1,2\n")
    body = {
        "model": "digits",
        "labeler": {"kind": "file", "path": "planted.csv", "label_column": "x"},
    }
    refused = hub.post("/pipelines/runs", json=body)
    assert refused.status_code == 400 and "planted.csv is not a labelled file" in refused.text
    assert "AKIA" not in refused.text and "hunter2" not in refused.text
    (labels / "good.csv").write_text("f0,f1,label\n0.5,1.5,cat\n2.0,0.0,dog\n")
    body = {
        "model": "digits",
        "labeler": {"kind": "file", "path": "good.csv", "label_column": "label"},
    }
    accepted = hub.post("/pipelines/runs", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["params"]["labeler"]["path"] == str((labels / "good.csv").resolve())
    hub.post(f"/pipelines/runs/{accepted.json()['id']}/cancel")

    assert hub.post(f"/pipelines/runs/{run['id']}/cancel", as_viewer=True).status_code == 403
    cancelled = hub.post(f"/pipelines/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = hub.post(f"/pipelines/runs/{run['id']}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    for response in (hub.get("/pipelines/runs/p-missing"), hub.post("/pipelines/runs/p-x/cancel")):
        assert response.status_code == 404
