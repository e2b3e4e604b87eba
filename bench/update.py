"""Update delivery figures of issue 5: time and bytes on the wire to deliver and activate a
100 KB and a 1 MB artifact over MQTT on loopback, against a plain MQTT transfer.

Setup, all real and on this machine: a private Mosquitto from the shipped
``deploy/mosquitto/mosquitto.conf``; the hub's TUF repository (``edgeops.trust``) with two
releases, a digits MLP at width 2.5 (float .tflite, about 98 KB) and an mnist5k MLP at width
4.3 (float .tflite, about 1 MB), both trained here for one epoch (the weights do not matter);
the hub's :class:`FetchServer`; and the ``edgeops-agent`` program, provisioned with the root
and a small champion, connected to the broker through a counting TCP proxy.

Each delivery: a fresh device (so nothing is cached) starts and connects; the desired release
is published; the clock runs until the device reports ``committed`` (``update_health_s = 0``:
committed right after the activation, the pointer switch and the champion swap). The proxy
parses the MQTT packets of the device's connection and counts every byte of every packet
(fixed header, topic, packet id, payload, and the PUBACK that acknowledges it) by what it
carries: TUF metadata (``fetch`` requests and answers for ``metadata/...``), the target
(``targets/...``), or the rest (state, events, presence, desired, pings).

Transfer overhead = (wire bytes of the target's transfer - artifact bytes) / artifact bytes;
target <= 5 %. Metadata bytes are reported separately (they carry the model cards, test
vectors and reference statistics of every release in the repository).

Baseline, in the same run and through the same proxy: the same bytes fetched over MQTT in the
same chunk size (64 KiB) with the same QoS 1 request/response pattern and nothing else — a
12-byte request (offset, length) answered by the raw chunk, no JSON header, no TUF, no
verification, no slot writes. As context, a plain file copy with fsync of the same bytes.

Results go to bench/results/update.json and update.md (written atomically).

    python bench/update.py [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _hub import BenchHub
from _results import run_meta, write_and_report

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
CHUNK = 64 * 1024
OVERHEAD_TARGET = 0.05
SIZES = (
    # label, dataset, arch, width: float .tflite of about 98 KB and about 1 MB
    ("100KB", "digits", "mlp", 2.5),
    ("1MB", "mnist5k", "mlp", 4.3),
)


# -- counting the bytes on the wire -----------------------------------------------------------


class WireMeter:
    """A TCP proxy between MQTT clients and the broker that counts the bytes of every MQTT
    packet it forwards, by category, in both directions.

    It parses the MQTT 3.1.1 framing of both streams: a PUBLISH is put in a category by
    ``classify(topic, first payload bytes)``; the PUBACK that acknowledges it (other
    direction, same packet id) joins that category; every other packet (CONNECT, SUBSCRIBE,
    PINGREQ, ...) counts as ``session``. Counts are whole MQTT packets as they cross the
    socket; TCP/IP headers are not included.
    """

    def __init__(self, broker: tuple[str, int], classify: Callable[[str, bytes], str]) -> None:
        self.broker = broker
        self.classify = classify
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self.bytes: Counter[str] = Counter()
        self.packets: Counter[str] = Counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="wire-meter", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.bytes.clear()
            self.packets.clear()
            self.first.clear()
            self.last.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "bytes": dict(self.bytes),
                "packets": dict(self.packets),
                "first": dict(self.first),
                "last": dict(self.last),
            }

    def close(self) -> None:
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.broker)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            pending: dict[str, dict[int, str]] = {"up": {}, "down": {}}
            for source, sink, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump, args=(source, sink, direction, pending), daemon=True
                ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        direction: str,
        pending: dict[str, dict[int, str]],
    ) -> None:
        buffer = bytearray()
        other = "down" if direction == "up" else "up"
        try:
            while data := source.recv(262144):
                sink.sendall(data)
                buffer += data
                while (packet := _split_packet(buffer)) is not None:
                    self._count(packet, pending[direction], pending[other])
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _count(self, packet: bytes, mine: dict[int, str], theirs: dict[int, str]) -> None:
        kind = packet[0] >> 4
        at = 1
        while packet[at] & 0x80:
            at += 1
        at += 1
        category = "session"
        if kind == 3:  # PUBLISH
            qos = (packet[0] >> 1) & 3
            topic_len = int.from_bytes(packet[at : at + 2], "big")
            topic = packet[at + 2 : at + 2 + topic_len].decode("utf-8", "replace")
            at += 2 + topic_len
            packet_id = None
            if qos:
                packet_id = int.from_bytes(packet[at : at + 2], "big")
                at += 2
            category = self.classify(topic, packet[at : at + 1024])
            if packet_id is not None:
                mine[packet_id] = category
        elif kind == 4:  # PUBACK: the category of the PUBLISH it acknowledges
            category = theirs.pop(int.from_bytes(packet[at : at + 2], "big"), "session")
        now = time.perf_counter()
        with self._lock:
            self.bytes[category] += len(packet)
            self.packets[category] += 1
            self.first.setdefault(category, now)
            self.last[category] = now


def _split_packet(buffer: bytearray) -> bytes | None:
    """Remove and return the first whole MQTT packet in ``buffer`` (None: not complete yet)."""
    length, multiplier, index = 0, 1, 1
    while True:
        if index >= len(buffer):
            return None
        byte = buffer[index]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        index += 1
        if not byte & 0x80:
            break
    end = index + length
    if len(buffer) < end:
        return None
    packet = bytes(buffer[:end])
    del buffer[:end]
    return packet


def classify(topic: str, head: bytes) -> str:
    """``metadata``/``target`` for fetch traffic (by the path in the request or the answer's
    header), ``target`` for the baseline's topics, ``other`` for everything else."""
    if topic.endswith(("/fetch/req", "/fetch/res")):
        line = head.split(b"\n", 1)[0]
        with contextlib.suppress(ValueError):
            path = str(json.loads(line).get("path", ""))
            if path.startswith("targets/"):
                return "target"
            if path.startswith("metadata/"):
                return "metadata"
        return "other"
    if topic.startswith("bench/plain/"):
        return "target"
    return "other"


