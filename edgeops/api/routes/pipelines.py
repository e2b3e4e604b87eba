"""``/api/v1/pipelines``: persisted pipeline runs, as ``edgeops pipelines`` offers them.

    GET  /pipelines/runs?pipeline=&limit=   runs, newest first, with their steps
    GET  /pipelines/runs/{run_id}           one run: parameters, every step
    POST /pipelines/runs                    start a continuous-training run (operator)
    POST /pipelines/runs/{run_id}/cancel    cancel a pending or running run (operator)

``POST /pipelines/runs`` records the run, pending, and answers at once (202): the hub
(``edgeops hub serve``) executes pending runs in its resume loop, at start and every minute
(:meth:`edgeops.pipelines.PipelineRunner.resume`). Its body holds the parameters
``edgeops pipelines run ct`` takes (:class:`edgeops.pipelines.ct.CTParams`).
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.auth import Principal, operator, viewer
from edgeops.api.context import ApiContext, get_context
from edgeops.api.routes._errors import answers

__all__ = ["router"]

router = APIRouter(tags=["pipelines"])

Context = Annotated[ApiContext, Depends(get_context)]
RunId = Annotated[
    str, Path(description="the pipeline run's id (p-...)", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
]
MAX_RUNS = 500


class Step(BaseModel):
    name: str
    position: int
    status: str
    attempts: int
    interruptions: int
    inputs: dict[str, Any] | None
    outputs: dict[str, Any] | None
    error: str | None
    metadata_run_id: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None


class PipelineRun(BaseModel):
    id: str
    pipeline: str
    status: str = Field(description="pending, running, succeeded, failed or cancelled")
    params: dict[str, Any]
    error: str | None
    lease_owner: str | None
    lease_expires_at: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    steps: list[Step]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OracleLabeler(_Strict):
    """A simulated oracle that knows a dataset version's labels."""

    kind: Literal["oracle"]
    dataset: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="the dataset version it knows (default: the champion's dataset)",
    )
    noise: float = Field(default=0.0, ge=0.0, le=0.99, description="fraction of wrong labels")


class FileLabeler(_Strict):
    """A labelled CSV, Parquet or NPZ file of device samples, on the hub."""

    kind: Literal["file"]
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="a file under the hub's labels directory (<data dir>/labels), relative "
        "to it or absolute",
    )
    label_column: str | None = Field(default=None, min_length=1, max_length=256)


class RolloutRequest(_Strict):
    enabled: bool = Field(default=True, description="false: release a winner, no rollout")
    canary_count: int = Field(default=1, ge=1, le=100_000)
    soak_seconds: int = Field(default=300, ge=0, le=7 * 24 * 3600)
    promote_wait_seconds: int = Field(
        default=3600,
        ge=0,
        le=7 * 24 * 3600,
        description="how long to wait for the rollout before promoting (0: promote by hand)",
    )


class CTRunRequest(_Strict):
    """What ``edgeops pipelines run ct`` takes."""

    pipeline: Literal["ct"] = "ct"
    model: str = Field(
        min_length=1, max_length=128, description="model name; its production version competes"
    )
    labeler: OracleLabeler | FileLabeler = Field(
        default_factory=lambda: OracleLabeler(kind="oracle"), discriminator="kind"
    )
    margin: float = Field(default=0.005, ge=-1.0, le=1.0)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    holdout: float = Field(default=0.5, gt=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    max_windows: int = Field(default=500, ge=1, le=1_000_000)
    max_samples: int = Field(default=5000, ge=1, le=10_000_000)
    min_samples: int = Field(default=20, ge=1, le=10_000_000)
    runtime: Literal["litert", "onnx", "mcu"] | None = None
    hardware: dict[str, list[str]] = Field(
        default_factory=dict, max_length=32, description="hardware tags of the release"
    )
    rollout: RolloutRequest = Field(default_factory=RolloutRequest)


@router.get("/pipelines/runs", response_model=list[PipelineRun])
def list_runs(
    ctx: Context,
    who: Annotated[Principal, Depends(viewer)],
    pipeline: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_RUNS)] = 50,
) -> list[dict[str, Any]]:
    """Pipeline runs, newest first, with their steps."""
    return [view.to_dict() for view in ctx.pipelines.list_runs(pipeline=pipeline, limit=limit)]


