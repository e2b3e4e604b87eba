"""Quality gates: a wave's field metrics over its soak window against the spec's thresholds.

Pure: :func:`evaluate_gates` takes the spec's :class:`~edgeops.rollout.spec.Gates`, the
telemetry windows the wave's devices sent from the new release since they committed, the
windows they sent from their previous release before they were targeted, how many of the
devices crashed, and the release card's reference class histogram. Each gate is one
:class:`GateResult` with the measured value, the threshold and whether it passed.

Formulas (sums run over the windows of the wave's committed devices):

* ``error_rate = Σ model errors / (Σ samples + Σ errors that produced no prediction)``;
  model errors are the window ``errors`` of the kinds in :data:`MODEL_ERROR_KINDS`,
  ``input`` and ``runtime`` produced no prediction.
* ``crash_rate = crashed devices / committed devices``; a device crashed when, after its
  commit, it reported a health other than ``ok``, rolled back, or failed to load its
  champion (``model_load_failed``).
* ``latency_p95_ratio = p95(new) / p95(previous)``, each the sample-weighted mean of the
  windows' ``latency_ms.p95``.
* ``divergence``: the wave's class histogram ``p`` (Σ ``class_counts``) against the card's
  reference ``q`` (``reference.class_counts``), both normalised after adding
  :data:`EPSILON` to every bin: PSI ``Σ (p_i - q_i) ln(p_i / q_i)``, or Jensen-Shannon (base
  2) ``½ KL(p‖m) + ½ KL(q‖m)``, ``m = (p + q) / 2`` (both from :mod:`edgeops.monitor.drift`,
  which uses the same PSI for drift detection).
* ``shadow_agreement = Σ shadow.agreement * shadow.samples / Σ shadow.samples``.

A gate without data: error rate and divergence fail with no telemetry from the new release
(a release that runs nothing is not healthy); latency passes as ``skipped`` without a
previous-release p95, divergence without a reference histogram, shadow agreement without
shadow data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeops.monitor.drift import EPSILON, js_divergence, psi
from edgeops.rollout.spec import Gates

__all__ = [
    "EPSILON",
    "MODEL_ERROR_KINDS",
    "NO_PREDICTION_KINDS",
    "GateResult",
    "class_histogram",
    "evaluate_gates",
    "js_divergence",
    "psi",
]

MODEL_ERROR_KINDS = ("input", "runtime", "negative_label", "nan_confidence", "feature_mismatch")
NO_PREDICTION_KINDS = ("input", "runtime")


@dataclass(frozen=True)
class GateResult:
    """One gate: ``value`` (None without data) against ``threshold``."""

    name: str
    value: float | None
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "comparison": self.comparison,
            "passed": self.passed,
            "note": self.note,
        }

    def describe(self) -> str:
        shown = "no data" if self.value is None else f"{self.value:.4g}"
        text = f"{self.name} {shown} (must be {self.comparison} {self.threshold:g})"
        return f"{text}: {self.note}" if self.note else text


def _errors(window: Mapping[str, Any], kinds: Sequence[str]) -> int:
    errors = window.get("errors")
    if not isinstance(errors, Mapping):
        return 0
    total = 0
    for kind in kinds:
        value = errors.get(kind)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            total += value
    return total


def _samples(window: Mapping[str, Any]) -> int:
    value = window.get("samples")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _p95(windows: Sequence[Mapping[str, Any]]) -> float | None:
    weighted, weight = 0.0, 0
    for window in windows:
        latency = window.get("latency_ms")
        p95 = latency.get("p95") if isinstance(latency, Mapping) else None
        samples = _samples(window)
        if isinstance(p95, int | float) and math.isfinite(p95) and samples:
            weighted += float(p95) * samples
            weight += samples
    return weighted / weight if weight else None


def class_histogram(windows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Σ ``class_counts`` of ``windows`` (the longest list decides the length)."""
    total: list[int] = []
    for window in windows:
        counts = window.get("class_counts")
        if not isinstance(counts, list):
            continue
        if len(counts) > len(total):
            total.extend([0] * (len(counts) - len(total)))
        for index, count in enumerate(counts):
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                total[index] += count
    return total


