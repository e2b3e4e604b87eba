"""The device's fetchers: TUF files over MQTT (fetch/req, fetch/res) and over HTTP with Range.

Real parts: a private Mosquitto per test, the hub's :class:`FetchServer` answering from a
repository directory (a subclass records, holds or tampers with answers), a device link whose
pump thread hands ``fetch/res`` payloads to the fetcher as the daemon does, and a real HTTP
server (stdlib) honouring ``Range``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exceptions

from device_agent import failpoints
from device_agent.config import AgentSettings
from device_agent.daemon import AgentDaemon
from device_agent.errors import LinkError
from device_agent.fetch import HttpFetcher, MqttFetcher
from device_agent.fetch.wire import FetchRequest, FetchResponse, encode_response
from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.protocol import QOS, Channel, device_topic
from edgeops.broker import MosquittoProcess
from edgeops.trust.server import FetchServer
from tests.fixtures.mqtt import wait_subscribed

DEVICE = "dev-fetch-1"
CHUNK = 16 * 1024
TARGET_NAME = "digits/1/litert/model.tflite"


# -- the repository served ----------------------------------------------------------------------


def target_file_path(data: bytes, target_path: str = TARGET_NAME) -> str:
    """The consistent-snapshot repository path of a target: ``targets/<dir>/<sha>.<name>``."""
    directory, _, name = target_path.rpartition("/")
    return f"targets/{directory}/{hashlib.sha256(data).hexdigest()}.{name}"


def write_repository_file(repository: Path, path: str, data: bytes) -> None:
    file = repository / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)


@pytest.fixture
def artifact() -> bytes:
    return os.urandom(5 * CHUNK + 1234)


@pytest.fixture
def repository(tmp_path: Path, artifact: bytes) -> Path:
    root = tmp_path / "repository"
    write_repository_file(root, "metadata/timestamp.json", b'{"signed": {"version": 1}}')
    write_repository_file(root, target_file_path(artifact), artifact)
    return root


# -- the hub's server, observable ---------------------------------------------------------------


class Responder(FetchServer):
    """The hub's fetch server, recording requests; it can hold answers or tamper with them."""

    def __init__(self, repository: Path, url: str) -> None:
        super().__init__(repository, MqttEndpoint.parse(url), client_id="test-hub-fetch")
        self.seen: list[tuple[str, int, int]] = []
        self.answer_after: int | None = None  # hold every request after this many
        self.holding = threading.Event()
        self.release = threading.Event()
        self.ignore: Callable[[FetchRequest], bool] = lambda request: False
        self.tamper: Callable[[FetchRequest, bytes], bytes] | None = None

    def answer(self, request: FetchRequest) -> bytes:
        self.seen.append((request.path, request.offset, request.length))
        if self.answer_after is not None and len(self.seen) > self.answer_after:
            self.holding.set()
            self.release.wait(60)
        frame = super().answer(request)
        return self.tamper(request, frame) if self.tamper is not None else frame

    def handle(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        answer = super().handle(topic, payload)
        try:
            request = _request_of(payload)
        except (ValueError, KeyError, TypeError):
            return answer
        return None if self.ignore(request) else answer

    def offsets(self, path: str) -> list[int]:
        return [offset for seen_path, offset, _ in self.seen if seen_path == path]


def _request_of(payload: bytes) -> FetchRequest:
    data = json.loads(payload)
    return FetchRequest(data["req_id"], data["path"], data["offset"], data["length"])


@pytest.fixture
def responder(mosquitto_url: str, repository: Path) -> Iterator[Responder]:
    server = Responder(repository, mosquitto_url)
    server.start()
    yield server
    server.release.set()
    server.stop()


class Device:
    """A device link whose pump thread hands every ``fetch/res`` payload to ``fetcher``."""

    def __init__(self, url: str, device_id: str = DEVICE) -> None:
        self.request_topic = device_topic(device_id, Channel.FETCH_REQ)
        self.response_topic = device_topic(device_id, Channel.FETCH_RES)
        self.link = MqttLink(MqttEndpoint.parse(url), client_id=device_id)
        self.link.subscribe(self.response_topic, QOS)
        self.link.start(wait_s=10)
        wait_subscribed(self.link, self.response_topic)
        self.fetcher: MqttFetcher | None = None
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def send(self, payload: bytes) -> None:
        self.link.publish(self.request_topic, payload, qos=QOS)

    def make_fetcher(
        self,
        *,
        partial_dir: Path | None = None,
        timeout_s: float = 5.0,
        deadline_s: float = 60.0,
        chunk_bytes: int = CHUNK,
    ) -> MqttFetcher:
        """A new fetcher (a restarted agent) that the pump hands responses to from now on."""
        self.fetcher = MqttFetcher(
            self.send,
            chunk_bytes=chunk_bytes,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            partial_dir=partial_dir,
            device_id=DEVICE,
        )
        return self.fetcher

    def _pump(self) -> None:
        while not self._stop.is_set():
            event = self.link.get(timeout_s=0.1)
            fetcher = self.fetcher
            if isinstance(event, Message) and event.topic == self.response_topic and fetcher:
                fetcher.deliver(event.payload)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.link.stop()


@pytest.fixture
def device(mosquitto_url: str) -> Iterator[Device]:
    dev = Device(mosquitto_url)
    yield dev
    dev.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:g} s")
        time.sleep(0.02)


