"""Magnitude pruning and quantization-aware training (tensorflow-model-optimization).

Both fine-tune a copy of the model on the training split (model inputs, feature rule applied)
with a fixed seed; the model passed in is left untouched.

- :func:`prune` wraps the prunable layers (Dense, Conv, ...) with ``prune_low_magnitude``,
  raises sparsity polynomially from 0 to the target over about 70 % of the fine-tuning
  steps, then strips the wrappers: the result is a plain Keras model whose kernels hold
  zeros. Pruning shrinks the *gzipped* file (zeros compress), not the raw .tflite.
- :func:`cluster` (weight clustering, after pruning and before quantization) replaces each
  prunable kernel's values by at most ``clusters`` shared centroids (k-means++ initialised,
  fine-tuned), with ``preserve_sparsity``: the zeros pruning made stay zeros and do not take
  a centroid away from the other values. Fewer distinct values shrink the *gzipped* file
  further (each nonzero int8 weight then carries at most log2(clusters) bits).
- :func:`quantization_aware` inserts fake-quantization nodes (``quantize_model``) and
  fine-tunes, so the int8 conversion keeps ranges the model learned to live with. A
  pruned model (kernel sparsity >= 20 %) is trained with the prune-preserving scheme, so
  its zeros survive. Layers tfmot cannot quantize (a BatchNormalization not folded into
  a convolution, ...) are left float during training; the int8 conversion still
  calibrates them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgeops.compress.errors import PruningError

__all__ = [
    "check_clusters",
    "cluster",
    "distinct_kernel_values",
    "kernel_sparsity",
    "prune",
    "quantization_aware",
]

_KERNEL_NAMES = ("kernel", "pointwise_kernel")  # tfmot does not prune depthwise kernels
_PRUNE_PRESERVING_MIN_SPARSITY = 0.2
MIN_CLUSTERS = 2
MAX_CLUSTERS = 256  # an int8 weight has no more values than that


def _targets(model: Any, arrays: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """Inputs, targets and loss for fine-tuning: class indices for a classifier, the
    flattened input for an autoencoder (output as large as the input, no softmax)."""
    from edgeops._tf import load_tf

    _, tf_keras = load_tf()
    x = np.asarray(arrays.model_inputs("train"), dtype=np.float32)
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    softmax = isinstance(last, tf_keras.layers.Softmax) or activation == "softmax"
    outputs = int(np.prod(model.output_shape[1:]))
    if not softmax and outputs == int(np.prod(x.shape[1:])) and outputs != len(arrays.classes):
        return x, x.reshape(len(x), -1), "mse"
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax)
    return x, np.asarray(arrays.y_train, dtype=np.int64), loss


def _steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, math.ceil(samples / batch_size))


def prune(
    model: Any,
    arrays: Any,
    *,
    sparsity: float,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
) -> Any:
    """A copy of ``model`` with ``sparsity`` of every prunable kernel set to zero.

    ``arrays`` is the model's :class:`edgeops.data.DatasetArrays`; fine-tuning runs
    ``epochs`` epochs over its training split. Returns a stripped ``tf_keras.Model``.
    """
    if not 0.0 < sparsity < 1.0:
        raise PruningError(f"sparsity must be between 0 and 1 (exclusive), not {sparsity}")
    if epochs < 1:
        raise PruningError(f"pruning needs at least 1 fine-tuning epoch, not {epochs}")
    import tensorflow_model_optimization as tfmot

    from edgeops._tf import enable_determinism, load_tf

    _, tf_keras = load_tf()
    enable_determinism(seed)
    x, y, loss = _targets(model, arrays)
    total_steps = _steps_per_epoch(len(x), batch_size) * epochs
    # Prune every `frequency` steps; the last pruning step lands exactly on `end_step`, so
    # the target sparsity is reached, followed by ~30 % of the steps to recover.
    frequency = max(1, min(100, total_steps // 10))
    end_step = max(frequency, (int(total_steps * 0.7) // frequency) * frequency)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=float(sparsity),
        begin_step=0,
        end_step=end_step,
        frequency=frequency,
    )
    clone = tf_keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    try:
        wrapped = tfmot.sparsity.keras.prune_low_magnitude(clone, pruning_schedule=schedule)
    except ValueError as exc:
        raise PruningError(f"cannot prune model {model.name!r}: {exc}") from exc
    wrapped.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"]
    )
    wrapped.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    return tfmot.sparsity.keras.strip_pruning(wrapped)


def check_clusters(clusters: int) -> int:
    """``clusters`` if it is a usable number of weight clusters, else :class:`PruningError`."""
    if isinstance(clusters, bool) or not isinstance(clusters, int):
        raise PruningError(f"the number of clusters must be an integer, not {clusters!r}")
    if not MIN_CLUSTERS <= clusters <= MAX_CLUSTERS:
        raise PruningError(
            f"the number of clusters must be between {MIN_CLUSTERS} and {MAX_CLUSTERS}, "
            f"not {clusters}"
        )
    return clusters


def cluster(
    model: Any,
    arrays: Any,
    *,
    clusters: int,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
) -> Any:
    """A copy of ``model`` whose prunable kernels hold at most ``clusters`` distinct values.

    tensorflow-model-optimization's ``cluster_weights`` with k-means++ centroids and
    ``preserve_sparsity=True`` (zeros stay zeros: apply it after :func:`prune`), fine-tuned
    ``epochs`` epochs over the training split, then stripped to a plain ``tf_keras.Model``.
    Biases and layers tfmot cannot cluster are left as they are.
    """
    check_clusters(clusters)
    if epochs < 1:
        raise PruningError(f"clustering needs at least 1 fine-tuning epoch, not {epochs}")
    import tensorflow_model_optimization as tfmot

    from edgeops._tf import enable_determinism, load_tf

    _, tf_keras = load_tf()
    enable_determinism(seed)
    x, y, loss = _targets(model, arrays)
    keras_c = tfmot.clustering.keras
    # cluster_weights wraps the layers of the model it is given: wrap a copy, never `model`
    clone = tf_keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    try:
        wrapped = keras_c.cluster_weights(
            clone,
            number_of_clusters=clusters,
            cluster_centroids_init=keras_c.CentroidInitialization.KMEANS_PLUS_PLUS,
            preserve_sparsity=True,
        )
    except ValueError as exc:
        raise PruningError(f"cannot cluster the weights of model {model.name!r}: {exc}") from exc
    wrapped.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"]
    )
    wrapped.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    return keras_c.strip_clustering(wrapped)


def distinct_kernel_values(model: Any) -> int:
    """The largest number of distinct values in one prunable kernel (zero included)."""
    most = 0
    for weight in model.weights:
        name = weight.name.split("/")[-1].split(":")[0]
        if name in _KERNEL_NAMES:
            most = max(most, int(np.unique(np.asarray(weight.numpy())).size))
    return most


def _annotate_supported(model: Any) -> Any:
    """Annotate only the layers tfmot's default 8-bit scheme can quantize."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry,
    )

    from edgeops._tf import load_tf

    _, tf_keras = load_tf()
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()

    def annotate(layer: Any) -> Any:
        fresh = layer.__class__.from_config(layer.get_config())
        if registry.supports(layer):
            return tfmot.quantization.keras.quantize_annotate_layer(fresh)
        return fresh

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    return annotated


