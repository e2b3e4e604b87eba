"""Errors of evaluation on device runtimes.

EvaluationError               (EdgeOpsError)
├── UnsupportedFormatError    the artifact format has no runtime here
└── RuntimeLoadError          the runtime refused the artifact (corrupt or unsupported ops)
"""

from __future__ import annotations

from edgeops.errors import EdgeOpsError

__all__ = ["EvaluationError", "RuntimeLoadError", "UnsupportedFormatError"]


class EvaluationError(EdgeOpsError):
    """A model could not be evaluated on the given data."""


class UnsupportedFormatError(EvaluationError):
    """The artifact format is not one of keras, tflite, onnx."""


class RuntimeLoadError(EvaluationError):
    """The device runtime could not load or run the artifact."""
