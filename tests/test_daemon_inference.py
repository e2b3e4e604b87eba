"""The agent daemon end to end: a model bundle, a source, windows through the offline buffer
and a real Mosquitto into the hub's telemetry table; SIGTERM flushes; bad input is counted.

The agent runs as a separate process (``edgeops-agent run --config``) where the test sends it
signals, and in this process (:func:`running_daemon`) where the test needs its objects (the
port of an HTTP source). The hub side is the real bridge over a real database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.buffer import OfflineBuffer
from device_agent.config import AgentSettings
from device_agent.daemon import AgentDaemon
from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.protocol import Channel, StateReport, decode, device_topic
from device_agent.telemetry import TelemetryWindow
from tests.clitools import BIN

# -- helpers shared with test_shadow.py and test_outage.py -------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def write_config(path: Path, **values: Any) -> Path:
    """An agent.toml with ``values`` (a dict value becomes an inline table)."""
    path.write_text("".join(f"{key} = {toml_value(v)}\n" for key, v in values.items()))
    return path


_AGENT_LOGS: dict[int, Path] = {}


def start_agent(config: Path) -> subprocess.Popen[str]:
    """``edgeops-agent run --config``; its log goes to ``<config>.log`` (a pipe could fill)."""
    log_path = config.with_suffix(".log")
    with log_path.open("w") as log_file:
        agent = subprocess.Popen(
            [str(BIN / "edgeops-agent"), "run", "--config", str(config), "--log-json"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
            env=dict(os.environ),
        )
    _AGENT_LOGS[agent.pid] = log_path
    return agent


def stop_agent(agent: subprocess.Popen[str], timeout: float = 60) -> int:
    """SIGTERM, then the exit code; no traceback may appear in the agent's log."""
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
    try:
        code = agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
        raise
    stderr = agent.stderr.read() if agent.stderr else ""
    log_path = _AGENT_LOGS.pop(agent.pid, None)
    if log_path is not None:
        stderr += log_path.read_text()
    assert "Traceback" not in stderr, stderr
    return code


def wait_until(predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout}s: {what or predicate}")


def read_health(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "health.json").read_text()))
    except (OSError, ValueError):
        return {}


@contextmanager
def running_daemon(settings: AgentSettings) -> Iterator[AgentDaemon]:
    """The daemon's loop on a thread of this process; stopped (and flushed) at the end."""
    daemon = AgentDaemon(settings)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="daemon-under-test")
    thread.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the daemon did not stop"
        assert not failure, failure


class Hub:
    """The hub's bridge on a thread, recording telemetry into a real database."""

    def __init__(self, mosquitto_url: str, database: Any) -> None:
        from edgeops.fleet import FleetService
        from edgeops.hub import HubBridge
        from edgeops.monitor import TelemetryService

        self.telemetry = TelemetryService(database)
        self.bridge = HubBridge(
            MqttEndpoint.parse(mosquitto_url), FleetService(database), telemetry=self.telemetry
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.bridge.run, args=(self._stop,), daemon=True)

    def start(self) -> None:
        self.bridge.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.bridge.stop()

    def windows(self, device_id: str) -> list[TelemetryWindow]:
        views = self.telemetry.list_windows(device_id, limit=100_000)
        return [view.document() for view in views]


@pytest.fixture
def hub(mosquitto_url: str, database: Any) -> Iterator[Hub]:
    hub = Hub(mosquitto_url, database)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def watcher(mosquitto_url: str) -> Iterator[MqttLink]:
    link = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="test-watcher")
    link.subscribe("edgeops/v1/dev/#")
    link.start(wait_s=10)
    yield link
    link.stop()


