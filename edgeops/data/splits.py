"""Class labels and stratified, seeded train/validation/test splits.

Labels become class indices over ``classes``, a sorted list of strings: integer labels (and
floats that are whole numbers) sort numerically, then print as ``"0", "1", "10"``; any other
labels sort as strings. ``y[i]`` is the index of sample ``i``'s class in ``classes``.

A split is stratified and seeded without any random number generator whose stream could
change between library versions: within each class, samples are ordered by
``sha256(f"{seed}:{index}")`` (the sample's index in the dataset), and the first ones go to
test, the next to validation, the rest to train. A class of ``n`` samples gives
``max(1, floor(n * fraction + 0.5))`` to each held-out split, so every class appears in
every split and needs at least :data:`MIN_SAMPLES_PER_CLASS` samples. Each split's indices
are stored in increasing order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from edgeops.data.errors import ClassCountError, LabelColumnError

SPLITS = ("train", "val", "test")
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
MIN_SAMPLES_PER_CLASS = 3  # one each for train, validation and test


def encode_labels(labels: np.ndarray, *, what: str) -> tuple[np.ndarray, list[str]]:
    """Class indices (int64) and the sorted class names of a 1-D array of labels."""
    keys = _label_keys(labels, what=what)
    if keys.dtype.kind == "i":
        values = np.unique(keys)
        classes = [str(int(v)) for v in values]
        return np.searchsorted(values, keys).astype(np.int64), classes
    values = np.unique(keys)
    return np.searchsorted(values, keys).astype(np.int64), [str(v) for v in values]


def labels_to_indices(labels: np.ndarray, classes: Sequence[str], *, what: str) -> np.ndarray:
    """Class indices (int64) of ``labels`` over known ``classes``; an unknown label is an error."""
    keys = _label_keys(labels, what=what)
    index = {name: i for i, name in enumerate(classes)}
    names = [str(int(k)) if keys.dtype.kind == "i" else str(k) for k in keys]
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5])
        raise LabelColumnError(
            f"{what} holds labels the model does not know: {shown}; known classes: "
            f"{', '.join(classes)}"
        )
    return np.array([index[n] for n in names], dtype=np.int64)


def _label_keys(labels: np.ndarray, *, what: str) -> np.ndarray:
    """Labels as int64 (integer-valued) or as str (anything else)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise LabelColumnError(f"{what} must be one label per sample, got shape {labels.shape}")
    kind = labels.dtype.kind
    if kind in "iu":
        return labels.astype(np.int64)
    if kind == "b":
        return labels.astype(str)
    if kind == "f":
        bad = ~np.isfinite(labels)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise LabelColumnError(
                f"{what} has {int(bad.sum())} missing or non-finite labels "
                f"(first in sample {first + 1})"
            )
        if not np.array_equal(labels, np.round(labels)):
            example = labels[labels != np.round(labels)][0]
            raise LabelColumnError(
                f"{what} holds fractional numbers (e.g. {float(example)!r}), not class labels"
            )
        return labels.astype(np.int64)
    if kind in "US":
        return np.array([_text(v) for v in labels.tolist()], dtype=str)
    if kind == "O":
        values = labels.tolist()
        missing = [i for i, v in enumerate(values) if v is None or _is_nan(v)]
        if missing:
            raise LabelColumnError(
                f"{what} has {len(missing)} missing labels (first in sample {missing[0] + 1})"
            )
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return np.array(values, dtype=np.int64)
        return np.array([_text(v) for v in values], dtype=str)
    raise LabelColumnError(f"{what} holds values of type {labels.dtype}, not class labels")


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_class_counts(y: np.ndarray, classes: Sequence[str], *, what: str) -> None:
    """At least two classes, each with enough samples for train, validation and test."""
    if len(classes) < 2:
        shown = f" ({classes[0]!r})" if classes else ""
        raise ClassCountError(
            f"{what} has {len(classes)} class{shown}; classification needs at least 2"
        )
    counts = np.bincount(y, minlength=len(classes))
    for index in np.flatnonzero(counts < MIN_SAMPLES_PER_CLASS):
        raise ClassCountError(
            f"{what}: class {classes[int(index)]!r} has {int(counts[index])} sample(s); a "
            f"stratified train/validation/test split needs at least {MIN_SAMPLES_PER_CLASS} "
            "per class"
        )


def stratified_split(
    y: np.ndarray,
    *,
    seed: int,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, np.ndarray]:
    """Indices of train, val and test: per class, test first, then val, by seeded order."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for label in np.unique(y):
        members = _ordered(np.flatnonzero(y == label), seed)
        n_test = _share(len(members), test_fraction)
        n_val = _share(len(members), val_fraction)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    return {name: _sorted(chunks) for name, chunks in parts.items()}


def carve(
    indices: np.ndarray, y: np.ndarray, *, seed: int, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, carved), carving ``fraction`` of each class, seeded."""
    kept: list[np.ndarray] = []
    carved: list[np.ndarray] = []
    labels = y[indices]
    for label in np.unique(labels):
        members = _ordered(indices[labels == label], seed)
        count = _share(len(members), fraction)
        carved.append(members[:count])
        kept.append(members[count:])
    return _sorted(kept), _sorted(carved)


def _share(count: int, fraction: float) -> int:
    return max(1, math.floor(count * fraction + 0.5))


def _ordered(indices: np.ndarray, seed: int) -> np.ndarray:
    keys = [hashlib.sha256(f"{seed}:{int(i)}".encode()).digest() for i in indices]
    order = sorted(range(len(indices)), key=keys.__getitem__)
    return indices[np.array(order, dtype=np.int64)] if order else indices


def _sorted(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(chunks)).astype(np.int64)
