"""Running an artifact on the runtime a device uses: LiteRT for .tflite, ONNX Runtime for .onnx.

A :class:`Runner` takes float model inputs (the feature rule's output) and returns float
outputs. For a quantized .tflite it quantizes each input with the input tensor's scale and
zero point and dequantizes the output the same way, exactly as the agent does on a device.
Samples go through one at a time (batch 1, as on a device); ``raw`` gives the tensors as the
runtime holds them (int8 for a full-integer model), which is what test vectors record.
Keras runs only as the reference for a ``keras`` artifact.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeops.evaluate.errors import RuntimeLoadError, UnsupportedFormatError

__all__ = [
    "FORMATS",
    "KerasRunner",
    "LiteRTRunner",
    "OnnxRunner",
    "Runner",
    "TensorInfo",
    "check_inputs",
    "load_runner",
]

FORMATS = ("keras", "tflite", "onnx")
_LATENCY_WARMUP = 3


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor as the runtime sees it."""

    name: str
    shape: list[int | None]
    dtype: str
    scale: float = 0.0
    """Quantization scale; 0 when the tensor is not quantized."""
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.dtype in ("int8", "uint8", "int16")

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Real values to this tensor's stored values (``round(x / scale) + zero_point``)."""
        if not self.quantized:
            return np.asarray(x, dtype=self.dtype)
        info = np.iinfo(np.dtype(self.dtype))
        q = np.round(np.asarray(x, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Stored values to real values (float32)."""
        if not self.quantized:
            return np.asarray(q, dtype=np.float32)
        return ((np.asarray(q, dtype=np.float64) - self.zero_point) * self.scale).astype(np.float32)


class Runner(Protocol):
    """A loaded model on one runtime."""

    runtime: str
    input: TensorInfo
    output: TensorInfo

    def raw(self, sample: np.ndarray) -> np.ndarray:
        """Run one sample given as the input tensor's stored values; the output tensor."""
        ...

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float outputs for a batch of float model inputs."""
        ...

    def latency_ms(self, sample: np.ndarray, repeats: int) -> float:
        """Median wall time of ``repeats`` single invokes on ``sample`` (float input)."""
        ...


def load_runner(artifact: bytes, format: str) -> Runner:
    """A runner for ``artifact``: LiteRT for ``tflite``, ONNX Runtime for ``onnx``, Keras for
    ``keras``."""
    if format == "tflite":
        return LiteRTRunner(artifact)
    if format == "onnx":
        return OnnxRunner(artifact)
    if format == "keras":
        return KerasRunner(artifact)
    raise UnsupportedFormatError(
        f"cannot evaluate format {format!r}; formats: {', '.join(FORMATS)}"
    )


def _median_ms(invoke: Any, repeats: int) -> float:
    for _ in range(_LATENCY_WARMUP):
        invoke()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def _batch_one(shape: list[int | None]) -> bool:
    return bool(shape) and shape[0] == 1


class LiteRTRunner:
    """A .tflite on the LiteRT interpreter (``ai_edge_litert``), one thread."""

    runtime = "litert"

    def __init__(self, artifact: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from edgeops._tf import native_stderr_silenced

        try:
            with native_stderr_silenced():  # "Created TensorFlow Lite XNNPACK delegate"
                self._interpreter = Interpreter(model_content=bytes(artifact), num_threads=1)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeLoadError(f"LiteRT cannot load the model: {_first_line(exc)}") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeLoadError(
                f"the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                "EdgeOps models have one of each"
            )
        self._in, self._out = inputs[0], outputs[0]
        self.input = _litert_info(self._in)
        self.output = _litert_info(self._out)
        self._sample_shape = tuple(int(d) for d in self._in["shape"][1:])

    def raw(self, sample: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._in["index"], sample.reshape(self._in["shape"]))
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._out["index"]))

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_inputs(x, self._sample_shape)
        outputs = [self.output.dequantize(self.raw(self.input.quantize(s[None]))) for s in x]
        return np.concatenate(outputs, axis=0) if outputs else np.zeros((0,), np.float32)

    def latency_ms(self, sample: np.ndarray, repeats: int) -> float:
        q = self.input.quantize(np.asarray(sample, np.float32)[None]).reshape(self._in["shape"])
        self._interpreter.set_tensor(self._in["index"], q)
        return _median_ms(self._interpreter.invoke, repeats)


def _litert_info(details: dict[str, Any]) -> TensorInfo:
    scale, zero_point = details.get("quantization", (0.0, 0))
    shape: list[int | None] = [int(d) for d in details["shape"]]
    signature = details.get("shape_signature")
    if signature is not None:
        shape = [None if int(s) < 0 else d for d, s in zip(shape, signature, strict=True)]
    return TensorInfo(
        name=str(details["name"]),
        shape=shape,
        dtype=np.dtype(details["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


class OnnxRunner:
    """An .onnx on ONNX Runtime's CPU provider, one thread."""

    runtime = "onnxruntime"

    def __init__(self, artifact: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                bytes(artifact), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise RuntimeLoadError(
                f"ONNX Runtime cannot load the model: {_first_line(exc)}"
            ) from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeLoadError(
                f"the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                "EdgeOps models have one of each"
            )
        self.input = _onnx_info(inputs[0])
        self.output = _onnx_info(outputs[0])
        self._sample_shape = tuple(int(d or 0) for d in self.input.shape[1:])

    def raw(self, sample: np.ndarray) -> np.ndarray:
        result = self._session.run([self.output.name], {self.input.name: sample})
        output: np.ndarray = np.asarray(result[0])
        return output

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_inputs(x, self._sample_shape)
        if _batch_one(self.input.shape):
            batch: np.ndarray = np.concatenate([self.raw(s[None]) for s in x], axis=0)
            return np.asarray(batch, dtype=np.float32)
        return np.asarray(self.raw(x), dtype=np.float32)

    def latency_ms(self, sample: np.ndarray, repeats: int) -> float:
        batch = np.asarray(sample, np.float32)[None]
        return _median_ms(lambda: self.raw(batch), repeats)


def _onnx_info(node: Any) -> TensorInfo:
    shape = [d if isinstance(d, int) else None for d in node.shape]
    dtype = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}
    return TensorInfo(name=str(node.name), shape=shape, dtype=dtype.get(node.type, node.type))


class KerasRunner:
    """The Keras model itself: a reference, never a device runtime."""

    runtime = "keras"

    def __init__(self, artifact: bytes) -> None:
        from edgeops.train.errors import ModelFormatError
        from edgeops.train.trainer import load_keras

        try:
            self.model = load_keras(artifact)
        except ModelFormatError as exc:
            raise RuntimeLoadError(str(exc)) from exc
        in_shape = [None if d is None else int(d) for d in self.model.input_shape]
        out_shape = [None if d is None else int(d) for d in self.model.output_shape]
        self.input = TensorInfo(
            name=str(self.model.input_names[0]), shape=in_shape, dtype="float32"
        )
        self.output = TensorInfo(
            name=str(self.model.output_names[0]), shape=out_shape, dtype="float32"
        )
        self._sample_shape = tuple(int(d or 0) for d in in_shape[1:])

    def raw(self, sample: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(sample, training=False), dtype=np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_inputs(x, self._sample_shape)
        return np.asarray(self.model.predict(x, verbose=0, batch_size=256), dtype=np.float32)

    def latency_ms(self, sample: np.ndarray, repeats: int) -> float:
        batch = np.asarray(sample, np.float32)[None]
        return _median_ms(lambda: self.raw(batch), repeats)


def check_inputs(x: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as float32 if its samples have ``sample_shape`` and finite values, else
    :class:`EvaluationError` naming the expected and the actual shape."""
    from edgeops.evaluate.errors import EvaluationError

    x = np.asarray(x, dtype=np.float32)
    if tuple(x.shape[1:]) != sample_shape:
        raise EvaluationError(
            f"the model takes inputs of shape {list(sample_shape)}, "
            f"the data has shape {list(x.shape[1:])}"
        )
    if not np.isfinite(x).all():
        raise EvaluationError("the model inputs hold NaN or infinite values")
    return x


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
