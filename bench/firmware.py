"""Footprint of the generated firmware against TensorFlow Lite Micro, measured in one run.

Every architecture of the model zoo (``edgeops.train.zoo.ARCHITECTURES``) is trained briefly
and compressed to full int8 through the services the CLI uses (``TrainService``,
``CompressService``, post-training int8 kept whatever its accuracy: the figures here are
about memory, not accuracy), in a temporary data dir: digits for the 2D models and the
autoencoder, aeon's BasicMotions for ``cnn1d``. For each int8 .tflite, in the same run:

- TFLM: the tflite-micro interpreter runs the inputs one invoke each and reports the arena
  it recorded (the baseline);
- the generated library for ``mps2-an385`` (Cortex-M3): its static arena, its own flash
  (text + rodata + data) and RAM (data + bss) from ``arm-none-eabi-size``
  (``edgeops.firmware.cortexm.measure_footprint``: the harness linked with and without the
  model), and, built into the bare-metal harness and run under ``qemu-system-arm -icount``,
  its outputs on the same inputs and the mean instructions per inference;
- inputs: the test split's samples quantized with the model's input parameters, filled up
  with seeded random int8 tensors to ``--samples``; the outputs of the Cortex-M build are
  compared byte for byte with TFLM's.

Goals: arena no larger than TFLM's for every model and at most 75 % of it on average; flash
(weights + code) at most the model's flatbuffer size + 16 KiB (TFLM's published minimum for
its core runtime on a Cortex-M3) for every model; outputs bit-exact with TFLM.

Results go to bench/results/firmware.json and firmware.md (written atomically); the exit
status is 1 if a goal is missed.

    python bench/firmware.py [--quick] [--seed 0] [--samples 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _hub import BenchHub
from _results import run_meta, targets_table, write_and_report

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = "mps2-an385"
TFLM_CORE_BYTES = 16 * 1024
"""TFLM's published minimum for its core runtime on a Cortex-M3 (flash)."""
ARENA_MEAN_RATIO = 0.75
DATASET = {"cnn1d": "basic_motions"}
"""Dataset of each architecture; digits for the others."""
EPOCHS = {"digits": 10, "basic_motions": 60}
QUICK_EPOCHS = {"digits": 2, "basic_motions": 10}


class Bench(BenchHub):
    def __init__(self, root: Path, seed: int, quick: bool) -> None:
        super().__init__(root, seed)
        self.epochs = QUICK_EPOCHS if quick else EPOCHS
        self.log: list[str] = []

    def say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.log.append(line)

    def int8_model(self, arch: str) -> tuple[Any, bytes, np.ndarray]:
        """The int8 version of ``arch`` trained here, its .tflite, its test split's inputs."""
        dataset = DATASET.get(arch, "digits")
        keras = self.trainer.train(
            dataset,
            arch,
            epochs=self.epochs[dataset],
            seed=self.seed,
            progress=False,
            evaluate_on_runtime=False,
        )
        int8 = self.compressor.compress(
            keras.id, quantize="int8", max_loss_pp=100.0, seed=self.seed, progress=False
        )
        arrays = self.datasets.load(int8.dataset_version)
        x_test = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
        return int8, self.registry.load_artifact(int8.id), x_test


def quantized_inputs(
    x: np.ndarray, scale: float, zero_point: int, count: int, seed: int
) -> tuple[np.ndarray, int]:
    """Up to ``count`` real samples quantized as the device does, filled up with seeded
    random int8 tensors; (inputs, number of real samples)."""
    from edgeops.firmware.conformance import random_inputs

    flat = x.reshape(len(x), -1)[:count]
    real = np.clip(np.round(flat / scale) + zero_point, -128, 127).astype(np.int8)
    fill = random_inputs(flat.shape[1], count - len(real), seed=seed)
    return np.concatenate([real, fill]) if len(fill) else real, len(real)


