"""The model zoo for conformance: every architecture as a full-int8 .tflite, with reference
outputs from TensorFlow Lite Micro.

:func:`zoo_models` gives one :class:`ZooModel` per architecture of
:data:`edgeops.train.zoo.ARCHITECTURES`, each for the input of its natural built-in dataset
(:data:`ZOO_SHAPES`): digits as an 8x8x1 image for the 2-D models, as 64 features for the
MLP and the autoencoder, a BasicMotions-like window of 100 steps x 6 channels for ``cnn1d``.
Conformance is about bit-exactness, not accuracy, so nothing is trained:

- the model is built by :func:`edgeops.train.zoo.build_model` (weights seeded by ``seed``),
  at the width of :data:`ZOO_WIDTHS` (small enough to run quickly under QEMU);
- its batch-norm layers' moving statistics set to those of the calibration inputs (one
  forward pass, weights untouched): left at mean 0 and variance 1, the activations of the deeper
  models fade layer by layer below what int8 can scale;
- converted to full int8 (int8 input and output tensors, batch of one) by the hub's own
  converter, :func:`edgeops.compress.quantize.quantize`, calibrated on
  :data:`CALIBRATION_SAMPLES` seeded standard-normal model inputs;
- its inputs are :data:`INPUT_SAMPLES` int8 tensors, seeded: the first half are
  standard-normal values quantized with the model's input scale and zero point (what a
  device would send), the rest uniform over the whole int8 range;
- its reference outputs are what the ``tflite_micro`` Python interpreter (the oracle of the
  project's firmware conformance tests, :func:`edgeops.evaluate.tflm.tflm_run`) computes on
  those inputs: int8, one row per input.

Converting takes seconds per model, so every model is cached on disk under ``cache_dir``
(default ``$EDGEOPS_HIL_CACHE``, else ``~/.cache/edgeops/hil``) in one ``.npz`` per
(architecture, seed, TensorFlow version, tflite-micro version, and a digest of the zoo's
and the converter's source files), written atomically; a cached model is read back
without loading TensorFlow.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.fsio import atomic_write_bytes
from edgeops.errors import EdgeOpsError
from hil.errors import HilError

__all__ = [
    "CALIBRATION_SAMPLES",
    "INPUT_SAMPLES",
    "ZOO_CLASSES",
    "ZOO_SHAPES",
    "ZOO_WIDTHS",
    "ZooModel",
    "ZooModelError",
    "default_cache_dir",
    "zoo_models",
]

ZOO_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (64,),
    "cnn": (8, 8, 1),
    "ds-cnn": (8, 8, 1),
    "cnn1d": (100, 6),
    "mobilenet": (8, 8, 1),
    "autoencoder": (64,),
}
"""Each architecture's model input: digits for all but ``cnn1d`` (BasicMotions)."""
ZOO_CLASSES: dict[str, int] = {"cnn1d": 4}
"""Output classes: BasicMotions has 4, digits (the others) 10; the autoencoder has none."""
ZOO_WIDTHS: dict[str, float] = {
    "mlp": 1.0,
    "cnn": 1.0,
    "ds-cnn": 0.25,
    "mobilenet": 0.25,
    "cnn1d": 0.25,
    "autoencoder": 0.25,
}
"""Width multipliers, as the firmware conformance tests use them."""
CALIBRATION_SAMPLES = 32
INPUT_SAMPLES = 16
_FORMAT = 1  # bump when what is cached changes


