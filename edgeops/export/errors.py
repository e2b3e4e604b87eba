"""Errors of export.

ExportError                 (EdgeOpsError)
├── ConversionError         a converter (TFLite, tf2onnx) failed or its output disagrees
└── UnsupportedExportError  this model cannot be exported to the requested format
"""

from __future__ import annotations

from edgeops.errors import EdgeOpsError

__all__ = ["ConversionError", "ExportError", "UnsupportedExportError"]


class ExportError(EdgeOpsError):
    """A model could not be exported."""


class ConversionError(ExportError):
    """A converter failed, or its output does not match the Keras model's."""


class UnsupportedExportError(ExportError):
    """The model cannot be exported to the requested format."""
