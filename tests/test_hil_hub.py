"""The rig's hub (hil.hub.RigHub) and model zoo (hil.models.zoo_models), all real.

One RigHub for the module: its own Mosquitto, SQLite database, TUF repository and hub
threads. The digits MLP is trained, compressed to int8 and released three ways (the float
model and the int8 model for LiteRT, the int8 model as firmware for mps2-an385); a real
``edgeops-agent`` booted on the float release's bundle reports to the hub, a deploy moves
it to the int8 release, and every telemetry window it sent is stored exactly once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.runtime import ModelBundle
from hil.hub import ModelPair, RigHub, RigHubError
from hil.models import ZOO_SHAPES, ZooModelError, zoo_models
from tests.fixtures.mqtt import next_message
from tests.fixtures.trust import AgentProcess, replays_test_vectors

pytestmark = pytest.mark.timeout(300)

FIRMWARE_TARGET = "mps2-an385"


@dataclass
class Released:
    pair: ModelPair
    old: str  # the float model for LiteRT
    new: str  # the int8 model for LiteRT
    firmware: str  # the int8 model as firmware for FIRMWARE_TARGET


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RigHub]:
    with RigHub(tmp_path_factory.mktemp("rig")) as hub:
        yield hub


@pytest.fixture(scope="module")
def released(rig: RigHub) -> Released:
    pair = rig.digits_model(epochs=2)
    assert rig.digits_model(epochs=2) is pair  # made once
    return Released(
        pair,
        old=rig.release(pair.keras_id),
        new=rig.release(pair.int8_id),
        firmware=rig.release(pair.int8_id, runtime="mcu", firmware=FIRMWARE_TARGET),
    )


def _card(rig: RigHub, target_path: str) -> dict[str, Any]:
    from edgeops.trust import card_of

    return card_of(rig.repository.get_target(target_path).custom)


def test_the_hub_runs_on_its_own_broker_and_repository(rig: RigHub) -> None:
    assert rig.broker_url == f"mqtt://127.0.0.1:{rig.broker_port}"
    root = json.loads(rig.trust_root.read_text())
    assert root["signed"]["_type"] == "root" and root["signatures"]
    assert rig.trust_root.is_relative_to(rig.workdir)
    assert sorted(p.name for p in (rig.workdir / "offline-root-keys").iterdir()) == ["root-1.pem"]
    link = MqttLink(MqttEndpoint.parse(rig.broker_url), client_id="test-hil-probe")
    link.start(wait_s=10)
    link.stop()
    with pytest.raises(RigHubError, match="already running"):
        rig.start()


def test_releases_for_litert_and_as_firmware(
    rig: RigHub, released: Released, tmp_path: Path
) -> None:
    pair = released.pair
    assert pair.int8.format == "tflite" and pair.keras.format == "keras"
    assert released.old == f"{pair.keras.name}/{pair.keras.seq}/litert/model.tflite"
    assert released.new == f"{pair.int8.name}/{pair.int8.seq}/litert/model.tflite"
    assert released.firmware == (
        f"{pair.int8.name}/{pair.int8.seq}/mcu/firmware-{FIRMWARE_TARGET}.tar"
    )
    assert _card(rig, released.new)["model_id"] == pair.int8_id
    firmware_card = _card(rig, released.firmware)
    assert firmware_card["runtime"] == "firmware"
    assert firmware_card["firmware"]["target"] == FIRMWARE_TARGET

    elf = rig.firmware_image(released.firmware, tmp_path)
    assert elf == tmp_path / "firmware.elf"
    assert elf.read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(RigHubError, match="not a firmware archive"):
        rig.firmware_image(released.new, tmp_path / "not.elf")
    with pytest.raises(RigHubError, match="not released"):
        rig.release(pair.keras_id, runtime="mcu")  # a float model is no MCU model


def test_release_firmware_signs_any_tflite_under_the_card_given(
    rig: RigHub, released: Released
) -> None:
    pair = released.pair
    card = rig.model_card(pair.int8_id)
    assert card.runtime == "tflm" and card.test_vectors
    tflite = rig.model_tflite(pair.int8_id)
    # the bytes stand for an altered model: what is signed is built from them, under the card
    path = rig.release_firmware(tflite, card, FIRMWARE_TARGET, "altered")
    assert path == f"altered/1/mcu/firmware-{FIRMWARE_TARGET}.tar"
    released_card = _card(rig, path)
    assert released_card["lineage"]["generated_from_sha256"] == hashlib.sha256(tflite).hexdigest()
    assert released_card["model_id"] == pair.int8_id
    assert released_card["test_vectors"] == json.loads(json.dumps(card.to_dict()))["test_vectors"]
    target = rig.repository.get_target(path)
    assert hashlib.sha256(rig.target_bytes(path)).hexdigest() == target.hashes["sha256"]
    with pytest.raises(RigHubError, match="unknown firmware target"):
        rig.release_firmware(tflite, card, "no-such-board", "altered")


def test_bundle_loads_as_a_device_bundle(rig: RigHub, released: Released, tmp_path: Path) -> None:
    bundle = rig.bundle(released.new, tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == ["card.json", "model.tflite"]
    replays_test_vectors(bundle)
    # a firmware target's bundle holds firmware.tar, the name a gateway's slot gives it
    firmware = ModelBundle.load(rig.bundle(released.firmware, tmp_path / "firmware"))
    assert firmware.card.runtime == "firmware" and firmware.model_path.name == "firmware.tar"
    with pytest.raises(RigHubError, match="no bundle"):
        rig.bundle("nothing/9/litert/model.tflite", tmp_path / "missing")


def test_restart_broker_keeps_the_port_and_retained_messages(rig: RigHub) -> None:
    endpoint = MqttEndpoint.parse(rig.broker_url)
    topic = "edgeops/v1/test/retained"
    publisher = MqttLink(endpoint, client_id="test-hil-retain")
    publisher.start(wait_s=10)
    try:
        assert publisher.publish(topic, b"kept", qos=1, retain=True, wait_s=10)
    finally:
        publisher.stop()
    port = rig.broker_port
    rig.restart_broker(down_s=0.2)
    assert rig.broker_port == port
    reader = MqttLink(endpoint, client_id="test-hil-reader")
    reader.subscribe(topic)
    reader.start(wait_s=10)
    try:
        message = next_message(reader, topic, timeout_s=10)
        assert isinstance(message, Message) and message.payload == b"kept"
    finally:
        reader.stop()


def test_an_agent_reports_moves_on_deploy_and_sends_every_window_once(
    rig: RigHub, released: Released, tmp_path: Path
) -> None:
    from device_agent.buffer import OfflineBuffer
    from edgeops.fleet.simulator import samples_for

    device = "rig-1"
    bundle = rig.bundle(released.old, tmp_path / "factory")
    samples = samples_for(rig.datasets, bundle, tmp_path / "samples.npz")
    agent = AgentProcess.provision(
        tmp_path / "device",
        device_id=device,
        mqtt_url=rig.broker_url,
        data_dir=tmp_path / "device-data",
        trust_root=rig.trust_root,
        champion=bundle,
        champion_target=released.old,
        window_seconds=0.5,
        source={"kind": "synthetic", "path": samples, "rate_hz": 40.0},
    )
    agent.start()
    try:
        rig.wait_devices(
            [device],
            lambda s: s["target"] == released.old and bool(s["agent_version"]) and s["online"],
            60,
        )
        assert rig.deploy([device], released.new) == []
        states = rig.wait_devices(
            [device],
            lambda s: s["target"] == released.new and s["update_state"] == "committed",
            90,
        )
        state = states[device]
        assert state["model_id"] == released.pair.int8_id
        assert state["desired_target"] == released.new
        updates = rig.events(device, "update")
        assert [e["detail"]["state"] for e in updates][-1] == "committed"
        assert {e["event"] for e in updates} == {"update"}
        with pytest.raises(RigHubError, match="rig-2"):
            rig.wait_devices([device, "rig-2"], lambda s: True, 0.3)

        # and back through a rollout the running engine carries out
        rollout = rig.rollout(
            released.old, [device], current_model=released.pair.int8_id, name="back", canary=1
        )
        status = rig.wait_rollout(rollout, 90)
        assert status["status"] == "succeeded", status
        assert status["counts"]["succeeded"] == 1
        assert rig.device_state(device)["target"] == released.old
        rig.wait_devices([device], lambda s: len(rig.telemetry_windows(device)) >= 3, 30)
        assert agent.stop() == 0  # closes its window and flushes its buffer
    finally:
        agent.kill9()
    buffer = OfflineBuffer(agent.state_dir / "buffer.sqlite3")
    try:
        last, pending = buffer.last_seq, len(buffer)
    finally:
        buffer.close()
    assert pending == 0
    rig.wait_devices([device], lambda s: not rig.sequence_gaps(device, last), 30)
    windows = rig.telemetry_windows(device)
    assert windows == sorted(set(windows)) and windows[0] >= 1 and windows[-1] <= last
    events = {e["seq"] for e in rig.events(device)}
    assert not events & set(windows)
    assert sorted(events | set(windows)) == list(range(1, last + 1))
    assert rig.telemetry_duplicates(device) == 0
    assert rig.telemetry_replayed(device) == 0
    assert rig.telemetry_stats()["stored"] >= len(windows)


def test_a_rollout_names_known_devices_only(rig: RigHub, released: Released) -> None:
    with pytest.raises(RigHubError, match="'ghost' not found"):
        rig.rollout(released.new, ["ghost"], current_model=None, name="nobody")
    with pytest.raises(RigHubError, match="no device given"):
        rig.rollout(released.new, [], current_model=None, name="nobody")


def test_zoo_models_match_litert() -> None:
    """The six models, from the default cache (made on the first run on a machine: about
    20 s; read back in milliseconds after). TFLM's outputs are compared with LiteRT's
    built-in kernels: with its default XNNPACK delegate the deepest model (mobilenet) is
    up to 3 steps off."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    models = zoo_models(seed=0)
    assert [m.name for m in models] == list(ZOO_SHAPES)
    for model in models:
        assert model.inputs.dtype == np.int8 and model.reference.dtype == np.int8
        assert model.inputs.shape[1:] == model.input_shape and len(model.inputs) == 16
        interpreter = Interpreter(
            model_content=model.tflite,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        target = interpreter.get_output_details()[0]
        assert source["dtype"] == np.int8 and target["dtype"] == np.int8
        outputs = []
        for tensor in model.inputs:
            interpreter.set_tensor(source["index"], tensor.reshape(source["shape"]))
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(target["index"]).reshape(-1))
        litert = np.stack(outputs).astype(np.int16)
        assert litert.shape == model.reference.shape
        assert np.abs(litert - model.reference.astype(np.int16)).max() <= 1, model.name
        assert len(np.unique(model.reference)) > 1, f"{model.name}: constant outputs"


