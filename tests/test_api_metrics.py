"""Prometheus metrics: the hub's ``/metrics`` (request latency by route template, telemetry,
devices, rollouts, drift alarms) and the agent's own ``/metrics`` on its health endpoint."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from device_agent.health import HealthEndpoint, render_metrics
from device_agent.protocol import Presence
from edgeops.api import create_app
from edgeops.api.context import ApiContext
from edgeops.config import Settings
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.monitor.models import DriftEvaluationRecord
from tests.fixtures.clock import Clock
from tests.fixtures.rollouts import contract, make_spec
from tests.fixtures.telemetry import window
from tests.test_rollout_engine import Fleet

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    """Every sample of a Prometheus text document: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[ApiContext, TestClient]]:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    context = ApiContext(Settings(data_dir=tmp_path), database)
    try:
        yield context, TestClient(create_app(context))
    finally:
        database.dispose()


def test_request_latency_by_route_template(hub: tuple[ApiContext, TestClient]) -> None:
    context, client = hub
    token = context.tokens.create("reader", "admin")[1]
    headers = {"Authorization": f"Bearer {token}"}
    for token_id in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"):
        assert client.delete(f"/api/v1/tokens/{token_id}", headers=headers).status_code == 404
    assert client.get("/api/v1/health").status_code == 200
    assert client.get("/no/such/page/123").status_code == 404
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = scrape(answer.text)
    route = {"method": "DELETE", "route": "/api/v1/tokens/{token_id}", "status": "404"}
    assert value(samples, "edgeops_http_requests_total", **route) == 3
    assert value(samples, "edgeops_http_request_duration_seconds_count", **route) == 3
    assert value(samples, "edgeops_http_request_duration_seconds_sum", **route) > 0
    bucket = value(samples, "edgeops_http_request_duration_seconds_bucket", **route, le="+Inf")
    assert bucket == 3
    health = {"method": "GET", "route": "/api/v1/health", "status": "200"}
    assert value(samples, "edgeops_http_requests_total", **health) == 1
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert value(samples, "edgeops_http_requests_total", **unmatched) == 1
    assert not [key for key in samples if "aaaaaaaaaaaa" in str(key) or "123" in str(key)]
    # each application has a registry of its own
    other = TestClient(create_app(context))
    fresh = scrape(other.get("/metrics").text)
    assert ("edgeops_http_requests_total", tuple(sorted(health.items()))) not in fresh


