"""The ``fetch`` wire format: chunked, resumable reads of the hub's TUF repository over MQTT.

A device asks for a byte range of one repository file on its own ``fetch/req`` topic; the hub
answers on the same device's ``fetch/res`` topic. Requests are idempotent (a byte range of an
immutable or atomically replaced file), so a request that got no answer is simply sent again
with the same offset: after a broker outage the download goes on where it stopped.

Request (device -> hub), compact JSON::

    {"schema": 1, "type": "fetch_req", "req_id": "5f2c...",
     "path": "targets/m/3/litert/<sha>.model.tflite", "offset": 131072, "length": 65536}

Response (hub -> device): one binary frame, a JSON header, a newline, then the raw bytes, so
the payload costs no base64 inflation::

    {"schema": 1, "type": "fetch_res", "req_id": "5f2c...", "path": "...", "offset": 131072,
     "total": 204800, "status": "ok"}\\n<bytes>

``status`` is ``ok`` (the bytes are ``file[offset:offset + length]``, shorter only at the end
of the file; ``total`` is the file's size), ``not_found``, ``bad_request`` or ``error`` (with an
``error`` message and no bytes). Paths are relative to the repository and start with
``metadata/`` or ``targets/``; anything else is refused before any file is touched.

Everything that comes from the network is checked here: a malformed request or response raises
:class:`~device_agent.errors.ProtocolError` naming the problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.protocol import SCHEMA_VERSION

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_PATH_CHARS",
    "STATUSES",
    "FetchRequest",
    "FetchResponse",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "validate_path",
]

DEFAULT_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 256 * 1024
MAX_PATH_CHARS = 512
MAX_HEADER_BYTES = 4096
STATUSES = ("ok", "not_found", "bad_request", "error")
ROOTS = ("metadata", "targets")
REQUEST_TYPE = "fetch_req"
RESPONSE_TYPE = "fetch_res"

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_REQ_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_path(path: str) -> str:
    """Return ``path`` if it names a file under ``metadata/`` or ``targets/``, else raise."""
    if not isinstance(path, str) or not path:
        raise ProtocolError("fetch path must be a non-empty string")
    if len(path) > MAX_PATH_CHARS:
        raise ProtocolError(f"fetch path is {len(path)} characters long; at most {MAX_PATH_CHARS}")
    segments = path.split("/")
    if segments[0] not in ROOTS or len(segments) < 2:
        raise ProtocolError(f"fetch path {path!r} must start with 'metadata/' or 'targets/'")
    for segment in segments[1:]:
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise ProtocolError(
                f"fetch path {path!r}: segment {segment!r} is not allowed "
                "(letters, digits, '.', '_', '-'; no empty, '.' or '..' segments)"
            )
    return path


@dataclass(frozen=True)
class FetchRequest:
    """Read ``length`` bytes of ``path`` from ``offset``."""

    req_id: str
    path: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        if not _REQ_ID.fullmatch(self.req_id):
            raise ProtocolError(f"fetch request id {self.req_id!r} is malformed")
        validate_path(self.path)
        if self.offset < 0:
            raise ProtocolError(f"fetch request offset {self.offset} is negative")
        if not 1 <= self.length <= MAX_CHUNK_BYTES:
            raise ProtocolError(
                f"fetch request length {self.length} is outside 1..{MAX_CHUNK_BYTES}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "type": REQUEST_TYPE,
            "req_id": self.req_id,
            "path": self.path,
            "offset": self.offset,
            "length": self.length,
        }


@dataclass(frozen=True)
class FetchResponse:
    """The header of a response; the bytes travel after it in the same frame."""

    req_id: str
    path: str
    offset: int
    status: str = "ok"
    total: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if not _REQ_ID.fullmatch(self.req_id):
            raise ProtocolError(f"fetch response id {self.req_id!r} is malformed")
        if self.status not in STATUSES:
            raise ProtocolError(
                f"fetch response status {self.status!r} is not one of {', '.join(STATUSES)}"
            )
        if self.offset < 0:
            raise ProtocolError(f"fetch response offset {self.offset} is negative")
        if self.total is not None and self.total < 0:
            raise ProtocolError(f"fetch response total {self.total} is negative")
        if self.status == "ok" and self.total is None:
            raise ProtocolError("fetch response with status 'ok' must give the file's total size")

    def to_dict(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "type": RESPONSE_TYPE,
            "req_id": self.req_id,
            "path": self.path,
            "offset": self.offset,
            "status": self.status,
        }
        if self.total is not None:
            header["total"] = self.total
        if self.error is not None:
            header["error"] = self.error
        return header


def _dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _object(text: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA_VERSION:
        raise ProtocolError(f"{what} has schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
    return data


def _int(data: dict[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what}: field {key!r} must be an integer, got {value!r}")
    return value


def _str(data: dict[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: field {key!r} must be a string, got {value!r}")
    return value


def encode_request(request: FetchRequest) -> bytes:
    """The payload of ``request`` on ``fetch/req``."""
    return _dumps(request.to_dict())


def decode_request(payload: bytes) -> FetchRequest:
    """Parse a ``fetch/req`` payload; ProtocolError if it is malformed in any way."""
    what = "fetch request"
    if len(payload) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what} of {len(payload)} bytes exceeds {MAX_HEADER_BYTES}")
    data = _object(payload, what)
    if data.get("type") != REQUEST_TYPE:
        raise ProtocolError(f"{what} has type {data.get('type')!r}, expected {REQUEST_TYPE!r}")
    return FetchRequest(
        req_id=_str(data, "req_id", what),
        path=_str(data, "path", what),
        offset=_int(data, "offset", what),
        length=_int(data, "length", what),
    )


def encode_response(response: FetchResponse, data: bytes = b"") -> bytes:
    """One ``fetch/res`` frame: the JSON header, a newline, the bytes."""
    if response.status != "ok" and data:
        raise ProtocolError(f"a fetch response with status {response.status!r} carries no bytes")
    if len(data) > MAX_CHUNK_BYTES:
        raise ProtocolError(f"a fetch response carries at most {MAX_CHUNK_BYTES} bytes")
    return _dumps(response.to_dict()) + b"\n" + data


def decode_response(payload: bytes) -> tuple[FetchResponse, bytes]:
    """Split a ``fetch/res`` frame into its header and bytes; ProtocolError if malformed."""
    what = "fetch response"
    newline = payload.find(b"\n", 0, MAX_HEADER_BYTES + 1)
    if newline < 0:
        raise ProtocolError(f"{what} has no header line within {MAX_HEADER_BYTES} bytes")
    data = _object(payload[:newline], what)
    if data.get("type") != RESPONSE_TYPE:
        raise ProtocolError(f"{what} has type {data.get('type')!r}, expected {RESPONSE_TYPE!r}")
    total = data.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
        raise ProtocolError(f"{what}: field 'total' must be an integer or absent, got {total!r}")
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        raise ProtocolError(f"{what}: field 'error' must be a string or absent")
    header = FetchResponse(
        req_id=_str(data, "req_id", what),
        path=_str(data, "path", what),
        offset=_int(data, "offset", what),
        status=_str(data, "status", what),
        total=total,
        error=error,
    )
    body = payload[newline + 1 :]
    if header.status != "ok" and body:
        raise ProtocolError(f"{what} with status {header.status!r} carries {len(body)} bytes")
    if len(body) > MAX_CHUNK_BYTES:
        raise ProtocolError(f"{what} carries {len(body)} bytes; at most {MAX_CHUNK_BYTES}")
    return header, body
