"""Errors of the dataset registry. Every message names the dataset, file, column or array.

EdgeOpsError
└── DataError                    anything wrong with a dataset or its input
    ├── DatasetNotFoundError     no dataset or version answers to a reference (a NotFoundError)
    ├── AmbiguousReferenceError  a version id prefix matches more than one version
    ├── DatasetConflictError     the same content is already registered under another name
    ├── InvalidNameError         a dataset name that cannot be used
    └── DatasetInputError        the input data cannot become a dataset
        ├── DataFileError        the file is missing, unreadable, or of an unknown format
        ├── LabelColumnError     the label column (or NPZ array) is missing or unusable
        ├── NonFiniteValueError  NaN or infinite values in features or labels
        ├── NonNumericFeatureError  a feature column that is not numeric
        └── ClassCountError      fewer than 2 classes, or a class too small to split
"""

from __future__ import annotations

from edgeops.errors import EdgeOpsError, NotFoundError

__all__ = [
    "AmbiguousReferenceError",
    "ClassCountError",
    "DataError",
    "DataFileError",
    "DatasetConflictError",
    "DatasetInputError",
    "DatasetNotFoundError",
    "InvalidNameError",
    "LabelColumnError",
    "NonFiniteValueError",
    "NonNumericFeatureError",
]


class DataError(EdgeOpsError):
    """Base of every error of :mod:`edgeops.data`."""


class DatasetNotFoundError(DataError, NotFoundError):
    """No dataset name or version id matches the reference."""


class AmbiguousReferenceError(DataError):
    """A version id prefix matches several versions."""


class DatasetConflictError(DataError):
    """The same content (same version id) is already registered under another name."""


class InvalidNameError(DataError):
    """A dataset name is malformed, reserved, or could be mistaken for a version id."""


class DatasetInputError(DataError):
    """The input cannot become a dataset; nothing was stored."""


class DataFileError(DatasetInputError):
    """The file is missing, unreadable, or not CSV, Parquet or NPZ."""


class LabelColumnError(DatasetInputError):
    """The label column or array is missing, or its values are not class labels."""


class NonFiniteValueError(DatasetInputError):
    """NaN or infinite values."""


class NonNumericFeatureError(DatasetInputError):
    """A feature column holds text or other non-numeric values."""


class ClassCountError(DatasetInputError):
    """Fewer than two classes, or a class with too few samples for the splits."""