def mqtt_url(path: str) -> str:
    return f"mqtt:{path}"


# -- MQTT: the happy path -----------------------------------------------------------------------


def test_downloads_a_target_in_chunks_within_the_overhead_budget(
    responder: Responder, device: Device, artifact: bytes, tmp_path: Path
) -> None:
    fetcher = device.make_fetcher(partial_dir=tmp_path / "partial")
    path = target_file_path(artifact)
    with fetcher.download_file(mqtt_url(path), len(artifact)) as handle:
        assert handle.read() == artifact

    assert responder.offsets(path) == list(range(0, len(artifact), CHUNK))
    assert fetcher.bytes_received_payload == len(artifact)
    assert fetcher.bytes_requested == len(artifact)
    overhead = fetcher.bytes_on_wire - len(artifact)
    assert 0 < overhead <= 0.05 * len(artifact)
    assert fetcher.counters.resends == 0
    assert list((tmp_path / "partial").glob("*.part")) == []  # handed over: nothing to resume


def test_metadata_is_fetched_whole_and_a_missing_file_is_a_404(
    responder: Responder, device: Device, repository: Path
) -> None:
    fetcher = device.make_fetcher()
    expected = (repository / "metadata/timestamp.json").read_bytes()
    assert fetcher.download_bytes(mqtt_url("metadata/timestamp.json"), 16384) == expected
    assert b"".join(fetcher.fetch(mqtt_url("metadata/timestamp.json"))) == expected

    with pytest.raises(tuf_exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(mqtt_url("metadata/2.root.json"), 512000)
    assert caught.value.status_code == 404


def test_asks_nothing_past_the_declared_length(
    responder: Responder, device: Device, artifact: bytes
) -> None:
    fetcher = device.make_fetcher()
    path = target_file_path(artifact)
    declared = 2 * CHUNK + 100  # the metadata says the file is shorter than the server's

    with pytest.raises(tuf_exceptions.DownloadLengthMismatchError, match="at most 32868"):
        fetcher.download_bytes(mqtt_url(path), declared)
    assert all(offset + length <= declared for _, offset, length in responder.seen)


@pytest.mark.parametrize("attack", ["declares_more", "sends_more"])
def test_endless_data_fails_the_download_and_drops_the_partial(
    responder: Responder, device: Device, artifact: bytes, tmp_path: Path, attack: str
) -> None:
    def endless(request: FetchRequest, frame: bytes) -> bytes:
        header = FetchResponse(
            request.req_id, request.path, request.offset, total=10 * len(artifact)
        )
        if attack == "declares_more":
            return encode_response(header, os.urandom(request.length))
        # a consistent total, but more bytes than were asked for
        header = FetchResponse(request.req_id, request.path, request.offset, total=len(artifact))
        return encode_response(header, os.urandom(request.length + 1))

    responder.tamper = endless
    partial_dir = tmp_path / "partial"
    fetcher = device.make_fetcher(partial_dir=partial_dir)
    with (
        pytest.raises(tuf_exceptions.DownloadLengthMismatchError),
        fetcher.download_file(mqtt_url(target_file_path(artifact)), len(artifact)),
    ):
        pass
    assert list(partial_dir.glob("*.part")) == []
    assert len(responder.seen) == 1  # refused at the first answer


# -- MQTT: loss, resends, malformed input -------------------------------------------------------


def test_an_unanswered_request_is_sent_again_from_the_same_offset(
    responder: Responder, device: Device, artifact: bytes
) -> None:
    dropped: list[int] = []

    def drop_first_at_chunk_two(request: FetchRequest) -> bool:
        if request.offset == 2 * CHUNK and not dropped:
            dropped.append(request.offset)
            return True
        return False

    responder.ignore = drop_first_at_chunk_two
    fetcher = device.make_fetcher(timeout_s=0.3)
    data = fetcher.download_bytes(mqtt_url(target_file_path(artifact)), len(artifact))

    assert data == artifact
    assert dropped == [2 * CHUNK]
    assert responder.offsets(target_file_path(artifact)).count(2 * CHUNK) >= 2
    assert fetcher.counters.resends >= 1
    assert fetcher.bytes_received_payload == len(artifact)


def test_no_answer_until_the_deadline_is_a_slow_retrieval(device: Device) -> None:
    fetcher = device.make_fetcher(timeout_s=0.2, deadline_s=1.0)  # no server runs
    with pytest.raises(tuf_exceptions.SlowRetrievalError, match="no answer"):
        fetcher.download_bytes(mqtt_url("metadata/timestamp.json"), 16384)
    assert fetcher.counters.resends >= 2


MALFORMED_FRAMES = [
    b"",
    b"garbage without a header line",
    b"\xff\xfe\n\x00",
    b"[1, 2, 3]\n",
    b'{"schema": 2, "type": "fetch_res"}\n',
    b'{"schema": 1, "type": "fetch_req", "req_id": "ab"}\n',
    b'{"schema": 1, "type": "fetch_res", "req_id": "ab", "path": "x", "offset": -1,'
    b' "status": "ok", "total": 3}\nabc',
    b'{"schema": 1, "type": "fetch_res", "req_id": "ab", "path": "x", "offset": 0,'
    b' "status": "not_found"}\nbytes-after-an-error',
    b'{"schema": 1, "type": "fetch_res", "req_id": "ab", "path": "x", "offset": 0,'
    b' "status": "ok"}\n',
    b"[" * 3000 + b"]" * 3000 + b"\n",
    b"[" * 2000 + b"]" * 2000 + b"\n",
    b'{"schema": 1, "type": "fetch_res", "req_id": "ab", "path": "x", "offset": 0,'
    b' "status": "ok", "total": 3}\n' + b"x" * 300_000,
]


@pytest.mark.parametrize("frame", MALFORMED_FRAMES, ids=range(len(MALFORMED_FRAMES)))
def test_deliver_drops_malformed_frames_without_raising(frame: bytes) -> None:
    fetcher = MqttFetcher(lambda payload: None)
    fetcher.deliver(frame)
    assert fetcher.counters.malformed == 1
    assert fetcher.counters.stale == 0


def test_malformed_and_stale_frames_on_the_topic_do_not_disturb_a_download(
    responder: Responder, device: Device, artifact: bytes, mosquitto_url: str
) -> None:
    path = target_file_path(artifact)
    intruder = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="intruder")
    intruder.start(wait_s=10)
    injected = threading.Event()

    def inject_then_answer(request: FetchRequest, frame: bytes) -> bytes:
        if request.offset == CHUNK and not injected.is_set():
            injected.set()
            for junk in MALFORMED_FRAMES[:9]:
                intruder.publish(device.response_topic, junk, qos=QOS, wait_s=5)
            wrong_offset = FetchResponse(request.req_id, path, request.offset + 1, total=1)
            intruder.publish(
                device.response_topic, encode_response(wrong_offset, b"x"), qos=QOS, wait_s=5
            )
            stale = FetchResponse("0123abcd", path, request.offset, total=len(artifact))
            intruder.publish(device.response_topic, encode_response(stale, b"y"), qos=QOS, wait_s=5)
        return frame

    responder.tamper = inject_then_answer
    try:
        fetcher = device.make_fetcher()
        assert fetcher.download_bytes(mqtt_url(path), len(artifact)) == artifact
    finally:
        intruder.stop()
    assert fetcher.counters.malformed == 9 + 1
    assert fetcher.counters.stale >= 1
    assert fetcher.bytes_received_payload == len(artifact)


