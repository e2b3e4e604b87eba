"""The agent daemon against a real Mosquitto: identity, retained state, presence, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.protocol import Channel, Presence, StateReport, decode, device_topic
from tests.clitools import BIN


@pytest.fixture
def watcher(mosquitto_url: str) -> Iterator[MqttLink]:
    link = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="test-watcher")
    link.subscribe("edgeops/v1/dev/#")
    link.start(wait_s=10)
    yield link
    link.stop()


def _start_agent(url: str, device_id: str, data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "edgeops-agent"), "run", "--device-id", device_id, "--mqtt-url", url,
         "--data-dir", str(data_dir), "--log-json", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip


def _next_doc(link: MqttLink, device_id: str, channel: Channel, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    topic = device_topic(device_id, channel)
    while time.monotonic() < deadline:
        event = link.get(timeout_s=0.1)
        if isinstance(event, Message) and event.topic == topic:
            return decode(channel, event.payload)
    raise AssertionError(f"nothing on {topic} within {timeout}s")


def _wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_agent_publishes_presence_and_state_and_goes_offline_on_sigterm(
    mosquitto_url: str, watcher: MqttLink, isolated_environment: Path
) -> None:
    agent = _start_agent(mosquitto_url, "unit-1", isolated_environment, "--tags", "board=rpi4")
    try:
        presence = _next_doc(watcher, "unit-1", Channel.PRESENCE)
        assert presence == Presence("unit-1", online=True, ts=presence.ts)
        state = _next_doc(watcher, "unit-1", Channel.STATE)
        assert isinstance(state, StateReport)
        assert state.hardware["board"] == "rpi4" and "arch" in state.hardware
        assert state.extra["runtimes"] == ["litert", "onnx"]  # the agent extra has both
        health = isolated_environment / "agents" / "unit-1" / "health.json"
        _wait_until(
            lambda: health.is_file() and json.loads(health.read_text())["status"] == "connected"
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
    offline = _next_doc(watcher, "unit-1", Channel.PRESENCE)
    assert offline.online is False
    assert json.loads(health.read_text())["status"] == "stopped"


def test_retained_state_reaches_a_late_subscriber(
    mosquitto_url: str, watcher: MqttLink, isolated_environment: Path
) -> None:
    agent = _start_agent(mosquitto_url, "unit-2", isolated_environment)
    try:
        _next_doc(watcher, "unit-2", Channel.STATE)
        late = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="late")
        late.subscribe(device_topic("unit-2", Channel.STATE))
        late.start(wait_s=10)
        try:
            assert _next_doc(late, "unit-2", Channel.STATE).device_id == "unit-2"
        finally:
            late.stop()
    finally:
        agent.terminate()
        agent.wait(timeout=20)


def test_killed_agent_is_reported_offline_by_its_last_will(
    mosquitto_url: str, watcher: MqttLink, isolated_environment: Path
) -> None:
    agent = _start_agent(mosquitto_url, "unit-3", isolated_environment)
    assert _next_doc(watcher, "unit-3", Channel.PRESENCE).online
    agent.kill()
    agent.wait(timeout=10)
    # the broker notices the dead TCP connection at once (RST) and publishes the will
    assert _next_doc(watcher, "unit-3", Channel.PRESENCE, timeout=60).online is False


def test_desired_state_is_kept_and_malformed_desired_dropped(
    mosquitto_url: str, watcher: MqttLink, isolated_environment: Path
) -> None:
    agent = _start_agent(mosquitto_url, "unit-4", isolated_environment)
    state_dir = isolated_environment / "agents" / "unit-4"
    try:
        _next_doc(watcher, "unit-4", Channel.STATE)
        topic = device_topic("unit-4", Channel.DESIRED)
        watcher.publish(topic, b"{definitely not json", wait_s=5)
        desired = {"schema": 1, "type": "desired", "release": "r-42", "future": True}
        watcher.publish(topic, json.dumps(desired).encode(), retain=True, wait_s=5)
        _wait_until(lambda: (state_dir / "desired.json").is_file())
        assert json.loads((state_dir / "desired.json").read_text()) == desired
        assert agent.poll() is None  # malformed input is never fatal
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    health = json.loads((state_dir / "health.json").read_text())
    assert health["dropped_messages"] == {"desired": 1}
    watcher.publish(device_topic("unit-4", Channel.DESIRED), b"", retain=True, wait_s=5)


def test_agent_reconnects_after_a_broker_restart(
    mosquitto: Any, watcher: MqttLink, isolated_environment: Path
) -> None:
    agent = _start_agent(mosquitto.url, "unit-5", isolated_environment)
    try:
        _next_doc(watcher, "unit-5", Channel.STATE)
        mosquitto.stop()
        mosquitto.start()
        assert watcher.wait_connected(60)
        # the broker may replay the retained will of the old connection first; after
        # reconnecting, the agent announces itself online again
        deadline = time.monotonic() + 60
        while not _next_doc(watcher, "unit-5", Channel.PRESENCE, timeout=60).online:
            assert time.monotonic() < deadline, "agent never came back online"
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
