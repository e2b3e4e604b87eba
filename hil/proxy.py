"""An MQTT-aware TCP proxy between boards and the rig's broker, with faults on the wire.

:class:`MqttFaultProxy` listens on an address of the rig (the host side of a board's veth)
and forwards every connection to the broker. It reads the MQTT packets of both directions
(fixed header, remaining-length varint; the protocol level from ``CONNECT``; the topic of
each ``PUBLISH``), so it can inject faults by packet rather than by byte offset:

- :meth:`MqttFaultProxy.corrupt_next` flips one byte inside the payload of the next
  ``PUBLISH`` from the broker whose topic matches a glob (``edgeops/v1/dev/*/fetch/res``): a
  chunk damaged in transit that TCP's checksum did not catch;
- :meth:`MqttFaultProxy.drop_all` resets every connection at once (the broker sees the
  clients vanish and publishes their wills);
- :meth:`MqttFaultProxy.set_delay` holds every chunk it forwards, in both directions, for a
  delay (with seeded random jitter) before sending it on, in order: latency on the MQTT
  connections through this proxy, and only on them. It needs no kernel support (unlike
  ``tc netem``), and delays nothing else a board sends or receives (its HTTP source, pings).

:attr:`MqttFaultProxy.stats` counts connections, bytes each way, ``PUBLISH`` packets from the
broker and corrupted ones. A stream that is not MQTT (a remaining length longer than four
bytes) is still forwarded, unparsed, and counted in ``unparsed``. One thread accepts; each
connection has, per direction, one thread that reads and one that sends (after the delay).
When one side closes its connection cleanly, what was read from it before is still
delivered, then both sides are closed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import queue
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from hil.errors import HilError

__all__ = ["MqttFaultProxy", "ProxyError", "ProxyStats", "split_packets"]

PUBLISH = 3
CONNECT = 1
_RECV_BYTES = 65536
_ACCEPT_POLL_S = 0.2
_OUTBOX_CHUNKS = 256
"""Chunks one direction holds at most while they wait out the delay; a reader that finds
its outbox full stops reading, so TCP's flow control slows the sender down."""


class ProxyError(HilError):
    """The proxy cannot listen or was asked for something impossible."""


@dataclass
class ProxyStats:
    """What went through the proxy since it started."""

    connections: int = 0
    """Connections accepted."""
    active: int = 0
    """Connections open now."""
    bytes_to_broker: int = 0
    bytes_to_client: int = 0
    publishes_to_client: int = 0
    """``PUBLISH`` packets forwarded from the broker to clients."""
    corrupted: int = 0
    """``PUBLISH`` packets whose payload :meth:`MqttFaultProxy.corrupt_next` changed."""
    corrupted_topics: list[str] = field(default_factory=list)
    dropped: int = 0
    """Connections reset by :meth:`MqttFaultProxy.drop_all`."""
    unparsed: int = 0
    """Connections forwarded without parsing (their bytes were not MQTT)."""


