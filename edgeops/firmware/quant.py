"""Generation-time quantization arithmetic, computed exactly as TFLite Micro prepares it.

Every figure here is one TFLM's kernels compute in their Prepare step (in float32 where TFLM
multiplies floats, in double where it multiplies doubles), so the integers baked into the C
arrays are the ones the interpreter uses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgeops.firmware.errors import UnsupportedModelError
from edgeops.firmware.graph import Tensor

__all__ = [
    "activation_range",
    "calculate_input_radius",
    "compute_out_size",
    "compute_padding",
    "f32",
    "quantize_multiplier",
    "round_half_away",
]

INT8_MIN, INT8_MAX = -128, 127
ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


def f32(value: float | np.floating[Any]) -> float:
    """``value`` rounded to float32 (as a Python float)."""
    return float(np.float32(value))


def round_half_away(value: float) -> int:
    """std::round: halves away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: (Q31 multiplier, signed shift; positive is left)."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    fixed = round_half_away(fraction * float(1 << 31))
    if fixed == 1 << 31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return fixed, shift


def calculate_input_radius(integer_bits: int, left_shift: int, total_bits: int = 31) -> int:
    maximum = (
        1.0
        * ((1 << integer_bits) - 1)
        * float(1 << (total_bits - integer_bits))
        / float(1 << left_shift)
    )
    return math.floor(maximum)


def _quantize(value: float, scale: float, zero_point: int) -> int:
    scaled = float(np.float32(value) / np.float32(scale))
    return zero_point + round_half_away(scaled)


def activation_range(activation: int, output: Tensor, where: str) -> tuple[int, int]:
    """The clamp bounds of a fused activation on an int8 output (CalculateActivationRange)."""
    scale, zp = output.scale, output.zero_point
    if activation == 0:
        return INT8_MIN, INT8_MAX
    if activation == 1:
        return max(INT8_MIN, _quantize(0.0, scale, zp)), INT8_MAX
    if activation == 3:
        return max(INT8_MIN, _quantize(0.0, scale, zp)), min(INT8_MAX, _quantize(6.0, scale, zp))
    if activation == 2:
        return max(INT8_MIN, _quantize(-1.0, scale, zp)), min(INT8_MAX, _quantize(1.0, scale, zp))
    name = ACTIVATIONS.get(activation, str(activation))
    raise UnsupportedModelError(f"{where}: fused activation {name} is not supported")


def compute_out_size(padding: int, image: int, filter_size: int, stride: int, dilation: int) -> int:
    effective = (filter_size - 1) * dilation + 1
    if padding == 0:  # SAME
        return (image + stride - 1) // stride
    return (image + stride - effective) // stride


def compute_padding(stride: int, dilation: int, image: int, filter_size: int, out: int) -> int:
    effective = (filter_size - 1) * dilation + 1
    total = (out - 1) * stride + effective - image
    return max(total, 0) // 2
