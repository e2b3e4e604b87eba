"""The MQTT link, against a real private Mosquitto running the configuration EdgeOps ships."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.errors import ConfigError, LinkError
from device_agent.link import (
    Backoff,
    Connected,
    Disconnected,
    LinkEvent,
    Message,
    MqttEndpoint,
    MqttLink,
    TlsFiles,
    Will,
)
from device_agent.protocol import Channel, Presence, StateReport, decode, device_topic, encode
from edgeops.broker import MosquittoProcess, TlsListener, free_port, render_config
from edgeops.broker.mosquitto import SHIPPED_CONFIG
from edgeops.errors import BrokerError
from tests.fixtures.mqtt import PROBE, messages, next_message, wait_subscribed
from tests.pki import Pki, make_pki

FAST = Backoff(initial_s=0.1, maximum_s=1.0)


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    """Links a test creates; each is stopped at the end."""
    created: list[MqttLink] = []
    yield created
    for link in created:
        link.stop()


def connect(
    links: list[MqttLink],
    url: str,
    client_id: str,
    *subscriptions: str,
    will: Will | None = None,
    tls: TlsFiles | None = None,
) -> MqttLink:
    """A started link (fast backoff) with ``subscriptions`` declared before it connects."""
    link = MqttLink(MqttEndpoint.parse(url), client_id, will=will, tls=tls, backoff=FAST)
    links.append(link)
    for topic_filter in subscriptions:
        link.subscribe(topic_filter)
    link.start(wait_s=10)
    return link


def next_event(link: MqttLink, kind: type[LinkEvent], timeout_s: float = 10.0) -> LinkEvent:
    event = link.get(timeout_s)
    while event is not None and not isinstance(event, kind):
        event = link.get(timeout_s)
    assert isinstance(event, kind), f"no {kind.__name__} event within {timeout_s} s"
    return event


def presence(device_id: str, online: bool) -> bytes:
    return encode(Presence(device_id=device_id, online=online))


def decode_presence(payload: bytes) -> Presence:
    document = decode(Channel.PRESENCE, payload)
    assert isinstance(document, Presence)
    return document


# -- connecting and subscribing ---------------------------------------------------------------


def test_declared_subscriptions_are_issued_on_connect(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    hub = connect(links, mosquitto_url, "hub", "edgeops/v1/dev/+/state")
    connected = next_event(hub, Connected)
    assert connected == Connected(session_present=False)
    wait_subscribed(hub, "edgeops/v1/dev/probe/state")

    device = connect(links, mosquitto_url, "dev-1")
    device.publish(device_topic("dev-1", Channel.STATE), b"{}", wait_s=5)

    message = next_message(hub, device_topic("dev-1", Channel.STATE))
    assert message is not None
    assert (message.payload, message.qos, message.retain) == (b"{}", 1, False)


def test_subscription_declared_while_connected_is_issued_at_once(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    hub = connect(links, mosquitto_url, "hub")
    hub.subscribe("late/topic")
    wait_subscribed(hub, "late/topic")


def test_subscriptions_survive_a_broker_restart(
    mosquitto: MosquittoProcess, links: list[MqttLink]
) -> None:
    hub = connect(links, mosquitto.url, "hub", "edgeops/v1/dev/+/events")
    device = connect(links, mosquitto.url, "dev-1")
    topic = device_topic("dev-1", Channel.EVENTS)
    wait_subscribed(hub, topic)

    mosquitto.restart()  # same port, same data directory

    # both links notice, and reconnect by themselves with backoff
    next_event(hub, Disconnected)
    assert next_event(hub, Connected, timeout_s=30) == Connected(session_present=False)
    assert device.wait_connected(30)
    wait_subscribed(hub, topic)  # re-issued in on_connect, nobody called subscribe() again
    device.publish(topic, b"after-restart", wait_s=5)
    assert [m.payload for m in messages(hub, topic, 2.0) if m.payload != PROBE] == [
        b"after-restart"
    ]
    assert (hub.stats.connects, hub.stats.disconnects) == (2, 1)


# -- last will and retained messages ----------------------------------------------------------


def test_last_will_marks_a_vanished_device_offline_and_is_retained(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    topic = device_topic("dev-1", Channel.PRESENCE)
    hub = connect(links, mosquitto_url, "hub", topic)
    will = Will(topic, presence("dev-1", online=False))
    device = connect(links, mosquitto_url, "dev-1", will=will)
    device.publish(topic, presence("dev-1", online=True), retain=True, wait_s=5)
    online = next_message(hub, topic)
    assert online is not None and decode_presence(online.payload).online

    device.abort()  # the TCP connection drops without DISCONNECT, as in a power cut

    offline = next_message(hub, topic)
    assert offline is not None and offline.payload == will.payload
    assert decode_presence(offline.payload).online is False
    late = connect(links, mosquitto_url, "late", topic)
    retained = next_message(late, topic)
    assert retained is not None
    assert (retained.payload, retained.retain) == (will.payload, True)


def test_last_will_is_not_published_on_a_clean_stop(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    topic = device_topic("dev-1", Channel.PRESENCE)
    hub = connect(links, mosquitto_url, "hub", topic)
    device = connect(links, mosquitto_url, "dev-1", will=Will(topic, presence("dev-1", False)))
    online = presence("dev-1", online=True)
    device.publish(topic, online, retain=True, wait_s=5)
    assert next_message(hub, topic) is not None

    device.stop()  # DISCONNECT first: the broker discards the will

    assert messages(hub, topic, within_s=2.0) == []
    late = connect(links, mosquitto_url, "late", topic)
    retained = next_message(late, topic)
    assert retained is not None
    assert (retained.payload, retained.retain) == (online, True)


def test_retained_state_reaches_a_late_subscriber(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    state = encode(StateReport(device_id="dev-1", agent_version="0.1.0"))
    device = connect(links, mosquitto_url, "dev-1")
    assert device.publish(device_topic("dev-1", Channel.STATE), state, retain=True, wait_s=5)

    late = connect(links, mosquitto_url, "hub", "edgeops/v1/dev/+/state")

    message = next_message(late, device_topic("dev-1", Channel.STATE))
    assert message is not None
    assert (message.payload, message.retain) == (state, True)


# -- throughput: nothing is dropped -----------------------------------------------------------


def test_every_qos1_message_of_a_burst_arrives_with_the_shipped_config(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    count = 5000
    hub = connect(links, mosquitto_url, "hub", "edgeops/v1/dev/+/telemetry")
    topic = device_topic("dev-1", Channel.TELEMETRY)
    wait_subscribed(hub, topic)
    device = connect(links, mosquitto_url, "dev-1")

    for seq in range(count):
        device.publish(topic, b"%d" % seq)

    received: set[int] = set()
    while len(received) < count:
        message = next_message(hub, topic, timeout_s=60)
        assert message is not None, f"only {len(received)} of {count} messages arrived"
        if message.payload != PROBE:
            received.add(int(message.payload))
    assert received == set(range(count))
    assert hub.stats.disconnects == 0 and device.stats.disconnects == 0


# -- failures name their cause ----------------------------------------------------------------


def test_unreachable_broker_is_a_link_error_naming_the_broker() -> None:
    port = free_port()  # nothing listens there
    link = MqttLink(MqttEndpoint.parse(f"mqtt://127.0.0.1:{port}"), "dev-1", backoff=FAST)

    with pytest.raises(LinkError) as caught:
        link.start(wait_s=1.0)

    assert str(caught.value) == (
        f"cannot connect to MQTT broker mqtt://127.0.0.1:{port}: "
        "connection refused (is the broker running?)"
    )


@pytest.mark.parametrize("url", ["http://broker:1883", "broker:1883", "ws://broker"])
def test_a_url_with_a_wrong_scheme_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="scheme must be mqtt:// or mqtts://"):
        MqttEndpoint.parse(url)


# -- reconnect backoff ------------------------------------------------------------------------


def test_backoff_grows_by_its_factor_until_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, maximum_s=30.0, factor=2.0, jitter=0.0)
    delays = [backoff.delay(attempt, random.Random(0)) for attempt in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert backoff.delay(10_000, random.Random(0)) == 30.0  # no overflow for huge attempts


def test_backoff_jitter_spreads_delays_below_the_nominal_value() -> None:
    backoff = Backoff(initial_s=1.0, maximum_s=30.0, factor=2.0, jitter=0.5)
    rng = random.Random(42)
    delays = [backoff.delay(3, rng) for _ in range(200)]
    assert all(4.0 <= delay <= 8.0 for delay in delays)  # [(1 - jitter) * 8, 8]
    assert len(set(delays)) == len(delays)  # a fleet does not reconnect in lock-step
    assert max(delays) - min(delays) > 3.0
    again = random.Random(42)
    assert [backoff.delay(3, again) for _ in range(200)] == delays  # seeded: reproducible


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, and an unrelated CA."""
    return make_pki(tmp_path)


