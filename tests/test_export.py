"""Export: float .tflite and ONNX that compute what Keras computes, model cards measured on
the target runtime (quantization, op set, arena, test vectors that replay exactly), and
``edgeops export`` writing the artifact and its card as whole files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.card import ModelCard
from edgeops.data import DatasetService, DatasetView
from edgeops.evaluate import load_runner
from edgeops.export import (
    ConversionError,
    UnsupportedExportError,
    build_card,
    export,
    keras_to_onnx,
    keras_to_tflite_float,
    quantization_mode,
)
from edgeops.hub.stores import open_stores
from edgeops.registry import ModelVersionView, Registry
from edgeops.train import TrainService, build_model


@dataclass
class Hub:
    datasets: DatasetService
    registry: Registry
    dataset: DatasetView
    keras_version: ModelVersionView
    model: Any


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from edgeops.train import load_keras

    root = tmp_path_factory.mktemp("edgeops-data")
    with open_stores(f"sqlite:///{root / 'edgeops.db'}", root / "artifacts") as stores:
        datasets, registry = stores.datasets(), stores.registry()
        version = TrainService(datasets, registry).train(
            "digits", "cnn", epochs=3, seed=0, progress=False, evaluate_on_runtime=False
        )
        yield Hub(
            datasets=datasets,
            registry=registry,
            dataset=datasets.resolve("digits"),
            keras_version=version,
            model=load_keras(registry.load_artifact(version.id)),
        )


def test_onnx_export_matches_keras_outputs(hub: Hub) -> None:
    x = hub.datasets.load(hub.dataset.version).model_inputs("test")[:32]
    onnx_bytes = keras_to_onnx(hub.model, check_inputs=x)
    actual = load_runner(onnx_bytes, "onnx").run(x)
    np.testing.assert_allclose(actual, np.asarray(hub.model(x)), atol=1e-4)


@pytest.mark.parametrize(("arch", "shape"), [("cnn1d", (100, 6)), ("ds-cnn", (28, 28, 1))])
def test_onnx_and_float_tflite_of_other_architectures_match_keras(
    arch: str, shape: tuple[int, ...]
) -> None:
    model = build_model(arch, shape, 4, width=0.5, seed=0)
    x = np.random.default_rng(1).random((4, *shape), dtype=np.float32)
    expected = np.asarray(model(x))
    np.testing.assert_allclose(
        load_runner(keras_to_onnx(model, check_inputs=x), "onnx").run(x), expected, atol=1e-4
    )
    np.testing.assert_allclose(
        load_runner(keras_to_tflite_float(model), "tflite").run(x), expected, atol=1e-4
    )


def test_onnx_check_refuses_a_mismatch(hub: Hub) -> None:
    x = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ConversionError, match="disagrees with Keras"):
        keras_to_onnx(hub.model, check_inputs=x, atol=-1.0)


def test_int8_card_holds_quantization_ops_arena_and_replayable_vectors(hub: Hub) -> None:
    from edgeops.compress import quantize

    arrays = hub.datasets.load(hub.dataset.version)
    flatbuffer = quantize(hub.model, "int8", arrays.model_inputs("train"))
    card = build_card(
        name="digits-cnn-int8",
        artifact=flatbuffer,
        format="tflite",
        task="classification",
        feature_rule=hub.dataset.feature_rule,
        reference=hub.dataset.reference,
        sample_inputs=arrays.model_inputs("test"),
        sample_labels=arrays.y_test,
        metrics={"accuracy": 0.9},
        lineage={"parent_id": hub.keras_version.id},
        runtime="tflm",
    )
    assert quantization_mode(flatbuffer, "tflite") == "int8"
    assert card.runtime == "tflm" and card.quantization.mode == "int8"
    assert card.quantization.input is not None and card.quantization.input.dtype == "int8"
    assert card.input_spec.shape[1:] == [8, 8, 1] and card.input_spec.dtype == "int8"
    assert card.output_spec.shape[1:] == [10]
    assert set(card.op_set) == {"CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D", "RESHAPE", "SOFTMAX"}
    assert card.arena_bytes is not None and card.arena_bytes > 0
    assert card.flash_bytes == len(flatbuffer)
    assert card.preprocessing == hub.dataset.feature_rule.to_dict()
    # a device replays the vectors: the stored int8 input gives exactly the stored output
    runner = load_runner(flatbuffer, "tflite")
    assert len(card.test_vectors) == 4
    for vector in card.test_vectors:
        fed = np.asarray(vector["input"], dtype=np.int8)
        np.testing.assert_array_equal(runner.raw(fed), np.asarray(vector["expected_output"]))
    assert ModelCard.from_dict(json.loads(card.to_json())).to_dict() == card.to_dict()


def test_export_writes_float_tflite_onnx_and_cards(hub: Hub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = export(
        hub.keras_version.id, "tflite", out, registry=hub.registry, datasets=hub.datasets
    )
    assert [p.name for p in paths] == [
        "digits-cnn-1.tflite",
        "digits-cnn-1.tflite.card.json",
        "digits-cnn-1.tflite.card.md",
    ]
    card = ModelCard.from_dict(json.loads(paths[1].read_text()))
    assert card.model_id == hub.keras_version.id and card.version == "1"
    assert card.runtime == "litert" and card.quantization.mode == "none"
    assert card.input_spec.dtype == "float32"
    assert card.lineage["source_format"] == "keras"
    assert card.reference["class_counts"] is not None  # the model's output reference
    assert "# Model card" in paths[2].read_text() or "digits-cnn" in paths[2].read_text()
    x = np.asarray(card.test_vectors[0]["input"], dtype=np.float32)
    np.testing.assert_allclose(
        load_runner(paths[0].read_bytes(), "tflite").raw(x),
        np.asarray(card.test_vectors[0]["expected_output"]),
        atol=1e-6,
    )
    onnx_paths = export("digits-cnn", "onnx", out, registry=hub.registry, datasets=hub.datasets)
    assert onnx_paths[0].name == "digits-cnn-1.onnx"
    assert sorted(p.name for p in out.iterdir()) == [
        "digits-cnn-1.onnx",
        "digits-cnn-1.onnx.card.json",
        "digits-cnn-1.onnx.card.md",
        "digits-cnn-1.tflite",
        "digits-cnn-1.tflite.card.json",
        "digits-cnn-1.tflite.card.md",
    ]  # both formats side by side, each with its card; no temp files left behind


def test_onnx_card_metrics_are_measured_with_onnx_runtime_on_the_exported_file(
    hub: Hub, tmp_path: Path
) -> None:
    import onnxruntime as ort

    paths = export("digits-cnn", "onnx", tmp_path, registry=hub.registry, datasets=hub.datasets)
    card = ModelCard.from_dict(json.loads(paths[1].read_text()))
    metrics = card.metrics
    assert metrics["runtime"] == "onnxruntime" and metrics["format"] == "onnx"
    assert metrics["split"] == "test" and metrics["arena_bytes"] is None
    assert metrics["size_bytes"] == paths[0].stat().st_size
    # scored again here, straight on ONNX Runtime with the written file
    arrays = hub.datasets.load(hub.dataset.version)
    x, y = np.asarray(arrays.model_inputs("test"), np.float32), np.asarray(arrays.y_test)
    session = ort.InferenceSession(str(paths[0]), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: x})
    assert metrics["num_samples"] == len(x)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(1) == y)))
    # not the Keras model's figures (the registered version's), which the card used to copy
    assert "tflite_accuracy" not in metrics and hub.keras_version.metrics.get("accuracy")
    # a Keras version exported as a float .tflite is scored on LiteRT the same way
    tflite_paths = export(
        "digits-cnn", "tflite", tmp_path, registry=hub.registry, datasets=hub.datasets
    )
    tflite_card = json.loads(tflite_paths[1].read_text())
    assert tflite_card["metrics"]["runtime"] == "litert"
    assert tflite_card["metrics"]["size_bytes"] == tflite_paths[0].stat().st_size


def test_export_for_tflm_scores_the_tflite_on_tflite_micro(hub: Hub) -> None:
    from edgeops.evaluate import tflm_evaluate
    from edgeops.export import export_artifact

    result = export_artifact(
        hub.keras_version, "tflite", registry=hub.registry, datasets=hub.datasets, runtime="tflm"
    )
    assert result.card.runtime == "tflm"
    metrics = result.card.metrics
    assert metrics["runtime"] == "tflm" and metrics["split"] == "test"
    arrays = hub.datasets.load(hub.dataset.version)
    again = tflm_evaluate(result.artifact, arrays.model_inputs("test"), arrays.y_test)
    assert again is not None and metrics["accuracy"] == pytest.approx(again.accuracy)
    assert metrics["num_samples"] == again.num_samples
    with pytest.raises(UnsupportedExportError, match=r"TFLite Micro runs \.tflite"):
        export_artifact(
            hub.keras_version, "onnx", registry=hub.registry, datasets=hub.datasets, runtime="tflm"
        )


def test_export_refuses_unknown_format_and_tflite_to_onnx(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedExportError, match="'c99'"):
        export("digits-cnn", "c99", tmp_path, registry=hub.registry, datasets=hub.datasets)
    flatbuffer = keras_to_tflite_float(hub.model)
    with hub.registry.start_run("export-test", {}) as run:
        tflite_version = hub.registry.register_model(
            name="digits-cnn-float",
            artifact=flatbuffer,
            format="tflite",
            run_id=run.id,
            dataset_version=hub.dataset.version,
            parent_id=hub.keras_version.id,
            config={"arch": "cnn", "task": "classification"},
            metrics={},
        )
    with pytest.raises(UnsupportedExportError, match="Keras ancestor"):
        export(tflite_version.id, "onnx", tmp_path, registry=hub.registry, datasets=hub.datasets)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_json_and_errors(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeops.cli.main import main

    # the CLI opens the data dir of the settings: this test's isolated one has no models
    capsys.readouterr()
    assert main(["export", "digits-cnn", "--format", "tflite", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "digits-cnn" in err[0]
    assert main(["export", "digits-cnn", "--format", "c99", "--out", str(tmp_path)]) == 1
    assert "'c99'" in capsys.readouterr().err