def next_payloads(
    link: MqttLink, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """The first JSON payload on ``topic`` that satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        event = link.get(timeout_s=remaining)
        if isinstance(event, Message) and event.topic == topic and event.payload:
            document = json.loads(event.payload)
            if predicate(document):
                return dict(document)
    raise AssertionError(f"no matching message on {topic} within {timeout}s")


def settings_for(
    mosquitto_url: str, data_dir: Path, device_id: str, model_dir: Path | None, **values: Any
) -> AgentSettings:
    return AgentSettings(
        device_id=device_id,
        mqtt_url=mosquitto_url,
        data_dir=data_dir,
        model_dir=model_dir,
        heartbeat_s=0.2,
        **values,
    )


def samples_npz(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    if y is None:
        np.savez(path, x=x)
    else:
        np.savez(path, x=x, y=y)
    return path


# -- tests ------------------------------------------------------------------------------------


def test_file_source_windows_reach_the_hub_telemetry_table(
    hub: Hub,
    mosquitto_url: str,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    isolated_environment: Path,
) -> None:
    x, y = digits_samples
    x, y = x[:230], y[:230]
    config = write_config(
        tmp_path / "agent.toml",
        device_id="edge-1",
        mqtt_url=mosquitto_url,
        data_dir=isolated_environment,
        model_dir=int8_model_dir,
        window_samples=50,
        window_seconds=0,  # windows close by count; the last, partial one at the end of file
        heartbeat_s=0.2,
        source={"kind": "file", "path": samples_npz(tmp_path / "x.npz", x, y)},
    )
    agent = start_agent(config)
    try:
        wait_until(lambda: len(hub.windows("edge-1")) >= 5, what="5 windows at the hub")
        state_dir = isolated_environment / "agents" / "edge-1"
        wait_until(lambda: read_health(state_dir).get("source_exhausted"), what="end of file")
        assert agent.poll() is None  # the end of the input does not end the daemon
    finally:
        assert stop_agent(agent) == 0
    windows = sorted(hub.windows("edge-1"), key=lambda w: w.seq)
    assert [w.seq for w in windows] == [1, 2, 3, 4, 5]
    assert [w.samples for w in windows] == [50, 50, 50, 50, 30]
    card = json.loads((int8_model_dir / "card.json").read_text())
    assert {w.model_id for w in windows} == {card["model_id"]}
    first = windows[0]
    assert sum(first.class_counts) == 50 and sum(first.confidence_counts) == 50
    # the model inputs in the reference's bins (how many values: telemetry's business)
    reference_bins = [len(edges) + 1 for edges in card["reference"]["feature_edges"]]
    assert [len(f) for f in first.feature_counts] == reference_bins
    assert sum(sum(f) for f in first.feature_counts) > 0
    assert first.latency_ms["p50"] is not None and first.errors == {}
    assert first.dropped_windows == 0 and first.shadow is None


def test_sigterm_closes_the_open_window_and_flushes_the_buffer(
    hub: Hub,
    mosquitto_url: str,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    isolated_environment: Path,
) -> None:
    x, _ = digits_samples
    config = write_config(
        tmp_path / "agent.toml",
        device_id="edge-2",
        mqtt_url=mosquitto_url,
        data_dir=isolated_environment,
        model_dir=int8_model_dir,
        window_samples=1_000_000,  # only the stop closes the window
        window_seconds=0,
        heartbeat_s=0.2,
        source={
            "kind": "file",
            "path": samples_npz(tmp_path / "x.npz", x[:40]),
            "loop": True,
            "rate_hz": 200.0,
        },
    )
    state_dir = isolated_environment / "agents" / "edge-2"
    agent = start_agent(config)
    try:
        wait_until(lambda: read_health(state_dir).get("samples", 0) >= 20, what="20 samples")
    finally:
        assert stop_agent(agent) == 0
    health = read_health(state_dir)
    assert health["status"] == "stopped" and health["buffer_pending"] == 0
    wait_until(lambda: hub.windows("edge-2"), what="the window closed by SIGTERM")
    (window,) = hub.windows("edge-2")
    assert window.seq == 1 and window.samples == health["samples"] >= 20
    buffer = OfflineBuffer(state_dir / "buffer.sqlite3")
    try:
        assert len(buffer) == 0 and buffer.last_seq == 1  # flushed, nothing left on disk
    finally:
        buffer.close()


def test_bad_lines_are_counted_and_the_daemon_keeps_running(
    hub: Hub,
    mosquitto_url: str,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    isolated_environment: Path,
) -> None:
    x, _ = digits_samples
    good = [",".join(f"{v:g}" for v in row) for row in x[:6]]
    lines = [
        good[0],
        "1,2,3",  # 3 values, 64 expected
        good[1],
        "not,a,number," + ",".join(["0"] * 61),
        good[2],
        ",".join(["nan"] + ["0"] * 63),
        good[3],
        good[4],
        good[5],
    ]
    csv_path = tmp_path / "samples.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    config = write_config(
        tmp_path / "agent.toml",
        device_id="edge-3",
        mqtt_url=mosquitto_url,
        data_dir=isolated_environment,
        model_dir=int8_model_dir,
        window_samples=100,
        window_seconds=0,
        heartbeat_s=0.2,
        source={"kind": "file", "path": csv_path},
    )
    state_dir = isolated_environment / "agents" / "edge-3"
    agent = start_agent(config)
    try:
        wait_until(lambda: hub.windows("edge-3"), what="the window closed at the end of file")
        assert agent.poll() is None
    finally:
        assert stop_agent(agent) == 0
    (window,) = hub.windows("edge-3")
    assert window.samples == 6
    assert sum(window.errors.values()) == 3, window.errors
    assert all(kind.startswith("source_") for kind in window.errors), window.errors
    assert read_health(state_dir)["samples"] == 6


def _post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_source_answers_predictions_and_errors_and_health_endpoint_serves(
    mosquitto_url: str,
    watcher: MqttLink,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    isolated_environment: Path,
) -> None:
    x, _ = digits_samples
    settings = settings_for(
        mosquitto_url,
        isolated_environment,
        "edge-4",
        int8_model_dir,
        window_samples=3,
        window_seconds=0,
        health_port=0,
        source={"kind": "http", "port": 0},
    )
    model_id = json.loads((int8_model_dir / "card.json").read_text())["model_id"]
    with running_daemon(settings) as daemon:
        wait_until(lambda: daemon.source is not None and daemon.health_port, what="started")
        url = f"http://127.0.0.1:{daemon.source.port}/v1/predict"  # type: ignore[union-attr]
        status, answer = _post(url, {"inputs": [float(v) for v in x[0]]})
        assert status == 200, answer
        assert answer["model_id"] == model_id and 0 <= answer["label"] < 10
        assert len(answer["probabilities"]) == 10
        status, answer = _post(url, {"inputs": [1.0, 2.0, 3.0]})
        assert status == 400 and "64" in answer["error"]
        status, answer = _post(url, b"{garbage")
        assert status == 400 and answer["error"]
        status, answer = _post(url, {"instances": [[float(v) for v in x[1]], [0.0] * 64]})
        assert status == 200 and len(answer["predictions"]) == 2
        # three predictions close a window: on the wire, with the source's errors counted
        window = next_payloads(
            watcher, device_topic("edge-4", Channel.TELEMETRY), lambda d: d["seq"] == 1
        )
        decoded = decode(Channel.TELEMETRY, json.dumps(window).encode())
        assert isinstance(decoded, TelemetryWindow)
        assert decoded.samples == 3 and sum(decoded.errors.values()) == 2
        status, health = _get(f"http://127.0.0.1:{daemon.health_port}/health")
        assert status == 200 and health["device_id"] == "edge-4"
        assert health["slots"]["champion"]["model_id"] == model_id
        assert _get(f"http://127.0.0.1:{daemon.health_port}/nope")[0] == 404
        state = next_payloads(
            watcher, device_topic("edge-4", Channel.STATE), lambda d: bool(d["slots"])
        )
        assert StateReport.from_dict(state).slots["champion"]["model_id"] == model_id


def test_runtime_input_errors_are_answered_and_counted(
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    isolated_environment: Path,
) -> None:
    """A sample that passed the source but not the runtime (NaN, a short one) is answered
    with an error and counted; the next good sample runs as usual."""
    from device_agent.sources import Sample

    x, _ = digits_samples
    settings = settings_for(
        "mqtt://127.0.0.1:1", isolated_environment, "edge-5", int8_model_dir, window_samples=10
    )
    daemon = AgentDaemon(settings)
    daemon._start_inference(
        settings.model_dir
    )  # the champion, without the loop: the test feeds samples
    try:
        answers: list[dict[str, Any]] = []
        bad = np.full(64, np.nan, dtype=np.float32)
        for raw in (x[0], bad, x[1][:10], x[2]):
            daemon._run_sample(Sample(np.asarray(raw), reply=answers.append))
    finally:
        assert daemon.champion is not None
        daemon.champion.close()
    assert [("error" in a) for a in answers] == [False, True, True, False]
    assert "64" in answers[2]["error"]
    assert daemon.errors == {"input": 2} and daemon.samples_total == 2
    assert daemon.aggregator is not None and daemon.aggregator.samples == 2


def test_a_model_that_does_not_load_is_reported_and_the_agent_stays_up(
    mosquitto_url: str, watcher: MqttLink, tmp_path: Path, isolated_environment: Path
) -> None:
    broken = tmp_path / "broken-bundle"
    broken.mkdir()
    (broken / "card.json").write_text("{not json")
    settings = settings_for(mosquitto_url, isolated_environment, "edge-6", broken)
    with running_daemon(settings):
        event = next_payloads(
            watcher,
            device_topic("edge-6", Channel.EVENTS),
            lambda d: d["event"] == "model_load_failed",
        )
        assert event["schema"] == 1 and event["type"] == "event" and event["seq"] >= 1
        assert event["detail"]["role"] == "champion" and str(broken) in event["detail"]["path"]
        state = next_payloads(watcher, device_topic("edge-6", Channel.STATE), lambda d: True)
        assert state["health"] == "model_error" and state["slots"] == {}


def test_a_corrupt_buffer_is_moved_aside_and_reported(
    mosquitto_url: str, watcher: MqttLink, isolated_environment: Path
) -> None:
    state_dir = isolated_environment / "agents" / "edge-7"
    state_dir.mkdir(parents=True)
    (state_dir / "buffer.sqlite3").write_bytes(b"this is not a database" * 100)
    settings = settings_for(mosquitto_url, isolated_environment, "edge-7", None)
    with running_daemon(settings):
        event = next_payloads(
            watcher,
            device_topic("edge-7", Channel.EVENTS),
            lambda d: d["event"] == "buffer_corruption_recovered",
        )
    assert ".corrupt-" in event["detail"]["moved_to"]
    assert Path(event["detail"]["moved_to"]).is_file()


def test_a_source_that_cannot_open_is_reported_and_the_agent_stays_up(
    mosquitto_url: str,
    watcher: MqttLink,
    int8_model_dir: Path,
    tmp_path: Path,
    isolated_environment: Path,
) -> None:
    missing = tmp_path / "no-such-file.csv"
    settings = settings_for(
        mosquitto_url,
        isolated_environment,
        "edge-8",
        int8_model_dir,
        source={"kind": "file", "path": missing},
    )
    with running_daemon(settings) as daemon:
        event = next_payloads(
            watcher, device_topic("edge-8", Channel.EVENTS), lambda d: d["event"] == "source_failed"
        )
        assert event["detail"]["kind"] == "file" and "no-such-file" in event["detail"]["error"]
        state = next_payloads(watcher, device_topic("edge-8", Channel.STATE), lambda d: True)
        assert "champion" in state["slots"]  # the model stays loaded for the next source
        assert daemon.source is None


def test_stdin_lines_are_answered_as_json_lines_on_stdout(
    mosquitto_url: str,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    isolated_environment: Path,
) -> None:
    x, _ = digits_samples
    config = write_config(
        tmp_path / "agent.toml",
        device_id="edge-9",
        mqtt_url=mosquitto_url,
        data_dir=isolated_environment,
        model_dir=int8_model_dir,
        source={"kind": "stdin"},
    )
    agent = subprocess.Popen(
        [str(BIN / "edgeops-agent"), "run", "--config", str(config), "--log-json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert agent.stdin is not None and agent.stdout is not None
    try:
        agent.stdin.write(" ".join(f"{v:g}" for v in x[0]) + "\n")
        agent.stdin.write("1, 2, oops\n")
        agent.stdin.write(json.dumps([float(v) for v in x[1]]) + "\n")
        agent.stdin.close()  # the end of the input: the daemon answers and keeps running
        answers = [json.loads(agent.stdout.readline()) for _ in range(3)]
        assert agent.poll() is None
    finally:
        assert stop_agent(agent) == 0
    assert 0 <= answers[0]["label"] < 10 and "error" not in answers[0]
    assert "error" in answers[1]
    assert 0 <= answers[2]["label"] < 10


def test_settings_for_inference_from_toml(tmp_path: Path, isolated_environment: Path) -> None:
    from device_agent.errors import ConfigError

    config = write_config(
        tmp_path / "agent.toml",
        device_id="edge-10",
        model_dir="~/bundle",
        window_seconds=0,  # TOML has no null: 0 switches the time bound off
        source={"kind": "http", "port": 8080},
    )
    settings = AgentSettings.load(config)
    assert settings.window_samples == 1000 and settings.window_seconds is None
    assert settings.model_dir == Path("~/bundle").expanduser()
    assert settings.source is not None and settings.source.port == 8080
    assert settings.challenger_dir == settings.state_dir / "models"
    with pytest.raises(ConfigError, match="window_samples and window_seconds"):
        AgentSettings.load(config, window_samples=0)
    write_config(config, device_id="edge-10", source={"kind": "file"})
    with pytest.raises(ConfigError, match="path"):
        AgentSettings.load(config)


def test_the_buffer_bound_drops_the_oldest_and_reports_the_loss(
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    isolated_environment: Path,
) -> None:
    """Offline (no broker) with room for 5 messages: 10 one-sample windows drop the oldest;
    the loss is counted in the next window's ``dropped_windows`` and reported as an event."""
    from device_agent.sources import Sample

    x, _ = digits_samples
    settings = settings_for(
        "mqtt://127.0.0.1:1",
        isolated_environment,
        "edge-11",
        int8_model_dir,
        window_samples=1,
        buffer_max_items=5,
    )
    daemon = AgentDaemon(settings)
    settings.state_dir.mkdir(parents=True)
    daemon._open_buffer()
    daemon._start_inference(settings.model_dir)
    buffer = daemon.buffer
    assert buffer is not None and daemon.champion is not None
    try:
        for raw in x[:10]:
            daemon._run_sample(Sample(np.asarray(raw)))
        rows = buffer.pending(100)
        assert len(rows) == 5 and buffer.dropped_total >= 5
        kinds = [json.loads(row.payload)["type"] for row in rows]
        windows = [json.loads(row.payload) for row in rows if row.topic.endswith("telemetry")]
        assert sum(w["dropped_windows"] for w in windows) >= 1
        assert daemon._drop_event_total > 0  # a buffer_dropped event was written
        assert "telemetry" in kinds
        assert [row.seq for row in rows] == sorted(row.seq for row in rows)
    finally:
        daemon.champion.close()
        buffer.close()


def test_a_paced_source_between_samples_does_not_hold_back_mqtt_messages(
    mosquitto_url: str,
    watcher: MqttLink,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    isolated_environment: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a sample every 20 s and a loop allowed 30 s for samples per turn, a desired state
    published after the first sample is taken long before the second: the loop waits for
    MQTT events until the next sample is due, not inside the source's poll."""
    import device_agent.daemon

    monkeypatch.setattr(device_agent.daemon, "SAMPLE_BUDGET_S", 30.0)
    x, y = digits_samples
    settings = settings_for(
        mosquitto_url,
        isolated_environment,
        "edge-12",
        int8_model_dir,
        window_samples=1000,
        window_seconds=0,
        source={
            "kind": "synthetic",
            "path": samples_npz(tmp_path / "base.npz", x[:20], y[:20]),
            "rate_hz": 0.05,  # the second sample is due 20 s after the first
        },
    )
    state_dir = settings.state_dir
    desired = {"schema": 1, "type": "desired", "note": "while the source is idle"}
    with running_daemon(settings) as daemon:
        try:
            wait_until(lambda: daemon.samples_total >= 1, timeout=60, what="the first sample")
            watcher.publish(
                device_topic("edge-12", Channel.DESIRED),
                json.dumps(desired).encode(),
                retain=True,
                wait_s=5,
            )
            wait_until(
                lambda: (state_dir / "desired.json").is_file(),
                timeout=15,
                what="the desired state taken between two samples",
            )
            assert daemon.samples_total == 1  # taken before the second sample was due
            assert json.loads((state_dir / "desired.json").read_text()) == desired
        finally:
            daemon.stop()
            for _ in range(3):  # the loop may be waiting on the link for the next sample
                daemon.link.nudge()


def test_the_source_opens_when_the_first_champion_arrives_by_an_update(
    int8_model_dir: Path, isolated_environment: Path
) -> None:
    # a device provisioned without a model: nothing to run samples on until a release lands
    settings = AgentSettings(
        device_id="edge-10", data_dir=isolated_environment, source={"kind": "http", "port": 0}
    )
    daemon = AgentDaemon(settings)
    daemon._start_inference(None)
    assert daemon.source is None and daemon.champion is None
    daemon._swap_champion(int8_model_dir)  # what the updater's activation does
    source, champion, bundle = daemon.source, daemon.champion, daemon.champion_bundle
    try:
        assert champion is not None and source is not None and bundle is not None
        assert daemon.source_shape == bundle.rule.input_shape
    finally:
        for opened in (source, champion):
            if opened is not None:
                opened.close()