def _remaining_length(buffer: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(remaining length, bytes of the varint) at ``buffer[start:]``; None if incomplete.

    ValueError if the varint runs past four bytes (not MQTT).
    """
    value, multiplier = 0, 1
    for used in range(4):
        index = start + used
        if index >= len(buffer):
            return None
        byte = buffer[index]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return value, used + 1
        multiplier *= 128
    raise ValueError("MQTT remaining length longer than four bytes")


def split_packets(buffer: bytearray) -> list[bytearray]:
    """Take every complete MQTT packet off the front of ``buffer`` (which keeps the rest).

    ValueError if the bytes cannot be MQTT.
    """
    packets = []
    while len(buffer) >= 2:
        parsed = _remaining_length(buffer, 1)
        if parsed is None:
            break
        length, used = parsed
        end = 1 + used + length
        if len(buffer) < end:
            break
        packets.append(buffer[:end])
        del buffer[:end]
    return packets


def publish_parts(packet: bytes | bytearray, protocol_level: int = 4) -> tuple[str, int, int]:
    """(topic, payload start, payload end) of a ``PUBLISH`` packet; ValueError if malformed.

    ``protocol_level`` 5 (MQTT 5) skips the properties before the payload.
    """
    parsed = _remaining_length(packet, 1)
    if parsed is None:
        raise ValueError("incomplete packet")
    _, used = parsed
    index = 1 + used
    if index + 2 > len(packet):
        raise ValueError("PUBLISH without a topic")
    topic_length = int.from_bytes(packet[index : index + 2], "big")
    index += 2
    topic = bytes(packet[index : index + topic_length]).decode("utf-8", "replace")
    index += topic_length
    if (packet[0] >> 1) & 0x03:  # QoS 1 or 2: a packet identifier
        index += 2
    if protocol_level >= 5:
        properties = _remaining_length(packet, index)
        if properties is None:
            raise ValueError("PUBLISH properties cut short")
        index += properties[1] + properties[0]
    if index > len(packet):
        raise ValueError("PUBLISH shorter than its header")
    return topic, index, len(packet)


def _connect_level(packet: bytes | bytearray) -> int | None:
    """The protocol level of a ``CONNECT`` packet (4: MQTT 3.1.1, 5: MQTT 5), if readable."""
    parsed = _remaining_length(packet, 1)
    if parsed is None:
        return None
    index = 1 + parsed[1]
    if index + 2 > len(packet):
        return None
    name_length = int.from_bytes(packet[index : index + 2], "big")
    level_at = index + 2 + name_length
    return packet[level_at] if level_at < len(packet) else None


@dataclass
class _Rule:
    pattern: str
    left: int
    offset: int


class _Outbox:
    """One direction's delay line: chunks with the time they may be sent, in order."""

    def __init__(self, seed: str) -> None:
        self.chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue(_OUTBOX_CHUNKS)
        self.last_due = 0.0
        self.rng = random.Random(seed)


class _Connection:
    def __init__(
        self, client: socket.socket, broker: socket.socket, number: int, seed: int
    ) -> None:
        self.client = client
        self.broker = broker
        self.number = number
        self.protocol_level = 4
        self.closed = False
        self.closing = threading.Event()
        self.to_broker = _Outbox(f"{seed}/{number}/to-broker")
        self.to_client = _Outbox(f"{seed}/{number}/to-client")
        self._lock = threading.Lock()

    def reseed(self, seed: int) -> None:
        self.to_broker.rng.seed(f"{seed}/{self.number}/to-broker")
        self.to_client.rng.seed(f"{seed}/{self.number}/to-client")

    def outbox(self, to_broker: bool) -> _Outbox:
        return self.to_broker if to_broker else self.to_client

    def close(self, abort: bool = False) -> None:
        """Close both sockets (``abort``: with a reset); only the first call acts."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.closing.set()
            self._close_sockets(abort)
        for outbox in (self.to_broker, self.to_client):  # wakes a sender waiting for chunks
            with contextlib.suppress(queue.Full):
                outbox.chunks.put_nowait(None)

    def _close_sockets(self, abort: bool) -> None:
        for sock in (self.client, self.broker):
            if abort:  # no FIN: the close sends a reset
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):  # wakes the pump blocked in recv
                sock.shutdown(socket.SHUT_RD if abort else socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class MqttFaultProxy:
    """Forwards MQTT connections from ``listen_host:listen_port`` to the broker at
    ``broker_host:broker_port``, with faults on demand (see the module docstring).

    ``listen_port`` 0 picks a free port (see :attr:`port`). :meth:`start` begins listening
    (ProxyError if it cannot); :meth:`close` stops and closes every connection. Use as a
    context manager. ``seed`` seeds the jitter of :meth:`set_delay`.
    """

    def __init__(
        self,
        listen_host: str,
        broker_port: int,
        *,
        listen_port: int = 0,
        broker_host: str = "127.0.0.1",
        connect_timeout_s: float = 5.0,
        seed: int = 0,
    ) -> None:
        self.listen_host = listen_host
        self.requested_port = listen_port
        self.broker = (broker_host, broker_port)
        self.connect_timeout_s = connect_timeout_s
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._delay_s = 0.0
        self._jitter_s = 0.0
        self._seed = seed

    # -- life --------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.listen_host, self.requested_port))
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise ProxyError(
                f"MQTT proxy cannot listen on {self.listen_host}:{self.requested_port}: "
                f"{exc.strerror or exc}"
            ) from None
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name=f"mqtt-proxy-{self.port}")
        thread.daemon = True
        thread.start()
        with self._lock:
            self._threads.append(thread)
        return self

    @property
    def port(self) -> int:
        """The port the proxy listens on (ProxyError before :meth:`start`)."""
        if self._listener is None:
            raise ProxyError("the MQTT proxy is not started")
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        """``mqtt://<listen_host>:<port>``: where clients connect."""
        return f"mqtt://{self.listen_host}:{self.port}"

    def close(self) -> None:
        """Stop listening and close every connection; safe to call twice."""
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=5.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------------

    def corrupt_next(self, topic_glob: str, count: int = 1, *, offset: int = -1) -> None:
        """Flip (XOR 0xFF) one payload byte of each of the next ``count`` ``PUBLISH`` packets
        from the broker whose topic matches ``topic_glob`` (``fnmatch``: ``*`` also spans
        ``/``). ``offset`` picks the byte, negative from the end (default: the last byte,
        which in a ``fetch/res`` frame is file data, not its header); it wraps around short
        payloads. Packets with an empty payload are left alone and not counted."""
        if count < 1:
            raise ProxyError(f"corrupt_next count must be >= 1, got {count}")
        with self._lock:
            self._rules.append(_Rule(topic_glob, count, offset))

    def pending_corruptions(self) -> int:
        """How many corruptions asked for have not happened yet."""
        with self._lock:
            return sum(rule.left for rule in self._rules)

    def drop_all(self) -> int:
        """Reset every open connection (RST both ways); how many there were."""
        with self._lock:
            connections = list(self._connections)
            self.stats.dropped += len(connections)
        for connection in connections:
            connection.close(abort=True)
        return len(connections)

    def set_delay(self, ms: float, jitter_ms: float = 0.0, *, seed: int | None = None) -> None:
        """Hold each chunk the proxy forwards, in both directions, ``ms`` milliseconds
        (± ``jitter_ms``) before sending it on; 0 stops delaying.

        Each chunk read from one side is sent to the other no earlier than ``ms`` plus a
        jitter drawn uniformly from ``[-jitter_ms, +jitter_ms]`` after it was read (never
        less than no delay), and never before the chunks read before it: the order of the
        stream is kept, as TCP keeps it, so a jittered chunk can also hold up the ones
        behind it. A request and its answer through the proxy take at least twice ``ms``.
        The jitter comes from a generator per connection and direction seeded from
        ``seed`` (default: the proxy's), the connection's number and the direction, so a
        run with the same seed and the same traffic draws the same delays. A new delay
        applies to chunks read from then on (the ones already held keep theirs).

        Only the MQTT connections through this proxy are delayed: a board's other traffic
        is not. ProxyError for a negative or non-finite value, or jitter without a delay.
        """
        if not (math.isfinite(ms) and math.isfinite(jitter_ms)) or ms < 0 or jitter_ms < 0:
            raise ProxyError(
                f"proxy delay and jitter must be finite and >= 0 ms, got {ms} ms ± {jitter_ms}"
            )
        if jitter_ms and not ms:
            raise ProxyError("proxy jitter needs a delay")
        with self._lock:
            self._delay_s = ms / 1000.0
            self._jitter_s = jitter_ms / 1000.0
            if seed is not None:
                self._seed = seed
                for connection in self._connections:
                    connection.reseed(seed)

    @property
    def delay_ms(self) -> float:
        """The delay :meth:`set_delay` set (0.0: none)."""
        return self._delay_s * 1000.0

    @property
    def jitter_ms(self) -> float:
        """The jitter :meth:`set_delay` set (0.0: none)."""
        return self._jitter_s * 1000.0

    # -- forwarding --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                broker = socket.create_connection(self.broker, timeout=self.connect_timeout_s)
            except OSError:
                with contextlib.suppress(OSError):
                    client.close()
                continue
            broker.settimeout(None)
            for sock in (client, broker):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                connection = _Connection(client, broker, self.stats.connections, self._seed)
                self._connections.add(connection)
                self.stats.connections += 1
                self.stats.active += 1
            threads = [
                threading.Thread(target=work, args=(connection, to_broker), daemon=True)
                for work in (self._pump, self._deliver)
                for to_broker in (True, False)
            ]
            with self._lock:
                if self._stop.is_set():  # close() came in between: no new pumps
                    connection.close()
                    self._connections.discard(connection)
                    self.stats.active -= 1
                    return
                self._threads = [t for t in self._threads if t.is_alive()] + threads
            for thread in threads:
                thread.start()

    def _pump(self, connection: _Connection, to_broker: bool) -> None:
        """Read one direction, parse it, hand it to that direction's sender (:meth:`_deliver`).

        At a clean end of the stream, an end mark follows the last chunk: the sender closes
        the connection once everything before it is sent."""
        source = connection.client if to_broker else connection.broker
        outbox = connection.outbox(to_broker)
        buffer = bytearray()
        parsing = True
        try:
            while True:
                data = source.recv(_RECV_BYTES)
                if not data:
                    self._hand_over(connection, outbox, None)
                    return
                if not parsing:
                    self._hand_over(connection, outbox, data)
                    continue
                buffer += data
                try:
                    packets = split_packets(buffer)
                except ValueError:
                    parsing = False
                    with self._lock:
                        self.stats.unparsed += 1
                    self._hand_over(connection, outbox, bytes(buffer))
                    buffer.clear()
                    continue
                for packet in packets:
                    if to_broker:
                        if packet[0] >> 4 == CONNECT:
                            connection.protocol_level = _connect_level(packet) or 4
                    elif packet[0] >> 4 == PUBLISH:
                        self._on_publish(packet, connection.protocol_level)
                if packets:
                    self._hand_over(connection, outbox, b"".join(packets))
        except OSError:
            self._end(connection)

    def _hand_over(self, connection: _Connection, outbox: _Outbox, data: bytes | None) -> None:
        """Queue ``data`` (None: the end mark) with the time it may be sent; OSError once the
        connection is closed."""
        item: tuple[float, bytes] | None = None
        if data is not None:
            now = time.monotonic()
            with self._lock:
                delay = self._delay_s
                if self._jitter_s:
                    delay += outbox.rng.uniform(-self._jitter_s, self._jitter_s)
            outbox.last_due = max(now + max(delay, 0.0), outbox.last_due)
            item = (outbox.last_due, data)
        while True:
            if connection.closed:
                raise OSError("connection closed")
            try:
                outbox.chunks.put(item, timeout=_ACCEPT_POLL_S)
                return
            except queue.Full:
                continue

    def _deliver(self, connection: _Connection, to_broker: bool) -> None:
        """Send one direction's chunks on, each at its time, in order; close at the end mark."""
        target = connection.broker if to_broker else connection.client
        outbox = connection.outbox(to_broker)
        try:
            while not connection.closed:
                item = outbox.chunks.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0 and connection.closing.wait(wait):
                    break
                self._send(target, data, to_broker)
        except OSError:
            pass
        finally:
            self._end(connection)

    def _end(self, connection: _Connection) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections.discard(connection)
                self.stats.active -= 1
        connection.close()

    def _send(self, target: socket.socket, data: bytes | bytearray, to_broker: bool) -> None:
        target.sendall(data)
        with self._lock:
            if to_broker:
                self.stats.bytes_to_broker += len(data)
            else:
                self.stats.bytes_to_client += len(data)

    def _on_publish(self, packet: bytearray, protocol_level: int) -> None:
        with self._lock:
            self.stats.publishes_to_client += 1
            if not self._rules:
                return
        try:
            topic, start, end = publish_parts(packet, protocol_level)
        except ValueError:
            return
        if end <= start:
            return
        with self._lock:
            for rule in self._rules:
                if rule.left > 0 and fnmatch.fnmatchcase(topic, rule.pattern):
                    rule.left -= 1
                    position = start + rule.offset % (end - start)
                    packet[position] ^= 0xFF
                    self.stats.corrupted += 1
                    self.stats.corrupted_topics.append(topic)
                    break
            self._rules = [rule for rule in self._rules if rule.left > 0]
