"""Evaluation on device runtimes: LiteRT for .tflite (int8 quantized in and out like a device),
ONNX Runtime for .onnx, TFLite Micro for arena bytes and for scoring MCU models; MACs agree
across formats; bad inputs are clear errors; ``edgeops evaluate`` scores a labelled file
through the card's rule, on TFLM for a version made for a microcontroller."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeops.data import DatasetArrays, DatasetService
from edgeops.db import Database
from edgeops.evaluate import (
    EvaluationError,
    RuntimeLoadError,
    UnsupportedFormatError,
    evaluate_artifact,
    load_runner,
    tflm_arena_bytes,
    tflm_evaluate,
)
from edgeops.export import keras_to_onnx, keras_to_tflite_float
from edgeops.registry import Registry
from edgeops.store import ArtifactStore
from edgeops.train import save_keras, train_model

ROUNDING_LSB = 4
"""Largest difference, in output LSB, between TFLM's and LiteRT's int8 outputs that rounding
explains (reference vs optimized kernels) on these small models."""


@dataclass
class Trained:
    arrays: DatasetArrays
    model: Any
    keras: bytes
    float_tflite: bytes
    int8_tflite: bytes
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    from edgeops.compress import quantize

    root = tmp_path_factory.mktemp("digits")
    database = Database(f"sqlite:///{root / 'edgeops.db'}")
    database.upgrade()
    try:
        datasets = DatasetService(database, ArtifactStore(root / "artifacts"))
        arrays = datasets.load(datasets.register_builtin("digits").version)
    finally:
        database.dispose()
    model, _ = train_model(arrays, "cnn", epochs=5, seed=0, progress=False)
    yield Trained(
        arrays=arrays,
        model=model,
        keras=save_keras(model),
        float_tflite=keras_to_tflite_float(model),
        int8_tflite=quantize(model, "int8", arrays.model_inputs("train")),
        x_test=arrays.model_inputs("test"),
        y_test=arrays.y_test,
    )


def keras_accuracy(trained: Trained) -> float:
    predicted = np.asarray(trained.model(trained.x_test)).argmax(axis=1)
    return float(np.mean(predicted == trained.y_test))


def test_int8_on_litert_matches_keras_within_a_few_points(trained: Trained) -> None:
    report = evaluate_artifact(trained.int8_tflite, "tflite", trained.x_test, trained.y_test)
    assert report.runtime == "litert"
    assert (report.input_dtype, report.output_dtype) == ("int8", "int8")
    assert report.accuracy is not None and report.auc is None
    assert abs(report.accuracy - keras_accuracy(trained)) <= 0.03
    assert report.num_samples == len(trained.y_test)
    assert report.size_bytes == len(trained.int8_tflite)
    assert 0 < report.gzip_bytes < report.size_bytes
    assert report.latency_ms_median > 0
    assert report.arena_bytes is not None and report.arena_bytes > 0


def test_float_tflite_on_litert_agrees_with_keras(trained: Trained) -> None:
    report = evaluate_artifact(trained.float_tflite, "tflite", trained.x_test, trained.y_test)
    assert report.arena_bytes is not None and report.arena_bytes > 0  # TFLM runs float too
    assert report.accuracy == pytest.approx(keras_accuracy(trained), abs=1 / len(trained.y_test))
    outputs = load_runner(trained.float_tflite, "tflite").run(trained.x_test[:16])
    np.testing.assert_allclose(outputs, np.asarray(trained.model(trained.x_test[:16])), atol=1e-5)


def test_tflm_arena_bytes_is_a_positive_int_for_an_int8_model(trained: Trained) -> None:
    arena = tflm_arena_bytes(trained.int8_tflite)
    assert isinstance(arena, int) and 0 < arena < 64 * 1024  # a small CNN on 8x8 digits


def test_tflm_cannot_run_garbage_and_says_none() -> None:
    assert tflm_arena_bytes(b"\x00" * 64) is None


def test_tflm_scores_an_int8_model_on_its_own_interpreter(trained: Trained) -> None:
    from edgeops.evaluate.tflm import tflm_outputs

    score = tflm_evaluate(trained.int8_tflite, trained.x_test, trained.y_test)
    assert score is not None and score.num_samples == len(trained.y_test)  # all 360
    litert = evaluate_artifact(trained.int8_tflite, "tflite", trained.x_test, trained.y_test)
    assert litert.accuracy is not None and score.accuracy is not None
    # the same int8 kernels' arithmetic: at most a sample or two apart from LiteRT
    assert abs(score.accuracy - litert.accuracy) <= 2 / len(trained.y_test)
    assert score.arena_bytes == tflm_arena_bytes(trained.int8_tflite)
    # the outputs are TFLM's own int8 tensors, one row per sample
    runner = load_runner(trained.int8_tflite, "tflite")
    ran = tflm_outputs(trained.int8_tflite, runner.input.quantize(trained.x_test[:5]))
    assert ran is not None and ran[0].dtype == np.int8 and ran[0].shape == (5, 10)
    # bounded: at most max_samples, evenly spaced
    few = tflm_evaluate(trained.int8_tflite, trained.x_test, trained.y_test, max_samples=50)
    assert few is not None and few.num_samples == 50


def test_int8_digits_model_scored_on_tflm_agrees_with_litert_and_says_runtime_tflm(
    trained: Trained,
) -> None:
    from edgeops.evaluate.tflm import tflm_run

    x, y = trained.x_test, trained.y_test
    report = evaluate_artifact(trained.int8_tflite, "tflite", x, y, runtime="tflm")
    litert = evaluate_artifact(trained.int8_tflite, "tflite", x, y)
    assert report.runtime == "tflm" and report.to_dict()["runtime"] == "tflm"
    assert report.num_samples == len(y)  # every test sample, one invoke each
    assert (report.input_dtype, report.output_dtype) == ("int8", "int8")
    assert report.arena_bytes == tflm_arena_bytes(trained.int8_tflite)
    assert report.macs == litert.macs and report.size_bytes == litert.size_bytes
    assert report.latency_ms_median > 0  # TFLM's own invokes, timed in its process
    # The tolerance, justified on the data: both runtimes run the same int8 graph with the same
    # scales, but TFLM's reference kernels and LiteRT's optimized ones may round a
    # requantization differently; a 1-LSB difference in one layer can grow by a step or two
    # through the next, so the int8 outputs may differ by a few LSB (a wrong kernel would
    # differ by far more). With outputs at most d LSB apart, a prediction can change only
    # where LiteRT's two highest outputs are within 2d: accuracy may differ by those samples.
    runner = load_runner(trained.int8_tflite, "tflite")
    fed = runner.input.quantize(x)
    on_litert = np.concatenate([runner.raw(s[None]) for s in fed]).astype(np.int64)
    on_tflm = tflm_run(trained.int8_tflite, fed).outputs.reshape(on_litert.shape)
    d = int(np.abs(on_tflm.astype(np.int64) - on_litert).max())
    assert d <= ROUNDING_LSB
    top_two = np.sort(on_litert, axis=1)[:, -2:]
    close_calls = int(np.sum(top_two[:, 1] - top_two[:, 0] <= 2 * d))
    assert report.accuracy is not None and litert.accuracy is not None
    assert abs(report.accuracy - litert.accuracy) * len(y) <= close_calls + 1e-9
    # the sample count is capped on request and recorded
    few = evaluate_artifact(trained.int8_tflite, "tflite", x, y, runtime="tflm", max_samples=40)
    assert few.num_samples == 40 and few.runtime == "tflm"


def test_tflm_runs_tflite_only_and_refuses_what_it_cannot_run(trained: Trained) -> None:
    from edgeops.compress import quantize

    x, y = trained.x_test[:8], trained.y_test[:8]
    with pytest.raises(UnsupportedFormatError, match=r"TFLite Micro runs \.tflite"):
        evaluate_artifact(trained.keras, "keras", x, y, runtime="tflm")
    with pytest.raises(UnsupportedFormatError, match="runs on litert, not 'onnxruntime'"):
        evaluate_artifact(trained.int8_tflite, "tflite", x, y, runtime="onnxruntime")
    float16 = quantize(trained.model, "float16", trained.x_test)
    with pytest.raises(RuntimeLoadError, match="TFLM cannot run the model"):
        evaluate_artifact(float16, "tflite", x, y, runtime="tflm")


def test_tflm_evaluate_says_none_for_a_model_tflm_cannot_run(trained: Trained) -> None:
    from edgeops.compress import quantize

    float16 = quantize(trained.model, "float16", trained.x_test)
    assert tflm_evaluate(float16, trained.x_test[:8], trained.y_test[:8]) is None


def test_macs_agree_across_keras_litert_and_onnx(trained: Trained) -> None:
    x, y = trained.x_test[:20], trained.y_test[:20]
    onnx_bytes = keras_to_onnx(trained.model, check_inputs=x)
    counts = {
        fmt: evaluate_artifact(blob, fmt, x, y, latency_repeats=3).macs
        for fmt, blob in (
            ("keras", trained.keras),
            ("tflite", trained.float_tflite),
            ("onnx", onnx_bytes),
        )
    }
    # conv 3x3 1->8 on 8x8, conv 3x3 8->16 on 4x4, dense 64->10
    expected = 8 * 8 * 8 * 9 + 4 * 4 * 16 * 9 * 8 + 64 * 10
    assert counts == {"keras": expected, "tflite": expected, "onnx": expected}
    assert (
        evaluate_artifact(trained.int8_tflite, "tflite", x, y, latency_repeats=3).macs == expected
    )


def test_onnx_report_comes_from_onnx_runtime(trained: Trained) -> None:
    onnx_bytes = keras_to_onnx(trained.model, check_inputs=trained.x_test[:16])
    report = evaluate_artifact(onnx_bytes, "onnx", trained.x_test, trained.y_test)
    assert report.runtime == "onnxruntime"
    assert report.accuracy == pytest.approx(keras_accuracy(trained), abs=1 / len(trained.y_test))


def test_autoencoder_reports_auc(trained: Trained) -> None:
    model, metrics = train_model(trained.arrays, "autoencoder", epochs=3, seed=0, progress=False)
    report = evaluate_artifact(
        keras_to_tflite_float(model), "tflite", trained.x_test, trained.y_test, task="anomaly"
    )
    assert report.accuracy is None
    assert report.auc == pytest.approx(metrics["auc"], abs=1e-3)


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        (lambda t: (t.int8_tflite, "pb", t.x_test, t.y_test), UnsupportedFormatError, "'pb'"),
        (lambda t: (b"not a model", "tflite", t.x_test, t.y_test), RuntimeLoadError, "LiteRT"),
        (lambda t: (b"not a model", "onnx", t.x_test, t.y_test), RuntimeLoadError, "ONNX"),
        (lambda t: (t.int8_tflite, "tflite", t.x_test[:, :4], t.y_test), EvaluationError, "shape"),
        (lambda t: (t.int8_tflite, "tflite", t.x_test, t.y_test[:5]), EvaluationError, "labels"),
        (lambda t: (t.int8_tflite, "tflite", t.x_test[:0], t.y_test[:0]), EvaluationError, "no"),
        (
            lambda t: (t.int8_tflite, "tflite", t.x_test * np.nan, t.y_test),
            EvaluationError,
            "NaN",
        ),
        (
            lambda t: (t.int8_tflite, "tflite", t.x_test, t.y_test + 10),
            EvaluationError,
            "class indices",
        ),
    ],
    ids=["format", "tflite-garbage", "onnx-garbage", "shape", "labels", "empty", "nan", "class"],
)
def test_bad_input_is_a_clear_error(
    trained: Trained, change: Any, error: type[Exception], needle: str
) -> None:
    artifact, fmt, x, y = change(trained)
    with pytest.raises(error, match=needle):
        evaluate_artifact(artifact, fmt, x, y)


def test_cli_evaluate_scores_a_labelled_file_through_the_device_path(
    trained: Trained,
    isolated_environment: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgeops.cli.main import main
    from edgeops.compress import quantize
    from edgeops.train.zoo import TASK_CLASSIFICATION

    database = Database(f"sqlite:///{isolated_environment / 'edgeops.db'}")
    database.upgrade()
    try:
        store = ArtifactStore(isolated_environment / "artifacts")
        datasets, registry = DatasetService(database, store), Registry(database, store)
        dataset = datasets.resolve("digits")
        with registry.start_run("compress", {}) as run:
            version = registry.register_model(
                name="digits-cnn-int8",
                artifact=quantize(trained.model, "int8", trained.arrays.model_inputs("train")),
                format="tflite",
                run_id=run.id,
                dataset_version=dataset.version,
                parent_id=None,
                config={"arch": "cnn", "task": TASK_CLASSIFICATION},
                metrics={},
            )
            keras_version = registry.register_model(
                name="digits-cnn",
                artifact=trained.keras,
                format="keras",
                run_id=run.id,
                dataset_version=dataset.version,
                parent_id=None,
                config={"arch": "cnn", "task": TASK_CLASSIFICATION},
                metrics={},
            )
    finally:
        database.dispose()
    # raw samples as a user has them: 8x8 digit images flattened to 64 values 0..16
    data = tmp_path / "new.npz"
    np.savez(data, x=trained.arrays.x_test[:100], y=trained.arrays.y_test[:100])
    capsys.readouterr()
    assert main(["evaluate", version.id, "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == version.id
    assert report["runtime"] == "litert" and report["input_dtype"] == "int8"
    expected = evaluate_artifact(
        trained.int8_tflite, "tflite", trained.x_test[:100], trained.y_test[:100]
    )
    assert report["accuracy"] == pytest.approx(expected.accuracy)
    assert report["num_samples"] == 100

    # a Keras version is scored as its float .tflite on LiteRT, not by Keras
    assert main(["evaluate", "digits-cnn", "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runtime"], report["format"], report["input_dtype"]) == (
        "litert",
        "tflite",
        "float32",
    )
    assert report["model"] == keras_version.id

    assert main(["evaluate", version.id, "--data", str(tmp_path / "missing.npz")]) == 1
    assert "missing.npz" in capsys.readouterr().err


def test_cli_evaluate_scores_a_version_made_for_an_mcu_on_tflm(
    trained: Trained,
    isolated_environment: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgeops.cli.main import main
    from edgeops.evaluate import evaluate_file
    from edgeops.train.zoo import TASK_CLASSIFICATION

    database = Database(f"sqlite:///{isolated_environment / 'edgeops.db'}")
    database.upgrade()
    try:
        store = ArtifactStore(isolated_environment / "artifacts")
        datasets, registry = DatasetService(database, store), Registry(database, store)
        dataset = datasets.resolve("digits")
        with registry.start_run("compress", {}) as run:
            # what `edgeops compress --quantize int8 --profile cortex-m4-256k` records
            compression = {"quantization": "int8", "profile": {"name": "m4", "runtime": "tflm"}}
            version = registry.register_model(
                name="digits-cnn-int8",
                artifact=trained.int8_tflite,
                format="tflite",
                run_id=run.id,
                dataset_version=dataset.version,
                parent_id=None,
                config={"arch": "cnn", "task": TASK_CLASSIFICATION, "compression": compression},
                metrics={},
            )
        data = tmp_path / "new.npz"
        np.savez(data, x=trained.arrays.x_test[:100], y=trained.arrays.y_test[:100])
        capsys.readouterr()
        assert main(["evaluate", version.id, "--data", str(data), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["runtime"] == "tflm" and report["num_samples"] == 100
        expected = tflm_evaluate(trained.int8_tflite, trained.x_test[:100], trained.y_test[:100])
        assert expected is not None and report["accuracy"] == pytest.approx(expected.accuracy)
        assert report["arena_bytes"] == expected.arena_bytes
        # the caller may still ask for another runtime of the format
        _, on_litert = evaluate_file(
            version.id,
            data,
            label_column=None,
            registry=registry,
            datasets=datasets,
            runtime="litert",
        )
        assert on_litert.runtime == "litert" and on_litert.num_samples == 100
    finally:
        database.dispose()
