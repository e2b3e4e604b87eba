"""Histogram sketches: the reference statistics drift detection compares the field against.

One implementation, used by the hub (to record a dataset's and a model's reference
distributions) and by the agent (to sketch what it sees); numpy only.

**Edges.** :func:`quantile_edges` takes the ``bins - 1`` inner quantiles ``q = k / bins``
(``k = 1 .. bins - 1``, numpy's default ``linear`` interpolation, in float64) of the finite
values, and collapses duplicates (``np.unique``), so a constant feature has one edge and a
feature that is mostly zero has fewer edges than asked. The result is strictly increasing.

**Bins.** With inner edges ``e[0] < ... < e[m-1]`` there are ``m + 1`` bins: bin ``i`` counts
``e[i-1] <= v < e[i]``; values below ``e[0]`` (and ``-inf``) go to bin 0, values at or above
``e[m-1]`` (and ``+inf``) to bin ``m``. NaN is not counted. Comparisons are made in float64.

**Features.** For a batch of model inputs ``x``, :func:`feature_matrix` decides what a
feature is: ``(n, F)`` tabular inputs have one feature per column; images ``(n, H, W, C)`` (at least
:data:`IMAGE_GRID` pixels each way) have one feature per cell of an ``IMAGE_GRID`` x
``IMAGE_GRID`` grid and channel: the mean of the cell's pixels (the image is cropped to a
multiple of the grid), one value per sample -- pooled pixels of a mostly black image would
collapse to a handful of bins; other inputs with more axes, ``(n, ..., C)`` (time series
``(n, T, C)``), have one feature per channel ``C`` of the last axis, pooling every position
of every sample; ``(n,)`` is one feature.

**Outputs.** :meth:`ReferenceStats.with_outputs` adds the class histogram (``argmax`` of
the probabilities) and the histogram of the confidence (the largest probability) over the
fixed edges :data:`CONFIDENCE_EDGES` = 0.1, 0.2, ..., 0.9 (ten bins).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import numpy as np

from device_agent.errors import AgentError

__all__ = [
    "CONFIDENCE_EDGES",
    "DEFAULT_BINS",
    "ReferenceStats",
    "SketchError",
    "bin_counts",
    "feature_matrix",
    "quantile_edges",
]

SCHEMA_VERSION = 1
DEFAULT_BINS = 16
CONFIDENCE_EDGES: tuple[float, ...] = tuple(k / 10 for k in range(1, 10))

T = TypeVar("T")

_FIELDS = {
    "schema",
    "feature_edges",
    "feature_counts",
    "class_counts",
    "confidence_edges",
    "confidence_counts",
    "feature_names",
}


class SketchError(AgentError, ValueError):
    """Malformed edges, values or reference statistics."""


def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """The unique, increasing inner edges of ``bins`` quantile bins of the finite values.

    Empty (or all non-finite) ``values`` give no edges: a single bin.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise SketchError(f"bins must be a positive integer, got {bins!r}")
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0 or bins == 1:
        return np.empty(0, dtype=np.float64)
    quantiles = np.quantile(flat, [k / bins for k in range(1, bins)])
    return np.unique(quantiles)


def bin_counts(values: np.ndarray, edges: np.ndarray | Sequence[float]) -> np.ndarray:
    """How many of ``values`` fall in each of the ``len(edges) + 1`` bins (int64).

    Bin ``i`` counts ``edges[i-1] <= v < edges[i]``; below the first edge is bin 0, at or
    above the last edge the last bin; NaN is not counted.
    """
    edges_array = np.asarray(edges, dtype=np.float64)
    if edges_array.ndim != 1:
        raise SketchError(f"edges must be one-dimensional, got shape {list(edges_array.shape)}")
    if not np.isfinite(edges_array).all():
        raise SketchError("edges must be finite numbers")
    if edges_array.size > 1 and not (np.diff(edges_array) > 0).all():
        raise SketchError("edges must be strictly increasing")
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[~np.isnan(flat)]
    index = np.searchsorted(edges_array, flat, side="right")
    return np.bincount(index, minlength=edges_array.size + 1).astype(np.int64)


