"""Sources that replay samples: files (CSV, NPZ) and the synthetic sensor."""

from __future__ import annotations

import csv
import math
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.sources._base import (
    BadSampleError,
    PacedSource,
    Sample,
    SourceError,
    check_sample,
    input_shape_of,
    is_number,
    parse_line,
    shape_text,
)

# -- file --------------------------------------------------------------------------------------


class FileSource(PacedSource):
    """Replays a CSV file (one sample per row) or an NPZ file (arrays ``x`` and ``y``).

    CSV: a first row that is not all numbers is a header. ``label_column`` (an index, or a
    header name) holds integer labels; every other column is a feature, flattened in C order.
    NPZ: ``x`` of shape ``(n, *input_shape)`` or ``(n, prod(input_shape))``; labels from
    ``y`` or the array named by ``label_column``. ``loop`` starts over at the end.
    """

    kind = "file"

    def __init__(
        self,
        path: Path | str,
        input_shape: Sequence[int],
        *,
        label_column: int | str | None = None,
        loop: bool = False,
        rate_hz: float | None = None,
    ) -> None:
        super().__init__(input_shape, rate_hz)
        self.path = Path(path)
        self.label_column = label_column
        self.loop = loop
        if not self.path.is_file():
            raise SourceError(f"input file {self.path} does not exist or is not a file")
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".npz"):
            raise SourceError(f"input file {self.path}: unknown format {suffix!r}; use .csv, .npz")
        if suffix == ".csv":
            self._label_index(self._first_csv_row())  # a missing label column fails at open
        self._rows: Iterator[Sample | None] = (
            self._npz_rows() if suffix == ".npz" else self._csv_rows()
        )

    def _next(self) -> Sample | None:
        for sample in self._rows:
            if sample is not None:
                return sample
        return None

    def _passes(self, one_pass: Callable[[], Iterator[Sample | None]]) -> Iterator[Sample | None]:
        while True:
            good = 0
            for sample in one_pass():
                good += sample is not None
                yield sample
            if not self.loop or good == 0:
                return

    def _csv_rows(self) -> Iterator[Sample | None]:
        return self._passes(self._csv_pass)

    def _csv_pass(self) -> Iterator[Sample | None]:
        try:
            with self.path.open(newline="", encoding="utf-8") as fh:
                label_index: int | None = None
                header_seen = False
                reader = csv.reader(fh)
                for row in reader:
                    if not row or all(not cell.strip() for cell in row):
                        continue
                    if not header_seen:
                        header_seen = True
                        label_index = self._label_index(row)
                        if not all(is_number(cell) for cell in row):
                            continue  # the header
                    yield self._csv_sample(row, label_index, reader.line_num)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise SourceError(f"input file {self.path} cannot be read: {exc}") from exc

    def _first_csv_row(self) -> list[str]:
        try:
            with self.path.open(newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    if row and any(cell.strip() for cell in row):
                        return row
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise SourceError(f"input file {self.path} cannot be read: {exc}") from exc
        return []

    def _label_index(self, first_row: list[str]) -> int | None:
        column = self.label_column
        if column is None:
            return None
        if isinstance(column, int):
            if not -len(first_row) <= column < len(first_row):
                raise SourceError(
                    f"input file {self.path}: label column {column} does not exist "
                    f"in rows of {len(first_row)} columns"
                )
            return column % len(first_row)
        names = [cell.strip() for cell in first_row]
        if column not in names:
            raise SourceError(
                f"input file {self.path}: label column {column!r} is not in the header "
                f"({', '.join(repr(n) for n in names)})"
            )
        return names.index(column)

    def _csv_sample(self, row: list[str], label_index: int | None, line: int) -> Sample | None:
        where = f"{self.path.name} line {line}"
        try:
            label = None
            cells = row
            if label_index is not None:
                if label_index >= len(row):
                    raise BadSampleError("shape", f"no label column {label_index}")
                label = _parse_label(row[label_index])
                cells = row[:label_index] + row[label_index + 1 :]
            return Sample(parse_line(",".join(cells), self.input_shape), label)
        except BadSampleError as exc:
            self._reject(exc, where)
            return None

    def _npz_rows(self) -> Iterator[Sample | None]:
        arrays = _read_npz(self.path)
        if "x" not in arrays:
            raise SourceError(f"input file {self.path} has no array 'x'; arrays: {sorted(arrays)}")
        x = arrays["x"]
        size = math.prod(self.input_shape)
        if x.ndim < 1 or x.shape[1:] not in (self.input_shape, (size,)):
            raise SourceError(
                f"input file {self.path}: array 'x' must hold samples of shape "
                f"{shape_text(self.input_shape)}, got an array of shape {list(x.shape)}"
            )
        label_name = self.label_column if isinstance(self.label_column, str) else "y"
        y = arrays.get(label_name)
        if self.label_column is not None and y is None:
            raise SourceError(f"input file {self.path} has no label array {label_name!r}")
        if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
            raise SourceError(
                f"input file {self.path}: labels {label_name!r} must be {len(x)} integers, "
                f"got shape {list(y.shape)} of {y.dtype}"
            )

        def one_pass() -> Iterator[Sample | None]:
            for i in range(len(x)):
                try:
                    raw = check_sample(x[i], self.input_shape)
                except BadSampleError as exc:
                    self._reject(exc, f"{self.path.name} sample {i + 1}")
                    yield None
                    continue
                yield Sample(raw, None if y is None else int(y[i]))

        return self._passes(one_pass)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an NPZ file (no pickles), or SourceError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise SourceError(f"input file {path} is a single array, not an NPZ archive")
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SourceError(f"input file {path} is not a readable NPZ: {exc}") from exc


def _parse_label(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise BadSampleError("parse", f"label {text.strip()!r} is not a number") from None
    if not value.is_integer():
        raise BadSampleError("parse", f"label {text.strip()!r} is not an integer")
    return int(value)


# -- synthetic ---------------------------------------------------------------------------------


class SyntheticSource(PacedSource):
    """A sensor simulator: base samples resampled by class mix, drifted as ``x*gain+offset+N``.

    ``class_mix`` maps labels to weights (normalised; unlisted labels are not drawn); without
    it base samples are drawn uniformly. ``count`` samples in all (None: endless). The drift
    can be changed while running with :meth:`set_drift`.
    """

    kind = "synthetic"

    def __init__(
        self,
        base_x: np.ndarray,
        base_y: np.ndarray,
        *,
        gain: float = 1.0,
        offset: float = 0.0,
        noise: float = 0.0,
        class_mix: Mapping[int, float] | None = None,
        seed: int = 0,
        count: int | None = None,
        rate_hz: float | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        x = np.asarray(base_x)
        y = np.asarray(base_y)
        if x.ndim < 2 or len(x) == 0:
            raise SourceError(f"synthetic source: base_x must hold samples, got {list(x.shape)}")
        shape = input_shape_of(input_shape if input_shape is not None else x.shape[1:])
        super().__init__(shape, rate_hz)
        if x.shape[1:] != shape:
            if math.prod(x.shape[1:]) != math.prod(shape):
                raise SourceError(
                    f"synthetic source: base samples have shape {list(x.shape[1:])}, "
                    f"expected {shape_text(shape)}"
                )
            x = x.reshape((len(x), *shape))
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise SourceError(
                f"synthetic source: base_y must be {len(x)} integer labels, "
                f"got shape {list(y.shape)} of {y.dtype}"
            )
        if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
            raise SourceError("synthetic source: base_x must hold finite numbers")
        if count is not None and count < 0:
            raise SourceError(f"synthetic source: count must be >= 0, got {count}")
        self._x = x.astype(np.float32)
        self._y = y
        self._by_class = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._remaining = count
        self.gain, self.offset, self.noise = 1.0, 0.0, 0.0
        self._classes: np.ndarray | None = None
        self._weights: np.ndarray | None = None
        self.set_drift(gain=gain, offset=offset, noise=noise, class_mix=class_mix)

    @classmethod
    def from_npz(cls, path: Path | str, **kwargs: Any) -> SyntheticSource:
        """Base samples from an NPZ file with arrays ``x`` and ``y``."""
        arrays = _read_npz(Path(path))
        if "x" not in arrays or "y" not in arrays:
            raise SourceError(
                f"synthetic source: {path} needs arrays 'x' and 'y', has {sorted(arrays)}"
            )
        return cls(arrays["x"], arrays["y"], **kwargs)

    def set_drift(
        self,
        *,
        gain: float | None = None,
        offset: float | None = None,
        noise: float | None = None,
        class_mix: Mapping[int, float] | None = None,
    ) -> None:
        """Change the drift from now on; arguments left None keep their value."""
        for name, value in (("gain", gain), ("offset", offset), ("noise", noise)):
            if value is not None and not math.isfinite(value):
                raise SourceError(f"synthetic source: {name} must be finite, got {value}")
        if noise is not None and noise < 0:
            raise SourceError(f"synthetic source: noise must be >= 0, got {noise}")
        classes = weights = None
        if class_mix is not None:
            unknown = sorted(set(class_mix) - set(self._by_class))
            if unknown:
                raise SourceError(
                    f"synthetic source: class_mix names labels {unknown} that the base "
                    f"samples lack; labels: {sorted(self._by_class)}"
                )
            pairs = [(int(c), float(w)) for c, w in class_mix.items()]
            if any(not math.isfinite(w) or w < 0 for _, w in pairs) or not any(
                w > 0 for _, w in pairs
            ):
                raise SourceError(
                    f"synthetic source: class_mix weights must be >= 0, one > 0: {class_mix}"
                )
            classes = np.array([c for c, _ in pairs])
            weights = np.array([w for _, w in pairs]) / sum(w for _, w in pairs)
        with self._lock:
            self.gain = self.gain if gain is None else float(gain)
            self.offset = self.offset if offset is None else float(offset)
            self.noise = self.noise if noise is None else float(noise)
            if class_mix is not None:
                self._classes, self._weights = classes, weights

    def _next(self) -> Sample | None:
        with self._lock:
            if self._remaining is not None:
                if self._remaining <= 0:
                    return None
                self._remaining -= 1
            if self._classes is not None and self._weights is not None:
                label = int(self._rng.choice(self._classes, p=self._weights))
                index = int(self._rng.choice(self._by_class[label]))
            else:
                index = int(self._rng.integers(len(self._x)))
            raw = self._x[index] * np.float32(self.gain) + np.float32(self.offset)
            if self.noise > 0:
                raw = raw + self._rng.normal(0.0, self.noise, raw.shape).astype(np.float32)
        return Sample(raw.astype(np.float32, copy=False), int(self._y[index]))
