"""Multiply-accumulate counts per inference (batch 1), from the graph the runtime executes.

Only the layers that dominate compute are counted: convolutions, depthwise convolutions and
fully connected / matrix-multiply layers (one MAC per weight use). Pooling, activations and
element-wise ops are left out, as is customary when comparing MCU models.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["keras_macs", "onnx_macs", "tflite_macs"]


def tflite_macs(flatbuffer: bytes) -> int:
    """MACs of one inference of a .tflite model, read from its operators' tensor shapes."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_content=bytes(flatbuffer),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    shapes = {
        int(t["index"]): [int(d) for d in t["shape"]] for t in interpreter.get_tensor_details()
    }
    total = 0
    for op in interpreter._get_ops_details():
        name = op["op_name"]
        inputs = [int(i) for i in op["inputs"]]
        outputs = [int(i) for i in op["outputs"]]
        if len(inputs) < 2 or not outputs:
            continue
        out = shapes.get(outputs[0], [])
        weights = shapes.get(inputs[1], [])
        if not out or not weights:
            continue
        batch = max(1, out[0]) if len(out) > 1 else 1
        if name == "CONV_2D":  # filter (O, KH, KW, I)
            total += math.prod(out) // batch * math.prod(weights[1:])
        elif name == "DEPTHWISE_CONV_2D":  # filter (1, KH, KW, O)
            total += math.prod(out) // batch * weights[1] * weights[2]
        elif name == "FULLY_CONNECTED":  # weights (O, I)
            total += math.prod(out) // batch * weights[-1]
        elif name == "BATCH_MATMUL":
            total += math.prod(out) // batch * weights[-2]
    return int(total)


def onnx_macs(model_bytes: bytes) -> int:
    """MACs of one inference of an .onnx model (Conv, Gemm, MatMul), via shape inference."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(bytes(model_bytes)))
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.dim_value > 0 else 1 for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(numpy_helper.to_array(init).shape)
    total = 0
    for node in graph.node:
        if len(node.input) < 2 or not node.output:
            continue
        out = shapes.get(node.output[0])
        weights = shapes.get(node.input[1])
        if not out or not weights:
            continue
        batch = max(1, out[0]) if len(out) > 1 else 1
        if node.op_type == "Conv":  # W (O, I/groups, KH, KW), output (N, O, OH, OW)
            total += math.prod(out) // batch * math.prod(weights[1:])
        elif node.op_type in ("Gemm", "MatMul"):
            inner = weights[0] if node.op_type == "MatMul" or not _trans_b(node) else weights[-1]
            total += math.prod(out) // batch * inner
    return int(total)


def _trans_b(node: Any) -> bool:
    return any(attr.name == "transB" and attr.i == 1 for attr in node.attribute)


def keras_macs(model: Any) -> int:
    """MACs of one inference of a Keras model, from its Dense and convolution layers."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        weights = layer.get_weights()
        if not weights:
            continue
        out = [int(d) for d in layer.output_shape[1:] if d is not None]
        kernel = np.shape(weights[0])
        if kind == "Dense":
            total += math.prod(out) * int(kernel[0])
        elif kind in ("Conv1D", "Conv2D"):
            total += math.prod(out) * math.prod(int(k) for k in kernel[:-1])
        elif kind == "DepthwiseConv2D":
            total += math.prod(out) * int(kernel[0]) * int(kernel[1])
    return int(total)
