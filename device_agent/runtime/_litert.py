"""LiteRT for .tflite models: ``ai_edge_litert`` (XNNPACK by default), or ``tflite_runtime``.

The interpreter is built once with batch 1; its input and output buffers are reused for
every sample (``set_tensor`` copies the quantized sample in, ``get_tensor`` copies the output
out), so the per-sample path is the feature rule, one quantization into a preallocated
buffer, ``invoke`` and one dequantization.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from device_agent.runtime._base import TensorCodec, TensorRuntime
from device_agent.runtime._bundle import ModelBundle
from device_agent.runtime._errors import InferenceError, RuntimeLoadError

__all__ = ["LITERT_MODULES", "LiteRTRuntime", "interpreter_class"]

LITERT_MODULES = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
}
"""Runtime name -> the module whose ``Interpreter`` it uses."""


def interpreter_class(name: str | None = None) -> tuple[str, Any]:
    """``(runtime name, Interpreter class)``: ``ai_edge_litert``, else ``tflite_runtime``.

    With ``name`` ("litert" or "tflite_runtime") only that one is tried.
    """
    import importlib

    names = [name] if name is not None else list(LITERT_MODULES)
    failures: list[str] = []
    for candidate in names:
        module_name = LITERT_MODULES[candidate]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            failures.append(f"{module_name}: {exc}")
            continue
        return candidate, module.Interpreter
    raise RuntimeLoadError(
        "no LiteRT interpreter can be imported ("
        + "; ".join(failures)
        + "); install ai-edge-litert (the agent extra) or tflite-runtime"
    )


class LiteRTRuntime(TensorRuntime):
    """A .tflite bundle on the LiteRT interpreter."""

    name = "litert"

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        module: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(bundle)
        runtime_name, interpreter_type = interpreter_class(module)
        self.name = runtime_name  # per instance: litert or tflite_runtime
        path = bundle.model_path
        try:
            interpreter = interpreter_type(model_path=str(path), num_threads=num_threads)
            inputs = interpreter.get_input_details()
            outputs = interpreter.get_output_details()
            if len(inputs) != 1 or len(outputs) != 1:
                raise RuntimeLoadError(
                    f"{path}: the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                    "EdgeOps models have one of each"
                )
            model_shape = (1, *bundle.rule.model_input_shape)
            if tuple(int(d) for d in inputs[0]["shape"]) != model_shape:
                interpreter.resize_tensor_input(inputs[0]["index"], list(model_shape))
            interpreter.allocate_tensors()
            inputs = interpreter.get_input_details()
            outputs = interpreter.get_output_details()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeLoadError(f"LiteRT cannot load {path}: {_first_line(exc)}") from exc
        self._interpreter = interpreter
        self._in, self._out = inputs[0], outputs[0]
        in_shape = tuple(int(d) for d in self._in["shape"])
        if math.prod(in_shape) != math.prod(model_shape):
            raise RuntimeLoadError(
                f"{path}: the input tensor has shape {list(in_shape)}, the card's "
                f"preprocessing rule makes model inputs of shape {list(model_shape)}"
            )
        self._input = _codec(self._in)
        self._output = _codec(self._out)
        _check_card_quantization(bundle, self._input, self._output)
        self._in_index = int(self._in["index"])
        self._out_index = int(self._out["index"])
        self._set_tensor = interpreter.set_tensor
        self._get_tensor = interpreter.get_tensor
        self._invoke = interpreter.invoke
        self._set_outputs(math.prod(int(d) for d in self._out["shape"]))

    @property
    def input_details(self) -> dict[str, Any]:
        """The interpreter's input tensor details (as ``get_input_details()[0]``)."""
        return dict(self._in)

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        try:
            self._set_tensor(self._in_index, self._input.encode(inputs))
            self._invoke()
            return self._output.decode(self._get_tensor(self._out_index))
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"LiteRT failed on a sample: {_first_line(exc)}") from exc

    def _release(self) -> None:
        del self._interpreter, self._set_tensor, self._get_tensor, self._invoke


def _codec(details: dict[str, Any]) -> TensorCodec:
    scale, zero_point = details.get("quantization", (0.0, 0))
    return TensorCodec(
        tuple(int(d) for d in details["shape"]),
        np.dtype(details["dtype"]).name,
        float(scale),
        int(zero_point),
    )


def _check_card_quantization(bundle: ModelBundle, input: TensorCodec, output: TensorCodec) -> None:
    """The card's quantization parameters, where it states them, must be the model's."""
    card = bundle.card.quantization
    for label, stated, actual in (("input", card.input, input), ("output", card.output, output)):
        if stated is None or not actual.quantized:
            continue
        if (
            stated.dtype != actual.dtype.name
            or stated.zero_point != actual.zero_point
            or not math.isclose(stated.scale, actual.scale, rel_tol=1e-6)
        ):
            raise RuntimeLoadError(
                f"{bundle.model_path}: the card says the {label} is {stated.dtype} with scale "
                f"{stated.scale} and zero point {stated.zero_point}, the model's tensor is "
                f"{actual.dtype.name} with scale {actual.scale} and zero point "
                f"{actual.zero_point}"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
