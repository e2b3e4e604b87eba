"""Feature rules: the exact maths, fitting, windows, and lossless documents."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from device_agent.features import FeatureRule, FeatureRuleError, WindowRule


def test_apply_transposes_then_normalises_each_channel_then_reshapes() -> None:
    # one raw sample, channels-first: 2 channels x 3 readings
    rule = FeatureRule(input_shape=(2, 3), offset=[1.0, 10.0], scale=[0.5, 0.1], transpose=(1, 0))
    x = np.array([[[1, 2, 3], [10, 20, 30]]], dtype=np.float64)
    y = rule.apply(x)
    assert rule.model_input_shape == (3, 2)
    assert y.dtype == np.float32 and y.shape == (1, 3, 2)
    f32 = np.float32
    expected = [
        [(f32(1) - f32(1)) * f32(0.5), (f32(10) - f32(10)) * f32(0.1)],
        [(f32(2) - f32(1)) * f32(0.5), (f32(20) - f32(10)) * f32(0.1)],
        [(f32(3) - f32(1)) * f32(0.5), (f32(30) - f32(10)) * f32(0.1)],
    ]
    assert y[0].tolist() == np.array(expected, dtype=np.float32).tolist()
    np.testing.assert_allclose(y[0], [[0.0, 0.0], [0.5, 1.0], [1.0, 2.0]], rtol=1e-6)


def test_apply_one_value_for_every_element_and_reshape_to_an_image() -> None:
    rule = FeatureRule(input_shape=(4,), offset=[0.0], scale=[1 / 16], model_input_shape=(2, 2, 1))
    x = np.array([[0, 4, 8, 16], [16, 16, 0, 2]], dtype=np.uint8)
    y = rule.apply(x)
    assert y.shape == (2, 2, 2, 1)
    assert y[:, :, :, 0].tolist() == [[[0.0, 0.25], [0.5, 1.0]], [[1.0, 1.0], [0.0, 0.125]]]


def test_apply_refuses_samples_of_another_shape() -> None:
    rule = FeatureRule(input_shape=(4,), offset=[0.0], scale=[1.0])
    with pytest.raises(FeatureRuleError, match=r"shape \[4\], got an array of shape \[2, 5\]"):
        rule.apply(np.zeros((2, 5)))


def test_fit_standardize_per_feature_uses_population_std_and_guards_zero_spread() -> None:
    x = np.array([[1.0, 5.0, 7.0], [3.0, 5.0, 9.0], [5.0, 5.0, 11.0]])
    rule = FeatureRule.fit("standardize", x)
    assert rule.offset == [3.0, 5.0, 9.0]
    std = np.std([1.0, 3.0, 5.0])
    assert rule.scale == pytest.approx([1 / std, 1.0, 1 / std])
    y = rule.apply(x)
    assert y[:, 0].mean() == pytest.approx(0.0, abs=1e-6)
    assert y[:, 0].std() == pytest.approx(1.0, abs=1e-6)
    assert y[:, 1].tolist() == [0.0, 0.0, 0.0]


def test_fit_standardize_per_channel_of_a_transposed_time_series() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 2, 50)) * np.array([[1.0], [10.0]]) + np.array([[0.0], [100.0]])
    rule = FeatureRule.fit("standardize", x, transpose=(1, 0), window=WindowRule(50, 25))
    assert rule.model_input_shape == (50, 2)
    assert len(rule.offset) == 2
    assert rule.offset[1] == pytest.approx(x[:, 1, :].mean())
    y = rule.apply(x)
    assert y.reshape(-1, 2).std(axis=0) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_fit_minmax_scale255_identity_and_global() -> None:
    x = np.array([[0.0, 10.0], [2.0, 30.0]])
    minmax = FeatureRule.fit("minmax", x)
    assert minmax.offset == [0.0, 10.0] and minmax.scale == [0.5, 1 / 20]
    assert minmax.apply(x).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    overall = FeatureRule.fit("minmax", x, per_feature=False)
    assert overall.offset == [0.0] and overall.scale == [1 / 30]
    assert FeatureRule.fit("scale255", x).scale == [1 / 255]
    identity = FeatureRule.fit("identity", x)
    assert identity.apply(x).tolist() == x.tolist()
    with pytest.raises(FeatureRuleError, match="unknown feature rule kind 'zscore'"):
        FeatureRule.fit("zscore", x)


def test_window_cuts_full_windows_along_the_time_axis() -> None:
    window = WindowRule(length=4, stride=2)
    stream = np.arange(2 * 9).reshape(2, 9)  # 2 channels, 9 readings
    windows = window.windows(stream)
    assert windows.shape == (3, 2, 4)
    assert windows[1].tolist() == [[2, 3, 4, 5], [11, 12, 13, 14]]
    assert window.windows(stream[:, :3]).shape == (0, 2, 4)
    rows = WindowRule(length=3, stride=3, axis=0).windows(np.zeros((7, 6)))
    assert rows.shape == (2, 3, 6)


def test_document_round_trip_keeps_unknown_fields() -> None:
    rule = FeatureRule(
        input_shape=(6, 100),
        offset=[0.5] * 6,
        scale=[2.0] * 6,
        transpose=(1, 0),
        window=WindowRule(100, 50, extra={"hz": 10}),
        extra={"future": {"nested": [1, 2]}},
    )
    document = rule.to_dict()
    assert document["future"] == {"nested": [1, 2]}
    assert document["window"] == {"length": 100, "stride": 50, "axis": -1, "hz": 10}
    again = FeatureRule.from_dict(document)
    assert again == rule
    assert again.to_dict() == document


def rule_doc(**changes: Any) -> dict[str, Any]:
    """A valid rule document for 2 channels x 5 readings, with ``changes`` applied."""
    document: dict[str, Any] = {"input_shape": [2, 5], "offset": [0], "scale": [1]}
    document.update(changes)
    return {k: v for k, v in document.items() if v is not None}


BAD_DOCUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("missing scale", rule_doc(scale=None), "missing field 'scale'"),
    ("offset length", rule_doc(offset=[0, 0, 0]), "'offset' must hold 1 or 5 values"),
    ("nan scale", rule_doc(scale=[float("nan")]), "'scale' holds nan"),
    ("text offset", rule_doc(offset=["a"]), "'offset' holds a non-number"),
    ("bad shape", rule_doc(input_shape=[0]), "'input_shape' must be a non-empty list"),
    ("not a permutation", rule_doc(transpose=[0, 0]), "'transpose' must be a permutation"),
    ("model shape", rule_doc(model_input_shape=[3]), "holds 3 elements"),
    ("window length", rule_doc(window={"length": 4, "stride": 1}), "window length 4"),
    ("window stride", rule_doc(window={"length": 5, "stride": 0}), "'stride' must be a positive"),
    ("window axis", rule_doc(window={"length": 5, "stride": 1, "axis": 2}), "axis 2 does not"),
]


@pytest.mark.parametrize(
    ("document", "message"), [c[1:] for c in BAD_DOCUMENTS], ids=[c[0] for c in BAD_DOCUMENTS]
)
def test_malformed_rule_is_refused_naming_the_field(document: dict[str, Any], message: str) -> None:
    with pytest.raises(FeatureRuleError, match=message):
        FeatureRule.from_dict(document)
