"""Telemetry ingest throughput: windows per second stored, against the raw broker ceiling.

A private Mosquitto from the shipped deploy/mosquitto/mosquitto.conf. One publisher (paho,
MQTT 3.1.1, QoS 1) sends N realistic telemetry windows (8 features x 16 bins, 10 classes,
10 confidence bins, ~800 bytes each) from D devices as fast as the broker acknowledges them;
the broker queues what the subscribers have not taken yet.

  (a) ceiling: a bare paho subscriber (plain subscription, automatic acknowledgements, does
      nothing with the payload) -- what the broker and paho deliver to one connection;
  (b) `edgeops hub ingest --workers K` (the real command: worker processes in the share group,
      validation against a release repository with one release, batches, acknowledgements
      after the commit) into SQLite (K = 1) and PostgreSQL (K = 1 and 2).

Rate = N / (time from the first publish to the moment the database holds all N windows)
(for the ceiling: to the last message received). All measured in the same run.
Results: bench/results/ingest.json and bench/results/ingest.md.

    python bench/ingest.py [--windows 20000] [--devices 500]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from _postgres import postgres_database
from _results import run_meta, write_and_report
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.protocol import Channel, device_topic, encode, subscription
from device_agent.sketch import ReferenceStats
from device_agent.telemetry import TelemetryWindow
from edgeops.broker import MosquittoProcess
from edgeops.db import Database
from edgeops.monitor import TelemetryService
from edgeops.trust import TrustRepository

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
MODEL_ID = "m-bench"


def reference() -> ReferenceStats:
    rng = np.random.default_rng(0)
    stats = ReferenceStats.from_features(rng.normal(size=(2000, 8)), bins=16)
    return stats.with_outputs(rng.dirichlet(np.ones(10), size=2000))


def payloads(windows: int, devices: int) -> list[tuple[str, bytes]]:
    ref = reference()
    rng = np.random.default_rng(1)
    out = []
    for index in range(windows):
        device_id = f"bench-{index % devices:05d}"
        doc = TelemetryWindow(
            device_id,
            MODEL_ID,
            seq=index // devices + 1,
            start_ts=1000.0 + index,
            end_ts=1060.0 + index,
            samples=500,
            feature_counts=[
                [int(c) for c in rng.multinomial(500, np.ones(len(e) + 1) / (len(e) + 1))]
                for e in ref.feature_edges
            ],
            class_counts=[int(c) for c in rng.multinomial(500, np.ones(10) / 10)],
            confidence_counts=[int(c) for c in rng.multinomial(500, np.ones(10) / 10)],
            latency_ms={"p50": 1.2, "p95": 2.5, "p99": 4.1},
            errors={},
            cpu_percent=12.5,
            rss_bytes=48_000_000,
        )
        out.append((device_topic(device_id, Channel.TELEMETRY), encode(doc)))
    return out


def release(data_dir: Path) -> None:
    """A release repository in the hub's data dir, holding one release of MODEL_ID."""
    repository = TrustRepository(data_dir / "trust")
    repository.init(data_dir / "offline-keys")
    card = {"model_id": MODEL_ID, "reference": reference().to_dict()}
    custom = {"edgeops": {"card": json.dumps(card), "hardware": {}, "runtime": "litert"}}
    repository.add_target("bench/1/litert/model.tflite", b"model", custom)


def publisher(url_port: int) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{secrets.token_hex(3)}")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    return client


def publish_all(client: paho.Client, messages: list[tuple[str, bytes]]) -> None:
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)


# -- (a) the raw ceiling -----------------------------------------------------------------------


