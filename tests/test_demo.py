"""`edgeops demo`: the closed loop, headless, on embedded defaults; and nothing left behind."""

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

from tests.clitools import BIN, run_cli, sigint_as_in_a_terminal

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


def _left_after(marker: str, timeout_s: float = 15.0) -> list[str]:
    """The command lines of the processes with ``marker`` still there after ``timeout_s``:
    a process the demo stopped may take a moment to be gone (multiprocessing's resource
    tracker ends when it sees its parent's pipe close), one that it lost stays."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for process in _processes_with_marker(marker):
            try:
                left.append(" ".join(process.cmdline()))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_headless_demo_closes_the_loop_and_leaves_no_process(isolated_environment: Path) -> None:
    marker = uuid.uuid4().hex
    result = run_cli(
        "edgeops", "demo", "--json", "--devices", "8", "--steady", "10",
        env={"EDGEOPS_DEMO_HEADLESS": "1", "EDGEOPS_TEST_MARKER": marker},
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(result.stdout)
    steps = [line["what"] for line in document["timeline"]]
    order = ["trained", "signed", "hub up", "devices online", "v1 on every device",
             "drift injected", "drift detected", "continuous-training run",
             "collected the samples", "challenger", "canary rollout",
             "on every device;"]  # fmt: skip
    positions = [next(i for i, s in enumerate(steps) if key in s) for key in order]
    assert positions == sorted(positions), steps
    seconds, accuracy = document["seconds"], document["accuracy"]
    assert 0 < seconds["drift_to_detection"] < seconds["drift_to_every_device_improved"]
    assert accuracy["during_drift"] < accuracy["before_drift"] - 0.05  # the drift hurts
    assert accuracy["recovered"] and accuracy["after_promotion"] > accuracy["during_drift"]
    assert document["no_drift_evaluations_before_drift"] >= 1  # the watch ran: no drift
    event = document["drift_event"]
    assert event["onset"] and event["verdict"] == "drift"
    run = document["pipeline_run"]
    assert run["status"] == "succeeded"
    assert [s["name"] for s in run["steps"]][-3:] == ["release", "rollout", "promote"]
    assert run["params"]["since"] and run["params"]["labeler"]["sensor"]["gain"] == 0.5
    assert all(s["status"] == "succeeded" for s in run["steps"])
    directory = Path(document["directory"])
    assert (directory / "result.json").is_file() and (directory / "edgeops.db").is_file()
    assert directory.parent == isolated_environment / "demo"
    assert _left_after(marker) == []


def test_interrupted_demo_stops_every_child_process() -> None:
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [str(BIN / "edgeops"), "demo", "--devices", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "EDGEOPS_TEST_MARKER": marker, "COLUMNS": "200"},
        preexec_fn=sigint_as_in_a_terminal,
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "devices online" in line or not line:
            break
    assert any("2 devices online" in line for line in lines), "".join(lines)
    assert len(_processes_with_marker(marker)) >= 4  # demo, broker, two simulator workers
    process.send_signal(signal.SIGINT)
    # keep reading: a demo blocked on a full stdout pipe could not finish stopping
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(lines) + rest
    assert _left_after(marker) == []
