"""A full-integer .tflite flatbuffer as a small typed graph.

:func:`read_tflite` parses the flatbuffer with the schema module that ships with LiteRT
(``ai_edge_litert.schema_py_generated``) and keeps what code generation needs: every tensor's
static shape, type, quantization (per tensor or per channel) and constant data, and every
operator with its builtin name and options. The shape arithmetic Keras emits for a dynamic
batch dimension (SHAPE, STRIDED_SLICE, PACK ... feeding RESHAPE) is evaluated here, since
every shape in a micro model is static: those operators disappear and their results become
constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeops.firmware.errors import FirmwareError, FloatModelError, UnsupportedModelError

__all__ = ["Graph", "Operator", "Tensor", "read_tflite"]

_DTYPES: dict[str, Any] = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "INT32": np.int32,
    "UINT8": np.uint8,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "INT16": np.int16,
    "INT8": np.int8,
    "FLOAT64": np.float64,
    "UINT32": np.uint32,
    "UINT16": np.uint16,
}

# operators evaluated at generation time when all their inputs are constant
_FOLDABLE = {"SHAPE", "STRIDED_SLICE", "PACK", "CONCATENATION", "RESHAPE", "GATHER", "CAST"}


@dataclass
class Tensor:
    """One tensor: static shape, element type, quantization, constant data if any."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scales: tuple[float, ...] = ()
    """float32 scale(s): one per tensor, or one per channel along ``quantized_dimension``."""
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0
    data: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def scale(self) -> float:
        if not self.scales:
            raise UnsupportedModelError(f"tensor {self.name!r} is not quantized")
        return self.scales[0]

    @property
    def zero_point(self) -> int:
        return self.zero_points[0] if self.zero_points else 0

    @property
    def per_channel(self) -> bool:
        return len(self.scales) > 1


@dataclass
class Operator:
    """One operator: builtin name, tensor indices (-1: absent optional input), options."""

    index: int
    op: str
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """The model's only subgraph after folding, operators in execution order."""

    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]
    folded: list[str] = field(default_factory=list)
    """Operators evaluated at generation time (their names, in order)."""
    float_input: Tensor | None = None
    """The model's float32 input, when a QUANTIZE (taken out of :attr:`operators`) turned it
    into the int8 tensor :attr:`inputs` names."""
    float_output: Tensor | None = None
    """The model's float32 output, when a DEQUANTIZE (taken out of :attr:`operators`) made it
    from the int8 tensor :attr:`outputs` names."""

    def tensor(self, index: int) -> Tensor:
        return self.tensors[index]


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:  # pragma: no cover - the hub installs LiteRT
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated
    return schema_py_generated


def _names(enum: Any) -> dict[int, str]:
    return {value: key for key, value in vars(enum).items() if not key.startswith("_")}


def _options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in vars(options).items():
        out[key] = list(value) if isinstance(value, np.ndarray) else value
    return out


