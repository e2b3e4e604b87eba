"""Compression figures of issue 3, measured on the device runtime (LiteRT, tflite-micro).

Every model is trained here, registered, and compressed through the same services the CLI
uses (``TrainService``, ``CompressService``), in a temporary data dir. The baseline of each
row is the float model of the same run, converted to a float .tflite and scored on the same
test split with the same LiteRT interpreter as the compressed one.

  1. digits, small CNN: float vs int8 test accuracy (target: int8 within 1.0 pp) and size
     (target: int8 .tflite at least 3x smaller than the float .tflite). Measured at two
     widths: the zoo default (2.5 k parameters) and width 4 (21 k parameters).
  2. mnist5k, CNN: float vs int8 (target: within 1.0 pp); 50 %-pruned + int8, gzipped,
     against the gzipped float model (target: at least 8x smaller); the same with 16 weight
     clusters (sparsity preserved) between pruning and int8; with 4 clusters and three times
     the fine-tuning epochs (the setting that reaches 8x); 80 % pruning as context. For
     these rows, where the bytes go: the flatbuffer's structure against its weight buffers,
     and the order-0 entropy of the weights, the bound for any coder that codes each byte
     on its own (gzip's Huffman stage is one).
  3. basic_motions, 1D CNN: int8 test accuracy (target: at least 90 %).
  4. MCU candidates: a budget search of the digits CNN (widths x sparsity x int8/int16x8)
     for an MCU profile, so every candidate is scored on the tflite-micro interpreter itself,
     and the compressed models above, each with its tflite-micro arena bytes and flash
     bytes, checked against every MCU profile.

Results go to bench/results/compress.json and compress.md (written atomically).

    python bench/compress.py [--quick] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _results import run_meta, targets_table, write_and_report

from edgeops.compress import CompressService, load_profiles, mark_candidates
from edgeops.compress.search import Candidate
from edgeops.data import DatasetService
from edgeops.db import Database
from edgeops.export.card import op_set
from edgeops.registry import Registry
from edgeops.store import ArtifactStore

RESULTS = Path(__file__).resolve().parent / "results"
MCU_PROFILES = ("cortex-m0plus-32k", "cortex-m4-256k", "cortex-m7-1m")


@dataclass(frozen=True)
class Epochs:
    digits: int
    mnist: int
    motions: int
    fine_tune: int


FULL = Epochs(digits=30, mnist=8, motions=200, fine_tune=2)
QUICK = Epochs(digits=8, mnist=2, motions=100, fine_tune=1)


class Bench:
    def __init__(self, root: Path, seed: int, epochs: Epochs) -> None:
        from edgeops.train.service import TrainService

        self.database = Database(f"sqlite:///{root / 'edgeops.db'}")
        self.database.upgrade()
        store = ArtifactStore(root / "artifacts")
        self.datasets = DatasetService(self.database, store)
        self.registry = Registry(self.database, store)
        self.trainer = TrainService(self.datasets, self.registry)
        self.compressor = CompressService(self.datasets, self.registry)
        self.seed = seed
        self.epochs = epochs
        self.log: list[str] = []

    def say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.log.append(line)

    def float_tflite(self, parent: Any) -> bytes:
        """The float .tflite of a Keras version: the baseline every ratio divides."""
        from edgeops.export.convert import keras_to_tflite_float
        from edgeops.train.trainer import load_keras

        return keras_to_tflite_float(load_keras(self.registry.load_artifact(parent.id)))

    def train(self, dataset: str, arch: str, epochs: int, width: float = 1.0) -> Any:
        started = time.perf_counter()
        model = self.trainer.train(
            dataset, arch, epochs=epochs, seed=self.seed, width=width, progress=False
        )
        self.say(
            f"trained {model.ref} ({arch}, width {width:g}, {epochs} epochs) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        return model

    def compress(
        self,
        parent: Any,
        sparsity: float | None = None,
        clusters: int | None = None,
        *,
        fine_tune: int | None = None,
        bytes_breakdown: bool = False,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        version = self.compressor.compress(
            parent.id,
            quantize="int8",
            sparsity=sparsity,
            clusters=clusters,
            epochs=fine_tune or self.epochs.fine_tune,
            seed=self.seed,
            progress=False,
        )
        seconds = time.perf_counter() - started
        m, c = version.metrics, version.config["compression"]
        key = "auc" if m.get("accuracy") is None else "accuracy"
        row = {
            "model": version.ref,
            "id": version.id,
            "parent": parent.ref,
            "sparsity": sparsity or 0.0,
            "clusters": clusters,
            "fine_tune_epochs": c["fine_tune_epochs"],
            "kernel_sparsity": m["kernel_sparsity"],
            "kernel_distinct_values": m.get("kernel_distinct_values"),
            "chosen": ("QAT " if c["qat"] else "") + c["quantization"],
            "reason": c["reason"],
            "float_accuracy": m[f"float_{key}"],
            "accuracy": m[key],
            "loss_pp": m["loss_pp"],
            "float_size_bytes": m["float_size_bytes"],
            "size_bytes": m["size_bytes"],
            "size_ratio": m["float_size_bytes"] / m["size_bytes"],
            "float_gzip_bytes": m["float_gzip_bytes"],
            "gzip_bytes": m["gzip_bytes"],
            "gzip_ratio": m["float_gzip_bytes"] / m["gzip_bytes"],
            "arena_bytes": m.get("arena_bytes"),
            "latency_ms_median": m.get("latency_ms_median"),
            "ops": [],
            "seconds": round(seconds, 1),
        }
        artifact = self.registry.load_artifact(version.id)
        row["ops"] = op_set(artifact, "tflite")
        if bytes_breakdown:
            row["bytes"] = byte_budget(artifact)
        self.say(
            f"compressed {version.ref}: {row['chosen']}, {key} {row['accuracy']:.4f} "
            f"(float {row['float_accuracy']:.4f}), {row['size_bytes']} B"
        )
        return row


def _gz(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def _entropy_bits(values: Any) -> float:
    import numpy as np

    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * counts.sum())


def byte_budget(flatbuffer: bytes) -> dict[str, Any]:
    """Where a .tflite's bytes go: its constant (weight) buffers against the rest of the
    flatbuffer (graph, tensor names and shapes, quantization parameters, metadata), raw and
    gzipped, and the order-0 entropy of each weight tensor's stored values."""
    import flatbuffers  # type: ignore[import-untyped]
    import numpy as np
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    dtypes = {0: np.float32, 1: np.float16, 2: np.int32, 9: np.int8, 7: np.int16}
    tensors = []
    weights = b""
    for tensor in model.subgraphs[0].tensors:
        data = model.buffers[tensor.buffer].data
        if data is None or len(data) == 0:
            continue
        raw = np.asarray(data, dtype=np.uint8).tobytes()
        weights += raw
        values = np.frombuffer(raw, dtype=dtypes.get(tensor.type, np.uint8))
        if values.size < 64:  # biases and shape constants: counted, not listed
            continue
        # int tensors: per stored value; float tensors: per byte (almost every float value
        # is distinct, so per value says nothing; gzip codes bytes)
        floating = np.issubdtype(values.dtype, np.floating)
        bits = _entropy_bits(np.frombuffer(raw, dtype=np.uint8) if floating else values)
        tensors.append(
            {
                "name": tensor.name.decode(errors="replace"),
                "values": int(values.size),
                "bytes": len(raw),
                "gzip_bytes": _gz(raw),
                "zero_fraction": float(np.mean(values == 0)),
                "distinct_nonzero": int(np.unique(values[values != 0]).size),
                "entropy_bits_per_value": bits / values.size,
                "entropy_bytes": math.ceil(bits / 8),
            }
        )
    # the same flatbuffer with every weight buffer emptied: its structure alone
    for buffer in model.buffers:
        if buffer.data is not None and len(buffer.data) > 0:
            buffer.data = buffer.data[:0]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    structure = bytes(builder.Output())
    return {
        "file_bytes": len(flatbuffer),
        "file_gzip_bytes": _gz(flatbuffer),
        "weight_bytes": len(weights),
        "weights_gzip_bytes": _gz(weights),
        "structure_bytes": len(structure),
        "structure_gzip_bytes": _gz(structure),
        "tensors": tensors,
    }


