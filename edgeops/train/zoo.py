"""The model zoo: small Keras architectures that convert to full-int8 TFLite and run on TFLM.

Every architecture uses only layers whose converted ops TensorFlow Lite Micro implements for
int8: Conv2D, DepthwiseConv2D, Dense (FULLY_CONNECTED), max/average pooling, Reshape,
GlobalAveragePooling (MEAN), ReLU/ReLU6 and Softmax. Batch normalisation folds into the
convolutions when converted. Time series go through Conv2D with ``(k, 1)`` kernels rather
than Conv1D, so no EXPAND_DIMS/SQUEEZE ops appear in the graph.

``width`` multiplies every layer's channel or unit count (MobileNet's alpha, applied to all
architectures), rounded to a multiple of 4 and never below 4.

=============  =========================================  ====================================
name           input shapes                               what
=============  =========================================  ====================================
mlp            any                                        2 hidden dense layers (64, 32)
cnn            (H, W, C), (H, W), or (N,) with N square   2 conv (8, 16) + pool, dense head
ds-cnn         as cnn                                     keyword-spotting DS-CNN, 4 blocks
cnn1d          (T, C) or (T,)                             3 temporal conv (16, 32, 32), GAP
mobilenet      as cnn                                     MobileNetV1-style, 6 DS blocks
autoencoder    any                                        dense 32-8-32 reconstruction
=============  =========================================  ====================================

Classifiers end in a Softmax layer named ``probabilities``; the autoencoder's output
(``reconstruction``) is the flattened input, and its anomaly score is the mean squared
reconstruction error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from edgeops._tf import load_tf
from edgeops.train.errors import IncompatibleInputError, UnknownArchitectureError

__all__ = [
    "ARCHITECTURES",
    "DESCRIPTIONS",
    "TASK_ANOMALY",
    "TASK_CLASSIFICATION",
    "build_model",
    "check_architecture",
    "task_of",
]

ARCHITECTURES: tuple[str, ...] = ("mlp", "cnn", "ds-cnn", "cnn1d", "mobilenet", "autoencoder")

DESCRIPTIONS: dict[str, str] = {
    "mlp": "multi-layer perceptron, 2 hidden layers (64, 32 units x width)",
    "cnn": "small 2D CNN: 2 conv layers (8, 16 channels x width) with max pooling",
    "ds-cnn": "keyword-spotting DS-CNN: conv + 3 depthwise-separable blocks, global pooling",
    "cnn1d": "1D CNN for time series: 3 temporal conv layers, global pooling",
    "mobilenet": "MobileNetV1-style depthwise-separable network; width is its alpha",
    "autoencoder": "dense autoencoder (32-8-32) for anomaly detection, scored by AUC",
}

_BN_MOMENTUM = 0.9
"""Batch-norm moving averages settle within tens of steps: small datasets have few per epoch."""

TASK_CLASSIFICATION = "classification"
TASK_ANOMALY = "anomaly"

Model = Any  # tf_keras.Model; TensorFlow ships no type information
Tensor = Any


def check_architecture(arch: str) -> str:
    """``arch`` if it is in the zoo, else :class:`UnknownArchitectureError` naming the known."""
    if arch not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}; known architectures: {', '.join(ARCHITECTURES)}"
        )
    return arch


def task_of(arch: str) -> str:
    """The task an architecture solves: ``"anomaly"`` for the autoencoder, else
    ``"classification"``."""
    return TASK_ANOMALY if check_architecture(arch) == "autoencoder" else TASK_CLASSIFICATION


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    seed: int = 0,
) -> Model:
    """A fresh, uncompiled Keras model of architecture ``arch``.

    ``input_shape`` is one model input (the dataset's feature-rule output shape, no batch
    axis). Weights are initialised from ``seed`` (the global Keras/TF/NumPy seeds are set).
    """
    builder = _BUILDERS.get(check_architecture(arch))
    assert builder is not None
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise IncompatibleInputError(
            f"architecture {arch!r} needs a non-empty input shape of positive sizes, got {shape}"
        )
    if arch != "autoencoder" and num_classes < 2:
        raise IncompatibleInputError(
            f"architecture {arch!r} needs at least 2 classes, got {num_classes}"
        )
    if not (math.isfinite(width) and 0.0 < width <= 8.0):
        raise IncompatibleInputError(f"width must be in (0, 8], got {width}")
    _tf, tf_keras = load_tf()
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input(shape=shape, name="input")
    outputs = builder(tf_keras, inputs, shape, num_classes, width, arch)
    return tf_keras.Model(inputs, outputs, name=arch.replace("-", "_"))


def _channels(base: int, width: float) -> int:
    return max(4, round(base * width / 4.0) * 4)


def _image(layers: Any, x: Tensor, shape: tuple[int, ...], arch: str) -> Tensor:
    """``x`` as a batch of (H, W, C) images."""
    if len(shape) == 3:
        return x
    if len(shape) == 2:
        return layers.Reshape((*shape, 1), name="to_image")(x)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return layers.Reshape((side, side, 1), name="to_image")(x)
    raise IncompatibleInputError(
        f"architecture {arch!r} needs image inputs (H, W, C), (H, W) or a flat vector of "
        f"square length; got input shape {shape}"
    )


def _classifier_head(layers: Any, x: Tensor, num_classes: int) -> Tensor:
    x = layers.Dense(num_classes, name="logits")(x)
    return layers.Softmax(name="probabilities")(x)


def _mlp(keras: Any, x: Tensor, shape: tuple[int, ...], n: int, width: float, arch: str) -> Tensor:
    layers = keras.layers
    if len(shape) > 1:
        x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_channels(64, width), activation="relu", name="dense_1")(x)
    x = layers.Dense(_channels(32, width), activation="relu", name="dense_2")(x)
    return _classifier_head(layers, x, n)


def _cnn(keras: Any, x: Tensor, shape: tuple[int, ...], n: int, width: float, arch: str) -> Tensor:
    layers = keras.layers
    x = _image(layers, x, shape, arch)
    for i, base in enumerate((8, 16), start=1):
        x = layers.Conv2D(
            _channels(base, width), 3, padding="same", activation="relu", name=f"conv_{i}"
        )(x)
        if min(x.shape[1], x.shape[2]) >= 4:
            x = layers.MaxPooling2D(2, name=f"pool_{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    return _classifier_head(layers, x, n)


def _conv_bn(
    layers: Any, x: Tensor, filters: int, kernel: Any, strides: Any, name: str, relu6: bool
) -> Tensor:
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(
        x
    )
    x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0 if relu6 else None, name=f"{name}_relu")(x)


def _separable(
    layers: Any, x: Tensor, filters: int, strides: int, name: str, relu6: bool
) -> Tensor:
    x = layers.DepthwiseConv2D(
        3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw"
    )(x)
    x = layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0 if relu6 else None, name=f"{name}_dw_relu")(x)
    return _conv_bn(layers, x, filters, 1, 1, f"{name}_pw", relu6)


def _stride(x: Tensor, wanted: int) -> int:
    """``wanted`` (2) while the feature map stays at least 2x2 after it; else 1."""
    return wanted if wanted > 1 and min(x.shape[1], x.shape[2]) >= 4 else 1


def _ds_cnn(
    keras: Any, x: Tensor, shape: tuple[int, ...], n: int, width: float, arch: str
) -> Tensor:
    layers = keras.layers
    x = _image(layers, x, shape, arch)
    filters = _channels(32, width)
    first_stride = 2 if min(x.shape[1], x.shape[2]) >= 16 else 1
    x = _conv_bn(layers, x, filters, 3, first_stride, "conv_1", relu6=False)
    for i in range(1, 4):
        x = _separable(layers, x, filters, 1, f"ds_{i}", relu6=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _classifier_head(layers, x, n)


_MOBILENET_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
)


def _mobilenet(
    keras: Any, x: Tensor, shape: tuple[int, ...], n: int, width: float, arch: str
) -> Tensor:
    layers = keras.layers
    x = _image(layers, x, shape, arch)
    x = _conv_bn(layers, x, _channels(32, width), 3, _stride(x, 2), "conv_1", relu6=True)
    for i, (base, stride) in enumerate(_MOBILENET_BLOCKS, start=1):
        x = _separable(layers, x, _channels(base, width), _stride(x, stride), f"ds_{i}", True)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _classifier_head(layers, x, n)


def _cnn1d(
    keras: Any, x: Tensor, shape: tuple[int, ...], n: int, width: float, arch: str
) -> Tensor:
    layers = keras.layers
    if len(shape) == 1:
        steps, channels = shape[0], 1
    elif len(shape) == 2:
        steps, channels = shape
    else:
        raise IncompatibleInputError(
            f"architecture {arch!r} needs time-series inputs (steps, channels) or (steps,); "
            f"got input shape {shape}"
        )
    x = layers.Reshape((steps, 1, channels), name="to_columns")(x)
    for i, (base, kernel) in enumerate(((16, 5), (32, 5), (32, 3)), start=1):
        x = layers.Conv2D(
            _channels(base, width),
            (kernel, 1),
            padding="same",
            activation="relu",
            name=f"conv_{i}",
        )(x)
        if i < 3 and x.shape[1] >= 4:
            x = layers.MaxPooling2D((2, 1), name=f"pool_{i}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _classifier_head(layers, x, n)


def _autoencoder(
    keras: Any, x: Tensor, shape: tuple[int, ...], n: int, width: float, arch: str
) -> Tensor:
    layers = keras.layers
    size = math.prod(shape)
    if len(shape) > 1:
        x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_channels(32, width), activation="relu", name="encode_1")(x)
    x = layers.Dense(_channels(8, width), activation="relu", name="bottleneck")(x)
    x = layers.Dense(_channels(32, width), activation="relu", name="decode_1")(x)
    return layers.Dense(size, name="reconstruction")(x)


_Builder = Callable[[Any, Tensor, tuple[int, ...], int, float, str], Tensor]

_BUILDERS: dict[str, _Builder] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "ds-cnn": _ds_cnn,
    "cnn1d": _cnn1d,
    "mobilenet": _mobilenet,
    "autoencoder": _autoencoder,
}
