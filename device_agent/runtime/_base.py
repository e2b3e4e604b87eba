"""What every runtime shares: the prediction, the interface, input checks and tensor coding."""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from device_agent.runtime._bundle import ModelBundle
from device_agent.runtime._errors import InferenceError, InputError

__all__ = ["Prediction", "Runtime", "TensorCodec", "check_sample"]

_QUANTIZED_DTYPES = ("int8", "uint8", "int16")
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


@dataclass(slots=True)
class Prediction:
    """One sample's result.

    ``probabilities`` are the dequantized float32 outputs (a single sigmoid output ``p`` of a
    binary classifier becomes ``[1 - p, p]``); ``label`` is their argmax and ``confidence``
    their maximum. ``latency_s`` is the runtime's own time for the sample: checks,
    preprocessing, quantization, invoke and dequantization. ``model_inputs`` is the float
    sample after the feature rule (shape ``rule.model_input_shape``), for the sketches.
    """

    probabilities: np.ndarray
    label: int
    confidence: float
    latency_s: float
    model_inputs: np.ndarray


def check_sample(raw: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    """``raw`` as an array of one raw sample of ``input_shape``; InputError if it is not."""
    if isinstance(raw, np.ndarray):
        sample = raw
    else:
        try:
            sample = np.asarray(raw)
        except (ValueError, TypeError) as exc:
            raise InputError(f"the sample is not an array of numbers: {exc}") from exc
    if sample.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"the sample must hold numbers, got dtype {sample.dtype}")
    if sample.shape != input_shape:
        raise InputError(
            f"the sample must have shape {list(input_shape)}, got shape {list(sample.shape)}"
        )
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        bad = int(sample.size - np.count_nonzero(np.isfinite(sample)))
        raise InputError(f"the sample holds {bad} NaN or infinite value(s)")
    return sample


class TensorCodec:
    """Real values to a tensor's stored values and back, in preallocated buffers.

    Quantized tensors (int8, uint8, int16 with a positive scale) use
    ``q = clip(round(x / scale) + zero_point)`` (round half to even, in float64: exactly what
    the hub does when it scores a model and writes its test vectors) and
    ``x = (q - zero_point) * scale``; other tensors are a plain cast.
    """

    def __init__(self, shape: tuple[int, ...], dtype: str, scale: float, zero_point: int) -> None:
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.scale = float(scale)
        self.zero_point = int(zero_point)
        self.quantized = self.scale > 0.0 and self.dtype.name in _QUANTIZED_DTYPES
        self.size = math.prod(shape)
        self._stored = np.zeros(shape, dtype=self.dtype)
        self._work = np.zeros(shape, dtype=np.float64)
        self._table: np.ndarray | None = None
        if self.quantized:
            info = np.iinfo(self.dtype)
            self._low, self._high = float(info.min), float(info.max)
            if self.dtype.itemsize == 1:
                # decoding 8-bit values is one lookup: table[i] is the value of the byte i;
                # an int8 q < 0 indexes from the end (256 + q), which is its byte
                stored = np.arange(256, dtype=np.uint8).view(self.dtype)
                self._table = self._dequantize(stored)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``x`` (same number of elements) as stored values; the returned buffer is reused."""
        x = x.reshape(self.shape)
        if not self.quantized:
            np.copyto(self._stored, x, casting="unsafe")
            return self._stored
        work = self._work  # ufuncs into preallocated buffers: no allocation per sample
        np.divide(x, self.scale, out=work, dtype=np.float64)
        np.rint(work, out=work)
        np.add(work, self.zero_point, out=work)
        np.minimum(work, self._high, out=work)
        np.maximum(work, self._low, out=work)
        np.copyto(self._stored, work, casting="unsafe")
        return self._stored

    def decode(self, q: np.ndarray) -> np.ndarray:
        """Stored values to a new, flat float32 array."""
        if not self.quantized:
            return np.array(q, dtype=np.float32).reshape(-1)
        if self._table is not None and q.dtype == self.dtype:
            values: np.ndarray = self._table[q.reshape(-1)]
            return values
        return self._dequantize(q)

    def _dequantize(self, q: np.ndarray) -> np.ndarray:
        real: np.ndarray = np.subtract(q.reshape(-1), self.zero_point, dtype=np.float64)
        np.multiply(real, self.scale, out=real)
        return real.astype(np.float32)


class Runtime(ABC):
    """A loaded model that answers one raw sample at a time.

    Subclasses set ``name`` and ``num_classes``. ``infer`` is safe to call from several
    threads (calls are serialised); ``close`` releases the model.
    """

    name: str
    model_id: str
    num_classes: int

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.model_id = bundle.model_id
        self.input_shape: tuple[int, ...] = bundle.rule.input_shape
        """The shape of one raw sample, before the feature rule."""
        self.num_classes = 0

    @abstractmethod
    def infer(self, raw: np.ndarray) -> Prediction:
        """Run one raw sample of ``input_shape``; InputError if it does not fit."""

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes hold nothing
        """Release what the runtime holds; it must not be used afterwards."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} model {self.model_id or '(unregistered)'}>"


class TensorRuntime(Runtime):
    """The per-sample path shared by the runtimes: check, preprocess, run, build the result.

    Subclasses implement :meth:`_run`: float model inputs ``(1, *model_input_shape)`` in, the
    dequantized outputs out (flat float32).
    """

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(bundle)
        self._apply = bundle.rule.apply
        self._lock = threading.Lock()
        self._closed = False

    @abstractmethod
    def _run(self, inputs: np.ndarray) -> np.ndarray: ...

    def _set_outputs(self, elements: int) -> None:
        # one sigmoid output is a binary classifier: report two classes
        self.num_classes = 2 if elements == 1 else elements

    def infer(self, raw: np.ndarray) -> Prediction:
        start = time.perf_counter()
        sample = check_sample(raw, self.input_shape)
        with self._lock:
            if self._closed:
                raise InferenceError(f"{self!r} is closed")
            inputs = self._apply(sample[None])
            outputs = self._run(inputs)
        if outputs.size == 1:
            outputs = np.array([1.0 - outputs[0], outputs[0]], dtype=np.float32)
        label = int(outputs.argmax())
        confidence = float(outputs[label])
        return Prediction(
            probabilities=outputs,
            label=label,
            confidence=confidence,
            latency_s=time.perf_counter() - start,
            model_inputs=inputs[0],
        )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    def _release(self) -> None:
        """Free the runtime's resources (called once, under the lock)."""
