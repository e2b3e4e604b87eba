"""The tensor arena a .tflite model needs on TensorFlow Lite Micro.

The figure comes from TFLM itself: the ``tflite_micro`` Python interpreter plans the model
with its recording allocator, runs it once, and reports the arena it used (head: the
non-persistent tensors of the memory plan; tail: persistent buffers, tensor and node
structs). That total is what a firmware's ``tensor_arena`` must hold on a 64-bit host; a
32-bit MCU needs a little less for the pointer-sized structs.

TFLM aborts the process on a model it cannot prepare, so the interpreter runs in a child
process; a model it cannot run has no arena figure (None), with the reason logged.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

__all__ = ["TFLM_TIMEOUT_S", "tflm_arena_bytes"]

log = logging.getLogger(__name__)

TFLM_TIMEOUT_S = 120.0
_TOTAL = re.compile(rb"Arena allocation total (\d+) bytes")


def tflm_arena_bytes(tflite: bytes) -> int | None:
    """The arena bytes TFLM uses for ``tflite``; None if TFLM cannot run the model."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgeops.evaluate._tflm_probe"],
            input=bytes(tflite),
            capture_output=True,
            timeout=TFLM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("TFLM did not finish planning the model within %.0f s", TFLM_TIMEOUT_S)
        return None
    match = _TOTAL.search(result.stderr)
    if result.returncode != 0 or match is None:
        reason = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [
            f"exit status {result.returncode}"
        ]
        log.warning("TFLM cannot run the model: %s", reason[0])
        return None
    return int(match.group(1))