# -- the hub ----------------------------------------------------------------------------------


class Hub(BenchHub):
    """The hub's services in a temporary data dir: registry, release repository, fetch server,
    the broker, and the MQTT links the benchmark uses."""

    def __init__(self, root: Path, seed: int) -> None:
        from edgeops.broker import MosquittoProcess
        from edgeops.trust import TrustRepository

        super().__init__(root, seed)
        self.repository = TrustRepository(root / "trust")
        self.repository.init(root / "offline-root-keys")
        self.broker = MosquittoProcess(root / "mosquitto")
        self.server: Any = None
        self.meter: WireMeter | None = None
        self.link: Any = None

    def train(self, dataset: str, arch: str, width: float, name: str) -> str:
        self.datasets.register_builtin(dataset, seed=self.seed)
        view = self.trainer.train(
            dataset,
            arch,
            epochs=1,
            width=width,
            seed=self.seed,
            name=name,
            progress=False,
            evaluate_on_runtime=False,
        )
        return str(view.id)

    def release(self, model_ref: str) -> Any:
        from edgeops.trust import release_model

        return release_model(
            self.repository, model_ref, registry=self.registry, datasets=self.datasets
        )

    def champion_bundle(self, model_ref: str) -> Path:
        from edgeops.export import export_bundle

        return export_bundle(
            model_ref, "tflite", self.root / "champion", registry=self.registry,
            datasets=self.datasets,
        )  # fmt: skip

    def start(self) -> None:
        from device_agent.link import MqttEndpoint, MqttLink
        from edgeops.trust import FetchServer

        self.broker.start()
        endpoint = MqttEndpoint.parse(self.broker.url)
        self.server = FetchServer(self.repository.repository_dir, endpoint)
        self.server.start()
        self.meter = WireMeter(("127.0.0.1", self.broker.port), classify)
        self.link = MqttLink(endpoint, client_id="bench-hub")
        self.link.subscribe("edgeops/v1/dev/+/events")
        self.link.start(wait_s=10)

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
        if self.server is not None:
            self.server.stop()
        if self.meter is not None:
            self.meter.close()
        self.broker.stop()
        self.database.dispose()


