"""The rig's Linux boards: network namespaces, broken links, the MQTT fault proxy, clock skew,
memory limits and the real agent in a namespace.

Everything is real: namespaces and veth pairs made with iproute2, packet loss by nftables,
pings, a private Mosquitto, paho clients, the ``edgeops-agent`` program with a LiteRT model,
libfaketime, cgroups. Tests that need network namespaces skip with
:func:`hil.netns.netns_unavailable`'s reason (they run as root); the netem test skips where the
kernel has no netem, the packet-loss tests where nftables cannot drop packets, the
memory-enforcement test where the kernel or container refuses a memory cgroup, each with the
reason.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.link import Message, MqttEndpoint, MqttLink
from edgeops.broker import MosquittoProcess
from hil.boards.base import BoardError
from hil.boards.linux import LinuxAgentBoard, faketime_env, libfaketime_path
from hil.netns import (
    NFT_TABLE,
    NetemUnavailableError,
    Network,
    NetworkError,
    netem_unavailable,
    netns_unavailable,
    nftables_unavailable,
)
from hil.proxy import MqttFaultProxy, ProxyError, split_packets

NETNS_REASON = netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS_REASON is not None, reason=str(NETNS_REASON))
SKEW_S = 7200.0


# -- tools -------------------------------------------------------------------------------------


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line.split(":", 2)[1].strip().split("@")[0] for line in out.stdout.splitlines()]


class EchoServer:
    """A TCP echo server on the rig, on one address."""

    def __init__(self, host: str) -> None:
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def _ping(address: str, count: int, interval_s: float = 0.02, inside: str | None = None) -> int:
    """How many of ``count`` pings to ``address`` were answered (sent from the rig, or from
    inside namespace ``inside``)."""
    where = ["ip", "netns", "exec", inside] if inside else []
    out = subprocess.run(
        [*where, "ping", "-n", "-q", "-c", str(count), "-i", f"{interval_s:g}", "-W", "1",
         address],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, f"no ping summary in {out!r}"
    assert int(match.group(1)) == count
    return int(match.group(2))


def _nft_tables(namespace_path: str, pass_fds: tuple[int, ...] = ()) -> str:
    """``nft list tables`` inside the network namespace at ``namespace_path``."""
    return subprocess.run(
        ["nsenter", f"--net={namespace_path}", "nft", "list", "tables"],
        capture_output=True, text=True, check=True, pass_fds=pass_fds,
    ).stdout  # fmt: skip


def _needs_nftables() -> None:
    reason = nftables_unavailable()
    if reason is not None:
        pytest.skip(reason)


def _echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


class PahoClient:
    """A paho client that puts every message it receives in a queue."""

    def __init__(self, port: int, client_id: str, protocol: int = paho.MQTTv311) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.on_disconnect = lambda *args: self.disconnected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{client_id} did not connect"

    def subscribe(self, topic: str) -> None:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def take(self, n: int, timeout_s: float = 10.0) -> list[paho.MQTTMessage]:
        return [self.messages.get(timeout=timeout_s) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _next_json(
    link: MqttLink, topic: str, predicate: Any, timeout_s: float = 30.0
) -> dict[str, Any]:
    """The next JSON document on ``topic`` for which ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        event = link.get(timeout_s=remaining)
        if isinstance(event, Message) and event.topic == topic:
            document = json.loads(event.payload)
            if predicate(document):
                return dict(document)
    raise AssertionError(f"no matching message on {topic} within {timeout_s:g} s")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    if NETNS_REASON is not None:
        pytest.skip(NETNS_REASON)
    with Network() as net:
        yield net


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    process = MosquittoProcess(tmp_path_factory.mktemp("hil-mosquitto"))
    process.start()
    yield process
    process.stop()


def _watch(broker: MosquittoProcess, device_id: str) -> MqttLink:
    link = MqttLink(MqttEndpoint.parse(broker.url), client_id=f"watch-{device_id}")
    link.subscribe(f"edgeops/v1/dev/{device_id}/#", 1)
    link.start(wait_s=10)
    return link


