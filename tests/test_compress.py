"""Compression: quantization modes on LiteRT, pruning, QAT, the int8 fallback policy, the
compress service and CLI, budget-aware search. Everything runs on the real parts: the
digits dataset through DatasetService, tf_keras, the LiteRT interpreter, tflite-micro."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeops.compress import (
    QUANTIZATION_MODES,
    Attempt,
    PruningError,
    UnknownQuantizationError,
    decide,
    kernel_sparsity,
    next_variant,
    prune,
    quantization_aware,
    quantize,
)
from edgeops.compress.prune import check_clusters, cluster, distinct_kernel_values
from edgeops.compress.service import CompressService, compressed_name
from edgeops.data import DatasetArrays, DatasetService
from edgeops.db import Database
from edgeops.export.card import op_set
from edgeops.hub.stores import open_stores
from edgeops.registry import ModelVersionView, Registry
from edgeops.store import ArtifactStore

SEED = 0


@dataclass
class Hub:
    """A data dir of this module: SQLite database, artifact store, the services, and a
    digits CNN trained 10 epochs and registered (the parent every test compresses)."""

    root: Path
    database: Database
    datasets: DatasetService
    registry: Registry
    service: CompressService
    parent: ModelVersionView


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from edgeops.train.service import TrainService

    root = tmp_path_factory.mktemp("edgeops-data")
    with open_stores(f"sqlite:///{root / 'edgeops.db'}", root / "artifacts") as stores:
        datasets, registry = stores.datasets(), stores.registry()
        parent = TrainService(datasets, registry).train(
            "digits", "cnn", epochs=10, seed=SEED, progress=False
        )
        yield Hub(
            root, stores.database, datasets, registry, CompressService(datasets, registry), parent
        )


@pytest.fixture(scope="module")
def digits(hub: Hub) -> DatasetArrays:
    """The built-in digits dataset version the parent was trained on."""
    return hub.datasets.load(hub.parent.dataset_version)


@pytest.fixture(scope="module")
def cnn(hub: Hub) -> Any:
    """The zoo's small CNN trained 10 epochs on digits (the registered parent)."""
    from edgeops.train.trainer import load_keras

    return load_keras(hub.registry.load_artifact(hub.parent.id))