# -- one delivery through the agent -----------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise RuntimeError(f"not reached within {timeout:.0f} s: {what}")


def deliver(hub: Hub, champion: Path, release: Any, device_id: str) -> dict[str, Any]:
    """Provision a fresh device, deliver ``release`` to it, and measure."""
    assert hub.meter is not None
    data_dir = hub.root / "devices"
    state_dir = data_dir / "agents" / device_id
    config = hub.root / f"{device_id}.toml"
    values = {
        "device_id": device_id,
        "mqtt_url": hub.meter.url,
        "data_dir": str(data_dir),
        "model_dir": str(champion),
        "trust_root_file": str(hub.repository.root_json_path),
        "heartbeat_s": 30.0,
        "update_health_s": 0.0,
    }
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    log = (hub.root / f"{device_id}.log").open("wb")
    agent = subprocess.Popen(
        [str(BIN / "edgeops-agent"), "run", "--config", str(config), "--log-json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGEOPS_")},
    )
    try:
        _wait(
            lambda: _read_json(state_dir / "health.json").get("status") == "connected",
            60,
            "the agent connected",
        )
        time.sleep(0.5)  # its start-up messages (state, presence, events) are out of the way
        hub.meter.reset()
        started = time.time()
        desired = {"schema": 1, "type": "desired", "release": {"target": release.path}}
        topic = f"edgeops/v1/dev/{device_id}/desired"
        hub.link.publish(topic, json.dumps(desired).encode(), retain=True, wait_s=10)
        record = _wait(
            lambda: (
                (r := _read_json(state_dir / "update" / "state.json")).get("state")
                in ("committed", "rolled_back")
                and r
            ),
            300,
            "the update at rest",
        )
        finished = time.time()
        if record["state"] != "committed":
            raise RuntimeError(f"the update of {device_id} ended {record['state']}: {record}")
        time.sleep(0.2)  # the last PUBACKs
        wire = hub.meter.snapshot()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        log.close()
    events = _update_events(hub, device_id)
    committed_ts = events.get("committed", record["ts"])
    target_bytes = wire["bytes"].get("target", 0)
    return {
        "device": device_id,
        "artifact_bytes": release.length,
        "seconds_to_committed": committed_ts - started,
        "seconds_polled": finished - started,
        "seconds_target_on_wire": wire["last"].get("target", 0.0)
        - wire["first"].get("target", 0.0),
        "seconds_metadata_on_wire": wire["last"].get("metadata", 0.0)
        - wire["first"].get("metadata", 0.0),
        "fetch_packets": {k: wire["packets"].get(k, 0) for k in ("metadata", "target")},
        "state_times_s": {state: ts - started for state, ts in events.items()},
        "wire_bytes": wire["bytes"],
        "wire_packets": wire["packets"],
        "target_wire_bytes": target_bytes,
        "metadata_wire_bytes": wire["bytes"].get("metadata", 0),
        "overhead": (target_bytes - release.length) / release.length,
    }


def _update_events(hub: Hub, device_id: str) -> dict[str, float]:
    """The device time of each update state it reported (first occurrence)."""
    from device_agent.link import Message

    times: dict[str, float] = {}
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and "committed" not in times:
        event = hub.link.get(timeout_s=0.2)
        if not isinstance(event, Message) or f"/{device_id}/" not in event.topic:
            continue
        document = json.loads(event.payload)
        if document.get("event") == "update":
            times.setdefault(str(document["detail"]["state"]), float(document["ts"]))
    return times


# -- the baseline -----------------------------------------------------------------------------


