"""Child process of :func:`edgeops.evaluate.tflm_arena_bytes`: run one .tflite on TFLM.

Reads the flatbuffer from stdin, builds the TFLite Micro Python interpreter with a generous
arena, invokes it once on a zero input and prints the recording allocator's report to stderr
(the parent parses it). It runs in its own process because the TFLM interpreter aborts the
whole process on models it cannot prepare. It imports nothing from EdgeOps and no TensorFlow.
"""

from __future__ import annotations

import sys

import numpy as np

PROBE_ARENA_BYTES = 32 << 20  # upper bound while planning; the used part is what counts


def main() -> int:
    from tflite_micro import runtime

    flatbuffer = sys.stdin.buffer.read()
    interpreter = runtime.Interpreter.from_bytes(flatbuffer, arena_size=PROBE_ARENA_BYTES)
    details = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(details["shape"], dtype=details["dtype"]), 0)
    interpreter.invoke()
    sys.stderr.flush()
    interpreter.print_allocations()
    return 0


if __name__ == "__main__":
    sys.exit(main())
