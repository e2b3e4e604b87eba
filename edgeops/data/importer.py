"""Reading labelled data files: CSV (pandas), Parquet (pyarrow) and NPZ (numpy).

* CSV (``.csv``, ``.csv.gz``) and Parquet (``.parquet``, ``.pq``): a table with a header;
  the label column is named, every other column is a feature and must be numeric (booleans
  count as 0/1). One row is one sample of shape ``(number of feature columns,)``.
* NPZ (``.npz``): array ``x`` of shape ``(samples, ...)`` and a label array, ``y`` unless
  another name is given; no pickled objects.

Everything is checked before anything is stored: a missing or unreadable file, an unknown
format, a missing label column (the message lists the columns there are), missing labels,
NaN or infinite feature values (the message names the column or array, the count and the
first row or sample), non-numeric feature columns.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.data.builtin import SourceData
from edgeops.data.errors import (
    DataFileError,
    LabelColumnError,
    NonFiniteValueError,
    NonNumericFeatureError,
)

__all__ = ["FORMATS", "file_format", "read_labelled_file"]

FORMATS = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
NPZ_FEATURES = "x"
NPZ_LABELS = "y"


def file_format(path: Path) -> str:
    """``"csv"``, ``"parquet"`` or ``"npz"``, from the file name."""
    name = path.name.lower()
    for suffix, kind in sorted(FORMATS.items(), key=lambda item: -len(item[0])):
        if name.endswith(suffix):
            return kind
    shown = "".join(path.suffixes) or "(none)"
    raise DataFileError(
        f"file {str(path)!r} has an unknown format {shown}; use .csv, .parquet or .npz"
    )


def read_labelled_file(
    path: Path, *, label_column: str | None, feature_names: list[str] | None = None
) -> SourceData:
    """Features and labels of a data file, checked; DatasetInputError saying what is wrong.

    For tables, ``feature_names`` (a dataset's columns, e.g. to score a model on new data)
    picks those columns in that order; without it every column but the label is a feature.
    """
    kind = file_format(path)
    if not path.exists():
        raise DataFileError(f"file {str(path)!r} does not exist")
    if not path.is_file():
        raise DataFileError(f"{str(path)!r} is not a file")
    if kind == "npz":
        return _read_npz(path, label_column or NPZ_LABELS)
    return _read_table(path, kind, label_column, feature_names)


def _read_table(
    path: Path, kind: str, label_column: str | None, wanted: list[str] | None
) -> SourceData:
    frame = _read_frame(path, kind)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    listed = ", ".join(repr(c) for c in columns)
    if label_column is None:
        raise LabelColumnError(
            f"{path.name}: name the label column (--label-column); columns: {listed}"
        )
    if label_column not in columns:
        raise LabelColumnError(
            f"label column {label_column!r} is not in {path.name}; columns: {listed}"
        )
    if len(frame) == 0:
        raise DataFileError(f"{path.name} holds no rows")
    features = [c for c in columns if c != label_column]
    if wanted is not None:
        absent = [c for c in wanted if c not in features]
        if absent:
            raise DataFileError(
                f"{path.name} lacks feature column(s) {', '.join(repr(c) for c in absent)}; "
                f"columns: {listed}"
            )
        features = list(wanted)
    if not features:
        raise DataFileError(f"{path.name} has no feature columns besides {label_column!r}")
    if len(set(columns)) != len(columns):
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        raise DataFileError(f"{path.name} has duplicate columns: {', '.join(duplicates)}")
    labels = frame[label_column]
    missing = labels.isna().to_numpy()
    if missing.any():
        raise LabelColumnError(
            f"{path.name}: label column {label_column!r} has {int(missing.sum())} missing "
            f"value(s) (first in data row {int(np.flatnonzero(missing)[0]) + 1})"
        )
    _require_numeric(frame, features, path.name)
    x = _finite_matrix(
        [frame[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in features],
        features,
        path.name,
    )
    return SourceData(
        x=x,
        labels=_label_array(labels.to_numpy()),
        source=f"{kind} file {path.resolve()}",
        feature_names=features,
    )


def _read_frame(path: Path, kind: str) -> Any:
    import pandas as pd

    try:
        if kind == "csv":
            return pd.read_csv(path)
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            raise DataFileError(f"cannot read {path.name} as Parquet: {_first_line(exc)}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataFileError(f"{path.name} is empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataFileError(f"cannot read {path.name} as CSV: {_first_line(exc)}") from exc
    except OSError as exc:
        raise DataFileError(f"cannot read {path.name}: {exc.strerror or exc}") from exc


def _require_numeric(frame: Any, features: list[str], file_name: str) -> None:
    import pandas as pd

    bad = [
        c
        for c in features
        if not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))
        or pd.api.types.is_complex_dtype(frame[c])
    ]
    if bad:
        column = frame[bad[0]]
        examples = column[~column.isna()]
        example = f" (e.g. {examples.iloc[0]!r})" if len(examples) else ""
        names = ", ".join(repr(c) for c in bad)
        raise NonNumericFeatureError(
            f"{file_name}: feature column(s) {names} are not numeric; column {bad[0]!r} holds "
            f"{column.dtype} values{example}. Encode them as numbers or drop them"
        )


def _finite_matrix(columns: list[np.ndarray], names: list[str], file_name: str) -> np.ndarray:
    for name, values in zip(names, columns, strict=True):
        bad = ~np.isfinite(values)
        if bad.any():
            raise NonFiniteValueError(
                f"{file_name}: feature column {name!r} has {int(bad.sum())} NaN or infinite "
                f"value(s) (first in data row {int(np.flatnonzero(bad)[0]) + 1})"
            )
    matrix = np.stack(columns, axis=1)
    return _as_float32(matrix, file_name, names=names)


def _as_float32(x: np.ndarray, file_name: str, *, names: list[str] | None) -> np.ndarray:
    """``x`` as float32; an error naming where a finite value overflows float32."""
    cast = x.astype(np.float32)
    overflow = ~np.isfinite(cast)
    if overflow.any():
        sample, *position = (int(i) for i in np.argwhere(overflow)[0])
        where = (
            f"column {names[position[0]]!r}, data row {sample + 1}"
            if names is not None
            else f"sample {sample + 1}"
        )
        raise NonFiniteValueError(
            f"{file_name}: {int(overflow.sum())} value(s) exceed the float32 range "
            f"(first at {where})"
        )
    return cast


def _label_array(values: np.ndarray) -> np.ndarray:
    """pandas gives object arrays for text (and nullable types); keep them as plain numpy."""
    if values.dtype.kind == "O":
        items = values.tolist()
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return np.array(items, dtype=np.int64)
        if all(isinstance(v, float) for v in items):
            return np.array(items, dtype=np.float64)
        return np.array([str(v) for v in items], dtype=str)
    if values.dtype.kind not in "iufbUS":
        return np.array([str(v) for v in values.tolist()], dtype=str)
    return values


def _read_npz(path: Path, label_name: str) -> SourceData:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            listed = ", ".join(repr(n) for n in names) or "none"
            if NPZ_FEATURES not in names:
                raise DataFileError(
                    f"{path.name} has no array {NPZ_FEATURES!r} (the features); arrays: {listed}"
                )
            if label_name not in names:
                raise LabelColumnError(
                    f"{path.name} has no label array {label_name!r}; arrays: {listed}"
                )
            x, labels = npz[NPZ_FEATURES], npz[label_name]
    except ValueError as exc:
        raise DataFileError(
            f"cannot read {path.name} as NPZ without pickle: {_first_line(exc)}"
        ) from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataFileError(f"cannot read {path.name} as NPZ: {_first_line(exc)}") from exc
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataFileError(
            f"{path.name}: array 'x' must have shape (samples, ...) with at least one sample "
            f"and one feature, got {list(x.shape)}"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or x.dtype.kind == "c":
        raise NonNumericFeatureError(f"{path.name}: array 'x' holds {x.dtype}, not real numbers")
    if labels.ndim != 1 or len(labels) != len(x):
        raise LabelColumnError(
            f"{path.name}: label array {label_name!r} must hold one label per sample "
            f"({len(x)}), got shape {list(labels.shape)}"
        )
    flat = x.reshape(len(x), -1).astype(np.float64)
    bad = ~np.isfinite(flat)
    if bad.any():
        sample = int(np.argwhere(bad)[0][0])
        raise NonFiniteValueError(
            f"{path.name}: array 'x' has {int(bad.sum())} NaN or infinite value(s) "
            f"(first in sample {sample + 1})"
        )
    return SourceData(
        x=_as_float32(x, path.name, names=None),
        labels=labels,
        source=f"npz file {path.resolve()}",
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