def plain_transfer(hub: Hub, data: bytes, device_id: str) -> dict[str, Any]:
    """The same bytes over MQTT through the same proxy, chunk by chunk, QoS 1, without TUF: a
    12-byte request (offset, length) answered by the raw chunk."""
    from device_agent.link import Message, MqttEndpoint, MqttLink

    assert hub.meter is not None
    request_topic = f"bench/plain/{device_id}/req"
    answer_topic = f"bench/plain/{device_id}/res"
    responder = MqttLink(MqttEndpoint.parse(hub.broker.url), client_id=f"{device_id}-hub")
    responder.subscribe(request_topic)
    responder.start(wait_s=10)
    requester = MqttLink(MqttEndpoint.parse(hub.meter.url), client_id=device_id)
    requester.subscribe(answer_topic)
    requester.start(wait_s=10)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            event = responder.get(timeout_s=0.1)
            if isinstance(event, Message) and event.topic == request_topic:
                offset, length = struct.unpack(">QI", event.payload)
                responder.publish(answer_topic, data[offset : offset + length], qos=1)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    time.sleep(0.5)  # both subscriptions in place
    try:
        hub.meter.reset()
        received = bytearray()
        started = time.perf_counter()
        while len(received) < len(data):
            want = min(CHUNK, len(data) - len(received))
            requester.publish(request_topic, struct.pack(">QI", len(received), want), qos=1)
            deadline = time.monotonic() + 10
            while True:
                event = requester.get(timeout_s=max(0.0, deadline - time.monotonic()))
                if event is None:
                    raise RuntimeError("the plain transfer got no answer")
                if isinstance(event, Message) and event.topic == answer_topic:
                    received += event.payload
                    break
        seconds = time.perf_counter() - started
        time.sleep(0.2)  # the last PUBACK
        wire = hub.meter.snapshot()
    finally:
        stop.set()
        thread.join(timeout=5)
        requester.stop()
        responder.stop()
    assert bytes(received) == data
    target_bytes = wire["bytes"].get("target", 0)
    return {
        "artifact_bytes": len(data),
        "seconds": seconds,
        "target_wire_bytes": target_bytes,
        "overhead": (target_bytes - len(data)) / len(data),
    }


def file_copy(data: bytes, directory: Path) -> float:
    source = directory / "copy-source"
    source.write_bytes(data)
    started = time.perf_counter()
    destination = directory / "copy-destination"
    shutil.copyfile(source, destination)
    with destination.open("rb+") as fh:
        os.fsync(fh.fileno())
    return time.perf_counter() - started


# -- the run ----------------------------------------------------------------------------------


def target(name: str, value: float, threshold: float, met: bool, text: str) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "met": met, "text": text}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-update-") as tmp:
        hub = Hub(Path(tmp), args.seed)
        try:
            print("training the champion and the artifacts ...", file=sys.stderr)
            champion = hub.champion_bundle(hub.train("digits", "mlp", 1.0, "champion"))
            releases = []
            for label, dataset, arch, width in SIZES:
                ref = hub.train(dataset, arch, width, f"{dataset}-{arch}-w{width:g}")
                releases.append((label, hub.release(ref)))
            hub.start()
            for label, release in releases:
                data = hub.repository.target_file_path(
                    hub.repository.get_target(release.path)
                ).read_bytes()
                tuf_runs, plain_runs, copies = [], [], []
                for index in range(args.repeats):
                    print(f"{label}: delivery {index + 1}/{args.repeats} ...", file=sys.stderr)
                    tuf_runs.append(deliver(hub, champion, release, f"bench-{label}-{index}"))
                    plain_runs.append(plain_transfer(hub, data, f"plain-{label}-{index}"))
                    copies.append(file_copy(data, Path(tmp)))
                rows.append(_row(label, release, tuf_runs, plain_runs, copies))
        finally:
            hub.stop()
    worst = max(row["overhead"] for row in rows)
    return {
        "rows": rows,
        "chunk_bytes": CHUNK,
        "targets": [
            target(
                "transfer overhead of the target (MQTT wire bytes over artifact bytes)",
                worst,
                OVERHEAD_TARGET,
                worst <= OVERHEAD_TARGET,
                ", ".join(f"{r['label']}: {100 * r['overhead']:.2f} %" for r in rows),
            )
        ],
    }


