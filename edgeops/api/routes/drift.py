"""``/api/v1/drift``: where each release's field data stands against its reference, and the
per-model drift policies, as ``edgeops drift`` offers them.

    GET    /drift/status?model_id=               newest evaluation per release and cohort
    GET    /drift/events?model_id=&limit=        drift events (onsets), newest first
    GET    /drift/histograms?model_id=&cohort=   reference against live, per feature/output
    GET    /drift/policies                       every stored policy
    GET    /drift/policies/{model_name}          a model's policy (the defaults if none)
    PUT    /drift/policies/{model_name}          create or replace it (operator)
    DELETE /drift/policies/{model_name}          back to the defaults (operator)

The hub evaluates drift on its own (``edgeops hub serve``); these routes read what it stored
and change the policies it reads (:class:`edgeops.monitor.watch.DriftService`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.auth import Principal, operator, viewer
from edgeops.api.context import ApiContext, get_context
from edgeops.api.routes._errors import answers, not_found

__all__ = ["router"]

router = APIRouter(tags=["drift"])

Context = Annotated[ApiContext, Depends(get_context)]
ModelIdQuery = Annotated[
    str | None, Query(min_length=1, max_length=128, description="only this model id")
]
ModelName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        pattern=r"^\S(.*\S)?$",
        description="the model's name (its card's name)",
    ),
]
MAX_EVENTS = 1000


class DriftEvaluation(BaseModel):
    """One stored evaluation of one release and cohort; ``onset`` marks a drift event."""

    id: int
    model_id: str
    model_name: str | None
    cohort: str
    evaluated_at: datetime
    window_start: datetime
    window_end: datetime
    devices: int
    windows: int
    samples: int
    verdict: str = Field(description="drift, no_drift or insufficient")
    onset: bool
    report: dict[str, Any] = Field(description="tests, p-values, PSI, what drifted, notes")
    action: str | None
    action_result: dict[str, Any]


class Histogram(BaseModel):
    name: str
    edges: list[float] | None = Field(description="inner bin edges (None: one bin per class)")
    reference: list[int] | None
    live: list[int] | None


class DriftHistograms(BaseModel):
    """The newest evaluation of a release and cohort with the histograms it compared."""

    model_id: str
    model_name: str | None
    cohort: str
    evaluation: DriftEvaluation
    windows: int = Field(description="telemetry windows in the live histograms")
    samples: int
    features: list[Histogram]
    outputs: list[Histogram] = Field(description="classes and confidence")


class DriftPolicy(BaseModel):
    model_name: str
    action: str
    webhook_url: str | None
    cohort_tag: str | None
    window_s: float
    config: dict[str, Any]
    retrain: dict[str, Any]
    updated_at: datetime
    stored: bool = Field(description="false: no policy is stored, these are the defaults")


class PolicyRequest(BaseModel):
    """A whole drift policy (what ``edgeops drift policy set`` stores); fields not given
    take their defaults."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["none", "notify", "retrain"] = Field(
        default="none", description="on drift: record only, POST to the webhook, or retrain"
    )
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="notify: where to POST (http or https)"
    )
    cohort_tag: str | None = Field(
        default=None, min_length=1, max_length=63, description="evaluate each value apart"
    )
    window_s: float = Field(default=600.0, ge=1.0, le=7 * 24 * 3600.0)
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="detector settings: alpha, min_samples, correction (holm, bonferroni), "
        "psi_threshold, tests, targets, min_expected",
    )
    retrain: dict[str, Any] | None = Field(
        default=None,
        description="retrain: continuous-training parameters, with the labelling source, e.g. "
        '{"labeler": {"kind": "oracle", "dataset": "digits:1"}, "margin": 0.005}',
    )


def _policy(ctx: ApiContext, model_name: str) -> dict[str, Any]:
    stored = {p.model_name for p in ctx.drift.list_policies()}
    return {**ctx.drift.get_policy(model_name).to_dict(), "stored": model_name in stored}


@router.get("/drift/status", response_model=list[DriftEvaluation])
def drift_status(
    ctx: Context, who: Annotated[Principal, Depends(viewer)], model_id: ModelIdQuery = None
) -> list[dict[str, Any]]:
    """The newest drift evaluation of every release and cohort."""
    return [row.to_dict() for row in ctx.drift.status(model_id)]


@router.get("/drift/events", response_model=list[DriftEvaluation])
def drift_events(
    ctx: Context,
    who: Annotated[Principal, Depends(viewer)],
    model_id: ModelIdQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 50,
) -> list[dict[str, Any]]:
    """Drift events (the first drift verdict of an episode), newest first, with what the
    policy's action did."""
    return [row.to_dict() for row in ctx.drift.events(model_id, limit=limit)]


