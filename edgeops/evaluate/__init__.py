"""Evaluation on the runtime a device uses: LiteRT, ONNX Runtime, TFLite Micro.

    from edgeops.evaluate import evaluate_artifact, tflm_arena_bytes

    report = evaluate_artifact(tflite_bytes, "tflite", x_test, y_test)
    report.accuracy, report.size_bytes, report.gzip_bytes, report.latency_ms_median
    report.arena_bytes   # TFLM's arena, for a full-int8 model
    report.macs
    evaluate_artifact(tflite_bytes, "tflite", x_test, y_test, runtime="tflm")  # on TFLM itself
    tflm_evaluate(tflite_bytes, x_test, y_test).accuracy   # the TFLM score alone, or None

Keras is used only when the artifact itself is a Keras model (a reference figure). See
docs/training.md.
"""

from edgeops.evaluate.errors import EvaluationError, RuntimeLoadError, UnsupportedFormatError
from edgeops.evaluate.files import device_runtime, evaluate_file
from edgeops.evaluate.macs import keras_macs, onnx_macs, tflite_macs
from edgeops.evaluate.report import (
    EVAL_RUNTIMES,
    TASKS,
    EvalReport,
    evaluate_artifact,
    score_outputs,
)
from edgeops.evaluate.runtimes import FORMATS, Runner, TensorInfo, load_runner
from edgeops.evaluate.tflm import TflmScore, tflm_arena_bytes, tflm_evaluate, tflm_score

__all__ = [
    "EVAL_RUNTIMES",
    "FORMATS",
    "TASKS",
    "EvalReport",
    "EvaluationError",
    "Runner",
    "RuntimeLoadError",
    "TensorInfo",
    "TflmScore",
    "UnsupportedFormatError",
    "device_runtime",
    "evaluate_artifact",
    "evaluate_file",
    "keras_macs",
    "load_runner",
    "onnx_macs",
    "score_outputs",
    "tflite_macs",
    "tflm_arena_bytes",
    "tflm_evaluate",
    "tflm_score",
]