def _row(
    label: str,
    release: Any,
    tuf_runs: list[dict[str, Any]],
    plain_runs: list[dict[str, Any]],
    copies: list[float],
) -> dict[str, Any]:
    def median(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(run[key] for run in runs))

    return {
        "label": label,
        "target": release.path,
        "artifact_bytes": release.length,
        "repeats": len(tuf_runs),
        "seconds_to_committed_median": median(tuf_runs, "seconds_to_committed"),
        "seconds_target_on_wire_median": median(tuf_runs, "seconds_target_on_wire"),
        "seconds_metadata_on_wire_median": median(tuf_runs, "seconds_metadata_on_wire"),
        "target_wire_bytes": int(median(tuf_runs, "target_wire_bytes")),
        "metadata_wire_bytes": int(median(tuf_runs, "metadata_wire_bytes")),
        "overhead": median(tuf_runs, "overhead"),
        "plain_seconds_median": median(plain_runs, "seconds"),
        "plain_target_wire_bytes": int(median(plain_runs, "target_wire_bytes")),
        "plain_overhead": median(plain_runs, "overhead"),
        "file_copy_seconds_median": float(statistics.median(copies)),
        "runs": tuf_runs,
        "plain_runs": plain_runs,
    }


def markdown(document: dict[str, Any]) -> str:
    meta = document["meta"]
    lines = [
        "# Update delivery: time and bytes on the wire",
        "",
        f"Measured {meta['when']} on {meta['machine']}, {meta['cores']} cores, Python "
        f"{meta['python']}: `{meta['command']}` ({meta['seconds']:.0f} s). Loopback, private "
        f"Mosquitto with the shipped configuration, chunks of {document['chunk_bytes']:,} "
        "bytes, QoS 1.",
        "",
        "## Targets",
        "",
        "| target | threshold | measured | met |",
        "|---|---:|---|:---:|",
    ]
    for t in document["targets"]:
        lines.append(
            f"| {t['name']} | {100 * t['threshold']:g} % | {t['text']} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    lines += [
        "",
        f"## Deliver and activate, medians of {document['rows'][0]['repeats']} fresh devices each",
        "",
        "*to committed*: from publishing the desired release to the device's `committed` "
        "event (metadata refresh, download, verification, slot write, smoke test, pointer "
        "switch, champion swap; no health wait). *on wire*: first to last packet of the "
        "target's (metadata's) transfer. Bytes are whole MQTT packets on the device's "
        "connection, PUBACKs included.",
        "",
        "| artifact | bytes | to committed s | target on wire s | target wire bytes | "
        "overhead | metadata on wire s | metadata wire bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['label']} | {row['artifact_bytes']:,} | "
            f"{row['seconds_to_committed_median']:.3f} | "
            f"{row['seconds_target_on_wire_median']:.3f} | {row['target_wire_bytes']:,} | "
            f"{100 * row['overhead']:.2f} % | {row['seconds_metadata_on_wire_median']:.3f} | "
            f"{row['metadata_wire_bytes']:,} |"
        )
    lines += [
        "",
        "## Baseline, same run: the same bytes over MQTT without TUF, and a file copy",
        "",
        "| artifact | plain MQTT s | plain wire bytes | plain overhead | file copy + fsync s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['label']} | {row['plain_seconds_median']:.3f} | "
            f"{row['plain_target_wire_bytes']:,} | {100 * row['plain_overhead']:.2f} % | "
            f"{row['file_copy_seconds_median']:.4f} |"
        )
    lines += ["", "## Time of each state after the desired release (median, seconds)", ""]
    states = ["downloading", "verifying", "installing", "testing", "committed"]
    lines.append("| artifact | " + " | ".join(states) + " |")
    lines.append("|---|" + "---:|" * len(states))
    for row in document["rows"]:
        cells = []
        for state in states:
            values = [r["state_times_s"][state] for r in row["runs"] if state in r["state_times_s"]]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Writes bench/results/update.json and update.md.",
    )
    parser.add_argument("--repeats", type=int, default=3, help="deliveries per size (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    document = run(args)
    command = "python bench/update.py" + (
        f" --repeats {args.repeats}" if args.repeats != parser.get_default("repeats") else ""
    )
    document["meta"] = run_meta(command, time.perf_counter() - started, seed=args.seed)
    out: Path = args.out
    write_and_report(out, "update", document, markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
