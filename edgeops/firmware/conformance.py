"""Conformance: the generated C, compiled for the host or for Cortex-M under QEMU, against
the tflite-micro interpreter.

:func:`build_host` compiles a generated library with a small ``main`` that reads input
tensors from stdin until end of file and writes each output tensor to stdout (int8, or
float32 through the library's QUANTIZE and DEQUANTIZE functions for a model with a float32
input or output), with the
strict flags of :data:`HOST_CFLAGS`; a warning fails the build. :func:`check_conformance`
feeds the same inputs to that program and to TFLM (:func:`edgeops.evaluate.tflm.tflm_run`,
one invoke per sample) and compares the outputs byte for byte. With ``target`` set to
``mps2-an385`` (Cortex-M3) or ``mps2-an386`` (Cortex-M4) the library is cross-built with
the bare-metal harness instead and run under QEMU (:mod:`edgeops.firmware.cortexm`), which
also gives the instructions per inference.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.firmware.emit import generate
from edgeops.firmware.errors import FirmwareError
from edgeops.firmware.targets import C_FLAGS

__all__ = [
    "HOST_CFLAGS",
    "ConformanceReport",
    "as_samples",
    "build_host",
    "check_conformance",
    "random_float_inputs",
    "random_inputs",
    "run_host",
]

HOST_CFLAGS = C_FLAGS
BUILD_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 120.0

MAIN_C = r"""/* Host harness: input tensors on stdin, output tensors on stdout (int8, or
 * float32 where the model's input or output is float32). */
#include <stdio.h>
#include "edgeops_model.h"

