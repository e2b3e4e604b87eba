"""The desired side of a device twin: its document, patches to it, and where it differs from
what the device reports.

The hub keeps each device's desired document in ``devices.desired``::

    {"release": {"target": "digits-mlp/3/litert/model.tflite", "model_id": "m-..."} | null,
     "challenger": {"model_id": "m-...", "path": "<bundle dir under models_dir>"} | null,
     "config": {...free-form, for the agent's future use...}}

and publishes it, retained, QoS 1, on ``edgeops/v1/dev/{id}/desired`` wrapped in the
protocol's envelope with the device id, its ``version`` (``devices.desired_version``, bumped
by every change) and the hub time of that change (:func:`desired_document`).

A patch (:func:`merge_desired`) names some of the three fields: ``release`` and
``challenger`` replace the stored value (``null``: no release wanted / no challenger);
``config`` is merged as a JSON merge patch (RFC 7396: a ``null`` member removes the key,
objects merge recursively; ``config: null`` empties it). Every value is validated with the
agent's own parsers before anything is stored (:class:`DesiredStateError` names the field).

:func:`twin_differences` compares the desired document with the last state report: the
desired release's target against the target of the active slot, the desired challenger
against the challenger the agent runs, and an update that is still in progress.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from device_agent.errors import AgentError
from device_agent.protocol import MAX_PAYLOAD_BYTES, SCHEMA_VERSION
from device_agent.updater.service import parse_release
from device_agent.updater.slots import SLOT_NAMES
from edgeops.errors import ConfigError
from edgeops.fleet.models import DeviceView

__all__ = [
    "DESIRED_FIELDS",
    "DESIRED_TYPE",
    "DesiredStateError",
    "Difference",
    "TwinView",
    "desired_document",
    "encode_desired",
    "merge_desired",
    "twin_differences",
    "validate_patch",
]

DESIRED_TYPE = "desired"
DESIRED_FIELDS = ("release", "challenger", "config")
MODEL_ID_MAX_LENGTH = 128
CHALLENGER_PATH_MAX_LENGTH = 512
# update states in which a device is done with its last update (a rollback shows through
# the release difference it leaves)
SETTLED_STATES = ("idle", "committed", "rolled_back")


class DesiredStateError(ConfigError):
    """A desired-state patch the hub refuses; the message names the field."""


# -- patches ---------------------------------------------------------------------------------


def validate_patch(patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch`` as a plain dict if every field is one the agent can act on.

    Raises DesiredStateError naming the first bad field: an unknown top-level field, a
    ``release`` whose ``target`` is not a relative target path (the agent's own
    :func:`~device_agent.updater.service.parse_release`), a ``challenger`` without a
    ``model_id`` or with a ``path`` that leaves the agent's models dir, a ``config`` that is
    not an object, or anything JSON cannot hold (NaN, infinity, non-string keys ...).
    """
    if not isinstance(patch, Mapping):
        raise DesiredStateError(f"desired patch must be an object, got {type(patch).__name__}")
    if not patch:
        raise DesiredStateError(
            f"desired patch is empty: name at least one of {', '.join(DESIRED_FIELDS)}"
        )
    checked: dict[str, Any] = {}
    for name, value in patch.items():
        if name not in DESIRED_FIELDS:
            raise DesiredStateError(
                f"desired: unknown field {name!r} (fields: {', '.join(DESIRED_FIELDS)})"
            )
        _require_json(value, f"desired {name}")
        if name == "release":
            checked[name] = _check_release(value)
        elif name == "challenger":
            checked[name] = _check_challenger(value)
        else:
            if value is not None and not isinstance(value, Mapping):
                raise DesiredStateError(
                    f"desired config must be an object or null, got {type(value).__name__}"
                )
            checked[name] = None if value is None else json.loads(json.dumps(value))
    return checked


