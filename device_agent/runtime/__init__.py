"""Runtimes: run a model bundle on one raw sample at a time, as the device sees samples.

    bundle = ModelBundle.load(Path("/var/lib/edgeops/models/champion"))
    with open_runtime(bundle) as runtime:          # LiteRT for .tflite, ONNX Runtime for .onnx
        prediction = runtime.infer(raw_sample)     # raw: shape bundle.rule.input_shape
        prediction.label, prediction.confidence, prediction.latency_s

Every runtime applies the card's feature rule (``FeatureRule.apply``, the same code the hub
trains with), quantizes the result with the input tensor's scale and zero point when the model
is integer, invokes, and dequantizes the output. A sample that does not fit (shape, dtype,
NaN, infinity) raises :class:`InputError` and leaves the runtime usable.

Runtimes (``Runtime.name``):

- ``litert``: ``ai_edge_litert.interpreter`` (XNNPACK is its default delegate for float ops)
- ``tflite_runtime``: the older ``tflite_runtime.interpreter``, used only when ai_edge_litert
  does not import
- ``onnxruntime``: ONNX Runtime's CPU provider, imported only for .onnx bundles
- ``serial``: :class:`SerialRuntime`, a microcontroller behind a serial port (framing in
  ``device_agent/runtime/_serial.py``)

Errors::

    AgentError
    ├── BundleError          the bundle directory, its card or its model file is bad
    ├── RuntimeLoadError     no runtime can run the bundle (library missing, model refused)
    ├── InferenceError       the runtime failed on a valid sample
    │   └── SerialFrameError     no, or a malformed, frame from a serial device
    └── ProtocolError
        └── InputError       a sample that does not fit the model
"""

from __future__ import annotations

from device_agent.runtime._base import Prediction, Runtime, TensorCodec, check_sample
from device_agent.runtime._bundle import (
    CARD_FILE,
    MODEL_FILES,
    ModelBundle,
    model_file_name,
    parse_card,
)
from device_agent.runtime._errors import (
    BundleError,
    InferenceError,
    InputError,
    RuntimeLoadError,
    SerialFrameError,
)
from device_agent.runtime._litert import LiteRTRuntime
from device_agent.runtime._onnx import OnnxRuntime
from device_agent.runtime._serial import FrameKind, SerialFrame, SerialRuntime

__all__ = [
    "CARD_FILE",
    "MODEL_FILES",
    "RUNTIME_NAMES",
    "BundleError",
    "FrameKind",
    "InferenceError",
    "InputError",
    "LiteRTRuntime",
    "ModelBundle",
    "OnnxRuntime",
    "Prediction",
    "Runtime",
    "RuntimeLoadError",
    "SerialFrame",
    "SerialFrameError",
    "SerialRuntime",
    "TensorCodec",
    "check_sample",
    "model_file_name",
    "open_runtime",
    "parse_card",
]

RUNTIME_NAMES = ("litert", "tflite_runtime", "onnxruntime", "serial")


def open_runtime(
    bundle: ModelBundle, *, prefer: str | None = None, num_threads: int | None = None
) -> Runtime:
    """A runtime for ``bundle``: LiteRT (or tflite_runtime) for .tflite, ONNX Runtime for .onnx.

    ``prefer`` names the runtime to use ("litert", "tflite_runtime", "onnxruntime"); it must
    be able to run the bundle's format. ``num_threads`` is passed to the interpreter (None:
    the runtime's default). A serial runtime needs its port: build :class:`SerialRuntime`.
    """
    if prefer is not None and prefer not in RUNTIME_NAMES:
        raise RuntimeLoadError(f"unknown runtime {prefer!r}; runtimes: {', '.join(RUNTIME_NAMES)}")
    if prefer == "serial":
        raise RuntimeLoadError(
            "the serial runtime needs its port: construct SerialRuntime(bundle, port)"
        )
    if bundle.format == "onnx":
        if prefer not in (None, "onnxruntime"):
            raise RuntimeLoadError(
                f"runtime {prefer!r} cannot run the ONNX model {bundle.model_path}"
            )
        return OnnxRuntime(bundle, num_threads=num_threads)
    if prefer == "onnxruntime":
        raise RuntimeLoadError(f"onnxruntime cannot run the .tflite model {bundle.model_path}")
    return LiteRTRuntime(bundle, module=prefer, num_threads=num_threads)
