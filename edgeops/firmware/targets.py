"""The targets the firmware generator writes for, and their flash and RAM limits.

A :class:`Target` names the project template it is rendered from, the compiler flags that
select its CPU, and the flash and RAM a generated model may use on it, with where those
figures come from. ``host`` has no limits. For the boards a user flashes (Zephyr, Arduino,
ESP-IDF) the limits are those of one stated representative board; a caller with another
board passes :class:`Limits` to :func:`edgeops.firmware.generate` (``--flash-bytes`` and
``--ram-bytes`` on the command line).

:func:`estimate_usage` is the check done at generation time, before anything is written:
flash is the constant data the generated ``edgeops_model.c`` declares (weights, biases,
multipliers, shifts, operator parameters) plus :data:`KERNEL_CODE_BYTES` of kernel code;
RAM is the arena plus the caller's input and output buffers. :func:`check_limits` raises
:class:`TargetLimitError` naming both sizes and both limits when either does not fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeops.firmware.errors import FirmwareError, TargetLimitError

__all__ = [
    "C_FLAGS",
    "KERNEL_CODE_BYTES",
    "TARGETS",
    "Limits",
    "Target",
    "Usage",
    "check_limits",
    "estimate_usage",
    "get_target",
]

C_FLAGS = (
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wconversion",
    "-Wdouble-promotion",
    "-O2",
)
"""The flags the generated C builds with, warning-free, on gcc and arm-none-eabi-gcc."""

KIB = 1024
MIB = 1024 * KIB

KERNEL_CODE_BYTES = 8 * KIB
"""Flash allowed for the kernels' code in the generation-time estimate: every kernel of
``edgeops_kernels.c`` compiled with arm-none-eabi-gcc 12.2 ``-O2 -mthumb -mcpu=cortex-m3``
is about 5.5 KiB of .text; the linker drops the kernels a model does not call, so this
is an upper bound with room for other compilers and later kernels."""

PARAMETER_STRUCT_BYTES = 96
"""Flash allowed per operator-parameter struct (the largest, ``eo_binary_params``, is 84)."""


@dataclass(frozen=True)
class Limits:
    """Flash and RAM a model may use, in bytes; None: no limit (or, as an override, keep
    the target's own)."""

    flash_bytes: int | None = None
    ram_bytes: int | None = None

    def __post_init__(self) -> None:
        for what, value in (("flash", self.flash_bytes), ("RAM", self.ram_bytes)):
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise FirmwareError(
                    f"the {what} limit must be a positive number of bytes, got {value!r}"
                )

    def override(self, other: Limits | None) -> Limits:
        """These limits with the figures ``other`` gives replacing them."""
        if other is None:
            return self
        return Limits(
            flash_bytes=other.flash_bytes if other.flash_bytes is not None else self.flash_bytes,
            ram_bytes=other.ram_bytes if other.ram_bytes is not None else self.ram_bytes,
        )


@dataclass(frozen=True)
class Target:
    """One target: what it is, its project template, its CPU flags and its limits."""

    name: str
    description: str
    template: str | None
    """Directory under ``firmware_templates/`` rendered next to the library; None: none."""
    cpu_flags: tuple[str, ...]
    """arm-none-eabi-gcc flags selecting the CPU (empty for host and non-Arm boards)."""
    limits: Limits
    limits_source: str
    qemu_machine: str | None = None
    """The ``qemu-system-arm -M`` machine that runs the bare-metal project, if any."""


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            name="host",
            description="the library alone, for any C99 compiler",
            template=None,
            cpu_flags=(),
            limits=Limits(),
            limits_source="no limits",
        ),
        Target(
            name="mps2-an385",
            description="bare-metal Cortex-M3 project for Arm MPS2 AN385 (runs under QEMU)",
            template="mps2",
            cpu_flags=("-mcpu=cortex-m3", "-mthumb"),
            limits=Limits(flash_bytes=4 * MIB, ram_bytes=4 * MIB - 32 * KIB),
            limits_source=(
                "Arm AN385 memory map as QEMU's hw/arm/mps2.c models it: 4 MiB ZBT SSRAM1 "
                "at 0x00000000 for code and constants, 4 MiB ZBT SSRAM2&3 at 0x20000000 for "
                "data, less the harness's 32 KiB stack"
            ),
            qemu_machine="mps2-an385",
        ),
        Target(
            name="mps2-an386",
            description="bare-metal Cortex-M4 project for Arm MPS2 AN386 (runs under QEMU)",
            template="mps2",
            cpu_flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"),
            limits=Limits(flash_bytes=4 * MIB, ram_bytes=4 * MIB - 32 * KIB),
            limits_source=(
                "Arm AN386 memory map as QEMU's hw/arm/mps2.c models it (as AN385, with a "
                "Cortex-M4), less the harness's 32 KiB stack"
            ),
            qemu_machine="mps2-an386",
        ),
        Target(
            name="zephyr",
            description="Zephyr application (representative board: nRF52840 DK, Cortex-M4F)",
            template="zephyr",
            cpu_flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"),
            limits=Limits(flash_bytes=1 * MIB - 64 * KIB, ram_bytes=256 * KIB - 32 * KIB),
            limits_source=(
                "Nordic nRF52840: 1 MiB flash and 256 KiB RAM, less 64 KiB of flash and "
                "32 KiB of RAM kept for the Zephyr kernel and the application"
            ),
        ),
        Target(
            name="arduino",
            description="Arduino library with an example sketch (representative board: "
            "Arduino Nano 33 BLE Sense, nRF52840)",
            template="arduino",
            cpu_flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"),
            limits=Limits(flash_bytes=1 * MIB - 192 * KIB, ram_bytes=256 * KIB - 64 * KIB),
            limits_source=(
                "Arduino Nano 33 BLE Sense (nRF52840, 1 MiB flash, 256 KiB RAM), less "
                "192 KiB of flash and 64 KiB of RAM kept for the bootloader and the "
                "Arduino Mbed OS core"
            ),
        ),
        Target(
            name="esp-idf",
            description="ESP-IDF component with an example project (representative board: "
            "ESP32-DevKitC, ESP32-WROOM-32)",
            template="esp-idf",
            cpu_flags=(),
            limits=Limits(flash_bytes=1 * MIB - 256 * KIB, ram_bytes=320 * KIB - 96 * KIB),
            limits_source=(
                "ESP32 with ESP-IDF's default single-app partition table: a 1 MiB factory "
                "app partition (less 256 KiB for IDF's own code) and about 320 KiB of "
                "DRAM (less 96 KiB for FreeRTOS, the heap and the stacks)"
            ),
        ),
    )
}
"""Every target by name; the first is the default."""


