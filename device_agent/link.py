"""MQTT link layer over paho-mqtt 2.x, shared by the hub and the agent.

Design rules, kept here so they cannot be broken by accident:

* paho runs its own network thread (``loop_start``); our callbacks do nothing but put an
  event in the owner's inbox (:meth:`MqttLink.get`). No user code runs under paho's locks,
  with one declared exception: messages on a topic given to :meth:`MqttLink.route` go to its
  handler on the network thread, and that handler may only hand the payload over (set an
  event, put it in a queue), never block. :meth:`MqttLink.nudge` wakes a waiting
  :meth:`MqttLink.get` without an event.
* Subscriptions are declared once and (re)issued in ``on_connect``, so they survive a
  reconnect to a broker that forgot the session.
* paho's own reconnect (doubling, no jitter) is off. A supervisor thread reconnects with a
  capped exponential backoff with jitter, so a fleet that lost its broker does not come back
  in lock-step.
* Small packets go out at once (TCP_NODELAY, set when paho opens the socket): with Nagle's
  algorithm every request/response through the broker waits for delayed ACKs.
* Everything works on MQTT 3.1.1.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.errors import ConfigError, LinkError

log = logging.getLogger(__name__)

_SCHEMES = {"mqtt": (False, 1883), "tcp": (False, 1883), "mqtts": (True, 8883), "ssl": (True, 8883)}


@dataclass(frozen=True)
class MqttEndpoint:
    """Where the broker is and how to log in, parsed from ``mqtt[s]://user:pass@host:port``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"MQTT URL {mask_url(url)!r} is malformed: {exc}") from exc
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"MQTT URL {mask_url(url)!r}: scheme must be mqtt:// or mqtts://, "
                f"got {parts.scheme + '://' if parts.scheme else 'none'}"
            )
        if not parts.hostname:
            raise ConfigError(f"MQTT URL {mask_url(url)!r} has no host")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"MQTT URL {mask_url(url)!r}: unexpected path or query")
        tls, default_port = _SCHEMES[parts.scheme]
        return cls(
            host=parts.hostname,
            port=port or default_port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    @property
    def url(self) -> str:
        """The URL with the password masked, fit for logs."""
        user = f"{self.username}{':***' if self.password else ''}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def mask_url(url: str) -> str:
    """Replace the password of any ``scheme://user:pass@host`` URL by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparseable URL>"


@dataclass(frozen=True)
class TlsFiles:
    """Certificate files for ``mqtts://``; without a CA file the system's CAs are used."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker when the client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter (seconds)."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5  # the delay is drawn from [(1 - jitter) * d, d]

    def delay(self, attempt: int, rng: random.Random) -> float:
        capped = min(self.maximum_s, self.initial_s * self.factor ** min(attempt, 64))
        return capped * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True)