@pytest.fixture(scope="module")
def board(
    network: Network,
    broker: MosquittoProcess,
    int8_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LinuxAgentBoard]:
    with LinuxAgentBoard(
        "hil-linux-1",
        network,
        broker_port=broker.port,
        state_dir=tmp_path_factory.mktemp("board-1"),
        model_dir=int8_model_dir,
        agent_settings={"heartbeat_s": 1.0, "hardware": {"board": "hil"}},
    ) as made:
        made.start()
        yield made


# -- namespaces and links ----------------------------------------------------------------------


@needs_netns
def test_two_namespaces_reach_the_host_a_partition_stalls_and_heal_restores(
    network: Network,
) -> None:
    a, b = network.add_host("ping-a"), network.add_host("ping-b")
    assert a.namespace != b.namespace and a.host_ip != b.host_ip
    assert all(len(name) <= 15 for name in (a.host_veth, a.device_veth, b.host_veth))
    servers = {link.name: EchoServer(link.host_ip) for link in (a, b)}
    try:
        for link in (a, b):
            with network.connect(link, (link.host_ip, servers[link.name].port)) as sock:
                assert _echo_once(sock, b"hello") == b"hello"
        # an established connection across the partition: it stalls, it is not reset
        held = network.connect(a, (a.host_ip, servers["ping-a"].port))
        assert _echo_once(held, b"before") == b"before"
        network.partition(a)
        assert network.partitioned(a) and not network.partitioned(b)
        held.settimeout(1.0)
        held.sendall(b"during")
        with pytest.raises(TimeoutError):
            held.recv(16)
        with pytest.raises(TimeoutError):  # a new connection times out: no RST, no ICMP
            network.connect(a, (a.host_ip, servers["ping-a"].port), timeout_s=1.0)
        with network.connect(b, (b.host_ip, servers["ping-b"].port)) as sock:
            assert _echo_once(sock, b"other host") == b"other host"
        network.heal(a)
        held.settimeout(20.0)  # TCP's retransmission delivers what waited
        assert held.recv(16) == b"during"
        held.close()
        with network.connect(a, (a.host_ip, servers["ping-a"].port)) as sock:
            assert _echo_once(sock, b"after") == b"after"
    finally:
        for server in servers.values():
            server.close()


@needs_netns
def test_netem_values_are_checked(network: Network) -> None:
    link = network.links.get("ping-a") or network.add_host("ping-a")
    with pytest.raises(NetworkError, match="jitter needs a delay"):
        network.netem(link, jitter_ms=5)
    with pytest.raises(NetworkError, match="loss 0-100"):
        network.netem(link, loss_pct=120)
    with pytest.raises(NetworkError, match="rate"):
        network.netem(link, rate="fast")


@needs_netns
def test_netem_delay_is_visible_in_tcp_connect_time(network: Network) -> None:
    reason = netem_unavailable()
    if reason is not None:
        pytest.skip(reason)
    link = network.add_host("delayed")
    server = EchoServer(link.host_ip)
    try:
        network.netem(link, delay_ms=100)
        started = time.monotonic()
        with network.connect(link, (link.host_ip, server.port), timeout_s=10) as sock:
            elapsed = time.monotonic() - started
            assert _echo_once(sock, b"late") == b"late"
        assert elapsed >= 0.1  # a round trip crosses the delay twice
        shown = subprocess.run(
            ["tc", "qdisc", "show", "dev", link.host_veth], capture_output=True, text=True
        ).stdout
        assert "netem" in shown and "delay 100" in shown
        network.clear(link)
        shown = subprocess.run(
            ["tc", "qdisc", "show", "dev", link.host_veth], capture_output=True, text=True
        ).stdout
        assert "netem" not in shown
    finally:
        server.close()