def get_target(name: str) -> Target:
    """The target called ``name``; :class:`FirmwareError` listing the targets otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise FirmwareError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}") from None


@dataclass(frozen=True)
class Usage:
    """What a generated model needs, estimated before anything is written."""

    constant_bytes: int
    """Constant arrays and parameter structs the model source declares."""
    code_bytes: int
    arena_bytes: int
    io_bytes: int
    """The caller's input and output buffers."""

    @property
    def flash_bytes(self) -> int:
        return self.constant_bytes + self.code_bytes

    @property
    def ram_bytes(self) -> int:
        return self.arena_bytes + self.io_bytes


_ARRAY = re.compile(r"static const (u?int(?:8|16|32))_t \w+\[(\d+)\]")
_STRUCT = re.compile(r"static const eo_\w+ \w+ = \{")


def estimate_usage(model_c: str, *, arena_bytes: int, input_size: int, output_size: int) -> Usage:
    """The flash and RAM the generated ``model_c`` needs (see the module's docstring)."""
    constants = 0
    for ctype, count in _ARRAY.findall(model_c):
        constants += int(count) * int(ctype.removeprefix("u").removeprefix("int")) // 8
    constants += PARAMETER_STRUCT_BYTES * len(_STRUCT.findall(model_c))
    return Usage(
        constant_bytes=constants,
        code_bytes=KERNEL_CODE_BYTES,
        arena_bytes=arena_bytes,
        io_bytes=input_size + output_size,
    )


def check_limits(usage: Usage, target: Target, limits: Limits) -> None:
    """:class:`TargetLimitError` if ``usage`` exceeds ``limits`` (the target's, overridden)."""
    flash_over = limits.flash_bytes is not None and usage.flash_bytes > limits.flash_bytes
    ram_over = limits.ram_bytes is not None and usage.ram_bytes > limits.ram_bytes
    if not (flash_over or ram_over):
        return
    what = " and ".join(part for part, over in (("flash", flash_over), ("RAM", ram_over)) if over)
    raise TargetLimitError(
        f"the model does not fit the {what} of target {target.name}: it needs "
        f"{usage.flash_bytes:,} bytes of flash ({usage.constant_bytes:,} constants + about "
        f"{usage.code_bytes:,} kernel code) and {usage.ram_bytes:,} bytes of RAM "
        f"({usage.arena_bytes:,} arena + {usage.io_bytes:,} input/output); the limits are "
        f"{_limit(limits.flash_bytes)} of flash and {_limit(limits.ram_bytes)} of RAM "
        f"({'overridden' if limits != target.limits else target.limits_source})"
    )


def _limit(value: int | None) -> str:
    return "no limit" if value is None else f"{value:,} bytes"