class ZooModelError(HilError):
    """A zoo model could not be built, converted or run on TFLM."""


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo, ready for conformance runs."""

    name: str
    """The architecture (``edgeops.train.zoo.ARCHITECTURES``)."""
    tflite: bytes
    """Full-int8 flatbuffer: int8 input and output tensors, batch of one."""
    inputs: np.ndarray
    """int8 input tensors, shape ``(n, *input_shape)`` (every zoo model has an int8 input)."""
    reference: np.ndarray
    """int8 outputs of the TFLite Micro interpreter on ``inputs``, shape ``(n, outputs)``."""
    input_shape: tuple[int, ...]
    width: float
    seed: int


def default_cache_dir() -> Path:
    """``$EDGEOPS_HIL_CACHE``, else ``~/.cache/edgeops/hil``."""
    configured = os.environ.get("EDGEOPS_HIL_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "edgeops" / "hil"


def zoo_models(
    seed: int = 0,
    archs: Sequence[str] | None = None,
    *,
    cache_dir: Path | None = None,
) -> list[ZooModel]:
    """The zoo's models (all architectures, or ``archs`` in that order), built with
    ``seed``; see the module docstring. ZooModelError names an unknown architecture or the
    model that could not be made."""
    from edgeops.train.zoo import ARCHITECTURES

    wanted = list(ARCHITECTURES if archs is None else archs)
    unknown = [arch for arch in wanted if arch not in ARCHITECTURES]
    if unknown:
        raise ZooModelError(
            f"unknown architecture {unknown[0]!r}; architectures: {', '.join(ARCHITECTURES)}"
        )
    directory = (cache_dir if cache_dir is not None else default_cache_dir()) / "zoo"
    return [_model(arch, seed, directory) for arch in wanted]


def _versions() -> str:
    parts = []
    for package in ("tensorflow", "tflite-micro"):
        try:
            parts.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package}=none")
    return ",".join(parts)


def _sources() -> str:
    """A digest of the code that makes the models (the zoo's builders, the converter)."""
    import edgeops

    root = Path(edgeops.__file__).resolve().parent
    digest = hashlib.sha256()
    for relative in ("train/zoo.py", "compress/quantize.py"):
        digest.update((root / relative).read_bytes())
    return digest.hexdigest()[:16]


def _cache_path(directory: Path, arch: str, seed: int) -> Path:
    key = f"{_FORMAT}|{arch}|{seed}|{ZOO_WIDTHS[arch]}|{_versions()}|{_sources()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return directory / f"{arch}-seed{seed}-{digest}.npz"


def _model(arch: str, seed: int, directory: Path) -> ZooModel:
    path = _cache_path(directory, arch, seed)
    cached = _read(path, arch, seed)
    if cached is not None:
        return cached
    model = _build(arch, seed)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        tflite=np.frombuffer(model.tflite, dtype=np.uint8),
        inputs=model.inputs,
        reference=model.reference,
    )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return model


def _read(path: Path, arch: str, seed: int) -> ZooModel | None:
    """The cached model, or None if there is none (or it cannot be read: made again)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            tflite = data["tflite"].tobytes()
            inputs, reference = np.array(data["inputs"]), np.array(data["reference"])
    except (OSError, ValueError, KeyError):
        return None
    return ZooModel(arch, tflite, inputs, reference, ZOO_SHAPES[arch], ZOO_WIDTHS[arch], seed)


def _build(arch: str, seed: int) -> ZooModel:
    from edgeops.compress.quantize import quantize
    from edgeops.evaluate.tflm import tflm_run
    from edgeops.train.zoo import build_model

    shape = ZOO_SHAPES[arch]
    rng = np.random.default_rng(seed)
    calibration = rng.standard_normal((CALIBRATION_SAMPLES, *shape)).astype(np.float32)
    try:
        keras = build_model(
            arch, shape, ZOO_CLASSES.get(arch, 10), width=ZOO_WIDTHS[arch], seed=seed
        )
        _settle_batch_norm(keras, calibration)
        tflite = quantize(keras, "int8", calibration, max_samples=CALIBRATION_SAMPLES)
        inputs = _inputs(tflite, shape, rng)
        reference = np.asarray(tflm_run(tflite, inputs).outputs)
    except EdgeOpsError as exc:
        raise ZooModelError(f"zoo model {arch} (seed {seed}): {exc}") from None
    if reference.dtype != np.int8:
        raise ZooModelError(f"zoo model {arch}: TFLM gave {reference.dtype} outputs, not int8")
    reference = reference.reshape(len(inputs), -1)
    return ZooModel(arch, tflite, inputs, reference, shape, ZOO_WIDTHS[arch], seed)


def _settle_batch_norm(keras: Any, calibration: np.ndarray) -> None:
    """Set the batch-norm layers' moving statistics to those of ``calibration`` (one forward
    pass in training mode with momentum 0; no weight changes). Untrained, they are mean 0
    and variance 1, and the activations of a deep network shrink layer after layer until
    their int8 scales are too small for TFLM to prepare the model."""
    layers = [layer for layer in keras.layers if type(layer).__name__ == "BatchNormalization"]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        keras(calibration, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def _inputs(tflite: bytes, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Half quantized standard-normal samples, half uniform int8 (see the module doc)."""
    from edgeops.firmware.graph import read_tflite

    graph = read_tflite(tflite)
    tensor = graph.tensor(graph.inputs[0])
    scale, zero_point = tensor.scale, tensor.zero_point
    real = INPUT_SAMPLES // 2
    values = rng.standard_normal((real, *shape))
    quantized = np.clip(np.round(values / scale) + zero_point, -128, 127)
    uniform = rng.integers(-128, 128, size=(INPUT_SAMPLES - real, *shape))
    inputs: np.ndarray = np.concatenate([quantized, uniform]).astype(np.int8)
    return inputs
