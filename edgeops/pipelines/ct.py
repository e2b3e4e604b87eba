"""The continuous-training pipeline: fresh field data in, a challenger out, released and
rolled out behind quality gates if it beats the champion.

The champion is the production version of a model name (``NAME@production``). Steps, each
one with the hub's own services (and each idempotent, as the runner requires):

``collect``   the raw input samples devices running any version of the champion's name sent
              in their telemetry windows' ``raw_samples`` (newest windows first, bounded;
              only those received after ``since``, waiting up to ``wait_seconds`` for
              ``max_samples`` of them), stored as one content-addressed artifact;
``label``     labelled by a :class:`~edgeops.pipelines.labeling.Labeler` (the simulated
              oracle, or a labelled-data file); unlabelled samples and repeated ones are
              dropped; the rest is split, seeded, into new training data and a recent
              hold-out set that shares no sample with it;
``retrain``   the reference dataset (the champion's training data) plus the new training
              samples become a new dataset version that keeps the reference's feature rule
              (devices preprocess as before); the champion's Keras ancestor's architecture,
              width, seed, epochs and batch size train on it (a version trained on the same
              dataset with the same settings is reused: training is seeded);
``compress``  with the champion's compression settings and device profile (reusing an
              identical earlier result); the challenger is registered as a candidate;
``evaluate``  champion and challenger on the hold-out set, each through its own dataset's
              feature rule, on LiteRT;
``decide``    the challenger wins if its score beats the champion's by at least ``margin``;
              a winner is promoted to staging; either way the reason is recorded;
``release``   a winner is exported and signed as a TUF target (``release_model``);
``rollout``   a canary rollout of that target to the devices running the champion, with the
              configured quality gates, created through the rollout engine (the hub's engine
              then carries it out; a rollout of the same name is reused);
``promote``   waits (up to ``promote_wait_seconds``) for that rollout to end; when it
              succeeded, every targeted device runs the challenger and it becomes the
              production version (the next run's champion); a failed or aborted rollout
              leaves the champion in production and says why.

Without a win, ``release``, ``rollout`` and ``promote`` succeed doing nothing and say why
not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlmodel import col, select

from edgeops.data.models import NAME_MAX_LENGTH
from edgeops.db import Database
from edgeops.pipelines.errors import CTConfigError, LabelingError, StepFailedError
from edgeops.pipelines.labeling import labeler_from_params
from edgeops.pipelines.runner import Pipeline, Step, StepContext

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.registry import ModelVersionView, Registry
    from edgeops.rollout import RolloutSpec
    from edgeops.store import ArtifactStore
    from edgeops.trust import TrustRepository

__all__ = [
    "CT_PIPELINE",
    "CTParams",
    "CTServices",
    "RolloutSettings",
    "ct_pipeline",
]

CT_PIPELINE = "ct"
COLLECT_POLL_S = 2.0
PROMOTE_POLL_S = 2.0
PROMOTE_TIMEOUT_S = 2 * 86_400.0  # the step's own bound; it waits promote_wait_seconds
RELEASE_RUNTIMES = ("litert", "onnx", "mcu")
_ROLLOUT_NAME = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class RolloutSettings:
    """The canary rollout a winning challenger gets."""

    enabled: bool = True
    canary_count: int = 1
    base_rate_per_minute: int = 10
    increment_factor: float = 2.0
    device_timeout_seconds: int = 600
    soak_seconds: int = 300
    promote_wait_seconds: int = 3600
    """How long the ``promote`` step waits for the rollout to end (0: it does not wait and
    does not promote)."""
    max_error_rate: float | None = 0.01
    max_latency_p95_ratio: float | None = 1.5
    max_psi: float | None = 0.25
    min_shadow_agreement: float | None = None


@dataclass(frozen=True)
class CTParams:
    """What one continuous-training run does; stored as the pipeline run's parameters."""

    model: str
    labeler: dict[str, Any]
    margin: float = 0.005
    epochs: int | None = None
    """Training epochs (None: the champion's)."""
    holdout: float = 0.5
    """Share of the newly labelled samples kept for the evaluation."""
    seed: int = 0
    """Seeds the split of the new samples into training data and hold-out set."""
    max_windows: int = 500
    max_samples: int = 5000
    min_samples: int = 20
    since: str | None = None
    """Collect only telemetry received after this moment (ISO 8601 with a time zone; e.g.
    the onset of a drift), None: the newest windows whenever they came."""
    wait_seconds: float = 0.0
    """How long ``collect`` waits for ``max_samples`` raw samples to arrive (after a drift
    onset the fresh samples are still coming in); then at least ``min_samples`` are needed.
    0: take what is there."""
    runtime: str | None = None
    """Release runtime: litert, onnx or mcu (None: mcu for a tflite-micro profile, else litert)."""
    hardware: dict[str, list[str]] = field(default_factory=dict)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise CTConfigError(
                "name the model to retrain (its production version is the champion)"
            )
        if not isinstance(self.labeler, dict) or "kind" not in self.labeler:
            raise CTConfigError("the labelling source must be given, e.g. {'kind': 'oracle'}")
        if not math.isfinite(self.margin) or not -1.0 <= self.margin <= 1.0:
            raise CTConfigError(f"margin must be between -1 and 1, got {self.margin}")
        if self.epochs is not None and self.epochs < 1:
            raise CTConfigError(f"epochs must be at least 1, got {self.epochs}")
        if not 0.0 < self.holdout < 1.0:
            raise CTConfigError(f"holdout must be between 0 and 1 (exclusive), got {self.holdout}")
        if not math.isfinite(self.wait_seconds) or not 0.0 <= self.wait_seconds <= 86_400.0:
            raise CTConfigError(
                f"wait_seconds must be between 0 and 86400, got {self.wait_seconds}"
            )
        for name in ("max_windows", "max_samples", "min_samples"):
            if getattr(self, name) < 1:
                raise CTConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.since is not None:
            self.since_time()
        if self.runtime is not None and self.runtime not in RELEASE_RUNTIMES:
            raise CTConfigError(
                f"unknown release runtime {self.runtime!r}; runtimes: {', '.join(RELEASE_RUNTIMES)}"
            )
        if self.rollout.canary_count < 1:
            raise CTConfigError(f"canary_count must be at least 1, got {self.rollout.canary_count}")

    def since_time(self) -> datetime | None:
        """``since`` as an aware datetime; CTConfigError if it is not ISO 8601 with a zone."""
        if self.since is None:
            return None
        try:
            moment = datetime.fromisoformat(self.since)
        except (TypeError, ValueError):
            raise CTConfigError(f"since must be an ISO 8601 time, got {self.since!r}") from None
        if moment.tzinfo is None:
            raise CTConfigError(f"since must name its time zone, got {self.since!r}")
        return moment

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CTParams:
        document = dict(data)
        rollout_value = document.pop("rollout", {}) or {}
        if not isinstance(rollout_value, Mapping):
            raise CTConfigError("rollout: must be an object of rollout settings")
        rollout_document = dict(rollout_value)
        for fields, given, what in (
            ({f.name for f in dataclasses.fields(cls)}, document, "continuous-training parameter"),
            (
                {f.name for f in dataclasses.fields(RolloutSettings)},
                rollout_document,
                "rollout setting",
            ),
        ):
            unknown = sorted(set(given) - fields)
            if unknown:
                raise CTConfigError(f"unknown {what}(s): {', '.join(unknown)}")
        document.setdefault("model", "")  # __post_init__ says what is missing
        document.setdefault("labeler", {})
        try:
            rollout = RolloutSettings(**rollout_document)
            return cls(**document, rollout=rollout)
        except TypeError as exc:
            raise CTConfigError(f"continuous-training parameters: {exc}") from None


