"""Drift detection: error rates on unshifted data, power on shifted data, the corrections,
the effective sample size of pooled time series, and refusals of malformed input."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from device_agent.sketch import ReferenceStats
from device_agent.telemetry import WindowAggregator
from edgeops.errors import EdgeOpsError
from edgeops.monitor import (
    DriftConfig,
    DriftError,
    WindowAggregate,
    aggregate_windows,
    detect_drift,
)
from edgeops.monitor.drift import adjust_p_values, ks_binned, psi
from edgeops.rollout import gates

FEATURES = 4
CLASSES = 3


def outputs(rng: np.random.Generator, n: int, tilt: float = 0.0) -> np.ndarray:
    """Softmax outputs of a stand-in classifier; ``tilt`` favours class 0."""
    logits = rng.normal(size=(n, CLASSES))
    logits[:, 0] += tilt
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


@pytest.fixture(scope="module")
def reference() -> ReferenceStats:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, FEATURES))
    return ReferenceStats.from_features(x).with_outputs(outputs(rng, 1000))


def window(
    reference: ReferenceStats,
    rng: np.random.Generator,
    n: int,
    *,
    mean_shift: float = 0.0,
    tilt: float = 0.0,
) -> WindowAggregate:
    """A window of ``n`` fresh samples (never the reference's own), summed as the device does."""
    x = rng.normal(size=(n, FEATURES))
    x[:, 0] += mean_shift
    seen = ReferenceStats.from_features(x).with_outputs(outputs(rng, n, tilt))
    assert seen.class_counts is not None and seen.confidence_counts is not None
    return WindowAggregate(
        samples=n,
        feature_counts=reference.count_features(x),
        class_counts=seen.class_counts,
        confidence_counts=seen.confidence_counts,
    )


def test_unshifted_windows_rarely_raise_an_alarm(reference: ReferenceStats) -> None:
    rng = np.random.default_rng(1)
    verdicts = [detect_drift(window(reference, rng, 50), reference).verdict for _ in range(300)]
    assert set(verdicts) <= {"drift", "no_drift"}
    # family-wise alpha 0.01: about 3 alarms in 300 at most; 7 or more has probability < 1 %
    assert verdicts.count("drift") <= 6


def test_a_shifted_feature_is_found_and_named(reference: ReferenceStats) -> None:
    rng = np.random.default_rng(2)
    report = detect_drift(window(reference, rng, 200, mean_shift=0.6), reference)
    assert report.verdict == "drift" and report.drift
    assert report.drifted_features == ["feature:0"]
    assert report.drifted_outputs == []
    chi2 = next(t for t in report.tests if t.target == "feature:0" and t.test == "chi2")
    assert chi2.p_adjusted is not None and chi2.p_adjusted <= 0.01
    assert chi2.n_window == 200 and chi2.n_reference == 2000
    assert report.psi["feature:0"] > report.psi["feature:1"]


def test_a_shift_of_the_outputs_alone_is_found(reference: ReferenceStats) -> None:
    rng = np.random.default_rng(3)
    report = detect_drift(window(reference, rng, 300, tilt=1.5), reference)
    assert report.verdict == "drift"
    assert "classes" in report.drifted_outputs
    assert report.drifted_features == []
    # classes have no order: no KS test on them
    assert {t.test for t in report.tests if t.target == "classes"} == {"chi2"}


def test_holm_and_bonferroni_on_known_p_values() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Bonferroni: m p; Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust_p_values([0.5, 0.9], "bonferroni") == [1.0, 1.0]
    assert adjust_p_values([], "holm") == []
    # at alpha 0.03 Holm rejects two, Bonferroni one
    assert sum(v <= 0.03 for v in adjust_p_values(p, "holm")) == 2
    assert sum(v <= 0.03 for v in adjust_p_values(p, "bonferroni")) == 1
    with pytest.raises(DriftError, match="correction"):
        adjust_p_values(p, "fdr")
    with pytest.raises(DriftError, match=r"\[0, 1\]"):
        adjust_p_values([1.5])


def test_the_report_adjusts_every_p_value_with_the_chosen_correction(
    reference: ReferenceStats,
) -> None:
    rng = np.random.default_rng(4)
    sample = window(reference, rng, 120, mean_shift=0.3)
    for correction in ("holm", "bonferroni"):
        report = detect_drift(sample, reference, DriftConfig(correction=correction))
        raw = [t.p_value for t in report.tests if t.p_value is not None]
        adjusted = [t.p_adjusted for t in report.tests if t.p_value is not None]
        # 4 features x (chi2, KS) + classes (chi2) + confidence (chi2, KS)
        assert len(raw) == 2 * FEATURES + 3
        assert adjusted == pytest.approx(adjust_p_values(raw, correction))
        assert all(
            t.rejected == (t.p_adjusted <= 0.01) for t in report.tests if t.p_adjusted is not None
        )


def test_fewer_samples_than_min_samples_is_insufficient(reference: ReferenceStats) -> None:
    rng = np.random.default_rng(5)
    report = detect_drift(window(reference, rng, 19, mean_shift=3.0), reference)
    assert report.verdict == "insufficient" and not report.drift
    assert report.tests == [] and "min_samples 20" in report.notes[0]
    assert detect_drift(window(reference, rng, 20, mean_shift=3.0), reference).verdict == "drift"
    # a reference of outputs too small to test is skipped, not compared
    thin = ReferenceStats.from_dict({**reference.to_dict(), "class_counts": [3, 4, 5]})
    only_classes = DriftConfig(targets=("classes",))
    report = detect_drift(window(reference, rng, 100), thin, only_classes)
    assert report.verdict == "insufficient"
    assert any("12 effective samples" in note for note in report.notes)


def ar1_series(rng: np.random.Generator, n: int, length: int, shift: float = 0.0) -> np.ndarray:
    """``(n, length, 2)`` strongly autocorrelated series (AR(1), phi 0.95, unit variance)."""
    phi = 0.95
    noise = rng.normal(size=(n, length, 2)) * np.sqrt(1 - phi**2)
    x = np.empty_like(noise)
    x[:, 0] = rng.normal(size=(n, 2))
    for t in range(1, length):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    shifted: np.ndarray = x + shift
    return shifted


def test_pooled_time_series_use_the_samples_not_the_pooled_counts() -> None:
    rng = np.random.default_rng(6)
    length = 50
    reference = ReferenceStats.from_features(ar1_series(rng, 300, length))
    features = ("features",)
    alarms = naive_alarms = 0
    for _ in range(60):
        counts = reference.count_features(ar1_series(rng, 30, length))
        report = detect_drift(
            WindowAggregate(30, counts, [], []), reference, DriftConfig(targets=features)
        )
        assert report.tests[0].n_window == 30 and report.tests[0].n_reference == 300
        alarms += report.drift
        # the same counts, taken for 30 x 50 independent values
        naive = WindowAggregate(30 * length, counts, [], [])
        naive_alarms += detect_drift(naive, reference, DriftConfig(targets=features)).drift
    assert alarms <= 2
    assert naive_alarms >= 30
    shifted = reference.count_features(ar1_series(rng, 100, length, shift=1.0))
    report = detect_drift(WindowAggregate(100, shifted, [], []), reference)
    assert report.drifted_features == ["feature:0", "feature:1"]


def test_empty_bins_and_reference_bins_without_counts() -> None:
    reference = ReferenceStats(feature_edges=[[0.0, 1.0, 2.0]], feature_counts=[[0, 50, 50, 0]])
    same = detect_drift(WindowAggregate(40, [[0, 21, 19, 0]], [], []), reference)
    assert same.verdict == "no_drift"
    chi2 = next(t for t in same.tests if t.test == "chi2")
    assert chi2.df == 1 and chi2.bins == 2
    # values where the reference never had any: merged into the neighbour, and found
    moved = detect_drift(WindowAggregate(40, [[25, 10, 5, 0]], [], []), reference)
    assert moved.verdict == "drift" and moved.drifted_features == ["feature:0"]
    assert all(np.isfinite(t.statistic) for t in moved.tests)
    # one bin holds everything: nothing to compare, never an alarm
    flat = ReferenceStats(feature_edges=[[]], feature_counts=[[100]])
    report = detect_drift(WindowAggregate(40, [[40]], [], []), flat)
    assert report.verdict == "no_drift"
    assert [t.p_value for t in report.tests] == [1.0, 1.0]


def test_ks_on_binned_distributions() -> None:
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.0, 0.5, 0.5])
    gap, p_value = ks_binned(p, q, 100.0, 100.0)
    assert gap == pytest.approx(0.5)
    assert p_value < 1e-8
    assert ks_binned(q, q, 50.0, 50.0) == (0.0, 1.0)


