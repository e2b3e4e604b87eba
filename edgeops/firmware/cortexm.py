"""The generated library on Cortex-M: cross-built, sized, and run under QEMU.

:func:`build_firmware` links a generated library with a bare-metal harness of
``firmware_templates/mps2`` (start-up code, linker script and a ``main``) using
arm-none-eabi-gcc, newlib-nano's ``memcpy``/``memset`` and the strict flags of
:data:`edgeops.firmware.targets.C_FLAGS` plus the target's ``-mcpu``/``-mthumb`` and
``-ffunction-sections -fdata-sections -Wl,--gc-sections``: a warning fails the build. Two
harnesses:

- ``semihosting`` (``main.c``, the default): reads input tensors from a host file through
  semihosting and writes the outputs back; :func:`run_qemu` and :func:`measure_footprint`
  use it to measure;
- ``serial`` (``main_serial.c``, ``uart.h``): answers the frames of
  :mod:`device_agent.runtime._serial` on the board's UART 0, as a board of the rig or a
  gateway's attached microcontroller does (``hil.boards.qemu`` runs it with the UART on a
  pseudo-terminal). It is built with ``-DEDGEOPS_BUILD_ID`` (:func:`build_id`, a digest of
  the library and harness sources and the target) and ``-DEDGEOPS_TARGET``, which its info
  frame reports.

:func:`measure_footprint` sizes the library's own share: the harness is linked twice with
the same flags, once with the model and once with an empty model (the same header, an
``edgeops_model_invoke`` that does nothing, no kernels), and the difference of the
``arm-none-eabi-size -A`` sections is the library's. The linker script keeps ``.rodata``
in an output section of its own, so weights and parameters are told apart from code.

:func:`run_qemu` runs an ELF on QEMU's ``mps2-an385`` (Cortex-M3) or ``mps2-an386``
(Cortex-M4) with ``-icount shift=0``: every guest instruction advances the virtual clock
by exactly 1 ns. The harness reads the 25 MHz CMSDK APB timer 0 (which runs on that clock)
before and after each invoke, so one timer tick is :data:`INSTRUCTIONS_PER_TICK` = 40
instructions; the mean over the samples is the latency proxy, to within one tick.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.firmware.errors import FirmwareError, ToolchainMissingError
from edgeops.firmware.targets import C_FLAGS, Target, get_target

__all__ = [
    "HARNESSES",
    "HARNESS_FILES",
    "INSTRUCTIONS_PER_TICK",
    "SERIAL_HARNESS_FILES",
    "Footprint",
    "QemuRun",
    "build_firmware",
    "build_id",
    "measure",
    "measure_footprint",
    "missing_tools",
    "run_qemu",
    "toolchain_available",
]

CC = "arm-none-eabi-gcc"
SIZE = "arm-none-eabi-size"
QEMU = "qemu-system-arm"
APT_PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"

HARNESS_FILES = ("startup.c", "main.c", "semihosting.h", "mps2.ld")
"""The semihosting harness, copied from ``firmware_templates/mps2`` into the build directory."""
SERIAL_HARNESS_FILES = ("startup.c", "main_serial.c", "uart.h", "semihosting.h", "mps2.ld")
"""The serial harness (``startup.c`` still ends the program through semihosting on a fault,
which under QEMU with semihosting enabled exits it instead of locking up)."""
HARNESSES = {"semihosting": HARNESS_FILES, "serial": SERIAL_HARNESS_FILES}
"""Harness name to its files; every ``.c`` among them is compiled and linked."""
BUILD_ID_CHARS = 16
SECTION_FLAGS = ("-ffunction-sections", "-fdata-sections")
LINK_FLAGS = ("-nostartfiles", "--specs=nano.specs", "-Wl,--gc-sections")
ELF_NAME = "edgeops_firmware.elf"

INSTRUCTIONS_PER_TICK = 40
"""25 MHz timer ticks against 1 ns of virtual time per instruction (``-icount shift=0``)."""

BUILD_TIMEOUT_S = 120.0
QEMU_TIMEOUT_S = 300.0
MEASURE_SAMPLES = 16
"""Seeded random inputs :func:`measure` runs when it is given none."""

_ARENA = re.compile(r"#define EDGEOPS_MODEL_ARENA_SIZE (\d+)")

EMPTY_MODEL_C = """/* An empty model: the harness's own share, subtracted from the model's build. */
#include "edgeops_model.h"