def evaluate_gates(
    gates: Gates,
    new_windows: Sequence[Mapping[str, Any]],
    previous_windows: Sequence[Mapping[str, Any]],
    *,
    committed: int,
    crashed: int,
    reference_classes: Sequence[int] | None,
) -> list[GateResult]:
    """Every gate ``gates`` sets, measured (see the module docstring for the formulas)."""
    results: list[GateResult] = []
    samples = sum(_samples(w) for w in new_windows)
    no_telemetry = "no telemetry from the new release yet"
    if gates.max_error_rate is not None:
        errors = sum(_errors(w, MODEL_ERROR_KINDS) for w in new_windows)
        attempts = samples + sum(_errors(w, NO_PREDICTION_KINDS) for w in new_windows)
        rate = errors / attempts if attempts else None
        results.append(
            GateResult(
                "error_rate",
                rate,
                gates.max_error_rate,
                "<=",
                rate is not None and rate <= gates.max_error_rate,
                no_telemetry if rate is None else f"{errors} errors in {attempts} inferences",
            )
        )
    if gates.max_crash_rate is not None:
        rate = crashed / committed if committed else None
        results.append(
            GateResult(
                "crash_rate",
                rate,
                gates.max_crash_rate,
                "<=",
                rate is not None and rate <= gates.max_crash_rate,
                "no committed device" if rate is None else f"{crashed} of {committed} devices",
            )
        )
    if gates.max_latency_p95_ratio is not None:
        new, old = _p95(new_windows), _p95(previous_windows)
        threshold = gates.max_latency_p95_ratio
        if new is None:
            results.append(
                GateResult("latency_p95_ratio", None, threshold, "<=", False, no_telemetry)
            )
        elif old is None or old <= 0:
            results.append(
                GateResult(
                    "latency_p95_ratio",
                    None,
                    threshold,
                    "<=",
                    True,
                    "skipped: no p95 of the previous release",
                )
            )
        else:
            ratio = new / old
            results.append(
                GateResult(
                    "latency_p95_ratio",
                    ratio,
                    threshold,
                    "<=",
                    ratio <= threshold,
                    f"p95 {new:.3g} ms vs {old:.3g} ms",
                )
            )
    if gates.divergence is not None:
        name = f"divergence_{gates.divergence.metric}"
        threshold = gates.divergence.max
        histogram = class_histogram(new_windows)
        if not reference_classes or sum(reference_classes) <= 0:
            results.append(
                GateResult(
                    name, None, threshold, "<=", True, "skipped: the card has no class reference"
                )
            )
        elif sum(histogram) <= 0:
            results.append(GateResult(name, None, threshold, "<=", False, no_telemetry))
        else:
            measure = psi if gates.divergence.metric == "psi" else js_divergence
            value = measure(histogram, reference_classes)
            results.append(
                GateResult(
                    name,
                    value,
                    threshold,
                    "<=",
                    value <= threshold,
                    f"{sum(histogram)} predictions vs the reference",
                )
            )
    if gates.min_shadow_agreement is not None:
        agreed, total = 0.0, 0
        for window in new_windows:
            shadow = window.get("shadow")
            if not isinstance(shadow, Mapping):
                continue
            agreement, count = shadow.get("agreement"), shadow.get("samples")
            if (
                isinstance(agreement, int | float)
                and math.isfinite(agreement)
                and isinstance(count, int)
                and count > 0
            ):
                agreed += float(agreement) * count
                total += count
        threshold = gates.min_shadow_agreement
        if not total:
            results.append(
                GateResult(
                    "shadow_agreement", None, threshold, ">=", True, "skipped: no shadow data"
                )
            )
        else:
            value = agreed / total
            results.append(
                GateResult(
                    "shadow_agreement",
                    value,
                    threshold,
                    ">=",
                    value >= threshold,
                    f"{total} shadow samples",
                )
            )
    return results