def target(name: str, value: float, threshold: float, met: bool, text: str) -> dict[str, Any]:
    return {"target": name, "value": value, "threshold": threshold, "met": met, "text": text}


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        bench = Bench(Path(tmp), args.seed, epochs)
        try:
            return measure(bench, args)
        finally:
            bench.database.dispose()


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    e = bench.epochs
    rows: dict[str, dict[str, Any]] = {}
    digits_small = bench.train("digits", "cnn", e.digits, width=1.0)
    rows["digits cnn w1 int8"] = bench.compress(digits_small)
    digits_wide = bench.train("digits", "cnn", e.digits, width=4.0)
    rows["digits cnn w4 int8"] = bench.compress(digits_wide)
    mnist = bench.train("mnist5k", "cnn", e.mnist)
    rows["mnist5k cnn int8"] = bench.compress(mnist, bytes_breakdown=True)
    rows["mnist5k cnn p50 int8"] = bench.compress(mnist, sparsity=0.5, bytes_breakdown=True)
    rows["mnist5k cnn p50 c16 int8"] = bench.compress(
        mnist, sparsity=0.5, clusters=16, bytes_breakdown=True
    )
    # fewer clusters with longer fine-tuning (pruning, clustering): the lever that reaches 8x
    rows["mnist5k cnn p50 c4 int8 (6 epochs)"] = bench.compress(
        mnist, sparsity=0.5, clusters=4, fine_tune=3 * e.fine_tune, bytes_breakdown=True
    )
    rows["mnist5k cnn p80 int8"] = bench.compress(mnist, sparsity=0.8)
    float_budget = byte_budget(bench.float_tflite(mnist))
    motions = bench.train("basic_motions", "cnn1d", e.motions)
    rows["basic_motions cnn1d int8"] = bench.compress(motions)

    started = time.perf_counter()
    search = bench.compressor.search(
        digits_wide.id,
        "cortex-m7-1m",
        widths=(1.0, 2.0, 4.0),
        sparsities=(0.0, 0.5),
        modes=("int8", "int16x8"),
        fine_tune_epochs=e.fine_tune,
        seed=args.seed,
        workers=args.workers,
        progress=False,
    )
    bench.say(
        f"search: {len(search.candidates)} candidates in {time.perf_counter() - started:.1f} s"
    )
    profiles = load_profiles()
    fits: dict[str, list[bool]] = {}
    for name in MCU_PROFILES:
        marked = [copy.deepcopy(c) for c in search.candidates]
        mark_candidates(marked, profiles[name])
        fits[name] = [c.fits for c in marked]
    for row in rows.values():
        candidate = Candidate(
            width=1.0,
            sparsity=row["sparsity"],
            quantization="int8",
            accuracy=row["accuracy"],
            test_accuracy=row["accuracy"],
            flash_bytes=row["size_bytes"],
            gzip_bytes=row["gzip_bytes"],
            ram_bytes=row["arena_bytes"],
            arena_bytes=row["arena_bytes"],
            latency_ms=row["latency_ms_median"] or 0.0,
            macs=None,
            ops=row["ops"],
        )
        row["fits"] = {name: not profiles[name].misfits(candidate.needs()) for name in MCU_PROFILES}

    d1, d4 = rows["digits cnn w1 int8"], rows["digits cnn w4 int8"]
    m8, p50 = rows["mnist5k cnn int8"], rows["mnist5k cnn p50 int8"]
    c16 = rows["mnist5k cnn p50 c16 int8"]
    c4 = rows["mnist5k cnn p50 c4 int8 (6 epochs)"]
    bm = rows["basic_motions cnn1d int8"]
    targets = [
        target(
            "digits small CNN: int8 within 1.0 pp of float (width 4)",
            d4["loss_pp"],
            1.0,
            d4["loss_pp"] <= 1.0,
            f"{d4['loss_pp']:+.2f} pp ({d4['chosen']})",
        ),
        target(
            "digits small CNN: int8 .tflite >= 3x smaller than float (width 4)",
            d4["size_ratio"],
            3.0,
            d4["size_ratio"] >= 3.0,
            f"{d4['size_ratio']:.2f}x",
        ),
        target(
            "digits small CNN: int8 within 1.0 pp of float (width 1)",
            d1["loss_pp"],
            1.0,
            d1["loss_pp"] <= 1.0,
            f"{d1['loss_pp']:+.2f} pp ({d1['chosen']})",
        ),
        target(
            "digits small CNN: int8 .tflite >= 3x smaller than float (width 1)",
            d1["size_ratio"],
            3.0,
            d1["size_ratio"] >= 3.0,
            f"{d1['size_ratio']:.2f}x",
        ),
        target(
            "mnist5k CNN: int8 within 1.0 pp of float",
            m8["loss_pp"],
            1.0,
            m8["loss_pp"] <= 1.0,
            f"{m8['loss_pp']:+.2f} pp ({m8['chosen']})",
        ),
        target(
            "mnist5k CNN: 50%-pruned + int8, gzipped, >= 8x smaller than gzipped float",
            p50["gzip_ratio"],
            8.0,
            p50["gzip_ratio"] >= 8.0,
            f"{p50['gzip_ratio']:.2f}x",
        ),
        target(
            "mnist5k CNN: 50%-pruned + 16 clusters + int8, gzipped, >= 8x smaller than "
            "gzipped float",
            c16["gzip_ratio"],
            8.0,
            c16["gzip_ratio"] >= 8.0,
            f"{c16['gzip_ratio']:.2f}x",
        ),
        target(
            "mnist5k CNN: 50%-pruned + 16 clusters + int8 within 1.0 pp of float",
            c16["loss_pp"],
            1.0,
            c16["loss_pp"] <= 1.0,
            f"{c16['loss_pp']:+.2f} pp ({c16['chosen']})",
        ),
        target(
            "mnist5k CNN: pruned to 50% + 4 clusters + int8 (6 fine-tuning epochs), gzipped, "
            ">= 8x smaller than gzipped float and within 1.0 pp",
            c4["gzip_ratio"],
            8.0,
            c4["gzip_ratio"] >= 8.0 and c4["loss_pp"] <= 1.0,
            f"{c4['gzip_ratio']:.2f}x, {c4['loss_pp']:+.2f} pp ({c4['chosen']}); kernel "
            f"sparsity after clustering {c4['kernel_sparsity']:.1%}",
        ),
        target(
            "basic_motions 1D CNN: int8 test accuracy >= 90%",
            bm["accuracy"],
            0.9,
            bm["accuracy"] >= 0.9,
            f"{bm['accuracy']:.1%} ({bm['chosen']})",
        ),
    ]
    return {
        "rows": rows,
        "targets": targets,
        "mnist5k_float_bytes": float_budget,
        "search": {
            "model": digits_wide.ref,
            "candidates": [c.to_dict() for c in search.candidates],
            "fits": fits,
        },
        "profiles": {name: profiles[name].to_dict() for name in MCU_PROFILES},
        "log": bench.log,
    }


