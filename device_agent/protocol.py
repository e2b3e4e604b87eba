"""The EdgeOps wire protocol, version 1: topic tree and payload documents.

This module is the single definition of what travels over MQTT between the hub and the
agents; the hub imports it from here. Every payload is a JSON object carrying
``"schema": 1`` and a ``"type"`` naming the document. Unknown fields are kept (they
round-trip through ``from_dict``/``to_dict``), so a newer peer can add fields without
breaking an older one. A payload that is not valid JSON, carries another schema version,
or lacks a required field raises :class:`ProtocolError`; receivers log it, count it and drop
it, never crash on it.

Topic tree (all under ``edgeops/v1/dev/{device_id}/``), see docs/protocol.md:

======================  ==============  ========  ===  =====================================
topic                   direction       retained  QoS  what
======================  ==============  ========  ===  =====================================
state                   device -> hub   yes       1    reported twin
presence                device -> hub   yes       1    online/offline (offline = last will)
desired                 hub -> device   yes       1    desired twin
events                  device -> hub   no        1    update transitions, errors
telemetry               device -> hub   no        1    sequence-numbered sketch windows
fetch/req, fetch/res    both            no        1    chunked artifact transfer
cmd                     hub -> device   no        1    commands
======================  ==============  ========  ===  =====================================
"""

from __future__ import annotations

import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

from device_agent.errors import ProtocolError

SCHEMA_VERSION = 1
TOPIC_PREFIX = "edgeops/v1/dev"
MAX_PAYLOAD_BYTES = 256 * 1024  # a larger payload is refused before JSON parsing

# A device id is also an MQTT topic level and a broker user name: no wildcards, no slashes.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


class Channel(StrEnum):
    """The last level(s) of a device topic."""

    STATE = "state"
    PRESENCE = "presence"
    DESIRED = "desired"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    FETCH_REQ = "fetch/req"
    FETCH_RES = "fetch/res"
    CMD = "cmd"

    @property
    def retained(self) -> bool:
        return self in (Channel.STATE, Channel.PRESENCE, Channel.DESIRED)


QOS = 1  # every channel is QoS 1: at least once, receivers are idempotent


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can serve as a topic level and broker user name."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise ProtocolError(
            f"device id {device_id!r} is invalid: expected 1-63 characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    return device_id


def device_topic(device_id: str, channel: Channel) -> str:
    """The full topic of ``channel`` for ``device_id``."""
    return f"{TOPIC_PREFIX}/{validate_device_id(device_id)}/{channel.value}"


def subscription(channel: Channel) -> str:
    """A topic filter matching ``channel`` of every device."""
    return f"{TOPIC_PREFIX}/+/{channel.value}"


def parse_topic(topic: str) -> tuple[str, Channel]:
    """Split a device topic into its device id and channel."""
    prefix = TOPIC_PREFIX + "/"
    if not topic.startswith(prefix):
        raise ProtocolError(f"topic {topic!r} is not under {TOPIC_PREFIX}/")
    device_id, _, rest = topic[len(prefix) :].partition("/")
    try:
        channel = Channel(rest)
    except ValueError:
        raise ProtocolError(f"topic {topic!r}: unknown channel {rest!r}") from None
    return validate_device_id(device_id), channel


