"""The training service: a dataset version and an architecture in, a registered model out.

One call is one recorded run (kind ``train``) holding the parameters, the metrics and the
outcome; the model version it registers points at the run, the dataset version and the code
version, so the same inputs can be trained again and compared (docs/training.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.sketch import ReferenceStats
from edgeops.train.trainer import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LEARNING_RATE,
    check_training_parameters,
    predict,
    save_keras,
    train_model,
)
from edgeops.train.zoo import TASK_CLASSIFICATION, task_of

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import ModelVersionView, Registry

__all__ = ["DEFAULT_EPOCHS", "ERROR_BINS", "TrainService", "output_reference"]

DEFAULT_EPOCHS = 10
ERROR_BINS = 16  # quantile bins of an autoencoder's reconstruction error (as for features)


class TrainService:
    """Trains zoo architectures on registered datasets and registers the results."""

    def __init__(self, datasets: DatasetService, registry: Registry) -> None:
        self._datasets = datasets
        self._registry = registry

    def train(
        self,
        dataset_ref: str,
        arch: str,
        *,
        epochs: int = DEFAULT_EPOCHS,
        seed: int = 0,
        width: float = 1.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str | None = None,
        progress: bool = True,
        evaluate_on_runtime: bool = True,
    ) -> ModelVersionView:
        """Train ``arch`` on ``dataset_ref`` and register the Keras model (format ``keras``).

        The model's name defaults to ``<dataset name>-<arch>``. Metrics are the float
        model's on the test split (Keras), plus, with ``evaluate_on_runtime``, the same model
        converted to a float .tflite and scored on LiteRT (``tflite_*``, size, latency,
        MACs). The card records the reference of the model's outputs for drift detection:
        a classifier's class and confidence histograms, an autoencoder's
        reconstruction-error histogram, on the validation split.
        """
        check_training_parameters(arch, epochs=epochs, width=width, batch_size=batch_size)
        dataset = self._datasets.resolve(dataset_ref)
        arrays = self._datasets.load(dataset.version)
        task = task_of(arch)
        params: dict[str, Any] = {
            "dataset": dataset.version,
            "dataset_name": dataset.name,
            "arch": arch,
            "epochs": epochs,
            "seed": seed,
            "width": width,
            "batch_size": batch_size,
        }
        with self._registry.start_run("train", params) as run:
            run.log(f"training {arch} on {dataset.name} ({dataset.version[:12]})")
            model, metrics = train_model(
                arrays,
                arch,
                epochs=epochs,
                seed=seed,
                width=width,
                batch_size=batch_size,
                progress=progress,
            )
            x_val = np.asarray(arrays.model_inputs("val"), dtype=np.float32)
            x_test = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
            reference = output_reference(dataset.reference, predict(model, x_val), x_val, task)
            artifact = save_keras(model)
            if evaluate_on_runtime:
                metrics.update(_runtime_metrics(model, x_test, arrays.y_test, task))
            run.log_metrics(metrics)
            from edgeops.export.card import build_card

            card = build_card(
                name=name or f"{dataset.name}-{arch}",
                artifact=artifact,
                format="keras",
                task=task,
                feature_rule=dataset.feature_rule,
                reference=reference,
                sample_inputs=x_test,
                sample_labels=np.asarray(arrays.y_test),
                metrics=metrics,
                lineage={"dataset_version": dataset.version, "run_id": run.id},
            )
            config = {
                "arch": arch,
                "task": task,
                "width": width,
                "epochs": epochs,
                "seed": seed,
                "batch_size": batch_size,
                "optimizer": "adam",
                "learning_rate": DEFAULT_LEARNING_RATE,
                "input_shape": list(x_test.shape[1:]),
                "num_classes": len(arrays.classes),
                "classes": list(arrays.classes),
            }
            view = self._registry.register_model(
                name=name or f"{dataset.name}-{arch}",
                artifact=artifact,
                format="keras",
                run_id=run.id,
                dataset_version=dataset.version,
                parent_id=None,
                config=config,
                metrics=metrics,
                card=card,
            )
            run.log(f"registered {view.ref} ({view.id})")
        return view


def output_reference(
    reference: ReferenceStats, outputs: np.ndarray, x_model_inputs: np.ndarray, task: str
) -> ReferenceStats:
    """The dataset's feature reference plus the reference of a model's outputs on the
    validation split (``outputs`` for ``x_model_inputs``).

    A classifier adds its class and confidence histograms (:meth:`ReferenceStats.with_outputs`);
    an anomaly model (autoencoder) adds the histogram of its mean squared reconstruction
    error: ``reconstruction_error_edges`` (the inner quantile edges, :data:`ERROR_BINS` bins,
    duplicates collapsed, as for features) and ``reconstruction_error_counts``.
    """
    if task == TASK_CLASSIFICATION:
        return reference.with_outputs(outputs)
    from device_agent.sketch import bin_counts, quantile_edges
    from edgeops.train.trainer import anomaly_scores

    errors = anomaly_scores(outputs, x_model_inputs)
    edges = quantile_edges(errors, ERROR_BINS)
    extra = {
        **reference.extra,
        "reconstruction_error_edges": [float(e) for e in edges],
        "reconstruction_error_counts": [int(c) for c in bin_counts(errors, edges)],
    }
    return ReferenceStats.from_dict({**reference.to_dict(), **extra})


def _runtime_metrics(model: Any, x: np.ndarray, y: np.ndarray, task: str) -> dict[str, Any]:
    """The float model on LiteRT: score, size, latency, MACs (prefixed ``tflite_``)."""
    from edgeops.evaluate import evaluate_artifact
    from edgeops.export.convert import keras_to_tflite_float

    report = evaluate_artifact(keras_to_tflite_float(model), "tflite", x, y, task=task)
    score = "accuracy" if task == TASK_CLASSIFICATION else "auc"
    return {
        f"tflite_{score}": getattr(report, score),
        "tflite_size_bytes": report.size_bytes,
        "tflite_gzip_bytes": report.gzip_bytes,
        "latency_ms_median": report.latency_ms_median,
        "macs": report.macs,
    }