RolloutStarter = Callable[["RolloutSpec"], str]
"""Creates a rollout from a spec; its id."""


@dataclass
class CTServices:
    """The hub services the pipeline's steps use."""

    database: Database
    store: ArtifactStore
    datasets: DatasetService
    registry: Registry
    repository: TrustRepository | None = None
    start_rollout: RolloutStarter | None = None
    """Default: :meth:`RolloutEngine.create` on the database, the repository's contract,
    no publisher (the hub's engine publishes the desired state when it ticks)."""
    list_rollouts: Callable[[], list[dict[str, Any]]] | None = None
    rollout_status: Callable[[str], dict[str, Any]] | None = None
    """Default: :meth:`RolloutEngine.status` on the database."""

    def status_of_rollouts(self) -> Callable[[str], dict[str, Any]]:
        if self.rollout_status is not None:
            return self.rollout_status
        from edgeops.rollout import RolloutEngine

        return RolloutEngine(self.database, None, repository=self.repository).status

    def rollout_starter(self) -> tuple[RolloutStarter, Callable[[], list[dict[str, Any]]]]:
        if self.start_rollout is not None:
            return self.start_rollout, self.list_rollouts or (lambda: [])
        from edgeops.rollout import RolloutEngine

        engine = RolloutEngine(self.database, None, repository=self.repository)
        return engine.create, engine.list_rollouts


