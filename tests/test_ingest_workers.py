"""Telemetry ingest workers: a shared subscription on a real Mosquitto, batches into a real
PostgreSQL (and SQLite), validation against a real release repository."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.link import MqttEndpoint
from device_agent.protocol import Channel, device_topic, encode
from device_agent.sketch import ReferenceStats
from device_agent.telemetry import TelemetryWindow
from edgeops.db import Database
from edgeops.fleet import FleetService
from edgeops.hub import HubBridge
from edgeops.monitor import TelemetryService
from edgeops.monitor.ingest import (
    IngestStats,
    IngestWorker,
    ReleaseCatalogue,
    TelemetryRejectedError,
    TelemetryValidator,
    telemetry_share,
)
from edgeops.trust import TrustRepository
from tests.clitools import BIN, assert_one_line_error, run_cli
from tests.fixtures.database import temporary_postgres_database
from tests.fixtures.telemetry import window

# -- helpers -----------------------------------------------------------------------------------


def wait_until(done: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout:.0f} s: {what}")
        time.sleep(0.05)


class Publisher:
    """A device-side paho client publishing QoS 1 windows and waiting for the broker's acks."""

    def __init__(self, url: str) -> None:
        endpoint = MqttEndpoint.parse(url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="ingest-publisher", protocol=paho.MQTTv311
        )
        self.client.max_inflight_messages_set(100)
        self.client.connect(endpoint.host, endpoint.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1)

    def window(self, doc: TelemetryWindow) -> paho.MQTTMessageInfo:
        return self.publish(device_topic(doc.device_id, Channel.TELEMETRY), encode(doc))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class IngestCommand:
    """``edgeops hub ingest --workers N --json`` as an operator runs it."""

    STARTED = re.compile(r"worker (\d+) started: pid (\d+)")
    STATS = re.compile(r"ingest (\S+): received (\d+), stored (\d+)")

    def __init__(self, env: dict[str, str], workers: int) -> None:
        self.process = subprocess.Popen(
            [
                *(str(BIN / "edgeops"), "hub", "ingest", "--workers", str(workers), "--json"),
                *("--stats-every", "1", "--batch-ms", "20"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}
        self.received: dict[str, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if started := self.STARTED.search(line):
                self.pids[int(started[1])] = int(started[2])
            if stats := self.STATS.search(line):
                self.received[stats[1]] = int(stats[2])

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then the JSON report the command prints."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        self._reader.join(timeout=10)
        assert self.process.returncode == 0, "\n".join(self.lines)
        report: dict[str, Any] = json.loads(out)
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def ingest_env(mosquitto_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    with temporary_postgres_database() as url:
        yield {
            "EDGEOPS_DATA_DIR": str(tmp_path / "hub"),
            "EDGEOPS_DATABASE_URL": url,
            "EDGEOPS_MQTT_URL": mosquitto_url,
            "EDGEOPS_MQTT_CLIENT_ID": "ingest-hub",
        }


def start_workers(env: dict[str, str], publisher: Publisher, workers: int = 2) -> IngestCommand:
    """Start the command and return once every worker has received a probe window (so every
    shared subscription is in place)."""
    command = IngestCommand(env, workers)
    try:
        wait_until(lambda: len(command.pids) == workers, what="workers started")
        seq = 0

        def probe() -> bool:
            nonlocal seq
            seq += 1
            publisher.window(window("probe", seq)).wait_for_publish(5)
            time.sleep(0.05)
            return len([n for n, count in command.received.items() if count > 0]) == workers

        wait_until(probe, what="every worker received a probe window\n" + "\n".join(command.lines))
    except BaseException:
        command.kill()
        raise
    return command


def stored_keys(url: str) -> list[tuple[str, int]]:
    database = Database(url)
    try:
        telemetry = TelemetryService(database)
        with database.session() as session:
            from sqlmodel import col, select

            from edgeops.monitor import TelemetryWindowRecord

            rows = session.exec(
                select(col(TelemetryWindowRecord.device_id), col(TelemetryWindowRecord.seq)).where(
                    col(TelemetryWindowRecord.device_id) != "probe"
                )
            ).all()
        assert telemetry.count() >= len(rows)
        return [(str(d), int(s)) for d, s in rows]
    finally:
        database.dispose()


def count_windows(url: str) -> Callable[[int], bool]:
    """A check that ``url`` holds ``n`` windows besides the probes (polled at most 4 a second)."""
    database = Database(url)
    telemetry = TelemetryService(database)

    def holds(n: int) -> bool:
        time.sleep(0.25)
        count = telemetry.count() - telemetry.count("probe")
        if count == n:
            database.dispose()
        return count == n

    return holds


def fleet_windows(devices: int, seqs: int) -> list[TelemetryWindow]:
    return [window(f"dev-{d:03d}", s) for s in range(1, seqs + 1) for d in range(devices)]


# -- worker processes --------------------------------------------------------------------------


@pytest.mark.postgres
def test_two_worker_processes_share_the_stream_and_store_every_window_once(
    ingest_env: dict[str, str], mosquitto_url: str
) -> None:
    publisher = Publisher(mosquitto_url)
    command = start_workers(ingest_env, publisher)
    try:
        windows = fleet_windows(devices=150, seqs=20)  # 3,000 windows
        rng = random.Random(7)
        again = rng.sample(windows, 300)  # redeliveries: the very same payloads again
        infos = [publisher.window(doc) for doc in windows + again]
        for info in infos:
            info.wait_for_publish(30)
        url = ingest_env["EDGEOPS_DATABASE_URL"]
        holds = count_windows(url)
        wait_until(lambda: holds(3000), what="3,000 windows stored")
        report = command.stop()
    finally:
        command.kill()
        publisher.close()
    keys = stored_keys(url)
    assert len(keys) == len(set(keys)) == 3000
    assert set(keys) == {(w.device_id, w.seq) for w in windows}
    workers = report["workers"]
    assert len(workers) == 2
    assert all(stats["stored"] > 0 for stats in workers.values()), workers  # both took a share
    total = report["total"]
    probes = sum(stats["received"] for stats in workers.values()) - 3300
    assert total["stored"] == 3000 + probes
    assert total["duplicates"] == 300
    assert sum(total["rejected"].values()) == 0
    assert report["restarts"] == 0


@pytest.mark.postgres
def test_a_worker_killed_mid_stream_and_started_again_loses_nothing(
    ingest_env: dict[str, str], mosquitto_url: str
) -> None:
    publisher = Publisher(mosquitto_url)
    command = start_workers(ingest_env, publisher)
    url = ingest_env["EDGEOPS_DATABASE_URL"]
    try:
        windows = fleet_windows(devices=100, seqs=20)  # 2,000 windows
        victim = command.pids[1]
        for index, doc in enumerate(windows):
            info = publisher.window(doc)
            if index % 50 == 49:
                info.wait_for_publish(30)  # a steady stream, not one burst
            if index == 800:
                os.kill(victim, signal.SIGKILL)  # mid-batch: received, not yet acknowledged
        wait_until(lambda: command.pids[1] != victim, what="worker 1 started again")
        holds = count_windows(url)
        wait_until(lambda: holds(2000), timeout=90, what="2,000 windows stored")
        report = command.stop()
    finally:
        command.kill()
        publisher.close()
    keys = stored_keys(url)
    assert len(keys) == 2000 and set(keys) == {(w.device_id, w.seq) for w in windows}
    assert report["restarts"] == 1
    assert any("ended (exit code -9); starting it again" in line for line in command.lines)


def test_the_command_without_a_broker_is_one_line_error(tmp_path: Path) -> None:
    from edgeops.broker.mosquitto import free_port

    result = run_cli(
        "edgeops",
        "hub",
        "ingest",
        "--connect-timeout",
        "1",
        env={
            "EDGEOPS_DATA_DIR": str(tmp_path),
            "EDGEOPS_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",
        },
    )
    assert_one_line_error(result, "cannot connect to MQTT broker")


# -- validation --------------------------------------------------------------------------------

RELEASED = "m-released"


def reference() -> ReferenceStats:
    """Two features (4 and 3 bins), 3 classes, the default confidence edges (10 bins)."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=400), rng.integers(0, 3, size=400).astype(float)], axis=1)
    stats = ReferenceStats.from_features(x, bins=4)
    probabilities = rng.dirichlet(np.ones(3), size=400)
    return stats.with_outputs(probabilities)


def release(repository: TrustRepository, model_id: str, name: str) -> None:
    card = {"model_id": model_id, "reference": reference().to_dict()}
    custom = {"edgeops": {"card": json.dumps(card), "hardware": {}, "runtime": "litert"}}
    repository.add_target(f"{name}/1/litert/model.tflite", name.encode(), custom)


@pytest.fixture
def repository(tmp_path: Path) -> TrustRepository:
    repo = TrustRepository(tmp_path / "trust")
    repo.init(tmp_path / "offline-keys")
    release(repo, RELEASED, "released")
    return repo


def good(device_id: str, seq: int, model_id: str = RELEASED, **fields: object) -> TelemetryWindow:
    shape = reference()
    doc = window(
        device_id,
        seq,
        model_id=model_id,
        feature_counts=[[1] * (len(edges) + 1) for edges in shape.feature_edges],
        class_counts=[3, 4, 3],
        confidence_counts=[1] * 10,
    )
    for name, value in fields.items():
        setattr(doc, name, value)
    return doc


def test_the_catalogue_reads_releases_and_learns_a_new_one_at_once(
    repository: TrustRepository, tmp_path: Path
) -> None:
    catalogue = ReleaseCatalogue(repository, retry_s=0.0)
    assert not catalogue.is_open and catalogue.model_ids() == [RELEASED]
    [shape] = catalogue.shapes(RELEASED) or ()
    assert (shape.classes, shape.confidence_bins) == (3, 10)
    assert shape.feature_bins == tuple(len(e) + 1 for e in reference().feature_edges)
    with pytest.raises(TelemetryRejectedError) as rejected:
        catalogue.shapes("m-new")
    assert rejected.value.reason == "unknown_release"
    release(repository, "m-new", "new")
    assert catalogue.shapes("m-new") == (shape,)
    # no repository at all: open, nothing checked against releases
    missing = ReleaseCatalogue(TrustRepository(tmp_path / "nowhere"))
    assert missing.is_open and missing.shapes("anything") is None
    assert TelemetryValidator(missing).check("d-1", window("d-1", 1).to_dict()).model_id == "m-1"


@pytest.mark.parametrize("bad", [" ", "#", "a/b"])
def test_a_share_group_must_be_one_plain_level(bad: str) -> None:
    assert telemetry_share() == "$share/edgeops/edgeops/v1/dev/+/telemetry"
    if bad.strip():
        with pytest.raises(Exception, match="plain topic level"):
            telemetry_share(bad)


def test_each_bad_window_is_rejected_counted_by_reason_and_not_stored(
    repository: TrustRepository, database: Database, mosquitto_url: str
) -> None:
    worker = IngestWorker(
        MqttEndpoint.parse(mosquitto_url),
        database,
        client_id="ingest-check",
        catalogue=ReleaseCatalogue(repository, retry_s=0.0),
        batch_ms=10,
    )
    worker.start()
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    publisher = Publisher(mosquitto_url)
    try:
        probe(publisher, lambda: worker.stats.stored > 0)
        first = good("d-1", 1)
        publisher.window(first).wait_for_publish(5)
        spoof = encode(good("victim", 9))
        bad: list[tuple[str, bytes]] = [
            ("d-2", b"{not json"),
            ("d-2", spoof),
            ("d-2", _payload(good("d-2", 1), class_counts=[-1, 2, 3])),
            ("d-2", _payload(good("d-2", 2), feature_counts=[[1, -2, 1, 1, 1], [1, 1, 1, 1]])),
            ("d-2", encode(good("d-2", 3, model_id="m-never-released"))),
            ("d-2", encode(good("d-2", 4, feature_counts=[[1, 1]]))),  # one feature
            ("d-2", encode(good("d-2", 5, feature_counts=[[1] * 9, [1] * 9]))),  # bins
            ("d-2", encode(good("d-2", 6, class_counts=[1, 1, 1, 1]))),  # 4 classes
            ("d-2", encode(good("d-2", 7, confidence_counts=[1] * 11))),
            ("d-2", encode(good("d-2", 8, confidence_counts=[1] * 3))),
            ("d-1", encode(good("d-1", 1, samples=99))),  # seq 1 again, another window
        ]
        for device_id, payload in bad:
            publisher.publish(device_topic(device_id, Channel.TELEMETRY), payload)
        publisher.window(first).wait_for_publish(5)  # a redelivery: a duplicate, not rejected
        later = good("d-1", 2)
        publisher.window(later).wait_for_publish(5)
        telemetry = TelemetryService(database)
        wait_until(
            lambda: (
                worker.stats.received == telemetry.count("d-0") + 14
                and _accounted(worker.stats) == worker.stats.received
            ),
            what="every window received and accounted for",
        )
    finally:
        stop.set()
        runner.join(timeout=10)
        worker.stop()
        publisher.close()
    stats = worker.stats
    probes = telemetry.count("d-0")
    assert stats.stored == probes + 2 and stats.duplicates == 1
    assert dict(stats.rejected) == {
        "malformed": 1,
        "device_mismatch": 1,
        "negative_count": 2,
        "unknown_release": 1,
        "feature_bins": 2,
        "class_bins": 1,
        "confidence_bins": 2,
        "replayed_seq": 1,
    }
    assert "rejected 11 (malformed 1," in stats.line()
    assert (
        telemetry.count() == probes + 2
        and telemetry.count("d-2") == 0
        and telemetry.count("victim") == 0
    )
    assert [w.document() for w in telemetry.list_windows("d-1")] == [first, later]


def _accounted(stats: IngestStats) -> int:
    """Windows the worker has finished with: stored, duplicate or rejected."""
    return stats.stored + stats.duplicates + sum(stats.rejected.values())


def probe(publisher: Publisher, received: Callable[[], bool]) -> None:
    """Publish windows of device ``d-0`` until ``received()``: the subscription is active."""
    seq = 0

    def once() -> bool:
        nonlocal seq
        seq += 1
        publisher.window(good("d-0", seq)).wait_for_publish(5)
        time.sleep(0.05)
        return received()

    wait_until(once, what="subscription active")


def _payload(doc: TelemetryWindow, **fields: Any) -> bytes:
    return json.dumps(doc.to_dict() | fields).encode()


def test_the_bridge_checks_windows_too_and_counts_rejections(
    repository: TrustRepository, database: Database, mosquitto_url: str
) -> None:
    bridge = HubBridge(
        MqttEndpoint.parse(mosquitto_url),
        FleetService(database),
        catalogue=ReleaseCatalogue(repository),
        share_group="edgeops",
    )
    assert telemetry_share() in bridge.link._subscriptions
    bridge.start()
    publisher = Publisher(mosquitto_url)
    try:
        probe(publisher, lambda: bridge.pump(0.1) >= 0 and bridge.ingest.stored > 0)
        stored = bridge.ingest.stored
        for doc in (good("d-1", 1), good("d-1", 2, model_id="m-unknown"), good("d-1", 1)):
            publisher.window(doc).wait_for_publish(5)
        publisher.publish(device_topic("d-1", Channel.TELEMETRY), b"[]").wait_for_publish(5)
        deadline = time.monotonic() + 30
        while bridge.dispatcher.dropped["telemetry"] < 2 or bridge.ingest.duplicates < 1:
            assert time.monotonic() < deadline, bridge.telemetry_stats()
            bridge.pump(0.1)
    finally:
        bridge.stop()
        publisher.close()
    stats = bridge.telemetry_stats()
    assert stats.stored == stored + 1 and stats.duplicates == 1 == bridge.duplicate_windows
    assert dict(stats.rejected) == {"unknown_release": 1, "malformed": 1}
    assert bridge.telemetry.count("d-1") == 1 and bridge.telemetry.count() == stats.stored
