"""Telemetry windows: sketches against the reference, window bounds, the wire document."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from device_agent.errors import ProtocolError
from device_agent.protocol import MAX_PAYLOAD_BYTES, Channel, decode, encode
from device_agent.sketch import CONFIDENCE_EDGES, ReferenceStats, bin_counts
from device_agent.telemetry import ShadowResult, TelemetryWindow, WindowAggregator


@dataclass
class FakePrediction:
    """A stand-in with the fields of runtime.Prediction (the runtime is tested elsewhere)."""

    probabilities: np.ndarray
    label: int
    confidence: float
    latency_s: float
    model_inputs: np.ndarray


def prediction(
    model_inputs: np.ndarray, probabilities: list[float], latency_s: float = 0.001
) -> FakePrediction:
    p = np.asarray(probabilities, dtype=np.float32)
    return FakePrediction(p, int(p.argmax()), float(p.max()), latency_s, model_inputs)


@pytest.fixture
def reference() -> ReferenceStats:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), size=500)
    return ReferenceStats.from_features(x, bins=8).with_outputs(probs)


def test_window_counts_features_classes_and_confidence_in_the_reference_bins(
    reference: ReferenceStats,
) -> None:
    rng = np.random.default_rng(1)
    inputs = rng.normal(loc=0.5, size=(50, 4)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), size=50)
    latencies = rng.uniform(0.001, 0.003, size=50)
    agg = WindowAggregator("dev-1", "m-1", reference, window_samples=50, start_ts=100.0)
    for x, p, lat in zip(inputs, probs, latencies, strict=True):
        agg.add(prediction(x, list(p), float(lat)), x)
    assert agg.due(101.0)
    window = agg.close_window(101.0)

    assert window.samples == 50 and window.seq == 0
    assert (window.start_ts, window.end_ts) == (100.0, 101.0)
    assert window.feature_counts == reference.count_features(inputs)
    assert window.class_counts == np.bincount(probs.argmax(axis=1), minlength=3).tolist()
    expected_conf = bin_counts(probs.astype(np.float32).max(axis=1), CONFIDENCE_EDGES)
    assert window.confidence_counts == expected_conf.tolist()
    expected_ms = np.percentile(latencies * 1000, [50, 95, 99])
    assert list(window.latency_ms) == ["p50", "p95", "p99"]
    assert np.allclose(
        [window.latency_ms[k] or 0.0 for k in ("p50", "p95", "p99")], expected_ms, atol=1e-3
    )
    assert window.errors == {} and window.shadow is None and window.raw_samples == []
    assert window.rss_bytes is not None and window.rss_bytes > 10_000_000
    assert window.cpu_percent is not None and window.cpu_percent >= 0


def test_image_inputs_are_sketched_like_the_reference() -> None:
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(40, 8, 8, 1)).astype(np.float32)
    reference = ReferenceStats.from_features(images, bins=4)
    agg = WindowAggregator("dev-1", "m-1", reference, window_samples=1000, start_ts=0.0)
    for image in images[:10]:
        agg.add(prediction(image, [0.2, 0.8]), image)
    window = agg.close_window(1e9)
    assert window.end_ts == 1e9
    assert window.feature_counts == reference.count_features(images[:10])
    assert len(window.feature_counts) == 16 and sum(window.feature_counts[0]) == 10


def test_a_window_closes_at_its_sample_count_or_its_age_whichever_comes_first() -> None:
    x = np.zeros(2, dtype=np.float32)
    agg = WindowAggregator("dev-1", "m", None, window_samples=3, window_seconds=10.0, start_ts=0.0)
    agg.add(prediction(x, [1.0, 0.0]), x)
    assert not agg.due(5.0)
    assert agg.due(10.0)  # by age, with one sample
    assert agg.close_window(10.0).samples == 1
    for _ in range(3):
        agg.add(prediction(x, [1.0, 0.0]), x)
    assert agg.due(10.5)  # by count, well before its age
    window = agg.close_window(10.5)
    assert (window.start_ts, window.end_ts, window.samples) == (10.0, 10.5, 3)
    assert agg.samples == 0


def test_an_empty_window_is_never_due_and_idle_time_is_not_reported() -> None:
    x = np.zeros(2, dtype=np.float32)
    agg = WindowAggregator("dev-1", "m", None, window_seconds=10.0, start_ts=0.0)
    assert not agg.due(50.0)  # nothing seen: starts over at 50
    agg.add(prediction(x, [0.0, 1.0]), x)
    assert not agg.due(55.0)
    assert agg.due(60.0)
    assert agg.close_window(60.0).start_ts == 50.0


def test_errors_are_counted_and_without_a_reference_no_features_are_sketched() -> None:
    x = np.zeros(3, dtype=np.float32)
    agg = WindowAggregator("dev-1", "m", None, window_samples=10)
    agg.add_error("input_shape")
    agg.add_error("input_shape")
    agg.add_error("nan")
    agg.add(prediction(x, [0.1, 0.15, 0.75]), x, error="slow")
    window = agg.close_window(2e9)
    assert window.errors == {"input_shape": 2, "nan": 1, "slow": 1}
    assert window.samples == 1 and window.feature_counts == []
    assert window.class_counts == [0, 0, 1]
    assert window.confidence_counts == [0] * 7 + [1, 0, 0]  # 0.75 is in [0.7, 0.8)


def test_inputs_that_do_not_match_the_reference_are_counted_not_fatal(
    reference: ReferenceStats,
) -> None:
    agg = WindowAggregator("dev-1", "m", reference, window_samples=10)
    wrong = np.zeros(5, dtype=np.float32)
    agg.add(prediction(wrong, [0.5, 0.5]), wrong)
    window = agg.close_window(2e9)
    assert window.errors == {"feature_mismatch": 1}
    assert window.samples == 1 and sum(window.feature_counts[0]) == 0


def test_raw_samples_are_bounded_per_window_uniform_and_seeded() -> None:
    def run(seed: int) -> list[list[float]]:
        agg = WindowAggregator("d", "m", None, window_samples=200, raw_sample_rate=5, seed=seed)
        for i in range(200):
            x = np.full(2, float(i), dtype=np.float32)
            agg.add(prediction(x, [1.0]), x)
        return agg.close_window(2e9).raw_samples

    first = run(0)
    assert len(first) == 5 and first == run(0)
    assert first != run(1)
    assert any(row[0] >= 5 for row in first)  # not just the first five
    agg = WindowAggregator("d", "m", None, window_samples=10)
    agg.add(prediction(np.zeros(1), [1.0]), np.zeros(1))
    assert agg.close_window(2e9).raw_samples == []  # raw_sample_rate 0: none kept


def test_raw_samples_are_cut_so_the_window_fits_in_one_payload() -> None:
    agg = WindowAggregator("d", "m", None, window_samples=100, raw_sample_rate=100)
    for _ in range(100):
        x = np.random.default_rng(0).normal(size=1000)
        agg.add(prediction(x, [1.0]), x)
    window = agg.close_window(2e9)
    window.seq = 1
    assert 0 < len(window.raw_samples) < 100
    assert window.errors["raw_samples_truncated"] >= 1
    assert len(encode(window)) <= MAX_PAYLOAD_BYTES


def test_shadow_reports_agreement_samples_and_the_challengers_latency() -> None:
    x = np.zeros(2, dtype=np.float32)
    agg = WindowAggregator("d", "champ", None, window_samples=100)
    for i in range(10):
        shadow = ShadowResult("chall", agreed=i < 7, latency_s=0.002)
        agg.add(prediction(x, [1.0, 0.0], latency_s=0.001), x, shadow=shadow)
    window = agg.close_window(2e9)
    assert window.shadow == {
        "model_id": "chall",
        "agreement": 0.7,
        "samples": 10,
        "latency_ms": {"p50": 2.0, "p95": 2.0, "p99": 2.0},
    }
    assert window.latency_ms["p50"] == 1.0
    agg.add(prediction(x, [1.0, 0.0]), x)
    assert agg.close_window(2e9 + 1).shadow is None  # no challenger in this window


def test_window_round_trips_through_the_wire_keeping_unknown_fields() -> None:
    agg = WindowAggregator("dev-7", "m-1", None, window_samples=5, raw_sample_rate=1)
    x = np.array([1.5, -2.0], dtype=np.float32)
    agg.add(prediction(x, [0.3, 0.7]), x, shadow=ShadowResult("m-2", True, 0.001))
    window = agg.close_window(2e9)
    window.extra = {"firmware": "1.2.3"}
    payload = window.payload_factory(lambda: 4)(17)
    decoded = decode(Channel.TELEMETRY, payload)
    assert isinstance(decoded, TelemetryWindow)
    assert decoded.seq == 17 and decoded.dropped_windows == 4
    assert decoded.extra == {"firmware": "1.2.3"} and decoded.raw_samples == [[1.5, -2.0]]
    assert decoded.to_dict() == json.loads(payload)
    assert window.seq == 0  # the factory numbers a copy


def _valid() -> dict[str, Any]:
    return TelemetryWindow("d-1", "m", seq=3, start_ts=1.0, end_ts=2.0, samples=4).to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq": 0}, "'seq' must be at least 1"),
        ({"seq": True}, "'seq' must be int, got a boolean"),
        ({"samples": -1}, "'samples' must be a count"),
        ({"device_id": "a/b"}, "device id 'a/b' is invalid"),
        ({"end_ts": 0.5}, "end_ts 0.5 is before start_ts 1.0"),
        ({"feature_counts": [[1, -2]]}, "'feature_counts' holds -2"),
        ({"class_counts": "many"}, "'class_counts' must be a list"),
        ({"latency_ms": {"p50": "fast"}}, "'latency_ms.p50' must be a finite number"),
        ({"errors": {"nan": 1.5}}, "'errors.nan' must be a count"),
        ({"raw_samples": [[1, "x"]]}, "'raw_samples' holds 'x'"),
        ({"shadow": [1]}, "'shadow' must be an object or null"),
        ({"dropped_windows": -3}, "'dropped_windows' must be a count"),
    ],
)
def test_malformed_windows_are_refused_naming_the_field(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TelemetryWindow.from_dict({**_valid(), **change})
    with pytest.raises(ProtocolError, match="missing field 'model_id'"):
        TelemetryWindow.from_dict({k: v for k, v in _valid().items() if k != "model_id"})


def test_nan_on_the_wire_is_refused() -> None:
    payload = json.dumps(_valid()).replace('"end_ts": 2.0', '"end_ts": NaN').encode()
    with pytest.raises(ProtocolError, match="NaN is not a number"):
        decode(Channel.TELEMETRY, payload)


def test_bad_aggregator_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window_samples or window_seconds"):
        WindowAggregator("d", "m", None)
    with pytest.raises(ValueError, match="window_samples must be at least 1"):
        WindowAggregator("d", "m", None, window_samples=0)
    with pytest.raises(ProtocolError, match="device id"):
        WindowAggregator("bad/id", "m", None, window_samples=1)
