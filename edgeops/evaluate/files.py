"""Scoring a registered model version on a labelled file, through the device's path.

The file's samples go through the model card's preprocessing rule (the same
:class:`~device_agent.features.FeatureRule` the agent applies) and then the runtime the
device uses: LiteRT for a .tflite version, ONNX Runtime for an .onnx one, the TFLite Micro
interpreter for a version made for a microcontroller (:func:`device_runtime`), and for a
Keras version its float .tflite conversion on LiteRT, never Keras alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.features import FeatureRule
from edgeops.evaluate.errors import UnsupportedFormatError
from edgeops.evaluate.report import EvalReport, evaluate_artifact

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import ModelVersionView, Registry

__all__ = ["MCU_RUNTIME", "device_runtime", "evaluate_file"]

MCU_RUNTIME = "tflm"
_ALIASES = {"mcu": MCU_RUNTIME}  # the release runtime of a microcontroller build


def device_runtime(card: Mapping[str, Any] | None, config: Mapping[str, Any]) -> str | None:
    """``"tflm"`` for a model version made for a microcontroller, else None (the runtime of
    its format): its card says runtime ``tflm``, or it was compressed for a device profile
    whose runtime is ``tflm`` (``config.compression.profile.runtime``)."""
    if (card or {}).get("runtime") == MCU_RUNTIME:
        return MCU_RUNTIME
    compression = config.get("compression")
    profile = compression.get("profile") if isinstance(compression, Mapping) else None
    if isinstance(profile, Mapping) and profile.get("runtime") == MCU_RUNTIME:
        return MCU_RUNTIME
    return None


def evaluate_file(
    model_ref: str,
    path: Path,
    *,
    label_column: str | None,
    registry: Registry,
    datasets: DatasetService,
    runtime: str | None = None,
) -> tuple[ModelVersionView, EvalReport]:
    """The model version ``model_ref`` and its report on the labelled file at ``path``.

    ``runtime`` (``tflm`` or its alias ``mcu``, ``litert``, ``onnxruntime``) overrides the
    version's own device runtime (:func:`device_runtime`, else its format's); the report's
    ``runtime`` says which one scored it.
    """
    from edgeops.data import labels_to_indices, read_labelled_file

    view = registry.get_model(model_ref)
    card = dict(view.card or {})
    wanted = _ALIASES.get(runtime, runtime) if runtime else device_runtime(card, view.config)
    dataset = datasets.resolve(view.dataset_version)
    preprocessing = card.get("preprocessing")
    rule = FeatureRule.from_dict(preprocessing) if preprocessing else dataset.feature_rule
    classes = [str(c) for c in (view.config.get("classes") or dataset.classes)]
    source = read_labelled_file(
        path, label_column=label_column, feature_names=dataset.feature_names
    )
    y = labels_to_indices(source.labels, classes, what=f"{path.name}: the labels")
    x = rule.apply(np.asarray(source.x))
    task = str(view.config.get("task") or card.get("task") or dataset.task)
    artifact = registry.load_artifact(view.id)
    format = view.format
    if format == "keras":
        from edgeops.export.convert import keras_to_tflite_float
        from edgeops.train.trainer import load_keras

        artifact, format = keras_to_tflite_float(load_keras(artifact)), "tflite"
    if wanted == MCU_RUNTIME and format != "tflite":
        raise UnsupportedFormatError(
            f"model {view.ref} ({view.id}) is a .{format} model; TFLite Micro runs .tflite only"
        )
    return view, evaluate_artifact(artifact, format, x, y, task=task, runtime=wanted)
