"""Agent figures of issue 4: runtime overhead against a bare LiteRT invoke loop, and idle RSS.

1. Overhead. The model: the zoo's MobileNet (depthwise-separable) at alpha 4 on mnist5k
   (28 x 28 x 1 inputs; about 4.7 MB int8, the size class of a MobileNetV1 on a Linux edge
   device), trained here (1 epoch: the weights do not matter for timing), compressed to
   full int8 and exported as an agent bundle through the same services the CLI uses. Invoke
   dominates for a model of this size, as it does on a device, where every invoke is several
   times slower than on this x86 host. In the same process, on the same test-split samples,
   in alternating blocks (so both sides see the same load):

   - bare: ``Interpreter.invoke()`` alone, on inputs quantized beforehand and set (untimed)
     with ``set_tensor``; the interpreter is ai_edge_litert's with the same thread count;
   - agent: ``runtime.infer(raw)``: input checks, the card's feature rule, quantization,
     set_tensor, invoke, get_tensor, dequantization, argmax; timed around the whole call.

   Target: median agent / median bare <= 1.10. The same is measured, as context, on smaller
   models (the mnist5k CNN at widths 8 and 4, the digits MLP), where invoke takes 100 us or
   less on this host and the agent's fixed per-sample cost (about 20 us for a 784-value
   sample: checks, feature rule, quantization, dequantization) shows.

2. Footprint. A fresh Python process that imports the agent (daemon, link, protocol,
   runtime, sketches), loads a small int8 bundle (the digits MLP) with its runtime and runs
   one sample, then idles; its VmRSS from /proc. Target: < 80 MB. The CNNs as context.

Results go to bench/results/agent.json and agent.md (written atomically).

    python bench/agent.py [--samples 3000] [--threads 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _hub import BenchHub
from _results import run_meta, write_and_report

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 100  # samples per alternating block
WARMUP = 200

_RSS_PROBE = """
import gc, json, sys, time
from pathlib import Path
import numpy as np
import device_agent.daemon, device_agent.link, device_agent.protocol, device_agent.sketch
from device_agent.runtime import ModelBundle, open_runtime

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

before = status("VmRSS")
bundle = ModelBundle.load(Path(sys.argv[1]))
runtime = open_runtime(bundle, num_threads=1)
runtime.infer(np.zeros(bundle.rule.input_shape, np.float32))
gc.collect()
time.sleep(1.0)
heavy = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "edgeops", "onnxruntime")]
print(json.dumps({"rss_bytes": status("VmRSS"), "hwm_bytes": status("VmHWM"),
                  "rss_imports_bytes": before, "heavy_modules": heavy}))