# -- MQTT: resume -------------------------------------------------------------------------------


def test_download_resumes_from_its_offset_after_the_broker_restarts(
    mosquitto: MosquittoProcess, responder: Responder, device: Device, artifact: bytes
) -> None:
    path = target_file_path(artifact)
    responder.answer_after = 2  # the third chunk waits until the broker came back
    fetcher = device.make_fetcher(timeout_s=0.5)
    result: dict[str, bytes | BaseException] = {}

    def download() -> None:
        try:
            result["data"] = fetcher.download_bytes(mqtt_url(path), len(artifact))
        except BaseException as exc:
            result["error"] = exc

    worker = threading.Thread(target=download)
    worker.start()
    assert responder.holding.wait(30)
    mosquitto.stop()
    # the device notices the outage and keeps asking for the same chunk meanwhile
    wait_until(lambda: not device.link.connected and fetcher.counters.resends >= 1)
    mosquitto.start()
    wait_until(lambda: device.link.stats.connects >= 2 and responder.link.stats.connects >= 2)
    responder.release.set()
    worker.join(60)

    assert result.get("data") == artifact, result.get("error")
    offsets = responder.offsets(path)
    assert offsets[:3] == [0, CHUNK, 2 * CHUNK]
    assert offsets == sorted(offsets)  # never back to the start
    assert set(offsets) == set(range(0, len(artifact), CHUNK))
    # every chunk arrived once; a chunk answered twice (before and after the outage) counts
    # as stale, not as payload
    assert fetcher.bytes_received_payload == len(artifact)
    assert fetcher.counters.resends >= 1


