"""ONNX Runtime for .onnx models (CPU provider). ``onnxruntime`` is optional on devices: it is
imported when an .onnx bundle is opened, and a clear error says how to install it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from device_agent.runtime._base import TensorCodec, TensorRuntime
from device_agent.runtime._bundle import ModelBundle
from device_agent.runtime._errors import InferenceError, RuntimeLoadError

__all__ = ["OnnxRuntime"]

_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
}


class OnnxRuntime(TensorRuntime):
    """An .onnx bundle on ONNX Runtime, batch 1."""

    name = "onnxruntime"

    def __init__(self, bundle: ModelBundle, *, num_threads: int | None = None) -> None:
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError(
                f"{bundle.model_path} is an ONNX model but onnxruntime cannot be imported "
                f"({exc}); install it with `pip install onnxruntime`"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or 0  # 0: ONNX Runtime's default
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = bundle.model_path
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise RuntimeLoadError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from exc
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeLoadError(
                f"{path}: the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                "EdgeOps models have one of each"
            )
        model_shape = (1, *bundle.rule.model_input_shape)
        declared = [d if isinstance(d, int) else None for d in inputs[0].shape]
        fixed = [d if d is not None else model_shape[i] for i, d in enumerate(declared)]
        if len(declared) != len(model_shape) or math.prod(fixed) != math.prod(model_shape):
            raise RuntimeLoadError(
                f"{path}: the input tensor has shape {declared}, the card's preprocessing "
                f"rule makes model inputs of shape {list(model_shape)}"
            )
        in_dtype = _dtype(inputs[0].type, path, "input")
        out_dtype = _dtype(outputs[0].type, path, "output")
        card = bundle.card.quantization
        self._input = TensorCodec(
            model_shape,
            in_dtype,
            card.input.scale if card.input is not None else 0.0,
            card.input.zero_point if card.input is not None else 0,
        )
        self._output = TensorCodec(
            (1,),
            out_dtype,
            card.output.scale if card.output is not None else 0.0,
            card.output.zero_point if card.output is not None else 0,
        )
        self._session: Any = session
        self._in_name = str(inputs[0].name)
        self._out_names = [str(outputs[0].name)]
        out_dims = [d for d in outputs[0].shape[1:]]
        if out_dims and all(isinstance(d, int) for d in out_dims):
            self._set_outputs(math.prod(out_dims))
        else:  # a dynamic output: run once on zeros to learn its size
            probe = self._session.run(
                self._out_names,
                {self._in_name: self._input.encode(np.zeros(model_shape, np.float32))},
            )
            self._set_outputs(int(np.asarray(probe[0]).size))

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        try:
            result = self._session.run(self._out_names, {self._in_name: self._input.encode(inputs)})
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on a sample: {_first_line(exc)}") from exc
        return self._output.decode(np.asarray(result[0]))

    def _release(self) -> None:
        self._session = None


def _dtype(onnx_type: str, path: Any, which: str) -> str:
    dtype = _ONNX_DTYPES.get(onnx_type)
    if dtype is None:
        raise RuntimeLoadError(f"{path}: the {which} tensor has type {onnx_type}; not supported")
    return dtype


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
