"""Exporting a registered model version: the artifact and its card, written atomically.

``export(ref, "tflite", out)`` writes ``<name>-<seq>.tflite`` (a Keras model becomes a float
.tflite; a .tflite version is written as stored), ``<name>-<seq>.tflite.card.json`` and
``<name>-<seq>.tflite.card.md`` (one card per format, so both formats fit in one directory).
``"onnx"`` converts a Keras version with tf2onnx and checks the result against Keras with ONNX
Runtime. The card's metrics are those of the artifact written, on the runtime that runs it: a
converted artifact (Keras to float .tflite or to .onnx) is scored on the dataset's test split,
through the dataset's preprocessing, with LiteRT or ONNX Runtime (never the Keras figures;
the metrics' ``runtime`` says ``litert`` or ``onnxruntime``); a .tflite version exported as
stored keeps its registered metrics when they were measured on the card's runtime, and is
scored again on it otherwise. The card's runtime is the format's (``litert``, ``onnx``), or
``tflm`` when asked for (``runtime="tflm"``, a microcontroller build, as a release for
``mcu`` does): then the metrics are the tflite-micro interpreter's, e.g. those a version
compressed for an MCU profile was registered with. Each file is written to a temp file and
renamed, so an interrupted export leaves whole files or none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.fsio import atomic_write_bytes
from edgeops.export.card import build_card
from edgeops.export.convert import keras_to_onnx, keras_to_tflite_float
from edgeops.export.errors import UnsupportedExportError

if TYPE_CHECKING:
    from device_agent.card import ModelCard
    from edgeops.data import DatasetService
    from edgeops.registry import ModelVersionView, Registry

__all__ = [
    "CARD_RUNTIMES",
    "EXPORT_FORMATS",
    "ExportResult",
    "export",
    "export_artifact",
    "export_bundle",
]

EXPORT_FORMATS = ("tflite", "onnx")
CARD_RUNTIMES = {"tflite": ("litert", "tflm"), "onnx": ("onnx",)}
"""The runtimes a card of each format may name; the first is the default."""
_EVAL_RUNTIME = {"litert": "litert", "onnx": "onnxruntime", "tflm": "tflm"}


class ExportResult:
    """An exported artifact in memory: its bytes, format and card."""

    def __init__(self, artifact: bytes, format: str, card: ModelCard) -> None:
        self.artifact = artifact
        self.format = format
        self.card = card


def export(
    model_ref: str,
    format: str,
    out_dir: Path,
    *,
    registry: Registry,
    datasets: DatasetService,
    runtime: str | None = None,
) -> list[Path]:
    """Write ``model_ref`` as ``format`` (tflite or onnx) with its card into ``out_dir``.

    ``runtime`` is the card's (see :func:`export_artifact`). Returns the paths written: the
    artifact, the card as JSON, the card as Markdown.
    """
    view = registry.get_model(model_ref)
    result = export_artifact(view, format, registry=registry, datasets=datasets, runtime=runtime)
    stem = f"{view.name}-{view.seq}"
    files = [
        (out_dir / f"{stem}.{format}", result.artifact),
        # one card per format: a .tflite and an .onnx of the same version sit side by side
        (out_dir / f"{stem}.{format}.card.json", result.card.to_json().encode()),
        (out_dir / f"{stem}.{format}.card.md", result.card.to_markdown().encode()),
    ]
    for path, data in files:
        atomic_write_bytes(path, data)
    return [path for path, _ in files]


def export_bundle(
    model_ref: str,
    format: str,
    bundle_dir: Path,
    *,
    registry: Registry,
    datasets: DatasetService,
) -> Path:
    """Write ``model_ref`` as an agent bundle: ``bundle_dir/model.<format>`` + ``card.json``.

    The layout ``device_agent.runtime.ModelBundle.load`` reads (an agent's ``model_dir``); each
    file is written atomically. Returns ``bundle_dir``.
    """
    view = registry.get_model(model_ref)
    result = export_artifact(view, format, registry=registry, datasets=datasets)
    atomic_write_bytes(bundle_dir / f"model.{format}", result.artifact)
    atomic_write_bytes(bundle_dir / "card.json", result.card.to_json().encode())
    return bundle_dir


def export_artifact(
    view: ModelVersionView,
    format: str,
    *,
    registry: Registry,
    datasets: DatasetService,
    runtime: str | None = None,
) -> ExportResult:
    """The bytes of ``view`` in ``format`` and their card (nothing written).

    ``runtime`` is the card's runtime (:data:`CARD_RUNTIMES`; default the format's):
    ``tflm`` describes a microcontroller build, scored on the tflite-micro interpreter. An
    artifact TFLM cannot run is then an :class:`UnsupportedExportError`.
    """
    from edgeops.evaluate import RuntimeLoadError

    if format not in EXPORT_FORMATS:
        raise UnsupportedExportError(
            f"cannot export to {format!r}; formats: {', '.join(EXPORT_FORMATS)}"
        )
    card_runtime = runtime or CARD_RUNTIMES[format][0]
    if card_runtime not in CARD_RUNTIMES[format]:
        raise UnsupportedExportError(
            f"a .{format} card cannot name runtime {card_runtime!r}; "
            f"runtimes: {', '.join(CARD_RUNTIMES[format])}"
            + ("; TFLite Micro runs .tflite models only" if card_runtime == "tflm" else "")
        )
    stored = registry.load_artifact(view.id)
    dataset = datasets.resolve(view.dataset_version)
    arrays = datasets.load(dataset.version)
    x_test = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
    if view.format == format:
        artifact = stored
    elif view.format == "keras":
        from edgeops.train.trainer import load_keras

        model = load_keras(stored)
        if format == "tflite":
            artifact = keras_to_tflite_float(model)
        else:
            artifact = keras_to_onnx(model, check_inputs=x_test)
    else:
        raise UnsupportedExportError(
            f"model {view.ref} ({view.id}) is a .{view.format} model and cannot be exported as "
            f"{format}; export its Keras ancestor instead"
        )
    stored_card: dict[str, Any] = dict(view.card or {})
    config = dict(view.config)
    task = str(config.get("task") or stored_card.get("task") or dataset.task)
    metrics = dict(view.metrics)
    wanted = _EVAL_RUNTIME[card_runtime]
    # registered metrics without a runtime predate the field: measured on the format's
    scored_on = metrics.get("runtime") or _EVAL_RUNTIME[CARD_RUNTIMES[format][0]]
    if artifact is not stored or scored_on != wanted:
        try:
            metrics = _runtime_metrics(
                artifact, format, x_test, np.asarray(arrays.y_test), task, runtime=wanted
            )
        except RuntimeLoadError as exc:
            if card_runtime != "tflm":
                raise
            raise UnsupportedExportError(
                f"model {view.ref} ({view.id}) cannot run on {card_runtime}: {exc}"
            ) from exc
    lineage = {
        **dict(stored_card.get("lineage") or {}),
        "model_id": view.id,
        "dataset_version": view.dataset_version,
        "parent_id": view.parent_id,
        "run_id": view.run_id,
        "code_version": view.code_version,
        "source_format": view.format,
        "source_sha256": view.artifact_sha256,
        "artifact_sha256": hashlib.sha256(artifact).hexdigest(),
    }
    card = build_card(
        name=view.name,
        artifact=artifact,
        format=format,
        task=task,
        feature_rule=dataset.feature_rule,
        reference=stored_card.get("reference") or dataset.reference,
        sample_inputs=x_test,
        sample_labels=np.asarray(arrays.y_test),
        metrics=metrics,
        lineage=lineage,
        model_id=view.id,
        version=str(view.seq),
        runtime=card_runtime,
        extra={k: v for k, v in stored_card.items() if k == "compression"},
    )
    return ExportResult(artifact, format, card)


def _runtime_metrics(
    artifact: bytes,
    format: str,
    x_test: np.ndarray,
    y_test: np.ndarray,
    task: str,
    *,
    runtime: str,
) -> dict[str, Any]:
    """The exported artifact scored on ``runtime`` (LiteRT or tflite-micro for .tflite, ONNX
    Runtime for .onnx) over the test split: the evaluation report (its ``runtime`` names the
    runtime), plus the split it was measured on."""
    from edgeops.evaluate import evaluate_artifact

    report = evaluate_artifact(artifact, format, x_test, y_test, task=task, runtime=runtime)
    return {**report.to_dict(), "split": "test"}
