"""QoS 1 through each broker: does a burst arrive whole, and how long does a round trip take?

Burst: one MqttLink publishes N QoS 1 messages as fast as it can; a plain paho subscriber
(MQTT 3.1.1, callback API v2) counts those that arrive within a window (30 s). Messages still
missing at the end of the window were dropped by the broker.

Round trip: request/response through the broker between two MqttLinks (QoS 1, as the fetch
and cmd channels do), one at a time; the median and 90th percentile of R round trips.

Brokers, all measured in the same run on the same machine, each private (free port, temporary
data directory):

  (a) Mosquitto with Debian's default configuration (the baseline),
  (b) Mosquitto with the shipped deploy/mosquitto/mosquitto.conf,
  (c) the embedded amqtt broker (edgeops.broker.EmbeddedBrokerProcess),

and with --ablation also Debian's defaults plus each throughput setting of (b) alone.
Results go to bench/results/mqtt_qos1.json and bench/results/mqtt_qos1.md (written atomically).

    python bench/mqtt_qos1.py [--messages 5000] [--window 30] [--round-trips 200] [--ablation]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import amqtt
import paho.mqtt.client as paho
from _results import write_results
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.link import Message, MqttEndpoint, MqttLink
from edgeops.broker import (
    SHIPPED_CONFIG,
    EmbeddedBrokerProcess,
    MosquittoProcess,
    find_mosquitto,
)

RESULTS = Path(__file__).resolve().parent / "results"
TOPIC = "bench/qos1"

# Debian's /etc/mosquitto/mosquitto.conf as installed on this machine (Mosquitto 2.0.11):
# persistence on, a loopback listener, anonymous access, every queue and socket option at its
# default. The private copy gets a free port and a temporary data directory instead.
DEBIAN_DEFAULT_CONFIG = """\
pid_file /run/mosquitto/mosquitto.pid
persistence true
persistence_location /var/lib/mosquitto/
log_dest file /var/log/mosquitto/mosquitto.log
listener 1883 127.0.0.1
allow_anonymous true
"""

# --ablation: Debian's defaults plus one throughput setting of the shipped file at a time
ABLATIONS = {
    "nodelay-only": "set_tcp_nodelay true",
    "queue-only": "max_queued_messages 100000",
}

BrokerStarter = Callable[[], AbstractContextManager[str]]


@dataclass(frozen=True)
class Run:
    broker: str
    config: str
    messages: int
    delivered: int
    seconds: float  # first publish to the last delivery within the window
    round_trip_ms_median: float | None
    round_trip_ms_p90: float | None

    @property
    def msgs_per_s(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


class Subscriber:
    """A plain paho client counting the messages on TOPIC."""

    def __init__(self, url: str, expected: int) -> None:
        endpoint = MqttEndpoint.parse(url)
        self.expected = expected
        self.all_arrived = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self._last_at = 0.0
        self._subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-subscriber", protocol=paho.MQTTv311
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(endpoint.host, endpoint.port, keepalive=60)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"the benchmark subscriber got no SUBACK from {url}")

    def _on_connect(self, client: paho.Client, *_: object) -> None:
        client.subscribe(TOPIC, qos=1)

    def _on_subscribe(self, *_: object) -> None:
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.topic != TOPIC:
            return
        with self._lock:
            self._count += 1
            self._last_at = time.perf_counter()
            if self._count >= self.expected:
                self.all_arrived.set()

    def snapshot(self) -> tuple[int, float]:
        """(messages received, perf_counter() time of the last one)."""
        with self._lock:
            return self._count, self._last_at

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def measure_burst(url: str, messages: int, window_s: float) -> tuple[int, float]:
    """(delivered, seconds to the last delivery) for one burst of ``messages`` QoS 1 publishes.

    Waits up to ``window_s`` for all of them; messages still missing then count as dropped.
    """
    subscriber = Subscriber(url, messages)
    publisher = MqttLink(MqttEndpoint.parse(url), "bench-publisher")
    publisher.start(wait_s=10)
    try:
        started = time.perf_counter()
        for seq in range(messages):
            publisher.publish(TOPIC, b"%08d" % seq, qos=1)
        subscriber.all_arrived.wait(window_s)
        delivered, last_at = subscriber.snapshot()
        return delivered, (last_at - started) if delivered else window_s
    finally:
        publisher.stop()
        subscriber.close()


def measure_round_trips(url: str, count: int) -> list[float]:
    """Milliseconds of ``count`` request/response exchanges through the broker, one at a time."""
    endpoint = MqttEndpoint.parse(url)
    device = MqttLink(endpoint, "bench-device")
    hub = MqttLink(endpoint, "bench-hub")
    device.subscribe("bench/res")
    hub.subscribe("bench/req")
    device.start(wait_s=10)
    hub.start(wait_s=10)
    try:
        _until(device, hub, "bench/res", "bench/req")
        times = []
        for seq in range(count):
            started = time.perf_counter()
            device.publish("bench/req", b"%d" % seq)
            request = _expect(hub, "bench/req")
            hub.publish("bench/res", request.payload)
            _expect(device, "bench/res")
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        device.stop()
        hub.stop()


def _until(device: MqttLink, hub: MqttLink, res: str, req: str) -> None:
    """Exchange warm-up messages until both subscriptions are in place."""
    for _ in range(50):
        device.publish(req, b"warm-up")
        if _next(hub, req, timeout_s=0.2) is not None:
            hub.publish(res, b"warm-up")
            if _next(device, res, timeout_s=1.0) is not None:
                break
    while device.get(0.2) is not None or hub.get(0.0) is not None:
        pass  # drop late warm-ups


def _next(link: MqttLink, topic: str, timeout_s: float) -> Message | None:
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        event = link.get(remaining)
        if isinstance(event, Message) and event.topic == topic:
            return event
    return None


def _expect(link: MqttLink, topic: str, timeout_s: float = 10.0) -> Message:
    message = _next(link, topic, timeout_s)
    if message is None:
        raise RuntimeError(f"{link.client_id} got nothing on {topic} within {timeout_s} s")
    return message


@contextmanager
def mosquitto(workdir: Path, config: Path) -> Iterator[str]:
    broker = MosquittoProcess(workdir / f"data-{config.stem}", template=config)
    broker.start()
    try:
        yield broker.url
    finally:
        broker.stop()


@contextmanager
def embedded(workdir: Path) -> Iterator[str]:
    broker = EmbeddedBrokerProcess(log_path=workdir / "embedded.log")
    broker.start()
    try:
        yield broker.url
    finally:
        broker.stop()


def mosquitto_version() -> str:
    result = subprocess.run(
        [str(find_mosquitto()), "-h"], capture_output=True, text=True, check=False, timeout=10
    )
    first = (result.stdout or result.stderr).splitlines()[0]  # "mosquitto version 2.0.11"
    return first.replace("mosquitto version ", "Mosquitto ")


def brokers(workdir: Path, ablation: bool) -> list[tuple[str, str, BrokerStarter]]:
    version = mosquitto_version()
    debian = workdir / "debian-default.conf"
    debian.write_text(DEBIAN_DEFAULT_CONFIG, encoding="utf-8")
    chosen: list[tuple[str, str, BrokerStarter]] = [
        (version, "Debian default", lambda: mosquitto(workdir, debian)),
        (version, "shipped (deploy/mosquitto)", lambda: mosquitto(workdir, SHIPPED_CONFIG)),
    ]
    if ablation:
        for name, line in ABLATIONS.items():
            variant = workdir / f"{name}.conf"
            variant.write_text(DEBIAN_DEFAULT_CONFIG + line + "\n", encoding="utf-8")
            chosen.append(
                (version, f"Debian default + {line}", partial(mosquitto, workdir, variant))
            )
    chosen.append(
        (f"embedded amqtt {amqtt.__version__}", "edgeops.broker", lambda: embedded(workdir))
    )
    return chosen


def markdown(runs: list[Run], args: argparse.Namespace, when: str) -> str:
    command = f"python bench/mqtt_qos1.py --messages {args.messages}"
    command += f" --round-trips {args.round_trips}" + (" --ablation" if args.ablation else "")
    lines = [
        f"# MQTT QoS 1: a burst of {args.messages} messages, and request/response round trips",
        "",
        f"Measured {when} on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, all brokers in the same run: `{command}`.",
        "",
        f"Burst: one MqttLink publishes {args.messages} QoS 1 messages at once; a paho "
        f"subscriber (MQTT 3.1.1) counts what arrives within {args.window:g} s. *seconds* runs "
        "from the first publish to the last delivery; messages missing after the window were "
        "dropped by the broker.",
        "",
        "| broker | config | delivered/N | seconds | msgs/s |",
        "|---|---|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.broker} | {run.config} | {run.delivered}/{run.messages} "
            f"| {run.seconds:.2f} | {run.msgs_per_s:,.0f} |"
        )
    if args.round_trips:
        lines += [
            "",
            f"Round trip: request/response between two MqttLinks through the broker (QoS 1, one "
            f"at a time, {args.round_trips} exchanges).",
            "",
            "| broker | config | median ms | p90 ms |",
            "|---|---|---:|---:|",
        ]
        for run in runs:
            lines.append(
                f"| {run.broker} | {run.config} "
                f"| {run.round_trip_ms_median:.2f} | {run.round_trip_ms_p90:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="QoS 1 burst delivery and request/response round trips through Mosquitto "
        "with Debian's defaults, Mosquitto with the shipped config and the embedded amqtt "
        "broker. Writes bench/results/mqtt_qos1.{json,md}."
    )
    parser.add_argument("--messages", type=int, default=5000, help="burst size N (default 5000)")
    parser.add_argument(
        "--window", type=float, default=30.0, help="seconds to wait for the burst (default 30)"
    )
    parser.add_argument(
        "--round-trips", type=int, default=200, help="request/response exchanges (default 200)"
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also run Debian's defaults with each throughput setting of the shipped file alone",
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.window <= 0 or args.round_trips < 0:
        parser.error("--messages must be at least 1, --window positive, --round-trips >= 0")

    runs = []
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-") as tmp:
        for broker, config, start in brokers(Path(tmp), args.ablation):
            with start() as url:
                delivered, seconds = measure_burst(url, args.messages, args.window)
                trips = measure_round_trips(url, args.round_trips) if args.round_trips else []
            median = round(statistics.median(trips), 3) if trips else None
            p90 = round(statistics.quantiles(trips, n=10)[-1], 3) if len(trips) > 1 else None
            run = Run(broker, config, args.messages, delivered, round(seconds, 3), median, p90)
            runs.append(run)
            print(
                f"{broker:<22} {config:<44} {delivered:>6}/{args.messages} in {seconds:6.2f} s "
                f"{run.msgs_per_s:>8,.0f} msgs/s   round trip {median} ms"
            )

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    document = {
        "benchmark": "mqtt_qos1",
        "measured": when,
        "messages": args.messages,
        "window_s": args.window,
        "round_trips": args.round_trips,
        "machine": {
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": [{**asdict(run), "msgs_per_s": round(run.msgs_per_s, 1)} for run in runs],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results(RESULTS, "mqtt_qos1", document, markdown(runs, args, when))
    print(f"results: {RESULTS / 'mqtt_qos1.json'}, {RESULTS / 'mqtt_qos1.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