"""


class Hub(BenchHub):
    """The hub services in a temporary data dir, used only to make the bundles."""

    def int8_bundle(self, dataset: str, arch: str, width: float, epochs: int) -> Path:
        from edgeops.export import export_bundle

        self.datasets.register_builtin(dataset, seed=self.seed)
        keras = self.trainer.train(
            dataset,
            arch,
            epochs=epochs,
            width=width,
            seed=self.seed,
            name=f"{dataset}-{arch}-w{width:g}",
            progress=False,
            evaluate_on_runtime=False,
        )
        int8 = self.compressor.compress(keras.id, quantize="int8", progress=False)
        return export_bundle(
            int8.id,
            "tflite",
            self.root / f"bundle-{dataset}-{arch}-w{width:g}",
            registry=self.registry,
            datasets=self.datasets,
        )

    def raw_test(self, dataset: str) -> np.ndarray:
        x, _ = self.datasets.load(dataset).split("test")
        return np.asarray(x)


def overhead(bundle_dir: Path, raw: np.ndarray, samples: int, threads: int) -> dict[str, Any]:
    """Median per-sample time of the agent's path and of bare invoke, interleaved."""
    from ai_edge_litert.interpreter import Interpreter

    from device_agent.runtime import ModelBundle, TensorCodec, open_runtime

    bundle = ModelBundle.load(bundle_dir)
    runtime = open_runtime(bundle, num_threads=threads)
    bare = Interpreter(model_path=str(bundle.model_path), num_threads=threads)
    bare.allocate_tensors()
    details = bare.get_input_details()[0]
    scale, zero_point = details["quantization"]
    codec = TensorCodec(
        tuple(int(d) for d in details["shape"]), np.dtype(details["dtype"]).name, scale, zero_point
    )
    quantized = [codec.encode(bundle.rule.apply(s[None])).copy() for s in raw]
    index = int(details["index"])
    n = len(raw)

    def bare_block(start: int, count: int, into: list[float]) -> None:
        for k in range(start, start + count):
            bare.set_tensor(index, quantized[k % n])
            t0 = time.perf_counter()
            bare.invoke()
            into.append(time.perf_counter() - t0)

    def agent_block(start: int, count: int, into: list[float], own: list[float]) -> None:
        for k in range(start, start + count):
            t0 = time.perf_counter()
            prediction = runtime.infer(raw[k % n])
            into.append(time.perf_counter() - t0)
            own.append(prediction.latency_s)

    scratch: list[float] = []
    bare_block(0, WARMUP, scratch)
    agent_block(0, WARMUP, scratch, [])
    bare_times: list[float] = []
    agent_times: list[float] = []
    own_times: list[float] = []
    for start in range(0, samples, BLOCK):
        bare_block(start, BLOCK, bare_times)
        agent_block(start, BLOCK, agent_times, own_times)
    runtime.close()
    bare_median = statistics.median(bare_times)
    agent_median = statistics.median(agent_times)
    return {
        "model": bundle.card.name,
        "model_bytes": bundle.model_path.stat().st_size,
        "input_shape": list(bundle.rule.input_shape),
        "model_input_shape": list(bundle.rule.model_input_shape),
        "runtime": runtime.name,
        "threads": threads,
        "samples_per_side": len(bare_times),
        "bare_median_us": bare_median * 1e6,
        "bare_p90_us": float(np.percentile(bare_times, 90)) * 1e6,
        "agent_median_us": agent_median * 1e6,
        "agent_p90_us": float(np.percentile(agent_times, 90)) * 1e6,
        "agent_own_latency_median_us": statistics.median(own_times) * 1e6,
        "ratio": agent_median / bare_median,
        "overhead_us": (agent_median - bare_median) * 1e6,
    }


