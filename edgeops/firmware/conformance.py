"""Conformance: the generated C, compiled for the host or for Cortex-M under QEMU, against
the tflite-micro interpreter.

:func:`build_host` compiles a generated library with a small ``main`` that reads int8 input
tensors from stdin until end of file and writes each output tensor to stdout, with the
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
    "random_inputs",
    "run_host",
]

HOST_CFLAGS = C_FLAGS
BUILD_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 120.0

MAIN_C = r"""/* Host harness: int8 input tensors on stdin, int8 output tensors on stdout. */
#include <stdio.h>
#include "edgeops_model.h"

int main(void) {
    static int8_t input[EDGEOPS_MODEL_INPUT_SIZE];
    static int8_t output[EDGEOPS_MODEL_OUTPUT_SIZE];
    edgeops_model_init();
    while (fread(input, 1, sizeof input, stdin) == sizeof input) {
        if (edgeops_model_invoke(input, output) != 0) {
            return 2;
        }
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


def run_host(executable: Path, inputs: np.ndarray, output_size: int) -> np.ndarray:
    """The outputs of the compiled program for ``inputs`` (int8, one sample per row)."""
    batch = np.ascontiguousarray(np.asarray(inputs, dtype=np.int8).reshape(len(inputs), -1))
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
    out = np.frombuffer(result.stdout, dtype=np.int8)
    if out.size != len(batch) * output_size:
        raise FirmwareError(
            f"{executable} wrote {out.size} bytes for {len(batch)} samples of {output_size}"
        )
    return out.reshape(len(batch), output_size)


def as_samples(inputs: np.ndarray, input_size: int) -> np.ndarray:
    """``inputs`` as int8 rows of ``input_size`` values; FirmwareError unless they hold whole
    samples (at least one)."""
    batch = np.asarray(inputs, dtype=np.int8)
    if batch.size == 0 or batch.size % input_size != 0:
        raise FirmwareError(
            f"inputs hold {batch.size} values; expected whole samples of {input_size} int8 values"
        )
    return batch.reshape(-1, input_size)


def random_inputs(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` int8 input tensors of ``size`` values, uniform over the whole int8 range."""
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, size=(count, size), dtype=np.int64).astype(np.int8)


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
    host with ``cc``, or, for ``target`` ``mps2-an385``/``mps2-an386``, under QEMU."""
    from edgeops.evaluate.tflm import tflm_run

    instructions: int | None = None
    with tempfile.TemporaryDirectory(prefix="edgeops-conformance-", dir=workdir) as scratch:
        root = Path(scratch)
        library = generate(tflite, root / "lib", target=target)
        batch = as_samples(inputs, library.input_size)
        if target == "host":
            executable = build_host(root / "lib", root / "model", cc=cc)
            ours = run_host(executable, batch, library.output_size)
        else:
            from edgeops.firmware.cortexm import build_firmware, run_qemu

            elf = build_firmware(root / "lib", root / "build", target)
            run = run_qemu(elf, batch, library.output_size, target)
            ours, instructions = run.outputs, run.instructions_per_inference
    reference = tflm_run(tflite, batch)
    theirs = np.asarray(reference.outputs, dtype=np.int8).reshape(len(batch), -1)
    if theirs.shape != ours.shape:
        raise FirmwareError(f"output shapes differ: ours {ours.shape}, TFLM {theirs.shape}")
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return ConformanceReport(
        samples=len(batch),
        mismatched_samples=int(np.count_nonzero(diff.any(axis=1))),
        mismatched_bytes=int(np.count_nonzero(diff)),
        max_abs_diff=int(diff.max()) if diff.size else 0,
        arena_bytes=library.arena_bytes,
        tflm_arena_bytes=reference.arena_bytes,
        ops=tuple(library.ops),
        target=target,
        instructions_per_inference=instructions,
    )