IMAGE_GRID = 4  # images are sketched as the mean of each cell of a 4 x 4 grid


def feature_matrix(x_model_inputs: np.ndarray) -> np.ndarray:
    """The batch as a ``(values, features)`` matrix, by the rule in the module docstring."""
    x = np.asarray(x_model_inputs)
    if x.ndim == 0:
        raise SketchError("model inputs must be a batch (axis 0: samples), got a scalar")
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if x.ndim == 4 and min(x.shape[1], x.shape[2]) >= IMAGE_GRID:
        n, height, width, channels = x.shape
        cell_h, cell_w = height // IMAGE_GRID, width // IMAGE_GRID
        cropped = x[:, : cell_h * IMAGE_GRID, : cell_w * IMAGE_GRID, :]
        cells = cropped.reshape(n, IMAGE_GRID, cell_h, IMAGE_GRID, cell_w, channels)
        means: np.ndarray = cells.mean(axis=(2, 4))
        return means.reshape(n, IMAGE_GRID * IMAGE_GRID * channels)
    return x.reshape(-1, x.shape[-1])


@dataclass
class ReferenceStats:
    """Reference histograms of a dataset's features, and of a model's outputs.

    ``feature_edges[f]`` are the inner edges of feature ``f`` and ``feature_counts[f]`` its
    ``len(feature_edges[f]) + 1`` bin counts. ``class_counts``, ``confidence_edges`` and
    ``confidence_counts`` are None until :meth:`with_outputs`. ``feature_names`` names the
    features when they are table columns. ``extra`` keeps fields this version does not know.
    """

    feature_edges: list[list[float]]
    feature_counts: list[list[int]]
    class_counts: list[int] | None = None
    confidence_edges: list[float] | None = None
    confidence_counts: list[int] | None = None
    feature_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.feature_edges) != len(self.feature_counts):
            raise SketchError(
                f"reference statistics: {len(self.feature_edges)} feature edge lists but "
                f"{len(self.feature_counts)} count lists"
            )
        for index, (edges, counts) in enumerate(
            zip(self.feature_edges, self.feature_counts, strict=True)
        ):
            if len(counts) != len(edges) + 1:
                raise SketchError(
                    f"reference statistics: feature {index} has {len(edges)} edges, so "
                    f"{len(edges) + 1} counts are expected, got {len(counts)}"
                )
        if (self.confidence_edges is None) != (self.confidence_counts is None):
            raise SketchError(
                "reference statistics: confidence_edges and confidence_counts go together"
            )
        if (
            self.confidence_edges is not None
            and self.confidence_counts is not None
            and len(self.confidence_counts) != len(self.confidence_edges) + 1
        ):
            raise SketchError(
                f"reference statistics: {len(self.confidence_edges)} confidence edges need "
                f"{len(self.confidence_edges) + 1} counts, got {len(self.confidence_counts)}"
            )
        if self.feature_names is not None and len(self.feature_names) != len(self.feature_edges):
            raise SketchError(
                f"reference statistics: {len(self.feature_names)} feature names for "
                f"{len(self.feature_edges)} features"
            )

    @property
    def num_features(self) -> int:
        return len(self.feature_edges)

    @classmethod
    def from_features(
        cls,
        x_model_inputs: np.ndarray,
        bins: int = DEFAULT_BINS,
        *,
        feature_names: list[str] | None = None,
    ) -> ReferenceStats:
        """Quantile edges and reference counts of every feature of a batch of model inputs."""
        matrix = feature_matrix(x_model_inputs)
        edges = [quantile_edges(matrix[:, f], bins) for f in range(matrix.shape[1])]
        return cls(
            feature_edges=[[float(e) for e in column] for column in edges],
            feature_counts=[
                [int(c) for c in bin_counts(matrix[:, f], column)] for f, column in enumerate(edges)
            ],
            feature_names=None if feature_names is None else list(feature_names),
        )

    def count_features(self, x_model_inputs: np.ndarray) -> list[list[int]]:
        """The histograms of new model inputs over this reference's edges."""
        matrix = feature_matrix(x_model_inputs)
        if matrix.shape[1] != self.num_features:
            raise SketchError(
                f"model inputs have {matrix.shape[1]} features, the reference has "
                f"{self.num_features}"
            )
        return [
            [int(c) for c in bin_counts(matrix[:, f], edges)]
            for f, edges in enumerate(self.feature_edges)
        ]

    def with_outputs(self, probabilities: np.ndarray) -> ReferenceStats:
        """A copy with the class and confidence histograms of a model's outputs.

        ``probabilities`` is ``(n, classes)``; ``(n,)`` or ``(n, 1)`` is read as the
        probability of class 1 of a binary classifier.
        """
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1):
            p = p.reshape(-1)
            p = np.stack([1.0 - p, p], axis=1)
        if p.ndim != 2 or p.shape[0] == 0:
            raise SketchError(
                f"probabilities must be a non-empty (samples, classes) array, got shape "
                f"{list(p.shape)}"
            )
        if not np.isfinite(p).all():
            raise SketchError("probabilities hold NaN or infinite values")
        classes = np.bincount(p.argmax(axis=1), minlength=p.shape[1])
        confidence = bin_counts(p.max(axis=1), CONFIDENCE_EDGES)
        return dataclasses.replace(
            self,
            class_counts=[int(c) for c in classes],
            confidence_edges=list(CONFIDENCE_EDGES),
            confidence_counts=[int(c) for c in confidence],
            extra=dict(self.extra),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "schema": SCHEMA_VERSION,
            "feature_edges": [list(e) for e in self.feature_edges],
            "feature_counts": [list(c) for c in self.feature_counts],
            "class_counts": None if self.class_counts is None else list(self.class_counts),
            "confidence_edges": _copy(self.confidence_edges),
            "confidence_counts": _copy(self.confidence_counts),
            "feature_names": _copy(self.feature_names),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The statistics of a JSON object; SketchError naming the field if malformed."""
        if not isinstance(data, Mapping):
            raise SketchError(f"reference statistics must be an object, got {type(data).__name__}")
        for name in ("feature_edges", "feature_counts"):
            if name not in data:
                raise SketchError(f"reference statistics: missing field {name!r}")
        names = data.get("feature_names")
        if names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            raise SketchError("reference statistics: field 'feature_names' must list strings")
        return cls(
            feature_edges=_nested(data["feature_edges"], "feature_edges", _number),
            feature_counts=_nested(data["feature_counts"], "feature_counts", _count),
            class_counts=_optional(data.get("class_counts"), "class_counts", _count),
            confidence_edges=_optional(data.get("confidence_edges"), "confidence_edges", _number),
            confidence_counts=_optional(data.get("confidence_counts"), "confidence_counts", _count),
            feature_names=None if names is None else list(names),
            extra={k: v for k, v in data.items() if k not in _FIELDS},
        )


def _copy(values: list[T] | None) -> list[T] | None:
    return None if values is None else list(values)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SketchError(f"reference statistics: field {name!r} holds a non-number {value!r}")
    if not math.isfinite(value):
        raise SketchError(f"reference statistics: field {name!r} holds {value}")
    return float(value)


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SketchError(
            f"reference statistics: field {name!r} holds {value!r}, not a count (integer >= 0)"
        )
    return value


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise SketchError(
            f"reference statistics: field {name!r} must be a list, got {type(value).__name__}"
        )
    return list(value)


def _optional(value: object, name: str, item: Any) -> list[Any] | None:
    if value is None:
        return None
    return [item(v, name) for v in _list(value, name)]


def _nested(value: object, name: str, item: Any) -> list[list[Any]]:
    return [[item(v, name) for v in _list(row, name)] for row in _list(value, name)]
