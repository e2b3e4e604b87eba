"""Drift detection figures: false alarms on unshifted held-out data, detection under shifts.

For the digits dataset (small CNN) and aeon's BasicMotions (1D CNN), a model is trained and
registered here through the same services the CLI uses (``TrainService``, in a temporary data
dir); the release's reference is the one its model card carries (feature histograms from the
training split, output histograms from the validation split). Telemetry windows are made the
way the device makes them: a ``WindowAggregator`` is fed the model's predictions on held-out
samples (the test split, never the samples the reference was made from), one window per
draw of ``n`` samples; windows up to the size of the split draw without replacement, larger
ones with replacement.

  1. False alarms: ``--windows`` unshifted windows per dataset and window size (25, 50, 100,
     200 samples), each window tested on its own. Target: at most 1 % with the default
     ``DriftConfig``.
  2. Detection: the share of ``--detect-windows`` windows flagged, against samples per
     window, for shifts of the raw inputs: digits -- an intensity gain, rotations, a
     one-pixel translation; BasicMotions -- a gain and an offset of every sensor channel.
  3. Baselines on the same windows: the output-only test (chi-square and KS on the class
     and confidence histograms alone: black-box shift detection), the ``PSI > 0.2`` rule on
     every histogram, and, for the time series, the same tests with the pooled counts
     taken as independent samples (no effective sample size).

Results go to bench/results/drift.json and drift.md (written atomically).

    python bench/drift.py [--quick] [--seed 0] [--windows 1000] [--detect-windows 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _results import run_meta, targets_table, write_and_report

from device_agent.sketch import ReferenceStats
from device_agent.telemetry import TelemetryWindow, WindowAggregator
from edgeops.data import DatasetService
from edgeops.db import Database
from edgeops.monitor.drift import DriftConfig, WindowAggregate, aggregate_windows, detect_drift
from edgeops.registry import Registry
from edgeops.store import ArtifactStore

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (25, 50, 100, 200)
TARGET_FALSE_ALARMS = 0.01

DETECTORS: dict[str, DriftConfig] = {
    "default (chi2 + KS, all histograms, Holm)": DriftConfig(),
    "outputs only (chi2 + KS on classes, confidence)": DriftConfig(
        targets=("classes", "confidence")
    ),
    "PSI > 0.2 rule (all histograms)": DriftConfig(tests=("psi",)),
}
NAIVE = "pooled counts as samples (no effective size)"


@dataclass(frozen=True)
class Prediction:
    """What the aggregator reads of one prediction (device_agent.telemetry.PredictionLike)."""

    probabilities: np.ndarray
    label: int
    confidence: float
    latency_s: float
    model_inputs: np.ndarray


@dataclass
class Case:
    """One dataset's trained model, its card's reference, and its held-out raw samples."""

    name: str
    model_ref: str
    model: Any
    reference: ReferenceStats
    rule: Any
    x_raw: np.ndarray
    y: np.ndarray
    x_train_raw: np.ndarray
    accuracy: float = 0.0
    pooled: bool = False


class Bench:
    def __init__(self, root: Path, seed: int) -> None:
        from edgeops.train.service import TrainService

        self.database = Database(f"sqlite:///{root / 'edgeops.db'}")
        self.database.upgrade()
        store = ArtifactStore(root / "artifacts")
        self.datasets = DatasetService(self.database, store)
        self.registry = Registry(self.database, store)
        self.trainer = TrainService(self.datasets, self.registry)
        self.seed = seed
        self.log: list[str] = []

    def say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        self.log.append(line)

    def case(self, dataset: str, arch: str, epochs: int) -> Case:
        from edgeops.train.trainer import load_keras

        started = time.perf_counter()
        view = self.trainer.train(
            dataset, arch, epochs=epochs, seed=self.seed, progress=False, evaluate_on_runtime=False
        )
        card = view.card or {}
        arrays = self.datasets.load(view.dataset_version)
        case = Case(
            name=dataset,
            model_ref=view.ref,
            model=load_keras(self.registry.load_artifact(view.id)),
            reference=ReferenceStats.from_dict(card["reference"]),
            rule=arrays.feature_rule,
            x_raw=np.asarray(arrays.x_test),
            y=np.asarray(arrays.y_test),
            x_train_raw=np.asarray(arrays.x_train),
            pooled=arrays.feature_rule.apply(arrays.x_test[:1]).ndim == 3,
        )
        case.accuracy = float(np.mean(self.predict(case, case.x_raw)[0].argmax(axis=1) == case.y))
        self.say(
            f"trained {view.ref} ({arch}, {epochs} epochs) in {time.perf_counter() - started:.1f}"
            f" s; held-out accuracy {case.accuracy:.3f} on {len(case.y)} test samples"
        )
        return case

    @staticmethod
    def predict(case: Case, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from edgeops.train.trainer import predict

        inputs = case.rule.apply(x_raw)
        return predict(case.model, inputs), inputs


class Windows:
    """Telemetry windows of one (possibly shifted) held-out set, made by the device's code."""

    def __init__(self, case: Case, x_raw: np.ndarray, rng: np.random.Generator) -> None:
        probabilities, inputs = Bench.predict(case, x_raw)
        self.case = case
        self.inputs = inputs
        self.probabilities = probabilities
        self.rng = rng
        self.aggregator = WindowAggregator(
            "bench-device", case.model_ref, case.reference, window_samples=1, start_ts=0.0
        )

    def draw(self, size: int) -> WindowAggregate:
        pool = len(self.inputs)
        index = self.rng.choice(pool, size=size, replace=size > pool)
        aggregator = self.aggregator
        aggregator.window_samples = size
        for i in index:
            p = self.probabilities[i]
            label = int(p.argmax())
            aggregator.add(
                Prediction(p, label, float(p[label]), 0.001, self.inputs[i]), np.empty(0)
            )
        window: TelemetryWindow = aggregator.close_window(1.0)
        return aggregate_windows([window])