@needs_netns
def test_packet_loss_by_nftables_loses_some_blocks_all_at_100_and_clears(
    network: Network,
) -> None:
    _needs_nftables()
    link = network.add_host("lossy")
    server = EchoServer(link.host_ip)
    held = network.connect(link, (link.host_ip, server.port))
    try:
        assert _ping(link.device_ip, 5) == 5
        assert network.dropped_packets(link) == 0 and network.loss_pct(link) == 0.0
        network.packet_loss(link, 30)
        tables = _nft_tables(f"/run/netns/{link.namespace}")
        assert f"table inet {NFT_TABLE}" in tables
        assert NFT_TABLE not in _nft_tables(f"/proc/{os.getpid()}/ns/net")  # not the rig's
        # each way loses 30 %: about half the pings come back, some but not all
        answered = _ping(link.device_ip, 50)
        assert 0 < answered < 50
        assert network.dropped_packets(link) > 0 and network.loss_pct(link) == 30.0
        # the namespace's loopback is not the link: nothing lost there
        assert _ping("127.0.0.1", 30, inside=link.namespace) == 30
        held.settimeout(30.0)
        assert _echo_once(held, b"before") == b"before"  # TCP retransmits through the loss
        network.packet_loss(link, 100)
        assert _ping(link.device_ip, 3, interval_s=0.2) == 0
        held.settimeout(1.0)
        held.sendall(b"lost")  # real loss: TCP retransmits, nothing arrives yet
        with pytest.raises(TimeoutError):
            held.recv(16)
        with pytest.raises(TimeoutError):  # a new connection's SYNs are lost too
            network.connect(link, (link.host_ip, server.port), timeout_s=1.0)
        network.clear_packet_loss(link)
        assert f"table inet {NFT_TABLE}" not in _nft_tables(f"/run/netns/{link.namespace}")
        held.settimeout(20.0)  # the retransmission gets through once the loss is gone
        assert held.recv(16) == b"lost"
        assert _ping(link.device_ip, 10) == 10
        assert network.loss_pct(link) == 0.0 and network.dropped_packets(link) == 0
        network.clear_packet_loss(link)  # nothing to clear is fine
        with pytest.raises(NetworkError, match="0-100 %"):
            network.packet_loss(link, 101)
    finally:
        held.close()
        server.close()
        network.clear(link)


@needs_netns
def test_netem_without_netem_makes_loss_by_nftables_and_refuses_delay(network: Network) -> None:
    _needs_nftables()
    link = network.links.get("lossy") or network.add_host("lossy")
    try:
        mechanism = network.netem(link, loss_pct=40)
        if netem_unavailable() is None:
            assert mechanism == "netem" and network.loss_pct(link) == 0.0
            return
        assert mechanism == "nftables" and network.loss_pct(link) == 40.0
        assert f"table inet {NFT_TABLE}" in _nft_tables(f"/run/netns/{link.namespace}")
        with pytest.raises(NetemUnavailableError, match="only packet loss"):
            network.netem(link, delay_ms=50, loss_pct=10)
        assert network.loss_pct(link) == 40.0  # a refused call changed nothing
        assert network.netem(link) is None  # all zero clears
        assert network.loss_pct(link) == 0.0
        assert f"table inet {NFT_TABLE}" not in _nft_tables(f"/run/netns/{link.namespace}")
    finally:
        network.clear(link)


@needs_netns
def test_close_removes_the_loss_table_even_from_a_namespace_still_held() -> None:
    _needs_nftables()
    net = Network()
    held: int | None = None
    try:
        link = net.add_host("held")
        net.packet_loss(link, 25)
        held = os.open(f"/run/netns/{link.namespace}", os.O_RDONLY)  # keeps it alive
        assert f"table inet {NFT_TABLE}" in _nft_tables(f"/proc/self/fd/{held}", (held,))
        net.close()
        assert link.namespace not in _netns_names()
        assert not [n for n in _link_names() if n.startswith(net.prefix)]
        assert f"table inet {NFT_TABLE}" not in _nft_tables(f"/proc/self/fd/{held}", (held,))
    finally:
        net.close()
        if held is not None:
            os.close(held)