int main(void) {
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
    static float input[EDGEOPS_MODEL_INPUT_SIZE];
    static int8_t input_q[EDGEOPS_MODEL_INPUT_SIZE];
#else
    static int8_t input[EDGEOPS_MODEL_INPUT_SIZE];
    int8_t *const input_q = input;
#endif
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
    static float output[EDGEOPS_MODEL_OUTPUT_SIZE];
    static int8_t output_q[EDGEOPS_MODEL_OUTPUT_SIZE];
#else
    static int8_t output[EDGEOPS_MODEL_OUTPUT_SIZE];
    int8_t *const output_q = output;
#endif
    edgeops_model_init();
    while (fread(input, 1, sizeof input, stdin) == sizeof input) {
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
        edgeops_model_quantize_input(input, input_q);
#endif
        if (edgeops_model_invoke(input_q, output_q) != 0) {
            return 2;
        }
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
        edgeops_model_dequantize_output(output_q, output);
#endif
        if (fwrite(output, 1, sizeof output, stdout) != sizeof output) {
            return 3;
        }
    }
    return 0;
}
"""


def _compiler(cc: str) -> str:
    found = shutil.which(cc)
    if found is None:
        raise FirmwareError(f"C compiler {cc!r} not found on PATH")
    return found


def build_host(library_dir: Path, executable: Path, *, cc: str = "gcc") -> Path:
    """Compile the library in ``library_dir`` with the harness into ``executable`` (the
    harness's source goes to a scratch directory: ``library_dir`` is left as it is)."""
    library_dir = Path(library_dir)
    with tempfile.TemporaryDirectory(prefix="edgeops-host-main-") as scratch:
        main = Path(scratch) / "edgeops_host_main.c"
        main.write_text(MAIN_C, encoding="utf-8")
        command = [
            _compiler(cc),
            *HOST_CFLAGS,
            "-I",
            str(library_dir),
            str(library_dir / "edgeops_model.c"),
            str(library_dir / "edgeops_kernels.c"),
            str(main),
            "-o",
            str(executable),
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise FirmwareError(f"{cc} did not finish within {BUILD_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise FirmwareError(f"{cc} failed on the generated library: {' | '.join(lines[:6])}")
    return Path(executable)


def run_host(
    executable: Path, inputs: np.ndarray, output_size: int, *, float_output: bool = False
) -> np.ndarray:
    """The outputs of the compiled program for ``inputs`` (one sample per row: int8, or
    float32 for a library with a float input), as int8 or, with ``float_output``, float32."""
    batch = _batch(inputs)
    try:
        result = subprocess.run(
            [str(executable)],
            input=batch.tobytes(),
            capture_output=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"{executable} did not finish within {RUN_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        raise FirmwareError(f"{executable} failed with exit status {result.returncode}")
    out = np.frombuffer(result.stdout, dtype="<f4" if float_output else np.int8)
    if out.size != len(batch) * output_size:
        raise FirmwareError(
            f"{executable} wrote {out.size} values for {len(batch)} samples of {output_size}"
        )
    return out.reshape(len(batch), output_size)


def _batch(inputs: np.ndarray) -> np.ndarray:
    """``inputs`` as contiguous rows: float32 (little-endian) if they are floats, else int8."""
    array = np.asarray(inputs)
    dtype = "<f4" if np.issubdtype(array.dtype, np.floating) else np.int8
    return np.ascontiguousarray(array.astype(dtype, copy=False).reshape(len(array), -1))


def as_samples(inputs: np.ndarray, input_size: int, *, float_input: bool = False) -> np.ndarray:
    """``inputs`` as rows of ``input_size`` values (int8, or float32 with ``float_input``);
    FirmwareError unless they hold whole samples (at least one)."""
    kind = "float32" if float_input else "int8"
    batch = np.asarray(inputs, dtype=np.float32 if float_input else np.int8)
    if batch.size == 0 or batch.size % input_size != 0:
        raise FirmwareError(
            f"inputs hold {batch.size} values; expected whole samples of {input_size} {kind} values"
        )
    return batch.reshape(-1, input_size)


def random_inputs(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` int8 input tensors of ``size`` values, uniform over the whole int8 range."""
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, size=(count, size), dtype=np.int64).astype(np.int8)


def random_float_inputs(
    size: int, count: int, scale: float, zero_point: int, seed: int = 0
) -> np.ndarray:
    """``count`` float32 input tensors of ``size`` values for a model whose float input is
    quantized with ``scale`` and ``zero_point``: about a third exact ties (``x / scale`` is
    k + 0.5 in float32, so the rounding direction shows), a third one float32 step either
    side of a tie, the rest uniform; the quotients reach 40 steps past both ends of the int8
    range (clamping), and one value in 64 is a hundred times further out."""
    rng = np.random.default_rng(seed)
    s = np.float32(scale)
    k = rng.integers(-168 - zero_point, 168 - zero_point, size=(count, size)).astype(np.float64)
    kind = rng.integers(0, 3, size=(count, size))
    tie = ((k + 0.5) * float(s)).astype(np.float32)
    for _ in range(4):  # step towards a float32 x whose quotient is exactly k + 0.5
        quotient = (tie / s).astype(np.float64)
        off = quotient != k + 0.5
        if not off.any():
            break
        tie = np.where(off, np.nextafter(tie, np.where(quotient < k + 0.5, np.inf, -np.inf)), tie)
        tie = tie.astype(np.float32)
    side = np.where(rng.integers(0, 2, size=(count, size)) == 1, np.inf, -np.inf)
    near = np.nextafter(tie, side.astype(np.float32)).astype(np.float32)
    uniform = ((k + rng.random((count, size))) * float(s)).astype(np.float32)
    values = np.where(kind == 0, tie, np.where(kind == 1, near, uniform)).astype(np.float32)
    far = rng.random((count, size)) < 1 / 64
    return np.where(far, values * np.float32(100.0), values).astype(np.float32)


@dataclass(frozen=True)
class ConformanceReport:
    samples: int
    mismatched_samples: int
    mismatched_bytes: int
    max_abs_diff: int
    arena_bytes: int
    tflm_arena_bytes: int
    ops: tuple[str, ...]
    target: str = "host"
    instructions_per_inference: int | None = None
    """Under QEMU only (``-icount shift=0``); None on the host."""
    float_input: bool = False
    float_output: bool = False
    """The outputs are float32: the bytes of the floats are compared, and ``max_abs_diff``
    is the largest distance between the two floats' bit patterns (units in the last place
    for floats of one sign)."""

    @property
    def bit_exact(self) -> bool:
        return self.mismatched_bytes == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bit_exact": self.bit_exact}


def check_conformance(
    tflite: bytes,
    inputs: np.ndarray,
    *,
    workdir: Path | None = None,
    cc: str = "gcc",
    target: str = "host",
) -> ConformanceReport:
    """Generate, compile and run ``tflite`` on ``inputs`` and compare with TFLM: on the
    host with ``cc``, or, for ``target`` ``mps2-an385``/``mps2-an386``, under QEMU.

    ``inputs`` are int8 tensors, or float32 ones for a model with a float32 input (the
    library's ``edgeops_model_quantize_input`` runs first); a float32 output is compared
    as the bytes of the floats ``edgeops_model_dequantize_output`` writes."""
    from edgeops.evaluate.tflm import tflm_run

    instructions: int | None = None
    with tempfile.TemporaryDirectory(prefix="edgeops-conformance-", dir=workdir) as scratch:
        root = Path(scratch)
        library = generate(tflite, root / "lib", target=target)
        batch = as_samples(inputs, library.input_size, float_input=library.float_input)
        if target == "host":
            executable = build_host(root / "lib", root / "model", cc=cc)
            ours = run_host(
                executable, batch, library.output_size, float_output=library.float_output
            )
        else:
            from edgeops.firmware.cortexm import build_firmware, run_qemu

            elf = build_firmware(root / "lib", root / "build", target)
            run = run_qemu(
                elf, batch, library.output_size, target, float_output=library.float_output
            )
            ours, instructions = run.outputs, run.instructions_per_inference
    reference = tflm_run(tflite, batch)
    theirs = np.ascontiguousarray(
        np.asarray(reference.outputs, dtype=ours.dtype).reshape(len(batch), -1)
    )
    ours = np.ascontiguousarray(ours)
    if theirs.shape != ours.shape:
        raise FirmwareError(f"output shapes differ: ours {ours.shape}, TFLM {theirs.shape}")
    as_bytes = (ours.view(np.uint8) != theirs.view(np.uint8)).reshape(len(batch), -1)
    if library.float_output:
        bits = ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64)
        diff = np.abs(bits)
    else:
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).astype(np.int64)
    return ConformanceReport(
        samples=len(batch),
        mismatched_samples=int(np.count_nonzero(as_bytes.any(axis=1))),
        mismatched_bytes=int(np.count_nonzero(as_bytes)),
        max_abs_diff=int(diff.max()) if diff.size else 0,
        arena_bytes=library.arena_bytes,
        tflm_arena_bytes=reference.arena_bytes,
        ops=tuple(library.ops),
        target=target,
        instructions_per_inference=instructions,
        float_input=library.float_input,
        float_output=library.float_output,
    )
