"""Versioned datasets: built-in and imported data, splits, feature rules, reference stats.

    from edgeops.data import DatasetService

    datasets = DatasetService(database, store)
    view = datasets.register_builtin("digits")          # idempotent: same content, same id
    view = datasets.import_file(Path("x.csv"), name="sensors", label_column="label")
    view = datasets.resolve("sensors")                  # id, id prefix (>= 8 hex) or name
    arrays = datasets.load(view.version)                # x_train, y_train, ... + feature rule
    inputs = arrays.model_inputs("train")               # feature_rule.apply(x_train)

See docs/data.md for what a version is and how its id is computed.
"""

from device_agent.features import FeatureRule, WindowRule
from device_agent.sketch import ReferenceStats
from edgeops.data.builtin import BUILTINS, SourceData
from edgeops.data.errors import (
    AmbiguousReferenceError,
    ClassCountError,
    DataError,
    DataFileError,
    DatasetConflictError,
    DatasetInputError,
    DatasetNotFoundError,
    InvalidNameError,
    LabelColumnError,
    NonFiniteValueError,
    NonNumericFeatureError,
)
from edgeops.data.importer import read_labelled_file
from edgeops.data.models import DatasetArrays, DatasetVersion, DatasetView
from edgeops.data.service import DatasetService
from edgeops.data.splits import SPLITS, labels_to_indices

__all__ = [
    "BUILTINS",
    "SPLITS",
    "AmbiguousReferenceError",
    "ClassCountError",
    "DataError",
    "DataFileError",
    "DatasetArrays",
    "DatasetConflictError",
    "DatasetInputError",
    "DatasetNotFoundError",
    "DatasetService",
    "DatasetVersion",
    "DatasetView",
    "FeatureRule",
    "InvalidNameError",
    "LabelColumnError",
    "NonFiniteValueError",
    "NonNumericFeatureError",
    "ReferenceStats",
    "SourceData",
    "WindowRule",
    "labels_to_indices",
    "read_labelled_file",
]
