"""Labelling sources: who says what the raw samples the devices sent really were.

:class:`Labeler` is the protocol: ``label(samples)`` gives one class name per sample, or None
where the source has no label for it (those samples are left out). Two sources ship:

* :class:`SimulatedOracle` (demos, tests): knows the true label of every sample of a
  registered dataset version, as a perfect human labeller would, and answers for the
  device samples that are (within a tolerance) samples of that dataset. ``noise`` makes it
  wrong on that fraction of answers (seeded), to show what bad labels do.
* :class:`LabelledFileLabeler` (production): a labelled CSV, Parquet or NPZ file, the work of
  people who labelled samples exported from the hub, read by the dataset importer's reader;
  a device sample gets the label of the matching row of the file.

Both match a device sample to a known one by nearest neighbour on the raw values (largest
absolute difference at most ``tolerance``). :func:`labeler_from_params` builds a source from
its JSON description (``describe()``), which is how a resumed pipeline run gets it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edgeops.pipelines.errors import CTConfigError, LabelingError

if TYPE_CHECKING:
    from edgeops.data import DatasetService

__all__ = [
    "LABELER_KINDS",
    "Labeler",
    "LabelledFileLabeler",
    "NearestLabeler",
    "SimulatedOracle",
    "labeler_from_params",
]

LABELER_KINDS = ("oracle", "file")
_CHUNK = 256


@runtime_checkable
class Labeler(Protocol):
    """A source of labels for raw samples."""

    def label(self, samples: np.ndarray) -> list[str | None]:
        """One class name per sample (``samples``: ``(n, ...)`` raw inputs), None if unknown."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON description :func:`labeler_from_params` turns back into this source."""
        ...


class NearestLabeler:
    """Labels samples with the label of the nearest known sample, if close enough."""

    def __init__(
        self,
        known: np.ndarray,
        labels: Sequence[str],
        *,
        tolerance: float,
        noise: float = 0.0,
        classes: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        known = np.asarray(known, dtype=np.float64)
        if len(known) != len(labels):
            raise LabelingError(f"{len(known)} known samples but {len(labels)} labels")
        if len(known) == 0:
            raise LabelingError("the labelling source holds no labelled samples")
        if not 0.0 <= noise < 1.0:
            raise CTConfigError(f"labelling noise must be in [0, 1), got {noise}")
        self._known = known.reshape(len(known), -1)
        self._labels = [str(label) for label in labels]
        self._tolerance = float(tolerance)
        self._noise = float(noise)
        self._classes = sorted(set(classes or self._labels))
        self._seed = seed

    def label(self, samples: np.ndarray) -> list[str | None]:
        x = np.asarray(samples, dtype=np.float64)
        if len(x) == 0:
            return []
        x = x.reshape(len(x), -1)
        if x.shape[1] != self._known.shape[1]:
            raise LabelingError(
                f"samples have {x.shape[1]} values each, the labelled ones "
                f"{self._known.shape[1]}; they are not the same kind of data"
            )
        found: list[str | None] = []
        known_sq = (self._known**2).sum(axis=1)
        for start in range(0, len(x), _CHUNK):
            chunk = x[start : start + _CHUNK]
            # nearest by Euclidean distance (one matrix product), then checked value by value
            squared = known_sq[None, :] - 2.0 * chunk @ self._known.T
            nearest = squared.argmin(axis=1)
            gaps = np.abs(chunk - self._known[nearest]).max(axis=1)
            for index, gap in zip(nearest, gaps, strict=True):
                close = bool(gap <= self._tolerance)
                found.append(self._labels[int(index)] if close else None)
        if self._noise > 0 and len(self._classes) > 1:
            rng = np.random.default_rng(self._seed)
            flips = rng.random(len(found)) < self._noise
            for i, flip in enumerate(flips):
                current = found[i]
                if flip and current is not None:
                    others = [c for c in self._classes if c != current]
                    found[i] = others[int(rng.integers(len(others)))]
        return found

    def describe(self) -> dict[str, Any]:
        return {"kind": "nearest", "tolerance": self._tolerance, "noise": self._noise}


class SimulatedOracle(NearestLabeler):
    """Knows every sample of a dataset version and its true label (see the module docstring)."""

    def __init__(
        self,
        datasets: DatasetService,
        dataset: str,
        *,
        noise: float = 0.0,
        seed: int = 0,
        tolerance: float = 1e-6,
        sensor: Mapping[str, float] | None = None,
    ) -> None:
        self._sensor = _sensor(sensor)
        if self._sensor is not None:
            tolerance = max(tolerance, SENSOR_TOLERANCE)
        arrays = datasets.load(dataset)
        x = np.concatenate([arrays.x_train, arrays.x_val, arrays.x_test])
        y = np.concatenate([arrays.y_train, arrays.y_val, arrays.y_test])
        names = [arrays.classes[int(i)] for i in y]
        super().__init__(
            x, names, tolerance=tolerance, noise=noise, classes=arrays.classes, seed=seed
        )
        self.dataset = arrays.version

    def label(self, samples: np.ndarray) -> list[str | None]:
        """As a labeller looking at the sample would: a sample read through the simulated
        sensor change (``x * gain + offset``) is recognised as the sample it shows."""
        if self._sensor is None:
            return super().label(samples)
        gain, offset = self._sensor
        raw = np.asarray(samples, dtype=np.float64)
        plain = super().label(raw)
        seen = super().label((raw - offset) / gain)
        return [a if a is not None else b for a, b in zip(plain, seen, strict=True)]

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "kind": "oracle",
            "dataset": self.dataset,
            "noise": self._noise,
            "seed": self._seed,
            "tolerance": self._tolerance,
        }
        if self._sensor is not None:
            described["sensor"] = {"gain": self._sensor[0], "offset": self._sensor[1]}
        return described


