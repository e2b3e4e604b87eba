"""Scoring an artifact on its device runtime: :func:`evaluate_artifact` and :class:`EvalReport`.

A .tflite is scored on LiteRT, or with ``runtime="tflm"`` on the TFLite Micro interpreter (a
microcontroller's runtime); an .onnx on ONNX Runtime; a Keras model on Keras, as a reference.
"""

from __future__ import annotations

import gzip
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeops.evaluate.errors import EvaluationError, UnsupportedFormatError
from edgeops.evaluate.macs import keras_macs, onnx_macs, tflite_macs
from edgeops.evaluate.runtimes import (
    KerasRunner,
    LiteRTRunner,
    Runner,
    check_inputs,
    load_runner,
)
from edgeops.evaluate.tflm import TFLM_MAX_SAMPLES, tflm_arena_bytes, tflm_score

__all__ = [
    "EVAL_RUNTIMES",
    "LATENCY_REPEATS",
    "TASKS",
    "EvalReport",
    "evaluate_artifact",
    "score_outputs",
]

TASKS = ("classification", "anomaly")
EVAL_RUNTIMES = ("litert", "onnxruntime", "keras", "tflm")
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class EvalReport:
    """What a model measured on its runtime: quality, size, memory, speed, compute."""

    format: str
    runtime: str
    """``litert``, ``onnxruntime``, ``tflm`` (TFLite Micro) or ``keras`` (reference only)."""
    task: str
    num_samples: int
    """The samples scored (on ``tflm``: at most :data:`TFLM_MAX_SAMPLES`, evenly spaced)."""
    accuracy: float | None
    """Top-1 accuracy (classification), else None."""
    auc: float | None
    """ROC AUC of the reconstruction error (anomaly detection), else None."""
    size_bytes: int
    gzip_bytes: int
    latency_ms_median: float
    """Median of repeated single-sample invokes on this machine's CPU, one thread (on
    ``tflm``: of the scored samples' invokes, on TFLM's reference kernels)."""
    arena_bytes: int | None
    """TFLite Micro tensor arena (full-int8 .tflite only), else None."""
    macs: int
    """Multiply-accumulates per inference (convolutions and dense layers)."""
    input_dtype: str
    output_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_artifact(
    artifact: bytes,
    format: str,
    x_model_inputs: np.ndarray,
    y: np.ndarray,
    *,
    task: str = "classification",
    latency_repeats: int = LATENCY_REPEATS,
    runtime: str | None = None,
    max_samples: int = TFLM_MAX_SAMPLES,
) -> EvalReport:
    """Score ``artifact`` (``tflite``, ``onnx``, or ``keras`` for reference) on labelled data.

    ``x_model_inputs`` are float model inputs (the feature rule applied); ``y`` are class
    indices. For ``task="anomaly"`` the score is the ROC AUC of the mean squared
    reconstruction error, with class 0 normal and every other class an anomaly.

    ``runtime`` defaults to the format's (LiteRT, ONNX Runtime, Keras); ``"tflm"`` scores a
    .tflite on the TFLite Micro interpreter, one invoke per sample, on at most
    ``max_samples`` samples (evenly spaced; the report's ``num_samples`` says how many), and
    raises :class:`RuntimeLoadError` if TFLM cannot run the model.
    """
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    x = np.asarray(x_model_inputs, dtype=np.float32)
    labels = np.asarray(y).reshape(-1)
    if len(x) == 0:
        raise EvaluationError("no samples to evaluate on")
    if len(labels) != len(x):
        raise EvaluationError(f"{len(x)} samples but {len(labels)} labels")
    if runtime == "tflm":
        return _evaluate_on_tflm(artifact, format, x, labels, task, max_samples)
    runner = load_runner(artifact, format)
    if runtime is not None and runtime != runner.runtime:
        raise UnsupportedFormatError(
            f"a {format} model runs on {runner.runtime}, not {runtime!r}; runtimes: "
            f"{', '.join(EVAL_RUNTIMES)} (tflm: .tflite only)"
        )
    outputs = runner.run(x)
    accuracy, auc = score_outputs(outputs, x, labels, task)
    return EvalReport(
        format=format,
        runtime=runner.runtime,
        task=task,
        num_samples=len(x),
        accuracy=accuracy,
        auc=auc,
        size_bytes=len(artifact),
        gzip_bytes=len(gzip.compress(bytes(artifact), compresslevel=9, mtime=0)),
        latency_ms_median=runner.latency_ms(x[0], latency_repeats),
        arena_bytes=_arena(artifact, format, runner),
        macs=_macs(artifact, format, runner),
        input_dtype=runner.input.dtype,
        output_dtype=runner.output.dtype,
    )


def _evaluate_on_tflm(
    artifact: bytes, format: str, x: np.ndarray, labels: np.ndarray, task: str, max_samples: int
) -> EvalReport:
    """The report of a .tflite scored on the TFLite Micro interpreter."""
    if format != "tflite":
        raise UnsupportedFormatError(f"TFLite Micro runs .tflite models, not {format}")
    tensors = LiteRTRunner(artifact)  # the tensors' shapes and dtypes, as the flatbuffer says
    check_inputs(x, tuple(int(d or 0) for d in tensors.input.shape[1:]))
    score = tflm_score(artifact, x, labels, task=task, max_samples=max_samples)
    return EvalReport(
        format=format,
        runtime=score.runtime,
        task=task,
        num_samples=score.num_samples,
        accuracy=score.accuracy,
        auc=score.auc,
        size_bytes=len(artifact),
        gzip_bytes=len(gzip.compress(bytes(artifact), compresslevel=9, mtime=0)),
        latency_ms_median=score.latency_ms_median,
        arena_bytes=score.arena_bytes,
        macs=tflite_macs(artifact),
        input_dtype=tensors.input.dtype,
        output_dtype=tensors.output.dtype,
    )


def score_outputs(
    outputs: np.ndarray, x: np.ndarray, labels: np.ndarray, task: str
) -> tuple[float | None, float | None]:
    """``(accuracy, auc)`` of a model's float outputs; the one that does not apply is None."""
    if task == "anomaly":
        from sklearn.metrics import roc_auc_score

        from edgeops.train.trainer import NORMAL_CLASS, anomaly_scores

        anomalous = (labels != NORMAL_CLASS).astype(np.int64)
        if anomalous.min() == anomalous.max():
            raise EvaluationError(
                "AUC needs both normal (class 0) and anomalous samples in the data"
            )
        return None, float(roc_auc_score(anomalous, anomaly_scores(outputs, x)))
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        raise EvaluationError(
            f"a classifier's output must be (samples, classes), got {list(outputs.shape)}"
        )
    if labels.min() < 0 or labels.max() >= outputs.shape[1]:
        raise EvaluationError(
            f"labels must be class indices 0..{outputs.shape[1] - 1}, got "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return float(np.mean(outputs.argmax(axis=1) == labels)), None


def _arena(artifact: bytes, format: str, runner: Runner) -> int | None:
    # tflite-micro plans every .tflite it has kernels for (int8, 16x8 and float); a model
    # it cannot run (e.g. float16 or dynamic-range weights) has no arena figure
    if format == "tflite":
        return tflm_arena_bytes(artifact)
    return None


def _macs(artifact: bytes, format: str, runner: Runner) -> int:
    if format == "tflite":
        return tflite_macs(artifact)
    if format == "onnx":
        return onnx_macs(artifact)
    assert isinstance(runner, KerasRunner)
    return keras_macs(runner.model)
