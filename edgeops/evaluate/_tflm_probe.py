"""Child process of :mod:`edgeops.evaluate.tflm`: run one .tflite on TFLM.

Without arguments: reads the flatbuffer from stdin, builds the TFLite Micro Python
interpreter with a generous arena, invokes it once on a zero input and prints the recording
allocator's report to stderr (the parent parses it).

With ``--run``: reads an ``.npz`` from stdin holding ``model`` (the flatbuffer as uint8) and
``inputs`` (a batch of input tensors, already in the input tensor's dtype: int8 for a
full-integer model), invokes the interpreter once per sample, writes the stacked output
tensors (as the runtime holds them) as ``.npy`` to stdout, then prints the median wall time
of one invoke (``median invoke ms: X``) and the allocations to stderr.

It runs in its own process because the TFLM interpreter aborts the whole process on models
it cannot prepare. It imports nothing from EdgeOps and no TensorFlow.
"""

from __future__ import annotations

import io
import statistics
import sys
import time

import numpy as np

PROBE_ARENA_BYTES = 32 << 20  # upper bound while planning; the used part is what counts


def main(argv: list[str]) -> int:
    from tflite_micro import runtime

    if argv[:1] == ["--run"]:
        payload = np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False)
        flatbuffer = payload["model"].tobytes()
        inputs = payload["inputs"]
    else:
        flatbuffer, inputs = sys.stdin.buffer.read(), None
    interpreter = runtime.Interpreter.from_bytes(flatbuffer, arena_size=PROBE_ARENA_BYTES)
    details = interpreter.get_input_details(0)
    shape, dtype = tuple(int(d) for d in details["shape"]), details["dtype"]
    if inputs is None:
        interpreter.set_input(np.zeros(shape, dtype=dtype), 0)
        interpreter.invoke()
    else:
        outputs, times = [], []
        for sample in inputs:
            interpreter.set_input(np.asarray(sample, dtype=dtype).reshape(shape), 0)
            start = time.perf_counter()
            interpreter.invoke()
            times.append((time.perf_counter() - start) * 1000.0)
            outputs.append(np.array(interpreter.get_output(0)))
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(outputs, axis=0), allow_pickle=False)
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.buffer.flush()
        median = statistics.median(times) if times else 0.0
        sys.stderr.write(f"median invoke ms: {median!r}\n")
    sys.stderr.flush()
    interpreter.print_allocations()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