def ct_pipeline(services: CTServices) -> Pipeline:
    """The continuous-training pipeline over ``services`` (see the module docstring)."""
    steps = _Steps(services)
    return Pipeline(
        CT_PIPELINE,
        [
            Step("collect", steps.collect, retries=2, backoff_s=2.0),
            Step("label", steps.label, after=("collect",), retries=1, backoff_s=2.0),
            Step("retrain", steps.retrain, after=("collect", "label"), timeout_s=3600.0),
            Step("compress", steps.compress, after=("collect", "retrain"), timeout_s=3600.0),
            Step("evaluate", steps.evaluate, after=("collect", "label", "compress")),
            Step("decide", steps.decide, after=("collect", "evaluate", "compress")),
            Step("release", steps.release, after=("decide", "compress"), retries=2),
            Step("rollout", steps.rollout, after=("collect", "decide", "release"), retries=2),
            Step(
                "promote",
                steps.promote,
                after=("decide", "rollout"),
                retries=2,
                timeout_s=PROMOTE_TIMEOUT_S,
            ),
        ],
    )


# -- the steps --------------------------------------------------------------------------------


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        return {key: loaded[key] for key in loaded.files}


def _label_values(names: list[str], classes: list[str]) -> np.ndarray:
    """Class names as the dataset service should see them, so that it keeps the class order:
    integers if every class is an integer (as for digits), else the names."""
    if all(re.fullmatch(r"-?\d+", c) for c in classes):
        return np.array([int(n) for n in names], dtype=np.int64)
    return np.array(names, dtype=str)


