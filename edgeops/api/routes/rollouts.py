"""``/api/v1/rollouts``: staged rollouts, as ``edgeops rollout`` offers them.

    POST /rollouts                     create from a spec (operator): plan it and store it
    GET  /rollouts                     every rollout, newest first
    GET  /rollouts/{id}                status: waves, device counts, gates, excluded devices
    GET  /rollouts/{id}/devices        every device of the rollout and where it stands
    POST /rollouts/{id}/pause          hold a running rollout (operator)
    POST /rollouts/{id}/resume         carry a paused rollout on (operator)
    POST /rollouts/{id}/abort          abort it; targeted devices get their release back

The spec is the document ``edgeops rollout create SPEC`` reads from a file, as a JSON body.
It is checked like the CLI checks it: every field (:func:`edgeops.rollout.parse_spec`), the
release in the release repository, the selection against the fleet and the devices busy in
another rollout (:meth:`edgeops.rollout.engine.RolloutEngine.create`); a bad spec is 422
whose ``detail`` starts with the field's path, and nothing is stored. The routes store
what the operator wants; the hub's engine thread (``edgeops hub serve``) carries it out and
publishes the devices' desired state. An abort sets the targeted devices' desired release
back in the database; it is published at once by the publisher the server puts on the
context (:attr:`edgeops.api.context.ApiContext.publisher`), if any.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.auth import Principal, operator, viewer
from edgeops.api.context import ApiContext, get_context
from edgeops.api.routes._errors import answers

if TYPE_CHECKING:
    from edgeops.rollout.engine import RolloutEngine

__all__ = ["router"]

router = APIRouter(tags=["rollouts"])

Context = Annotated[ApiContext, Depends(get_context)]
RolloutId = Annotated[
    str,
    Path(description="the rollout's id (r-...)", pattern=r"^[A-Za-z0-9_.\-]{1,32}$"),
]
REASON_MAX_LENGTH = 1024


class RolloutSummary(BaseModel):
    id: str
    name: str
    release: str | None
    status: str
    current_wave: int
    waves: int
    reason: str | None
    created_at: str


class RolloutStatus(BaseModel):
    """:meth:`RolloutEngine.status`: ``waves`` with their state, device counts and gate
    results (measured value against threshold)."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str
    release: dict[str, Any]
    status: str
    reason: str | None
    current_wave: int
    counts: dict[str, int]
    waves: list[dict[str, Any]]
    excluded: list[dict[str, Any]]
    failed: list[dict[str, Any]]


class RolloutDevice(BaseModel):
    device_id: str
    wave: int | None
    status: str
    kind: str | None
    reason: str | None
    previous_release: dict[str, Any] | None


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        default="aborted by the operator",
        min_length=1,
        max_length=REASON_MAX_LENGTH,
        description="why; kept with the rollout",
    )


class Aborted(BaseModel):
    id: str
    status: str
    rolled_back: int = Field(description="devices whose desired release was set back")


def _engine(ctx: ApiContext) -> RolloutEngine:
    """The context's engine (publishing through the server's desired-state publisher, when
    there is one)."""
    return ctx.rollouts


@router.post(
    "/rollouts",
    status_code=status.HTTP_201_CREATED,
    response_model=RolloutStatus,
    responses={
        409: {"description": "the hub has no release repository"},
        422: {"description": "the spec is invalid; detail starts with the field's path"},
    },
)
def create_rollout(
    spec: Annotated[
        dict[str, Any],
        Body(
            description="the rollout spec (as `edgeops rollout create SPEC` reads it), as JSON",
            openapi_examples={
                "canary then exponential": {
                    "value": {
                        "name": "digits-v4",
                        "release": "digits-mlp/4/litert/model.tflite",
                        "selection": {"tags": {"site": "berlin"}},
                        "waves": {
                            "canary": {"count": 2},
                            "exponential": {"base_rate_per_minute": 10, "increment_factor": 2},
                        },
                        "gates": {"soak_seconds": 300, "max_error_rate": 0.01},
                    }
                }
            },
        ),
    ],
    ctx: Context,
    who: Annotated[Principal, Depends(operator)],
) -> dict[str, Any]:
    """Plan a rollout on the fleet now and store it, running: the hub's engine carries it
    out. 422 naming the field for an invalid spec, an unknown release or tag key, or a
    selection with no compatible device; nothing is stored then."""
    from edgeops.rollout import SpecFormat, parse_spec

    try:
        text = json.dumps(spec, allow_nan=False)
    except ValueError:
        raise HTTPException(
            422,
            detail="body: NaN and Infinity are not JSON numbers",
        ) from None
    with answers():
        parsed = parse_spec(text, SpecFormat.json)
        rollout_id = ctx.rollouts.create(parsed)
        return ctx.rollouts.status(rollout_id)


@router.get("/rollouts", response_model=list[RolloutSummary])
def list_rollouts(ctx: Context, who: Annotated[Principal, Depends(viewer)]) -> list[dict[str, Any]]:
    """Every rollout, newest first: release, status, current wave."""
    return ctx.rollouts.list_rollouts()


@router.get("/rollouts/{rollout_id}", response_model=RolloutStatus)
def rollout_status(
    rollout_id: RolloutId, ctx: Context, who: Annotated[Principal, Depends(viewer)]
) -> dict[str, Any]:
    """A rollout's status: its waves (state, device counts, gate results against their
    thresholds), device counts, excluded and failed devices."""
    with answers():
        return ctx.rollouts.status(rollout_id)


@router.get("/rollouts/{rollout_id}/devices", response_model=list[RolloutDevice])
def rollout_devices(
    rollout_id: RolloutId, ctx: Context, who: Annotated[Principal, Depends(viewer)]
) -> list[dict[str, Any]]:
    """Every device of the rollout, by wave: status, why it failed or was excluded, the
    release it is set back to on abort."""
    with answers():
        return ctx.rollouts.devices(rollout_id)


@router.post(
    "/rollouts/{rollout_id}/pause",
    response_model=RolloutStatus,
    responses={409: {"description": "the rollout is not running"}},
)
def pause_rollout(
    rollout_id: RolloutId, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> dict[str, Any]:
    """Hold a running rollout where it stands (no new devices, no decisions)."""
    with answers():
        ctx.rollouts.pause(rollout_id)
        return ctx.rollouts.status(rollout_id)


@router.post(
    "/rollouts/{rollout_id}/resume",
    response_model=RolloutStatus,
    responses={409: {"description": "the rollout is not paused"}},
)
def resume_rollout(
    rollout_id: RolloutId, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> dict[str, Any]:
    """Carry a paused rollout on; its timeouts and soak move on by the pause's length."""
    with answers():
        ctx.rollouts.resume(rollout_id)
        return ctx.rollouts.status(rollout_id)


@router.post(
    "/rollouts/{rollout_id}/abort",
    response_model=Aborted,
    responses={409: {"description": "the rollout has ended"}},
)
def abort_rollout(
    rollout_id: RolloutId,
    ctx: Context,
    who: Annotated[Principal, Depends(operator)],
    body: Annotated[AbortRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Abort a running, paused or failed rollout: every device it targeted gets its
    previous desired release back."""
    reason = (body or AbortRequest()).reason
    with answers():
        try:
            rolled_back = _engine(ctx).abort(rollout_id, reason)
        finally:
            ctx.device_list.invalidate()  # desired releases were set back
        document = ctx.rollouts.status(rollout_id)
    return {"id": rollout_id, "status": document["status"], "rolled_back": rolled_back}
