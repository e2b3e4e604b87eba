"""`/api/v1/datasets`: dataset versions, as ``edgeops data list|show --json`` gives them.

``GET /datasets`` lists every version (without the feature rule and reference statistics),
``GET /datasets/{ref}`` shows one (a version id, a unique id prefix of 8+ hex digits, or a
name for its newest version) with its feature rule and reference statistics.
``POST /datasets`` registers a built-in dataset (operator); importing a file is done with
``edgeops data import`` on the hub, not over the API. A read never registers anything: a
built-in dataset not registered yet is 404 until it is posted.

This module also holds :class:`Problem` and :func:`problems`, the error body and the
documented error answers the registry routes share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.auth import Principal, operator, viewer
from edgeops.api.context import ApiContext, get_context
from edgeops.data.builtin import BUILTINS
from edgeops.data.errors import (
    AmbiguousReferenceError,
    DataError,
    DatasetConflictError,
    DatasetNotFoundError,
)

router = APIRouter(tags=["datasets"])


# -- shared by the registry routes ----------------------------------------------------------------


class Problem(BaseModel):
    """An error answer: what was wrong, naming the field, id or reference."""

    detail: str


_PROBLEMS: dict[int, str] = {
    400: "the request names something the service refuses (the detail says what)",
    401: "missing or invalid API token",
    403: "the token's role is too low",
    404: "no such object (the detail names the id or reference)",
    409: "the change conflicts with the object's current state",
    429: "too many failed authentications from this address",
    503: "a store the hub reads is unreadable (the detail says which)",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering ``codes`` (401, 403 and 429 always)."""
    wanted = sorted({401, 403, 429, *codes})
    return {code: {"model": Problem, "description": _PROBLEMS[code]} for code in wanted}


Context = Annotated[ApiContext, Depends(get_context)]
Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]


# -- response models ------------------------------------------------------------------------------


class DatasetSummary(BaseModel):
    """A dataset version's metadata (``edgeops data list --json``)."""

    version: str = Field(description="content hash, 64 hex digits")
    name: str
    task: str
    num_samples: int
    input_shape: list[int] = Field(description="one raw sample")
    model_input_shape: list[int] = Field(description="one sample after the feature rule")
    classes: list[str]
    split_sizes: dict[str, int] = Field(description="samples in train, val and test")
    split_seed: int
    feature_names: list[str] | None = Field(description="table columns, in order")
    source: str = Field(description="where the data came from")
    artifact_sha256: str = Field(description="the arrays (.npz) in the artifact store")
    created_at: datetime


class DatasetDetail(DatasetSummary):
    """One dataset version (``edgeops data show --json``): with the feature rule fitted on
    the training split and the reference statistics drift is measured against."""

    feature_rule: dict[str, Any]
    reference: dict[str, Any]


class RegisterBuiltin(BaseModel):
    """Register a built-in dataset (seed 0, as on first use from the CLI)."""

    model_config = ConfigDict(extra="forbid")

    builtin: Literal["digits", "mnist5k", "basic_motions"] = Field(
        description="; ".join(f"{b.name}: {b.description}" for b in BUILTINS.values())
    )


DatasetRef = Annotated[
    str,
    Path(
        description="a version id, a unique version id prefix (8+ hex digits), or a name "
        "(its newest version)",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    ),
]


@contextmanager
def _dataset_errors() -> Iterator[None]:
    try:
        yield
    except DatasetNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
    except (AmbiguousReferenceError, DatasetConflictError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
    except DataError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from None


def _summary(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in ("feature_rule", "reference")}


# -- routes ---------------------------------------------------------------------------------------


@router.get("/datasets", response_model=list[DatasetSummary], responses=problems())
def list_datasets(ctx: Context, who: Viewer) -> list[dict[str, Any]]:
    """Every dataset version, by name, newest first within a name."""
    return [_summary(view.to_dict()) for view in ctx.datasets.list()]


@router.get("/datasets/{ref}", response_model=DatasetDetail, responses=problems(404, 409))
def get_dataset(ref: DatasetRef, ctx: Context, who: Viewer) -> dict[str, Any]:
    """One dataset version: splits, classes, feature rule, reference statistics.

    409 when a version id prefix matches several versions."""
    if ref in BUILTINS and not any(view.name == ref for view in ctx.datasets.list()):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"dataset {ref!r} is built in but not registered yet; register it with "
            f'POST /api/v1/datasets {{"builtin": "{ref}"}}',
        )
    with _dataset_errors():
        return ctx.datasets.resolve(ref).to_dict()


@router.post(
    "/datasets",
    response_model=DatasetDetail,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": DatasetDetail, "description": "already registered: that version"},
        **problems(400, 409),
    },
)
def register_dataset(
    body: RegisterBuiltin, response: Response, ctx: Context, who: Operator
) -> dict[str, Any]:
    """Register a built-in dataset (201), or answer its version if it is registered (200).

    Only built-in datasets are registered over the API; importing a CSV, Parquet or NPZ file
    (an upload) is not offered here: run ``edgeops data import`` on the hub."""
    existed = any(view.name == body.builtin for view in ctx.datasets.list())
    with _dataset_errors():
        view = ctx.datasets.register_builtin(body.builtin)
    if existed:
        response.status_code = status.HTTP_200_OK
    return view.to_dict()
