"""Histogram sketches: edges, the binning rule at its boundaries, reference statistics."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.sketch import (
    CONFIDENCE_EDGES,
    ReferenceStats,
    SketchError,
    bin_counts,
    feature_matrix,
    quantile_edges,
)


def test_values_below_equal_and_above_edges_fall_in_the_documented_bins() -> None:
    edges = [0.0, 1.0, 2.0]
    values = [-5.0, -np.inf, 0.0, 0.5, 1.0, 1.999, 2.0, 100.0, np.inf, np.nan]
    counts = bin_counts(np.array(values), edges)
    # bin 0: < 0 | bin 1: [0, 1) | bin 2: [1, 2) | bin 3: >= 2; NaN is not counted
    assert counts.tolist() == [2, 2, 2, 3]
    assert counts.dtype == np.int64


def test_no_edges_is_one_bin_and_bad_edges_are_refused() -> None:
    assert bin_counts(np.array([1.0, 2.0]), []).tolist() == [2]
    with pytest.raises(SketchError, match="strictly increasing"):
        bin_counts(np.array([1.0]), [1.0, 1.0])
    with pytest.raises(SketchError, match="finite"):
        bin_counts(np.array([1.0]), [0.0, np.nan])


def test_quantile_edges_are_inner_quantiles_unique_and_increasing() -> None:
    values = np.arange(1, 101, dtype=np.float64)
    edges = quantile_edges(values, bins=4)
    assert edges.tolist() == pytest.approx(np.quantile(values, [0.25, 0.5, 0.75]).tolist())
    assert bin_counts(values, edges).tolist() == [25, 25, 25, 25]


def test_duplicate_quantiles_collapse_to_one_edge() -> None:
    mostly_zero = np.concatenate([np.zeros(90), np.arange(1, 11)])
    edges = quantile_edges(mostly_zero, bins=16)
    assert np.all(np.diff(edges) > 0)
    assert edges[0] == 0.0 and len(edges) < 15
    assert quantile_edges(np.full(50, 3.0)).tolist() == [3.0]
    assert quantile_edges(np.array([np.nan, np.inf])).size == 0
    counts = bin_counts(mostly_zero, edges)
    assert counts[0] == 0 and counts.sum() == 100


def test_features_are_columns_of_tables_channels_of_series_and_grid_cells_of_images() -> None:
    assert feature_matrix(np.zeros((5, 3))).shape == (5, 3)
    assert feature_matrix(np.zeros((5, 100, 6))).shape == (500, 6)
    assert feature_matrix(np.zeros((5, 8, 8, 1))).shape == (5, 16)
    assert feature_matrix(np.zeros((5, 28, 28, 3))).shape == (5, 48)
    assert feature_matrix(np.zeros((5, 2, 2, 1))).shape == (20, 1)  # too small for the grid
    assert feature_matrix(np.zeros(5)).shape == (5, 1)


def test_an_image_feature_is_the_mean_of_its_grid_cell() -> None:
    image = np.zeros((1, 9, 9, 1))  # cropped to 8 x 8: cells of 2 x 2
    image[0, 0:2, 0:2, 0] = 1.0  # cell (0, 0)
    image[0, 6:8, 2:4, 0] = 0.5  # cell (3, 1)
    image[0, 8, :, 0] = 9.0  # cropped away
    features = feature_matrix(image)[0]
    assert features[0] == 1.0 and features[3 * 4 + 1] == 0.5
    assert features.sum() == 1.5


def test_reference_from_time_series_pools_each_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 50, 2)).astype(np.float32)
    x[..., 1] += 10
    reference = ReferenceStats.from_features(x, bins=10)
    assert reference.num_features == 2
    assert all(len(e) == 9 for e in reference.feature_edges)
    assert [sum(c) for c in reference.feature_counts] == [1000, 1000]
    assert reference.feature_edges[1][0] > 5
    assert reference.count_features(x) == reference.feature_counts
    with pytest.raises(SketchError, match="3 features, the reference has 2"):
        reference.count_features(np.zeros((4, 3)))


def test_outputs_add_class_and_confidence_histograms() -> None:
    reference = ReferenceStats.from_features(np.zeros((3, 2)))
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.75, 0.05], [0.34, 0.33, 0.33]])
    with_outputs = reference.with_outputs(probabilities)
    assert with_outputs.class_counts == [2, 1, 0]
    assert with_outputs.confidence_edges == list(CONFIDENCE_EDGES)
    assert CONFIDENCE_EDGES[2] == 0.3 and len(CONFIDENCE_EDGES) == 9
    # confidences 0.9, 0.75, 0.34 -> bins [0.9, inf), [0.7, 0.8), [0.3, 0.4)
    assert with_outputs.confidence_counts == [0, 0, 0, 1, 0, 0, 0, 1, 0, 1]
    assert reference.class_counts is None  # the original is unchanged
    binary = reference.with_outputs(np.array([0.1, 0.8, 0.95]))
    assert binary.class_counts == [1, 2]
    with pytest.raises(SketchError, match="NaN"):
        reference.with_outputs(np.array([[np.nan, 1.0]]))


def test_document_round_trip_keeps_unknown_fields() -> None:
    reference = ReferenceStats.from_features(
        np.arange(12, dtype=np.float32).reshape(4, 3), bins=4, feature_names=["a", "b", "c"]
    ).with_outputs(np.array([[0.6, 0.4], [0.1, 0.9]]))
    document = reference.to_dict()
    document["drift_method"] = {"name": "psi", "threshold": 0.2}
    again = ReferenceStats.from_dict(document)
    assert again.extra == {"drift_method": {"name": "psi", "threshold": 0.2}}
    assert again.to_dict() == document
    assert again.feature_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature_counts": [[1, 2]]}, "feature 0 has 2 edges, so 3 counts"),
        ({"feature_edges": "no"}, "'feature_edges' must be a list"),
        ({"class_counts": [1, -2]}, "'class_counts' holds -2"),
        ({"confidence_counts": None}, "go together"),
        ({"feature_names": ["only-one", "two"]}, "2 feature names for 1 features"),
    ],
    ids=["counts", "edges type", "negative count", "half confidence", "names"],
)
def test_malformed_reference_is_refused_naming_the_field(
    change: dict[str, object], message: str
) -> None:
    document = {
        "feature_edges": [[0.0, 1.0]],
        "feature_counts": [[1, 2, 3]],
        "class_counts": [1, 2],
        "confidence_edges": [0.5],
        "confidence_counts": [1, 2],
        **change,
    }
    with pytest.raises(SketchError, match=message):
        ReferenceStats.from_dict(document)
