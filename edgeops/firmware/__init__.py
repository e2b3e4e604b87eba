"""MCU code generation: a full-integer int8 .tflite becomes an interpreter-free C99 library.

    from edgeops.firmware import generate
    library = generate(tflite_bytes, Path("out"), target="host")

See ``docs/firmware.md``: the graph reader and shape folding (:mod:`.graph`), the kernels'
generation-time arithmetic (:mod:`.quant`, :mod:`.lower`), the static memory plan
(:mod:`.plan`), the targets and their flash/RAM limits (:mod:`.targets`), the emitter and
project templates (:mod:`.emit`), the Cortex-M build, footprint and QEMU run
(:mod:`.cortexm`) and the conformance harness against the tflite-micro interpreter
(:mod:`.conformance`).
"""

from __future__ import annotations

from edgeops.firmware.emit import TARGETS, GeneratedLibrary, generate, generate_sources
from edgeops.firmware.errors import (
    FirmwareError,
    FloatModelError,
    TargetLimitError,
    ToolchainMissingError,
    UnsupportedModelError,
)
from edgeops.firmware.lower import SUPPORTED_OPS
from edgeops.firmware.targets import Limits

__all__ = [
    "SUPPORTED_OPS",
    "TARGETS",
    "FirmwareError",
    "FloatModelError",
    "GeneratedLibrary",
    "Limits",
    "TargetLimitError",
    "ToolchainMissingError",
    "UnsupportedModelError",
    "generate",
    "generate_sources",
]