@router.get("/drift/histograms", response_model=DriftHistograms)
def drift_histograms(
    ctx: Context,
    who: Annotated[Principal, Depends(viewer)],
    model_id: Annotated[str, Query(min_length=1, max_length=128)],
    cohort: Annotated[
        str, Query(min_length=1, max_length=128, description="'*' or '<tag>=<value>'")
    ] = "*",
) -> dict[str, Any]:
    """Per-feature and output histograms of the release's reference (from its card) and of
    the live telemetry its newest evaluation in ``cohort`` compared."""
    from device_agent.errors import AgentError
    from device_agent.sketch import ReferenceStats

    evaluation = next((e for e in ctx.drift.status(model_id) if e.cohort == cohort), None)
    if evaluation is None:
        raise not_found(f"no drift evaluation of model {model_id!r} in cohort {cohort!r}")
    release = ctx.drift.release(model_id)
    reference: ReferenceStats | None = None
    if release is not None:
        try:
            reference = ReferenceStats.from_dict(release.reference)
        except AgentError:
            reference = None
    live = ctx.drift.live(evaluation)
    live_features = live.feature_counts if live is not None else []
    count = max(len(live_features), reference.num_features if reference else 0)
    features = []
    for index in range(count):
        name = str(index)
        if reference is not None and reference.feature_names and index < reference.num_features:
            name = reference.feature_names[index]
        features.append(
            {
                "name": name,
                "edges": _at(reference.feature_edges, index) if reference else None,
                "reference": _at(reference.feature_counts, index) if reference else None,
                "live": _at(live_features, index),
            }
        )
    outputs = [
        {
            "name": "classes",
            "edges": None,
            "reference": reference.class_counts if reference else None,
            "live": (live.class_counts or None) if live is not None else None,
        },
        {
            "name": "confidence",
            "edges": reference.confidence_edges if reference else None,
            "reference": reference.confidence_counts if reference else None,
            "live": (live.confidence_counts or None) if live is not None else None,
        },
    ]
    return {
        "model_id": model_id,
        "model_name": evaluation.model_name,
        "cohort": cohort,
        "evaluation": evaluation.to_dict(),
        "windows": live.windows if live is not None else 0,
        "samples": live.samples if live is not None else 0,
        "features": features,
        "outputs": outputs,
    }


def _at(rows: list[Any], index: int) -> Any:
    return list(rows[index]) if index < len(rows) else None


@router.get("/drift/policies", response_model=list[DriftPolicy])
def list_policies(ctx: Context, who: Annotated[Principal, Depends(viewer)]) -> list[dict[str, Any]]:
    """Every stored drift policy (models without one use the defaults)."""
    return [{**p.to_dict(), "stored": True} for p in ctx.drift.list_policies()]


@router.get("/drift/policies/{model_name}", response_model=DriftPolicy)
def get_policy(
    model_name: ModelName, ctx: Context, who: Annotated[Principal, Depends(viewer)]
) -> dict[str, Any]:
    """A model's drift policy; the defaults (``stored`` false) if none is stored."""
    return _policy(ctx, model_name)


@router.put(
    "/drift/policies/{model_name}",
    response_model=DriftPolicy,
    responses={400: {"description": "a field the service refuses; detail names it"}},
)
def put_policy(
    model_name: ModelName,
    body: PolicyRequest,
    ctx: Context,
    who: Annotated[Principal, Depends(operator)],
) -> dict[str, Any]:
    """Create or replace a model's drift policy (the whole policy)."""
    if body.action == "retrain" and not (body.retrain or {}).get("labeler"):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="retrain: the retrain action needs retrain.labeler, e.g. "
            '{"kind": "oracle", "dataset": "NAME:VERSION"} or {"kind": "file", "path": "..."}',
        )
    with answers():
        ctx.drift.set_policy(
            model_name,
            action=body.action,
            webhook_url=body.webhook_url,
            cohort_tag=body.cohort_tag,
            window_s=body.window_s,
            config=body.config,
            retrain=body.retrain,
        )
    return _policy(ctx, model_name)


@router.delete(
    "/drift/policies/{model_name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={404: {"description": "no policy is stored for the model"}},
)
def delete_policy(
    model_name: ModelName, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> Response:
    """Delete a model's drift policy: it goes back to the defaults."""
    with answers():
        ctx.drift.delete_policy(model_name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