def test_fleet_telemetry_rollouts_and_drift_at_scrape_time(
    hub: tuple[ApiContext, TestClient],
) -> None:
    context, client = hub
    empty = scrape(client.get("/metrics").text)
    assert value(empty, "edgeops_metrics_database_up") == 1
    assert value(empty, "edgeops_telemetry_windows_total") == 0
    assert value(empty, "edgeops_devices", presence="online") == 0
    assert value(empty, "edgeops_rollouts", status="running") == 0
    assert value(empty, "edgeops_models_drifting") == 0

    # four devices, of which one is online, with telemetry and two rollouts
    fleet = Fleet(context.database, Clock(), 4)  # one window each from the old model
    context.fleet.record_presence(Presence("dev-000", online=True, ts=1_900_000_000.0))
    context.fleet.record_presence(Presence("dev-001", online=False, ts=1_900_000_000.0))
    for seq in range(1, 4):
        assert context.telemetry.record(window("dev-002", 100 + seq))
    first = context.rollouts.create(make_spec(name="first"), custom=contract())
    context.rollouts.pause(first)
    assert fleet.ids

    # drift: model m-a had two onsets and drifts now; m-b had one and is clear again
    now = utcnow()
    rows = [("m-a", "drift", True), ("m-a", "no_drift", False), ("m-a", "drift", True)]
    rows += [("m-b", "drift", True), ("m-b", "no_drift", False)]
    with context.database.session() as session:
        for offset, (model_id, verdict, onset) in enumerate(rows):
            session.add(
                DriftEvaluationRecord(
                    model_id=model_id,
                    cohort="*",
                    evaluated_at=now + timedelta(seconds=offset),
                    window_start=now,
                    window_end=now,
                    devices=1,
                    windows=1,
                    samples=10,
                    verdict=verdict,
                    onset=onset,
                )
            )

    samples = scrape(client.get("/metrics").text)
    assert value(samples, "edgeops_telemetry_windows_total") == 4 + 3
    # the fleet's windows were received at its test clock's time, a day or more ago
    assert value(samples, "edgeops_telemetry_windows_last_minute") == 3
    assert value(samples, "edgeops_devices", presence="online") == 1
    assert value(samples, "edgeops_devices", presence="offline") == 3
    assert value(samples, "edgeops_rollouts", status="paused") == 1
    assert value(samples, "edgeops_rollouts", status="running") == 0
    labels = {"rollout": first, "name": "first", "status": "paused"}
    assert value(samples, "edgeops_rollout_current_wave", **labels) == 0
    assert value(samples, "edgeops_rollout_wave_state", rollout=first, wave="0", state="pending")
    assert value(samples, "edgeops_rollout_devices", rollout=first, status="pending") == 4
    assert value(samples, "edgeops_drift_alarms_total", model="m-a") == 2
    assert value(samples, "edgeops_drift_alarms_total", model="m-b") == 1
    assert value(samples, "edgeops_models_drifting") == 1

    context.rollouts.abort(first)
    second = context.rollouts.create(make_spec(name="second"), custom=contract())
    after = scrape(client.get("/metrics").text)
    assert value(after, "edgeops_rollouts", status="aborted") == 1
    assert value(after, "edgeops_rollouts", status="running") == 1
    assert value(after, "edgeops_rollout_current_wave", rollout=second, name="second",
                 status="running") == 0  # fmt: skip
    assert not [k for k in after if k[0].startswith("edgeops_rollout_") and first in str(k)]


