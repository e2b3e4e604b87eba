"""Building a model card (device_agent.card.ModelCard) for an artifact, measured on its runtime.

Everything on the card about the artifact is read from the artifact itself on the runtime
that will run it: input/output spec and quantization parameters from the interpreter's
tensors, the op set from its graph, arena bytes from TFLite Micro (full-int8 models), flash
bytes as the artifact's size. Test vectors are computed on that runtime too: ``input`` is the
input tensor exactly as fed (after the feature rule and, for an integer model, quantization;
int8 values for a full-int8 model) and ``expected_output`` the output tensor exactly as read,
each with a batch dimension of 1. ``features`` holds the float model input before
quantization, ``label`` the true class index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.card import ModelCard, Quantization, TensorQuantization, TensorSpec
from device_agent.features import FeatureRule
from device_agent.sketch import ReferenceStats
from edgeops.evaluate import load_runner, tflm_arena_bytes
from edgeops.evaluate.runtimes import KerasRunner, Runner, TensorInfo
from edgeops.export.errors import ExportError

__all__ = ["DEFAULT_TEST_VECTORS", "build_card", "op_set", "quantization_mode"]

DEFAULT_TEST_VECTORS = 4
_RUNTIME_OF_FORMAT = {"keras": "keras", "tflite": "litert", "onnx": "onnx"}


def build_card(
    *,
    name: str,
    artifact: bytes,
    format: str,
    task: str,
    feature_rule: FeatureRule | Mapping[str, Any],
    reference: ReferenceStats | Mapping[str, Any],
    sample_inputs: np.ndarray,
    sample_labels: np.ndarray | None = None,
    metrics: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    model_id: str = "",
    version: str = "",
    runtime: str | None = None,
    num_test_vectors: int = DEFAULT_TEST_VECTORS,
    extra: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card of ``artifact`` (format ``keras``, ``tflite`` or ``onnx``).

    ``sample_inputs`` are float model inputs (the feature rule applied); the first
    ``num_test_vectors`` become test vectors. ``runtime`` defaults to the format's runtime
    (``litert`` for .tflite); pass ``"tflm"`` for a microcontroller build.
    """
    if format not in _RUNTIME_OF_FORMAT:
        raise ExportError(f"cannot describe format {format!r}; formats: keras, tflite, onnx")
    runner = load_runner(artifact, format)
    mode = quantization_mode(artifact, format, runner)
    rule = feature_rule.to_dict() if isinstance(feature_rule, FeatureRule) else dict(feature_rule)
    stats = reference.to_dict() if isinstance(reference, ReferenceStats) else dict(reference)
    full_int8 = format == "tflite" and runner.input.dtype == runner.output.dtype == "int8"
    return ModelCard(
        model_id=model_id,
        version=version,
        name=name,
        task=task,
        runtime=runtime or _RUNTIME_OF_FORMAT[format],
        quantization=Quantization(
            mode=mode,
            input=_tensor_quantization(runner.input),
            output=_tensor_quantization(runner.output),
        ),
        input_spec=_spec(runner.input),
        output_spec=_spec(runner.output),
        op_set=op_set(artifact, format, runner),
        arena_bytes=tflm_arena_bytes(artifact) if full_int8 else None,
        flash_bytes=len(artifact),
        preprocessing=rule,
        reference=stats,
        test_vectors=_test_vectors(runner, sample_inputs, sample_labels, num_test_vectors),
        metrics=dict(metrics or {}),
        lineage=dict(lineage or {}),
        extra=dict(extra or {}),
    )


def _spec(info: TensorInfo) -> TensorSpec:
    return TensorSpec(name=info.name, shape=list(info.shape), dtype=info.dtype)


def _tensor_quantization(info: TensorInfo) -> TensorQuantization | None:
    if not info.quantized:
        return None
    return TensorQuantization(scale=info.scale, zero_point=info.zero_point, dtype=info.dtype)


def _test_vectors(
    runner: Runner, x: np.ndarray, labels: np.ndarray | None, count: int
) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = []
    for i, sample in enumerate(np.asarray(x, dtype=np.float32)[: max(0, count)]):
        fed = runner.input.quantize(sample[None])
        vector: dict[str, Any] = {
            "input": fed.tolist(),
            "expected_output": runner.raw(fed).tolist(),
            "features": sample[None].tolist(),
        }
        if labels is not None and i < len(labels):
            vector["label"] = int(labels[i])
        vectors.append(vector)
    return vectors


def op_set(artifact: bytes, format: str, runner: Runner | None = None) -> list[str]:
    """The operators the artifact's graph uses, sorted: TFLite builtin names (``CONV_2D``),
    ONNX op types (``Conv``) or Keras layer classes (``Dense``)."""
    if format == "tflite":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        interpreter = Interpreter(
            model_content=bytes(artifact),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        return sorted({str(op["op_name"]) for op in interpreter._get_ops_details()})
    if format == "onnx":
        import onnx

        return sorted({node.op_type for node in onnx.load_from_string(bytes(artifact)).graph.node})
    keras_runner = runner if isinstance(runner, KerasRunner) else KerasRunner(artifact)
    return sorted({type(layer).__name__ for layer in keras_runner.model.layers})


def quantization_mode(artifact: bytes, format: str, runner: Runner | None = None) -> str:
    """``int8``, ``int16x8``, ``float16``, ``dynamic`` or ``none``, read from the tensors."""
    if format != "tflite":
        return "none"
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_content=bytes(artifact),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    dtypes = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    inputs = {np.dtype(t["dtype"]).name for t in interpreter.get_input_details()}
    ops = {str(op["op_name"]) for op in interpreter._get_ops_details()}
    if "int16" in dtypes:
        return "int16x8"  # only 16x8 models hold int16 activations
    if inputs <= {"int8", "uint8"} or ("int8" in dtypes and "QUANTIZE" in ops):
        return "int8"  # full integer (with int8 or float input/output)
    if "float16" in dtypes:
        return "float16"
    if "int8" in dtypes:
        return "dynamic"  # int8 weights, float activations
    return "none"