class _Steps:
    def __init__(self, services: CTServices) -> None:
        self.s = services

    def _params(self, context: StepContext) -> CTParams:
        return CTParams.from_dict(context.params)

    def _model(self, ref: str) -> ModelVersionView:
        return self.s.registry.get_model(ref)

    def _keras_ancestor(self, model: ModelVersionView) -> ModelVersionView:
        for version in self.s.registry.lineage(model.id):
            if version.format == "keras":
                return version
        raise StepFailedError(
            f"champion {model.ref} ({model.id}) has no Keras ancestor to retrain from"
        )

    # collect -----------------------------------------------------------------------------

    def collect(self, context: StepContext) -> dict[str, Any]:
        from edgeops.registry.errors import ModelNotFoundError

        params = self._params(context)
        try:
            champion = self._model(f"{params.model}@production")
        except ModelNotFoundError as exc:
            raise StepFailedError(
                f"no champion: {exc}; promote a version of {params.model!r} to production first"
            ) from None
        reference = self.s.datasets.resolve(champion.dataset_version)
        shape = tuple(reference.input_shape)
        size = int(np.prod(shape))
        deadline = time.monotonic() + params.wait_seconds
        while True:
            rows, devices, used, skipped, looked = self._raw_samples(champion.name, params, size)
            if len(rows) >= params.max_samples or time.monotonic() >= deadline:
                break
            time.sleep(min(COLLECT_POLL_S, max(0.0, deadline - time.monotonic())))
        if not rows:
            raise StepFailedError(
                f"no raw samples from devices running {champion.name} ({looked} telemetry "
                "windows looked at); set the agents' raw_sample_rate so that windows carry some"
            )
        if len(rows) < params.min_samples:
            raise StepFailedError(
                f"only {len(rows)} raw samples from devices running {champion.name} "
                f"(at least {params.min_samples} wanted, waited {params.wait_seconds:g} s)"
            )
        x = np.asarray(rows, dtype=np.float32).reshape((len(rows), *shape))
        digest = self.s.store.put_bytes(_npz(x=x))
        context.log(f"{len(rows)} raw samples from {len(devices)} devices, {used} windows")
        return {
            "champion": champion.id,
            "champion_ref": champion.ref,
            "champion_name": champion.name,
            "reference_dataset": reference.version,
            "samples_sha256": digest,
            "samples": len(rows),
            "windows": used,
            "devices": sorted(devices),
            "skipped_samples": skipped,
        }

    def _raw_samples(
        self, name: str, params: CTParams, size: int
    ) -> tuple[list[list[float]], set[str], int, int, int]:
        """The newest raw samples of the model family ``name`` (rows, devices, windows used,
        samples skipped, windows looked at)."""
        from edgeops.monitor.models import TelemetryWindowRecord
        from edgeops.registry.models import ModelVersion

        with self.s.database.session() as session:
            family = list(session.exec(select(ModelVersion.id).where(ModelVersion.name == name)))
            query = select(TelemetryWindowRecord).where(
                col(TelemetryWindowRecord.model_id).in_(family)
            )
            since = params.since_time()
            if since is not None:
                query = query.where(col(TelemetryWindowRecord.received_at) > since)
            windows = session.exec(
                query.order_by(
                    col(TelemetryWindowRecord.received_at).desc(),
                    col(TelemetryWindowRecord.device_id),
                    col(TelemetryWindowRecord.seq).desc(),
                ).limit(params.max_windows)
            ).all()
            rows: list[list[float]] = []
            devices: set[str] = set()
            skipped = 0
            used = 0
            for window in windows:
                samples = window.window.get("raw_samples") or []
                if samples:
                    used += 1
                    devices.add(window.device_id)
                for sample in samples:
                    if len(rows) >= params.max_samples:
                        break
                    if not isinstance(sample, list) or len(sample) != size:
                        skipped += 1
                        continue
                    rows.append([float(v) for v in sample])
        return rows, devices, used, skipped, len(windows)

    # label -------------------------------------------------------------------------------

    def label(self, context: StepContext) -> dict[str, Any]:
        params = self._params(context)
        collected = context.inputs["collect"]
        x = _load_npz(self.s.store.get_bytes(collected["samples_sha256"]))["x"]
        labeler_params = dict(params.labeler)
        if labeler_params.get("kind") == "oracle" and not labeler_params.get("dataset"):
            labeler_params["dataset"] = collected["reference_dataset"]
        labeler = labeler_from_params(labeler_params, self.s.datasets)
        names = labeler.label(x)
        if len(names) != len(x):
            raise LabelingError(f"the labelling source gave {len(names)} labels for {len(x)}")
        reference = self.s.datasets.resolve(collected["reference_dataset"])
        keep = [i for i, name in enumerate(names) if name is not None]
        unknown = sorted({str(names[i]) for i in keep} - set(reference.classes))
        if unknown:
            raise LabelingError(
                f"labels {', '.join(unknown[:5])} are not classes of the champion's dataset "
                f"({', '.join(reference.classes)})"
            )
        if len(keep) < params.min_samples:
            raise StepFailedError(
                f"only {len(keep)} of {len(x)} samples could be labelled; at least "
                f"{params.min_samples} are needed"
            )
        # a device may send the same sample twice: one copy each, so that no sample is on
        # both sides of the split (the hold-out must be unseen data)
        _, first = np.unique(x[keep].reshape(len(keep), -1), axis=0, return_index=True)
        duplicates = len(keep) - len(first)
        keep = [keep[i] for i in sorted(first.tolist())]
        if len(keep) < params.min_samples:
            raise StepFailedError(
                f"only {len(keep)} distinct labelled samples; at least {params.min_samples} "
                "are needed"
            )
        labelled_x = x[keep]
        labels = np.array([str(names[i]) for i in keep], dtype=str)
        order = np.random.default_rng(params.seed).permutation(len(keep))
        n_holdout = max(1, min(len(keep) - 1, round(len(keep) * params.holdout)))
        hold, train = order[:n_holdout], order[n_holdout:]
        train_digest = self.s.store.put_bytes(_npz(x=labelled_x[train], y=labels[train]))
        hold_digest = self.s.store.put_bytes(_npz(x=labelled_x[hold], y=labels[hold]))
        context.log(
            f"labelled {len(keep)} distinct of {len(x)}: {len(train)} to train, "
            f"{len(hold)} held out"
        )
        return {
            "labeler": labeler.describe(),
            "duplicates": duplicates,
            "labelled": len(keep),
            "unlabelled": len(x) - len(keep),
            "train_sha256": train_digest,
            "train": len(train),
            "holdout_sha256": hold_digest,
            "holdout": len(hold),
        }

    # retrain -----------------------------------------------------------------------------

    def retrain(self, context: StepContext) -> dict[str, Any]:
        from edgeops.train import TrainService

        params = self._params(context)
        collected, labelled = context.inputs["collect"], context.inputs["label"]
        champion = self._model(collected["champion"])
        keras = self._keras_ancestor(champion)
        config = keras.config
        reference = self.s.datasets.resolve(keras.dataset_version)
        arrays = self.s.datasets.load(reference.version)
        new = _load_npz(self.s.store.get_bytes(labelled["train_sha256"]))
        # the reference's test split stays held out: champion and challenger can be
        # compared on data neither trained on
        x_ref = np.concatenate([arrays.x_train, arrays.x_val])
        y_ref = np.concatenate([arrays.y_train, arrays.y_val])
        names = [arrays.classes[int(i)] for i in y_ref] + [str(v) for v in new["y"].tolist()]
        x = np.concatenate([x_ref, new["x"].astype(np.float32)])
        name = f"{reference.name.removesuffix('-ct')[: NAME_MAX_LENGTH - 3]}-ct"
        dataset = self.s.datasets.register_samples(
            name,
            x,
            _label_values(names, arrays.classes),
            feature_rule=reference.feature_rule,
            source=(
                f"continuous training of {keras.name}: dataset {reference.short_version} and "
                f"{len(new['x'])} labelled device samples"
            ),
            seed=reference.split_seed,
        )
        settings: dict[str, Any] = {
            "arch": str(config["arch"]),
            "epochs": int(params.epochs or config.get("epochs") or 10),
            "seed": int(config.get("seed", 0)),
            "width": float(config.get("width", 1.0)),
            "batch_size": int(config.get("batch_size", 32)),
        }
        existing = [
            version
            for version in self.s.registry.list_models(name=keras.name)
            if version.format == "keras"
            and version.dataset_version == dataset.version
            and all(version.config.get(k) == v for k, v in settings.items())
        ]
        if existing:
            trained, reused = existing[-1], True
            context.log(f"reusing {trained.ref}, trained on the same data with the same settings")
        else:
            trained = TrainService(self.s.datasets, self.s.registry).train(
                dataset.version,
                settings["arch"],
                epochs=settings["epochs"],
                seed=settings["seed"],
                width=settings["width"],
                batch_size=settings["batch_size"],
                name=keras.name,
                progress=False,
                evaluate_on_runtime=False,
            )
            reused = False
        return {
            "dataset": dataset.version,
            "dataset_name": dataset.name,
            "dataset_samples": dataset.num_samples,
            "champion_keras": keras.id,
            "keras_model": trained.id,
            "keras_ref": trained.ref,
            "settings": settings,
            "reused": reused,
        }

    # compress ----------------------------------------------------------------------------

    def compress(self, context: StepContext) -> dict[str, Any]:
        from edgeops.compress import CompressService

        collected, trained = context.inputs["collect"], context.inputs["retrain"]
        champion = self._model(collected["champion"])
        compression = champion.config.get("compression")
        keras = self._model(trained["keras_model"])
        if not isinstance(compression, Mapping):
            return {"challenger": keras.id, "challenger_ref": keras.ref, "compression": None,
                    "reused": True}  # fmt: skip
        profile = compression.get("profile")
        settings: dict[str, Any] = {
            "quantize": str(compression.get("requested") or compression.get("quantization")),
            "sparsity": compression.get("sparsity"),
            "clusters": compression.get("clusters"),
            "qat": bool(compression.get("qat_requested", compression.get("qat", False))),
            "max_loss_pp": float(compression.get("max_loss_pp", 1.0)),
            "epochs": int(compression.get("fine_tune_epochs", 2)),
            "seed": int(compression.get("seed", 0)),
            "profile": profile.get("name") if isinstance(profile, Mapping) else None,
        }
        for version in self.s.registry.list_models():
            done = version.config.get("compression")
            if (
                version.parent_id == keras.id
                and isinstance(done, Mapping)
                and done.get("requested") == settings["quantize"]
                and done.get("sparsity") == settings["sparsity"]
                and done.get("clusters") == settings["clusters"]
                and done.get("qat_requested") == settings["qat"]
            ):
                context.log(f"reusing {version.ref}, compressed the same way")
                return {"challenger": version.id, "challenger_ref": version.ref,
                        "compression": settings, "reused": True}  # fmt: skip
        challenger = CompressService(self.s.datasets, self.s.registry).compress(
            keras.id,
            quantize=settings["quantize"],
            sparsity=settings["sparsity"],
            clusters=settings["clusters"],
            qat=settings["qat"],
            max_loss_pp=settings["max_loss_pp"],
            epochs=settings["epochs"],
            seed=settings["seed"],
            profile=settings["profile"],
            progress=False,
        )
        return {
            "challenger": challenger.id,
            "challenger_ref": challenger.ref,
            "compression": settings,
            "reused": False,
        }

    # evaluate ----------------------------------------------------------------------------

    def _score(self, model: ModelVersionView, x: np.ndarray, names: list[str]) -> float:
        from edgeops.compress.service import model_task, score_key
        from edgeops.data import labels_to_indices
        from edgeops.evaluate import evaluate_artifact

        dataset = self.s.datasets.resolve(model.dataset_version)
        y = labels_to_indices(
            _label_values(names, dataset.classes), dataset.classes, what="the hold-out labels"
        )
        task = model_task(model.config)
        report = evaluate_artifact(
            self.s.registry.load_artifact(model.id),
            model.format,
            dataset.feature_rule.apply(x),
            y,
            task=task,
            latency_repeats=1,
        )
        value = report.to_dict().get(score_key(task))
        if value is None:
            raise StepFailedError(f"the evaluation of {model.ref} has no {score_key(task)}")
        return float(value)

    def evaluate(self, context: StepContext) -> dict[str, Any]:
        from edgeops.compress.service import model_task, score_key

        collected, labelled = context.inputs["collect"], context.inputs["label"]
        compressed = context.inputs["compress"]
        holdout = _load_npz(self.s.store.get_bytes(labelled["holdout_sha256"]))
        x, names = holdout["x"], [str(v) for v in holdout["y"].tolist()]
        champion = self._model(collected["champion"])
        challenger = self._model(compressed["challenger"])
        champion_score = self._score(champion, x, names)
        challenger_score = self._score(challenger, x, names)
        context.log(
            f"on {len(x)} recent samples: champion {champion_score:.4f}, "
            f"challenger {challenger_score:.4f}"
        )
        return {
            "metric": score_key(model_task(champion.config)),
            "samples": len(x),
            "champion": champion.id,
            "champion_score": champion_score,
            "challenger": challenger.id,
            "challenger_score": challenger_score,
            "delta": challenger_score - champion_score,
        }

    # decide ------------------------------------------------------------------------------

    def decide(self, context: StepContext) -> dict[str, Any]:
        from edgeops.registry.stages import Stage

        params = self._params(context)
        scores = context.inputs["evaluate"]
        challenger = self._model(context.inputs["compress"]["challenger"])
        delta = float(scores["delta"])
        metric = scores["metric"]
        wins = delta >= params.margin
        comparison = (
            f"challenger {challenger.ref} {metric} {scores['challenger_score']:.4f} vs champion "
            f"{context.inputs['collect']['champion_ref']} {scores['champion_score']:.4f} on "
            f"{scores['samples']} recent samples: {delta * 100:+.2f} pp"
        )
        if wins:
            reason = f"{comparison}, at least the margin of {params.margin * 100:+.2f} pp"
            if challenger.stage == Stage.CANDIDATE.value:
                challenger = self.s.registry.promote(challenger.id, Stage.STAGING.value)
        else:
            reason = (
                f"{comparison}, below the margin of {params.margin * 100:+.2f} pp: not released"
            )
        context.log(reason)
        return {
            "promote": wins,
            "reason": reason,
            "margin": params.margin,
            "challenger": challenger.id,
            "challenger_stage": challenger.stage,
        }

    # release -----------------------------------------------------------------------------

    def release(self, context: StepContext) -> dict[str, Any]:
        from edgeops.trust.errors import MetadataError
        from edgeops.trust.release import release_model, target_path

        params = self._params(context)
        decision = context.inputs["decide"]
        if not decision["promote"]:
            return {"released": False, "reason": decision["reason"]}
        if self.s.repository is None:
            raise StepFailedError("no release repository to release the challenger into")
        challenger = self._model(decision["challenger"])
        runtime = params.runtime or self._runtime(challenger)
        path = target_path(challenger.name, challenger.seq, runtime)
        try:
            target = self.s.repository.get_target(path)
        except MetadataError:
            released = release_model(
                self.s.repository,
                challenger.id,
                registry=self.s.registry,
                datasets=self.s.datasets,
                runtime=runtime,
                hardware=params.hardware or None,
            )
            return {"released": True, "target": released.path, "sha256": released.sha256,
                    "length": released.length, "runtime": runtime, "reused": False}  # fmt: skip
        return {"released": True, "target": target.path, "sha256": target.hashes.get("sha256"),
                "length": target.length, "runtime": runtime, "reused": True}  # fmt: skip

    @staticmethod
    def _runtime(model: ModelVersionView) -> str:
        compression = model.config.get("compression")
        profile = compression.get("profile") if isinstance(compression, Mapping) else None
        if isinstance(profile, Mapping) and profile.get("runtime") == "tflm":
            return "mcu"
        return "litert"

    # rollout -----------------------------------------------------------------------------

    def rollout(self, context: StepContext) -> dict[str, Any]:
        from edgeops.rollout import parse_spec

        params = self._params(context)
        settings = params.rollout
        released = context.inputs["release"]
        if not released["released"]:
            return {"rollout": None, "reason": released["reason"]}
        if not settings.enabled:
            return {"rollout": None, "reason": "rollouts are disabled for this run"}
        champion = context.inputs["collect"]["champion"]
        challenger = self._model(context.inputs["decide"]["challenger"])
        name = _ROLLOUT_NAME.sub("-", f"ct-{challenger.name}-{challenger.seq}")[-63:]
        name = name.lstrip("-_.") or "ct"
        gates: dict[str, Any] = {"soak_seconds": settings.soak_seconds}
        if settings.max_error_rate is not None:
            gates["max_error_rate"] = settings.max_error_rate
        if settings.max_latency_p95_ratio is not None:
            gates["max_latency_p95_ratio"] = settings.max_latency_p95_ratio
        if settings.max_psi is not None:
            gates["divergence"] = {"metric": "psi", "max": settings.max_psi}
        if settings.min_shadow_agreement is not None:
            gates["min_shadow_agreement"] = settings.min_shadow_agreement
        document = {
            "name": name,
            "release": released["target"],
            "selection": {"current_model": champion},
            "waves": {
                "canary": {"count": settings.canary_count},
                "exponential": {
                    "base_rate_per_minute": settings.base_rate_per_minute,
                    "increment_factor": settings.increment_factor,
                },
            },
            "device_timeout_seconds": settings.device_timeout_seconds,
            "gates": gates,
        }
        spec = parse_spec(json.dumps(document), "json")
        start, existing = self.s.rollout_starter()
        for rollout in existing():
            if rollout.get("name") == name and rollout.get("release") == released["target"]:
                return {"rollout": rollout["id"], "name": name, "spec": spec.to_dict(),
                        "reused": True}  # fmt: skip
        rollout_id = start(spec)
        context.log(f"canary rollout {rollout_id} ({name}) of {released['target']} created")
        return {"rollout": rollout_id, "name": name, "spec": spec.to_dict(), "reused": False}

    # promote -----------------------------------------------------------------------------

    def promote(self, context: StepContext) -> dict[str, Any]:
        params = self._params(context)
        rolled = context.inputs["rollout"]
        rollout_id = rolled.get("rollout")
        if not rollout_id:
            return {"promoted": False, "reason": rolled.get("reason") or "nothing rolled out"}
        wait = params.rollout.promote_wait_seconds
        if wait <= 0:
            return {"promoted": False, "rollout": rollout_id,
                    "reason": "not waited for the rollout (promote_wait_seconds 0): promote "
                              "the challenger by hand once it succeeded"}  # fmt: skip
        status_of = self.s.status_of_rollouts()
        deadline = time.monotonic() + wait
        while True:
            status = status_of(str(rollout_id))
            state = status.get("status")
            if state == "succeeded":
                break
            if state in ("failed", "aborted"):
                return {
                    "promoted": False,
                    "rollout": rollout_id,
                    "reason": f"rollout {rollout_id} {state}: {status.get('reason')}",
                }
            if time.monotonic() >= deadline:
                raise StepFailedError(
                    f"rollout {rollout_id} still {state} after {wait} s; the challenger is "
                    "not promoted (resume the run once the rollout ended)"
                )
            time.sleep(PROMOTE_POLL_S)
        challenger = self._model(context.inputs["decide"]["challenger"])
        if challenger.stage != "production":
            challenger = self.s.registry.promote(challenger.id, "production")
        context.log(f"rollout {rollout_id} succeeded: {challenger.ref} is in production")
        return {"promoted": True, "rollout": rollout_id, "model": challenger.id,
                "stage": challenger.stage}  # fmt: skip