void edgeops_model_init(void) {
}

int edgeops_model_invoke(const int8_t *input, int8_t *output) {
    (void)input;
    (void)output;
    return 0;
}

#ifdef EDGEOPS_MODEL_FLOAT_INPUT
void edgeops_model_quantize_input(const float *input, int8_t *output) {
    (void)input;
    (void)output;
}
#endif

#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
void edgeops_model_dequantize_output(const int8_t *input, float *output) {
    (void)input;
    (void)output;
}
#endif
"""


@dataclass(frozen=True)
class Footprint:
    """The generated library's own share of a Cortex-M image (model and kernels, not the
    harness), in bytes, from ``arm-none-eabi-size -A``."""

    target: str
    text: int
    """Code (with ``.ARM.exidx``)."""
    rodata: int
    """Constant data: weights, biases, multipliers, shifts, operator parameters."""
    data: int
    bss: int
    """Zero-initialised data, the arena included."""
    arena_bytes: int

    @property
    def flash_bytes(self) -> int:
        return self.text + self.rodata + self.data

    @property
    def ram_bytes(self) -> int:
        return self.data + self.bss

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flash_bytes": self.flash_bytes, "ram_bytes": self.ram_bytes}


@dataclass(frozen=True)
class QemuRun:
    """Outputs of a run under QEMU and its latency proxy."""

    outputs: np.ndarray
    """int8 (float32 for a library with a float output), (samples, output_size)."""
    instructions_per_inference: int
    """Mean guest instructions per invoke (``-icount shift=0``), to within one timer tick."""


def _newlib_present() -> bool:
    try:
        result = subprocess.run(
            [CC, "-print-file-name=libc_nano.a"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = Path(result.stdout.strip())
    return result.returncode == 0 and found.is_absolute() and found.is_file()


@functools.cache
def missing_tools() -> tuple[str, ...]:
    """The tools of the Cortex-M build and run that are not installed (empty: none)."""
    missing = [tool for tool in (CC, SIZE, QEMU) if shutil.which(tool) is None]
    if CC not in missing and not _newlib_present():
        missing.append("newlib (libc_nano.a)")
    return tuple(missing)


def toolchain_available() -> bool:
    """Whether arm-none-eabi-gcc, arm-none-eabi-size, newlib-nano and qemu-system-arm are
    all installed."""
    return not missing_tools()


def _require_toolchain(*, qemu: bool = False) -> None:
    missing = [tool for tool in missing_tools() if qemu or tool != QEMU]
    if missing:
        raise ToolchainMissingError(
            f"{', '.join(missing)} not found: install {APT_PACKAGES} "
            f"(apt-get install {APT_PACKAGES})"
        )


def _cortex_m(target: str) -> Target:
    chosen = get_target(target)
    if not any(flag.startswith("-mcpu=cortex-m") for flag in chosen.cpu_flags):
        raise FirmwareError(f"target {target} is not a Cortex-M target")
    return chosen


def _harness_sources(harness: str = "semihosting") -> dict[str, str]:
    from firmware_templates import template_root

    directory = template_root() / "mps2"
    try:
        return {name: (directory / name).read_text(encoding="utf-8") for name in HARNESSES[harness]}
    except OSError as exc:
        raise FirmwareError(f"the mps2 harness templates are not installed: {exc}") from None


def _check_harness(harness: str) -> None:
    if harness not in HARNESSES:
        raise FirmwareError(f"unknown harness {harness!r}; harnesses: {', '.join(HARNESSES)}")


def build_id(library_dir: Path, target: str, harness: str = "serial") -> str:
    """The firmware's build id: the first 16 hex digits of the SHA-256 of the target's name,
    the harness's sources and the library's header and sources. The same library built for
    the same target gets the same id; any change of the model, the kernels or the harness
    gives another."""
    _check_harness(harness)
    library_dir = Path(library_dir)
    digest = hashlib.sha256(f"edgeops-firmware\0{target}\0{harness}\0".encode())
    parts = sorted(_harness_sources(harness).items())
    for path in [library_dir / "edgeops_model.h", *_library_sources(library_dir)]:
        parts.append((path.name, path.read_text(encoding="utf-8")))
    for name, text in parts:
        data = text.encode("utf-8")
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:BUILD_ID_CHARS]


def _run(command: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"{what} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise FirmwareError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise FirmwareError(f"{what} failed: {' | '.join(lines[:6])}")
    return result


def _link(
    model_dir: Path,
    model_sources: list[Path],
    build_dir: Path,
    target: Target,
    harness_name: str = "semihosting",
    defines: tuple[str, ...] = (),
) -> Path:
    harness = build_dir / "harness"
    harness.mkdir(parents=True, exist_ok=True)
    files = _harness_sources(harness_name)
    for name, text in files.items():
        (harness / name).write_text(text, encoding="utf-8")
    harness_sources = [harness / name for name in files if name.endswith(".c")]
    elf = build_dir / ELF_NAME
    partial = build_dir / f".{ELF_NAME}.partial"
    command = [
        CC,
        *C_FLAGS,
        *target.cpu_flags,
        *SECTION_FLAGS,
        *defines,
        "-I",
        str(model_dir),
        "-I",
        str(harness),
        *(str(source) for source in model_sources),
        *(str(source) for source in harness_sources),
        "-T",
        str(harness / "mps2.ld"),
        *LINK_FLAGS,
        "-o",
        str(partial),
    ]
    try:
        _run(command, f"{CC} ({target.name})", BUILD_TIMEOUT_S)
        partial.replace(elf)
    finally:
        partial.unlink(missing_ok=True)
    return elf


def _library_sources(library_dir: Path) -> list[Path]:
    sources = [library_dir / "edgeops_model.c", library_dir / "edgeops_kernels.c"]
    for path in [library_dir / "edgeops_model.h", *sources]:
        if not path.is_file():
            raise FirmwareError(f"{library_dir} holds no generated library: {path.name} missing")
    return sources


def build_firmware(
    library_dir: Path, build_dir: Path, target: str, harness: str = "semihosting"
) -> Path:
    """Link the library in ``library_dir`` with the bare-metal ``harness`` (``semihosting``
    or ``serial``, see the module docstring) for ``target``; the ELF's path
    (``build_dir/edgeops_firmware.elf``, written atomically)."""
    _check_harness(harness)
    chosen = _cortex_m(target)
    _require_toolchain()
    library_dir, build_dir = Path(library_dir), Path(build_dir)
    sources = _library_sources(library_dir)
    defines: tuple[str, ...] = ()
    if harness == "serial":
        identity = build_id(library_dir, chosen.name, harness)
        defines = (f'-DEDGEOPS_BUILD_ID="{identity}"', f'-DEDGEOPS_TARGET="{chosen.name}"')
    return _link(library_dir, sources, build_dir, chosen, harness, defines)


def _sections(elf: Path) -> dict[str, int]:
    result = _run([SIZE, "-A", str(elf)], SIZE, BUILD_TIMEOUT_S)
    sections: dict[str, int] = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    return sections


def _header_number(library_dir: Path, pattern: re.Pattern[str]) -> int:
    header = (library_dir / "edgeops_model.h").read_text(encoding="utf-8")
    found = pattern.search(header)
    if found is None:
        raise FirmwareError(f"{library_dir / 'edgeops_model.h'} lacks {pattern.pattern}")
    return int(found.group(1))


def measure_footprint(
    library_dir: Path, target: str, *, build_dir: Path | None = None
) -> Footprint:
    """The library's flash and RAM on ``target``: the harness linked with the model minus
    the harness linked with an empty model (see the module's docstring)."""
    chosen = _cortex_m(target)
    _require_toolchain()
    library_dir = Path(library_dir)
    sources = _library_sources(library_dir)
    with tempfile.TemporaryDirectory(prefix="edgeops-footprint-") as scratch:
        root = Path(build_dir) if build_dir is not None else Path(scratch)
        full = _sections(_link(library_dir, sources, root / "model", chosen))
        empty_dir = root / "empty-model"
        empty_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library_dir / "edgeops_model.h", empty_dir / "edgeops_model.h")
        (empty_dir / "edgeops_model.c").write_text(EMPTY_MODEL_C, encoding="utf-8")
        bare = _sections(_link(empty_dir, [empty_dir / "edgeops_model.c"], root / "empty", chosen))

    def share(*names: str) -> int:
        return max(0, sum(full.get(n, 0) - bare.get(n, 0) for n in names))

    return Footprint(
        target=chosen.name,
        text=share(".text", ".ARM.exidx"),
        rodata=share(".rodata"),
        data=share(".data"),
        bss=share(".bss"),
        arena_bytes=_header_number(library_dir, _ARENA),
    )


