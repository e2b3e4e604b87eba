"""The offline buffer: persistent sequence numbers, the bound, corruption, the drain."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from device_agent.buffer import BufferDrain, BufferedMessage, BufferError, OfflineBuffer
from device_agent.link import MqttEndpoint, MqttLink
from edgeops.broker import MosquittoProcess
from tests.fixtures.mqtt import messages, wait_subscribed


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[OfflineBuffer]:
    buf = OfflineBuffer(tmp_path / "buffer" / "telemetry.db", max_items=5)
    yield buf
    buf.close()


def payload(seq: int) -> bytes:
    return f"window {seq}".encode()


def test_append_numbers_messages_and_ack_deletes_them(buffer: OfflineBuffer) -> None:
    seqs = [buffer.append("t/a", payload) for _ in range(3)]
    assert seqs == [1, 2, 3] and len(buffer) == 3
    assert buffer.pending(2) == [
        BufferedMessage(1, "t/a", b"window 1"),
        BufferedMessage(2, "t/a", b"window 2"),
    ]
    assert buffer.ack(2) and not buffer.ack(2)
    assert [m.seq for m in buffer.pending(10)] == [1, 3]
    assert buffer.ack_many([1, 3, 99]) == 2 and len(buffer) == 0


def test_sequence_numbers_survive_a_restart_even_with_an_empty_buffer(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    first = OfflineBuffer(path)
    for _ in range(3):
        first.append("t", payload)
    first.ack_many([1, 2, 3])
    first.close()
    again = OfflineBuffer(path)
    assert again.last_seq == 3 and again.append("t", payload) == 4
    again.close()


def test_the_file_is_in_wal_mode(buffer: OfflineBuffer) -> None:
    buffer.append("t", payload)
    with sqlite3.connect(buffer.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_payload_factory_stores_nothing_and_uses_no_number(
    buffer: OfflineBuffer,
) -> None:
    def broken(seq: int) -> bytes:
        raise RuntimeError("encoder broke")

    with pytest.raises(RuntimeError, match="encoder broke"):
        buffer.append("t", broken)
    with pytest.raises(BufferError, match="returned str, expected bytes"):
        buffer.append("t", lambda seq: "text")  # type: ignore[arg-type,return-value]
    assert len(buffer) == 0 and buffer.append("t", payload) == 1


def test_beyond_the_bound_the_oldest_are_dropped_counted_and_reported_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    buf = OfflineBuffer(path, max_items=5)
    for _ in range(8):
        buf.append("t", payload)
    assert [m.seq for m in buf.pending(10)] == [4, 5, 6, 7, 8]
    assert buf.dropped_total == 3
    buf.close()

    buf = OfflineBuffer(path, max_items=5)  # both counts persist
    assert buf.dropped_total == 3
    reported: list[int] = []

    def window(seq: int) -> bytes:
        reported.append(buf.take_dropped())
        return payload(seq)

    buf.append("t", window)  # drops seq 4 (counted for the next report)
    buf.append("t", window)
    assert reported == [3, 1] and buf.take_dropped() == 1 and buf.take_dropped() == 0
    assert buf.dropped_total == 5
    buf.close()


def test_a_failed_append_keeps_the_unreported_loss(tmp_path: Path) -> None:
    buf = OfflineBuffer(tmp_path / "b.db", max_items=1)
    buf.append("t", payload)
    buf.append("t", payload)

    def fails_after_taking(seq: int) -> bytes:
        buf.take_dropped()
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        buf.append("t", fails_after_taking)
    assert buf.take_dropped() == 1  # the rolled back transaction did not consume it
    buf.close()


@pytest.mark.parametrize(
    "garbage",
    [b"this is not a database at all" * 200, b"SQLite format 3\x00" + b"\xff" * 4096],
    ids=["not-sqlite", "malformed-header"],
)
def test_a_corrupt_file_is_moved_aside_and_a_fresh_buffer_continues_above_old_numbers(
    tmp_path: Path, garbage: bytes
) -> None:
    path = tmp_path / "telemetry.db"
    path.write_bytes(garbage)
    before = int(time.time() * 1000)
    buf = OfflineBuffer(path)
    moved = buf.recovered_from_corruption
    assert moved is not None and moved.name.startswith("telemetry.db.corrupt-")
    assert moved.read_bytes() == garbage
    seq = buf.append("t", payload)
    assert seq > before and buf.pending(1)[0].payload == payload(seq)
    buf.close()
    reopened = OfflineBuffer(path)
    assert reopened.recovered_from_corruption is None and len(reopened) == 1
    reopened.close()


def test_a_buffer_that_cannot_be_created_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BufferError, match="cannot create its directory"):
        OfflineBuffer(blocker / "sub" / "b.db")
    with pytest.raises(BufferError, match="max_items must be a positive integer"):
        OfflineBuffer(tmp_path / "b.db", max_items=0)


# -- the drain, against a stand-in link: the re-send logic alone -------------------------------


@dataclass
class FakeInfo:
    done: bool = False
    taken_offline: bool = False  # paho took it while disconnected: is_published() raises

    def is_published(self) -> bool:
        if self.taken_offline:
            raise RuntimeError("Message publish failed: The client is not currently connected.")
        return self.done


@dataclass
class FakeStats:
    connects: int = 1


@dataclass
class FakeLink:
    """Only what BufferDrain uses of MqttLink; acknowledgements are set by the test."""

    connected: bool = True
    stats: FakeStats = field(default_factory=FakeStats)
    sent: list[tuple[str, bytes, FakeInfo]] = field(default_factory=list)

    def publish_info(self, topic: str, payload: bytes) -> FakeInfo:
        info = FakeInfo()
        self.sent.append((topic, payload, info))
        return info


def test_drain_bounds_what_is_in_flight_and_deletes_only_acknowledged_rows(
    buffer: OfflineBuffer,
) -> None:
    link = FakeLink()
    drain = BufferDrain(buffer, link, max_in_flight=2)  # type: ignore[arg-type]
    for _ in range(4):
        buffer.append("t", payload)
    assert drain.pump() == 0
    assert [p for _, p, _ in link.sent] == [b"window 1", b"window 2"]
    assert drain.pump() == 0 and len(link.sent) == 2  # nothing acked: nothing new
    link.sent[1][2].done = True
    assert drain.pump() == 1
    assert [m.seq for m in buffer.pending(10)] == [1, 3, 4]
    assert [p for _, p, _ in link.sent][2:] == [b"window 3"]


def test_drain_resends_after_a_reconnect_what_was_never_acknowledged(
    buffer: OfflineBuffer,
) -> None:
    link = FakeLink()
    drain = BufferDrain(buffer, link, max_in_flight=10)  # type: ignore[arg-type]
    for _ in range(3):
        buffer.append("t", payload)
    drain.pump()
    link.sent[0][2].done = True
    link.connected = False  # the connection drops with 2 and 3 unacknowledged
    assert drain.pump() == 1
    buffer.append("t", payload)
    drain.pump()
    assert len(link.sent) == 3  # nothing is published while disconnected
    link.connected, link.stats.connects = True, 2
    drain.pump()
    assert [p for _, p, _ in link.sent][3:] == [b"window 2", b"window 3", b"window 4"]
    assert drain.resent == 2 and drain.in_flight == 3
    for _, _, info in link.sent:
        info.done = True
    assert drain.flush(1.0) and len(buffer) == 0 and drain.acked == 4


def test_a_message_paho_took_while_disconnected_is_sent_again_not_fatal(
    buffer: OfflineBuffer,
) -> None:
    """The link looked connected, paho had already lost the connection: its message info
    raises from is_published(). The drain treats it as unacknowledged and re-sends it."""
    link = FakeLink()
    drain = BufferDrain(buffer, link, max_in_flight=10)  # type: ignore[arg-type]
    buffer.append("t", payload)
    drain.pump()
    link.sent[0][2].taken_offline = True
    assert drain.pump() == 0  # no exception, nothing acked
    link.stats.connects = 2  # reconnected
    drain.pump()
    assert [p for _, p, _ in link.sent] == [b"window 1", b"window 1"] and drain.resent == 1
    link.sent[1][2].done = True
    assert drain.flush(1.0) and len(buffer) == 0


# -- the drain over a real broker --------------------------------------------------------------


def test_drain_publishes_everything_and_keeps_it_while_the_broker_is_down(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    endpoint = MqttEndpoint.parse(mosquitto.url)
    reader = MqttLink(endpoint, client_id="buffer-reader")
    reader.subscribe("edgeops/v1/dev/+/telemetry")
    reader.start(wait_s=10)
    device = MqttLink(endpoint, client_id="buffer-device")
    device.start(wait_s=10)
    buf = OfflineBuffer(tmp_path / "b.db")
    drain = BufferDrain(buf, device)
    topic = "edgeops/v1/dev/d-1/telemetry"
    try:
        wait_subscribed(reader, topic)
        for _ in range(30):
            buf.append(topic, payload)
        assert drain.flush(10.0)
        received = [m.payload for m in messages(reader, topic, 1.0)]
        assert received == [payload(seq) for seq in range(1, 31)]

        mosquitto.stop()
        for _ in range(5):
            buf.append(topic, payload)
        assert not drain.flush(0.5)
        assert len(buf) == 5  # nothing acknowledged, nothing deleted
    finally:
        device.stop()
        reader.stop()
        buf.close()
