"""Seeded training of a zoo architecture on a dataset version, and Keras (de)serialisation.

Classifiers train with Adam and sparse categorical cross-entropy on the train split,
watching the validation split; their metrics are computed on the test split. The autoencoder
learns to reconstruct the samples of the *normal* class (class index 0, the dataset's first
class) and is scored by the ROC AUC of its reconstruction error on the test split, where every
other class counts as an anomaly.

What is seeded, and what TensorFlow cannot make deterministic, is in docs/training.md.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeops._tf import enable_determinism, load_tf
from edgeops.train.errors import ModelFormatError, TrainError
from edgeops.train.zoo import TASK_ANOMALY, build_model, check_architecture, task_of

if TYPE_CHECKING:
    from edgeops.data import DatasetArrays

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LEARNING_RATE",
    "NORMAL_CLASS",
    "anomaly_scores",
    "check_training_parameters",
    "load_keras",
    "save_keras",
    "train_model",
]

DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 1e-3
NORMAL_CLASS = 0
"""The autoencoder's normal class: index 0 of the dataset's classes; the others are anomalies."""

Model = Any  # tf_keras.Model


def train_model(
    arrays: DatasetArrays,
    arch: str,
    *,
    epochs: int,
    seed: int,
    width: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> tuple[Model, dict[str, Any]]:
    """Train ``arch`` on ``arrays``; returns the fitted model and its float metrics.

    Metrics (Keras, float32, test split): ``accuracy`` and ``loss`` for classifiers, ``auc``
    and ``loss`` (reconstruction MSE of normal samples) for the autoencoder; also the same
    score on the validation split (``val_accuracy`` / ``val_auc``), ``train_loss`` of the last
    epoch, ``params`` and ``epochs``.
    """
    check_training_parameters(
        arch, epochs=epochs, width=width, batch_size=batch_size, learning_rate=learning_rate
    )
    task = task_of(arch)
    x = {split: _model_inputs(arrays, split) for split in ("train", "val", "test")}
    y = {
        split: np.asarray(getattr(arrays, f"y_{split}"), dtype=np.int64)
        for split in ("train", "val", "test")
    }
    _tf, tf_keras = load_tf()
    enable_determinism(seed)
    model = build_model(
        arch, tuple(x["train"].shape[1:]), len(arrays.classes), width=width, seed=seed
    )
    optimizer = tf_keras.optimizers.Adam(learning_rate=learning_rate)
    if task == TASK_ANOMALY:
        x_fit, y_fit = _normal(x["train"], y["train"], arrays, "train")
        x_val, y_val = _normal(x["val"], y["val"], arrays, "val")
        model.compile(optimizer=optimizer, loss="mse")
    else:
        x_fit, y_fit, x_val, y_val = x["train"], y["train"], x["val"], y["val"]
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    steps = math.ceil(len(x_fit) / batch_size)
    callbacks: list[Any] = []
    if progress:
        from edgeops.train._progress import progress_callback

        callbacks.append(progress_callback(f"train {arch} on {arrays.name}", epochs, steps))
    try:
        history = model.fit(
            x_fit,
            y_fit,
            validation_data=(x_val, y_val),
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            verbose=0,
            callbacks=callbacks,
        )
    finally:
        for callback in callbacks:
            callback.close()
    metrics: dict[str, Any] = {
        "train_loss": float(history.history["loss"][-1]),
        "params": int(model.count_params()),
        "epochs": epochs,
    }
    if task == TASK_ANOMALY:
        from sklearn.metrics import roc_auc_score

        x_normal, target = _normal(x["test"], y["test"], arrays, "test")
        metrics["loss"] = float(model.evaluate(x_normal, target, verbose=0))
        for split, key in (("test", "auc"), ("val", "val_auc")):
            labels = (y[split] != NORMAL_CLASS).astype(np.int64)
            if labels.min() == labels.max():
                raise TrainError(
                    f"dataset {arrays.name!r}: the {split} split needs normal and anomalous "
                    "samples to score the autoencoder"
                )
            scores = anomaly_scores(predict(model, x[split]), x[split])
            metrics[key] = float(roc_auc_score(labels, scores))
    else:
        metrics["loss"] = float(model.evaluate(x["test"], y["test"], verbose=0))
        for split, key in (("test", "accuracy"), ("val", "val_accuracy")):
            predicted = predict(model, x[split]).argmax(axis=1)
            metrics[key] = float(np.mean(predicted == y[split]))
    return model, metrics


def check_training_parameters(
    arch: str,
    *,
    epochs: int,
    width: float,
    batch_size: int,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> None:
    """Refuse parameters no training can use, before any work starts."""
    check_architecture(arch)
    if epochs < 1:
        raise TrainError(f"epochs must be at least 1, got {epochs}")
    if not (math.isfinite(width) and 0.0 < width <= 8.0):
        raise TrainError(f"width must be in (0, 8], got {width}")
    if batch_size < 1:
        raise TrainError(f"batch size must be at least 1, got {batch_size}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise TrainError(f"learning rate must be a positive number, got {learning_rate}")


def predict(model: Model, x: np.ndarray) -> np.ndarray:
    """The model's float outputs for a batch of model inputs."""
    return np.asarray(model.predict(x, verbose=0, batch_size=256), dtype=np.float32)


def anomaly_scores(reconstruction: np.ndarray, x_model_inputs: np.ndarray) -> np.ndarray:
    """Mean squared reconstruction error per sample (higher: more anomalous)."""
    flat = np.asarray(x_model_inputs, dtype=np.float32).reshape(len(x_model_inputs), -1)
    out = np.asarray(reconstruction, dtype=np.float32).reshape(len(flat), -1)
    return np.asarray(np.mean((out - flat) ** 2, axis=1), dtype=np.float64)


def _model_inputs(arrays: DatasetArrays, split: str) -> np.ndarray:
    x = np.asarray(arrays.model_inputs(split), dtype=np.float32)
    if len(x) == 0:
        raise TrainError(f"dataset {arrays.name!r}: the {split} split is empty")
    if not np.isfinite(x).all():
        raise TrainError(f"dataset {arrays.name!r}: the {split} split has NaN or infinite inputs")
    return x


def _normal(
    x: np.ndarray, y: np.ndarray, arrays: DatasetArrays, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """The normal samples of a split, and their flattened selves as the target."""
    normal = x[y == NORMAL_CLASS]
    if len(normal) == 0:
        raise TrainError(
            f"dataset {arrays.name!r}: the {split} split has no samples of the normal class "
            f"{arrays.classes[NORMAL_CLASS]!r} (class 0) to train the autoencoder on"
        )
    return normal, normal.reshape(len(normal), -1)


def save_keras(model: Model) -> bytes:
    """The model as the bytes of a ``.keras`` file (architecture, weights, optimizer state)."""
    with tempfile.TemporaryDirectory(prefix="edgeops-keras-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return path.read_bytes()


def load_keras(artifact: bytes) -> Model:
    """A Keras model from the bytes of a ``.keras`` (or legacy ``.h5``) file."""
    _tf, tf_keras = load_tf()
    suffix = ".h5" if artifact[:8] == b"\x89HDF\r\n\x1a\n" else ".keras"
    with tempfile.TemporaryDirectory(prefix="edgeops-keras-") as tmp:
        path = Path(tmp) / f"model{suffix}"
        path.write_bytes(artifact)
        try:
            return tf_keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelFormatError(f"the artifact is not a loadable Keras model: {first}") from exc