def test_target_resumes_from_the_partial_file_after_a_restart(
    responder: Responder, device: Device, artifact: bytes, tmp_path: Path
) -> None:
    path = target_file_path(artifact)
    partial_dir = tmp_path / "partial"
    responder.answer_after = 3
    first = device.make_fetcher(partial_dir=partial_dir, timeout_s=0.2, deadline_s=1.0)
    with (
        pytest.raises(tuf_exceptions.SlowRetrievalError),
        first.download_file(mqtt_url(path), len(artifact)),
    ):
        pass
    (partial,) = partial_dir.glob("*.part")
    assert partial.read_bytes() == artifact[: 3 * CHUNK]

    responder.release.set()
    responder.answer_after = None
    seen_before = len(responder.seen)
    second = device.make_fetcher(partial_dir=partial_dir)  # a new process: new counters
    with second.download_file(mqtt_url(path), len(artifact)) as handle:
        assert handle.read() == artifact
    assert responder.offsets(path)[seen_before:][0] >= 3 * CHUNK
    assert second.bytes_received_payload == len(artifact) - 3 * CHUNK
    assert not partial.exists()


def test_a_partial_that_fails_verification_is_dropped(
    responder: Responder, device: Device, artifact: bytes, tmp_path: Path
) -> None:
    partial_dir = tmp_path / "partial"
    fetcher = device.make_fetcher(partial_dir=partial_dir)
    url = mqtt_url(target_file_path(artifact))
    partial = fetcher.partial_path(url)
    assert partial is not None
    partial_dir.mkdir()
    partial.write_bytes(b"\0" * CHUNK)  # bytes that are not the artifact's

    with (
        pytest.raises(tuf_exceptions.LengthOrHashMismatchError),
        fetcher.download_file(url, len(artifact)) as handle,
    ):
        assert handle.read()[:CHUNK] == b"\0" * CHUNK
        raise tuf_exceptions.LengthOrHashMismatchError("Observed hash 00 does not match")
    assert not partial.exists()

    partial.write_bytes(b"\0" * (len(artifact) + 1))  # longer than the target: started over
    with fetcher.download_file(url, len(artifact)) as handle:
        assert handle.read() == artifact