def _kib(value: Any) -> str:
    return "-" if value is None else f"{value / 1024:.1f} KiB"


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    lines = [
        "# Compression figures (issue 3)",
        "",
        f"Measured {meta['when']} on {meta['machine']}, {meta['cores']} cores, Python "
        f"{meta['python']}: `{meta['command']}` ({meta['mode']}; {meta['seconds']:.0f} s). "
        "Accuracies are on the test split, on the LiteRT interpreter, for the compressed "
        "model and for its float baseline (the same Keras model converted to a float "
        ".tflite) alike. Arena bytes come from the tflite-micro interpreter.",
        "",
        "## Targets",
        "",
        *targets_table(document["targets"]),
    ]
    lines += [
        "",
        "## Models",
        "",
        "| model | chosen | float acc | acc | pp | float size | size | x | float gz | gz | "
        "x gz | sparsity | values | arena | " + " | ".join(MCU_PROFILES) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---|" * len(MCU_PROFILES),
    ]
    for name, r in document["rows"].items():
        fits = " | ".join("fits" if r["fits"][p] else "no" for p in MCU_PROFILES)
        lines.append(
            f"| {name} | {r['chosen']} | {r['float_accuracy']:.4f} | {r['accuracy']:.4f} | "
            f"{r['loss_pp']:+.2f} | {r['float_size_bytes']} | {r['size_bytes']} | "
            f"{r['size_ratio']:.2f} | {r['float_gzip_bytes']} | {r['gzip_bytes']} | "
            f"{r['gzip_ratio']:.2f} | {r['kernel_sparsity']:.3f} | "
            f"{r.get('kernel_distinct_values') or '-'} | {_kib(r['arena_bytes'])} | {fits} |"
        )
    lines += [
        "",
        "sparsity: the fraction of zeros in the prunable kernels after compression; values: "
        "the most distinct values one kernel holds (clustered rows, zero included).",
    ]
    lines += ["", "Why each model's quantization was chosen (fallback policy):", ""]
    for name, r in document["rows"].items():
        lines.append(f"- {name}: {r['reason']}")
    lines += _bytes_section(document)
    search = document["search"]
    lines += [
        "",
        f"## MCU candidates: search of {search['model']} (TFLM arena and flash bytes)",
        "",
        "Each candidate's accuracy is scored on the tflite-micro interpreter itself (`tflm`; "
        "LiteRT's in parentheses), every sample of the split invoked on it.",
        "",
        "| width | sparsity | quant | scored on | val acc | test acc | flash B | arena B | "
        + " | ".join(MCU_PROFILES)
        + " |",
        "|---:|---:|---|---|---:|---:|---:|---:|" + "---|" * len(MCU_PROFILES),
    ]
    for i, c in enumerate(search["candidates"]):
        fits = " | ".join("fits" if search["fits"][p][i] else "no" for p in MCU_PROFILES)
        arena = "-" if c["arena_bytes"] is None else str(c["arena_bytes"])
        litert_val, litert_test = c.get("litert_accuracy"), c.get("litert_test_accuracy")
        val = f"{c['accuracy']:.4f}" + ("" if litert_val is None else f" ({litert_val:.4f})")
        test = f"{c['test_accuracy']:.4f}" + (
            "" if litert_test is None else f" ({litert_test:.4f})"
        )
        lines.append(
            f"| {c['width']:g} | {c['sparsity']:.0%} | {c['quantization']} | "
            f"{c.get('scored_on', 'litert')} | {val} | {test} | {c['flash_bytes']} | {arena} | "
            f"{fits} |"
        )
    lines += [
        "",
        "Profiles (budget for the model): "
        + "; ".join(
            f"{name}: flash {p['flash_bytes']} B, RAM {p['ram_bytes']} B"
            for name, p in document["profiles"].items()
        )
        + ". A candidate tflite-micro cannot plan (arena `-`) does not fit an MCU.",
        "",
    ]
    return "\n".join(lines)