def measure_model(bench: Bench, arch: str, samples: int, work: Path) -> dict[str, Any]:
    from edgeops.evaluate.tflm import tflm_run
    from edgeops.firmware import cortexm, generate

    started = time.perf_counter()
    version, tflite, x_test = bench.int8_model(arch)
    trained = time.perf_counter() - started
    library_dir = work / arch
    library = generate(tflite, library_dir, target=TARGET)
    scale, zero_point = library.input_quantization
    inputs, real = quantized_inputs(x_test, scale, zero_point, samples, bench.seed)
    tflm = tflm_run(tflite, inputs)
    footprint = cortexm.measure_footprint(library_dir, TARGET, build_dir=work / f"{arch}-size")
    elf = cortexm.build_firmware(library_dir, work / f"{arch}-build", TARGET)
    ran = cortexm.run_qemu(elf, inputs, library.output_size, TARGET)
    expected = np.asarray(tflm.outputs, dtype=np.int8).reshape(len(inputs), -1)
    mismatched = int(np.sum(np.any(ran.outputs != expected, axis=1)))
    metrics = version.metrics
    score = "auc" if metrics.get("accuracy") is None else "accuracy"
    row = {
        "model": version.ref,
        "dataset": DATASET.get(arch, "digits"),
        "ops": library.ops,
        "accuracy_metric": score,
        "accuracy": metrics.get(score),
        "flatbuffer_bytes": len(tflite),
        "tflm_arena_bytes": tflm.arena_bytes,
        "arena_bytes": library.arena_bytes,
        "arena_ratio": library.arena_bytes / tflm.arena_bytes,
        "io_bytes": library.input_size + library.output_size,
        "footprint": footprint.to_dict(),
        "flash_bytes": footprint.flash_bytes,
        "flash_limit_bytes": len(tflite) + TFLM_CORE_BYTES,
        "ram_bytes": footprint.ram_bytes,
        "instructions_per_inference": ran.instructions_per_inference,
        "samples": len(inputs),
        "real_samples": real,
        "mismatched_samples": mismatched,
        "seconds": round(time.perf_counter() - started, 1),
    }
    bench.say(
        f"{arch}: {version.ref} trained and compressed in {trained:.0f} s; arena "
        f"{row['arena_bytes']} B vs TFLM {row['tflm_arena_bytes']} B "
        f"({row['arena_ratio']:.0%}), flash {row['flash_bytes']} B (limit "
        f"{row['flash_limit_bytes']} B), {row['instructions_per_inference']} instructions per "
        f"inference, {len(inputs) - mismatched}/{len(inputs)} outputs equal to TFLM's"
    )
    return row


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark's goals, one entry each (``target``, ``text``, ``met``)."""
    listed: list[dict[str, Any]] = []
    for arch, r in rows.items():
        listed.append(
            {
                "target": f"{arch}: arena <= TFLM's",
                "value": r["arena_bytes"],
                "threshold": r["tflm_arena_bytes"],
                "met": r["arena_bytes"] <= r["tflm_arena_bytes"],
                "text": f"{r['arena_bytes']} B vs {r['tflm_arena_bytes']} B "
                f"({r['arena_ratio']:.0%})",
            }
        )
    mean = float(np.mean([r["arena_ratio"] for r in rows.values()]))
    listed.append(
        {
            "target": f"mean arena ratio (ours / TFLM's) <= {ARENA_MEAN_RATIO:.0%}",
            "value": mean,
            "threshold": ARENA_MEAN_RATIO,
            "met": mean <= ARENA_MEAN_RATIO,
            "text": f"{mean:.1%} over {len(rows)} models",
        }
    )
    for arch, r in rows.items():
        listed.append(
            {
                "target": f"{arch}: flash <= flatbuffer + 16 KiB",
                "value": r["flash_bytes"],
                "threshold": r["flash_limit_bytes"],
                "met": r["flash_bytes"] <= r["flash_limit_bytes"],
                "text": f"{r['flash_bytes']} B vs {r['flatbuffer_bytes']} + "
                f"{TFLM_CORE_BYTES} = {r['flash_limit_bytes']} B",
            }
        )
    for arch, r in rows.items():
        listed.append(
            {
                "target": f"{arch}: Cortex-M outputs bit-exact with TFLM",
                "value": r["mismatched_samples"],
                "threshold": 0,
                "met": r["mismatched_samples"] == 0,
                "text": f"{r['samples'] - r['mismatched_samples']}/{r['samples']} samples "
                f"({r['real_samples']} from the test split)",
            }
        )
    return listed


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edgeops.firmware import cortexm
    from edgeops.train.zoo import ARCHITECTURES

    if not cortexm.toolchain_available():
        raise SystemExit(
            "firmware benchmark: needs arm-none-eabi-gcc, newlib and qemu-system-arm "
            f"(apt-get install {cortexm.APT_PACKAGES})"
        )
    architectures = args.arch or list(ARCHITECTURES)
    unknown = sorted(set(architectures) - set(ARCHITECTURES))
    if unknown:
        raise SystemExit(
            f"firmware benchmark: unknown architecture {', '.join(unknown)}; "
            f"architectures: {', '.join(ARCHITECTURES)}"
        )
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-firmware-") as tmp:
        (Path(tmp) / "hub").mkdir()
        bench = Bench(Path(tmp) / "hub", args.seed, args.quick)
        try:
            rows = {
                arch: measure_model(bench, arch, args.samples, Path(tmp) / "firmware")
                for arch in architectures
            }
        finally:
            bench.database.dispose()
    return {"target": TARGET, "rows": rows, "targets": goals(rows), "log": bench.log}


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    lines = [
        "# Generated firmware against TensorFlow Lite Micro",
        "",
        f"Measured {meta['when']} on {meta['machine']}, {meta['cores']} cores, Python "
        f"{meta['python']}: `{meta['command']}` ({meta['mode']}; {meta['seconds']:.0f} s). "
        f"Target {document['target']} (Cortex-M3, arm-none-eabi-gcc, QEMU). TFLM arena: "
        "what the tflite-micro interpreter recorded for the same .tflite in the same run "
        "(64-bit host). Flash and RAM: the generated library's own share (the harness linked "
        "with and without the model, `arm-none-eabi-size -A`): flash = text + rodata + data, "
        "RAM = data + bss (the arena is in bss). Instructions: the mean per invoke under "
        "`qemu-system-arm -icount shift=0`, over every input.",
        "",
        "## Goals",
        "",
        *targets_table(document["targets"]),
        "",
        "## Models",
        "",
        "| model | dataset | ops | flatbuffer B | TFLM arena B | arena B | ratio | "
        "arena + I/O B | text B | rodata B | data B | bss B | flash B | flatbuffer + 16 KiB | "
        "RAM B | instructions / inference | bit-exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for arch, r in document["rows"].items():
        f = r["footprint"]
        lines.append(
            f"| {arch} ({r['model']}) | {r['dataset']} | {len(r['ops'])} | "
            f"{r['flatbuffer_bytes']} | {r['tflm_arena_bytes']} | {r['arena_bytes']} | "
            f"{r['arena_ratio']:.0%} | {r['arena_bytes'] + r['io_bytes']} | "
            f"{f['text']} | {f['rodata']} | {f['data']} | {f['bss']} | "
            f"{r['flash_bytes']} | {r['flash_limit_bytes']} | {r['ram_bytes']} | "
            f"{r['instructions_per_inference']:,} | "
            f"{r['samples'] - r['mismatched_samples']}/{r['samples']} |"
        )
    lines += [
        "",
        "arena + I/O: the generated arena holds neither the input nor the output tensor "
        "(the caller's buffers; TFLM's arena holds both), so this column is the fairer "
        "comparison of RAM for tensors. "
        "ops: kernel calls in the generated `edgeops_model_invoke` (reshapes included, shape "
        "arithmetic folded away). Accuracy of the int8 models (post-training int8 kept "
        "whatever it lost; brief training): "
        + ", ".join(
            f"{arch} {r['accuracy_metric']} {r['accuracy']:.3f}"
            for arch, r in document["rows"].items()
            if r["accuracy"] is not None
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes bench/results/firmware.json and firmware.md.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--samples", type=int, default=128, help="inputs per model (default 128, at least 100)"
    )
    parser.add_argument(
        "--arch", action="append", help="only this zoo architecture (repeatable; default all)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if args.samples < 100:
        parser.error("--samples must be at least 100 (bit-exactness is checked on >= 100)")
    started = time.perf_counter()
    document = run(args)
    document["meta"] = run_meta(
        "python bench/firmware.py"
        + (" --quick" if args.quick else "")
        + "".join(f" --arch {arch}" for arch in args.arch or ()),
        time.perf_counter() - started,
        mode="quick: fewer epochs" if args.quick else "full",
        seed=args.seed,
        samples=args.samples,
    )
    text = markdown(document)
    print(text)
    write_and_report(args.out, "firmware", document, text)
    return 0 if all(goal["met"] for goal in document["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
