"""Shadow mode (acceptance): a challenger named by the desired state runs beside the champion
on the same inputs; the application only ever gets the champion's answers; each window
reports the agreement and the challenger's latencies.

- a challenger identical to the champion agrees on every sample (100 %);
- one trained on permuted labels (digits, label k learnt as k+1 mod 10) agrees rarely.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.link import MqttLink
from device_agent.protocol import Channel, device_topic
from tests.test_daemon_inference import (
    _post,
    next_payloads,
    running_daemon,
    settings_for,
    wait_until,
)

DEVICE = "shadow-1"
WINDOW = 100


@pytest.fixture
def watcher(mosquitto_url: str) -> Iterator[MqttLink]:
    from device_agent.link import MqttEndpoint

    link = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="shadow-watcher")
    link.subscribe("edgeops/v1/dev/#")
    link.start(wait_s=10)
    yield link
    link.stop()


@pytest.fixture(scope="module")
def permuted_model_dir(model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP trained with every label k replaced by (k + 1) mod 10."""
    from edgeops.train import TrainService

    arrays = model_factory.datasets.load("digits")
    x = np.concatenate([arrays.x_train, arrays.x_val, arrays.x_test]).astype(np.float32)
    y = np.concatenate([arrays.y_train, arrays.y_val, arrays.y_test]).astype(np.int64)
    npz = tmp_path_factory.mktemp("permuted") / "digits-permuted.npz"
    np.savez(npz, x=x, y=(y + 1) % 10)
    model_factory.datasets.import_file(
        npz, name="digits-permuted", label_column=None, features="standardize"
    )
    version = TrainService(model_factory.datasets, model_factory.registry).train(
        "digits-permuted", "mlp", epochs=4, seed=0, progress=False, evaluate_on_runtime=False
    )
    return Path(model_factory.bundle(version.id, "tflite", "permuted"))


def _desired(watcher: MqttLink, challenger: dict[str, str] | None) -> None:
    document = {"schema": 1, "type": "desired", "challenger": challenger}
    topic = device_topic(DEVICE, Channel.DESIRED)
    assert watcher.publish(topic, json.dumps(document).encode(), retain=True, wait_s=5)


def _model_id(bundle: Path) -> str:
    return str(json.loads((bundle / "card.json").read_text())["model_id"])


def _window_of(watcher: MqttLink, challenger_id: str) -> dict[str, Any]:
    """The next telemetry window whose every sample ran beside ``challenger_id``."""
    return next_payloads(
        watcher,
        device_topic(DEVICE, Channel.TELEMETRY),
        lambda d: (
            bool(d.get("shadow"))
            and d["shadow"]["model_id"] == challenger_id
            and d["shadow"]["samples"] == d["samples"] == WINDOW
        ),
    )


def test_identical_challenger_agrees_fully_and_permuted_one_rarely(
    mosquitto_url: str,
    watcher: MqttLink,
    int8_model_dir: Path,
    permuted_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    isolated_environment: Path,
) -> None:
    x, _ = digits_samples
    batch = {"instances": [[float(v) for v in row] for row in x[:WINDOW]]}
    champion_id = _model_id(int8_model_dir)
    permuted_id = _model_id(permuted_model_dir)
    settings = settings_for(
        mosquitto_url,
        isolated_environment,
        DEVICE,
        int8_model_dir,
        window_samples=WINDOW,
        window_seconds=0,
        source={"kind": "http", "port": 0},
    )
    models = settings.challenger_dir
    models.mkdir(parents=True)
    shutil.copytree(int8_model_dir, models / "same")
    shutil.copytree(permuted_model_dir, models / "permuted")
    events = device_topic(DEVICE, Channel.EVENTS)

    with running_daemon(settings) as daemon:
        wait_until(lambda: daemon.source is not None, what="source open")
        url = f"http://127.0.0.1:{daemon.source.port}/v1/predict"  # type: ignore[union-attr]

        _desired(watcher, {"model_id": champion_id, "path": "same"})
        started = next_payloads(watcher, events, lambda d: d["event"] == "challenger_started")
        assert started["detail"]["model_id"] == champion_id
        status, answer = _post(url, batch)
        assert status == 200
        champion_labels = [p["label"] for p in answer["predictions"]]
        assert {p["model_id"] for p in answer["predictions"]} == {champion_id}
        same = _window_of(watcher, champion_id)["shadow"]
        assert same["agreement"] == 1.0
        assert same["latency_ms"]["p50"] is not None

        _desired(watcher, {"model_id": permuted_id, "path": "permuted"})
        next_payloads(watcher, events, lambda d: d["event"] == "challenger_stopped")
        next_payloads(watcher, events, lambda d: d["event"] == "challenger_started")
        state = next_payloads(
            watcher,
            device_topic(DEVICE, Channel.STATE),
            lambda d: d["slots"].get("challenger", {}).get("model_id") == permuted_id,
        )
        assert state["slots"]["champion"]["model_id"] == champion_id
        status, answer = _post(url, batch)
        assert status == 200
        # the challenger's outputs never reach the application
        assert [p["label"] for p in answer["predictions"]] == champion_labels
        assert {p["model_id"] for p in answer["predictions"]} == {champion_id}
        permuted = _window_of(watcher, permuted_id)["shadow"]
        assert permuted["agreement"] < 0.3, permuted
        assert permuted["latency_ms"]["p95"] is not None

        _desired(watcher, None)
        stopped = next_payloads(watcher, events, lambda d: d["event"] == "challenger_stopped")
        assert stopped["detail"]["model_id"] == permuted_id
        wait_until(lambda: daemon.challenger is None, what="challenger gone")
    _desired(watcher, None)


@pytest.mark.parametrize(
    ("challenger", "needle"),
    [
        ({"model_id": "m-x", "path": "../../outside"}, "outside the models dir"),
        ({"model_id": "m-x", "path": "missing"}, "missing"),
        ({"model_id": 7, "path": "same"}, "model_id"),
        ("not-an-object", "must be an object"),
    ],
)
def test_a_bad_challenger_is_refused_with_an_event(
    mosquitto_url: str,
    watcher: MqttLink,
    int8_model_dir: Path,
    isolated_environment: Path,
    challenger: Any,
    needle: str,
) -> None:
    settings = settings_for(mosquitto_url, isolated_environment, DEVICE, int8_model_dir)
    with running_daemon(settings) as daemon:
        document = {"schema": 1, "type": "desired", "challenger": challenger}
        topic = device_topic(DEVICE, Channel.DESIRED)
        watcher.publish(topic, json.dumps(document).encode(), retain=True, wait_s=5)
        failed = next_payloads(
            watcher,
            device_topic(DEVICE, Channel.EVENTS),
            lambda d: d["event"] == "model_load_failed",
        )
        assert failed["detail"]["role"] == "challenger"
        assert needle in failed["detail"]["error"], failed
        assert daemon.challenger is None and daemon.champion is not None
    _desired(watcher, None)