def test_every_written_target_chunk_passes_the_byte_failpoint(
    responder: Responder,
    device: Device,
    artifact: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(failpoints, "check_bytes", seen.append)
    fetcher = device.make_fetcher(partial_dir=tmp_path / "partial")
    fetcher.download_bytes(mqtt_url("metadata/timestamp.json"), 16384)
    assert seen == []  # metadata is not a target
    with fetcher.download_file(mqtt_url(target_file_path(artifact)), len(artifact)):
        pass
    expected = [min(n, len(artifact)) for n in range(CHUNK, len(artifact) + CHUNK, CHUNK)]
    assert seen == expected


def test_a_closed_fetcher_fails_a_waiting_download(device: Device) -> None:
    fetcher = device.make_fetcher(timeout_s=5.0, deadline_s=60.0)  # no server runs
    errors: list[BaseException] = []

    def download() -> None:
        try:
            fetcher.download_bytes(mqtt_url("metadata/timestamp.json"), 16384)
        except tuf_exceptions.DownloadError as exc:
            errors.append(exc)

    worker = threading.Thread(target=download)
    worker.start()
    while fetcher.counters.requests == 0:
        worker.join(0.05)
    fetcher.close()
    worker.join(10)
    assert not worker.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])


# -- HTTP ---------------------------------------------------------------------------------------