def run_qemu(
    elf: Path, inputs: np.ndarray, output_size: int, target: str, *, float_output: bool = False
) -> QemuRun:
    """Run ``elf`` (from :func:`build_firmware`) under QEMU on ``inputs`` (one sample per
    row: int8, or float32 for a library with a float input): its outputs (int8, or float32
    with ``float_output``) and the mean instructions per inference."""
    chosen = _cortex_m(target)
    if chosen.qemu_machine is None:
        raise FirmwareError(f"target {target} has no QEMU machine; use mps2-an385 or mps2-an386")
    _require_toolchain(qemu=True)
    array = np.asarray(inputs)
    dtype = "<f4" if np.issubdtype(array.dtype, np.floating) else np.int8
    batch = np.ascontiguousarray(array.astype(dtype, copy=False).reshape(len(array), -1))
    if len(batch) == 0:
        raise FirmwareError("run_qemu needs at least one input sample")
    elf = Path(elf).resolve()
    if not elf.is_file():
        raise FirmwareError(f"{elf} does not exist")
    command = [
        QEMU,
        "-M",
        chosen.qemu_machine,
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        "none",
        "-semihosting-config",
        "enable=on,target=native",
        "-icount",
        "shift=0",
        "-kernel",
        str(elf),
    ]
    with tempfile.TemporaryDirectory(prefix="edgeops-qemu-") as scratch:
        work = Path(scratch)
        (work / "edgeops_inputs.bin").write_bytes(batch.tobytes())
        try:
            result = subprocess.run(
                command,
                cwd=work,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=QEMU_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise FirmwareError(
                f"{QEMU} -M {chosen.qemu_machine} did not exit within {QEMU_TIMEOUT_S:.0f} s"
            ) from None
        if result.returncode != 0:
            said = " | ".join((result.stdout + result.stderr).strip().splitlines()[-4:])
            raise FirmwareError(
                f"{elf.name} under {QEMU} -M {chosen.qemu_machine} exited with status "
                f"{result.returncode}: {said or 'no output'}"
            )
        raw = (work / "edgeops_outputs.bin").read_bytes()
        ticks = np.frombuffer((work / "edgeops_ticks.bin").read_bytes(), dtype="<u4")
    outputs = np.frombuffer(
        raw[: len(raw) - len(raw) % 4] if float_output else raw,
        dtype="<f4" if float_output else np.int8,
    )
    if outputs.size != len(batch) * output_size or len(ticks) != len(batch):
        raise FirmwareError(
            f"{elf.name} wrote {outputs.size} output values and {len(ticks)} timings for "
            f"{len(batch)} samples of {output_size} (is the input size right?)"
        )
    mean_ticks = float(np.mean(ticks.astype(np.float64)))
    return QemuRun(
        outputs=outputs.reshape(len(batch), output_size).copy(),
        instructions_per_inference=round(mean_ticks * INSTRUCTIONS_PER_TICK),
    )


def measure(
    tflite: bytes, target: str = "mps2-an385", *, inputs: np.ndarray | None = None
) -> tuple[Footprint, QemuRun | None]:
    """Generate ``tflite`` for ``target`` into a temporary directory, build it, size it and,
    when the target runs under QEMU, run it on ``inputs`` (default: 16 seeded random
    inputs). The run is None for a Cortex-M target without a QEMU machine."""
    from edgeops.firmware.conformance import as_samples, random_float_inputs, random_inputs
    from edgeops.firmware.emit import generate

    chosen = _cortex_m(target)
    _require_toolchain(qemu=chosen.qemu_machine is not None)
    with tempfile.TemporaryDirectory(prefix="edgeops-measure-") as scratch:
        root = Path(scratch)
        library = generate(tflite, root / "lib", target=target)
        footprint = measure_footprint(root / "lib", target, build_dir=root / "size")
        if chosen.qemu_machine is None:
            return footprint, None
        if inputs is None and library.float_input:
            scale, zero_point = library.input_quantization
            inputs = random_float_inputs(library.input_size, MEASURE_SAMPLES, scale, zero_point)
        elif inputs is None:
            inputs = random_inputs(library.input_size, MEASURE_SAMPLES)
        batch = as_samples(inputs, library.input_size, float_input=library.float_input)
        elf = build_firmware(root / "lib", root / "build", target)
        return footprint, run_qemu(
            elf, batch, library.output_size, target, float_output=library.float_output
        )
