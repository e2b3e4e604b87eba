"""TensorFlow Lite Micro: a model's tensor arena, and its scores on the TFLM interpreter.

The arena figure comes from TFLM itself: the ``tflite_micro`` Python interpreter plans the
model with its recording allocator, runs it once, and reports the arena it used (head: the
non-persistent tensors of the memory plan; tail: persistent buffers, tensor and node
structs). That total is what a firmware's ``tensor_arena`` must hold on a 64-bit host; a
32-bit MCU needs a little less for the pointer-sized structs.

:func:`tflm_score` scores a model on TFLM itself: every sample is quantized with the input
tensor's scale and zero point (as the agent and the firmware do), invoked one at a time
(batch of 1) on the TFLM interpreter, and the output tensors are dequantized and scored like
LiteRT's (accuracy, or AUC for an autoencoder). The same child process reports the arena and
the median wall time of one invoke on this CPU (TFLM's reference kernels: a relative figure,
not an MCU's latency). :func:`tflm_evaluate` is the same, with None for a model TFLM cannot
run.

TFLM aborts the process on a model it cannot prepare, so the interpreter runs in a child
process (:mod:`edgeops.evaluate._tflm_probe`); a model it cannot run has no arena figure
(None), with the reason logged, and no score.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgeops.evaluate.errors import RuntimeLoadError

__all__ = [
    "TFLM_MAX_SAMPLES",
    "TFLM_TIMEOUT_S",
    "TflmRun",
    "TflmScore",
    "tflm_arena_bytes",
    "tflm_evaluate",
    "tflm_outputs",
    "tflm_run",
    "tflm_score",
]

log = logging.getLogger(__name__)

TFLM_TIMEOUT_S = 120.0
TFLM_MAX_SAMPLES = 2000
"""At most this many samples per scoring call (evenly spaced), bounding its time: a few
hundred small-CNN invokes take about a second on one core. The count used is reported."""
_TOTAL = re.compile(rb"Arena allocation total (\d+) bytes")
_MEDIAN = re.compile(rb"median invoke ms: ([0-9.eE+-]+)")


def _probe(arguments: list[str], stdin: bytes, what: str) -> subprocess.CompletedProcess[bytes]:
    """The probe's completed process; :class:`RuntimeLoadError` with TFLM's last words if
    it failed, timed out, or printed no arena report."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgeops.evaluate._tflm_probe", *arguments],
            input=stdin,
            capture_output=True,
            timeout=TFLM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeLoadError(
            f"TFLM did not finish {what} within {TFLM_TIMEOUT_S:.0f} s"
        ) from None
    if result.returncode != 0 or _TOTAL.search(result.stderr) is None:
        last = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
        reason = last[0] if last else f"exit status {result.returncode}"
        raise RuntimeLoadError(f"TFLM cannot run the model: {reason}")
    return result


def _arena(result: subprocess.CompletedProcess[bytes]) -> int:
    match = _TOTAL.search(result.stderr)
    assert match is not None  # checked by _probe
    return int(match.group(1))


def tflm_arena_bytes(tflite: bytes) -> int | None:
    """The arena bytes TFLM uses for ``tflite``; None if TFLM cannot run the model."""
    try:
        return _arena(_probe([], bytes(tflite), "planning the model"))
    except RuntimeLoadError as exc:
        log.warning("%s", exc)
        return None


@dataclass(frozen=True)
class TflmRun:
    """What one run of a batch on the TFLM interpreter gave."""

    outputs: np.ndarray
    """The output tensors as TFLM holds them (int8 for a full-integer model, float32 for one
    whose output a DEQUANTIZE makes), one row per sample."""
    arena_bytes: int
    invoke_ms_median: float
    """Median wall time of one invoke on this CPU (TFLM's reference kernels)."""


