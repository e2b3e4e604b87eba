"""The walking skeleton: `edgeops demo` brings up a broker, the hub and agents, and cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.clitools import BIN, run_cli

pytestmark = pytest.mark.slow


def _processes_with_marker(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("EDGEOPS_TEST_MARKER") == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_headless_demo_prints_three_devices_online_and_leaves_no_process(
    isolated_environment: Path,
) -> None:
    marker = uuid.uuid4().hex
    result = run_cli(
        "edgeops", "demo", "--devices", "3", "--headless",
        env={"EDGEOPS_TEST_MARKER": marker}, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 of 3 devices online" in result.stdout
    for device_id in ("demo-001", "demo-002", "demo-003"):
        assert device_id in result.stdout
    assert "recorded 3 of 3 offline" in result.stdout
    assert _processes_with_marker(marker) == []
    assert (isolated_environment / "edgeops.db").is_file()


def test_headless_demo_json_via_environment_on_mosquitto(mosquitto_url: str) -> None:
    marker = uuid.uuid4().hex
    result = run_cli(
        "edgeops", "demo", "--devices", "3", "--json",
        env={"EDGEOPS_DEMO_HEADLESS": "1", "EDGEOPS_MQTT_URL": mosquitto_url,
             "EDGEOPS_TEST_MARKER": marker},
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    online = {d["device_id"]: d for d in document["online"]}
    assert sorted(online) == ["demo-001", "demo-002", "demo-003"]
    assert all(d["online"] and d["agent_version"] == "0.1.0" for d in online.values())
    assert online["demo-001"]["hardware"]["cohort"] == "canary"
    assert sorted(document["stopped"]) == sorted(online)
    assert _processes_with_marker(marker) == []


def test_interrupted_demo_stops_every_child_process() -> None:
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [str(BIN / "edgeops"), "demo", "--devices", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "EDGEOPS_TEST_MARKER": marker, "COLUMNS": "200"},
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "2 of 2 devices online" in line or not line:
            break
    assert any("2 of 2 devices online" in line for line in lines), "".join(lines)
    assert len(_processes_with_marker(marker)) >= 4  # demo, broker, two agents
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert _processes_with_marker(marker) == []
