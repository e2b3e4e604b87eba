"""`edgeops hub serve`: migrations, MQTT bridge and HTTP API in one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.clitools import BIN, run_cli

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_hub_serve_lists_an_agent_that_connected(
    mosquitto_url: str, isolated_environment: Path
) -> None:
    port = _free_port()
    env = {**os.environ, "EDGEOPS_MQTT_URL": mosquitto_url}
    made = run_cli("edgeops", "tokens", "create", "--role", "viewer", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    hub = subprocess.Popen(
        [str(BIN / "edgeops"), "hub", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    agent = subprocess.Popen(
        [str(BIN / "edgeops-agent"), "run", "--device-id", "served-1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        devices: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not devices:
            try:
                devices = [d for d in _get(f"{base}/devices", token) if d["online"]]
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
                continue
            time.sleep(0.2)
        assert [d["device_id"] for d in devices] == ["served-1"]
        assert _get(f"{base}/devices/served-1", token)["agent_version"] == "0.1.0"
        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(f"{base}/devices/nobody", token)
        assert missing.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            _get(f"{base}/devices")
        assert anonymous.value.code == 401
        assert _get(f"{base}/health")["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        assert 'edgeops_devices{presence="online"} 1.0' in metrics, metrics[:2000]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert page.url.endswith("/login")  # the dashboard asks for a token first
    finally:
        agent.terminate()
        agent.wait(timeout=20)
        hub.send_signal(signal.SIGINT)
        hub.wait(timeout=30)
    assert hub.returncode == 0, hub.stderr.read() if hub.stderr else ""
    assert (isolated_environment / "edgeops.db").is_file()