def ceiling(port: int, messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    done = threading.Event()
    received = 0
    last = 0.0

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        nonlocal received, last
        received += 1
        last = time.perf_counter()
        if received == len(messages):
            done.set()

    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-ceiling")
    sub.on_message = on_message
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe(subscription(Channel.TELEMETRY), 1)
    subscribed.wait(10)
    pub = publisher(port)
    start = time.perf_counter()
    publish_all(pub, messages)
    published = time.perf_counter() - start
    done.wait(300)
    seconds = last - start
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return {
        "path": "raw paho subscriber (ceiling)",
        "workers": 1,
        "database": "none",
        "windows": received,
        "seconds": round(seconds, 3),
        "publish_seconds": round(published, 3),
        "per_second": round(received / seconds, 1),
    }


# -- (b) the ingest command --------------------------------------------------------------------


def ingest(
    port: int,
    database_url: str,
    workers: int,
    data_dir: Path,
    messages: list[tuple[str, bytes]],
    label: str,
) -> dict[str, Any]:
    env = {
        **os.environ,
        "EDGEOPS_DATA_DIR": str(data_dir),
        "EDGEOPS_DATABASE_URL": database_url,
        "EDGEOPS_MQTT_URL": f"mqtt://127.0.0.1:{port}",
        "EDGEOPS_MQTT_CLIENT_ID": f"bench-{label}",
        "EDGEOPS_LOG_LEVEL": "WARNING",
    }
    log_path = data_dir / "ingest.log"
    with log_path.open("w") as log_file:
        command = subprocess.Popen(
            [str(BIN / "edgeops"), "hub", "ingest", "--workers", str(workers), "--json"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
        )
    deadline = time.monotonic() + 120
    while len(re.findall(r"worker \d+ started", log_path.read_text())) < workers:
        if command.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ingest did not start:\n{log_path.read_text()}")
        time.sleep(0.1)
    database = Database(database_url)
    telemetry = TelemetryService(database)
    pub = publisher(port)
    # probes until each worker's subscription is active (the share hands them round robin)
    probe = 0
    while telemetry.count("probe") < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"probes not stored:\n{log_path.read_text()}")
        probe += 1
        pub.publish(device_topic("probe", Channel.TELEMETRY), _probe(probe), qos=1)
        time.sleep(0.1)
    time.sleep(1.0)
    start = time.perf_counter()
    publish_all(pub, messages)
    published = time.perf_counter() - start
    target = len(messages)
    deadline = time.monotonic() + 600
    while telemetry.count() - telemetry.count("probe") < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"not every window stored:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    command.send_signal(signal.SIGTERM)
    out, _ = command.communicate(timeout=120)
    report = json.loads(out)
    pub.disconnect()
    pub.loop_stop()
    database.dispose()
    total = report["total"]
    return {
        "path": "edgeops hub ingest",
        "workers": workers,
        "database": label.split("-")[0],
        "windows": target,
        "seconds": round(seconds, 3),
        "publish_seconds": round(published, 3),
        "per_second": round(target / seconds, 1),
        "batches": total["batches"],
        "mean_batch": round(total["received"] / max(1, total["batches"]), 1),
        "rejected": sum(total["rejected"].values()),
        "per_worker_stored": {k: v["stored"] for k, v in report["workers"].items()},
    }


def _probe(seq: int) -> bytes:
    ref = reference()
    doc = TelemetryWindow(
        "probe",
        MODEL_ID,
        seq=seq,
        start_ts=0.0,
        end_ts=1.0,
        samples=0,
        feature_counts=[[0] * (len(e) + 1) for e in ref.feature_edges],
    )
    return encode(doc)


@contextmanager
def private_broker(directory: Path) -> Iterator[int]:
    """A private Mosquitto from the shipped configuration; its port."""
    broker = MosquittoProcess(directory)
    broker.start()
    try:
        yield int(broker.url.rsplit(":", 1)[1])
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=500)
    args = parser.parse_args()
    began = time.perf_counter()
    messages = payloads(args.windows, args.devices)
    size = sum(len(p) for _, p in messages) / len(messages)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-ingest-") as tmp:
        root = Path(tmp)
        # a fresh broker for every run: a worker's persistent session stays in the share
        # group after it stops, and would take its share of the next run's windows
        with private_broker(root / "mosquitto-ceiling") as port:
            rows.append(ceiling(port, messages))
        print(rows[-1], flush=True)
        runs = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2)]
        for backend, workers in runs:
            label = f"{backend}-{workers}"
            data_dir = root / f"hub-{label}"
            release(data_dir)
            with private_broker(root / f"mosquitto-{label}") as port:
                if backend == "sqlite":
                    url = f"sqlite:///{data_dir / 'edgeops.db'}"
                    rows.append(ingest(port, url, workers, data_dir, messages, label))
                else:
                    with postgres_database("edgeops_bench_") as url:
                        rows.append(ingest(port, url, workers, data_dir, messages, label))
            print(rows[-1], flush=True)
    raw = rows[0]["per_second"]
    for row in rows:
        row["ratio_to_ceiling"] = round(row["per_second"] / raw, 3)
    by = {(r["database"], r["workers"]): r for r in rows[1:]}
    pg1, pg2 = by[("postgresql", 1)], by[("postgresql", 2)]
    targets = [
        {
            "what": "PostgreSQL, 1 worker: at least 1,000 windows/s sustained",
            "measured": pg1["per_second"],
            "met": pg1["per_second"] >= 1000,
        },
        {
            "what": "PostgreSQL, 2 workers: every worker took a share",
            "measured": pg2["per_worker_stored"],
            "met": all(v > 0 for v in pg2["per_worker_stored"].values()),
        },
        {
            "what": "nothing rejected, nothing lost (all N stored in every run)",
            "measured": [r["rejected"] for r in rows[1:]],
            "met": all(r["rejected"] == 0 for r in rows[1:]),
        },
    ]
    seconds = round(time.perf_counter() - began, 1)
    command = f"python bench/ingest.py --windows {args.windows} --devices {args.devices}"
    document: dict[str, Any] = {
        "meta": run_meta(command, seconds, window_bytes=round(size)),
        "rows": rows,
        "targets": targets,
    }
    lines = [
        "# Telemetry ingest throughput",
        "",
        f"{document['meta']['when']}, `{command}`, {seconds} s; {args.windows} windows of "
        f"~{round(size)} bytes from {args.devices} devices; Mosquitto with the shipped config.",
        "",
        "| path | database | workers | windows/s | ratio to ceiling | mean batch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['path']} | {row['database']} | {row['workers']} | {row['per_second']:.0f} "
            f"| {row['ratio_to_ceiling']:.2f} | {row.get('mean_batch', '-')} |"
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in targets:
        lines.append(f"| {target['what']} | {target['measured']} | {target['met']} |")
    write_and_report(RESULTS, "ingest", document, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
