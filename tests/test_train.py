"""Training: seeded and reproducible, registered with its run, dataset, card and reference
outputs; failures recorded as failed runs with no model row; the ``edgeops train`` command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeops.data import DatasetArrays, DatasetService
from edgeops.db import Database
from edgeops.registry import Registry
from edgeops.store import ArtifactStore
from edgeops.train import (
    IncompatibleInputError,
    ModelFormatError,
    TrainError,
    TrainService,
    UnknownArchitectureError,
    load_keras,
    save_keras,
    train_model,
)
from tests.clitools import assert_one_line_error, run_cli

REPRODUCIBILITY_TOLERANCE = 1e-6  # docs/training.md: same machine, same versions


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatasetArrays]:
    root = tmp_path_factory.mktemp("digits")
    database = Database(f"sqlite:///{root / 'edgeops.db'}")
    database.upgrade()
    try:
        datasets = DatasetService(database, ArtifactStore(root / "artifacts"))
        yield datasets.load(datasets.register_builtin("digits").version)
    finally:
        database.dispose()


def services(database: Database, root: Path) -> tuple[DatasetService, Registry]:
    store = ArtifactStore(root / "artifacts")
    return DatasetService(database, store), Registry(database, store)


@pytest.mark.slow
def test_same_data_arch_and_seed_reproduce_the_metrics(digits: DatasetArrays) -> None:
    first_model, first = train_model(digits, "mlp", epochs=2, seed=7, progress=False)
    second_model, second = train_model(digits, "mlp", epochs=2, seed=7, progress=False)
    assert first.keys() == second.keys()
    for key in ("accuracy", "val_accuracy", "loss", "train_loss"):
        assert abs(first[key] - second[key]) <= REPRODUCIBILITY_TOLERANCE, key
    for a, b in zip(first_model.get_weights(), second_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=REPRODUCIBILITY_TOLERANCE)
    assert first["accuracy"] > 0.5  # it learned something in two epochs


def test_another_seed_gives_another_model(digits: DatasetArrays) -> None:
    _, first = train_model(digits, "mlp", epochs=1, seed=1, progress=False)
    _, second = train_model(digits, "mlp", epochs=1, seed=2, progress=False)
    assert first["train_loss"] != second["train_loss"]


def test_autoencoder_is_scored_by_auc(digits: DatasetArrays) -> None:
    _, metrics = train_model(digits, "autoencoder", epochs=3, seed=0, progress=False)
    assert "accuracy" not in metrics
    assert 0.5 < metrics["auc"] <= 1.0  # digit 0 is normal, every other digit anomalous
    assert 0.0 <= metrics["val_auc"] <= 1.0


def test_progress_bar_runs_without_a_terminal(
    digits: DatasetArrays, capsys: pytest.CaptureFixture[str]
) -> None:
    _, metrics = train_model(digits, "mlp", epochs=1, seed=0, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""  # progress goes to stderr only
    assert metrics["epochs"] == 1


def test_bad_training_parameters_are_refused(digits: DatasetArrays) -> None:
    with pytest.raises(TrainError, match="epochs"):
        train_model(digits, "mlp", epochs=0, seed=0, progress=False)
    with pytest.raises(TrainError, match="batch size"):
        train_model(digits, "mlp", epochs=1, seed=0, batch_size=0, progress=False)
    with pytest.raises(UnknownArchitectureError, match="'transformer'"):
        train_model(digits, "transformer", epochs=1, seed=0, progress=False)


def test_keras_artifact_round_trips(digits: DatasetArrays) -> None:
    model, _ = train_model(digits, "cnn", epochs=1, seed=0, progress=False)
    x = digits.model_inputs("test")[:8]
    restored = load_keras(save_keras(model))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(restored(x)))


def test_garbage_is_not_a_keras_model() -> None:
    with pytest.raises(ModelFormatError, match="not a loadable Keras model"):
        load_keras(b"PK\x03\x04 definitely not a zip")


@pytest.mark.slow
def test_train_service_registers_the_model_with_its_lineage(
    database: Database, tmp_path: Path
) -> None:
    datasets, registry = services(database, tmp_path)
    version = TrainService(datasets, registry).train(
        "digits", "mlp", epochs=2, seed=0, progress=False
    )
    assert version.id.startswith("m-")
    assert (version.name, version.seq, version.format) == ("digits-mlp", 1, "keras")
    assert version.dataset_version == datasets.resolve("digits").version
    assert version.config["arch"] == "mlp" and version.config["seed"] == 0
    assert version.parent_id is None
    # the float model on LiteRT scores like Keras (same float32 maths, one sample at a time)
    assert abs(version.metrics["tflite_accuracy"] - version.metrics["accuracy"]) < 0.01
    assert version.metrics["macs"] == 64 * 64 + 64 * 32 + 32 * 10

    run = registry.get_run(version.run_id)
    assert run.status == "succeeded"
    assert run.params["arch"] == "mlp"
    assert run.metrics["accuracy"] == version.metrics["accuracy"]

    card = version.card
    assert card is not None
    assert card["model_id"] == version.id and card["runtime"] == "keras"
    assert card["preprocessing"]["model_input_shape"] == [8, 8, 1]
    reference = card["reference"]
    assert sum(reference["class_counts"]) == 269  # validation predictions
    assert sum(reference["confidence_counts"]) == 269
    assert len(reference["feature_edges"]) > 0  # the dataset's feature reference kept

    model = load_keras(registry.load_artifact(version.id))
    assert model.count_params() == version.metrics["params"]


def test_failed_training_is_a_failed_run_and_no_model(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'edgeops.db'}")
    database.upgrade()
    try:
        datasets, registry = services(database, tmp_path)
        service = TrainService(datasets, registry)
        with pytest.raises(TrainError, match="epochs"):  # refused before any run starts
            service.train("digits", "mlp", epochs=0, progress=False)
        assert registry.list_runs(kind="train") == []
        # digits are 8x8 images, not time series: fails inside the run
        with pytest.raises(IncompatibleInputError, match="'cnn1d'"):
            service.train("digits", "cnn1d", epochs=1, progress=False)
        assert registry.list_models() == []
        runs = registry.list_runs(kind="train")
        assert [run.status for run in runs] == ["failed"]
        assert "time-series" in (runs[0].error or "")
    finally:
        database.dispose()


@pytest.mark.slow
def test_cli_train_json_prints_the_version_and_metrics() -> None:
    result = run_cli(
        "edgeops", "train", "--dataset", "digits", "--arch", "mlp", "--epochs", "1", "--json"
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["id"].startswith("m-")
    assert document["ref"] == "digits-mlp:1"
    assert 0.0 <= document["metrics"]["accuracy"] <= 1.0
    assert document["config"]["arch"] == "mlp"
    assert "Traceback" not in result.stderr


def test_cli_unknown_architecture_is_one_line_error() -> None:
    result = run_cli("edgeops", "train", "--dataset", "digits", "--arch", "resnet50")
    assert_one_line_error(result, "unknown architecture 'resnet50'", "mobilenet")


def test_cli_bad_width_is_one_line_error() -> None:
    result = run_cli("edgeops", "train", "--dataset", "digits", "--arch", "cnn", "--width", "0")
    assert_one_line_error(result, "width must be in (0, 8]")