def _bytes_section(document: dict[str, Any]) -> list[str]:
    """Where the bytes of the mnist5k .tflite files go (see byte_budget)."""
    budgets = [("float .tflite (baseline)", document["mnist5k_float_bytes"])] + [
        (name, r["bytes"]) for name, r in document["rows"].items() if "bytes" in r
    ]
    lines = [
        "",
        "## Where the bytes go: mnist5k CNN",
        "",
        "Structure: the flatbuffer with every weight buffer emptied (graph, tensor names and "
        "shapes, quantization parameters, metadata). Weights: the constant buffers "
        "concatenated. Entropy: the order-0 entropy of each weight tensor, summed: of its "
        "stored values for int8/int32 tensors (no coder that codes each value on its own, "
        "as gzip's Huffman stage does, gets below it), of its bytes for float32 tensors "
        "(nearly every float value is distinct).",
        "",
        "| model | file B | gz B | structure B | structure gz B | weights B | weights gz B | "
        "weights entropy B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in budgets:
        entropy = sum(t["entropy_bytes"] for t in b["tensors"])
        lines.append(
            f"| {name} | {b['file_bytes']} | {b['file_gzip_bytes']} | {b['structure_bytes']} | "
            f"{b['structure_gzip_bytes']} | {b['weight_bytes']} | {b['weights_gzip_bytes']} | "
            f"{entropy} |"
        )
    lines += [
        "",
        "Weight tensors of at least 64 values (biases are in the weights column, not listed):",
        "",
        "| model | tensor | values | zeros | distinct nonzero | entropy bits/value | "
        "entropy B | gz B |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in budgets:
        for t in b["tensors"]:
            lines.append(
                f"| {name} | `{t['name'][:40]}` | {t['values']} | {t['zero_fraction']:.2f} | "
                f"{t['distinct_nonzero']} | {t['entropy_bits_per_value']:.2f} | "
                f"{t['entropy_bytes']} | {t['gzip_bytes']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes bench/results/compress.json and compress.md.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="search processes (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    document = run(args)
    document["meta"] = run_meta(
        "python bench/compress.py" + (" --quick" if args.quick else ""),
        time.perf_counter() - started,
        mode="quick: fewer epochs" if args.quick else "full",
        seed=args.seed,
    )
    out: Path = args.out
    write_and_report(out, "compress", document, markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
