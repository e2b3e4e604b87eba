"""Post-training quantization of a Keras model into a .tflite flatbuffer.

Modes (:data:`QUANTIZATION_MODES`):

``dynamic``
    weights int8, activations float at run time (dynamic-range quantization).
``float16``
    weights stored as float16, computed in float32.
``int8``
    full integer: weights and activations int8, **int8 input and output tensors**, calibrated
    on a representative dataset. What tflite-micro on a Cortex-M runs.
``int16x8``
    activations int16, weights int8 (float32 input/output): more precise than int8 when int8
    loses too much, at about the same flash size.

Every mode converts with a fixed batch of one sample, as a device invokes the model.

The representative dataset is a batch of model inputs (the feature rule already applied). At
most ``max_samples`` of them are used, evenly spaced, so calibration is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from edgeops.compress.errors import QuantizationError, UnknownQuantizationError

__all__ = [
    "QUANTIZATION_MODES",
    "check_mode",
    "quantize",
    "representative_sample",
    "tflite_tensor_bytes",
]

QUANTIZATION_MODES: tuple[str, ...] = ("dynamic", "float16", "int8", "int16x8")
DEFAULT_REPRESENTATIVE_SAMPLES = 200


def check_mode(mode: str) -> str:
    """``mode`` if it is a known quantization mode, else :class:`UnknownQuantizationError`."""
    if mode not in QUANTIZATION_MODES:
        raise UnknownQuantizationError(
            f"unknown quantization mode {mode!r}; known modes: {', '.join(QUANTIZATION_MODES)}"
        )
    return mode


def representative_sample(
    x_model_inputs: np.ndarray, max_samples: int = DEFAULT_REPRESENTATIVE_SAMPLES
) -> np.ndarray:
    """At most ``max_samples`` rows of ``x_model_inputs``, evenly spaced, as float32."""
    if len(x_model_inputs) == 0:
        raise QuantizationError("the representative dataset is empty")
    count = min(max_samples, len(x_model_inputs))
    index = np.linspace(0, len(x_model_inputs) - 1, count).round().astype(np.int64)
    return np.asarray(x_model_inputs[index], dtype=np.float32)


def quantize(
    model: Any,
    mode: str,
    representative: np.ndarray,
    *,
    max_samples: int = DEFAULT_REPRESENTATIVE_SAMPLES,
) -> bytes:
    """Convert ``model`` (a ``tf_keras.Model``) to a quantized .tflite; returns its bytes.

    ``representative`` is a batch of model inputs used to calibrate activation ranges
    (required for ``int8`` and ``int16x8``, ignored otherwise). A model trained with
    quantization-aware training (:func:`edgeops.compress.quantization_aware`) converts the
    same way and keeps its learned ranges.
    """
    from edgeops._tf import load_tf, native_stderr_silenced

    check_mode(mode)
    tf, _ = load_tf()
    # A device invokes one sample at a time: a fixed batch of 1 gives static shapes, so a
    # Reshape needs no SHAPE/STRIDED_SLICE/PACK ops (which MCU op resolvers rarely carry).
    signature = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32, name="input")
    graph = tf.function(lambda x: model(x, training=False), input_signature=[signature])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [graph.get_concrete_function()], model
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode in ("int8", "int16x8"):
        sample = representative_sample(representative, max_samples)
        expected = tuple(model.input_shape[1:])
        if tuple(sample.shape[1:]) != expected:
            raise QuantizationError(
                f"representative samples have shape {tuple(sample.shape[1:])}, "
                f"the model takes {expected}"
            )

        def calibration() -> Iterator[list[np.ndarray]]:
            for row in sample:
                yield [row[np.newaxis, ...]]

        converter.representative_dataset = calibration
        if mode == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        else:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            ]
    try:
        with native_stderr_silenced():  # the converter prints "fully_quantize: ..." lines
            flatbuffer: bytes = converter.convert()
    except Exception as exc:  # the converter raises many unrelated types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QuantizationError(
            f"the TFLite converter could not make a {mode} model of {model.name!r}: {first}"
        ) from exc
    return flatbuffer


def tflite_tensor_bytes(flatbuffer: bytes) -> int:
    """An upper bound on the RAM LiteRT needs for the model's tensors: the sum of every
    tensor's size (weights included), for runtimes without an arena planner report."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    total = 0
    for tensor in interpreter.get_tensor_details():
        shape = [int(d) for d in tensor["shape"]]
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor["dtype"]).itemsize
    return total
