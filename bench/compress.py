"""Compression figures of issue 3, measured on the device runtime (LiteRT, tflite-micro).

Every model is trained here, registered, and compressed through the same services the CLI
uses (``TrainService``, ``CompressService``), in a temporary data dir. The baseline of each
row is the float model of the same run, converted to a float .tflite and scored on the same
test split with the same LiteRT interpreter as the compressed one.

  1. digits, small CNN: float vs int8 test accuracy (target: int8 within 1.0 pp) and size
     (target: int8 .tflite at least 3x smaller than the float .tflite). Measured at two
     widths: the zoo default (2.5 k parameters) and width 4 (21 k parameters).
  2. mnist5k, CNN: float vs int8 (target: within 1.0 pp); 50 %-pruned + int8, gzipped,
     against the gzipped float model (target: at least 8x smaller); 80 % pruning as context.
  3. basic_motions, 1D CNN: int8 test accuracy (target: at least 90 %).
  4. MCU candidates: a budget search of the digits CNN (widths x sparsity x int8/int16x8)
     and the compressed models above, each with its tflite-micro arena bytes and flash
     bytes, checked against every MCU profile.

Results go to bench/results/compress.json and compress.md (written atomically).

    python bench/compress.py [--quick] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _results import run_meta, write_results

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

    def compress(self, parent: Any, sparsity: float | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        version = self.compressor.compress(
            parent.id,
            quantize="int8",
            sparsity=sparsity,
            epochs=self.epochs.fine_tune,
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
            "kernel_sparsity": m["kernel_sparsity"],
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
        row["ops"] = op_set(self.registry.load_artifact(version.id), "tflite")
        self.say(
            f"compressed {version.ref}: {row['chosen']}, {key} {row['accuracy']:.4f} "
            f"(float {row['float_accuracy']:.4f}), {row['size_bytes']} B"
        )
        return row


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
    rows["mnist5k cnn int8"] = bench.compress(mnist)
    rows["mnist5k cnn p50 int8"] = bench.compress(mnist, sparsity=0.5)
    rows["mnist5k cnn p80 int8"] = bench.compress(mnist, sparsity=0.8)
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
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in document["targets"]:
        lines.append(f"| {t['target']} | {t['text']} | {'yes' if t['met'] else '**no**'} |")
    lines += [
        "",
        "## Models",
        "",
        "| model | chosen | float acc | acc | pp | float size | size | x | float gz | gz | "
        "x gz | sparsity | arena | " + " | ".join(MCU_PROFILES) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---|" * len(MCU_PROFILES),
    ]
    for name, r in document["rows"].items():
        fits = " | ".join("fits" if r["fits"][p] else "no" for p in MCU_PROFILES)
        lines.append(
            f"| {name} | {r['chosen']} | {r['float_accuracy']:.4f} | {r['accuracy']:.4f} | "
            f"{r['loss_pp']:+.2f} | {r['float_size_bytes']} | {r['size_bytes']} | "
            f"{r['size_ratio']:.2f} | {r['float_gzip_bytes']} | {r['gzip_bytes']} | "
            f"{r['gzip_ratio']:.2f} | {r['kernel_sparsity']:.2f} | {_kib(r['arena_bytes'])} | "
            f"{fits} |"
        )
    lines += ["", "Why each model's quantization was chosen (fallback policy):", ""]
    for name, r in document["rows"].items():
        lines.append(f"- {name}: {r['reason']}")
    search = document["search"]
    lines += [
        "",
        f"## MCU candidates: search of {search['model']} (TFLM arena and flash bytes)",
        "",
        "| width | sparsity | quant | val acc | test acc | flash B | arena B | "
        + " | ".join(MCU_PROFILES)
        + " |",
        "|---:|---:|---|---:|---:|---:|---:|" + "---|" * len(MCU_PROFILES),
    ]
    for i, c in enumerate(search["candidates"]):
        fits = " | ".join("fits" if search["fits"][p][i] else "no" for p in MCU_PROFILES)
        arena = "-" if c["arena_bytes"] is None else str(c["arena_bytes"])
        lines.append(
            f"| {c['width']:g} | {c['sparsity']:.0%} | {c['quantization']} | "
            f"{c['accuracy']:.4f} | {c['test_accuracy']:.4f} | {c['flash_bytes']} | {arena} | "
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
    write_results(out, "compress", document, markdown(document))
    met = sum(t["met"] for t in document["targets"])
    print(f"{met}/{len(document['targets'])} targets met; see {out / 'compress.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
