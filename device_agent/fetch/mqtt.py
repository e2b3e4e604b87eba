"""TUF metadata and targets over the device's own MQTT topics (``fetch/req``, ``fetch/res``).

The fetcher is transport only: it publishes through the ``send`` callable it is given (the
daemon wires it to its :class:`~device_agent.link.MqttLink` on the device's ``fetch/req``
topic) and is handed every ``fetch/res`` payload through :meth:`MqttFetcher.deliver` (the
daemon calls it from its main loop). Downloads run on another thread (the updater's worker):
each chunk is one request, answered by one response frame (see :mod:`device_agent.fetch.wire`).

A request that gets no answer within ``timeout_s`` is sent again with the same offset and the
same request id, so a late answer to an earlier copy still counts. While the broker is away
``send`` raises (the daemon's refuses to queue requests in paho, each of which would be
answered with a full chunk after the reconnect); such a copy is not counted, the fetcher waits
``timeout_s`` and tries again, and the download goes on from its offset once the link is
back. A chunk is given up when no answer arrived for ``deadline_s`` seconds since it was first
asked for (:class:`~tuf.api.exceptions.SlowRetrievalError`). Answers to unknown or finished
requests are counted as ``stale`` and ignored; malformed frames, and frames that do not answer
what was asked (other path or offset, more bytes than asked for), are logged, counted as
``malformed`` and dropped, never raised on the daemon's thread.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions

from device_agent.errors import AgentError, ProtocolError
from device_agent.fetch import FileChangedError, ResumableFetcher
from device_agent.fetch.wire import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    FetchRequest,
    FetchResponse,
    decode_response,
    encode_request,
    validate_path,
)
from device_agent.protocol import Channel, device_topic

__all__ = ["METADATA_BASE_URL", "TARGET_BASE_URL", "MqttFetcher"]

log = logging.getLogger(__name__)

SCHEME = "mqtt:"
METADATA_BASE_URL = "mqtt:metadata/"
TARGET_BASE_URL = "mqtt:targets/"

_HTTP_STATUS = {"not_found": 404, "bad_request": 400, "error": 500}


@dataclass
class _Pending:
    """One chunk asked for and not yet answered."""

    path: str
    offset: int
    length: int
    answered: threading.Event = field(default_factory=threading.Event)
    response: FetchResponse | None = None
    data: bytes = b""
    failure: str | None = None


class MqttFetcher(ResumableFetcher):
    """A ``tuf.ngclient`` fetcher over request/response messages on the device's topics."""

    metadata_base_url = METADATA_BASE_URL
    target_base_url = TARGET_BASE_URL

    def __init__(
        self,
        send: Callable[[bytes], None],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout_s: float = 5.0,
        deadline_s: float = 600.0,
        partial_dir: Path | None = None,
        device_id: str | None = None,
    ) -> None:
        """``send`` publishes one ``fetch/req`` payload. ``device_id`` only serves the
        ``bytes_on_wire`` counter (the topic names count as bytes on the wire)."""
        super().__init__(partial_dir=partial_dir)
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be within 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        if timeout_s <= 0 or deadline_s <= 0:
            raise ValueError("timeout_s and deadline_s must be positive")
        self._send = send
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        if device_id is None:
            self._req_topic_bytes = self._res_topic_bytes = 0
        else:
            self._req_topic_bytes = len(device_topic(device_id, Channel.FETCH_REQ).encode())
            self._res_topic_bytes = len(device_topic(device_id, Channel.FETCH_RES).encode())
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._closed = False

    # -- the daemon's side ------------------------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        """Hand over one ``fetch/res`` payload (any thread); never raises on bad input."""
        self.counters.add(bytes_on_wire=len(payload) + self._res_topic_bytes)
        try:
            header, data = decode_response(payload)
        except (ProtocolError, ValueError, RecursionError) as exc:
            self._drop_malformed(f"malformed fetch response dropped: {exc}")
            return
        with self._lock:
            pending = self._pending.get(header.req_id)
            if pending is None or pending.answered.is_set():
                self.counters.add(stale=1)
                log.debug("fetch response %s answers no open request; ignored", header.req_id)
                return
            problem = _mismatch(pending, header, data)
            if problem is None:
                pending.response, pending.data = header, data
                pending.answered.set()
        if problem is not None:
            self._drop_malformed(f"fetch response {header.req_id} dropped: {problem}")
            return
        self.counters.add(bytes_received_payload=len(data))

    def close(self) -> None:
        """Fail every download waiting for an answer, and every later one (the agent stops)."""
        with self._lock:
            self._closed = True
            for pending in self._pending.values():
                pending.failure = "the fetcher was closed"
                pending.answered.set()

    def _drop_malformed(self, message: str) -> None:
        self.counters.add(malformed=1)
        log.warning(message)

    # -- the downloading side ---------------------------------------------------------------

    def _read(self, url: str, offset: int, limit: int | None) -> Iterator[tuple[int | None, bytes]]:
        path = _repository_path(url)
        total: int | None = None
        while True:
            want = self.chunk_bytes
            if limit is not None:
                want = min(want, limit - offset)
            if total is not None:
                want = min(want, total - offset)
            if want <= 0:
                return
            header, data = self._exchange(path, offset, want)
            if len(data) > want:
                raise tuf_exceptions.DownloadLengthMismatchError(
                    f"{path}: asked for {want} bytes at offset {offset}, the server sent "
                    f"{len(data)}"
                )
            if header.total is not None and header.total < offset:
                raise FileChangedError(
                    f"{path}: the file holds {header.total} bytes now, fewer than the "
                    f"{offset} already received"
                )
            if header.total is not None and header.total < offset + len(data):
                raise tuf_exceptions.DownloadLengthMismatchError(
                    f"{path}: the server sent bytes up to {offset + len(data)} of a file it "
                    f"declares to hold {header.total}"
                )
            total = header.total
            yield total, data
            offset += len(data)
            if total is None or offset >= total:
                return
            if not data:
                raise tuf_exceptions.DownloadError(
                    f"{path}: the server sent no bytes at offset {offset} of {total}"
                )

    def _exchange(self, path: str, offset: int, length: int) -> tuple[FetchResponse, bytes]:
        """Ask for one chunk until it is answered; the answer's header and bytes."""
        request = FetchRequest(req_id=secrets.token_hex(8), path=path, offset=offset, length=length)
        payload = encode_request(request)
        pending = _Pending(path, offset, length)
        with self._lock:
            if self._closed:
                raise tuf_exceptions.DownloadError(f"{path}: the fetcher was closed")
            self._pending[request.req_id] = pending
        try:
            started = time.monotonic()
            sent = 0
            while True:
                if self._publish(payload, request, resend=sent > 0):
                    sent += 1
                remaining = self.deadline_s - (time.monotonic() - started)
                if pending.answered.wait(max(0.0, min(self.timeout_s, remaining))):
                    break
                if time.monotonic() - started >= self.deadline_s:
                    raise tuf_exceptions.SlowRetrievalError(
                        f"{path}: no answer for offset {offset} after {sent} requests in "
                        f"{self.deadline_s:g} s"
                    )
                log.info(
                    "no answer for %s at offset %d within %.3g s; asking again",
                    path,
                    offset,
                    self.timeout_s,
                )
        finally:
            with self._lock:
                self._pending.pop(request.req_id, None)
        if pending.failure is not None:
            raise tuf_exceptions.DownloadError(f"{path}: {pending.failure}")
        header = pending.response
        assert header is not None  # answered without failure: deliver() set it
        if header.status != "ok":
            detail = f": {header.error}" if header.error else ""
            raise tuf_exceptions.DownloadHTTPError(
                f"{path}: the server answered {header.status}{detail}", _HTTP_STATUS[header.status]
            )
        return header, pending.data

    def _publish(self, payload: bytes, request: FetchRequest, *, resend: bool) -> bool:
        """Send one copy of ``request``; False if it was not sent (the link is down: it is
        tried again after ``timeout_s``, and not counted as a request)."""
        try:
            self._send(payload)
        except (AgentError, OSError) as exc:
            log.info("fetch request for %s not sent: %s", request.path, exc)
            return False
        self.counters.add(
            bytes_on_wire=len(payload) + self._req_topic_bytes,
            bytes_requested=request.length,
            requests=1,
            resends=int(resend),
        )
        return True


def _repository_path(url: str) -> str:
    """The repository path (``metadata/...``, ``targets/...``) of an ``mqtt:`` URL."""
    if not url.startswith(SCHEME):
        raise tuf_exceptions.DownloadError(f"{url!r} is not an {SCHEME} URL")
    try:
        return validate_path(url[len(SCHEME) :])
    except ProtocolError as exc:
        raise tuf_exceptions.DownloadError(f"{url!r}: {exc}") from None


def _mismatch(pending: _Pending, header: FetchResponse, data: bytes) -> str | None:
    """Why ``header`` does not answer ``pending``, or None if it does."""
    if header.path != pending.path:
        return f"it is for {header.path!r}, the request was for {pending.path!r}"
    if header.offset != pending.offset:
        return f"it starts at offset {header.offset}, the request at {pending.offset}"
    # more bytes than asked for is not dropped: it is the endless-data attack, which fails
    # the download in the reader
    return None
