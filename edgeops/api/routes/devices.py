"""``/api/v1/devices``: the fleet's devices, their twins and events, and their broker
identities (enroll, revoke), as ``edgeops devices`` offers them.

    GET  /devices                       every device: identity, tags, presence, what it runs
    POST /devices                       enroll (operator): the MQTT password is shown once
    GET  /devices/{device_id}           the twin: desired, reported, presence, differences
    GET  /devices/{device_id}/events    the device's stored events, oldest first
    POST /devices/{device_id}/revoke    revoke its identity (operator)

Enrollment and revocation change the database only, like the CLI: ``edgeops broker acl
sync`` writes the broker's password and ACL files from it. Pointing devices at a release
is a rollout (``POST /rollouts``), which the hub's engine publishes.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.auth import Principal, operator, viewer
from edgeops.api.context import ApiContext, get_context
from edgeops.api.routes._errors import answers

if TYPE_CHECKING:
    from edgeops.fleet import IdentityService

__all__ = ["DEVICE_ID_REGEX", "DeviceId", "router"]

router = APIRouter(tags=["devices"])

DEVICE_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$"
"""as :data:`device_agent.protocol.DEVICE_ID_PATTERN`"""
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
MAX_EVENTS = 10_000

DeviceId = Annotated[
    str,
    Path(
        description="device id: 1-63 letters, digits, _ . - (starting with a letter or digit)",
        pattern=DEVICE_ID_REGEX,
        max_length=63,
    ),
]
Context = Annotated[ApiContext, Depends(get_context)]


# -- response and request bodies ---------------------------------------------------------------


class DeviceSummary(BaseModel):
    """One device as the fleet list shows it."""

    device_id: str
    identity: str = Field(description="active, revoked or none (never enrolled)")
    tags: dict[str, str]
    online: bool
    last_seen: datetime | None
    agent_version: str | None
    hardware: dict[str, str]
    update_state: str | None
    desired_release: str | None = Field(description="target the hub wants the device to run")
    desired_version: int
    active_release: str | None = Field(description="target of the slot the device runs")
    active_model: str | None = Field(description="model id the device runs")
    enrolled_at: datetime | None
    revoked_at: datetime | None


class Difference(BaseModel):
    field: str
    desired: Any
    reported: Any
    note: str


class DeviceTwin(BaseModel):
    """A device's twin (``edgeops devices twin``) with its identity and tags
    (``edgeops devices show``)."""

    device_id: str
    identity: str
    tags: dict[str, str]
    agent_version: str | None
    hardware: dict[str, str]
    enrolled_at: datetime | None
    revoked_at: datetime | None
    online: bool
    last_seen: datetime | None
    desired: dict[str, Any]
    desired_version: int
    desired_at: datetime | None
    reported: dict[str, Any]
    reported_ts: float | None
    update_state: str | None
    in_sync: bool
    differences: list[Difference]
    last_update: dict[str, Any] | None = Field(
        description="the device's last update event (state, target, reason, with its ts)"
    )
    last_conformance: dict[str, Any] | None = Field(
        description="a gateway's last conformance test of a release on its attached board "
        "(passed, failed vectors, latency, cycles, reason, with its ts)"
    )


class DeviceEvent(BaseModel):
    device_id: str
    seq: int
    event: str
    ts: float
    detail: dict[str, Any]
    received_at: datetime


class EnrollRequest(BaseModel):
    """What ``edgeops devices enroll NAME --tags ... --broker-url ...`` takes."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(
        pattern=DEVICE_ID_REGEX,
        max_length=63,
        description="1-63 letters, digits, _ . - (starting with a letter or digit)",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="the device's tags (rollout selections and drift cohorts use them)",
    )
    broker_url: str | None = Field(
        default=None,
        max_length=2048,
        description="the broker as the device reaches it, without credentials (default: the "
        "hub's EDGEOPS_MQTT_URL without its credentials)",
    )


class AgentConfig(BaseModel):
    device_id: str
    mqtt_url: str


class EnrollmentBody(BaseModel):
    """The new identity; ``password`` is shown only in this answer (the hub keeps a hash)."""

    device_id: str
    identity: str
    tags: dict[str, str]
    enrolled_at: datetime | None
    username: str
    password: str
    agent_config: AgentConfig


class RevocationBody(BaseModel):
    device_id: str
    identity: str
    revoked_at: datetime | None
    changed: bool = Field(description="false if the identity was revoked already")


# -- helpers -------------------------------------------------------------------------------------


def identities(ctx: ApiContext) -> IdentityService:
    """The identity service ``edgeops devices`` uses, with the hub's broker user."""
    return ctx.identities


def hub_broker_url(ctx: ApiContext) -> str:
    """The hub's broker address without credentials (as ``edgeops devices enroll``)."""
    endpoint = ctx.settings.mqtt_endpoint
    if endpoint is None:
        return DEFAULT_BROKER_URL
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{'mqtts' if endpoint.tls else 'mqtt'}://{host}:{endpoint.port}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# -- routes ----------------------------------------------------------------------------------------


