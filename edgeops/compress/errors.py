"""Errors the compression package raises on purpose.

CompressError (EdgeOpsError)
├── UnknownQuantizationError  a quantization mode that is not one of QUANTIZATION_MODES
├── QuantizationError         the TFLite converter refused the model
├── PruningError              bad pruning parameters, or training while pruning failed
├── NotCompressibleError      the model version cannot be compressed (not a Keras model ...)
├── ProfileError              a device-profile file is malformed (also a ConfigError)
├── UnknownProfileError       no device profile has this name
└── NothingFitsError          no searched candidate fits the device profile
"""

from __future__ import annotations

from edgeops.errors import ConfigError, EdgeOpsError

__all__ = [
    "CompressError",
    "NotCompressibleError",
    "NothingFitsError",
    "ProfileError",
    "PruningError",
    "QuantizationError",
    "UnknownProfileError",
    "UnknownQuantizationError",
]


class CompressError(EdgeOpsError):
    """Base class of the compression package's errors."""


class UnknownQuantizationError(CompressError):
    """A quantization mode that is not supported; the message lists the known ones."""


class QuantizationError(CompressError):
    """The TFLite converter could not quantize the model."""


class PruningError(CompressError):
    """Pruning parameters out of range, or pruning the model failed."""


class NotCompressibleError(CompressError):
    """The model version cannot be compressed (for example, it is already a .tflite)."""


class ProfileError(CompressError, ConfigError):
    """A device-profile TOML file is malformed; the message names the file and the field."""


class UnknownProfileError(CompressError):
    """No device profile has the requested name; the message lists the known ones."""


class NothingFitsError(CompressError):
    """No candidate of a search fits the device profile.

    ``candidates`` holds what was evaluated, so a caller can still show it.
    """

    def __init__(self, message: str, candidates: list[object] | None = None) -> None:
        super().__init__(message)
        self.candidates = candidates or []
