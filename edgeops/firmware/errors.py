"""Errors of the firmware generator."""

from __future__ import annotations

from edgeops.errors import EdgeOpsError

__all__ = [
    "FirmwareError",
    "FloatModelError",
    "TargetLimitError",
    "ToolchainMissingError",
    "UnsupportedModelError",
]


class FirmwareError(EdgeOpsError):
    """The model cannot be turned into C, or the generated library failed to build or run."""


class UnsupportedModelError(FirmwareError):
    """The model uses an operator, option, tensor type or layout the generator lacks."""


class FloatModelError(UnsupportedModelError):
    """The model is not a full-integer int8 model."""


class TargetLimitError(FirmwareError):
    """The model needs more flash or RAM than the target (or the caller's override) has."""


class ToolchainMissingError(FirmwareError):
    """A cross compiler, its C library or QEMU is not installed."""