class RangeServer(ThreadingHTTPServer):
    """Serves ``repository`` at /v1/tuf/{metadata,targets}/... honouring ``Range``."""

    daemon_threads = True

    def __init__(self, repository: Path) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.repository = repository
        self.ranges: list[str | None] = []
        self.cut_after: int | None = None  # close the first answer after this many bytes
        self.ignore_range = False
        self.endless: str | None = None  # "declared": a huge Content-Length; "undeclared": none

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RangeHandler(BaseHTTPRequestHandler):
    server: RangeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        prefix = "/v1/tuf/"
        name = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
        file = self.server.repository / name
        if not name or ".." in name or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        if self.server.endless is not None:
            self.send_response(200)
            if self.server.endless == "declared":
                self.send_header("Content-Length", str(100 * len(data)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(data)
            except OSError:
                pass
            return
        start, end = 0, len(data) - 1
        if requested and not self.server.ignore_range:
            first, _, last = requested.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None:
            cut, self.server.cut_after = self.server.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def http_server(repository: Path) -> Iterator[RangeServer]:
    server = RangeServer(repository)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http_target_url(fetcher: HttpFetcher, artifact: bytes) -> str:
    return fetcher.target_base_url + target_file_path(artifact).removeprefix("targets/")


def test_http_downloads_with_ranges_and_resumes_a_broken_connection(
    http_server: RangeServer, artifact: bytes, tmp_path: Path
) -> None:
    http_server.cut_after = 3 * CHUNK + 7
    fetcher = HttpFetcher(http_server.url, partial_dir=tmp_path / "partial", timeout_s=5.0)
    url = http_target_url(fetcher, artifact)
    with fetcher.download_file(url, len(artifact)) as handle:
        assert handle.read() == artifact
    last = len(artifact) - 1
    assert http_server.ranges == [f"bytes=0-{last}", f"bytes={3 * CHUNK + 7}-{last}"]
    assert fetcher.bytes_received_payload == len(artifact)
    assert list((tmp_path / "partial").glob("*.part")) == []

    metadata = fetcher.download_bytes(fetcher.metadata_base_url + "timestamp.json", 16384)
    assert metadata.startswith(b'{"signed"')
    with pytest.raises(tuf_exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(fetcher.metadata_base_url + "7.root.json", 512000)
    assert caught.value.status_code == 404


def test_http_resumes_a_partial_target_across_restarts(
    http_server: RangeServer, artifact: bytes, tmp_path: Path
) -> None:
    fetcher = HttpFetcher(http_server.url, partial_dir=tmp_path / "partial")
    url = http_target_url(fetcher, artifact)
    partial = fetcher.partial_path(url)
    assert partial is not None
    partial.parent.mkdir()
    partial.write_bytes(artifact[:12345])
    with fetcher.download_file(url, len(artifact)) as handle:
        assert handle.read() == artifact
    assert http_server.ranges == [f"bytes=12345-{len(artifact) - 1}"]
    assert fetcher.bytes_received_payload == len(artifact) - 12345


def test_http_server_ignoring_range_is_skipped_to_the_offset(
    http_server: RangeServer, artifact: bytes, tmp_path: Path
) -> None:
    http_server.ignore_range = True
    fetcher = HttpFetcher(http_server.url, partial_dir=tmp_path / "partial")
    url = http_target_url(fetcher, artifact)
    partial = fetcher.partial_path(url)
    assert partial is not None
    partial.parent.mkdir()
    partial.write_bytes(artifact[:1000])
    with fetcher.download_file(url, len(artifact)) as handle:
        assert handle.read() == artifact


def test_http_endless_data_stops_one_byte_past_the_declared_length(
    http_server: RangeServer, artifact: bytes
) -> None:
    http_server.endless = "undeclared"
    fetcher = HttpFetcher(http_server.url)
    with pytest.raises(tuf_exceptions.DownloadLengthMismatchError, match="sent more"):
        fetcher.download_bytes(http_target_url(fetcher, artifact), len(artifact))
    assert fetcher.bytes_received_payload == len(artifact) + 1

    http_server.endless = "declared"
    fetcher = HttpFetcher(http_server.url)
    with pytest.raises(tuf_exceptions.DownloadLengthMismatchError, match="declares"):
        fetcher.download_bytes(http_target_url(fetcher, artifact), len(artifact))
    assert fetcher.bytes_received_payload <= fetcher.chunk_bytes


def test_http_unreachable_hub_is_a_slow_retrieval() -> None:
    from edgeops.broker.mosquitto import free_port

    fetcher = HttpFetcher(f"http://127.0.0.1:{free_port()}", timeout_s=0.2, deadline_s=1.0)
    with pytest.raises(tuf_exceptions.SlowRetrievalError):
        fetcher.download_bytes(fetcher.metadata_base_url + "timestamp.json", 16384)


def test_fetchers_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        MqttFetcher(lambda payload: None, chunk_bytes=0)
    with pytest.raises(ValueError, match="hub URL"):
        HttpFetcher("ftp://hub")
    fetcher = MqttFetcher(lambda payload: None)
    with pytest.raises(tuf_exceptions.DownloadError, match="not an mqtt: URL"):
        fetcher.download_bytes("https://hub/metadata/root.json", 10)
    with pytest.raises(tuf_exceptions.DownloadError, match="not allowed"):
        fetcher.download_bytes("mqtt:metadata/../keys/online/targets.pem", 10)


# -- review fixes: requests are not queued while the link is down -----------------------------


def test_a_request_the_link_refuses_is_tried_again_and_not_counted() -> None:
    data = b"x" * 100
    attempts: list[bytes] = []

    def send(payload: bytes) -> None:
        attempts.append(payload)
        if len(attempts) <= 2:
            raise LinkError("the MQTT link is down; fetch request not sent")
        request = _request_of(payload)
        header = FetchResponse(request.req_id, request.path, request.offset, total=len(data))
        fetcher.deliver(encode_response(header, data))

    fetcher = MqttFetcher(send, timeout_s=0.05, deadline_s=10.0)
    assert fetcher.download_bytes(mqtt_url("metadata/timestamp.json"), 16384) == data
    assert len(attempts) == 3 and len(set(attempts)) == 1  # the same request each time
    assert fetcher.counters.requests == 1
    assert fetcher.counters.resends == 0  # the refused copies were never sent


def test_the_daemon_sends_no_fetch_request_while_disconnected(tmp_path: Path) -> None:
    settings = AgentSettings(
        device_id="fetch-down", mqtt_url="mqtt://127.0.0.1:1", data_dir=tmp_path / "data"
    )
    daemon = AgentDaemon(settings)
    assert not daemon.link.connected
    publishes = daemon.link.stats.publishes
    with pytest.raises(LinkError, match="link is down"):
        daemon._send_fetch(b"request")
    assert daemon.link.stats.publishes == publishes  # nothing queued in paho for later