@needs_netns
def test_close_removes_every_namespace_veth_cgroup_and_process(tmp_path: Path) -> None:
    # what a crashed run left: a namespace and a veth named with a dead pid's prefix
    dead = subprocess.Popen(["true"])
    dead.wait()
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    pid36 = ""
    number = dead.pid
    while number:
        number, rest = divmod(number, 36)
        pid36 = digits[rest] + pid36
    stale = f"eh{pid36.rjust(5, '0')}zz"
    subprocess.run(["ip", "netns", "add", f"{stale}-crashed"], check=True)
    subprocess.run(
        ["ip", "link", "add", f"{stale}00h", "type", "veth", "peer", "name", f"{stale}00d"],
        check=True,
    )
    net = Network()
    try:
        assert f"{stale}-crashed" in net.cleaned_stale and f"{stale}00h" in net.cleaned_stale
        assert f"{stale}-crashed" not in _netns_names()
        assert f"{stale}00h" not in _link_names() and f"{stale}00d" not in _link_names()
        links = [net.add_host("c1"), net.add_host("c2")]
        net.partition(links[0])
        sleeper = net.popen(links[1], ["sleep", "300"])
        reason = net.memory_limit(sleeper.pid, 256 * 1024 * 1024, group="c2")
        group = net.memory_group("c2")
        assert (reason is None) == (group is not None)
        assert {link.namespace for link in links} <= set(_netns_names())
    finally:
        net.close()
    assert sleeper.poll() is not None
    assert not [n for n in _netns_names() if n.startswith(net.prefix)]
    assert not [n for n in _link_names() if n.startswith(net.prefix)]
    if group is not None:
        assert not group.exists() and not group.parent.exists()
    net.close()  # twice is fine


@needs_netns
def test_memory_limit_is_enforced_or_the_refusal_named(network: Network) -> None:
    hog = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); b = bytearray(400 << 20); "
         "b[::4096] = b'x' * len(b[::4096]); print('survived', flush=True)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        reason = network.memory_limit(hog.pid, 64 * 1024 * 1024, group="hog")
        if reason is not None:
            assert reason.strip() and "\n" not in reason
            pytest.skip(f"memory cgroups refused here: {reason}")
        group = network.memory_group("hog")
        assert group is not None
        assert str(hog.pid) in (group / "cgroup.procs").read_text().split()
        assert hog.stdin is not None
        hog.stdin.write(b"go\n")
        hog.stdin.flush()
        assert hog.wait(timeout=60) == -signal.SIGKILL  # the kernel's OOM killer
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()


def test_memory_limit_refuses_nonsense() -> None:
    if NETNS_REASON is not None:
        pytest.skip(NETNS_REASON)
    with Network() as net:
        assert "positive" in str(net.memory_limit(os.getpid(), 0))


# -- the MQTT fault proxy ----------------------------------------------------------------------


