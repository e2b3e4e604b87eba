"""`/api/v1/runs` and `/api/v1/models`: the registry, as ``edgeops runs|models ... --json``.

A model is named by a reference: ``m-<12 hex>`` (that version), ``NAME`` (its newest version),
``NAME:SEQ`` or ``NAME@STAGE`` (the newest version in that stage).

- ``GET /runs?kind=`` and ``GET /runs/{run_id}``: recorded runs (the list without log lines).
- ``GET /models?name=&stage=``: model versions, without their cards (``has_card`` says).
- ``GET /models/{ref}``: one version with its card and lineage (``edgeops models show``).
- ``GET /models/{ref}/lineage``: the chain from the version up through its parents.
- ``GET /models/{ref}/card``: the model card stored with the version in the registry.
- ``GET /models/{ref}/compression``: what compression made of or measured for the version:
  the compressed versions registered with it as their parent (size, accuracy, RAM, latency)
  and the budget-aware searches run on it (each search run's Pareto front).
- ``POST /models/{ref}/promote`` ``{"stage": ...}``: the stage rules of ``edgeops models
  promote`` (operator): 400 for an unknown stage, 409 for a promotion the rules forbid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum, StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.routes.datasets import Context, Operator, Viewer, problems
from edgeops.registry.errors import (
    InvalidStageTransitionError,
    ModelNotFoundError,
    RegistryError,
    RunNotFoundError,
    UnknownStageError,
)
from edgeops.registry.models import MODEL_NAME_MAX_LENGTH, ModelVersionView

router = APIRouter()
_MODELS: list[str | Enum] = ["models"]
_RUNS: list[str | Enum] = ["runs"]


class StageName(StrEnum):
    candidate = "candidate"
    staging = "staging"
    production = "production"
    archived = "archived"


# -- response models ------------------------------------------------------------------------------


class RunSummary(BaseModel):
    """A recorded run (``edgeops runs list --json``)."""

    id: str = Field(description="r-<12 hex>")
    kind: str = Field(description="what ran: train, compress, search ...")
    status: str = Field(description="running, succeeded or failed")
    params: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None = Field(description="why it failed")
    code_version: str = Field(description="git:<commit>[+dirty] or package:<version>")
    started_at: datetime
    ended_at: datetime | None
    duration_s: float | None
    model_ids: list[str] = Field(description="the model versions the run registered")


class RunDetail(RunSummary):
    """One run with its log lines (``edgeops runs show --json``)."""

    logs: list[str]


class ModelSummary(BaseModel):
    """A model version without its card (``edgeops models list --json``)."""

    id: str = Field(description="m-<12 hex>")
    name: str
    seq: int = Field(description="1, 2, 3 ... per name, in registration order")
    ref: str = Field(description="NAME:SEQ")
    stage: StageName
    format: str = Field(description="keras, tflite or onnx")
    artifact_sha256: str
    size_bytes: int
    run_id: str
    dataset_version: str
    parent_id: str | None
    code_version: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    has_card: bool
    created_at: datetime
    updated_at: datetime = Field(description="when the stage last changed")


class ModelDetail(ModelSummary):
    """One model version with its card and lineage (``edgeops models show --json``)."""

    card: dict[str, Any] | None = Field(description="the model card, or null")
    lineage: list[ModelSummary] = Field(description="this version, its parent, ...")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str = Field(
        min_length=1,
        max_length=32,
        description="staging, production or archived: one step forward, or archived",
        examples=["staging"],
    )


class PromoteResult(BaseModel):
    """What a promotion changed (``edgeops models promote --json``)."""

    model: ModelSummary
    from_stage: StageName
    to_stage: StageName
    archived: list[str] = Field(
        description="versions of the same name moved from production to archived"
    )


class CompressedPoint(BaseModel):
    """A compressed version of the model, as measured on its runtime when registered."""

    model_id: str
    ref: str
    label: str | None = Field(description="the variant chosen, e.g. 'QAT int8'")
    quantization: str | None
    sparsity: float | None
    size_bytes: int = Field(description="the artifact's size (flash)")
    accuracy: float | None = Field(description="test split (AUC for anomaly models)")
    ram_bytes: int | None = Field(description="TFLite Micro arena, when it can plan the model")
    latency_ms: float | None = Field(description="median invoke on the hub's CPU")


class SearchRun(BaseModel):
    """A budget-aware search over the model (a registry run of kind ``search``)."""

    run_id: str
    status: str
    started_at: datetime
    profile: dict[str, Any] | None = Field(description="the device profile searched for")
    candidates: int | None = Field(description="candidates evaluated")
    fitting: int | None = Field(description="candidates fitting the profile")
    front: list[dict[str, Any]] = Field(
        description="the Pareto front over accuracy, flash, RAM and latency"
    )


class Compression(BaseModel):
    model_id: str
    ref: str
    baseline: CompressedPoint = Field(description="the model itself")
    compressed: list[CompressedPoint]
    searches: list[SearchRun]


RunId = Annotated[
    str, Path(description="the run id, r-<12 hex>", pattern=r"^r-[0-9a-f]{12}$", max_length=14)
]
ModelRef = Annotated[
    str,
    Path(
        description="m-<12 hex>, NAME (newest), NAME:SEQ or NAME@STAGE",
        min_length=1,
        max_length=MODEL_NAME_MAX_LENGTH + 17,
        pattern=rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MODEL_NAME_MAX_LENGTH - 1}}}"
        r"(:[0-9]{1,9}|@[A-Za-z]{1,16})?$",
    ),
]


# -- helpers --------------------------------------------------------------------------------------


@contextmanager
def _not_found() -> Iterator[None]:
    """ModelNotFoundError and RunNotFoundError (and an unknown stage in NAME@STAGE) as 404."""
    try:
        yield
    except (ModelNotFoundError, RunNotFoundError, UnknownStageError) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None


def _summary(model: ModelVersionView) -> dict[str, Any]:
    document = model.to_dict()
    document["has_card"] = document.pop("card") is not None
    document["ref"] = model.ref
    return document


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _point(model: ModelVersionView) -> dict[str, Any]:
    metrics = model.metrics
    compression = model.config.get("compression")
    compression = compression if isinstance(compression, dict) else {}
    accuracy = _number(metrics.get("accuracy"))
    ram = metrics.get("arena_bytes")
    sparsity = compression.get("sparsity")
    return {
        "model_id": model.id,
        "ref": model.ref,
        "label": compression.get("label") if isinstance(compression.get("label"), str) else None,
        "quantization": compression.get("quantization")
        if isinstance(compression.get("quantization"), str)
        else None,
        "sparsity": _number(sparsity),
        "size_bytes": model.size_bytes,
        "accuracy": accuracy if accuracy is not None else _number(metrics.get("auc")),
        "ram_bytes": ram if isinstance(ram, int) and not isinstance(ram, bool) else None,
        "latency_ms": _number(metrics.get("latency_ms_median")),
    }


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- runs -----------------------------------------------------------------------------------------


@router.get("/runs", response_model=list[RunSummary], responses=problems(), tags=_RUNS)
def list_runs(
    ctx: Context,
    who: Viewer,
    kind: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$",
            description="only runs of this kind (train, compress, search, pipeline-step ...)",
        ),
    ] = None,
) -> list[dict[str, Any]]:
    """Every recorded run, oldest first, without its log lines."""
    return [
        {k: v for k, v in run.to_dict().items() if k != "logs"}
        for run in ctx.registry.list_runs(kind=kind)
    ]


@router.get("/runs/{run_id}", response_model=RunDetail, responses=problems(404), tags=_RUNS)
def get_run(run_id: RunId, ctx: Context, who: Viewer) -> dict[str, Any]:
    """One run: parameters, metrics, status, timings, log lines and the models it made."""
    with _not_found():
        return ctx.registry.get_run(run_id).to_dict()


# -- models ---------------------------------------------------------------------------------------


@router.get("/models", response_model=list[ModelSummary], responses=problems(), tags=_MODELS)
def list_models(
    ctx: Context,
    who: Viewer,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MODEL_NAME_MAX_LENGTH,
            pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
            description="only versions of this model name",
        ),
    ] = None,
    stage: Annotated[StageName | None, Query(description="only versions in this stage")] = None,
) -> list[dict[str, Any]]:
    """Model versions by name and version number, without their cards."""
    models = ctx.registry.list_models(name=name, stage=None if stage is None else stage.value)
    return [_summary(model) for model in models]


@router.get("/models/{ref}", response_model=ModelDetail, responses=problems(404), tags=_MODELS)
def get_model(ref: ModelRef, ctx: Context, who: Viewer) -> dict[str, Any]:
    """One model version: configuration, metrics, card and lineage."""
    with _not_found():
        model = ctx.registry.get_model(ref)
        chain = ctx.registry.lineage(model.id)
    return {
        **_summary(model),
        "card": model.card,
        "lineage": [_summary(link) for link in chain],
    }


@router.get(
    "/models/{ref}/lineage",
    response_model=list[ModelSummary],
    responses=problems(404),
    tags=_MODELS,
)
def get_lineage(ref: ModelRef, ctx: Context, who: Viewer) -> list[dict[str, Any]]:
    """The chain from this version up through its parents: ``[model, parent, ...]``."""
    with _not_found():
        return [_summary(link) for link in ctx.registry.lineage(ref)]


@router.get(
    "/models/{ref}/card", response_model=dict[str, Any], responses=problems(404), tags=_MODELS
)
def get_card(ref: ModelRef, ctx: Context, who: Viewer) -> dict[str, Any]:
    """The model card stored with the version (``ModelCard.to_dict()``: the document
    ``edgeops export`` writes as ``.card.json``, with the metrics registered for the
    version; an export for another runtime scores the artifact again). 404 when the
    version has no card."""
    with _not_found():
        model = ctx.registry.get_model(ref)
    if model.card is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"model {model.id} ({model.ref}) has no model card"
        )
    return model.card


@router.get(
    "/models/{ref}/compression",
    response_model=Compression,
    responses=problems(404),
    tags=_MODELS,
)
def get_compression(ref: ModelRef, ctx: Context, who: Viewer) -> dict[str, Any]:
    """The points of the size/accuracy/RAM trade-off for this version: the version itself,
    the compressed versions registered with it as their parent, oldest first, and the
    Pareto fronts of the searches run on it (``edgeops compress --profile``), oldest first.
    """
    with _not_found():
        model = ctx.registry.get_model(ref)
    children = [other for other in ctx.registry.list_models() if other.parent_id == model.id]
    children.sort(key=lambda other: (other.created_at, other.id))
    searches = [
        {
            "run_id": run.id,
            "status": run.status,
            "started_at": run.started_at,
            "profile": run.params.get("profile")
            if isinstance(run.params.get("profile"), dict)
            else None,
            "candidates": _count(run.metrics.get("candidates")),
            "fitting": _count(run.metrics.get("fitting")),
            "front": [c for c in run.metrics.get("front") or [] if isinstance(c, dict)],
        }
        for run in ctx.registry.list_runs(kind="search")
        if run.params.get("model") == model.id
    ]
    return {
        "model_id": model.id,
        "ref": model.ref,
        "baseline": _point(model),
        "compressed": [_point(child) for child in children],
        "searches": searches,
    }


@router.post(
    "/models/{ref}/promote",
    response_model=PromoteResult,
    responses=problems(400, 404, 409),
    tags=_MODELS,
)
def promote_model(
    ref: ModelRef, body: PromoteRequest, ctx: Context, who: Operator
) -> dict[str, Any]:
    """Move a model version to a stage: one step forward (candidate, staging, production)
    or straight to archived. Production archives the previous production version of the
    same name, in the same transaction."""
    registry = ctx.registry
    with _not_found():
        before = registry.get_model(ref)
        previous = [
            other.id
            for other in registry.list_models(name=before.name, stage="production")
            if other.id != before.id
        ]
    try:
        after = registry.promote(before.id, body.stage)
    except UnknownStageError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"stage: {exc}") from None
    except ModelNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except (InvalidStageTransitionError, RegistryError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    return {
        "model": _summary(after),
        "from_stage": before.stage,
        "to_stage": after.stage,
        "archived": previous if after.stage == "production" else [],
    }