SENSOR_TOLERANCE = 1e-3
"""The oracle's matching tolerance once it undoes a sensor change (float32 round trips)."""


def _sensor(sensor: Mapping[str, float] | None) -> tuple[float, float] | None:
    if sensor is None:
        return None
    if not isinstance(sensor, Mapping) or set(sensor) - {"gain", "offset"}:
        raise CTConfigError("the oracle's sensor must be an object with gain and offset")
    try:
        gain, offset = float(sensor.get("gain", 1.0)), float(sensor.get("offset", 0.0))
    except (TypeError, ValueError):
        raise CTConfigError("the oracle's sensor gain and offset must be numbers") from None
    if not (np.isfinite(gain) and np.isfinite(offset)) or gain == 0.0:
        raise CTConfigError(f"the oracle's sensor gain must be finite and not 0, got {gain}")
    return gain, offset


class LabelledFileLabeler(NearestLabeler):
    """Labels from a labelled data file (see the module docstring)."""

    def __init__(
        self, path: Path, *, label_column: str | None = None, tolerance: float = 1e-4
    ) -> None:
        from edgeops.data import read_labelled_file

        data = read_labelled_file(Path(path), label_column=label_column)
        labels = [
            str(int(v)) if isinstance(v, np.integer | int) else str(v) for v in data.labels.tolist()
        ]
        super().__init__(data.x, labels, tolerance=tolerance)
        self.path = Path(path)
        self.label_column = label_column

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "path": str(self.path),
            "label_column": self.label_column,
            "tolerance": self._tolerance,
        }


def labeler_from_params(params: Mapping[str, Any], datasets: DatasetService) -> Labeler:
    """The labelling source a JSON description names (as :meth:`Labeler.describe` gives)."""
    kind = params.get("kind")
    if kind == "oracle":
        dataset = params.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise CTConfigError("the oracle labeller needs the dataset version it knows")
        return SimulatedOracle(
            datasets,
            dataset,
            noise=float(params.get("noise", 0.0)),
            seed=int(params.get("seed", 0)),
            tolerance=float(params.get("tolerance", 1e-6)),
            sensor=params.get("sensor"),
        )
    if kind == "file":
        path = params.get("path")
        if not isinstance(path, str) or not path:
            raise CTConfigError("the file labeller needs the path of a labelled data file")
        column = params.get("label_column")
        return LabelledFileLabeler(
            Path(path),
            label_column=None if column is None else str(column),
            tolerance=float(params.get("tolerance", 1e-4)),
        )
    raise CTConfigError(f"unknown labelling source {kind!r}; known: {', '.join(LABELER_KINDS)}")