def _now() -> float:
    return round(time.time(), 3)


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], doc: str) -> Any:
    if key not in data:
        raise ProtocolError(f"{doc}: missing field {key!r}")
    value = data[key]
    # bool is an int in Python; never accept it where a number is meant
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(f"{doc}: field {key!r} must be {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(
            f"{doc}: field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass
class Document(ABC):
    """Base of every payload: a typed view that keeps fields it does not know."""

    TYPE: ClassVar[str] = ""
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this document, unknown fields included."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build the document from a JSON object, keeping fields it does not know."""

    def _envelope(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**self.extra, "schema": SCHEMA_VERSION, "type": self.TYPE, **body}

    @classmethod
    def _extra(cls, data: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
        return {k: v for k, v in data.items() if k not in known | {"schema", "type"}}


@dataclass
class StateReport(Document):
    """The reported twin a device publishes, retained, on its ``state`` topic."""

    TYPE: ClassVar[str] = "state"
    _FIELDS: ClassVar[set[str]] = {
        "device_id",
        "agent_version",
        "hardware",
        "slots",
        "update_state",
        "health",
        "free_memory_bytes",
        "ts",
    }

    device_id: str
    agent_version: str
    hardware: dict[str, str] = field(default_factory=dict)
    slots: dict[str, Any] = field(default_factory=dict)
    update_state: str = "idle"
    health: str = "ok"
    free_memory_bytes: int | None = None
    ts: float = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return self._envelope(
            {
                "device_id": self.device_id,
                "agent_version": self.agent_version,
                "hardware": dict(self.hardware),
                "slots": dict(self.slots),
                "update_state": self.update_state,
                "health": self.health,
                "free_memory_bytes": self.free_memory_bytes,
                "ts": self.ts,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        doc = "state report"
        hardware = _require(data, "hardware", dict, doc)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in hardware.items()):
            raise ProtocolError(f"{doc}: field 'hardware' must map strings to strings")
        free = data.get("free_memory_bytes")
        if free is not None and (isinstance(free, bool) or not isinstance(free, int)):
            raise ProtocolError(f"{doc}: field 'free_memory_bytes' must be int or null")
        return cls(
            device_id=validate_device_id(_require(data, "device_id", str, doc)),
            agent_version=_require(data, "agent_version", str, doc),
            hardware=dict(hardware),
            slots=dict(data.get("slots") or {}),
            update_state=str(data.get("update_state", "idle")),
            health=str(data.get("health", "ok")),
            free_memory_bytes=free,
            ts=float(_require(data, "ts", (int, float), doc)),
            extra=cls._extra(data, cls._FIELDS),
        )


@dataclass
class Presence(Document):
    """Online/offline, retained. The broker publishes the offline form as the last will."""

    TYPE: ClassVar[str] = "presence"
    _FIELDS: ClassVar[set[str]] = {"device_id", "online", "ts"}

    device_id: str
    online: bool
    ts: float = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return self._envelope({"device_id": self.device_id, "online": self.online, "ts": self.ts})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        doc = "presence"
        return cls(
            device_id=validate_device_id(_require(data, "device_id", str, doc)),
            online=_require(data, "online", bool, doc),
            ts=float(_require(data, "ts", (int, float), doc)),
            extra=cls._extra(data, cls._FIELDS),
        )


@dataclass
class Event(Document):
    """One agent event (not retained), numbered by the agent's offline buffer (``seq``)."""

    TYPE: ClassVar[str] = "event"
    _FIELDS: ClassVar[set[str]] = {"device_id", "seq", "event", "ts", "detail"}

    device_id: str
    seq: int
    event: str
    ts: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self._envelope(
            {
                "device_id": self.device_id,
                "seq": self.seq,
                "event": self.event,
                "ts": self.ts,
                "detail": dict(self.detail),
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        doc = "event"
        seq = _require(data, "seq", int, doc)
        if seq < 1:
            raise ProtocolError(f"{doc}: field 'seq' must be at least 1, got {seq}")
        name = _require(data, "event", str, doc)
        if not name or len(name) > 64:
            raise ProtocolError(f"{doc}: field 'event' must hold 1-64 characters")
        return cls(
            device_id=validate_device_id(_require(data, "device_id", str, doc)),
            seq=seq,
            event=name,
            ts=float(_require(data, "ts", (int, float), doc)),
            detail=dict(_require(data, "detail", dict, doc)),
            extra=cls._extra(data, cls._FIELDS),
        )


DOCUMENTS: dict[Channel, type[Document]] = {
    Channel.STATE: StateReport,
    Channel.PRESENCE: Presence,
    Channel.EVENTS: Event,
}


def encode(document: Document) -> bytes:
    """Serialise a document to its wire form (compact UTF-8 JSON)."""
    return json.dumps(document.to_dict(), separators=(",", ":"), sort_keys=True).encode()


def _refuse_constant(name: str) -> Any:
    # Python's parser accepts NaN and Infinity; JSON (and PostgreSQL's JSONB) does not
    raise ProtocolError(f"payload is not valid JSON: {name} is not a number")


def decode_object(payload: bytes) -> dict[str, Any]:
    """Parse a payload into a JSON object of this schema version, or raise ProtocolError."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"payload is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"payload must be a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        raise ProtocolError(f"payload schema is {schema!r}, expected {SCHEMA_VERSION}")
    return data


def decode(channel: Channel, payload: bytes) -> Document:
    """Decode the payload of ``channel`` into its document type."""
    try:
        cls = DOCUMENTS[channel]
    except KeyError:
        raise ProtocolError(f"channel {channel.value!r} has no document type yet") from None
    data = decode_object(payload)
    if data.get("type") != cls.TYPE:
        raise ProtocolError(
            f"payload on {channel.value!r} has type {data.get('type')!r}, expected {cls.TYPE!r}"
        )
    return cls.from_dict(data)


# Documents defined beside the code that computes them register themselves in DOCUMENTS;
# importing them here (last: they build on the classes above) makes decode() know them.
import device_agent.telemetry  # noqa: E402, F401  (TelemetryWindow for Channel.TELEMETRY)