def quantization_aware(
    model: Any,
    arrays: Any,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    clustered: bool = False,
) -> Any:
    """A copy of ``model`` fine-tuned with fake quantization, ready for int8 conversion.

    ``clustered`` (a model made by :func:`cluster`): train with tfmot's cluster-preserving
    scheme (sparsity preserved too), so the shared values survive fine-tuning.
    """
    if epochs < 1:
        raise PruningError(f"quantization-aware training needs at least 1 epoch, not {epochs}")
    import tensorflow_model_optimization as tfmot

    from edgeops._tf import enable_determinism, load_tf

    _, tf_keras = load_tf()
    enable_determinism(seed)
    x, y, loss = _targets(model, arrays)
    keras_q = tfmot.quantization.keras
    scheme: Any = None
    if clustered:
        scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
            preserve_sparsity=kernel_sparsity(model) >= _PRUNE_PRESERVING_MIN_SPARSITY
        )
    elif kernel_sparsity(model) >= _PRUNE_PRESERVING_MIN_SPARSITY:
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    try:
        annotated = keras_q.quantize_annotate_model(model)
        with keras_q.quantize_scope():
            trained = (
                keras_q.quantize_apply(annotated, scheme)
                if scheme is not None
                else keras_q.quantize_apply(annotated)
            )
    except (RuntimeError, ValueError):
        # A layer the scheme cannot handle: quantize what it can, leave the rest float.
        annotated = _annotate_supported(model)
        with keras_q.quantize_scope():
            trained = (
                keras_q.quantize_apply(annotated, scheme)
                if scheme is not None
                else keras_q.quantize_apply(annotated)
            )
    trained.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"]
    )
    trained.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    return trained


def kernel_sparsity(model: Any) -> float:
    """The fraction of zeros over the kernels pruning acts on.

    Those are Dense and Conv kernels and separable convolutions' pointwise kernels; biases,
    normalisation parameters and depthwise kernels (which tfmot never prunes) are left out.
    """
    zeros = 0
    total = 0
    for weight in model.weights:
        name = weight.name.split("/")[-1].split(":")[0]
        if name in _KERNEL_NAMES:
            values = np.asarray(weight.numpy())
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
    return zeros / total if total else 0.0
