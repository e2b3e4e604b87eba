"""Errors of the training part.

TrainError                       (EdgeOpsError)
├── UnknownArchitectureError     the architecture name is not in the zoo
├── IncompatibleInputError       the architecture cannot take the dataset's input shape
└── ModelFormatError             stored bytes are not a Keras model this code can load
"""

from __future__ import annotations

from edgeops.errors import EdgeOpsError

__all__ = [
    "IncompatibleInputError",
    "ModelFormatError",
    "TrainError",
    "UnknownArchitectureError",
]


class TrainError(EdgeOpsError):
    """Training could not start or could not finish."""


class UnknownArchitectureError(TrainError):
    """The architecture name is not one of the zoo's."""


class IncompatibleInputError(TrainError):
    """The architecture cannot be built for the given input shape or class count."""


class ModelFormatError(TrainError):
    """The bytes given are not a Keras model that can be loaded."""