def idle_rss(bundle_dir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(bundle_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    document: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return document


def target(name: str, value: float, threshold: float, met: bool, text: str) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "met": met, "text": text}


MODELS = (
    ("mnist5k", "mobilenet", 4.0),
    ("mnist5k", "cnn", 8.0),
    ("mnist5k", "cnn", 4.0),
    ("digits", "mlp", 1.0),
)
"""(dataset, arch, width): the first is judged, the others are context."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    rss: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-agent-") as tmp:
        hub = Hub(Path(tmp), args.seed)
        try:
            bundles = []
            for dataset, arch, width in MODELS:
                print(f"training {dataset} {arch} width {width:g}, int8 ...", file=sys.stderr)
                bundles.append((dataset, hub.int8_bundle(dataset, arch, width, args.epochs)))
            for dataset, bundle in bundles:
                print(f"measuring overhead on {bundle.name} ...", file=sys.stderr)
                rows.append(overhead(bundle, hub.raw_test(dataset), args.samples, args.threads))
            print("measuring idle RSS ...", file=sys.stderr)
            for row, (_, bundle) in zip(rows, bundles, strict=True):
                rss[row["model"]] = idle_rss(bundle)
        finally:
            hub.database.dispose()
    mib = 1024 * 1024
    main = rows[0]
    small = rss[rows[-1]["model"]]
    return {
        "overhead": rows,
        "idle_rss": rss,
        "targets": [
            target(
                "agent path / bare invoke, median",
                main["ratio"],
                1.10,
                main["ratio"] <= 1.10,
                f"{main['ratio']:.3f}x ({main['agent_median_us']:.1f} us vs "
                f"{main['bare_median_us']:.1f} us) on {main['model']}",
            ),
            target(
                "idle agent RSS, small int8 model loaded (MB)",
                small["rss_bytes"] / mib,
                80.0,
                small["rss_bytes"] < 80 * mib and not small["heavy_modules"],
                f"{small['rss_bytes'] / mib:.1f} MiB with {rows[-1]['model']}",
            ),
        ],
    }


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    rows = document["overhead"]
    main, small = rows[0], rows[-1]
    mib = 1024 * 1024
    lines = [
        "# Agent: runtime overhead and idle footprint",
        "",
        f"Measured {meta['when']} on {meta['machine']}, {meta['cores']} cores, Python "
        f"{meta['python']}: `{meta['command']}` ({meta['seconds']:.0f} s).",
        "",
        "## Targets",
        "",
        "| target | threshold | measured | met |",
        "|---|---:|---|:---:|",
    ]
    for t in document["targets"]:
        lines.append(
            f"| {t['name']} | {t['threshold']:g} | {t['text']} | {'yes' if t['met'] else 'NO'} |"
        )
    lines += [
        "",
        "## Per-sample time, same run, same samples, alternating blocks of "
        f"{BLOCK} ({main['samples_per_side']} per side)",
        "",
        "*bare*: `Interpreter.invoke()` alone on pre-quantized inputs. *agent*: "
        "`runtime.infer(raw)` (checks, feature rule, quantize, invoke, dequantize, argmax). "
        "*own*: the runtime's `latency_s`.",
        "",
        "| model | bytes | runtime | threads | bare median us | agent median us | own "
        "median us | ratio | agent p90 us |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} {row['model_input_shape']} | {row['model_bytes']:,} | "
            f"{row['runtime']} | {row['threads']} | {row['bare_median_us']:.1f} | "
            f"{row['agent_median_us']:.1f} | {row['agent_own_latency_median_us']:.1f} | "
            f"{row['ratio']:.3f} | {row['agent_p90_us']:.1f} |"
        )
    lines += [
        "",
        f"The target is judged on the first row. The agent's cost outside invoke is about "
        f"{small['overhead_us']:.0f} us per sample on the tiny model (last row) and "
        f"{main['overhead_us']:.0f} us on the first: after a large invoke the Python code "
        "around it runs with cold caches (a separate check found the invoke inside "
        "`infer` as fast as a bare one, and checks, feature rule, quantization and "
        "dequantization about 3x slower than after a tiny invoke).",
        "",
        "## Idle RSS",
        "",
        "A fresh process imports the agent (daemon, link, protocol, sketches, runtime), loads "
        "the bundle, runs one sample and idles 1 s. The target is judged on the small int8 "
        "model (the last row).",
        "",
        "| bundle | RSS after imports MiB | idle RSS MiB | peak MiB | heavy modules |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in document["idle_rss"].items():
        lines.append(
            f"| {name} | {row['rss_imports_bytes'] / mib:.1f} | {row['rss_bytes'] / mib:.1f} | "
            f"{row['hwm_bytes'] / mib:.1f} | {', '.join(row['heavy_modules']) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Writes bench/results/agent.json and agent.md.",
    )
    parser.add_argument("--samples", type=int, default=3000, help="timed samples per side")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    document = run(args)
    command = "python bench/agent.py" + "".join(
        f" --{k} {v}"
        for k, v in (("samples", args.samples), ("threads", args.threads))
        if v != parser.get_default(k)
    )
    document["meta"] = run_meta(command, time.perf_counter() - started, seed=args.seed)
    out: Path = args.out
    write_and_report(out, "agent", document, markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
