"""The compression service: one compressed model version per call, recorded with lineage.

``compress`` loads a Keras model version, optionally prunes it and/or fine-tunes it with
quantization-aware training, quantizes it, scores it on the device runtime and registers the
.tflite as a new version whose parent is the Keras one, all inside one registry run. The
device runtime is LiteRT, or, when compressing for a device profile whose runtime is ``tflm``
(``profile=``), the tflite-micro interpreter: then every score (float baseline, fallback
attempts, test split) is TFLM's, the metrics say ``"runtime": "tflm"``, the card's runtime is
``tflm`` and ``config.compression.profile`` names the profile. The int8 fallback policy is in
:mod:`edgeops.compress.policy`.

Compressed versions are named ``<parent name>[-p<S>][-c<K>][-qat]-<mode>``: ``-p50`` for 50 %
pruning, ``-c16`` for 16 weight clusters, ``-qat`` when the chosen variant was fine-tuned with
quantization-aware training (asked for with ``qat=True`` or picked by the int8 fallback
policy). The parent's name keeps naming the Keras model that can be compressed again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeops.compress._progress import Steps
from edgeops.compress.errors import CompressError, NotCompressibleError, PruningError
from edgeops.compress.policy import Attempt, decide, next_variant
from edgeops.compress.profiles import get_profile
from edgeops.compress.prune import (
    check_clusters,
    cluster,
    distinct_kernel_values,
    kernel_sparsity,
    prune,
    quantization_aware,
)
from edgeops.compress.quantize import check_mode, representative_sample
from edgeops.compress.quantize import quantize as to_tflite

if TYPE_CHECKING:
    from device_agent.card import ModelCard
    from edgeops.compress.search import SearchResult
    from edgeops.data import DatasetService
    from edgeops.evaluate import EvalReport
    from edgeops.registry import Registry
    from edgeops.registry.models import ModelVersionView

__all__ = ["CompressService", "compressed_name", "model_task", "score_key"]


def model_task(config: dict[str, Any]) -> str:
    """The task of a model version from its config: ``classification`` or ``anomaly``."""
    task = config.get("task")
    if isinstance(task, str):
        return task
    arch = config.get("architecture") or config.get("arch")
    return "anomaly" if arch == "autoencoder" else "classification"


def score_key(task: str) -> str:
    """The evaluation metric that scores a task: ``auc`` for anomaly detection."""
    return "auc" if task == "anomaly" else "accuracy"


def compressed_name(
    parent_name: str,
    mode: str,
    sparsity: float | None,
    *,
    clusters: int | None = None,
    qat: bool = False,
) -> str:
    """``<parent>[-p<S>][-c<K>][-qat]-<mode>``, e.g. ``digits-cnn-p50-c16-qat-int8``."""
    pruned = f"-p{round(sparsity * 100)}" if sparsity else ""
    clustered = f"-c{clusters}" if clusters else ""
    trained = "-qat" if qat else ""
    return f"{parent_name}{pruned}{clustered}{trained}-{mode}"


_RUNTIME_NAMES = {"litert": "LiteRT", "tflm": "tflite-micro"}


def _score(report: Any, key: str) -> float:
    value = report.to_dict().get(key)
    if value is None:
        raise NotCompressibleError(f"the evaluation report has no {key!r}")
    return float(value)


class CompressService:
    """Compresses registered Keras model versions."""

    def __init__(self, datasets: DatasetService, registry: Registry) -> None:
        self._datasets = datasets
        self._registry = registry

    def _keras_parent(self, model_ref: str) -> ModelVersionView:
        parent = self._registry.get_model(model_ref)
        if parent.format != "keras":
            keras = [m for m in self._registry.lineage(parent.id) if m.format == "keras"]
            hint = f"; compress its Keras ancestor {keras[0].id} ({keras[0].ref})" if keras else ""
            raise NotCompressibleError(
                f"model {parent.id} ({parent.ref}) is a {parent.format} model, not Keras{hint}"
            )
        return parent

    def compress(
        self,
        model_ref: str,
        *,
        quantize: str,
        sparsity: float | None = None,
        clusters: int | None = None,
        qat: bool = False,
        max_loss_pp: float = 1.0,
        epochs: int = 2,
        seed: int = 0,
        profile: str | None = None,
        profiles_file: Path | None = None,
        progress: bool = True,
    ) -> ModelVersionView:
        """Compress ``model_ref`` into a new .tflite model version and return it.

        ``epochs`` is the fine-tuning length of pruning, of weight clustering and of
        quantization-aware training. ``clusters`` clusters every prunable kernel into that
        many shared values after pruning (zeros preserved), before quantization.
        Metrics of the new version are on the test split on the device runtime, plus the
        float model's on the same split and runtime (``float_*``) and the loss in percentage
        points. The device runtime is LiteRT, or the tflite-micro interpreter when
        ``profile`` names a device profile whose runtime is ``tflm`` (a variant TFLM cannot
        run is then a :class:`NotCompressibleError`).
        """
        from edgeops.evaluate import RuntimeLoadError, evaluate_artifact
        from edgeops.export.convert import keras_to_tflite_float
        from edgeops.train.trainer import load_keras

        requested = check_mode(quantize)
        device = None if profile is None else get_profile(profile, profiles_file)
        runtime = "tflm" if device is not None and device.runtime == "tflm" else "litert"
        on_runtime = _RUNTIME_NAMES[runtime]

        def evaluate(artifact: bytes, x: np.ndarray, y: np.ndarray, what: str) -> EvalReport:
            try:
                return evaluate_artifact(artifact, "tflite", x, y, task=task, runtime=runtime)
            except RuntimeLoadError as exc:
                raise NotCompressibleError(
                    f"{what} cannot be scored on {on_runtime} for device profile {profile!r}: {exc}"
                ) from exc

        if sparsity is not None and not 0.0 < sparsity < 1.0:
            raise PruningError(f"sparsity must be between 0 and 1 (exclusive), not {sparsity}")
        if clusters is not None:
            check_clusters(clusters)
        if not math.isfinite(max_loss_pp):
            raise CompressError(f"max_loss_pp must be a finite number, not {max_loss_pp}")
        if epochs < 1:
            raise PruningError(f"fine-tuning needs at least 1 epoch, not {epochs}")
        parent = self._keras_parent(model_ref)
        task = model_task(parent.config)
        key = score_key(task)
        arrays = self._datasets.load(parent.dataset_version)
        x_val = np.asarray(arrays.model_inputs("val"), dtype=np.float32)
        x_test = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
        representative = representative_sample(arrays.model_inputs("train"))
        params = {
            "model": parent.id,
            "quantize": requested,
            "sparsity": sparsity,
            "clusters": clusters,
            "qat": qat,
            "max_loss_pp": max_loss_pp,
            "epochs": epochs,
            "seed": seed,
            "profile": profile,
        }
        total = 4 + (1 if sparsity else 0) + (1 if clusters else 0) + (1 if qat else 0)
        with (
            self._registry.start_run("compress", params) as run,
            Steps(total, f"compress {parent.ref}", enabled=progress) as steps,
        ):
            steps.start(f"float baseline on {on_runtime}")
            keras_model = load_keras(self._registry.load_artifact(parent.id))
            float_tflite = keras_to_tflite_float(keras_model)
            float_val = _score(evaluate(float_tflite, x_val, arrays.y_val, "the float model"), key)
            run.log(f"float model: validation {key} {float_val:.4f} on {on_runtime}")
            steps.done()
            base = keras_model
            if sparsity:
                steps.start(f"pruning to {sparsity:.0%}")
                base = prune(keras_model, arrays, sparsity=sparsity, epochs=epochs, seed=seed)
                run.log(f"pruned to kernel sparsity {kernel_sparsity(base):.3f}")
                steps.done()
            if clusters:
                steps.start(f"clustering weights into {clusters} values")
                base = cluster(base, arrays, clusters=clusters, epochs=epochs, seed=seed)
                run.log(
                    f"clustered: at most {distinct_kernel_values(base)} distinct values per "
                    f"kernel (zero included), kernel sparsity {kernel_sparsity(base):.3f}"
                )
                steps.done()
            qat_model: Any = None

            def variant(use_qat: bool) -> Any:
                nonlocal qat_model
                if not use_qat:
                    return base
                if qat_model is None:
                    steps.start("quantization-aware training")
                    qat_model = quantization_aware(
                        base, arrays, epochs=epochs, seed=seed, clustered=bool(clusters)
                    )
                    steps.done()
                return qat_model

            attempts: list[Attempt] = []
            artifacts: dict[tuple[str, bool], bytes] = {}
            while (step := next_variant(requested, qat, attempts, max_loss_pp)) is not None:
                mode, use_qat = step
                if attempts:
                    steps.add(2 if use_qat and qat_model is None else 1)
                model = variant(use_qat)
                steps.start(f"{'QAT ' if use_qat else ''}{mode} quantization")
                flatbuffer = to_tflite(model, mode, representative)
                label = f"{'QAT ' if use_qat else ''}{mode}"
                score = _score(evaluate(flatbuffer, x_val, arrays.y_val, f"the {label} model"), key)
                attempt = Attempt(mode, use_qat, score, (float_val - score) * 100, len(flatbuffer))
                attempts.append(attempt)
                artifacts[step] = flatbuffer
                run.log(f"{attempt.label}: validation {key} {score:.4f}, {attempt.loss_pp:+.2f} pp")
                steps.done()
            decision = decide(attempts, max_loss_pp, key, on_runtime)
            chosen = decision.chosen
            run.log(decision.reason)
            steps.start(f"test split on {on_runtime}")
            tflite = artifacts[(chosen.mode, chosen.qat)]
            report = evaluate(tflite, x_test, arrays.y_test, f"the {chosen.label} model")
            float_report = evaluate(float_tflite, x_test, arrays.y_test, "the float model")
            steps.done()
            chosen_model = variant(chosen.qat)
            test_score = _score(report, key)
            float_test = _score(float_report, key)
            metrics: dict[str, Any] = {
                **report.to_dict(),
                f"val_{key}": chosen.score,
                f"float_{key}": float_test,
                f"float_val_{key}": float_val,
                "float_size_bytes": float_report.size_bytes,
                "float_gzip_bytes": float_report.gzip_bytes,
                "loss_pp": (float_test - test_score) * 100,
                "val_loss_pp": chosen.loss_pp,
                "kernel_sparsity": kernel_sparsity(chosen_model),
            }
            if clusters:
                metrics["kernel_distinct_values"] = distinct_kernel_values(base)
            compression = {
                "requested": requested,
                "quantization": chosen.mode,
                "qat": chosen.qat,
                "qat_requested": qat,
                "label": chosen.label,
                "sparsity": sparsity,
                "clusters": clusters,
                "max_loss_pp": max_loss_pp,
                "within_limit": decision.within_limit,
                "reason": decision.reason,
                "attempts": [a.to_dict() for a in attempts],
                "fine_tune_epochs": epochs,
                "seed": seed,
                "representative_samples": len(representative),
            }
            if device is not None:
                compression["profile"] = {"name": device.name, "runtime": device.runtime}
            run.log_metrics(metrics)
            name = compressed_name(
                parent.name, chosen.mode, sparsity, clusters=clusters, qat=chosen.qat
            )
            steps.start("model card")
            card = self._card(
                name, tflite, task, arrays, x_val, x_test, metrics, compression, runtime
            )
            steps.done()
            return self._registry.register_model(
                name=name,
                artifact=tflite,
                format="tflite",
                run_id=run.id,
                dataset_version=parent.dataset_version,
                parent_id=parent.id,
                config={**parent.config, "compression": compression},
                metrics=metrics,
                card=card,
            )

    def _card(
        self,
        name: str,
        tflite: bytes,
        task: str,
        arrays: Any,
        x_val: np.ndarray,
        x_test: np.ndarray,
        metrics: dict[str, Any],
        compression: dict[str, Any],
        runtime: str,
    ) -> ModelCard:
        """The compressed model's card: the metrics as measured on ``runtime`` (its runtime
        field), test vectors and output reference (class and confidence histograms, or the
        reconstruction-error histogram) on LiteRT."""
        from edgeops.evaluate import load_runner
        from edgeops.export.card import build_card
        from edgeops.train.service import output_reference

        reference = output_reference(
            self._datasets.resolve(arrays.version).reference,
            load_runner(tflite, "tflite").run(x_val),
            x_val,
            task,
        )
        return build_card(
            name=name,
            artifact=tflite,
            format="tflite",
            task=task,
            feature_rule=arrays.feature_rule,
            reference=reference,
            sample_inputs=x_test,
            sample_labels=arrays.y_test,
            metrics=metrics,
            runtime=runtime,
            extra={"compression": compression},
        )

    def search(
        self,
        model_ref: str,
        profile: str,
        *,
        profiles_file: Path | None = None,
        widths: tuple[float, ...] | None = None,
        sparsities: tuple[float, ...] = (0.0, 0.5),
        modes: tuple[str, ...] | None = None,
        epochs: int | None = None,
        fine_tune_epochs: int = 1,
        seed: int = 0,
        workers: int = 2,
        progress: bool = True,
    ) -> SearchResult:
        """Search width x sparsity x quantization for ``profile``; see :mod:`.search`."""
        from edgeops.compress.search import run_search

        parent = self._keras_parent(model_ref)
        return run_search(
            self._datasets,
            self._registry,
            parent,
            profile,
            profiles_file=profiles_file,
            widths=widths,
            sparsities=sparsities,
            modes=modes,
            epochs=epochs,
            fine_tune_epochs=fine_tune_epochs,
            seed=seed,
            workers=workers,
            progress=progress,
        )