def litert_predict(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    """Class probabilities from the LiteRT interpreter, (de)quantizing int tensors."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    (source,) = interpreter.get_input_details()
    (sink,) = interpreter.get_output_details()
    rows = []
    for sample in x:
        batch = sample[np.newaxis].astype(np.float32)
        if np.issubdtype(source["dtype"], np.integer):
            scale, zero = source["quantization"]
            info = np.iinfo(source["dtype"])
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max)
        interpreter.set_tensor(source["index"], batch.astype(source["dtype"]))
        interpreter.invoke()
        out = interpreter.get_tensor(sink["index"]).astype(np.float32)
        if np.issubdtype(sink["dtype"], np.integer):
            scale, zero = sink["quantization"]
            out = (out - zero) * scale
        rows.append(out[0])
    return np.stack(rows)


def litert_accuracy(flatbuffer: bytes, arrays: DatasetArrays, split: str = "test") -> float:
    x, y = arrays.model_inputs(split), arrays.split(split)[1]
    return float(np.mean(litert_predict(flatbuffer, x).argmax(axis=1) == y))


# -- quantization ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", QUANTIZATION_MODES)
def test_each_quantization_mode_makes_a_tflite_litert_runs(
    mode: str, cnn: Any, digits: DatasetArrays
) -> None:
    flatbuffer = quantize(cnn, mode, digits.model_inputs("train"))
    assert flatbuffer[4:8] == b"TFL3"  # the TFLite flatbuffer identifier
    probabilities = litert_predict(flatbuffer, digits.model_inputs("test")[:50])
    assert probabilities.shape == (50, 10)
    assert litert_accuracy(flatbuffer, digits) > 0.8  # 10 epochs reach ~0.95 in float


def test_int8_model_has_int8_input_and_output_tensors(cnn: Any, digits: DatasetArrays) -> None:
    from ai_edge_litert.interpreter import Interpreter

    flatbuffer = quantize(cnn, "int8", digits.model_inputs("train"))
    interpreter = Interpreter(model_content=flatbuffer)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert interpreter.get_input_details()[0]["quantization"][0] > 0  # a real scale
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(op_set(flatbuffer, "tflite"))
    assert "DEQUANTIZE" not in op_set(flatbuffer, "tflite")  # integer all the way


def test_int8_is_smaller_than_float16_and_16x8_keeps_float_io(
    cnn: Any, digits: DatasetArrays
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    representative = digits.model_inputs("train")
    int16x8 = quantize(cnn, "int16x8", representative)
    io = Interpreter(model_content=int16x8).get_input_details()[0]
    assert io["dtype"] == np.float32
    assert len(quantize(cnn, "int8", representative)) < len(
        quantize(cnn, "float16", representative)
    )


def test_quantized_models_take_one_sample_with_static_shapes() -> None:
    """A device invokes one sample at a time; a static batch of 1 keeps a 1D CNN's reshape
    free of SHAPE/STRIDED_SLICE/PACK ops, which MCU op resolvers rarely register."""
    from edgeops.train.zoo import build_model

    model = build_model("cnn1d", (100, 6), 4, seed=SEED)  # untrained: only the graph matters
    samples = np.random.default_rng(SEED).normal(size=(20, 100, 6)).astype(np.float32)
    flatbuffer = quantize(model, "int8", samples)
    from ai_edge_litert.interpreter import Interpreter

    assert list(Interpreter(model_content=flatbuffer).get_input_details()[0]["shape"]) == [
        1,
        100,
        6,
    ]
    ops = set(op_set(flatbuffer, "tflite"))
    assert not ops & {"SHAPE", "STRIDED_SLICE", "PACK"}, ops
    assert ops <= {"CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D", "MEAN", "RESHAPE", "SOFTMAX"}


def test_unknown_quantization_mode_lists_the_known_ones(cnn: Any) -> None:
    with pytest.raises(UnknownQuantizationError, match=r"'int4'.*dynamic, float16, int8, int16x8"):
        quantize(cnn, "int4", np.zeros((1, 8, 8, 1), np.float32))


def test_representative_shape_mismatch_is_a_clear_error(cnn: Any) -> None:
    from edgeops.compress import QuantizationError

    with pytest.raises(QuantizationError, match=r"shape \(64,\), the model takes \(8, 8, 1\)"):
        quantize(cnn, "int8", np.zeros((4, 64), np.float32))


# -- pruning and QAT ------------------------------------------------------------------------


@pytest.mark.slow
def test_pruning_reaches_the_target_sparsity_and_keeps_the_original(
    cnn: Any, digits: DatasetArrays
) -> None:
    before = [w.copy() for w in cnn.get_weights()]
    pruned = prune(cnn, digits, sparsity=0.5, epochs=1, seed=SEED)
    kernels = [
        w.numpy()
        for layer in pruned.layers
        for w in layer.weights
        if w.name.split("/")[-1].startswith("kernel")
    ]
    assert kernels and all(abs(float(np.mean(k == 0)) - 0.5) < 0.02 for k in kernels)
    assert abs(kernel_sparsity(pruned) - 0.5) < 0.02
    assert kernel_sparsity(cnn) < 0.01  # the input model is untouched
    assert all(np.array_equal(a, b) for a, b in zip(before, cnn.get_weights(), strict=True))
    assert not any("prune" in layer.name for layer in pruned.layers)  # wrappers stripped
    flatbuffer = quantize(pruned, "int8", digits.model_inputs("train"))
    assert litert_accuracy(flatbuffer, digits) > 0.8


def test_pruning_refuses_bad_parameters(cnn: Any, digits: DatasetArrays) -> None:
    with pytest.raises(PruningError, match="sparsity must be between 0 and 1"):
        prune(cnn, digits, sparsity=1.0, epochs=1, seed=SEED)
    with pytest.raises(PruningError, match="at least 1 fine-tuning epoch"):
        prune(cnn, digits, sparsity=0.5, epochs=0, seed=SEED)


@pytest.mark.slow
def test_quantization_aware_training_converts_to_int8(cnn: Any, digits: DatasetArrays) -> None:
    from ai_edge_litert.interpreter import Interpreter

    trained = quantization_aware(cnn, digits, epochs=1, seed=SEED)
    assert any("quant" in layer.name for layer in trained.layers)
    flatbuffer = quantize(trained, "int8", digits.model_inputs("train"))
    assert Interpreter(model_content=flatbuffer).get_input_details()[0]["dtype"] == np.int8
    assert litert_accuracy(flatbuffer, digits) > 0.8


# -- the fallback policy (pure) -------------------------------------------------------------


def _attempt(mode: str, qat: bool, loss_pp: float) -> Attempt:
    return Attempt(mode, qat, score=0.9 - loss_pp / 100, loss_pp=loss_pp, size_bytes=1000)


def test_policy_tries_qat_then_16x8_only_while_int8_loses_too_much() -> None:
    assert next_variant("int8", False, [], 1.0) == ("int8", False)
    assert next_variant("int8", False, [_attempt("int8", False, 0.4)], 1.0) is None
    lost = [_attempt("int8", False, 2.5)]
    assert next_variant("int8", False, lost, 1.0) == ("int8", True)
    lost.append(_attempt("int8", True, 1.5))
    assert next_variant("int8", False, lost, 1.0) == ("int16x8", False)
    lost.append(_attempt("int16x8", False, 1.2))
    assert next_variant("int8", False, lost, 1.0) is None  # plan exhausted
    # QAT asked for already: the fallback is 16x8; other modes have no fallback
    assert next_variant("int8", True, [_attempt("int8", True, 3.0)], 1.0) == ("int16x8", False)
    assert next_variant("float16", False, [_attempt("float16", False, 3.0)], 1.0) is None


def test_policy_records_what_it_chose_and_why() -> None:
    ok = decide([_attempt("int8", False, 0.4)], 1.0)
    assert ok.chosen.mode == "int8" and ok.within_limit
    assert "int8 loses 0.40 pp" in ok.reason and "within the 1 pp limit" in ok.reason

    via_qat = decide([_attempt("int8", False, 2.5), _attempt("int8", True, 0.3)], 1.0)
    assert via_qat.chosen.qat and via_qat.within_limit
    assert "int8 loses 2.50 pp; QAT int8 loses 0.30 pp" in via_qat.reason
    assert "chose QAT int8, the first within the 1 pp limit" in via_qat.reason

    attempts = [
        _attempt("int8", False, 2.5),
        _attempt("int8", True, 1.8),
        _attempt("int16x8", False, 1.1),
    ]
    none = decide(attempts, 1.0)
    assert none.chosen.mode == "int16x8" and not none.within_limit
    assert "none is within the 1 pp limit, kept the most accurate, int16x8" in none.reason


@pytest.mark.slow
def test_clustering_after_pruning_keeps_the_zeros_and_at_most_k_values(
    cnn: Any, digits: DatasetArrays
) -> None:
    pruned = prune(cnn, digits, sparsity=0.5, epochs=1, seed=SEED)
    clustered = cluster(pruned, digits, clusters=8, epochs=1, seed=SEED)
    assert kernel_sparsity(clustered) >= kernel_sparsity(pruned) - 1e-9  # zeros preserved
    assert distinct_kernel_values(clustered) <= 8  # zero is one of the 8
    assert distinct_kernel_values(pruned) > 8  # the input is left untouched
    assert [w.shape for w in clustered.weights] == [w.shape for w in pruned.weights]
    # clustering the same model twice works (tfmot wraps the layers of the model it gets)
    again = cluster(pruned, digits, clusters=8, epochs=1, seed=SEED)
    assert distinct_kernel_values(again) <= 8
    flatbuffer = quantize(clustered, "int8", digits.model_inputs("train"))
    assert litert_accuracy(flatbuffer, digits) > 0.8


@pytest.mark.parametrize("bad", [1, 0, 300, 2.5, True])
def test_cluster_count_must_be_an_integer_from_2_to_256(bad: Any) -> None:
    with pytest.raises(PruningError, match="clusters"):
        check_clusters(bad)


def test_compressed_names_say_pruning_clusters_and_qat() -> None:
    assert compressed_name("digits-cnn", "int8", None) == "digits-cnn-int8"
    assert compressed_name("digits-cnn", "int8", 0.5) == "digits-cnn-p50-int8"
    assert compressed_name("m", "int8", 0.5, clusters=16) == "m-p50-c16-int8"
    assert compressed_name("m", "int8", None, qat=True) == "m-qat-int8"
    assert compressed_name("m", "int8", 0.8, clusters=16, qat=True) == "m-p80-c16-qat-int8"


# -- the compress service -------------------------------------------------------------------


@pytest.mark.slow
def test_compress_pruned_int8_registers_a_tflite_child_with_lineage_and_card(hub: Hub) -> None:
    version = hub.service.compress(
        hub.parent.id, quantize="int8", sparsity=0.5, epochs=1, seed=SEED, progress=False
    )
    assert version.format == "tflite"
    assert version.name == "digits-cnn-p50-int8"
    assert version.parent_id == hub.parent.id
    assert version.dataset_version == hub.parent.dataset_version
    assert [m.id for m in hub.registry.lineage(version.id)] == [version.id, hub.parent.id]
    compression = version.config["compression"]
    assert compression["requested"] == "int8" and compression["sparsity"] == 0.5
    assert compression["attempts"][0]["quantization"] == "int8"
    assert compression["reason"]
    assert version.config["arch"] == "cnn"  # the parent's configuration is kept
    metrics = version.metrics
    assert abs(metrics["kernel_sparsity"] - 0.5) < 0.02
    assert metrics["float_accuracy"] > 0.8 and metrics["accuracy"] > 0.8
    assert metrics["size_bytes"] < metrics["float_size_bytes"]
    assert metrics["gzip_bytes"] < metrics["float_gzip_bytes"]
    assert metrics["arena_bytes"] and metrics["arena_bytes"] > 0  # measured by tflite-micro
    assert metrics["input_dtype"] == "int8"
    card = version.card
    assert card is not None and card["quantization"]["mode"] in ("int8", "int16x8")
    assert card["lineage"]["parent_id"] == hub.parent.id and card["test_vectors"]
    assert card["reference"]["class_counts"]  # the compressed model's own outputs
    run = hub.registry.get_run(version.run_id)
    assert run.status == "succeeded" and run.kind == "compress"
    assert compression["reason"] in run.logs


@pytest.mark.slow
def test_int8_losing_more_than_the_limit_tries_qat_then_16x8_and_records_why(hub: Hub) -> None:
    # A limit no variant can meet forces the whole fallback chain.
    version = hub.service.compress(
        hub.parent.id, quantize="int8", max_loss_pp=-100.0, epochs=1, seed=SEED, progress=False
    )
    compression = version.config["compression"]
    tried = [(a["quantization"], a["qat"]) for a in compression["attempts"]]
    assert tried == [("int8", False), ("int8", True), ("int16x8", False)]
    assert compression["within_limit"] is False
    best = max(compression["attempts"], key=lambda a: a["val_score"])
    assert (compression["quantization"], compression["qat"]) == (best["quantization"], best["qat"])
    reason = compression["reason"]
    assert "int8 loses" in reason and "QAT int8 loses" in reason and "int16x8 loses" in reason
    assert "none is within the -100 pp limit" in reason
    chosen_qat = compression["qat"]
    assert version.name == compressed_name(
        "digits-cnn", compression["quantization"], None, qat=chosen_qat
    )
    logs = hub.registry.get_run(version.run_id).logs
    assert any(line.startswith("QAT int8: validation accuracy") for line in logs)


@pytest.mark.slow
def test_a_qat_variant_chosen_by_the_fallback_policy_is_named_and_recorded_as_qat(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgeops.compress.service as service_module
    from edgeops.compress.policy import Decision
    from tests.clitools import run_cli

    def choose_qat(
        attempts: list[Attempt], max_loss_pp: float, metric: str, runtime: str
    ) -> Decision:
        # what the policy does when int8 loses too much and QAT int8 does not
        qat_attempt = next(a for a in attempts if a.qat)
        return Decision(qat_attempt, "int8 loses too much; chose QAT int8", within_limit=True)

    monkeypatch.setattr(service_module, "decide", choose_qat)
    version = hub.service.compress(
        hub.parent.id, quantize="int8", max_loss_pp=-100.0, epochs=1, seed=SEED, progress=False
    )
    assert version.name == "digits-cnn-qat-int8"
    compression = version.config["compression"]
    assert compression["quantization"] == "int8" and compression["qat"] is True
    assert compression["qat_requested"] is False and compression["label"] == "QAT int8"
    assert version.card is not None and version.card["compression"]["qat"] is True
    shown = run_cli("edgeops", "models", "show", version.id, "--json", env=hub_env(hub))
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["name"] == "digits-cnn-qat-int8"
    assert document["config"]["compression"]["qat"] is True
    assert document["card"]["name"] == "digits-cnn-qat-int8"
    listed = run_cli("edgeops", "models", "list", "--json", env=hub_env(hub))
    assert listed.returncode == 0, listed.stderr
    (row,) = [m for m in json.loads(listed.stdout) if m["id"] == version.id]
    assert row["name"] == "digits-cnn-qat-int8" and row["config"]["compression"]["qat"] is True


def test_compress_for_an_mcu_profile_scores_on_tflm_and_says_so(hub: Hub) -> None:
    from edgeops.evaluate import device_runtime, tflm_evaluate
    from edgeops.export import export_artifact

    version = hub.service.compress(
        hub.parent.id,
        quantize="int8",
        profile="cortex-m4-256k",
        max_loss_pp=100.0,  # int8 is kept: one attempt
        epochs=1,
        seed=SEED,
        progress=False,
    )
    compression = version.config["compression"]
    assert compression["profile"] == {"name": "cortex-m4-256k", "runtime": "tflm"}
    assert "validation split, tflite-micro" in compression["reason"]
    metrics = version.metrics
    assert metrics["runtime"] == "tflm" and metrics["format"] == "tflite"
    # scored again here, straight on TFLM with the registered artifact
    arrays = hub.datasets.load(version.dataset_version)
    artifact = hub.registry.load_artifact(version.id)
    again = tflm_evaluate(artifact, arrays.model_inputs("test"), arrays.y_test)
    assert again is not None and metrics["num_samples"] == again.num_samples == len(arrays.y_test)
    assert metrics["accuracy"] == pytest.approx(again.accuracy)
    assert metrics["arena_bytes"] == again.arena_bytes
    assert metrics["float_accuracy"] > 0.8  # the float .tflite, on TFLM as well
    card = version.card
    assert card is not None and card["runtime"] == "tflm" and card["metrics"]["runtime"] == "tflm"
    assert device_runtime(card, version.config) == "tflm"
    # exported for a microcontroller (as a release for mcu does): the registered TFLM metrics
    for_mcu = export_artifact(
        version, "tflite", registry=hub.registry, datasets=hub.datasets, runtime="tflm"
    )
    assert for_mcu.card.runtime == "tflm" and for_mcu.card.metrics == metrics
    # exported for LiteRT: the card's metrics are measured again, on LiteRT
    for_linux = export_artifact(version, "tflite", registry=hub.registry, datasets=hub.datasets)
    assert for_linux.card.runtime == "litert" and for_linux.card.metrics["runtime"] == "litert"
    assert for_linux.artifact == for_mcu.artifact == artifact


@pytest.mark.slow
def test_compress_with_qat_asked_for_is_named_qat(hub: Hub) -> None:
    version = hub.service.compress(
        hub.parent.id, quantize="int8", qat=True, epochs=1, seed=SEED, progress=False
    )
    compression = version.config["compression"]
    if compression["qat"]:  # the first attempt, QAT int8, within the limit
        assert version.name == "digits-cnn-qat-int8"
    else:  # fell back to int16x8
        assert version.name == "digits-cnn-int16x8"
    assert compression["qat_requested"] is True


@pytest.mark.slow
def test_compress_with_clusters_records_them_and_keeps_at_most_k_values(hub: Hub) -> None:
    version = hub.service.compress(
        hub.parent.id,
        quantize="int8",
        sparsity=0.5,
        clusters=16,
        epochs=1,
        seed=SEED,
        progress=False,
    )
    compression = version.config["compression"]
    assert version.name == compressed_name(
        "digits-cnn", compression["quantization"], 0.5, clusters=16, qat=compression["qat"]
    )
    assert compression["clusters"] == 16 and compression["sparsity"] == 0.5
    metrics = version.metrics
    assert 2 <= metrics["kernel_distinct_values"] <= 16
    assert abs(metrics["kernel_sparsity"] - 0.5) < 0.02
    assert metrics["gzip_bytes"] < metrics["float_gzip_bytes"]
    run = hub.registry.get_run(version.run_id)
    assert run.params["clusters"] == 16
    assert any(line.startswith("clustered: at most") for line in run.logs)
    assert version.card is not None
    assert version.card["compression"]["clusters"] == 16


def hub_env(hub: Hub) -> dict[str, str]:
    return {"EDGEOPS_DATA_DIR": str(hub.root)}


@pytest.mark.slow
def test_compress_works_on_an_autoencoder_and_reports_auc(hub: Hub) -> None:
    from edgeops.train.service import TrainService

    autoencoder = TrainService(hub.datasets, hub.registry).train(
        "digits", "autoencoder", epochs=10, seed=SEED, progress=False
    )
    # the trained version's card holds its output reference: the reconstruction-error histogram
    assert autoencoder.card is not None
    trained_reference = autoencoder.card["reference"]
    edges = trained_reference["reconstruction_error_edges"]
    counts = trained_reference["reconstruction_error_counts"]
    validation = len(hub.datasets.load(autoencoder.dataset_version).y_val)
    assert 2 <= len(edges) <= 15 and edges == sorted(edges) and len(counts) == len(edges) + 1
    assert sum(counts) == validation and trained_reference["class_counts"] is None
    version = hub.service.compress(
        autoencoder.id, quantize="int8", epochs=1, seed=SEED, progress=False
    )
    metrics = version.metrics
    assert metrics["accuracy"] is None and metrics["task"] == "anomaly"
    assert 0.5 < metrics["auc"] <= 1.0 and 0.5 < metrics["float_auc"] <= 1.0
    assert 0.5 < metrics["val_auc"] <= 1.0
    assert "auc on the validation split, LiteRT" in version.config["compression"]["reason"]
    assert version.card is not None
    reference = version.card["reference"]  # the compressed model's own errors, on LiteRT
    assert sum(reference["reconstruction_error_counts"]) == validation
    assert len(reference["reconstruction_error_counts"]) == (
        len(reference["reconstruction_error_edges"]) + 1
    )


def test_compressing_a_tflite_version_points_at_its_keras_ancestor(hub: Hub) -> None:
    from edgeops.compress import NotCompressibleError

    with hub.registry.start_run("compress", {}) as run:
        tflite = hub.registry.register_model(
            name="digits-cnn-handmade",
            artifact=b"TFL3 stand-in",
            format="tflite",
            run_id=run.id,
            dataset_version=hub.parent.dataset_version,
            parent_id=hub.parent.id,
            config={},
            metrics={},
        )
    ancestor = f"is a tflite model, not Keras; compress its Keras ancestor {hub.parent.id}"
    with pytest.raises(NotCompressibleError, match=ancestor):
        hub.service.compress(tflite.id, quantize="int8", progress=False)


def test_corrupted_parent_artifact_fails_the_run_and_registers_nothing(
    database: Database, tmp_path: Path
) -> None:
    """On SQLite and PostgreSQL: a clear error naming the model, a failed run, no new row."""
    from edgeops.registry import CorruptArtifactError

    store = ArtifactStore(tmp_path / "artifacts")
    datasets = DatasetService(database, store)
    registry = Registry(database, store)
    view = datasets.register_builtin("digits")
    with registry.start_run("train", {}) as run:
        parent = registry.register_model(
            name="digits-cnn",
            artifact=b"not really a keras file",
            format="keras",
            run_id=run.id,
            dataset_version=view.version,
            parent_id=None,
            config={"arch": "cnn", "width": 1.0},
            metrics={},
        )
    path = store.root / "sha256" / parent.artifact_sha256[:2] / parent.artifact_sha256[2:]
    path.chmod(0o644)
    path.write_bytes(b"flipped bits")
    with pytest.raises(CorruptArtifactError, match=f"model {parent.id} .*corrupted"):
        CompressService(datasets, registry).compress("digits-cnn", quantize="int8", progress=False)
    assert [m.id for m in registry.list_models()] == [parent.id]
    (failed,) = registry.list_runs(kind="compress")
    assert failed.status == "failed" and "corrupted" in (failed.error or "")


# -- budget-aware search --------------------------------------------------------------------


@pytest.mark.slow
def test_search_on_a_tiny_grid_returns_a_pareto_front_and_marks_fits(hub: Hub) -> None:
    result = hub.service.search(
        hub.parent.id,
        "cortex-m4-256k",
        widths=(0.5, 1.0),  # 1.0 is the parent itself; 0.5 is trained for 1 epoch
        sparsities=(0.0,),
        modes=("int8",),
        epochs=1,
        workers=2,
        progress=False,
    )
    assert len(result.candidates) == 2
    assert [(c.width, c.quantization) for c in result.candidates] == [(0.5, "int8"), (1.0, "int8")]
    arrays = hub.datasets.load(hub.parent.dataset_version)
    for candidate in result.candidates:
        assert candidate.arena_bytes and candidate.arena_bytes > 0  # tflite-micro planned it
        assert candidate.ram_bytes == candidate.arena_bytes
        assert 0.0 < candidate.accuracy <= 1.0 and candidate.flash_bytes > 0
        assert "CONV_2D" in candidate.ops
        assert candidate.fits and not candidate.misfits  # small models, 192 KiB of RAM
        # an MCU profile: scored on the tflite-micro interpreter itself, LiteRT's kept beside
        assert candidate.scored_on == "tflm"
        # every sample of both splits invoked on TFLM (fewer than the cap), the count recorded
        assert (candidate.val_samples, candidate.test_samples) == (
            len(arrays.y_val),
            len(arrays.y_test),
        )
        assert candidate.litert_accuracy is not None and candidate.litert_test_accuracy is not None
        assert abs(candidate.accuracy - candidate.litert_accuracy) <= 0.02
        assert abs(candidate.test_accuracy - candidate.litert_test_accuracy) <= 0.02
    narrow, wide = result.candidates
    assert narrow.flash_bytes < wide.flash_bytes
    assert result.front and all(c.on_front for c in result.front)
    assert result.best is not None and result.best.fits
    document = result.to_dict()
    assert document["profile"]["name"] == "cortex-m4-256k" and len(document["candidates"]) == 2
    json.dumps(document)  # JSON-able as it is
    run = hub.registry.get_run(result.run_id or "")
    assert run.kind == "search" and run.status == "succeeded"
    assert run.metrics["candidates"] == 2
    assert not [m for m in hub.registry.list_models() if m.run_id == run.id]  # nothing registered


@pytest.mark.slow
def test_search_for_a_profile_nothing_fits_names_the_smallest_candidates_needs(
    hub: Hub, tmp_path: Path
) -> None:
    from edgeops.compress import NothingFitsError

    boards = tmp_path / "boards.toml"
    boards.write_text(
        '[profiles.speck]\nruntime = "tflm"\nflash_bytes = 2048\nram_bytes = 512\n'
        'ops = ["FULLY_CONNECTED"]\n'
    )
    with pytest.raises(NothingFitsError) as caught:
        hub.service.search(
            hub.parent.id,
            "speck",
            profiles_file=boards,
            widths=(1.0,),
            sparsities=(0.0,),
            workers=1,
            progress=False,
        )
    message = str(caught.value)
    assert "no candidate fits device profile 'speck' (flash 2048 B, RAM 512 B" in message
    assert "the smallest, width 1, sparsity 0%, int8, needs flash" in message
    assert "ops not supported: CONV_2D" in message
    assert len(caught.value.candidates) == 1
    failed = hub.registry.list_runs(kind="search")[-1]
    assert failed.status == "failed"


# -- the command line -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_compress_prints_the_new_version_as_json(hub: Hub) -> None:
    from tests.clitools import run_cli

    env = {"EDGEOPS_DATA_DIR": str(hub.root)}
    result = run_cli(
        "edgeops", "compress", hub.parent.id, "--quantize", "float16", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["id"].startswith("m-") and document["parent_id"] == hub.parent.id
    assert document["compression"]["quantization"] == "float16"
    assert document["metrics"]["accuracy"] > 0.8
    assert hub.registry.get_model(document["id"]).name == "digits-cnn-float16"


@pytest.mark.slow
def test_cli_compress_clusters_show_in_the_json(hub: Hub) -> None:
    from tests.clitools import run_cli

    result = run_cli(
        "edgeops",
        "compress",
        hub.parent.id,
        "--quantize",
        "dynamic",
        "--sparsity",
        "0.5",
        "--clusters",
        "8",
        "--epochs",
        "1",
        "--json",
        env=hub_env(hub),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["compression"]["clusters"] == 8
    assert document["metrics"]["kernel_distinct_values"] <= 8
    assert hub.registry.get_model(document["id"]).name == "digits-cnn-p50-c8-dynamic"
    bad = run_cli(
        "edgeops",
        "compress",
        hub.parent.id,
        "--quantize",
        "int8",
        "--clusters",
        "1",
        env=hub_env(hub),
    )
    assert bad.returncode != 0 and "clusters" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_cli_search_prints_the_pareto_front_marking_what_fits(hub: Hub) -> None:
    from tests.clitools import run_cli

    result = run_cli(
        "edgeops",
        "compress",
        hub.parent.id,
        "--profile",
        "cortex-m4-256k",
        "--widths",
        "1",
        "--sparsities",
        "0",
        "--modes",
        "int8,int16x8",
        "--workers",
        "1",
        env={"EDGEOPS_DATA_DIR": str(hub.root)},
    )
    assert result.returncode == 0, result.stderr
    assert "Pareto front for cortex-m4-256k" in result.stdout
    assert "int16x8" in result.stdout and "(best)" in result.stdout
    assert "candidates on the front" in result.stdout


@pytest.mark.parametrize(
    ("args", "needles", "code"),
    [
        (("--quantize", "int4"), ("unknown quantization mode 'int4'",), 1),
        (("--profile", "esp-eye"), ("unknown device profile 'esp-eye'", "cortex-m4-256k"), 1),
        ((), ("give --quantize MODE, --profile NAME, or both",), 2),
        (("--quantize", "int8", "--profile", "esp-eye"), ("unknown device profile 'esp-eye'",), 1),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(
    hub: Hub, args: tuple[str, ...], needles: tuple[str, ...], code: int
) -> None:
    from tests.clitools import run_cli

    result = run_cli(
        "edgeops", "compress", hub.parent.id, *args, env={"EDGEOPS_DATA_DIR": str(hub.root)}
    )
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_cli_malformed_profile_file_is_a_configuration_error(hub: Hub, tmp_path: Path) -> None:
    from tests.clitools import assert_one_line_error, run_cli

    bad = tmp_path / "profiles.toml"
    bad.write_text("[profiles.x]\nruntime = 'tflm'\n")
    result = run_cli(
        "edgeops",
        "compress",
        hub.parent.id,
        "--profile",
        "x",
        "--profiles",
        str(bad),
        env={"EDGEOPS_DATA_DIR": str(hub.root)},
    )
    assert result.returncode == 2
    assert_one_line_error(result, str(bad), "missing field 'flash_bytes'")