def test_psi_is_shared_with_the_rollout_gates() -> None:
    assert gates.psi is psi
    assert psi([90, 10], [50, 50]) == pytest.approx(0.4 * np.log(9), rel=1e-3)


def test_windows_from_the_device_aggregate_and_report_as_json(reference: ReferenceStats) -> None:
    @dataclass
    class Prediction:
        probabilities: np.ndarray
        label: int
        confidence: float
        latency_s: float
        model_inputs: np.ndarray

    rng = np.random.default_rng(7)
    aggregator = WindowAggregator("dev-1", "m-1", reference, window_samples=30, start_ts=0.0)
    windows = []
    for _ in range(3):
        x, probs = rng.normal(size=(30, FEATURES)), outputs(rng, 30)
        for row, p in zip(x, probs, strict=True):
            label = int(p.argmax())
            aggregator.add(Prediction(p, label, float(p[label]), 0.001, row), row)
        windows.append(aggregator.close_window(1.0))
    total = aggregate_windows([windows[0], windows[1].to_dict(), windows[2]])
    assert total.samples == 90 and total.windows == 3 and total.model_id == "m-1"
    assert total.feature_counts == (np.sum([w.feature_counts for w in windows], axis=0).tolist())
    assert sum(total.class_counts) == 90
    report = detect_drift(total, reference.to_dict())
    assert report.verdict == "no_drift"
    document = json.loads(json.dumps(report.to_dict()))
    assert document["verdict"] == "no_drift"
    assert document["config"]["correction"] == "holm"
    assert {t["test"] for t in document["tests"]} == {"chi2", "ks"}
    assert set(document["psi"]) == {f"feature:{f}" for f in range(FEATURES)} | {
        "classes",
        "confidence",
    }