class Message:
    """An application message received from the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connected:
    """The link is up (after the first connect and after every reconnect)."""

    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    """The link went down; the supervisor is reconnecting unless the link was stopped."""

    reason: str


LinkEvent = Message | Connected | Disconnected


@dataclass
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    messages_in: int = 0
    publishes: int = 0


def acknowledged(info: paho.MQTTMessageInfo) -> bool:
    """``info.is_published()`` without its exceptions: False until acknowledged.

    paho raises from ``is_published()`` for a message it took while the connection was down
    (its return code stays ``MQTT_ERR_NO_CONN`` even after paho sends it on reconnect); such a
    message counts as not acknowledged, and the caller publishes it again after the reconnect.
    """
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


class _Nudge:
    """What :meth:`MqttLink.nudge` puts in the inbox; :meth:`MqttLink.get` never returns it."""


_NUDGE = _Nudge()


class MqttLink:
    """One MQTT connection with an inbox, declared subscriptions and a reconnect supervisor."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        client_id: str,
        *,
        tls: TlsFiles | None = None,
        will: Will | Callable[[], Will] | None = None,
        keepalive_s: int = 30,
        backoff: Backoff | None = None,
        clean_session: bool = True,
        connect_timeout_s: float = 5.0,
        seed: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.stats = LinkStats()
        self.last_error: str | None = None
        self._keepalive_s = keepalive_s
        self._ca_file = tls.ca_file if tls is not None else None
        self._backoff = backoff or Backoff()
        self._rng = random.Random(seed)
        self._inbox: queue.Queue[LinkEvent | _Nudge] = queue.Queue()
        self._routes: dict[str, Callable[[bytes], None]] = {}
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._session_up = False  # under _lock: on_connect has read the subscriptions
        self._connected = threading.Event()
        self._session_ended = threading.Event()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = connect_timeout_s
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        configure_client(client, endpoint, tls)
        # A callable will is asked for a fresh one before every connection attempt, so the
        # will can name the connection it belongs to (the agent stamps it with the time).
        self._will = will
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # -- owner-facing API ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Declare a subscription; it is issued now if connected and again on every connect."""
        with self._lock:
            self._subscriptions[topic_filter] = qos
            # decided under the lock on_connect reads the declarations with, so a filter
            # declared while a connection comes up is issued by exactly one of the two
            issue_now = self._session_up
        if issue_now:
            self._client.subscribe(topic_filter, qos)

    def start(self, wait_s: float | None = None) -> None:
        """Start connecting in the background.

        With ``wait_s``, block until the first connection is up, and raise :class:`LinkError`
        naming the cause if it is not up in time (unreachable broker, refused credentials).
        """
        if self._supervisor is not None:
            raise LinkError("link already started")
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._supervisor.start()
        if wait_s is not None and not self._connected.wait(wait_s):
            self.stop()
            cause = self.last_error or "no answer"
            raise LinkError(f"cannot connect to MQTT broker {self.endpoint.url}: {cause}")

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait_s: float | None = None,
    ) -> bool:
        """Publish; with ``wait_s``, wait for the broker's acknowledgement (QoS 1).

        Returns True when the message was handed to the socket (QoS 0) or acknowledged
        (QoS 1 with ``wait_s``). paho keeps QoS 1 messages queued while disconnected.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        self.stats.publishes += 1
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise LinkError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if wait_s is None:
            return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        deadline = time.monotonic() + wait_s
        while not acknowledged(info):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return False
            # wait_for_publish raises while disconnected; poll instead, the message is queued
            time.sleep(min(0.01, remaining))
        return True

    def publish_info(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        """Publish without waiting; the returned info's ``is_published()`` turns True once
        the broker acknowledged the message (QoS 1). paho keeps it queued while disconnected.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        self.stats.publishes += 1
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise LinkError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        return info

    def route(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Hand every message on ``topic`` (exactly that topic, no wildcards) to ``handler``
        on paho's network thread instead of the inbox.

        For payloads another thread is waiting for (a download's responses), so they do not
        queue behind whatever the owner's loop is doing. ``handler`` must only hand the
        payload over and return; an exception from it is logged and the message dropped.
        Call before :meth:`start`.
        """
        self._routes[topic] = handler

    def nudge(self) -> None:
        """Wake the thread waiting in :meth:`get` (it returns None), from any thread."""
        self._inbox.put(_NUDGE)

    def get(self, timeout_s: float | None = None) -> LinkEvent | None:
        """The next event from the inbox, or None after ``timeout_s`` (or a :meth:`nudge`)."""
        try:
            event = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return None if isinstance(event, _Nudge) else event

    def events(self, timeout_s: float) -> Iterator[LinkEvent]:
        """The inbox's events until it stays empty up to ``timeout_s`` from now (for pumps)."""
        deadline = time.monotonic() + timeout_s
        while (event := self.get(timeout_s=max(0.0, deadline - time.monotonic()))) is not None:
            yield event

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop all threads."""
        self._stopping.set()
        if self._connected.is_set():
            info = self._client.disconnect()
            if info == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._session_ended.wait(2.0)
        self._session_ended.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=10.0)
        self._client.loop_stop()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a power cut would (for tests)."""
        self._stopping.set()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self._session_ended.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10.0)
        self._client.loop_stop()

    # -- supervisor thread -----------------------------------------------------------------

    def _supervise(self) -> None:
        attempt = 0
        first = True
        while not self._stopping.is_set():
            self._session_ended.clear()
            self._arm_will()
            try:
                if first:
                    self._client.connect(
                        self.endpoint.host, self.endpoint.port, keepalive=self._keepalive_s
                    )
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.stats.connect_failures += 1
                self.last_error = _describe_socket_error(exc, self._ca_file)
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                log.debug(
                    "mqtt connect to %s failed (%s); retry in %.2fs",
                    self.endpoint.url,
                    self.last_error,
                    delay,
                )
                self._stopping.wait(delay)
                continue
            connects_before = self.stats.connects
            self._client.loop_start()
            self._session_ended.wait()
            self._client.loop_stop()
            if self._stopping.is_set():
                break
            if self.stats.connects > connects_before:
                attempt = 0  # the session was up: start the backoff over
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            self._stopping.wait(delay)

    def _arm_will(self) -> None:
        will = self._will() if callable(self._will) else self._will
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    # -- paho callbacks: only record and enqueue -------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            self.stats.connect_failures += 1
            self.last_error = f"broker refused the connection: {reason_code.getName()}"
            return
        with self._lock:
            subscriptions = list(self._subscriptions.items())
            self._session_up = True
        if subscriptions:
            client.subscribe(subscriptions)
        self.stats.connects += 1
        self.last_error = None
        self._connected.set()
        self._inbox.put(Connected(session_present=bool(flags.session_present)))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            self._session_up = False
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            self.stats.disconnects += 1
            self._inbox.put(Disconnected(reason=reason_code.getName()))
        self._session_ended.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.stats.messages_in += 1
        handler = self._routes.get(msg.topic)
        if handler is not None:
            try:
                handler(bytes(msg.payload))
            except Exception:  # never into paho's loop: it would drop the connection
                log.exception("handler for %s failed; message dropped", msg.topic)
            return
        self._inbox.put(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))


def configure_client(client: paho.Client, endpoint: MqttEndpoint, tls: TlsFiles | None) -> None:
    """The endpoint's credentials and TLS files on a paho client, and TCP_NODELAY on its
    socket (every MQTT client of the project connects this way). ConfigError naming the
    broker if the TLS files cannot be loaded."""
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls:
        files = tls or TlsFiles()
        try:
            client.tls_set(
                ca_certs=str(files.ca_file) if files.ca_file else None,
                certfile=str(files.cert_file) if files.cert_file else None,
                keyfile=str(files.key_file) if files.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files for {endpoint.url} cannot be loaded: {exc}") from exc
    client.on_socket_open = _send_small_packets_at_once


def _send_small_packets_at_once(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle's algorithm on the link's socket (paho leaves it on).

    With Nagle, a request/response through the broker (fetch chunks, commands) waits for the
    peer's delayed ACK at every hop: 88 ms per round trip measured on loopback, 0.7 ms with
    TCP_NODELAY here and ``set_tcp_nodelay true`` on the broker (docs/brokers.md).
    """
    if isinstance(sock, socket.socket):  # also ssl.SSLSocket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _describe_socket_error(exc: BaseException, ca_file: Path | None = None) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        trusted = f"CA file {ca_file}" if ca_file is not None else "the system's CAs"
        reason = exc.verify_message or exc.reason or str(exc)
        return f"TLS certificate of the broker not accepted with {trusted}: {reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return str(exc) or type(exc).__name__
