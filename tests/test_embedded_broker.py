"""The embedded broker (amqtt with EdgeOps' corrections) serves the link as Mosquitto does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.link import Backoff, Connected, MqttEndpoint, MqttLink, Will
from device_agent.protocol import Channel, Presence, device_topic, encode
from edgeops.broker import EmbeddedBrokerProcess, free_port, run_embedded_broker
from edgeops.errors import BrokerError
from tests.fixtures.mqtt import PROBE, messages, next_message, wait_subscribed

FAST = Backoff(initial_s=0.1, maximum_s=1.0)


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    created: list[MqttLink] = []
    yield created
    for link in created:
        link.stop()


def connect(
    links: list[MqttLink], url: str, client_id: str, *subscriptions: str, will: Will | None = None
) -> MqttLink:
    link = MqttLink(MqttEndpoint.parse(url), client_id, will=will, backoff=FAST)
    links.append(link)
    for topic_filter in subscriptions:
        link.subscribe(topic_filter)
    link.start(wait_s=10)
    return link


def presence(device_id: str, online: bool) -> bytes:
    return encode(Presence(device_id=device_id, online=online))


@pytest.fixture
def silent_clients() -> Iterator[list[paho.Client]]:
    """Raw paho clients that connect, then never send again (their sockets stay open)."""
    created: list[paho.Client] = []
    yield created
    for client in created:
        sock = client.socket()
        if sock is not None:
            sock.close()


def connect_then_go_silent(
    silent_clients: list[paho.Client], url: str, client_id: str, will: Will, keepalive_s: int
) -> None:
    """A device that loses power behind a NAT: connected, then nothing, not even a FIN."""
    endpoint = MqttEndpoint.parse(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    silent_clients.append(client)
    client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.connect(endpoint.host, endpoint.port, keepalive=keepalive_s)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        assert time.monotonic() < deadline, "the silent client did not connect"
        client.loop(timeout=0.1)


# -- the link on the embedded broker ----------------------------------------------------------


def test_link_connects_and_receives_what_it_subscribed_to(
    embedded_broker: EmbeddedBrokerProcess, links: list[MqttLink]
) -> None:
    hub = connect(links, embedded_broker.url, "hub", "edgeops/v1/dev/+/events")
    assert hub.get(5) == Connected(session_present=False)
    topic = device_topic("dev-1", Channel.EVENTS)
    wait_subscribed(hub, topic)

    device = connect(links, embedded_broker.url, "dev-1")
    assert device.publish(topic, b"booted", wait_s=5)

    message = next_message(hub, topic)
    assert message is not None
    assert (message.payload, message.qos, message.retain) == (b"booted", 1, False)


def test_retained_message_reaches_a_late_subscriber_once(
    embedded_broker: EmbeddedBrokerProcess, links: list[MqttLink]
) -> None:
    topic = device_topic("dev-1", Channel.STATE)
    device = connect(links, embedded_broker.url, "dev-1")
    assert device.publish(topic, b"state-1", retain=True, wait_s=5)

    late = connect(links, embedded_broker.url, "hub", "edgeops/v1/dev/+/state")

    received = messages(late, topic, within_s=2.0)
    assert [(m.payload, m.retain) for m in received] == [(b"state-1", True)]


def test_last_will_on_a_dropped_connection_and_not_on_a_clean_stop(
    embedded_broker: EmbeddedBrokerProcess, links: list[MqttLink]
) -> None:
    url = embedded_broker.url
    hub = connect(links, url, "hub", "edgeops/v1/dev/+/presence")
    wait_subscribed(hub, device_topic("probe", Channel.PRESENCE))
    wills = {d: Will(device_topic(d, Channel.PRESENCE), presence(d, False)) for d in ("d1", "d2")}
    vanishing = connect(links, url, "d1", will=wills["d1"])
    leaving = connect(links, url, "d2", will=wills["d2"])

    vanishing.abort()
    leaving.stop()

    received = messages(hub, "edgeops/v1/dev/d", within_s=3.0)
    assert [(m.topic, m.payload) for m in received] == [(wills["d1"].topic, wills["d1"].payload)]
    late = connect(links, url, "late", wills["d1"].topic)
    retained = next_message(late, wills["d1"].topic)
    assert retained is not None
    assert (retained.payload, retained.retain) == (wills["d1"].payload, True)


def test_every_qos1_message_of_a_burst_arrives(
    embedded_broker: EmbeddedBrokerProcess, links: list[MqttLink]
) -> None:
    count = 500
    topic = device_topic("dev-1", Channel.TELEMETRY)
    hub = connect(links, embedded_broker.url, "hub", "edgeops/v1/dev/+/telemetry")
    wait_subscribed(hub, topic)
    device = connect(links, embedded_broker.url, "dev-1")

    for seq in range(count):
        device.publish(topic, b"%d" % seq)

    received: list[int] = []
    while len(received) < count:
        message = next_message(hub, topic, timeout_s=30)
        assert message is not None, f"only {len(received)} of {count} messages arrived"
        if message.payload != PROBE:
            received.append(int(message.payload))
    assert received == list(range(count))  # all of them, in order


# -- EdgeOps' corrections to amqtt 0.12 -------------------------------------------------------


def test_client_gets_only_the_retained_messages_of_its_own_subscriptions(
    embedded_broker: EmbeddedBrokerProcess, links: list[MqttLink]
) -> None:
    url = embedded_broker.url
    publisher = connect(links, url, "publisher")
    assert publisher.publish("site-a/desired", b"a", retain=True, wait_s=5)
    assert publisher.publish("site-b/desired", b"b", retain=True, wait_s=5)
    connect(links, url, "watcher-a", "site-a/#")  # its filter must not leak to others

    site_b = connect(links, url, "watcher-b", "site-b/#")
    unsubscribed = connect(links, url, "idle")

    assert [(m.topic, m.payload) for m in messages(site_b, "", within_s=2.0)] == [
        ("site-b/desired", b"b")
    ]
    assert messages(unsubscribed, "", within_s=0.5) == []


def test_silent_client_is_dropped_after_one_and_a_half_keepalives_and_its_will_published(
    embedded_broker: EmbeddedBrokerProcess,
    links: list[MqttLink],
    silent_clients: list[paho.Client],
) -> None:
    topic = device_topic("dev-1", Channel.PRESENCE)
    hub = connect(links, embedded_broker.url, "hub", topic)
    will = Will(topic, presence("dev-1", online=False))
    connect_then_go_silent(silent_clients, embedded_broker.url, "dev-1", will, keepalive_s=2)

    offline = next_message(hub, topic, timeout_s=15)  # 1.5 x 2 s, plus scheduling

    assert offline is not None and offline.payload == will.payload


def test_reconnecting_client_id_closes_its_older_connection_first(
    embedded_broker: EmbeddedBrokerProcess,
    links: list[MqttLink],
    silent_clients: list[paho.Client],
) -> None:
    topic = device_topic("dev-1", Channel.PRESENCE)
    hub = connect(links, embedded_broker.url, "hub", topic)
    will = Will(topic, presence("dev-1", online=False))
    # the device's old connection is half-open: it rebooted without a FIN
    connect_then_go_silent(silent_clients, embedded_broker.url, "dev-1", will, keepalive_s=2)

    rebooted = connect(links, embedded_broker.url, "dev-1", will=will)
    online = presence("dev-1", online=True)
    assert rebooted.publish(topic, online, retain=True, wait_s=5)

    # the old connection's will comes first, then the new presence, and nothing after it:
    # the old connection is not left to time out later and mark the device offline
    received = messages(hub, topic, within_s=6.0)  # longer than 1.5 x the old keepalive
    assert [m.payload for m in received] == [will.payload, online]
    assert rebooted.connected
    late = connect(links, embedded_broker.url, "late", topic)
    retained = next_message(late, topic)
    assert retained is not None and retained.payload == online


# -- running it -------------------------------------------------------------------------------


def test_run_embedded_broker_in_a_thread_until_told_to_stop(links: list[MqttLink]) -> None:
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=run_embedded_broker, args=("127.0.0.1", port, stop, ready))
    thread.start()
    try:
        assert ready.wait(10)
        link = connect(links, f"mqtt://127.0.0.1:{port}", "dev-1", "loop/back")
        wait_subscribed(link, "loop/back")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_taken_port_is_one_clear_line_and_exit_code_3(
    embedded_broker: EmbeddedBrokerProcess,
) -> None:
    port = embedded_broker.port
    result = subprocess.run(
        [sys.executable, "-m", "edgeops.broker", "--port", str(port)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == (
        f"edgeops broker: embedded MQTT broker cannot listen on 127.0.0.1:{port}: "
        "address already in use\n"
    )


def test_stop_reports_a_broker_that_died_on_its_own(
    embedded_broker: EmbeddedBrokerProcess,
) -> None:
    assert embedded_broker.pid is not None
    os.kill(embedded_broker.pid, signal.SIGKILL)
    time.sleep(0.5)

    with pytest.raises(BrokerError, match=r"had exited by itself with code -9"):
        embedded_broker.stop()


def test_stop_ends_the_child_cleanly() -> None:
    broker = EmbeddedBrokerProcess()
    broker.start()
    pid = broker.pid
    assert broker.running and pid is not None

    broker.stop()

    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