@router.get("/pipelines/runs/{run_id}", response_model=PipelineRun)
def get_run(
    run_id: RunId, ctx: Context, who: Annotated[Principal, Depends(viewer)]
) -> dict[str, Any]:
    """One run: its parameters and every step's status, attempts, duration, inputs and
    outputs."""
    with answers():
        return ctx.pipelines.get(run_id).to_dict()


@router.post(
    "/pipelines/runs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PipelineRun,
    responses={400: {"description": "parameters the pipeline refuses; detail names them"}},
)
def start_run(
    body: CTRunRequest, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> dict[str, Any]:
    """Record a continuous-training run, pending; the hub executes it (within a minute).
    A labelled file is read first: one that cannot be read is refused (400)."""
    from edgeops.pipelines.ct import CT_PIPELINE, CTParams

    _check_hardware(body.hardware)
    labeler = body.labeler.model_dump(exclude_none=True)
    document = {**body.model_dump(exclude={"pipeline", "labeler"}), "labeler": labeler}
    with answers():
        params = CTParams.from_dict(document)
    if isinstance(body.labeler, FileLabeler):
        path = _labelled_file(ctx, body.labeler)
        params = CTParams.from_dict({**document, "labeler": {**labeler, "path": str(path)}})
    with answers():
        run_id = ctx.pipelines.start(CT_PIPELINE, params.to_dict())
        return ctx.pipelines.get(run_id).to_dict()


def _check_hardware(hardware: dict[str, list[str]]) -> None:
    """The release's hardware tags as ``--hardware KEY=V1|V2,...`` would give them, or 400."""
    from edgeops.trust.errors import HardwareTagsError
    from edgeops.trust.release import parse_hardware

    text = ",".join(f"{key}={'|'.join(values)}" for key, values in hardware.items())
    try:
        parsed = parse_hardware(text)
    except HardwareTagsError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"hardware: {exc}") from None
    if parsed != {key: list(dict.fromkeys(values)) for key, values in hardware.items()}:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="hardware: tags and values are letters, digits, '.', '_', '-'",
        )


LABELS_DIR = "labels"


def _labelled_file(ctx: ApiContext, labeler: FileLabeler) -> FilePath:
    """The labelled file, read now (as the CLI does), or 400. Over the API only files under
    ``<data dir>/labels`` may be named (an operator's token must not read other files of
    the hub), and a refusal does not repeat what the file holds."""
    from edgeops.errors import EdgeOpsError
    from edgeops.pipelines import LabelledFileLabeler

    root = (ctx.settings.data_dir / LABELS_DIR).resolve()
    path = (root / labeler.path).resolve()  # an absolute path replaces the root
    if not path.is_relative_to(root):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"labeler.path: only files under the hub's labels directory {root} can be "
            "used over the API (put the file there, or use `edgeops pipelines run`)",
        )
    try:
        LabelledFileLabeler(path, label_column=labeler.label_column)
    except (EdgeOpsError, OSError, ValueError) as exc:
        kind = "not found" if isinstance(exc, FileNotFoundError) else "not a labelled file"
        column = f" with label column {labeler.label_column!r}" if labeler.label_column else ""
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"labeler.path: {path.relative_to(root)} is {kind}{column} "
            "(CSV, Parquet or NPZ with the samples' features and a label column)",
        ) from None
    return path


@router.post(
    "/pipelines/runs/{run_id}/cancel",
    response_model=PipelineRun,
    responses={409: {"description": "the run has ended"}},
)
def cancel_run(
    run_id: RunId, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> dict[str, Any]:
    """Cancel a pending or running run (a step in progress is abandoned, not killed)."""
    with answers():
        return ctx.pipelines.cancel(run_id).to_dict()