def test_the_psi_rule_flags_what_exceeds_its_threshold(reference: ReferenceStats) -> None:
    rng = np.random.default_rng(8)
    sample = window(reference, rng, 400, mean_shift=1.0)
    report = detect_drift(sample, reference, DriftConfig(tests=("psi",), psi_threshold=0.2))
    assert report.drifted_features == ["feature:0"]
    assert all(t.p_value is None for t in report.tests)
    lenient = DriftConfig(tests=("psi",), psi_threshold=100.0)
    assert detect_drift(sample, reference, lenient).verdict == "no_drift"


def test_mismatched_lengths_are_refused_naming_the_histogram(reference: ReferenceStats) -> None:
    rng = np.random.default_rng(9)
    good = window(reference, rng, 50)
    short = [list(row) for row in good.feature_counts]
    short[2] = short[2][:-1]
    bins = len(good.feature_counts[2])
    with pytest.raises(DriftError, match=f"feature:2: the window has {bins - 1} bins, the "):
        detect_drift(WindowAggregate(50, short, good.class_counts, []), reference)
    with pytest.raises(DriftError, match=f"3 feature histograms, the reference {FEATURES}"):
        detect_drift(WindowAggregate(50, short[:3], [], []), reference)
    with pytest.raises(DriftError, match="classes: the window has 4 bins, the reference 3"):
        detect_drift(WindowAggregate(50, good.feature_counts, [1, 1, 1, 47], []), reference)
    named = ReferenceStats(
        feature_edges=[[0.0]], feature_counts=[[10, 10]], feature_names=["temperature"]
    )
    with pytest.raises(DriftError, match="feature:temperature: the window has 3 bins"):
        detect_drift(WindowAggregate(50, [[1, 2, 3]], [], []), named)


def test_malformed_windows_and_references_are_refused(reference: ReferenceStats) -> None:
    with pytest.raises(DriftError, match="no telemetry windows"):
        aggregate_windows([])
    with pytest.raises(DriftError, match="window 1 comes from model 'b'"):
        aggregate_windows([{"model_id": "a", "samples": 1}, {"model_id": "b", "samples": 1}])
    with pytest.raises(DriftError, match=r"window 0: feature_counts\[0\] must be a count"):
        aggregate_windows([{"samples": 5, "feature_counts": [[1, -2]]}])
    with pytest.raises(DriftError, match="window 1: feature 0 has 3 bins"):
        aggregate_windows(
            [
                {"samples": 1, "feature_counts": [[1, 0]]},
                {"samples": 1, "feature_counts": [[1, 0, 0]]},
            ]
        )
    with pytest.raises(DriftError, match="window 0: samples must be a count"):
        aggregate_windows([{"samples": "many"}])
    with pytest.raises(DriftError, match=r"class_counts must be a count .* got -1"):
        WindowAggregate(50, [], [3, -1], [])
    with pytest.raises(DriftError, match="samples must be a count"):
        WindowAggregate(2.5, [], [], [])  # type: ignore[arg-type]
    with pytest.raises(DriftError, match="missing field 'feature_counts'"):
        detect_drift(WindowAggregate(50, [], [], []), {"feature_edges": []})
    # one error type for the whole hub
    assert issubclass(DriftError, EdgeOpsError)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha": 0.0}, "alpha must be a number in"),
        ({"alpha": float("nan")}, "alpha must be a number in"),
        ({"correction": "fdr"}, "correction must be one of holm, bonferroni"),
        ({"min_samples": 0}, "min_samples must be an integer"),
        ({"min_samples": True}, "min_samples must be an integer"),
        ({"psi_threshold": -1}, "psi_threshold must be a positive number"),
        ({"tests": ("chi2", "t")}, "unknown test 't'"),
        ({"tests": ()}, "tests must name at least one"),
        ({"targets": ("weights",)}, "unknown target 'weights'"),
        ({"min_expected": 0}, "min_expected must be a positive number"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(DriftError, match=message):
        DriftConfig(**fields)  # type: ignore[arg-type]


def test_a_config_round_trips_through_json() -> None:
    config = DriftConfig(alpha=0.05, correction="bonferroni", tests=("ks", "chi2"))
    assert config.tests == ("chi2", "ks")
    assert DriftConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(DriftError, match="unknown field"):
        DriftConfig.from_dict({"alpah": 0.1})
    with pytest.raises(DriftError, match="tests must be a list"):
        DriftConfig.from_dict({"tests": "chi2"})
