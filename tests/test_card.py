"""The model card: lossless JSON round trip, strict parsing, Markdown for people."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from device_agent.card import (
    CARD_SCHEMA_VERSION,
    CardError,
    Firmware,
    ModelCard,
    Quantization,
    TensorQuantization,
    TensorSpec,
)


def card_document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "schema": CARD_SCHEMA_VERSION,
        "model_id": "m-0123456789ab",
        "version": "4",
        "name": "digits-cnn",
        "task": "classification",
        "runtime": "tflm",
        "quantization": {
            "mode": "int8",
            "input": {"scale": 0.0625, "zero_point": -128, "dtype": "int8"},
            "output": {"scale": 0.00390625, "zero_point": -128, "dtype": "int8"},
        },
        "input_spec": {"name": "serving_input", "shape": [1, 8, 8, 1], "dtype": "int8"},
        "output_spec": {"name": "Identity", "shape": [None, 10], "dtype": "int8"},
        "op_set": ["CONV_2D", "FULLY_CONNECTED", "SOFTMAX"],
        "arena_bytes": 12288,
        "flash_bytes": 20480,
        "preprocessing": {"input_shape": [64], "offset": [0.0], "scale": [0.0625]},
        "reference": {
            "feature_edges": [[0.1, 0.5], [0.2, 0.7]],
            "feature_counts": [[3, 4, 5], [1, 2, 3]],
            "class_counts": [5] * 10,
        },
        "test_vectors": [{"input": [[[[1], [2]]]], "expected_output": [[-128, 127]]}],
        "metrics": {"accuracy": 0.9733, "size_bytes": 20480},
        "lineage": {"dataset_version": "ab" * 32, "parent_id": "m-ba9876543210"},
        "min_agent_version": "0.1.0",
    }
    document.update(changes)
    return document


def test_round_trip_keeps_every_field_and_unknown_ones() -> None:
    document = card_document(
        future_field={"nested": [1, 2]}, signed_by="ci", reference={"later": True}
    )
    card = ModelCard.from_dict(document)
    assert card.extra == {"future_field": {"nested": [1, 2]}, "signed_by": "ci"}
    assert card.to_dict() == document
    assert ModelCard.from_json(card.to_json()).to_dict() == document
    assert card.quantization.input == TensorQuantization(0.0625, -128, "int8")
    assert card.output_spec.shape == [None, 10]


def test_round_trip_shares_nothing_with_the_source_document() -> None:
    document = card_document()
    card = ModelCard.from_dict(document)
    document["metrics"]["accuracy"] = 0.0
    document["test_vectors"][0]["input"] = []
    assert card.metrics["accuracy"] == 0.9733
    assert card.test_vectors[0]["input"] == [[[[1], [2]]]]


def test_card_can_be_built_from_json_shaped_parts() -> None:
    card = ModelCard(
        model_id="",
        version="",
        name="motions-cnn1d",
        task="classification",
        runtime="litert",
        quantization={"mode": "float16"},  # type: ignore[arg-type]
        input_spec={"name": "x", "shape": [None, 100, 6], "dtype": "float32"},  # type: ignore[arg-type]
        output_spec=TensorSpec("y", [None, 4], "float32"),
    )
    assert card.quantization == Quantization("float16")
    assert card.input_spec == TensorSpec("x", [None, 100, 6], "float32")
    assert ModelCard.from_dict(card.to_dict()) == card


def test_parts_take_numpy_numbers_and_tflite_dynamic_dimensions() -> None:
    spec = TensorSpec("x", [np.int64(-1), np.int32(8), None], "float32")
    assert spec.shape == [None, 8, None]
    assert (
        json.dumps(spec.to_dict()) == '{"name": "x", "shape": [null, 8, null], "dtype": "float32"}'
    )
    q = TensorQuantization(np.float32(0.5), np.int64(-128), "int8")
    assert (type(q.scale), type(q.zero_point)) == (float, int)
    with pytest.raises(CardError, match="tensor 'x': shape must hold integers or null"):
        TensorSpec("x", ["batch", 8], "float32")  # type: ignore[list-item]


def test_markdown_states_the_key_facts() -> None:
    markdown = ModelCard.from_dict(card_document(extra_note="kept")).to_markdown()
    for fact in (
        "# Model card: digits-cnn v4",
        "m-0123456789ab",
        "tflm",
        "int8",
        "`serving_input` int8 [1, 8, 8, 1]",
        "`Identity` int8 [?, 10]",
        "12,288",
        "20,480",
        "`CONV_2D`",
        "| accuracy | 0.9733 |",
        "| zero point |",
        "0.0625",
        "| dataset_version | " + "ab" * 32,
        "| parent_id | m-ba9876543210 |",
        "2 feature histograms",
        "class histogram over 10 classes",
        "| test vectors | 1 |",
        "extra_note",
    ):
        assert fact in markdown, fact


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"runtime": "tensorrt"},
            "field 'runtime' must be one of keras, litert, onnx, tflm, firmware",
        ),
        ({"schema": 2}, "field 'schema' must be 1, got 2"),
        ({"name": None}, "field 'name' must be a string, got null"),
        ({"arena_bytes": -1}, "field 'arena_bytes' must be a non-negative integer"),
        ({"flash_bytes": True}, "field 'flash_bytes' must be a non-negative integer"),
        ({"op_set": ["CONV_2D", 3]}, "field 'op_set' must be a list of strings"),
        ({"quantization": {"mode": "int4"}}, "quantization: field 'mode' must be one of"),
        (
            {
                "quantization": {
                    "mode": "int8",
                    "input": {"scale": 0, "zero_point": 0, "dtype": "i"},
                }
            },
            "quantization.input: field 'scale' must be a positive number",
        ),
        (
            {"input_spec": {"name": "x", "shape": [1, "8"], "dtype": "f"}},
            "input_spec: field 'shape'",
        ),
        ({"output_spec": "Identity"}, "field 'output_spec' must be an object, got a string"),
        ({"test_vectors": [{"input": [1]}]}, "test_vectors[0]: missing field 'expected_output'"),
        ({"metrics": [0.9]}, "field 'metrics' must be an object, got a list"),
    ],
)
def test_malformed_cards_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CardError) as error:
        ModelCard.from_dict(card_document(**change))
    assert message in str(error.value)


def firmware_document(**changes: Any) -> dict[str, Any]:
    firmware: dict[str, Any] = {
        "target": "mps2-an385",
        "arena_bytes": 1536,
        "constant_bytes": 5210,
        "text_bytes": 4100,
        "rodata_bytes": 5240,
        "data_bytes": 0,
        "bss_bytes": 1536,
        "flash_bytes": 9340,
        "ram_bytes": 1536,
        "instructions_per_inference": 181234,
        "tflm_arena_bytes": 3720,
        "measured_with": "arm-none-eabi-size, qemu-system-arm -icount",
    }
    firmware.update(changes)
    return card_document(runtime="firmware", arena_bytes=1536, flash_bytes=9340, firmware=firmware)


def test_firmware_record_round_trips_with_unknown_fields() -> None:
    document = firmware_document(board_revision="c")
    card = ModelCard.from_dict(document)
    assert card.firmware is not None and card.firmware.target == "mps2-an385"
    assert card.firmware.instructions_per_inference == 181234
    assert card.firmware.extra == {"board_revision": "c"}
    assert card.to_dict() == document
    assert ModelCard.from_json(card.to_json()).to_dict() == document
    # a target built by the user's own SDK: only what the generated sources tell
    sources_only = Firmware(target="zephyr", arena_bytes=1536, constant_bytes=5210)
    built = ModelCard.from_dict(card_document(runtime="firmware", firmware=sources_only.to_dict()))
    assert built.firmware == sources_only and built.firmware.flash_bytes is None


def test_cards_without_firmware_write_no_firmware_field() -> None:
    card = ModelCard.from_dict(card_document())
    assert card.firmware is None and "firmware" not in card.to_dict()


def test_markdown_shows_the_firmware_footprint() -> None:
    markdown = ModelCard.from_dict(firmware_document()).to_markdown()
    for fact in (
        "## Firmware",
        "| target | mps2-an385 |",
        "9,340",
        "| instructions per inference | 181,234 |",
    ):
        assert fact in markdown, fact


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (card_document(runtime="firmware"), "field 'firmware' must be an object for runtime"),
        (
            card_document(firmware=firmware_document()["firmware"]),
            "runtime is 'tflm' and firmware is present",
        ),
        (firmware_document(target=""), "firmware: field 'target' must name a firmware target"),
        (firmware_document(arena_bytes=None), "firmware: missing field 'arena_bytes'"),
        (firmware_document(text_bytes=-4), "firmware: field 'text_bytes' must be a non-negative"),
        (
            firmware_document(instructions_per_inference=1.5),
            "field 'instructions_per_inference' must be a non-negative integer",
        ),
        (
            firmware_document(measured_with=3),
            "firmware: field 'measured_with' must be a string, got int",
        ),
        (card_document(runtime="firmware", firmware=[1]), "field 'firmware' must be an object"),
    ],
)
def test_malformed_firmware_records_name_the_field(document: dict[str, Any], message: str) -> None:
    with pytest.raises(CardError) as error:
        ModelCard.from_dict(document)
    assert message in str(error.value)


def test_missing_required_field_is_named() -> None:
    document = card_document()
    del document["input_spec"]
    with pytest.raises(CardError, match="model card: missing field 'input_spec'"):
        ModelCard.from_dict(document)


def test_not_json_and_nan_are_refused() -> None:
    with pytest.raises(CardError, match="not valid JSON"):
        ModelCard.from_json("{")
    card = ModelCard.from_dict(card_document())
    card.metrics["accuracy"] = math.nan
    with pytest.raises(CardError, match="'digits-cnn' cannot be written as JSON"):
        card.to_json()
    assert json.loads(ModelCard.from_dict(card_document()).to_json())["name"] == "digits-cnn"


def test_card_module_needs_only_the_standard_library() -> None:
    code = (
        "import sys, device_agent.card; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'edgeops', 'numpy', 'pydantic', 'sqlmodel', 'tensorflow'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
