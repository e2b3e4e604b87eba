"""Telemetry: summaries of the windows devices sent, and a device's newest windows.

    GET /telemetry/summary?model_id=&device_id=&since=    windows, samples, latency, errors
    GET /devices/{device_id}/telemetry?limit=             the device's newest windows

The summary adds up the stored windows (:meth:`edgeops.monitor.TelemetryService.summary`):
the newest 10,000 received after ``since`` (default: the last hour).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

from edgeops.api.auth import Principal, viewer
from edgeops.api.context import ApiContext, get_context
from edgeops.api.routes._errors import answers
from edgeops.api.routes.devices import DEVICE_ID_REGEX, DeviceId

__all__ = ["router"]

router = APIRouter(tags=["telemetry"])

Context = Annotated[ApiContext, Depends(get_context)]
DEFAULT_SINCE = timedelta(hours=1)
MAX_WINDOWS_SHOWN = 1000


class LatencyStat(BaseModel):
    mean: float | None = Field(description="sample-weighted mean of the windows' values")
    max: float | None


class TelemetrySummary(BaseModel):
    since: datetime
    windows: int
    truncated: bool = Field(description="more windows matched; the newest were added up")
    devices: int
    samples: int
    first_received: datetime | None
    last_received: datetime | None
    models: dict[str, int] = Field(description="windows per model id")
    errors: dict[str, int] = Field(description="errors by kind")
    error_count: int
    class_counts: list[int]
    latency_ms: dict[str, LatencyStat] = Field(description="p50, p95, p99")


class TelemetryWindowBody(BaseModel):
    device_id: str
    seq: int
    model_id: str
    start_ts: float
    end_ts: float
    samples: int
    received_at: datetime
    window: dict[str, Any] = Field(description="the window document as the device sent it")


@router.get("/telemetry/summary", response_model=TelemetrySummary)
def telemetry_summary(
    ctx: Context,
    who: Annotated[Principal, Depends(viewer)],
    model_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    device_id: Annotated[str | None, Query(pattern=DEVICE_ID_REGEX, max_length=63)] = None,
    since: Annotated[
        datetime | None,
        Query(description="ISO 8601 time with a zone (default: an hour ago)"),
    ] = None,
) -> dict[str, Any]:
    """What the windows received since ``since`` add up to: windows, devices, samples,
    errors by kind, the class histogram, latency percentiles."""
    if since is None:
        since = datetime.now(UTC) - DEFAULT_SINCE
    elif since.tzinfo is None or since.utcoffset() is None:
        raise HTTPException(
            422,
            detail="since: give the time zone, e.g. 2026-01-01T00:00:00Z",
        )
    try:
        since = since.astimezone(UTC)
    except (OverflowError, ValueError):
        raise HTTPException(422, detail="since: out of range") from None
    summary = ctx.telemetry.summary(model_id=model_id, device_id=device_id, since=since)
    return {"since": since.isoformat(), **summary}


@router.get("/devices/{device_id}/telemetry", response_model=list[TelemetryWindowBody])
def device_telemetry(
    device_id: DeviceId,
    ctx: Context,
    who: Annotated[Principal, Depends(viewer)],
    limit: Annotated[int, Query(ge=1, le=MAX_WINDOWS_SHOWN, description="newest windows")] = 20,
) -> list[dict[str, Any]]:
    """The device's newest ``limit`` telemetry windows, oldest of them first."""
    with answers():
        ctx.fleet.get_device(device_id)
    return [view.to_dict() for view in ctx.telemetry.list_windows(device_id, limit)]
