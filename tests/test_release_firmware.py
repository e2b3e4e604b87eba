"""``edgeops release MODEL --runtime mcu --firmware TARGET``: the generated firmware as a
signed target.

The session's int8 digits MLP (``model_factory``) is released as firmware with the real
generator, the real Arm toolchain and QEMU where installed, and read back with a real
``tuf.ngclient`` Updater as a device would; its card then goes through the agent's own
contract check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.card import ModelCard
from device_agent.updater.contract import DeviceFacts, check_contract
from device_agent.updater.errors import ContractError
from edgeops.firmware.cortexm import build_id
from edgeops.trust import ReleaseError, card_of
from edgeops.trust.release import build_firmware_release, firmware_archive, target_path
from tests.clitools import assert_one_line_error, run_cli
from tests.fixtures.models import ModelFactory
from tests.test_cli_trust import device_download, edgeops
from tests.test_firmware_cortexm import require_cortex_m_toolchain

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the host gcc")

LIBRARY = ("edgeops_kernels.c", "edgeops_kernels.h", "edgeops_model.c", "edgeops_model.h")


@pytest.fixture(scope="module")
def models(model_factory: Any, int8_model_dir: Path) -> dict[str, Any]:
    """The session's float (Keras) and int8 (.tflite) versions of the digits MLP."""
    listed = model_factory.registry.list_models()
    int8 = [m for m in listed if m.format == "tflite" and m.parent_id == model_factory.keras_ref]
    return {"keras": model_factory.registry.get_model(model_factory.keras_ref), "int8": int8[0]}


@pytest.fixture
def data_dir(isolated_environment: Path, model_factory: ModelFactory, tmp_path: Path) -> Path:
    """The test's data dir: a copy of the session's registry and an initialised repository."""
    model_factory.copy_to(isolated_environment)
    keys = run_cli("edgeops", "keys", "init", "--root-key-dir", str(tmp_path / "offline"))
    assert keys.returncode == 0, keys.stderr
    return isolated_environment


@pytest.fixture(scope="module")
def int8_model(int8_model_dir: Path) -> tuple[bytes, ModelCard]:
    """The int8 .tflite and its card as an ``mcu`` release has it (runtime ``tflm``)."""
    card = ModelCard.from_json((int8_model_dir / "card.json").read_text())
    return (int8_model_dir / "model.tflite").read_bytes(), dataclasses.replace(card, runtime="tflm")


