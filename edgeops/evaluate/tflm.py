"""The tensor arena a .tflite model needs on TensorFlow Lite Micro.

The figure comes from TFLM itself: the ``tflite_micro`` Python interpreter plans the model
with its recording allocator, runs it once, and reports the arena it used (head: the
non-persistent tensors of the memory plan; tail: persistent buffers, tensor and node
structs). That total is what a firmware's ``tensor_arena`` must hold on a 64-bit host; a
32-bit MCU needs a little less for the pointer-sized structs.

:func:`tflm_evaluate` scores a model on TFLM itself: every sample is quantized with the input
tensor's scale and zero point (as the agent and the firmware do), invoked one at a time on
the TFLM interpreter, and the output tensors are dequantized and scored like LiteRT's
(accuracy, or AUC for an autoencoder). The same child process reports the arena.

TFLM aborts the process on a model it cannot prepare, so the interpreter runs in a child
process; a model it cannot run has no arena figure (None), with the reason logged.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TFLM_MAX_SAMPLES",
    "TFLM_TIMEOUT_S",
    "TflmScore",
    "tflm_arena_bytes",
    "tflm_evaluate",
    "tflm_outputs",
]

log = logging.getLogger(__name__)

TFLM_TIMEOUT_S = 120.0
TFLM_MAX_SAMPLES = 2000
"""At most this many samples per :func:`tflm_evaluate` call (evenly spaced), bounding its time:
a few hundred small-CNN invokes take about a second on one core."""
_TOTAL = re.compile(rb"Arena allocation total (\d+) bytes")


def tflm_arena_bytes(tflite: bytes) -> int | None:
    """The arena bytes TFLM uses for ``tflite``; None if TFLM cannot run the model."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgeops.evaluate._tflm_probe"],
            input=bytes(tflite),
            capture_output=True,
            timeout=TFLM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("TFLM did not finish planning the model within %.0f s", TFLM_TIMEOUT_S)
        return None
    match = _TOTAL.search(result.stderr)
    if result.returncode != 0 or match is None:
        reason = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [
            f"exit status {result.returncode}"
        ]
        log.warning("TFLM cannot run the model: %s", reason[0])
        return None
    return int(match.group(1))


def tflm_outputs(tflite: bytes, inputs: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The output tensors TFLM computes for a batch of input tensors (in the input tensor's
    own dtype, one sample per row), with the arena bytes; None if TFLM cannot run the model."""
    payload = io.BytesIO()
    np.savez(payload, model=np.frombuffer(bytes(tflite), dtype=np.uint8), inputs=inputs)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgeops.evaluate._tflm_probe", "--run"],
            input=payload.getvalue(),
            capture_output=True,
            timeout=TFLM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("TFLM did not score %d samples within %.0f s", len(inputs), TFLM_TIMEOUT_S)
        return None
    match = _TOTAL.search(result.stderr)
    if result.returncode != 0 or match is None:
        reason = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [
            f"exit status {result.returncode}"
        ]
        log.warning("TFLM cannot run the model: %s", reason[0])
        return None
    outputs: np.ndarray = np.load(io.BytesIO(result.stdout), allow_pickle=False)
    return outputs, int(match.group(1))


@dataclass(frozen=True)
class TflmScore:
    """A model scored on the TFLM interpreter."""

    accuracy: float | None
    auc: float | None
    num_samples: int
    arena_bytes: int

    @property
    def score(self) -> float:
        """Accuracy, or AUC for an anomaly model."""
        value = self.auc if self.accuracy is None else self.accuracy
        assert value is not None
        return value


def tflm_evaluate(
    tflite: bytes,
    x_model_inputs: np.ndarray,
    y: np.ndarray,
    *,
    task: str = "classification",
    max_samples: int = TFLM_MAX_SAMPLES,
) -> TflmScore | None:
    """Score ``tflite`` on the TFLM interpreter over labelled float model inputs (the
    feature rule applied); None if TFLM cannot run the model (a float16 or dynamic-range
    model, an op TFLM lacks). At most ``max_samples`` samples, evenly spaced."""
    from edgeops.evaluate.report import score_outputs
    from edgeops.evaluate.runtimes import LiteRTRunner

    x = np.asarray(x_model_inputs, dtype=np.float32)
    labels = np.asarray(y).reshape(-1)
    if len(x) > max_samples:
        index = np.linspace(0, len(x) - 1, max_samples).round().astype(np.int64)
        x, labels = x[index], labels[index]
    tensors = LiteRTRunner(tflite)  # the tensors' dtypes, scales and zero points
    ran = tflm_outputs(tflite, tensors.input.quantize(x))
    if ran is None:
        return None
    raw, arena = ran
    outputs = tensors.output.dequantize(raw).reshape(len(x), -1)
    accuracy, auc = score_outputs(outputs, x, labels, task)
    return TflmScore(accuracy=accuracy, auc=auc, num_samples=len(x), arena_bytes=arena)
