"""Serving the release repository over MQTT, and keeping its timestamp fresh.

:class:`FetchServer` subscribes to every device's ``fetch/req`` and answers each request on
the same device's ``fetch/res`` with one frame of the wire format
(:mod:`device_agent.fetch.wire`): ``ok`` with the bytes asked for, ``not_found``,
``bad_request`` (malformed request whose id could still be read) or ``error``. Requests that
cannot even be attributed (not JSON, no usable id, wrong topic) are counted and dropped. Only
files under ``repository/metadata`` and ``repository/targets`` are served, read by offset,
never through a symbolic link.

:class:`TimestampRefresher` is a thread that calls :meth:`TrustRepository.refresh` every
``interval_s`` seconds: the timestamp (and snapshot, targets) is re-signed when less than half
of its lifetime is left, so devices never see it expire while the hub runs.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import AgentError, LinkError, ProtocolError
from device_agent.fetch.wire import (
    FetchRequest,
    FetchResponse,
    decode_request,
    encode_response,
)
from device_agent.link import Connected, Disconnected, Message, MqttEndpoint, MqttLink, TlsFiles
from device_agent.protocol import QOS, Channel, device_topic, parse_topic, subscription
from edgeops.errors import BrokerError
from edgeops.trust.files import RepositoryFileNotFoundError, read_range
from edgeops.trust.repository import TrustRepository

__all__ = ["FetchServer", "FetchServerStats", "TimestampRefresher"]

log = logging.getLogger(__name__)


@dataclass
class FetchServerStats:
    """What the server did since it started."""

    requests: int = 0
    ok: int = 0
    not_found: int = 0
    bad_request: int = 0
    errors: int = 0
    dropped: int = 0  # unattributable payloads: not answered
    bytes_served: int = 0


class FetchServer:
    """Answers ``fetch/req`` from the files of ``repository_dir`` (the ``repository/`` dir).

    ``transport`` is either an :class:`MqttEndpoint` (the server makes, starts and stops its
    own link, ``client_id``) or an :class:`MqttLink` the caller starts and stops; the server
    then subscribes on it and must be the only reader of its events.
    """

    def __init__(
        self,
        repository_dir: Path,
        transport: MqttEndpoint | MqttLink,
        *,
        client_id: str = "edgeops-hub-fetch",
        tls: TlsFiles | None = None,
    ) -> None:
        self.repository_dir = Path(repository_dir)
        self._owns_link = isinstance(transport, MqttEndpoint)
        self.link = (
            MqttLink(transport, client_id=client_id, tls=tls)
            if isinstance(transport, MqttEndpoint)
            else transport
        )
        self.link.subscribe(subscription(Channel.FETCH_REQ), QOS)
        self.stats = FetchServerStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self, wait_s: float = 10.0) -> None:
        """Connect (own link) and answer requests in a background thread."""
        if self._owns_link:
            try:
                self.link.start(wait_s=wait_s)
            except LinkError as exc:
                raise BrokerError(str(exc)) from None
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="hub-fetch", daemon=True)
        self._thread.start()

    def run(self, stop: threading.Event | None = None) -> None:
        """Answer requests until ``stop`` (or :meth:`stop`) is set."""
        stop_event = stop if stop is not None else self._stop
        while not (stop_event.is_set() or self._stop.is_set()):
            try:
                self.pump(timeout_s=0.2)
            except Exception:  # one bad request must not stop the server
                self.stats.errors += 1
                log.exception("fetch server: unexpected error; still serving")

    def stop(self) -> None:
        """Stop answering; disconnect the link if the server made it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        if self._owns_link:
            self.link.stop()

    def pump(self, timeout_s: float = 0.2) -> int:
        """Answer queued requests for up to ``timeout_s``; returns how many events were read."""
        handled = 0
        for event in self.link.events(timeout_s):
            handled += 1
            if isinstance(event, Connected):
                log.info("fetch server connected to %s", self.link.endpoint.url)
            elif isinstance(event, Disconnected):
                log.warning("fetch server disconnected (%s); reconnecting", event.reason)
            elif isinstance(event, Message):
                answer = self.handle(event.topic, event.payload)
                if answer is not None:
                    topic, frame = answer
                    try:
                        self.link.publish(topic, frame, qos=QOS)
                    except LinkError as exc:
                        log.warning("fetch answer on %s not sent: %s", topic, exc)
        return handled

    # -- answering --------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """The topic and frame answering one ``fetch/req`` message, or None to drop it."""
        try:
            device_id, channel = parse_topic(topic)
        except ProtocolError as exc:
            self.stats.dropped += 1
            log.warning("fetch request dropped: %s", exc)
            return None
        if channel is not Channel.FETCH_REQ:
            self.stats.dropped += 1
            return None
        reply_to = device_topic(device_id, Channel.FETCH_RES)
        self.stats.requests += 1
        try:
            request = decode_request(payload)
        except ProtocolError as exc:
            refused = _refusal(payload, str(exc))
            if refused is None:
                self.stats.dropped += 1
                log.warning("fetch request from %s dropped: %s", device_id, exc)
                return None
            self.stats.bad_request += 1
            log.info("fetch request from %s refused: %s", device_id, exc)
            return reply_to, encode_response(refused)
        return reply_to, self.answer(request)

    def answer(self, request: FetchRequest) -> bytes:
        """The response frame for a well-formed ``request``."""
        try:
            chunk = read_range(self.repository_dir, request.path, request.offset, request.length)
        except RepositoryFileNotFoundError:
            self.stats.not_found += 1
            return encode_response(
                FetchResponse(
                    req_id=request.req_id,
                    path=request.path,
                    offset=request.offset,
                    status="not_found",
                    error=f"no file {request.path}",
                )
            )
        except (OSError, AgentError) as exc:
            self.stats.errors += 1
            log.warning("fetch of %s failed: %s", request.path, exc)
            return encode_response(
                FetchResponse(
                    req_id=request.req_id,
                    path=request.path,
                    offset=request.offset,
                    status="error",
                    error=f"cannot read {request.path}",
                )
            )
        self.stats.ok += 1
        self.stats.bytes_served += len(chunk.data)
        header = FetchResponse(
            req_id=request.req_id,
            path=request.path,
            offset=request.offset,
            status="ok",
            total=chunk.total,
        )
        return encode_response(header, chunk.data)


def _refusal(payload: bytes, reason: str) -> FetchResponse | None:
    """A ``bad_request`` answer if the payload still names a usable request id."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    req_id, path, offset = document.get("req_id"), document.get("path"), document.get("offset")
    try:
        return FetchResponse(
            req_id=req_id if isinstance(req_id, str) else "",
            path=path[:512] if isinstance(path, str) else "",
            offset=offset if isinstance(offset, int) and not isinstance(offset, bool) else 0,
            status="bad_request",
            error=reason[:300],
        )
    except ProtocolError:
        return None


class TimestampRefresher:
    """Calls ``repository.refresh()`` every ``interval_s`` seconds in a daemon thread."""

    def __init__(self, repository: TrustRepository, *, interval_s: float = 60.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.repository = repository
        self.interval_s = interval_s
        self.refreshes = 0  # how many times something was re-signed
        self.failures = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """Refresh now if due; returns the roles re-signed (errors are logged and counted)."""
        try:
            roles = self.repository.refresh()
        except (OSError, AgentError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            log.error("timestamp refresh failed: %s", exc)
            return []
        except Exception as exc:  # the thread must outlive one failed attempt
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("timestamp refresh failed")
            return []
        if roles:
            self.refreshes += 1
            log.info("re-signed %s", ", ".join(roles))
        return roles

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hub-tuf-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)
