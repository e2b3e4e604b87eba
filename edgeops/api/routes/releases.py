"""`/api/v1/releases`: the targets of the TUF release repository (``edgeops releases list``).

A release is a signed target ``{model name}/{seq}/{runtime}/model.{tflite|onnx}`` (or
``.../mcu/firmware-{target}.tar``) whose custom metadata is the model's compatibility
contract. ``GET /releases`` lists every target of the current targets metadata, by path;
``GET /releases/{name}`` the targets of one model name, by version number. A hub without a
release repository (no ``edgeops keys init``) lists nothing.

Releases are made with ``edgeops release`` on the hub, not over the API: it exports the
model for its runtime (a conversion that runs TensorFlow) before signing the new target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, Field

from edgeops.api.context import ApiContext
from edgeops.api.routes.datasets import Context, Viewer, problems
from edgeops.registry.models import MODEL_NAME_MAX_LENGTH
from edgeops.trust import Release
from edgeops.trust.errors import MetadataError

router = APIRouter(tags=["releases"])


class ReleaseOut(BaseModel):
    """One released target (``edgeops releases list --json``, with its custom metadata)."""

    target: str = Field(description="the target path")
    name: str | None = Field(description="the model's name, from the target path")
    seq: int | None = Field(description="the model's version number, from the target path")
    runtime: str = Field(description="litert, onnx or mcu")
    model_id: str = Field(description="the released model version (from its card)")
    length: int = Field(description="bytes")
    sha256: str
    versions: dict[str, int] = Field(description="the role versions of the repository now")
    custom: dict[str, Any] = Field(
        description="the compatibility contract: custom.edgeops holds card (JSON text), "
        "hardware, min_free_memory_bytes and runtime"
    )


ReleaseName = Annotated[
    str,
    Path(
        description="a model name",
        min_length=1,
        max_length=MODEL_NAME_MAX_LENGTH,
        pattern=rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MODEL_NAME_MAX_LENGTH - 1}}}$",
    ),
]


@contextmanager
def _unreadable() -> Iterator[None]:
    try:
        yield
    except MetadataError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the release repository cannot be read: {exc}",
        ) from None


def _releases(ctx: ApiContext) -> list[dict[str, Any]]:
    repository = ctx.repository
    if not repository.exists():
        return []
    with _unreadable():
        versions = repository.versions()
        releases = [Release.of(target, versions) for target in repository.targets()]
    return [_document(item) for item in releases]


def _document(item: Release) -> dict[str, Any]:
    parts = item.path.split("/")
    name = parts[0] if len(parts) >= 3 else None
    seq = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
    return {**item.to_dict(with_custom=True), "name": name, "seq": seq}


@router.get("/releases", response_model=list[ReleaseOut], responses=problems(503))
def list_releases(ctx: Context, who: Viewer) -> list[dict[str, Any]]:
    """Every released target, by path; ``[]`` without a release repository."""
    return _releases(ctx)


@router.get(
    "/releases/{name}",
    response_model=list[ReleaseOut],
    responses=problems(404, 503),
)
def get_release(name: ReleaseName, ctx: Context, who: Viewer) -> list[dict[str, Any]]:
    """The released targets of model ``name``, by version number then path; 404 when
    nothing of that name is released."""
    mine = [item for item in _releases(ctx) if item["name"] == name]
    if not mine:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no release of a model named {name!r}"
        )
    mine.sort(key=lambda item: (item["seq"] if item["seq"] is not None else 0, item["target"]))
    return mine
