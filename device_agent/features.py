"""Feature rules: the one definition of how a raw sample becomes a model input.

A :class:`FeatureRule` is fitted once on a dataset's training split (by the hub), recorded
with the dataset version, written into every model card (``preprocessing``) and applied
identically in training, in the agent and, translated to C, in generated firmware. It is
plain numpy so that it runs on devices.

The maths of :meth:`FeatureRule.apply`, for a batch ``x`` of shape ``(n, *input_shape)``:

1. ``x = x.astype(float32)``
2. if ``transpose`` is set: permute the axes of each sample,
   ``x = x.transpose((0, *(a + 1 for a in transpose)))``
3. ``y = (x - offset) * scale`` in float32, where ``offset`` and ``scale`` (cast to float32)
   have length 1 (one value for every element) or length ``F``, the size of the **last axis
   of the sample after step 2** (the feature axis: a column of a table, a channel of a time
   series or image), broadcast along that axis
4. ``y = y.reshape((n, *model_input_shape))`` (C order; same number of elements)

Every operation is one float32 subtraction and one float32 multiplication per element, so
C code doing ``(x - o) * s`` in ``float`` (without fused multiply-add contraction) gives
bit-identical results.

A :class:`WindowRule` says how a device cuts a continuous sensor stream into raw samples:
windows of ``length`` readings every ``stride`` readings along ``axis`` of the raw sample.

Fitting (:meth:`FeatureRule.fit`), with statistics over every axis except the feature axis
(per feature) or over all elements (``per_feature=False``), computed in float64:

==============  ===============  ========================================================
kind            offset           scale
==============  ===============  ========================================================
standardize     mean             1 / std (population std); 1 where std is 0
minmax          min              1 / (max - min); 1 where max == min
scale255        0                1 / 255 (8-bit pixels to [0, 1])
identity        0                1
==============  ===============  ========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from device_agent.errors import AgentError

__all__ = ["FEATURE_RULE_KINDS", "FeatureRule", "FeatureRuleError", "WindowRule"]

SCHEMA_VERSION = 1
FEATURE_RULE_KINDS = ("standardize", "minmax", "scale255", "identity")

_RULE_FIELDS = {
    "schema",
    "input_shape",
    "offset",
    "scale",
    "transpose",
    "model_input_shape",
    "window",
}
_WINDOW_FIELDS = {"length", "stride", "axis"}


class FeatureRuleError(AgentError, ValueError):
    """A feature rule is malformed, or does not fit the data it is applied to."""


@dataclass(frozen=True)
class WindowRule:
    """Windows of ``length`` readings taken every ``stride`` readings along ``axis``.

    ``axis`` is an axis of one raw sample (negative counts from the end); a stream has the
    raw sample's shape except along ``axis``, where it may be any length.
    """

    length: int
    stride: int
    axis: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("length", "stride"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise FeatureRuleError(
                    f"window rule: field {name!r} must be a positive integer, got {value!r}"
                )
        if not _is_int(self.axis):
            raise FeatureRuleError(
                f"window rule: field 'axis' must be an integer, got {self.axis!r}"
            )

    def windows(self, stream: np.ndarray) -> np.ndarray:
        """The full windows of ``stream`` as a batch of raw samples (axis 0 is the window).

        Window ``k`` covers readings ``k * stride .. k * stride + length - 1``; a partial
        window at the end is left out. ``stream`` shorter than one window gives an empty
        batch.
        """
        stream = np.asarray(stream)
        if stream.ndim == 0:
            raise FeatureRuleError("window rule: the stream must have at least one axis")
        axis = self._axis(stream.ndim)
        count = max(0, (stream.shape[axis] - self.length) // self.stride + 1)
        parts = [
            np.take(stream, np.arange(k * self.stride, k * self.stride + self.length), axis=axis)
            for k in range(count)
        ]
        if not parts:
            shape = list(stream.shape)
            shape[axis] = self.length
            return np.empty((0, *shape), dtype=stream.dtype)
        return np.stack(parts)

    def _axis(self, ndim: int) -> int:
        if not -ndim <= self.axis < ndim:
            raise FeatureRuleError(
                f"window rule: axis {self.axis} does not exist in a sample with {ndim} axes"
            )
        return self.axis % ndim

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "length": self.length, "stride": self.stride, "axis": self.axis}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise FeatureRuleError(f"window rule must be an object, got {type(data).__name__}")
        for name in ("length", "stride"):
            if name not in data:
                raise FeatureRuleError(f"window rule: missing field {name!r}")
        return cls(
            length=data["length"],
            stride=data["stride"],
            axis=data.get("axis", -1),
            extra={k: v for k, v in data.items() if k not in _WINDOW_FIELDS},
        )


_NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float


@dataclass(frozen=True)
class FeatureRule:
    """How one raw sample of ``input_shape`` becomes a model input of ``model_input_shape``.

    See the module docstring for the exact maths. ``extra`` keeps fields of a newer rule
    that this version does not know, so documents round-trip without loss.
    """

    input_shape: tuple[int, ...]
    offset: list[float]
    scale: list[float]
    transpose: tuple[int, ...] | None = None
    model_input_shape: tuple[int, ...] = ()
    window: WindowRule | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _offset: np.ndarray = field(init=False, repr=False, compare=False)
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _batch_axes: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        input_shape = _shape(self.input_shape, "input_shape")
        object.__setattr__(self, "input_shape", input_shape)
        if self.transpose is not None:
            transpose = tuple(self.transpose) if isinstance(self.transpose, Sequence) else None
            if (
                transpose is None
                or not all(_is_int(a) for a in transpose)
                or sorted(int(a) for a in transpose) != list(range(len(input_shape)))
            ):
                raise FeatureRuleError(
                    f"feature rule: field 'transpose' must be a permutation of the "
                    f"{len(input_shape)} sample axes, got {self.transpose!r}"
                )
            object.__setattr__(self, "transpose", tuple(int(a) for a in transpose))
        model_shape = self.model_input_shape or self._transposed_shape(input_shape)
        object.__setattr__(self, "model_input_shape", _shape(model_shape, "model_input_shape"))
        for name in ("offset", "scale"):
            object.__setattr__(self, name, _floats(getattr(self, name), name))
            values = getattr(self, name)
            if len(values) not in (1, self.num_features):
                raise FeatureRuleError(
                    f"feature rule: field {name!r} must hold 1 or {self.num_features} values "
                    f"(the size of the feature axis), got {len(values)}"
                )
        # the per-sample path (agent, firmware oracle) reuses these instead of rebuilding them
        object.__setattr__(self, "_offset", np.asarray(self.offset, dtype=np.float32))
        object.__setattr__(self, "_scale", np.asarray(self.scale, dtype=np.float32))
        if self.transpose is not None:
            object.__setattr__(self, "_batch_axes", (0, *(a + 1 for a in self.transpose)))
        if math.prod(self.model_input_shape) != math.prod(input_shape):
            raise FeatureRuleError(
                f"feature rule: model_input_shape {list(self.model_input_shape)} holds "
                f"{math.prod(self.model_input_shape)} elements, input_shape "
                f"{list(input_shape)} holds {math.prod(input_shape)}"
            )
        if self.window is not None:
            axis = self.window._axis(len(input_shape))
            if input_shape[axis] != self.window.length:
                raise FeatureRuleError(
                    f"feature rule: window length {self.window.length} differs from the "
                    f"sample's size {input_shape[axis]} along axis {self.window.axis}"
                )

    # -- the maths ----------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        """The size of the feature axis: the last axis of a sample after ``transpose``."""
        return self._transposed_shape(self.input_shape)[-1]

    def _transposed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.transpose is None or len(self.transpose) != len(shape):
            return shape
        return tuple(shape[a] for a in self.transpose)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """A batch of raw samples ``(n, *input_shape)`` -> float32 ``(n, *model_input_shape)``."""
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            raise FeatureRuleError(
                f"feature rule expects a batch of samples of shape {list(self.input_shape)}, "
                f"got an array of shape {list(x.shape)}"
            )
        if x.dtype.kind not in _NUMERIC_KINDS:
            raise FeatureRuleError(f"feature rule expects numbers, got dtype {x.dtype}")
        y = x.astype(np.float32)
        if self.transpose is not None:
            y = y.transpose(self._batch_axes)
        y = (y - self._offset) * self._scale
        return np.ascontiguousarray(y.reshape((x.shape[0], *self.model_input_shape)))

    @classmethod
    def fit(
        cls,
        kind: str,
        x_train: np.ndarray,
        *,
        per_feature: bool = True,
        transpose: tuple[int, ...] | None = None,
        model_input_shape: tuple[int, ...] | None = None,
        window: WindowRule | None = None,
    ) -> FeatureRule:
        """Fit a rule of ``kind`` (see the module docstring) on a batch of raw samples."""
        if kind not in FEATURE_RULE_KINDS:
            raise FeatureRuleError(
                f"unknown feature rule kind {kind!r}; known: {', '.join(FEATURE_RULE_KINDS)}"
            )
        x = np.asarray(x_train)
        if x.ndim < 2 or x.shape[0] == 0:
            raise FeatureRuleError(
                f"fitting a feature rule needs a non-empty batch of samples, got shape "
                f"{list(x.shape)}"
            )
        shape = tuple(int(d) for d in x.shape[1:])
        cls(input_shape=shape, offset=[0.0], scale=[1.0], transpose=transpose)  # validates
        if kind in ("scale255", "identity"):
            offset, scale = [0.0], [1.0 / 255.0 if kind == "scale255" else 1.0]
        else:
            z = x.astype(np.float64)
            if transpose is not None:
                z = z.transpose((0, *(a + 1 for a in transpose)))
            z = z.reshape(-1, z.shape[-1]) if per_feature else z.reshape(-1, 1)
            if not np.isfinite(z).all():
                raise FeatureRuleError("cannot fit a feature rule on NaN or infinite values")
            if kind == "standardize":
                centre, spread = z.mean(axis=0), z.std(axis=0)
            else:
                centre, spread = z.min(axis=0), z.max(axis=0) - z.min(axis=0)
            offset = [float(v) for v in centre]
            scale = [1.0 / float(s) if s > 0 else 1.0 for s in spread]
        rule = cls(
            input_shape=shape,
            offset=offset,
            scale=scale,
            transpose=transpose,
            model_input_shape=model_input_shape or (),
            window=window,
        )
        return rule

    # -- documents ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this rule (for model cards and dataset rows)."""
        return {
            **self.extra,
            "schema": SCHEMA_VERSION,
            "input_shape": list(self.input_shape),
            "offset": list(self.offset),
            "scale": list(self.scale),
            "transpose": None if self.transpose is None else list(self.transpose),
            "model_input_shape": list(self.model_input_shape),
            "window": None if self.window is None else self.window.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The rule of a JSON object; FeatureRuleError naming the field if malformed."""
        if not isinstance(data, Mapping):
            raise FeatureRuleError(f"feature rule must be an object, got {type(data).__name__}")
        for name in ("input_shape", "offset", "scale"):
            if name not in data:
                raise FeatureRuleError(f"feature rule: missing field {name!r}")
        window = data.get("window")
        transpose = data.get("transpose")
        if transpose is not None and not isinstance(transpose, list | tuple):
            raise FeatureRuleError(
                f"feature rule: field 'transpose' must be a list or null, got {transpose!r}"
            )
        return cls(
            input_shape=data["input_shape"],
            offset=data["offset"],
            scale=data["scale"],
            transpose=None if transpose is None else tuple(transpose),
            model_input_shape=data.get("model_input_shape") or (),
            window=None if window is None else WindowRule.from_dict(window),
            extra={k: v for k, v in data.items() if k not in _RULE_FIELDS},
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _shape(value: object, name: str) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or not all(_is_int(d) and int(d) > 0 for d in value)
    ):
        raise FeatureRuleError(
            f"feature rule: field {name!r} must be a non-empty list of positive integers, "
            f"got {value!r}"
        )
    return tuple(int(d) for d in value)


def _floats(value: object, name: str) -> list[float]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise FeatureRuleError(
            f"feature rule: field {name!r} must be a non-empty list of numbers, got {value!r}"
        )
    result: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float | np.number):
            raise FeatureRuleError(f"feature rule: field {name!r} holds a non-number {item!r}")
        number = float(item)
        if not math.isfinite(number):
            raise FeatureRuleError(f"feature rule: field {name!r} holds {number}")
        result.append(number)
    return result
