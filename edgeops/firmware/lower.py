"""Each supported operator becomes a kernel call with its parameters fixed at generation time.

:func:`lower` turns the operators of a :class:`Graph` into :class:`Step` objects: the C
declarations the step needs (weights, biases, per-channel multipliers and shifts, a parameter
struct, all ``const``) and a function that writes the call once the memory plan knows where
each tensor lives. Anything the kernels do not cover is refused here, by operator name and
index, before a line of C is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeops.firmware.errors import UnsupportedModelError
from edgeops.firmware.graph import Graph, Operator, Tensor
from edgeops.firmware.quant import (
    activation_range,
    calculate_input_radius,
    compute_out_size,
    compute_padding,
    f32,
    quantize_multiplier,
    round_half_away,
)

__all__ = ["ALIAS_OPS", "SUPPORTED_OPS", "Step", "c_array", "lower"]

Ref = Callable[[int], str]
"""Maps a tensor index to the C expression of its data pointer."""

ALIAS_OPS = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS")
"""Operators that only rename their input: the output shares its storage."""


@dataclass
class Step:
    """One operator of the generated ``invoke``."""

    op: str
    index: int
    inputs: list[int]
    """Activation tensors read (constant tensors are not listed)."""
    outputs: list[int]
    decls: list[str] = field(default_factory=list)
    call: Callable[[Ref], str] = lambda ref: ""
    alias: bool = False
    constants: list[int] = field(default_factory=list)
    """Constant int8 tensors read as data (declared by the emitter)."""


def c_array(ctype: str, name: str, values: Sequence[int] | np.ndarray) -> str:
    """``static const <ctype> name[] = {...};`` with at most 16 values a line."""
    flat = [int(v) for v in np.asarray(values).reshape(-1).tolist()]
    if not flat:
        flat = [0]
    lines = [", ".join(str(v) for v in flat[i : i + 16]) for i in range(0, len(flat), 16)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(flat)}] = {{\n    {body}\n}};"


def _struct(ctype: str, name: str, fields: Mapping[str, int | Sequence[int]]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, int):
            parts.append(f".{key} = {value}")
        else:
            parts.append(f".{key} = {{{', '.join(str(int(v)) for v in value)}}}")
    body = ",\n    ".join(parts)
    return f"static const {ctype} {name} = {{\n    {body}\n}};"


def _where(op: Operator) -> str:
    return f"operator {op.op} (#{op.index})"


def _require_int8(graph: Graph, op: Operator, indices: Sequence[int]) -> list[Tensor]:
    tensors = []
    for index in indices:
        tensor = graph.tensor(index)
        if tensor.dtype != "INT8":
            raise UnsupportedModelError(
                f"{_where(op)}: tensor {tensor.name!r} is {tensor.dtype}; only int8 "
                "activations and weights are supported"
            )
        if not tensor.scales:
            raise UnsupportedModelError(f"{_where(op)}: tensor {tensor.name!r} is not quantized")
        tensors.append(tensor)
    return tensors


def _dims4(shape: Sequence[int], where: str) -> list[int]:
    if len(shape) > 4:
        raise UnsupportedModelError(f"{where}: tensors of rank {len(shape)} are not supported")
    return [1] * (4 - len(shape)) + [int(d) for d in shape]


def _bias(graph: Graph, op: Operator, position: int, channels: int) -> Tensor | None:
    if len(op.inputs) <= position or op.inputs[position] < 0:
        return None
    bias = graph.tensor(op.inputs[position])
    if bias.dtype != "INT32" or bias.data is None or bias.size != channels:
        raise UnsupportedModelError(
            f"{_where(op)}: the bias must be a constant int32 tensor of {channels} values, "
            f"not {bias.dtype} {list(bias.shape)}"
        )
    return bias


def _channel_multipliers(
    op: Operator, input: Tensor, filter: Tensor, output: Tensor, channels: int
) -> tuple[list[int], list[int]]:
    if filter.per_channel and len(filter.scales) != channels:
        raise UnsupportedModelError(
            f"{_where(op)}: {len(filter.scales)} filter scales for {channels} channels"
        )
    multipliers, shifts = [], []
    for c in range(channels):
        scale = filter.scales[c] if filter.per_channel else filter.scales[0]
        real = input.scale * scale / output.scale
        m, s = quantize_multiplier(real)
        multipliers.append(m)
        shifts.append(s)
    return multipliers, shifts


def _conv(graph: Graph, op: Operator, n: int, depthwise: bool) -> Step:
    where = _where(op)
    input, filter, output = _require_int8(graph, op, [op.inputs[0], op.inputs[1], op.outputs[0]])
    if filter.data is None:
        raise UnsupportedModelError(f"{where}: the filter must be constant")
    if len(input.shape) != 4 or len(filter.shape) != 4 or len(output.shape) != 4:
        raise UnsupportedModelError(f"{where}: 4-D input, filter and output are required")
    if any(z != 0 for z in filter.zero_points):
        raise UnsupportedModelError(f"{where}: the filter zero point must be 0 (symmetric)")
    o = op.options
    stride_h, stride_w = int(o.get("strideH", 1)), int(o.get("strideW", 1))
    dil_h, dil_w = int(o.get("dilationHFactor", 1)), int(o.get("dilationWFactor", 1))
    padding = int(o.get("padding", 0))
    batches, in_h, in_w, in_c = input.shape
    _, out_h, out_w, out_c = output.shape
    if depthwise:
        _, k_h, k_w, f_c = filter.shape
        if f_c != out_c or out_c % in_c:
            raise UnsupportedModelError(f"{where}: filter {list(filter.shape)} does not fit")
        filter_in_c, depth_multiplier = 1, out_c // in_c
    else:
        f_o, k_h, k_w, filter_in_c = filter.shape
        if f_o != out_c or in_c % filter_in_c or out_c % (in_c // filter_in_c):
            raise UnsupportedModelError(f"{where}: filter {list(filter.shape)} does not fit")
        depth_multiplier = 1
    for axis, (image, k, s, d, got) in {
        "height": (in_h, k_h, stride_h, dil_h, out_h),
        "width": (in_w, k_w, stride_w, dil_w, out_w),
    }.items():
        if compute_out_size(padding, image, k, s, d) != got:
            raise UnsupportedModelError(f"{where}: output {axis} {got} does not match the options")
    act_min, act_max = activation_range(int(o.get("fusedActivationFunction", 0)), output, where)
    bias = _bias(graph, op, 2, out_c)
    multipliers, shifts = _channel_multipliers(op, input, filter, output, out_c)
    p = f"op{n}"
    params = {
        "batches": batches,
        "in_h": in_h,
        "in_w": in_w,
        "in_c": in_c,
        "out_h": out_h,
        "out_w": out_w,
        "out_c": out_c,
        "k_h": k_h,
        "k_w": k_w,
        "filter_in_c": filter_in_c,
        "depth_multiplier": depth_multiplier,
        "stride_h": stride_h,
        "stride_w": stride_w,
        "dil_h": dil_h,
        "dil_w": dil_w,
        "pad_h": compute_padding(stride_h, dil_h, in_h, k_h, out_h),
        "pad_w": compute_padding(stride_w, dil_w, in_w, k_w, out_w),
        "input_offset": -input.zero_point,
        "output_offset": output.zero_point,
        "act_min": act_min,
        "act_max": act_max,
    }
    decls = [
        c_array("int8_t", f"{p}_filter", filter.data),
        c_array("int32_t", f"{p}_multiplier", multipliers),
        c_array("int32_t", f"{p}_shift", shifts),
        _struct("eo_conv_params", f"{p}_params", params),
    ]
    if bias is not None:
        assert bias.data is not None
        decls.insert(1, c_array("int32_t", f"{p}_bias", bias.data))
    bias_ref = f"{p}_bias" if bias is not None else "0"
    kernel = "eo_depthwise_conv2d" if depthwise else "eo_conv2d"
    x, y = op.inputs[0], op.outputs[0]

    def call(ref: Ref) -> str:
        return (
            f"{kernel}(&{p}_params, {ref(x)}, {p}_filter, {bias_ref}, {p}_multiplier, "
            f"{p}_shift, {ref(y)});"
        )

    return Step(op.op, op.index, [x], [y], decls, call)


def _fully_connected(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    input, filter, output = _require_int8(graph, op, [op.inputs[0], op.inputs[1], op.outputs[0]])
    if filter.data is None or len(filter.shape) != 2:
        raise UnsupportedModelError(f"{where}: the weights must be a constant 2-D tensor")
    if int(op.options.get("weightsFormat", 0)) != 0:
        raise UnsupportedModelError(f"{where}: shuffled weights are not supported")
    out_depth, in_depth = filter.shape
    if input.size % in_depth or output.size != (input.size // in_depth) * out_depth:
        raise UnsupportedModelError(f"{where}: shapes do not fit the weights")
    activation = int(op.options.get("fusedActivationFunction", 0))
    act_min, act_max = activation_range(activation, output, where)
    bias = _bias(graph, op, 2, out_depth)
    if filter.per_channel:
        multipliers, shifts = _channel_multipliers(op, input, filter, output, out_depth)
    else:
        product = f32(np.float32(input.scale) * np.float32(filter.scale))
        m, s = quantize_multiplier(product / output.scale)
        multipliers, shifts = [m], [s]
    p = f"op{n}"
    params = {
        "batches": input.size // in_depth,
        "in_depth": in_depth,
        "out_depth": out_depth,
        "input_offset": -input.zero_point,
        "filter_offset": -filter.zero_point,
        "output_offset": output.zero_point,
        "act_min": act_min,
        "act_max": act_max,
        "per_channel": 1 if filter.per_channel else 0,
    }
    decls = [
        c_array("int8_t", f"{p}_filter", filter.data),
        c_array("int32_t", f"{p}_multiplier", multipliers),
        c_array("int32_t", f"{p}_shift", shifts),
        _struct("eo_fc_params", f"{p}_params", params),
    ]
    if bias is not None:
        assert bias.data is not None
        decls.insert(1, c_array("int32_t", f"{p}_bias", bias.data))
    bias_ref = f"{p}_bias" if bias is not None else "0"
    x, y = op.inputs[0], op.outputs[0]

    def call(ref: Ref) -> str:
        return (
            f"eo_fully_connected(&{p}_params, {ref(x)}, {p}_filter, {bias_ref}, "
            f"{p}_multiplier, {p}_shift, {ref(y)});"
        )

    return Step(op.op, op.index, [x], [y], decls, call)


def _pool(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    if len(input.shape) != 4 or len(output.shape) != 4:
        raise UnsupportedModelError(f"{where}: 4-D input and output are required")
    if abs(input.scale - output.scale) > 1e-6 or input.zero_point != output.zero_point:
        raise UnsupportedModelError(f"{where}: input and output quantization must match")
    o = op.options
    stride_h, stride_w = int(o.get("strideH", 1)), int(o.get("strideW", 1))
    f_h, f_w = int(o.get("filterHeight", 1)), int(o.get("filterWidth", 1))
    padding = int(o.get("padding", 0))
    batches, in_h, in_w, depth = input.shape
    _, out_h, out_w, _ = output.shape
    if compute_out_size(padding, in_h, f_h, stride_h, 1) != out_h or (
        compute_out_size(padding, in_w, f_w, stride_w, 1) != out_w
    ):
        raise UnsupportedModelError(f"{where}: output shape does not match the options")
    act_min, act_max = activation_range(int(o.get("fusedActivationFunction", 0)), output, where)
    p = f"op{n}"
    params = {
        "batches": batches,
        "in_h": in_h,
        "in_w": in_w,
        "depth": depth,
        "out_h": out_h,
        "out_w": out_w,
        "f_h": f_h,
        "f_w": f_w,
        "stride_h": stride_h,
        "stride_w": stride_w,
        "pad_h": compute_padding(stride_h, 1, in_h, f_h, out_h),
        "pad_w": compute_padding(stride_w, 1, in_w, f_w, out_w),
        "act_min": act_min,
        "act_max": act_max,
    }
    kernel = "eo_max_pool" if op.op == "MAX_POOL_2D" else "eo_average_pool"
    x, y = op.inputs[0], op.outputs[0]
    decls = [_struct("eo_pool_params", f"{p}_params", params)]
    return Step(
        op.op, op.index, [x], [y], decls, lambda ref: f"{kernel}(&{p}_params, {ref(x)}, {ref(y)});"
    )


def _mean(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    axis_tensor = graph.tensor(op.inputs[1])
    if axis_tensor.data is None:
        raise UnsupportedModelError(f"{where}: the axes must be constant")
    rank = len(input.shape)
    dims = _dims4(input.shape, where)
    axes = sorted({int(a) % rank if rank else 0 for a in axis_tensor.data.reshape(-1).tolist()})
    reduced = [0, 0, 0, 0]
    for a in axes:
        reduced[a + 4 - rank] = 1
    count = int(np.prod([dims[k] for k in range(4) if reduced[k]], dtype=np.int64))
    if count == 0 or output.size != input.size // count:
        raise UnsupportedModelError(f"{where}: output shape does not match the axes")
    multiplier, shift = quantize_multiplier(input.scale / output.scale)
    extra = min(count.bit_length() - 1, 32, 31 + shift)
    multiplier = int((multiplier << extra) // count) if extra >= 0 else multiplier
    shift -= extra
    p = f"op{n}"
    params: dict[str, int | Sequence[int]] = {
        "dims": dims,
        "reduced": reduced,
        "count": count,
        "input_zp": input.zero_point,
        "multiplier": multiplier,
        "shift": shift,
        "output_zp": output.zero_point,
    }
    x, y = op.inputs[0], op.outputs[0]
    decls = [_struct("eo_mean_params", f"{p}_params", params)]
    return Step(
        op.op, op.index, [x], [y], decls, lambda ref: f"eo_mean(&{p}_params, {ref(x)}, {ref(y)});"
    )


def _softmax(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    if output.zero_point != -128 or f32(output.scale) != f32(1.0 / 256):
        raise UnsupportedModelError(
            f"{where}: the output must be quantized with scale 1/256 and zero point -128"
        )
    beta = f32(float(op.options.get("beta", 1.0)))
    real = min(beta * input.scale * float(1 << 26), float((1 << 31) - 1))
    multiplier, left_shift = quantize_multiplier(real)
    diff_min = -calculate_input_radius(5, left_shift)
    depth = input.shape[-1] if input.shape else 1
    outer = input.size // depth
    x, y = op.inputs[0], op.outputs[0]

    def call(ref: Ref) -> str:
        return (
            f"eo_softmax({outer}, {depth}, {multiplier}, {left_shift}, {diff_min}, "
            f"{ref(x)}, {ref(y)});"
        )

    return Step(op.op, op.index, [x], [y], [], call)


def _logistic_tanh(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    if op.op == "LOGISTIC" and output.zero_point != -128:
        raise UnsupportedModelError(f"{where}: the output zero point must be -128")
    real = input.scale * float(1 << 27)
    fraction, left_shift = math.frexp(real)
    multiplier = round_half_away(fraction * float(1 << 31))
    radius = calculate_input_radius(4, left_shift)
    kernel = "eo_logistic" if op.op == "LOGISTIC" else "eo_tanh"
    x, y = op.inputs[0], op.outputs[0]

    def call(ref: Ref) -> str:
        return (
            f"{kernel}({input.size}, {input.zero_point}, {radius}, {multiplier}, {left_shift}, "
            f"{ref(x)}, {ref(y)});"
        )

    return Step(op.op, op.index, [x], [y], [], call)


def _broadcast_strides(shape: Sequence[int], out: Sequence[int], where: str) -> list[int]:
    dims = _dims4(shape, where)
    strides = [0, 0, 0, 0]
    running = 1
    for k in range(3, -1, -1):
        if dims[k] == out[k]:
            strides[k] = running if dims[k] > 1 else 0
        elif dims[k] == 1:
            strides[k] = 0
        else:
            raise UnsupportedModelError(f"{where}: shapes cannot be broadcast")
        running *= dims[k]
    return strides


def _binary(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    a, b, output = _require_int8(graph, op, [op.inputs[0], op.inputs[1], op.outputs[0]])
    out_dims = _dims4(output.shape, where)
    act_min, act_max = activation_range(
        int(op.options.get("fusedActivationFunction", 0)), output, where
    )
    params: dict[str, int | Sequence[int]] = {
        "out_dims": out_dims,
        "strides1": _broadcast_strides(a.shape, out_dims, where),
        "strides2": _broadcast_strides(b.shape, out_dims, where),
        "input1_offset": -a.zero_point,
        "input2_offset": -b.zero_point,
        "output_offset": output.zero_point,
        "act_min": act_min,
        "act_max": act_max,
    }
    if op.op == "ADD":
        twice_max = 2 * max(a.scale, b.scale)
        m1, s1 = quantize_multiplier(a.scale / twice_max)
        m2, s2 = quantize_multiplier(b.scale / twice_max)
        mo, so = quantize_multiplier(twice_max / (float(1 << 20) * output.scale))
        params.update(
            left_shift=20,
            input1_multiplier=m1,
            input1_shift=s1,
            input2_multiplier=m2,
            input2_shift=s2,
            output_multiplier=mo,
            output_shift=so,
        )
    else:
        mo, so = quantize_multiplier(a.scale * b.scale / output.scale)
        params.update(output_multiplier=mo, output_shift=so)
    p = f"op{n}"
    kernel = "eo_add" if op.op == "ADD" else "eo_mul"
    x1, x2, y = op.inputs[0], op.inputs[1], op.outputs[0]
    constants = [i for i in (x1, x2) if graph.tensor(i).is_constant]
    reads = [i for i in (x1, x2) if not graph.tensor(i).is_constant]
    decls = [_struct("eo_binary_params", f"{p}_params", params)]

    def call(ref: Ref) -> str:
        return f"{kernel}(&{p}_params, {ref(x1)}, {ref(x2)}, {ref(y)});"

    return Step(op.op, op.index, reads, [y], decls, call, constants=constants)


def _relu(graph: Graph, op: Operator, n: int) -> Step:
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    x, y = op.inputs[0], op.outputs[0]
    if op.op == "RELU6":
        zero = input.zero_point
        six_real = f32(np.float32(6.0) / np.float32(input.scale))
        six = min(127, max(-128, zero + round_half_away(six_real)))

        def clamp(ref: Ref) -> str:
            return f"eo_clamp({input.size}, {zero}, {six}, {ref(x)}, {ref(y)});"

        return Step(op.op, op.index, [x], [y], [], clamp)
    multiplier, shift = quantize_multiplier(f32(np.float32(input.scale) / np.float32(output.scale)))
    act_min = max(-128, output.zero_point)

    def call(ref: Ref) -> str:
        return (
            f"eo_relu({input.size}, {input.zero_point}, {multiplier}, {shift}, "
            f"{output.zero_point}, {act_min}, 127, {ref(x)}, {ref(y)});"
        )

    return Step(op.op, op.index, [x], [y], [], call)


def _quantize(graph: Graph, op: Operator, n: int) -> Step:
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    multiplier, shift = quantize_multiplier(input.scale / output.scale)
    x, y = op.inputs[0], op.outputs[0]

    def call(ref: Ref) -> str:
        return (
            f"eo_requantize({input.size}, {input.zero_point}, {multiplier}, {shift}, "
            f"{output.zero_point}, {ref(x)}, {ref(y)});"
        )

    return Step(op.op, op.index, [x], [y], [], call)


def _same_quantization(op: Operator, tensors: Sequence[Tensor], output: Tensor) -> None:
    for tensor in tensors:
        if tensor.scale != output.scale or tensor.zero_point != output.zero_point:
            raise UnsupportedModelError(
                f"{_where(op)}: every input must share the output's scale and zero point"
            )


def _concatenation(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    inputs = _require_int8(graph, op, op.inputs)
    (output,) = _require_int8(graph, op, op.outputs)
    _same_quantization(op, inputs, output)
    if int(op.options.get("fusedActivationFunction", 0)) != 0:
        raise UnsupportedModelError(f"{where}: a fused activation is not supported")
    rank = len(output.shape)
    axis = int(op.options.get("axis", 0)) % max(rank, 1)
    outer = int(np.prod(output.shape[:axis], dtype=np.int64))
    copy_sizes = [t.size // max(outer, 1) for t in inputs]
    p = f"op{n}"
    reads = [i for i in op.inputs if not graph.tensor(i).is_constant]
    constants = [i for i in op.inputs if graph.tensor(i).is_constant]
    decls = [c_array("int32_t", f"{p}_sizes", copy_sizes)]
    y = op.outputs[0]

    def call(ref: Ref) -> str:
        pointers = ", ".join(ref(i) for i in op.inputs)
        return (
            f"{{\n        const int8_t *const {p}_in[{len(op.inputs)}] = {{{pointers}}};\n"
            f"        eo_concat({outer}, {len(op.inputs)}, {p}_in, {p}_sizes, {ref(y)});\n    }}"
        )

    return Step(op.op, op.index, reads, [y], decls, call, constants=constants)


def _pad(graph: Graph, op: Operator, n: int) -> Step:
    where = _where(op)
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    _same_quantization(op, [input], output)
    paddings = graph.tensor(op.inputs[1]).data
    if paddings is None:
        raise UnsupportedModelError(f"{where}: the paddings must be constant")
    pad_value = output.zero_point
    if op.op == "PADV2" and len(op.inputs) > 2:
        value = graph.tensor(op.inputs[2]).data
        if value is None:
            raise UnsupportedModelError(f"{where}: the pad value must be constant")
        pad_value = int(value.reshape(-1)[0])
    rank = len(input.shape)
    before = [0] * (4 - rank) + [int(v) for v in paddings.reshape(rank, 2)[:, 0].tolist()]
    params: dict[str, int | Sequence[int]] = {
        "in_dims": _dims4(input.shape, where),
        "before": before,
        "out_dims": _dims4(output.shape, where),
        "pad_value": pad_value,
    }
    p = f"op{n}"
    x, y = op.inputs[0], op.outputs[0]
    decls = [_struct("eo_pad_params", f"{p}_params", params)]
    return Step(
        op.op, op.index, [x], [y], decls, lambda ref: f"eo_pad(&{p}_params, {ref(x)}, {ref(y)});"
    )


def _int32_constant(graph: Graph, op: Operator, position: int, what: str, size: int) -> list[int]:
    tensor = graph.tensor(op.inputs[position]) if len(op.inputs) > position else None
    if tensor is None or tensor.data is None or tensor.dtype != "INT32" or tensor.size != size:
        raise UnsupportedModelError(
            f"{_where(op)}: the {what} must be a constant int32 tensor of {size} values"
        )
    return [int(v) for v in tensor.data.reshape(-1).tolist()]


SPACE_TO_BATCH_PAD_VALUE = 0
"""What SPACE_TO_BATCH_ND writes into its padding. TFLite's kernel writes the output zero
point (a real 0); TFLM's never sets that parameter, so it pads with whatever its persistent
buffer holds: 0 in a fresh arena. The library matches TFLM; the two agree whenever the zero
point is 0."""


def _nhwc(shape: Sequence[int]) -> list[int]:
    """A 4-D NHWC shape, or a 3-D NHC one as NH1C (as TFLM extends it)."""
    dims = [int(d) for d in shape]
    return dims if len(dims) == 4 else [dims[0], dims[1], 1, dims[2]]


def _space_batch(graph: Graph, op: Operator, n: int) -> Step:
    """SPACE_TO_BATCH_ND / BATCH_TO_SPACE_ND on NHWC (or NHC, as NH1C), constant block
    shape and paddings (crops): what TFLM supports."""
    where = _where(op)
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    _same_quantization(op, [input], output)
    rank = len(input.shape)
    if rank not in (3, 4) or len(output.shape) != rank:
        raise UnsupportedModelError(f"{where}: 3-D or 4-D input and output are required")
    spatial = rank - 2
    block = _int32_constant(graph, op, 1, "block shape", spatial)
    margins = _int32_constant(
        graph, op, 2, "paddings" if op.op == "SPACE_TO_BATCH_ND" else "crops", 2 * spatial
    )
    if rank == 3:  # NHC as NH1C
        block, margins = [*block, 1], [*margins, 0, 0]
    in_dims, out_dims = _nhwc(input.shape), _nhwc(output.shape)
    if min(block) < 1 or min(margins) < 0:
        raise UnsupportedModelError(
            f"{where}: block shape {block} or margins {margins} out of range"
        )
    bh, bw = block
    if op.op == "SPACE_TO_BATCH_ND":
        padded_h = in_dims[1] + margins[0] + margins[1]
        padded_w = in_dims[2] + margins[2] + margins[3]
        fits = padded_h % bh == 0 and padded_w % bw == 0
        expected = [in_dims[0] * bh * bw, padded_h // bh, padded_w // bw, in_dims[3]]
    else:
        fits = in_dims[0] % (bh * bw) == 0
        expected = [
            in_dims[0] // (bh * bw),
            in_dims[1] * bh - margins[0] - margins[1],
            in_dims[2] * bw - margins[2] - margins[3],
            in_dims[3],
        ]
    if not fits or expected != out_dims:
        raise UnsupportedModelError(
            f"{where}: output shape {list(output.shape)} does not match block shape "
            f"{block[:spatial]} and margins {margins[: 2 * spatial]}"
        )
    params = {
        "in_batches": in_dims[0],
        "in_h": in_dims[1],
        "in_w": in_dims[2],
        "depth": in_dims[3],
        "out_batches": out_dims[0],
        "out_h": out_dims[1],
        "out_w": out_dims[2],
        "block_h": bh,
        "block_w": bw,
        "top": margins[0],
        "left": margins[2],
        "pad_value": SPACE_TO_BATCH_PAD_VALUE,
    }
    p = f"op{n}"
    kernel = "eo_space_to_batch" if op.op == "SPACE_TO_BATCH_ND" else "eo_batch_to_space"
    x, y = op.inputs[0], op.outputs[0]
    decls = [_struct("eo_space_batch_params", f"{p}_params", params)]
    return Step(
        op.op, op.index, [x], [y], decls, lambda ref: f"{kernel}(&{p}_params, {ref(x)}, {ref(y)});"
    )


def _alias(graph: Graph, op: Operator, n: int) -> Step:
    input, output = _require_int8(graph, op, [op.inputs[0], op.outputs[0]])
    if input.size != output.size:
        raise UnsupportedModelError(f"{_where(op)}: sizes differ")
    _same_quantization(op, [input], output)
    x, y = op.inputs[0], op.outputs[0]
    return Step(
        op.op,
        op.index,
        [x],
        [y],
        [],
        lambda ref: f"eo_copy({input.size}, {ref(x)}, {ref(y)});",
        alias=True,
    )


_LOWER: dict[str, Callable[[Graph, Operator, int], Step]] = {
    "FULLY_CONNECTED": _fully_connected,
    "CONV_2D": lambda g, o, n: _conv(g, o, n, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda g, o, n: _conv(g, o, n, depthwise=True),
    "MAX_POOL_2D": _pool,
    "AVERAGE_POOL_2D": _pool,
    "MEAN": _mean,
    "RESHAPE": _alias,
    "SQUEEZE": _alias,
    "EXPAND_DIMS": _alias,
    "SOFTMAX": _softmax,
    "ADD": _binary,
    "MUL": _binary,
    "LOGISTIC": _logistic_tanh,
    "TANH": _logistic_tanh,
    "RELU": _relu,
    "RELU6": _relu,
    "CONCATENATION": _concatenation,
    "PAD": _pad,
    "PADV2": _pad,
    "QUANTIZE": _quantize,
    "SPACE_TO_BATCH_ND": _space_batch,
    "BATCH_TO_SPACE_ND": _space_batch,
}

SUPPORTED_OPS = tuple(sorted(_LOWER))


def lower(graph: Graph) -> list[Step]:
    """The steps of ``graph``; :class:`UnsupportedModelError` naming every operator the
    kernels lack (all of them at once), or the first unsupported option."""
    missing = sorted({op.op for op in graph.operators if op.op not in _LOWER})
    if missing:
        raise UnsupportedModelError(
            f"unsupported operator{'s' if len(missing) > 1 else ''}: {', '.join(missing)} "
            f"(supported: {', '.join(SUPPORTED_OPS)})"
        )
    return [_LOWER[op.op](graph, op, n) for n, op in enumerate(graph.operators)]