def naive(window: WindowAggregate) -> WindowAggregate:
    """The window as a test that takes every pooled count for an independent sample sees it."""
    pooled = max(sum(row) for row in window.feature_counts)
    return WindowAggregate(
        samples=pooled,
        feature_counts=window.feature_counts,
        class_counts=window.class_counts,
        confidence_counts=window.confidence_counts,
    )


def detectors(case: Case) -> dict[str, Callable[[WindowAggregate], str]]:
    def verdict(config: DriftConfig, pooled_as_samples: bool = False) -> Callable[..., str]:
        def test(window: WindowAggregate) -> str:
            seen = naive(window) if pooled_as_samples else window
            return detect_drift(seen, case.reference, config).verdict

        return test

    chosen = {name: verdict(config) for name, config in DETECTORS.items()}
    if case.pooled:
        chosen[NAIVE] = verdict(DriftConfig(), pooled_as_samples=True)
    return chosen


# -- shifts of the raw inputs ------------------------------------------------------------------


def digits_shifts() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    from scipy import ndimage  # type: ignore[import-untyped]

    def gain(g: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda x, _train: np.asarray(np.clip(x * g, 0.0, 16.0))

    def rotate(angle: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        def apply(x: np.ndarray, _train: np.ndarray) -> np.ndarray:
            images = x.reshape(-1, 8, 8)
            turned = ndimage.rotate(images, angle, axes=(1, 2), reshape=False, order=1)
            return np.asarray(np.clip(turned, 0.0, 16.0)).reshape(len(x), 64)

        return apply

    def translate(x: np.ndarray, _train: np.ndarray) -> np.ndarray:
        images = x.reshape(-1, 8, 8)
        moved = ndimage.shift(images, (0, 0, 1), order=0, mode="constant", cval=0.0)
        return np.asarray(moved).reshape(len(x), 64)

    return {
        "intensity x0.9": gain(0.9),
        "intensity x0.75": gain(0.75),
        "intensity x0.5": gain(0.5),
        "rotated 10 deg": rotate(10.0),
        "rotated 20 deg": rotate(20.0),
        "moved 1 px right": translate,
    }


def motions_shifts() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    def gain(g: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda x, _train: x * g

    def offset(k: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        def apply(x: np.ndarray, train: np.ndarray) -> np.ndarray:
            std = train.std(axis=(0, 2), keepdims=True)  # per channel, raw units
            return np.asarray(x + k * std)

        return apply

    return {
        "gain x1.25": gain(1.25),
        "gain x1.5": gain(1.5),
        "gain x2": gain(2.0),
        "offset +0.25 sd": offset(0.25),
        "offset +0.5 sd": offset(0.5),
        "offset +1 sd": offset(1.0),
    }


# -- measuring ---------------------------------------------------------------------------------


def upper_bound(alarms: int, windows: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen as ``alarms`` of ``windows``."""
    from scipy import stats

    if alarms >= windows:
        return 1.0
    return float(stats.beta.ppf(confidence, alarms + 1, windows - alarms))


def rates(
    source: Windows, tests: dict[str, Callable[[WindowAggregate], str]], windows: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per detector and window size: windows flagged, insufficient, and their share."""
    counts = {name: {n: {"drift": 0, "insufficient": 0} for n in SIZES} for name in tests}
    for n in SIZES:
        for _ in range(windows):
            window = source.draw(n)
            for name, test in tests.items():
                verdict = test(window)
                if verdict != "no_drift":
                    counts[name][n][verdict] += 1
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, by_size in counts.items():
        out[name] = {}
        for n, c in by_size.items():
            tested = windows - c["insufficient"]
            out[name][str(n)] = {
                "windows": windows,
                "flagged": c["drift"],
                "insufficient": c["insufficient"],
                "rate": c["drift"] / tested if tested else None,
                "upper95": upper_bound(c["drift"], tested) if tested else None,
            }
    return out


def measure_case(
    bench: Bench,
    case: Case,
    shifts: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]],
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> dict[str, Any]:
    tests = detectors(case)
    started = time.perf_counter()
    unshifted = rates(Windows(case, case.x_raw, rng), tests, args.windows)
    bench.say(
        f"{case.name}: {args.windows} unshifted windows x {len(SIZES)} sizes in "
        f"{time.perf_counter() - started:.1f} s"
    )
    detection: dict[str, Any] = {}
    for shift, apply in shifts.items():
        started = time.perf_counter()
        shifted = np.asarray(apply(case.x_raw.astype(np.float64), case.x_train_raw), np.float32)
        source = Windows(case, shifted, rng)
        accuracy = float(np.mean(source.probabilities.argmax(axis=1) == case.y))
        detection[shift] = {
            "accuracy": accuracy,
            "rates": rates(source, tests, args.detect_windows),
        }
        bench.say(
            f"{case.name} {shift}: accuracy {accuracy:.3f}, {time.perf_counter() - started:.1f} s"
        )
    ref = case.reference
    return {
        "model": case.model_ref,
        "held_out_samples": len(case.y),
        "held_out_accuracy": case.accuracy,
        "features": ref.num_features,
        "feature_bins": [len(c) for c in ref.feature_counts],
        "reference_feature_values": sum(ref.feature_counts[0]),
        "reference_outputs": sum(ref.class_counts or []),
        "pooled_time_series": case.pooled,
        "false_alarms": unshifted,
        "detection": detection,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        bench = Bench(Path(tmp), args.seed)
        try:
            digits = bench.case("digits", "cnn", 4 if args.quick else 15)
            motions = bench.case("basic_motions", "cnn1d", 40 if args.quick else 100)
            cases = {
                "digits": measure_case(bench, digits, digits_shifts(), args, rng),
                "basic_motions": measure_case(bench, motions, motions_shifts(), args, rng),
            }
        finally:
            bench.database.dispose()
    default = next(iter(DETECTORS))
    targets = []
    for name, case in cases.items():
        for n in SIZES:
            cell = case["false_alarms"][default][str(n)]
            rate = cell["rate"]
            targets.append(
                {
                    "target": f"{name}: false alarms per window <= 1% with the defaults, "
                    f"{n} samples per window",
                    "value": rate,
                    "threshold": TARGET_FALSE_ALARMS,
                    "met": rate is not None and rate <= TARGET_FALSE_ALARMS,
                    "text": _rate(cell),
                }
            )
    return {
        "sizes": list(SIZES),
        "detectors": {name: c.to_dict() for name, c in DETECTORS.items()},
        "cases": cases,
        "targets": targets,
        "log": bench.log,
    }


# -- the report --------------------------------------------------------------------------------


def _rate(cell: dict[str, Any]) -> str:
    if cell["rate"] is None:
        return "insufficient"
    text = f"{cell['flagged']}/{cell['windows'] - cell['insufficient']} = {cell['rate']:.1%}"
    return text + f" (<= {cell['upper95']:.1%})"


def _share(cell: dict[str, Any]) -> str:
    return "insufficient" if cell["rate"] is None else f"{cell['rate']:.2f}"


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    sizes = document["sizes"]
    head = " | ".join(f"n = {n}" for n in sizes)
    rule = "|---|---|" + "---:|" * len(sizes)
    lines = [
        "# Drift detection figures",
        "",
        f"Measured {meta['when']} on {meta['machine']}, {meta['cores']} cores, Python "
        f"{meta['python']}: `{meta['command']}` ({meta['mode']}; {meta['seconds']:.0f} s). "
        "Windows are made by the device's `WindowAggregator` from the model's predictions on "
        "the held-out test split; n is the samples per window.",
        "",
        "## Targets",
        "",
        *targets_table(document["targets"]),
    ]
    lines += [
        "",
        "## False alarms on unshifted held-out windows",
        "",
        "Flagged windows / windows tested = rate (one-sided 95 % Clopper-Pearson upper bound).",
        "",
        f"| dataset | detector | {head} |",
        rule,
    ]
    for name, case in document["cases"].items():
        for detector, by_size in case["false_alarms"].items():
            cells = " | ".join(_rate(by_size[str(n)]) for n in sizes)
            lines.append(f"| {name} | {detector} | {cells} |")
    lines += [
        "",
        "## Detection probability under shifts",
        "",
        "Share of shifted windows flagged; the model's held-out accuracy under the shift in "
        "brackets.",
        "",
        f"| dataset, shift | detector | {head} |",
        rule,
    ]
    for name, case in document["cases"].items():
        lines.append(
            f"| {name}, none | (held-out accuracy {case['held_out_accuracy']:.3f}) |"
            + " |" * len(sizes)
        )
        for shift, result in case["detection"].items():
            for detector, by_size in result["rates"].items():
                cells = " | ".join(_share(by_size[str(n)]) for n in sizes)
                lines.append(
                    f"| {name}, {shift} ({result['accuracy']:.3f}) | {detector} | {cells} |"
                )
    lines += ["", "## The cases", ""]
    for name, case in document["cases"].items():
        lines.append(
            f"- {name}: model {case['model']}, {case['held_out_samples']} held-out samples, "
            f"{case['features']} features ({min(case['feature_bins'])}-"
            f"{max(case['feature_bins'])} bins), reference of {case['reference_feature_values']}"
            f" values per feature (training split) and {case['reference_outputs']} outputs "
            f"(validation split){'; time series, pooled' if case['pooled_time_series'] else ''}."
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes bench/results/drift.json and drift.md.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs and windows")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--windows", type=int, default=None, help="unshifted windows per size (default 1000)"
    )
    parser.add_argument(
        "--detect-windows",
        type=int,
        default=None,
        help="shifted windows per shift and size (default 100)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if args.windows is None:
        args.windows = 200 if args.quick else 1000
    if args.detect_windows is None:
        args.detect_windows = 40 if args.quick else 100
    if args.windows < 1 or args.detect_windows < 1:
        parser.error("--windows and --detect-windows must be at least 1")
    started = time.perf_counter()
    document = run(args)
    command = "python bench/drift.py" + (" --quick" if args.quick else "")
    if args.windows != (200 if args.quick else 1000):
        command += f" --windows {args.windows}"
    if args.detect_windows != (40 if args.quick else 100):
        command += f" --detect-windows {args.detect_windows}"
    document["meta"] = run_meta(
        command,
        time.perf_counter() - started,
        mode="quick: fewer epochs and windows" if args.quick else "full",
        seed=args.seed,
        windows=args.windows,
        detect_windows=args.detect_windows,
    )
    text = markdown(document)
    print(text)
    write_and_report(args.out, "drift", document, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
