"""Keras to device formats: float .tflite (LiteRT, batch 1) and .onnx (tf2onnx, checked).

Both converters trace the model with a fixed batch of 1, the way a device runs it: shape
arithmetic is folded into constants, so the graph holds only the layers' own ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeops._tf import load_tf
from edgeops.export.errors import ConversionError

__all__ = ["ONNX_ATOL", "ONNX_OPSET", "keras_to_onnx", "keras_to_tflite_float"]

ONNX_OPSET = 13
ONNX_ATOL = 1e-4
"""Largest absolute difference allowed between Keras and ONNX Runtime outputs."""
_CHECK_SAMPLES = 16

Model = Any  # tf_keras.Model


def _input_shape(model: Model) -> list[int]:
    shape = list(model.input_shape[1:])
    if any(d is None for d in shape):
        raise ConversionError(f"model {model.name!r} has a dynamic input shape {shape}")
    return [int(d) for d in shape]


def keras_to_tflite_float(model: Model) -> bytes:
    """The model as a float32 .tflite flatbuffer with batch size 1."""
    tf, _ = load_tf()
    spec = tf.TensorSpec([1, *_input_shape(model)], tf.float32, name="input")
    function = tf.function(lambda x: model(x, training=False))
    try:
        concrete = function.get_concrete_function(spec)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
        flatbuffer: bytes = converter.convert()
    except Exception as exc:  # the converter raises many unrelated types
        raise ConversionError(
            f"the TFLite converter could not convert model {model.name!r}: {_first_line(exc)}"
        ) from exc
    return flatbuffer


def keras_to_onnx(
    model: Model, *, check_inputs: np.ndarray | None = None, atol: float = ONNX_ATOL
) -> bytes:
    """The model as ONNX (tf2onnx, opset 13, dynamic batch), checked with ONNX Runtime.

    The ONNX model's outputs on ``check_inputs`` (default: seeded random inputs) must match
    the Keras model's within ``atol``, else :class:`ConversionError`.
    """
    tf, _ = load_tf()
    import tf2onnx

    shape = _input_shape(model)
    spec = (tf.TensorSpec([None, *shape], tf.float32, name="input"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
    except Exception as exc:  # tf2onnx raises many unrelated types
        raise ConversionError(
            f"tf2onnx could not convert model {model.name!r}: {_first_line(exc)}"
        ) from exc
    onnx_bytes: bytes = proto.SerializeToString()
    if check_inputs is None:
        rng = np.random.default_rng(0)
        check_inputs = rng.standard_normal((_CHECK_SAMPLES, *shape)).astype(np.float32)
    x = np.asarray(check_inputs[:_CHECK_SAMPLES], dtype=np.float32)
    expected = np.asarray(model(x, training=False), dtype=np.float32)
    from edgeops.evaluate.runtimes import OnnxRunner

    actual = OnnxRunner(onnx_bytes).run(x)
    worst = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if actual.shape != expected.shape or not worst <= atol:
        raise ConversionError(
            f"the ONNX model of {model.name!r} disagrees with Keras: largest difference "
            f"{worst:.3g} > {atol:g} (shapes {list(actual.shape)} vs {list(expected.shape)})"
        )
    return onnx_bytes


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