def read_tflite(flatbuffer: bytes) -> Graph:
    """Parse ``flatbuffer`` into a :class:`Graph` and fold its static shape arithmetic.

    A float32 input quantized by one QUANTIZE, or a float32 output made by one DEQUANTIZE,
    is taken off: the graph starts and ends at the int8 tensors (:attr:`Graph.float_input`,
    :attr:`Graph.float_output`).

    :class:`FirmwareError` if it is not a readable .tflite, :class:`FloatModelError` if it
    computes in floating point, :class:`UnsupportedModelError` for more than one subgraph.
    """
    schema = _schema()
    data = bytes(flatbuffer)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise FirmwareError("not a .tflite flatbuffer (no TFL3 identifier)")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as exc:  # noqa: BLE001 - the flatbuffer library raises anything
        raise FirmwareError(f"cannot read the .tflite flatbuffer: {exc}") from None
    if not model.subgraphs or len(model.subgraphs) != 1:
        raise UnsupportedModelError(
            f"the model has {len(model.subgraphs or [])} subgraphs; exactly one is supported"
        )
    type_names = _names(schema.TensorType)
    op_names = _names(schema.BuiltinOperator)
    subgraph = model.subgraphs[0]
    tensors: list[Tensor] = []
    for index, raw in enumerate(subgraph.tensors or []):
        dtype = type_names.get(raw.type, str(raw.type))
        shape = tuple(int(d) for d in (raw.shape if raw.shape is not None else []))
        quant = raw.quantization
        scales: tuple[float, ...] = ()
        zero_points: tuple[int, ...] = ()
        dimension = 0
        if quant is not None and quant.scale is not None and len(quant.scale) > 0:
            scales = tuple(float(np.float32(s)) for s in quant.scale)
            zp = quant.zeroPoint if quant.zeroPoint is not None else [0] * len(scales)
            zero_points = tuple(int(z) for z in zp)
            dimension = int(quant.quantizedDimension)
        constant = None
        buffer = model.buffers[raw.buffer] if raw.buffer < len(model.buffers) else None
        if buffer is not None and buffer.data is not None and len(buffer.data) > 0:
            if dtype not in _DTYPES:
                raise UnsupportedModelError(f"tensor {index} has unsupported type {dtype}")
            raw_bytes = np.asarray(buffer.data, dtype=np.uint8).tobytes()
            constant = np.frombuffer(raw_bytes, dtype=_DTYPES[dtype]).reshape(shape).copy()
        elif buffer is not None and buffer.offset and buffer.offset > 1:
            end = buffer.offset + buffer.size
            constant = (
                np.frombuffer(data[buffer.offset : end], dtype=_DTYPES[dtype]).reshape(shape).copy()
            )
        name = raw.name.decode(errors="replace") if isinstance(raw.name, bytes) else str(raw.name)
        tensors.append(Tensor(index, name, shape, dtype, scales, zero_points, dimension, constant))
    operators: list[Operator] = []
    for index, raw in enumerate(subgraph.operators or []):
        code = model.operatorCodes[raw.opcodeIndex]
        number = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = op_names.get(number, f"BUILTIN_{number}")
        if name == "CUSTOM":
            custom = code.customCode.decode(errors="replace") if code.customCode else "?"
            name = f"CUSTOM({custom})"
        options = _options(raw.builtinOptions)
        options.update(_options(getattr(raw, "builtinOptions2", None)))
        operators.append(
            Operator(
                index,
                name,
                [int(i) for i in (raw.inputs if raw.inputs is not None else [])],
                [int(i) for i in (raw.outputs if raw.outputs is not None else [])],
                options,
            )
        )
    graph = Graph(
        tensors,
        operators,
        [int(i) for i in subgraph.inputs],
        [int(i) for i in subgraph.outputs],
    )
    _float_edges(graph)
    _check_integer(graph)
    _fold(graph)
    return graph


def _float_edges(graph: Graph) -> None:
    """Take a float32 model input's leading QUANTIZE and a float32 model output's trailing
    DEQUANTIZE out of the graph: the int8 tensors between them become the graph's input and
    output, and :attr:`Graph.float_input` / :attr:`Graph.float_output` keep the float
    tensors, whose conversion the library offers as functions of its own."""
    if len(graph.inputs) == 1 and graph.tensor(graph.inputs[0]).dtype == "FLOAT32":
        index = graph.inputs[0]
        readers = [op for op in graph.operators if index in op.inputs]
        if len(readers) == 1 and _converts(graph, readers[0], "QUANTIZE", index):
            graph.operators.remove(readers[0])
            graph.inputs = [readers[0].outputs[0]]
            graph.float_input = graph.tensor(index)
    if len(graph.outputs) == 1 and graph.tensor(graph.outputs[0]).dtype == "FLOAT32":
        index = graph.outputs[0]
        writers = [op for op in graph.operators if index in op.outputs]
        if len(writers) == 1 and _converts(graph, writers[0], "DEQUANTIZE", index):
            graph.operators.remove(writers[0])
            graph.outputs = [writers[0].inputs[0]]
            graph.float_output = graph.tensor(index)


def _converts(graph: Graph, op: Operator, name: str, float_index: int) -> bool:
    """Whether ``op`` is the ``name`` operator between the float32 tensor ``float_index`` and
    one per-tensor int8 tensor."""
    if op.op != name or len(op.inputs) != 1 or len(op.outputs) != 1:
        return False
    other = op.outputs[0] if name == "QUANTIZE" else op.inputs[0]
    if (op.inputs[0] if name == "QUANTIZE" else op.outputs[0]) != float_index:
        return False
    tensor = graph.tensor(other)
    return (
        tensor.dtype == "INT8"
        and len(tensor.scales) == 1
        and tensor.scales[0] > 0.0
        and not tensor.is_constant
        and other not in graph.inputs + graph.outputs
    )