def test_metrics_answer_without_a_database(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    client = TestClient(create_app(ApiContext(Settings(data_dir=tmp_path), database)))
    database.dispose()
    (tmp_path / "hub.db").unlink()
    (tmp_path / "hub.db").mkdir()  # no longer a database file
    answer = client.get("/metrics")
    assert answer.status_code == 200
    samples = scrape(answer.text)
    assert value(samples, "edgeops_metrics_database_up") == 0
    assert ("edgeops_telemetry_windows_total", ()) not in samples


# -- the agent -----------------------------------------------------------------------------------


def agent_document() -> dict[str, Any]:
    return {
        "device_id": "edge-4",
        "agent_version": "0.1.0",
        "status": "connected",
        "ts": 1_800_000_000.5,
        "broker": "mqtt://127.0.0.1:1883",
        "dropped_messages": {"desired": 2},
        "desired_seen": True,
        "slots": {},
        "update_state": "testing",
        "model_error": None,
        "source_error": 'bad "frame"\nat 3',
        "samples": 1234,
        "errors": {"runtime": 3, "input": 1},
        "windows": 12,
        "source_exhausted": False,
        "buffer_pending": 5,
        "buffer_dropped_total": 7,
        "health_port": 0,
        "latency_ms": {"p50": 1.5, "p95": 4.0, "p99": 9.0},
    }


def test_agent_metrics_endpoint() -> None:
    endpoint = HealthEndpoint(agent_document, 0)
    endpoint.start()
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = answer.read().decode()
    finally:
        endpoint.stop()
    samples = scrape(text)
    assert value(samples, "edgeops_agent_info", device_id="edge-4", agent_version="0.1.0") == 1
    assert value(samples, "edgeops_agent_connected") == 1
    assert value(samples, "edgeops_agent_inferences_total") == 1234
    assert value(samples, "edgeops_agent_errors_total", kind="runtime") == 3
    assert value(samples, "edgeops_agent_errors_total", kind="input") == 1
    assert value(samples, "edgeops_agent_windows_total") == 12
    assert value(samples, "edgeops_agent_buffer_pending") == 5
    assert value(samples, "edgeops_agent_buffer_dropped_total") == 7
    assert value(samples, "edgeops_agent_dropped_messages_total", channel="desired") == 2
    assert value(samples, "edgeops_agent_update_state", state="testing") == 1
    assert value(samples, "edgeops_agent_model_error") == 0
    assert value(samples, "edgeops_agent_source_error") == 1
    assert value(samples, "edgeops_agent_latency_seconds", quantile="0.99") == pytest.approx(0.009)
    assert value(samples, "edgeops_agent_health_timestamp_seconds") == 1_800_000_000.5


def test_agent_metrics_leave_out_what_the_document_lacks() -> None:
    samples = scrape(render_metrics({"device_id": 'odd"id\\', "status": "connecting"}))
    assert value(samples, "edgeops_agent_connected") == 0
    assert value(samples, "edgeops_agent_info", device_id='odd"id\\', agent_version="") == 1
    assert not [key for key in samples if key[0] == "edgeops_agent_inferences_total"]


AGENT_TYPES = {
    "edgeops_agent_info": "gauge",
    "edgeops_agent_connected": "gauge",
    "edgeops_agent_inferences": "counter",
    "edgeops_agent_errors": "counter",
    "edgeops_agent_windows": "counter",
    "edgeops_agent_buffer_pending": "gauge",
    "edgeops_agent_buffer_dropped": "counter",
    "edgeops_agent_dropped_messages": "counter",
    "edgeops_agent_update_state": "gauge",
    "edgeops_agent_model_error": "gauge",
    "edgeops_agent_source_error": "gauge",
    "edgeops_agent_health_timestamp_seconds": "gauge",
    "edgeops_agent_latency_seconds": "gauge",
}


def test_agent_metric_families_have_their_types_as_prometheus_client_writes_them() -> None:
    """A counter's HELP and TYPE lines name its ``_total`` samples (else the parser reads an
    empty counter and an untyped family), and the whole document is byte for byte what
    prometheus-client's own ``generate_latest`` writes for the same families."""
    text = render_metrics(agent_document())
    families = list(text_string_to_metric_families(text))
    assert {family.name: family.type for family in families} == AGENT_TYPES
    for family in families:
        assert family.samples, family.name
        suffix = "_total" if family.type == "counter" else ""
        assert {sample.name for sample in family.samples} == {family.name + suffix}

    class Parsed(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Parsed())
    assert generate_latest(registry).decode() == text

    # prometheus-client's own Counter of the same name, help and value: the same lines
    own = CollectorRegistry()
    Counter("edgeops_agent_inferences", "samples run through the model", registry=own).inc(1234)
    written = [
        line for line in generate_latest(own).decode().splitlines() if "_created" not in line
    ]
    assert written == [
        "# HELP edgeops_agent_inferences_total samples run through the model",
        "# TYPE edgeops_agent_inferences_total counter",
        "edgeops_agent_inferences_total 1234.0",
    ]
    lines = text.splitlines()
    start = lines.index(written[0])
    assert lines[start : start + 3] == written


def test_agent_metric_values_and_labels_are_written_as_go_writes_them() -> None:
    doc = agent_document() | {"ts": 1_800_000_000.5, "samples": float("inf")}
    doc["errors"] = {"z": 1, "a": 2}
    text = render_metrics(doc)
    assert "edgeops_agent_health_timestamp_seconds 1.8000000005e+09" in text.splitlines()
    assert "edgeops_agent_inferences_total +Inf" in text.splitlines()
    info = next(line for line in text.splitlines() if line.startswith("edgeops_agent_info{"))
    assert info == 'edgeops_agent_info{agent_version="0.1.0",device_id="edge-4"} 1.0'
    errors = [line for line in text.splitlines() if line.startswith("edgeops_agent_errors_total")]
    assert errors == ['edgeops_agent_errors_total{kind="a"} 2.0',
                      'edgeops_agent_errors_total{kind="z"} 1.0']  # fmt: skip