@pytest.fixture
def tls_mosquitto(tmp_path: Path, pki: Pki) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(
        tmp_path / "mosquitto-tls", tls=TlsListener(pki.cert_file, pki.key_file)
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.mosquitto
def test_tls_connection_verified_with_the_ca_file(
    tls_mosquitto: MosquittoProcess, pki: Pki, links: list[MqttLink]
) -> None:
    assert tls_mosquitto.tls_url.startswith("mqtts://127.0.0.1:")
    link = connect(links, tls_mosquitto.tls_url, "dev-1", "tls/echo", tls=TlsFiles(pki.ca_file))
    assert link.endpoint.tls
    wait_subscribed(link, "tls/echo")  # a full round trip over TLS


@pytest.mark.mosquitto
def test_tls_with_a_ca_that_did_not_sign_the_broker_is_a_clear_link_error(
    tls_mosquitto: MosquittoProcess, pki: Pki
) -> None:
    link = MqttLink(
        MqttEndpoint.parse(tls_mosquitto.tls_url),
        "dev-1",
        tls=TlsFiles(pki.other_ca_file),
        backoff=FAST,
    )

    with pytest.raises(LinkError) as caught:
        link.start(wait_s=2.0)

    message = str(caught.value)
    assert message.startswith(f"cannot connect to MQTT broker {tls_mosquitto.tls_url}: ")
    assert message.endswith(
        f"TLS certificate of the broker not accepted with CA file {pki.other_ca_file}: "
        "unable to get local issuer certificate"
    )


# -- the private broker these tests run on ----------------------------------------------------


def test_private_broker_config_is_the_shipped_one_but_for_address_and_data_dir(
    tmp_path: Path,
) -> None:
    shipped = SHIPPED_CONFIG.read_text().splitlines()
    rendered = render_config(41883, tmp_path).splitlines()

    assert "listener 41883 127.0.0.1" in rendered
    assert f"persistence_location {tmp_path.resolve()}/" in rendered
    changed = {"listener", "persistence_location"}
    kept = [line for line in shipped if line and line.split(" ", 1)[0] not in changed]
    assert [line for line in rendered if line in kept] == kept  # every tuned line, in order
    for tuned in ("set_tcp_nodelay true", "max_queued_messages 100000", "max_queued_bytes 0"):
        assert tuned in rendered
    assert not any(line.startswith("pid_file") for line in rendered)


def test_missing_mosquitto_binary_is_a_clear_broker_error(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path, binary=tmp_path / "no-such-mosquitto")
    with pytest.raises(BrokerError, match="no-such-mosquitto does not exist or is not executable"):
        broker.start()


def test_broker_that_cannot_listen_fails_with_the_tail_of_its_log(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    second = MosquittoProcess(tmp_path / "second", port=mosquitto.port)
    with pytest.raises(BrokerError) as caught:
        second.start()
    message = str(caught.value)
    assert message.startswith(f"Mosquitto failed to start on 127.0.0.1:{mosquitto.port}")
    assert "Error: Address already in use" in message


# -- routed topics and nudges -----------------------------------------------------------------


def test_a_routed_topic_goes_to_its_handler_not_the_inbox(
    mosquitto_url: str, links: list[MqttLink]
) -> None:
    routed_topic = "edgeops/v1/dev/dev-1/fetch/resp"
    other_topic = device_topic("dev-1", Channel.EVENTS)
    received: queue.Queue[tuple[bytes, str]] = queue.Queue()
    device = MqttLink(MqttEndpoint.parse(mosquitto_url), "dev-1", backoff=FAST)
    links.append(device)
    device.route(
        routed_topic, lambda payload: received.put((payload, threading.current_thread().name))
    )
    device.subscribe(routed_topic)
    device.subscribe(other_topic)
    device.start(wait_s=10)
    wait_subscribed(device, other_topic)
    sender = connect(links, mosquitto_url, "sender")

    sender.publish(routed_topic, b"chunk-1", wait_s=5)
    sender.publish(other_topic, b"event-1", wait_s=5)

    payload, thread_name = received.get(timeout=10)
    assert payload == b"chunk-1"
    assert thread_name != threading.current_thread().name  # paho's network thread
    # the inbox holds the other topic's message only: the routed one never reaches it
    inbox = messages(device, "edgeops/v1/dev/dev-1/", within_s=1.0)
    assert [(m.topic, m.payload) for m in inbox] == [(other_topic, b"event-1")]
    assert received.empty()


def test_a_failing_route_handler_drops_its_message_and_the_link_keeps_working(
    mosquitto_url: str, links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    routed_topic = "edgeops/v1/dev/dev-1/fetch/resp"
    other_topic = device_topic("dev-1", Channel.EVENTS)
    calls: queue.Queue[bytes] = queue.Queue()

    def handler(payload: bytes) -> None:
        calls.put(payload)
        if payload == b"bad":
            raise ValueError("handler broke")

    device = MqttLink(MqttEndpoint.parse(mosquitto_url), "dev-1", backoff=FAST)
    links.append(device)
    device.route(routed_topic, handler)
    device.subscribe(routed_topic)
    device.subscribe(other_topic)
    device.start(wait_s=10)
    wait_subscribed(device, other_topic)
    sender = connect(links, mosquitto_url, "sender")

    with caplog.at_level(logging.ERROR, logger="device_agent.link"):
        sender.publish(routed_topic, b"bad", wait_s=5)
        assert calls.get(timeout=10) == b"bad"
        sender.publish(other_topic, b"after", wait_s=5)
        sender.publish(routed_topic, b"good", wait_s=5)

        message = next_message(device, other_topic)
        assert message is not None and message.payload == b"after"
        assert calls.get(timeout=10) == b"good"

    assert device.connected
    assert device.stats.disconnects == 0
    failures = [r for r in caplog.records if r.name == "device_agent.link"]
    assert [r.getMessage() for r in failures] == [
        f"handler for {routed_topic} failed; message dropped"
    ]
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is ValueError
    # neither routed payload went to the inbox, whether its handler failed or not
    assert messages(device, routed_topic, within_s=0.5) == []


def test_nudge_wakes_a_blocked_get_which_returns_none() -> None:
    endpoint = MqttEndpoint.parse(f"mqtt://127.0.0.1:{free_port()}")
    link = MqttLink(endpoint, "dev-1", backoff=FAST)  # never started: no event can come
    results: queue.Queue[LinkEvent | None] = queue.Queue()
    waiting = threading.Thread(target=lambda: results.put(link.get(timeout_s=120)))
    waiting.start()

    link.nudge()

    waiting.join(timeout=60)
    assert not waiting.is_alive(), "get() was not woken by nudge()"
    assert results.get_nowait() is None


def wait_received(link: MqttLink, count: int) -> None:
    """Wait until ``link`` has received ``count`` messages in all (queued, not yet read)."""
    deadline = time.monotonic() + 10
    while link.stats.messages_in < count:
        assert time.monotonic() < deadline, f"{link.client_id} did not receive {count} messages"
        time.sleep(0.01)


def test_nudges_never_come_out_of_get_or_events(mosquitto_url: str, links: list[MqttLink]) -> None:
    topic = device_topic("dev-1", Channel.EVENTS)
    hub = connect(links, mosquitto_url, "hub", topic)
    wait_subscribed(hub, topic)
    device = connect(links, mosquitto_url, "dev-1")
    received = hub.stats.messages_in

    hub.nudge()  # first in the inbox, then a message
    device.publish(topic, b"0", wait_s=5)
    wait_received(hub, received + 1)
    assert hub.get(timeout_s=10) is None  # the nudge: None, not the nudge object
    message = hub.get(timeout_s=10)
    assert isinstance(message, Message) and message.payload == b"0"

    for payload in (b"1", b"2"):
        device.publish(topic, payload, wait_s=5)
    wait_received(hub, received + 3)
    hub.nudge()  # between the messages
    device.publish(topic, b"3", wait_s=5)
    seen: list[LinkEvent] = []
    for _ in range(2):  # a nudge ends an events() run like an empty inbox: call again
        seen.extend(hub.events(timeout_s=2.0))
    assert all(isinstance(event, Message) for event in seen)
    assert [e.payload for e in seen if isinstance(e, Message)] == [b"1", b"2", b"3"]