def _check_integer(graph: Graph) -> None:
    for index in graph.inputs + graph.outputs:
        tensor = graph.tensor(index)
        if tensor.dtype != "INT8":
            side = "input" if index in graph.inputs else "output"
            raise FloatModelError(
                f"the model's {side} {tensor.name!r} is {tensor.dtype}; a full-integer int8 "
                "model is required (convert with a representative dataset and "
                "supported_ops=[TFLITE_BUILTINS_INT8]; a float32 input or output is "
                "accepted only through one QUANTIZE or DEQUANTIZE to a per-tensor int8 "
                "tensor)"
            )
    for op in graph.operators:
        for index in op.inputs + op.outputs:
            if index < 0:
                continue
            tensor = graph.tensor(index)
            if tensor.dtype in ("FLOAT32", "FLOAT16", "FLOAT64"):
                raise FloatModelError(
                    f"operator {op.op} (#{op.index}) uses the {tensor.dtype} tensor "
                    f"{tensor.name!r}; a full-integer int8 model is required"
                )


def _fold(graph: Graph) -> None:
    kept: list[Operator] = []
    for op in graph.operators:
        inputs = [graph.tensor(i) for i in op.inputs if i >= 0]
        outputs = [graph.tensor(i) for i in op.outputs]
        foldable = (
            op.op in _FOLDABLE
            and len(outputs) == 1
            and outputs[0].dtype == "INT32"
            and all(t.is_constant or op.op == "SHAPE" for t in inputs)
        )
        if foldable:
            outputs[0].data = _evaluate(op, graph).astype(np.int32).reshape(outputs[0].shape)
            graph.folded.append(op.op)
            continue
        if op.op == "RESHAPE" and len(op.inputs) > 1:
            op.inputs = op.inputs[:1]  # the output tensor carries the static shape
        kept.append(op)
    for op in kept:
        for index in op.inputs:
            if (
                index >= 0
                and graph.tensor(index).dtype == "INT32"
                and not (graph.tensor(index).is_constant)
            ):
                raise UnsupportedModelError(
                    f"operator {op.op} (#{op.index}) reads the int32 tensor "
                    f"{graph.tensor(index).name!r} computed at run time; only static shapes "
                    "are supported"
                )
    graph.operators = kept


def _evaluate(op: Operator, graph: Graph) -> np.ndarray:
    values = [graph.tensor(i).data for i in op.inputs if i >= 0]
    if op.op == "SHAPE":
        return np.asarray(graph.tensor(op.inputs[0]).shape, dtype=np.int32)
    if op.op == "PACK":
        axis = int(op.options.get("axis", 0))
        return np.stack([np.asarray(v) for v in values], axis=axis)
    if op.op == "CONCATENATION":
        return np.concatenate([np.asarray(v) for v in values], axis=int(op.options["axis"]))
    if op.op in ("RESHAPE", "CAST"):
        return np.asarray(values[0])
    if op.op == "GATHER":
        axis = int(op.options.get("axis", 0))
        return np.take(np.asarray(values[0]), np.asarray(values[1]), axis=axis)
    if op.op == "STRIDED_SLICE":
        return _strided_slice(op, [np.asarray(v) for v in values])
    raise UnsupportedModelError(f"cannot evaluate {op.op} at generation time")  # pragma: no cover


def _strided_slice(op: Operator, values: list[np.ndarray]) -> np.ndarray:
    data, begin, end = values[0], values[1], values[2]
    strides = values[3] if len(values) > 3 else np.ones_like(begin)
    options = op.options
    if options.get("ellipsisMask") or options.get("newAxisMask"):
        raise UnsupportedModelError(
            f"STRIDED_SLICE (#{op.index}) with ellipsis or new-axis masks is not supported"
        )
    begin_mask = int(options.get("beginMask", 0))
    end_mask = int(options.get("endMask", 0))
    shrink = int(options.get("shrinkAxisMask", 0))
    slices: list[Any] = []
    for axis in range(len(begin)):
        b = None if begin_mask & (1 << axis) else int(begin[axis])
        e = None if end_mask & (1 << axis) else int(end[axis])
        s = int(strides[axis])
        if shrink & (1 << axis):
            slices.append(int(begin[axis]))
        else:
            slices.append(slice(b, e, s))
    return np.asarray(data[tuple(slices)])