def test_split_packets_reads_multi_byte_lengths() -> None:
    big = bytes([0x30]) + bytes([0x80 | (300 % 128), 300 // 128]) + b"\x00\x01t" + b"x" * 297
    buffer = bytearray(big + b"\xc0\x00" + b"\x30")  # a PUBLISH, a PINGREQ, half a packet
    packets = split_packets(buffer)
    assert [bytes(p) for p in packets] == [big, b"\xc0\x00"]
    assert buffer == bytearray(b"\x30")
    with pytest.raises(ValueError, match="four bytes"):
        split_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_proxy_forwards_mqtt_both_ways_and_corrupts_exactly_one_publish(
    mosquitto: MosquittoProcess, protocol: int
) -> None:
    with MqttFaultProxy("127.0.0.1", mosquitto.port) as proxy:
        device = PahoClient(proxy.port, "dev-1", protocol)  # through the proxy
        hub = PahoClient(mosquitto.port, "hub")  # straight to the broker
        try:
            device.subscribe("edgeops/v1/dev/dev-1/#")
            chunks = [bytes([i]) * 64 + b"\n" + bytes(range(200)) for i in range(3)]
            proxy.corrupt_next("edgeops/v1/dev/*/fetch/res")
            hub.publish("edgeops/v1/dev/dev-1/desired", b'{"schema": 1}')
            for chunk in chunks:
                hub.publish("edgeops/v1/dev/dev-1/fetch/res", chunk)
            got = device.take(4)
            assert got[0].topic.endswith("/desired") and got[0].payload == b'{"schema": 1}'
            received = [m.payload for m in got[1:]]
            assert received[1:] == chunks[1:]
            first = received[0]
            assert len(first) == len(chunks[0])
            differing = [i for i in range(len(first)) if first[i] != chunks[0][i]]
            assert differing == [len(first) - 1]  # the last byte, flipped
            assert first[-1] == chunks[0][-1] ^ 0xFF
            # the device's own publish reaches the hub intact
            hub.subscribe("edgeops/v1/dev/dev-1/state")
            device.publish("edgeops/v1/dev/dev-1/state", b"state-doc")
            assert hub.take(1)[0].payload == b"state-doc"
            stats = proxy.stats
            assert stats.connections == 1 and stats.active == 1
            assert stats.corrupted == 1
            assert stats.corrupted_topics == ["edgeops/v1/dev/dev-1/fetch/res"]
            assert stats.publishes_to_client >= 4 and stats.bytes_to_broker > 0
            assert proxy.pending_corruptions() == 0
            # dropping every connection: the device sees its connection go
            assert proxy.drop_all() == 1
            assert device.disconnected.wait(10)
            assert proxy.stats.dropped == 1
        finally:
            device.close()
            hub.close()


def test_proxy_delay_holds_mqtt_both_ways_in_order(mosquitto: MosquittoProcess) -> None:
    delay_s = 0.15
    with MqttFaultProxy("127.0.0.1", mosquitto.port, seed=7) as proxy:
        device = PahoClient(proxy.port, "dev-delayed")  # through the proxy
        hub = PahoClient(mosquitto.port, "hub-delayed")  # straight to the broker
        try:
            device.subscribe("edgeops/v1/dev/dev-delayed/#")
            proxy.set_delay(delay_s * 1000)
            assert proxy.delay_ms == pytest.approx(delay_s * 1000)
            # the device's own publish comes back to it: through the proxy both ways
            started = time.monotonic()
            device.client.publish("edgeops/v1/dev/dev-delayed/echo", b"ping", qos=0)
            assert device.take(1)[0].payload == b"ping"
            assert time.monotonic() - started >= 2 * delay_s
            # the hub's publish crosses the proxy once
            started = time.monotonic()
            hub.client.publish("edgeops/v1/dev/dev-delayed/desired", b"doc", qos=0)
            assert device.take(1)[0].payload == b"doc"
            assert time.monotonic() - started >= delay_s
            # jitter as large as the delay itself reorders nothing
            proxy.set_delay(40, jitter_ms=40)
            sent = [str(index).encode() for index in range(40)]
            for payload in sent:
                hub.client.publish("edgeops/v1/dev/dev-delayed/seq", payload, qos=0)
                time.sleep(0.002)
            assert [m.payload for m in device.take(len(sent))] == sent
            proxy.set_delay(0)
            assert proxy.delay_ms == 0.0 and proxy.jitter_ms == 0.0
            hub.publish("edgeops/v1/dev/dev-delayed/after", b"undelayed")
            assert device.take(1)[0].payload == b"undelayed"
            with pytest.raises(ProxyError, match="jitter needs a delay"):
                proxy.set_delay(0, jitter_ms=5)
            with pytest.raises(ProxyError, match=">= 0"):
                proxy.set_delay(-1)
            # a goodbye held by the delay still reaches the broker before the connection
            # closes: a clean disconnect publishes no will
            hub.subscribe("edgeops/v1/dev/+/will")
            leaving = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-leaving")
            leaving.will_set("edgeops/v1/dev/dev-leaving/will", b"gone", qos=1)
            leaving.connect("127.0.0.1", proxy.port)
            leaving.loop_start()
            proxy.set_delay(100)
            leaving.publish("edgeops/v1/dev/dev-leaving/will", b"alive", qos=1).wait_for_publish(10)
            assert hub.take(1)[0].payload == b"alive"
            leaving.disconnect()
            leaving.loop_stop()
            deadline = time.monotonic() + 10
            while proxy.stats.active > 1:
                assert time.monotonic() < deadline, "the delayed connection never closed"
                time.sleep(0.05)
            with pytest.raises(queue.Empty):
                hub.messages.get(timeout=1.0)
            device.client.disconnect()
            assert proxy.stats.connections == 2 and proxy.stats.dropped == 0
        finally:
            device.close()
            hub.close()


def test_proxy_refuses_an_address_it_cannot_listen_on() -> None:
    with pytest.raises(ProxyError, match=r"cannot listen on 203\.0\.113\.9"):
        MqttFaultProxy("203.0.113.9", 1883).start()


# -- clock skew --------------------------------------------------------------------------------

_TUF_CHECK = """
import sys
from tuf.api.exceptions import ExpiredMetadataError
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType
root, timestamp = (open(p, "rb").read() for p in sys.argv[1:3])
trusted = TrustedMetadataSet(root, EnvelopeType.METADATA)
try:
    trusted.update_timestamp(timestamp)
    print("valid")
except ExpiredMetadataError as exc:
    print("expired:", exc)
"""


def test_skewed_clock_reaches_python_and_tuf_expiry(tmp_path: Path) -> None:
    if libfaketime_path() is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root, Timestamp

    signer = CryptoSigner.generate_ed25519()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    root = Metadata(Root(expires=expires))
    for role in ("root", "timestamp", "snapshot", "targets"):
        root.signed.add_key(signer.public_key, role)
    root.sign(signer)
    timestamp = Metadata(Timestamp(expires=expires))
    timestamp.sign(signer)
    root.to_file(str(tmp_path / "root.json"))
    timestamp.to_file(str(tmp_path / "timestamp.json"))
    files = [str(tmp_path / "root.json"), str(tmp_path / "timestamp.json")]
    argv = [sys.executable, "-c", _TUF_CHECK, *files]

    def run(env: dict[str, str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout

    assert run(dict(os.environ)).strip() == "valid"
    skewed = {**os.environ, **faketime_env(SKEW_S)}
    assert run(skewed).startswith("expired: Final root.json is expired")
    now = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        capture_output=True, text=True, env=skewed, check=True,
    ).stdout  # fmt: skip
    assert abs(float(now) - time.time() - SKEW_S) < 60


def test_clock_skew_without_libfaketime_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOPS_HIL_LIBFAKETIME", "/nonexistent/libfaketime.so.1")
    with pytest.raises(BoardError, match="needs libfaketime"):
        faketime_env(60.0)


# -- the agent in a namespace ------------------------------------------------------------------


@needs_netns
def test_board_settings_are_checked(network: Network, tmp_path: Path) -> None:
    with pytest.raises(BoardError, match="may not set mqtt_url"):
        LinuxAgentBoard(
            "bad-settings", network, broker_port=1, state_dir=tmp_path,
            agent_settings={"mqtt_url": "mqtt://elsewhere:1883"},
        )  # fmt: skip
    with pytest.raises(BoardError, match="device id"):
        LinuxAgentBoard("no spaces allowed", network, broker_port=1, state_dir=tmp_path)


@needs_netns
def test_agent_in_a_namespace_answers_and_reports_through_the_proxy(
    board: LinuxAgentBoard,
    broker: MosquittoProcess,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    watch = _watch(broker, board.device_id)
    try:
        state = _next_json(watch, f"edgeops/v1/dev/{board.device_id}/state", lambda d: "slots" in d)
        assert state["device_id"] == board.device_id
        assert state["hardware"]["board"] == "hil"
        champion = state["slots"]["champion"]["model_id"]
        x, y = digits_samples
        correct = 0
        for index in range(5):
            output = board.infer(x[index], timeout_s=30)
            assert output.values.dtype == np.float32 and output.values.shape == (10,)
            assert output.extra["label"] == int(np.argmax(output.values))
            assert output.extra["model_id"] == champion and output.latency_s > 0
            correct += int(output.extra["label"] == y[index])
        assert correct >= 3  # a trained model, not noise
        metrics = board.read_metrics()
        assert metrics["slots.champion.model_id"] == champion
        assert metrics["status"] == "connected" and metrics["running"] == 1
        assert isinstance(metrics["rss_bytes"], int) and metrics["rss_bytes"] > 10 << 20
        assert metrics["memory_limit"] is None and metrics["memory_limit_applied"] == 0
        deadline = time.monotonic() + 20  # the health document is rewritten each heartbeat
        while not (isinstance(metrics["samples"], int) and metrics["samples"] >= 5):
            assert time.monotonic() < deadline, f"samples never reached 5: {metrics}"
            time.sleep(0.2)
            metrics = board.read_metrics()
        assert board.proxy.stats.connections >= 1 and board.proxy.stats.bytes_to_broker > 0
        assert board.pid in board.network.namespace_pids(board.link)
    finally:
        watch.stop()


@needs_netns
def test_partitioned_board_gets_no_input_until_healed(
    board: LinuxAgentBoard, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits_samples
    board.partition()
    try:
        board.send_input(x[0])
        with pytest.raises(BoardError, match="no answer"):
            board.read_output(timeout_s=1.5)
        assert board.read_metrics()["partitioned"] == 1
    finally:
        board.heal()
    # the request that waited goes through once TCP retransmits
    assert board.read_output(timeout_s=30).values.shape == (10,)
    assert board.infer(x[1], timeout_s=30).values.shape == (10,)


@needs_netns
def test_board_netem_says_which_mechanism_delays_and_loses(
    board: LinuxAgentBoard, broker: MosquittoProcess
) -> None:
    _needs_nftables()
    watch = _watch(broker, board.device_id)
    try:
        said = board.netem(delay_ms=120, jitter_ms=10, loss_pct=5)
        metrics = board.read_metrics()
        assert metrics["link.delay_ms"] == 120 and metrics["link.loss_pct"] == 5
        if netem_unavailable() is None:
            assert said == "delay 120 ± 10 ms by netem, loss 5 % by netem"
            assert board.proxy.delay_ms == 0.0 and metrics["link.delay_by"] == "netem"
        else:
            assert said == ("delay 120 ± 10 ms by the MQTT proxy (MQTT only), loss 5 % by nftables")
            assert board.proxy.delay_ms == 120 and board.proxy.jitter_ms == 10
            assert board.network.loss_pct(board.link) == 5.0
            assert metrics["link.delay_by"] == "the MQTT proxy (MQTT only)"
            assert metrics["link.loss_by"] == "nftables"
            assert isinstance(metrics["link.dropped_packets"], int)
            with pytest.raises(NetemUnavailableError, match="rate needs netem"):
                board.netem(rate="1mbit")
            assert board.proxy.delay_ms == 120  # the refused call changed nothing
        # the agent keeps publishing through the slowed link: a state newer than the fault
        applied_at = time.time()
        state = f"edgeops/v1/dev/{board.device_id}/state"
        _next_json(watch, state, lambda d: float(d.get("ts", 0)) > applied_at, timeout_s=30)
        assert board.wait_status("connected")["status"] == "connected"
    finally:
        board.clear_netem()
        watch.stop()
    assert board.proxy.delay_ms == 0.0 and board.network.loss_pct(board.link) == 0.0
    assert not [key for key in board.read_metrics() if key.startswith("link.")]


@needs_netns
def test_power_cut_kills_without_a_goodbye_and_the_agent_comes_back(
    board: LinuxAgentBoard,
    broker: MosquittoProcess,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    x, _ = digits_samples
    before = board.pid
    log_before = board.log_path
    assert before is not None and log_before is not None
    watch = _watch(broker, board.device_id)
    try:
        presence = f"edgeops/v1/dev/{board.device_id}/presence"
        _next_json(watch, presence, lambda d: d["online"] is True)  # the retained one
        board.power_cut(off_s=0.2)
        assert board.pid not in (None, before)
        assert board.power_cuts == 1
        # the cut run wrote no clean stop: nothing was flushed, no goodbye
        assert "stopped" not in log_before.read_text()
        _next_json(watch, presence, lambda d: d["online"] is True, timeout_s=60)
        assert board.infer(x[2], timeout_s=30).values.shape == (10,)
        assert board.read_metrics()["runs"] == 2
    finally:
        watch.stop()


@needs_netns
def test_skewed_clock_and_memory_limit_on_a_board(
    network: Network,
    broker: MosquittoProcess,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    if libfaketime_path() is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    x, _ = digits_samples
    watch = _watch(broker, "hil-skewed")
    try:
        with LinuxAgentBoard(
            "hil-skewed",
            network,
            broker_port=broker.port,
            state_dir=tmp_path / "skewed",
            model_dir=int8_model_dir,
            agent_settings={"window_samples": 2, "window_seconds": 0},
            memory_limit_bytes=2 << 30,
            clock_skew_s=SKEW_S,
        ) as skewed:
            skewed.start()
            state = _next_json(watch, "edgeops/v1/dev/hil-skewed/state", lambda d: True)
            assert abs(state["ts"] - time.time() - SKEW_S) < 120
            for index in range(2):
                skewed.infer(x[index], timeout_s=30)
            window = _next_json(watch, "edgeops/v1/dev/hil-skewed/telemetry", lambda d: True)
            assert abs(window["end_ts"] - time.time() - SKEW_S) < 120
            assert window["samples"] == 2
            metrics = skewed.read_metrics()
            assert isinstance(metrics["ts"], float)
            assert abs(metrics["ts"] - time.time() - SKEW_S) < 120
            assert metrics["clock_skew_s"] == SKEW_S
            limit = metrics["memory_limit"]
            assert isinstance(limit, str) and limit and "\n" not in limit
            if metrics["memory_limit_applied"]:
                assert limit == f"applied: {2 << 30} bytes"
                group = network.memory_group("hil-skewed")
                assert group is not None and str(skewed.pid) in (group / "cgroup.procs").read_text()
            else:
                assert skewed.memory_limit_status == limit
    finally:
        watch.stop()


@needs_netns
def test_deploy_makes_a_bundle_the_champion_and_reset_keeps_it(
    board: LinuxAgentBoard,
    float_model_dir: Path,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
) -> None:
    from device_agent.runtime import ModelBundle

    x, _ = digits_samples
    wanted = ModelBundle.load(float_model_dir).model_id
    assert wanted != ModelBundle.load(int8_model_dir).model_id
    board.deploy(float_model_dir)
    assert board.read_metrics()["slots.champion.model_id"] == wanted
    assert board.infer(x[3], timeout_s=30).extra["model_id"] == wanted
    runs = board.runs
    log = board.log_path
    assert log is not None
    board.reset()
    assert board.runs == runs + 1
    assert "stopped" in log.read_text()  # a clean stop, unlike a power cut
    assert board.infer(x[4], timeout_s=30).extra["model_id"] == wanted
    with pytest.raises(BoardError, match="not a model bundle"):
        board.deploy(float_model_dir.parent / "no-such-bundle")
