"""The model zoo: every architecture builds for the inputs it is meant for, runs, scales with
its width multiplier, and converts to a full-int8 .tflite made of ops TFLite Micro has."""

from __future__ import annotations

import numpy as np
import pytest

from edgeops.train import (
    ARCHITECTURES,
    IncompatibleInputError,
    UnknownArchitectureError,
    build_model,
    task_of,
)

# Each architecture with the model-input shapes of the built-in datasets it suits:
# digits (8, 8, 1), mnist5k (28, 28, 1), basic_motions (100, 6).
CASES = [
    ("mlp", (64,)),
    ("mlp", (8, 8, 1)),
    ("cnn", (8, 8, 1)),
    ("cnn", (28, 28, 1)),
    ("cnn", (64,)),
    ("ds-cnn", (28, 28, 1)),
    ("ds-cnn", (8, 8)),
    ("cnn1d", (100, 6)),
    ("cnn1d", (64,)),
    ("mobilenet", (28, 28, 1)),
    ("mobilenet", (8, 8, 1)),
    ("autoencoder", (64,)),
    ("autoencoder", (100, 6)),
]

# Builtin operators of TFLite Micro's op resolver that the zoo may use (int8 kernels).
TFLM_OPS = {
    "AVERAGE_POOL_2D",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "MAX_POOL_2D",
    "MEAN",
    "QUANTIZE",
    "DEQUANTIZE",
    "RELU",
    "RELU6",
    "RESHAPE",
    "SOFTMAX",
    "SHAPE",
    "STRIDED_SLICE",
    "PACK",
}


def test_the_zoo_has_the_six_architectures() -> None:
    assert ARCHITECTURES == ("mlp", "cnn", "ds-cnn", "cnn1d", "mobilenet", "autoencoder")
    assert task_of("autoencoder") == "anomaly"
    assert {task_of(a) for a in ARCHITECTURES if a != "autoencoder"} == {"classification"}


@pytest.mark.parametrize(("arch", "shape"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_architecture_builds_and_runs_a_forward_pass(arch: str, shape: tuple[int, ...]) -> None:
    model = build_model(arch, shape, 4, seed=0)
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    y = np.asarray(model(x, training=False))
    if arch == "autoencoder":
        assert y.shape == (3, int(np.prod(shape)))
    else:
        assert y.shape == (3, 4)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)  # softmax probabilities
    assert np.isfinite(y).all()


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first = build_model("cnn", (8, 8, 1), 10, seed=3).get_weights()
    again = build_model("cnn", (8, 8, 1), 10, seed=3).get_weights()
    other = build_model("cnn", (8, 8, 1), 10, seed=4).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_width_multiplier_scales_the_model() -> None:
    sizes = [build_model("mobilenet", (28, 28, 1), 10, width=w).count_params() for w in (0.25, 1.0)]
    assert sizes[0] * 4 < sizes[1]
    narrow = build_model("mlp", (64,), 10, width=0.5)
    assert narrow.get_layer("dense_1").units == 32


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(UnknownArchitectureError) as caught:
        build_model("resnet", (8, 8, 1), 10)
    message = str(caught.value)
    assert "'resnet'" in message
    assert all(arch in message for arch in ARCHITECTURES)


@pytest.mark.parametrize(
    ("arch", "shape", "num_classes", "needle"),
    [
        ("cnn", (7,), 10, "square length"),
        ("mobilenet", (2, 3, 4, 5), 10, "image inputs"),
        ("cnn1d", (8, 8, 1), 10, "time-series"),
        ("mlp", (64,), 1, "at least 2 classes"),
        ("mlp", (0,), 10, "positive sizes"),
    ],
)
def test_incompatible_inputs_are_refused_with_the_reason(
    arch: str, shape: tuple[int, ...], num_classes: int, needle: str
) -> None:
    with pytest.raises(IncompatibleInputError, match=needle) as caught:
        build_model(arch, shape, num_classes)
    assert repr(arch) in str(caught.value) or "positive" in needle or "classes" in needle


def test_width_out_of_range_is_refused() -> None:
    with pytest.raises(IncompatibleInputError, match="width"):
        build_model("mlp", (64,), 10, width=0.0)


def test_cli_help_lists_the_zoo() -> None:
    from edgeops.cli.train import ARCH_HELP

    assert "architecture: " + ", ".join(ARCHITECTURES) == ARCH_HELP


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("mlp", (64,)),
        ("cnn", (8, 8, 1)),
        ("ds-cnn", (28, 28, 1)),
        ("cnn1d", (100, 6)),
        ("mobilenet", (28, 28, 1)),
        ("autoencoder", (64,)),
    ],
)
def test_architecture_converts_to_full_int8_with_tflm_ops(
    arch: str, shape: tuple[int, ...]
) -> None:
    from edgeops.compress import quantize
    from edgeops.evaluate import load_runner
    from edgeops.export import op_set

    model = build_model(arch, shape, 4, width=0.5, seed=0)
    representative = np.random.default_rng(0).random((16, *shape), dtype=np.float32)
    flatbuffer = quantize(model, "int8", representative)
    runner = load_runner(flatbuffer, "tflite")
    assert (runner.input.dtype, runner.output.dtype) == ("int8", "int8")
    assert set(op_set(flatbuffer, "tflite")) <= TFLM_OPS
    out = runner.run(representative[:2])
    assert out.shape[0] == 2 and np.isfinite(out).all()