def test_zoo_models_are_cached_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = zoo_models(seed=3, archs=["autoencoder", "mlp"], cache_dir=tmp_path)
    cached = sorted(p.name.split("-seed")[0] for p in (tmp_path / "zoo").glob("*.npz"))
    assert cached == ["autoencoder", "mlp"]
    assert not [p for p in (tmp_path / "zoo").iterdir() if not p.name.endswith(".npz")]

    # warm: read back, nothing converted again
    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("converted again")

    monkeypatch.setattr(sys.modules["edgeops.compress.quantize"], "quantize", refuse)
    again = zoo_models(seed=3, archs=["mlp", "autoencoder"], cache_dir=tmp_path)
    assert [m.name for m in again] == ["mlp", "autoencoder"]
    by_name = {m.name: m for m in models}
    for model in again:
        assert model.tflite == by_name[model.name].tflite
        np.testing.assert_array_equal(model.reference, by_name[model.name].reference)
        np.testing.assert_array_equal(model.inputs, by_name[model.name].inputs)
    with pytest.raises(ZooModelError, match="unknown architecture 'resnet'"):
        zoo_models(archs=["resnet"], cache_dir=tmp_path)


def test_close_stops_the_broker_and_is_safe_twice(tmp_path: Path) -> None:
    from edgeops.broker.mosquitto import port_accepts

    hub = RigHub(tmp_path / "rig").start()
    broker, port = hub.broker, hub.broker_port
    assert port_accepts("127.0.0.1", port)
    hub.close()
    hub.close()
    assert not broker.running and not port_accepts("127.0.0.1", port)
    with pytest.raises(RigHubError, match="not running"):
        hub.telemetry_windows("rig-1")