def tflm_run(tflite: bytes, inputs: np.ndarray) -> TflmRun:
    """Run a batch of input tensors (in the input tensor's own dtype, one sample per row:
    float32 for a model whose input a QUANTIZE reads) on the TFLM interpreter, one invoke per
    sample; :class:`RuntimeLoadError` if TFLM cannot."""
    payload = io.BytesIO()
    np.savez(payload, model=np.frombuffer(bytes(tflite), dtype=np.uint8), inputs=inputs)
    result = _probe(["--run"], payload.getvalue(), f"scoring {len(inputs)} samples")
    outputs: np.ndarray = np.load(io.BytesIO(result.stdout), allow_pickle=False)
    median = _MEDIAN.search(result.stderr)
    return TflmRun(outputs, _arena(result), float(median.group(1)) if median else 0.0)


def tflm_outputs(tflite: bytes, inputs: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The output tensors TFLM computes for a batch of input tensors (in the input tensor's
    own dtype, one sample per row), with the arena bytes; None if TFLM cannot run the model."""
    try:
        ran = tflm_run(tflite, inputs)
    except RuntimeLoadError as exc:
        log.warning("%s", exc)
        return None
    return ran.outputs, ran.arena_bytes


@dataclass(frozen=True)
class TflmScore:
    """A model scored on the TFLM interpreter."""

    accuracy: float | None
    auc: float | None
    num_samples: int
    """How many samples were invoked and scored (at most ``max_samples``)."""
    arena_bytes: int
    latency_ms_median: float = 0.0
    """Median wall time of one invoke on this CPU (TFLM's reference kernels)."""
    runtime: str = "tflm"

    @property
    def score(self) -> float:
        """Accuracy, or AUC for an anomaly model."""
        value = self.auc if self.accuracy is None else self.accuracy
        assert value is not None
        return value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evenly_spaced(
    x: np.ndarray, labels: np.ndarray, max_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_samples`` samples with their labels, evenly spaced (deterministic)."""
    if len(x) <= max_samples:
        return x, labels
    index = np.linspace(0, len(x) - 1, max_samples).round().astype(np.int64)
    return x[index], labels[index]


def tflm_score(
    tflite: bytes,
    x_model_inputs: np.ndarray,
    y: np.ndarray,
    *,
    task: str = "classification",
    max_samples: int = TFLM_MAX_SAMPLES,
) -> TflmScore:
    """Score ``tflite`` on the TFLM interpreter over labelled float model inputs (the
    feature rule applied), at most ``max_samples`` of them, evenly spaced.

    :class:`RuntimeLoadError` if TFLM cannot run the model (a float16 or dynamic-range
    model, an op TFLM lacks), with TFLM's reason.
    """
    from edgeops.evaluate.report import score_outputs
    from edgeops.evaluate.runtimes import LiteRTRunner

    x, labels = evenly_spaced(
        np.asarray(x_model_inputs, dtype=np.float32), np.asarray(y).reshape(-1), max_samples
    )
    tensors = LiteRTRunner(tflite)  # the tensors' dtypes, scales and zero points
    ran = tflm_run(tflite, tensors.input.quantize(x))
    outputs = tensors.output.dequantize(ran.outputs).reshape(len(x), -1)
    accuracy, auc = score_outputs(outputs, x, labels, task)
    return TflmScore(
        accuracy=accuracy,
        auc=auc,
        num_samples=len(x),
        arena_bytes=ran.arena_bytes,
        latency_ms_median=ran.invoke_ms_median,
    )


def tflm_evaluate(
    tflite: bytes,
    x_model_inputs: np.ndarray,
    y: np.ndarray,
    *,
    task: str = "classification",
    max_samples: int = TFLM_MAX_SAMPLES,
) -> TflmScore | None:
    """:func:`tflm_score`, or None (the reason logged) if TFLM cannot run the model."""
    try:
        return tflm_score(tflite, x_model_inputs, y, task=task, max_samples=max_samples)
    except RuntimeLoadError as exc:
        log.warning("%s", exc)
        return None