def _members(archive: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        return {member.name: member for member in tar.getmembers()}


def _read(archive: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None
        return extracted.read()


def test_firmware_release_is_a_verified_target_with_its_footprint(
    data_dir: Path, models: dict[str, Any], tmp_path: Path
) -> None:
    require_cortex_m_toolchain()  # the card's footprint and instructions need it
    int8 = models["int8"]
    released = edgeops(
        "release", int8.id, "--runtime", "mcu", "--firmware", "mps2-an385",
        "--hardware", "board=mps2-an385",
    )  # fmt: skip
    path = f"{int8.name}/{int8.seq}/mcu/firmware-mps2-an385.tar"
    assert released["target"] == path and released["runtime"] == "mcu"
    info, archive = device_download(data_dir / "trust", tmp_path / "device", path)
    assert hashlib.sha256(archive).hexdigest() == released["sha256"] == info.hashes["sha256"]
    assert len(archive) == info.length == released["length"]

    prefix = f"{int8.name}-{int8.seq}-mps2-an385/"
    members = _members(archive)
    assert list(members) == sorted(members)
    assert {prefix + name for name in LIBRARY} <= set(members)
    assert all(m.mtime == 0 and m.uid == m.gid == 0 and not m.uname for m in members.values())
    generated = json.loads(_read(archive, prefix + "edgeops_model.json"))
    assert generated["target"] == "mps2-an385"

    card = ModelCard.from_dict(card_of(info.custom))
    firmware = card.firmware
    assert card.runtime == "firmware" and firmware is not None
    assert firmware.target == "mps2-an385" and card.model_id == int8.id
    assert card.arena_bytes == firmware.arena_bytes == generated["arena_bytes"]
    assert firmware.tflm_arena_bytes is not None
    assert 0 < firmware.arena_bytes <= firmware.tflm_arena_bytes
    assert card.lineage["artifact_sha256"] == released["sha256"]
    assert released["firmware"] == firmware.to_dict()
    elf = _read(archive, prefix + "firmware.elf")
    assert elf[:4] == b"\x7fELF"
    # the shipped image is the serial harness's, built from the archive's own library
    library = tmp_path / "library"
    library.mkdir()
    for name in LIBRARY:
        (library / name).write_bytes(_read(archive, prefix + name))
    identity = build_id(library, "mps2-an385")
    assert b'{"harness":"edgeops-serial","build_id":"' + identity.encode() + b'"' in elf
    assert b"edgeops_inputs.bin" not in elf  # not the semihosting harness
    assert firmware.flash_bytes and firmware.flash_bytes > 0
    assert card.flash_bytes == firmware.flash_bytes
    assert firmware.ram_bytes and firmware.ram_bytes >= firmware.arena_bytes
    assert firmware.text_bytes and firmware.rodata_bytes
    assert firmware.instructions_per_inference and firmware.instructions_per_inference > 0
    assert "qemu-system-arm -icount" in firmware.measured_with
    assert info.custom["edgeops"]["hardware"] == {"board": ["mps2-an385"]}

    # a Linux agent (LiteRT, ONNX Runtime) and an agent driving a TFLM board never take it
    for runtimes in ({"litert", "onnx"}, {"litert", "mcu"}):
        facts = DeviceFacts(hardware={"board": "mps2-an385"}, runtimes=runtimes)
        with pytest.raises(ContractError) as refused:
            check_contract(info.custom, facts)
        assert refused.value.kind == "runtime"
        assert "firmware" in str(refused.value)
    listed = edgeops("releases", "list")
    assert [(r["target"], r["runtime"], r["model_id"]) for r in listed] == [(path, "mcu", int8.id)]


def test_firmware_release_errors_are_one_line_and_publish_nothing(
    data_dir: Path, models: dict[str, Any]
) -> None:
    keras, int8 = models["keras"], models["int8"]
    unknown = run_cli("edgeops", "release", int8.id, "--runtime", "mcu", "--firmware", "tpu")
    assert_one_line_error(unknown, "unknown firmware target 'tpu'", "mps2-an385", "zephyr")
    wrong_runtime = run_cli("edgeops", "release", int8.id, "--firmware", "zephyr")
    assert_one_line_error(wrong_runtime, "runtime mcu, not litert")
    float_model = run_cli(
        "edgeops", "release", keras.id, "--runtime", "mcu", "--firmware", "mps2-an385",
        timeout=600,
    )  # fmt: skip
    assert_one_line_error(float_model, "not a full-int8", "quantization none")
    assert float_model.returncode == 1
    assert edgeops("releases", "list") == []
    shown = edgeops("keys", "show")
    assert shown["roles"]["targets"]["version"] == 1 and shown["targets"] == 0


def test_a_target_built_with_its_own_sdk_records_what_the_sources_tell(
    int8_model: tuple[bytes, ModelCard],
) -> None:
    tflite, card = int8_model
    released, archive = build_firmware_release(tflite, card, "zephyr", prefix="m-1-zephyr")
    _, archive_again = build_firmware_release(tflite, card, "zephyr", prefix="m-1-zephyr")
    assert archive == archive_again  # deterministic: the same model gives the same bytes
    firmware = released.firmware
    assert released.runtime == "firmware" and firmware is not None
    assert firmware.target == "zephyr" and firmware.arena_bytes > 0
    assert firmware.constant_bytes and firmware.constant_bytes > 64 * 64  # the first layer
    assert firmware.flash_bytes is None and firmware.instructions_per_inference is None
    assert released.flash_bytes is None and released.arena_bytes == firmware.arena_bytes
    assert "generated sources" in firmware.measured_with
    assert {f"m-1-zephyr/{name}" for name in LIBRARY} <= set(_members(archive))
    assert ModelCard.from_json(released.to_json()) == released


def test_firmware_too_big_for_its_target_is_refused_in_one_line(
    int8_model: tuple[bytes, ModelCard],
) -> None:
    """A fully connected layer of 1 MiB of int8 weights does not fit ESP-IDF's 768 KiB app."""
    with pytest.raises(ReleaseError) as refused:
        build_firmware_release(_big_int8_model(), int8_model[1], "esp-idf", prefix="big")
    message = str(refused.value)
    assert "\n" not in message and "as firmware for esp-idf" in message
    assert "does not fit the flash of target esp-idf" in message


def _big_int8_model() -> bytes:
    from edgeops._tf import load_tf

    tf, keras = load_tf()
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(16384)(inputs))
    spec = tf.TensorSpec((1, 64), tf.float32)
    function = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], model
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rows = np.random.default_rng(0).normal(0.0, 1.0, (8, 1, 64)).astype(np.float32)
    converter.representative_dataset = lambda: ([row] for row in rows)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def test_target_paths_stay_as_they_were_and_name_the_firmware_target() -> None:
    assert target_path("digits-mlp", 3, "mcu") == "digits-mlp/3/mcu/model.tflite"
    assert target_path("digits-mlp", 3, "litert") == "digits-mlp/3/litert/model.tflite"
    assert (
        target_path("digits-mlp", 3, "mcu", firmware="mps2-an386")
        == "digits-mlp/3/mcu/firmware-mps2-an386.tar"
    )
    with pytest.raises(ReleaseError, match="firmware is released for runtime mcu, not onnx"):
        target_path("digits-mlp", 3, "onnx", firmware="zephyr")
    with pytest.raises(ReleaseError, match="unknown firmware target 'rp2040'; targets: "):
        target_path("digits-mlp", 3, "mcu", firmware="rp2040")


def test_archive_bytes_depend_only_on_the_files() -> None:
    files = {"b/x.c": (b"int x;\n", 0o644), "a/run.sh": (b"#!/bin/sh\n", 0o755)}
    archive = firmware_archive(files)
    assert archive == firmware_archive(dict(reversed(list(files.items()))))
    members = _members(archive)
    assert list(members) == ["a/run.sh", "b/x.c"]
    assert members["a/run.sh"].mode == 0o755 and members["b/x.c"].mode == 0o644
    assert _read(archive, "b/x.c") == b"int x;\n"