def merge_desired(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """The desired document after ``patch`` (validated here) is applied to ``current``."""
    checked = validate_patch(patch)
    merged: dict[str, Any] = json.loads(json.dumps(dict(current)))
    for name, value in checked.items():
        if name == "config":
            base = merged.get("config")
            merged["config"] = (
                {} if value is None else _merge_patch(base if isinstance(base, dict) else {}, value)
            )
        else:
            merged[name] = value
    return merged


def _check_release(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise DesiredStateError(f"desired release must be an object or null, got {value!r:.80}")
    try:
        parse_release(dict(value))
    except AgentError as exc:
        raise DesiredStateError(str(exc)) from None
    model_id = value.get("model_id")
    if model_id is not None and (
        not isinstance(model_id, str) or not 0 < len(model_id) <= MODEL_ID_MAX_LENGTH
    ):
        raise DesiredStateError(
            f"desired release: 'model_id' must be a string of 1-{MODEL_ID_MAX_LENGTH} "
            f"characters or absent, got {model_id!r:.80}"
        )
    return {key: item for key, item in value.items() if key != "model_id" or item is not None}


def _check_challenger(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise DesiredStateError(f"desired challenger must be an object or null, got {value!r:.80}")
    model_id, path = value.get("model_id"), value.get("path")
    if not isinstance(model_id, str) or not 0 < len(model_id) <= MODEL_ID_MAX_LENGTH:
        raise DesiredStateError(
            f"desired challenger: 'model_id' must be a string of 1-{MODEL_ID_MAX_LENGTH} "
            f"characters, got {model_id!r:.80}"
        )
    if (
        not isinstance(path, str)
        or not 0 < len(path) <= CHALLENGER_PATH_MAX_LENGTH
        or path.startswith("/")
        or "\\" in path
        or ".." in path.split("/")
        or not path.isprintable()
    ):
        raise DesiredStateError(
            "desired challenger: 'path' must be a relative path inside the agent's models "
            f"dir (no '..', at most {CHALLENGER_PATH_MAX_LENGTH} characters), got {path!r:.80}"
        )
    return dict(value)


def _merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch of two objects."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            base = result.get(key)
            result[key] = _merge_patch(base if isinstance(base, dict) else {}, value)
        else:
            result[key] = value
    return result


def _require_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DesiredStateError(f"{what} cannot be sent as JSON: {exc}") from None
    if isinstance(value, Mapping) and not all(isinstance(key, str) for key in value):
        raise DesiredStateError(f"{what}: object keys must be strings")


# -- the wire document -----------------------------------------------------------------------


def desired_document(device: DeviceView) -> dict[str, Any]:
    """What the hub publishes on the device's ``desired`` topic: the stored document in the
    protocol's envelope, with the device id, the version and the time of the change."""
    desired = device.desired
    return {
        **desired,
        "schema": SCHEMA_VERSION,
        "type": DESIRED_TYPE,
        "device_id": device.device_id,
        "version": device.desired_version,
        "ts": round(device.desired_at.timestamp(), 3) if device.desired_at else None,
        "release": desired.get("release"),
        "challenger": desired.get("challenger"),
        "config": desired.get("config") or {},
    }


def encode_desired(device: DeviceView) -> bytes:
    """:func:`desired_document` as compact UTF-8 JSON; DesiredStateError if it is too large
    for the protocol (256 KiB)."""
    payload = json.dumps(
        desired_document(device), separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode()
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DesiredStateError(
            f"desired state of {device.device_id!r} is {len(payload)} bytes as JSON; "
            f"the protocol allows at most {MAX_PAYLOAD_BYTES}"
        )
    return payload


# -- desired against reported ----------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One place where the device does not (yet) run what the hub wants."""

    field: str  # release, challenger, update_state
    desired: Any
    reported: Any
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "desired": self.desired,
            "reported": self.reported,
            "note": self.note,
        }


@dataclass(frozen=True)
class TwinView:
    """A device's twin: what the hub wants, what the device last said, and the differences."""

    device_id: str
    online: bool
    last_seen: datetime | None
    desired: dict[str, Any]
    desired_version: int
    desired_at: datetime | None
    reported: dict[str, Any]
    reported_ts: float | None
    update_state: str | None
    differences: list[Difference] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not self.differences

    @classmethod
    def of(cls, device: DeviceView) -> TwinView:
        update_state = device.update_state or _text(device.reported.get("update_state"))
        return cls(
            device_id=device.device_id,
            online=device.online,
            last_seen=device.last_seen,
            desired=dict(device.desired),
            desired_version=device.desired_version,
            desired_at=device.desired_at,
            reported=dict(device.reported),
            reported_ts=device.state_ts,
            update_state=update_state,
            differences=twin_differences(device.desired, device.reported, update_state),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings in UTC."""
        return {
            "device_id": self.device_id,
            "online": self.online,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "desired": self.desired,
            "desired_version": self.desired_version,
            "desired_at": self.desired_at.isoformat() if self.desired_at else None,
            "reported": self.reported,
            "reported_ts": self.reported_ts,
            "update_state": self.update_state,
            "in_sync": self.in_sync,
            "differences": [difference.to_dict() for difference in self.differences],
        }


def active_release(reported: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(target, model_id) of the active slot in a state report's ``slots``; None if unknown."""
    slots = reported.get("slots")
    if not isinstance(slots, Mapping):
        return None, None
    active = slots.get("active")
    slot = slots.get(active) if active in SLOT_NAMES else None
    if not isinstance(slot, Mapping):
        return None, _model_id(slots.get("champion"))
    model_id = _text(slot.get("model_id")) or _model_id(slots.get("champion"))
    return _text(slot.get("target")), model_id


def reported_challenger(reported: Mapping[str, Any]) -> str | None:
    """The model id of the challenger a state report says runs in shadow mode."""
    slots = reported.get("slots")
    return _model_id(slots.get("challenger")) if isinstance(slots, Mapping) else None


def twin_differences(
    desired: Mapping[str, Any], reported: Mapping[str, Any], update_state: str | None
) -> list[Difference]:
    """Where the reported state does not match the desired document (see the module doc)."""
    differences: list[Difference] = []
    release = desired.get("release")
    if isinstance(release, Mapping) and isinstance(release.get("target"), str):
        target, model_id = active_release(reported)
        if target != release["target"]:
            if not reported:
                note = "the device has not reported yet"
            else:
                note = f"the active slot runs {target or 'a model of no release'}"
                note += f" ({model_id})" if model_id else ""
                if update_state == "rolled_back":
                    note += "; the last update was rolled back"
            differences.append(Difference("release", release["target"], target, note))
    challenger = desired.get("challenger")
    wanted = _model_id(challenger)
    running = reported_challenger(reported)
    if wanted != running:
        note = (
            "no challenger wanted, one runs"
            if wanted is None
            else ("not started" if running is None else "another challenger runs")
        )
        differences.append(Difference("challenger", wanted, running, note))
    if update_state is not None and update_state not in SETTLED_STATES:
        note = "rolling back" if update_state == "rolling_back" else "update in progress"
        differences.append(Difference("update_state", None, update_state, note))
    return differences


def _model_id(value: Any) -> str | None:
    return _text(value.get("model_id")) if isinstance(value, Mapping) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