@router.get(
    "/devices",
    response_model=list[DeviceSummary],
    responses={304: {"description": "not modified since the ETag in If-None-Match"}},
)
def list_devices(
    request: Request, ctx: Context, who: Annotated[Principal, Depends(viewer)]
) -> Response:
    """Every known device, sorted by id: identity, tags, presence, what it runs and what
    the hub wants it to run. The list is made once and shared by the requests that follow
    until the devices change (checked at most every 0.2 s, remade at least every 10 s), so
    it may be a moment behind changes made outside this API (presence and state reports);
    changes made through this API show at once. With
    ``If-None-Match`` holding the last answer's ETag, an unchanged list is ``304``; with
    ``Accept-Encoding: gzip`` the answer is gzip-compressed."""
    body = ctx.device_list.get()
    headers = {
        "ETag": body.etag,
        "Cache-Control": "private, max-age=0, must-revalidate",
        "Vary": "Accept-Encoding",
    }
    if body.etag in _etags(request.headers.get("if-none-match")):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if _accepts_gzip(request.headers.get("accept-encoding")):
        headers["Content-Encoding"] = "gzip"
        return Response(body.gzipped, media_type="application/json", headers=headers)
    return Response(body.data, media_type="application/json", headers=headers)


def _accepts_gzip(header: str | None) -> bool:
    for item in (header or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=EnrollmentBody,
    responses={409: {"description": "the device is enrolled already"}},
)
def enroll_device(
    body: EnrollRequest, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> dict[str, Any]:
    """Enroll a device: its row with tags and its own MQTT credentials. The password is in
    this answer only; ``edgeops broker acl sync`` then lets the device in."""
    from device_agent.link import MqttEndpoint
    from edgeops.errors import ConfigError

    url = body.broker_url
    if url is not None:
        try:
            endpoint = MqttEndpoint.parse(url)
        except ConfigError as exc:
            raise HTTPException(400, detail=f"broker_url: {exc}") from None
        if endpoint.username or endpoint.password:
            raise HTTPException(
                400, detail="broker_url: give the broker's address without user or password"
            )
    with answers():
        enrollment = identities(ctx).enroll(body.device_id, body.tags)
    ctx.device_list.invalidate()
    document = enrollment.to_dict(url or hub_broker_url(ctx))
    return {key: document[key] for key in EnrollmentBody.model_fields}


@router.get("/devices/{device_id}", response_model=DeviceTwin)
def get_device(
    device_id: DeviceId, ctx: Context, who: Annotated[Principal, Depends(viewer)]
) -> dict[str, Any]:
    """A device's twin: what the hub wants, what the device last reported, presence, and
    where desired and reported differ; with its identity and tags."""
    with answers():
        identity = identities(ctx).get_identity(device_id)
        twin = ctx.fleet.twin(device_id)
        last = {kind: ctx.fleet.last_event(device_id, kind) for kind in ("update", "conformance")}
    return {
        **twin.to_dict(),
        "last_update": _last_detail(last["update"]),
        "last_conformance": _last_detail(last["conformance"]),
        "identity": identity.identity,
        "tags": identity.tags,
        "agent_version": identity.agent_version,
        "hardware": identity.hardware,
        "enrolled_at": _iso(identity.enrolled_at),
        "revoked_at": _iso(identity.revoked_at),
    }


@router.get("/devices/{device_id}/events", response_model=list[DeviceEvent])
def device_events(
    device_id: DeviceId,
    ctx: Context,
    who: Annotated[Principal, Depends(viewer)],
    event: Annotated[
        str | None, Query(max_length=64, description="only events of this name (e.g. update)")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_EVENTS, description="at most this many, the oldest first")
    ] = 1000,
) -> list[dict[str, Any]]:
    """The device's stored events (update transitions, errors), in sequence order."""
    with answers():
        ctx.fleet.get_device(device_id)
    return [view.to_dict() for view in ctx.fleet.list_events(device_id, event=event, limit=limit)]


@router.post("/devices/{device_id}/revoke", response_model=RevocationBody)
def revoke_device(
    device_id: DeviceId, ctx: Context, who: Annotated[Principal, Depends(operator)]
) -> dict[str, Any]:
    """Revoke the device's identity (``changed`` false if it was revoked already);
    ``edgeops broker acl sync`` and a broker reload then lock it out."""
    with answers():
        view, changed = identities(ctx).revoke(device_id)
    ctx.device_list.invalidate()
    return {
        "device_id": view.device_id,
        "identity": view.identity,
        "revoked_at": _iso(view.revoked_at),
        "changed": changed,
    }


def _last_detail(event: Any) -> dict[str, Any] | None:
    """An event's detail with its device timestamp, None for no event."""
    return {**event.detail, "ts": event.ts} if event is not None else None
