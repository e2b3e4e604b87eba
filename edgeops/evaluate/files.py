"""Scoring a registered model version on a labelled file, through the device's path.

The file's samples go through the model card's preprocessing rule (the same
:class:`~device_agent.features.FeatureRule` the agent applies) and then the runtime the
device uses: LiteRT for a .tflite version, ONNX Runtime for an .onnx one, and for a Keras
version its float .tflite conversion on LiteRT, never Keras alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_agent.features import FeatureRule
from edgeops.evaluate.report import EvalReport, evaluate_artifact

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import ModelVersionView, Registry

__all__ = ["evaluate_file"]


def evaluate_file(
    model_ref: str,
    path: Path,
    *,
    label_column: str | None,
    registry: Registry,
    datasets: DatasetService,
) -> tuple[ModelVersionView, EvalReport]:
    """The model version ``model_ref`` and its report on the labelled file at ``path``."""
    from edgeops.data import labels_to_indices, read_labelled_file

    view = registry.get_model(model_ref)
    card = dict(view.card or {})
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
    return view, evaluate_artifact(artifact, format, x, y, task=task)
