"""The wire protocol: topics, documents, and what malformed input gets."""

from __future__ import annotations

import json

import pytest

from device_agent.dispatch import Dispatcher
from device_agent.errors import ProtocolError
from device_agent.link import Message
from device_agent.protocol import (
    SCHEMA_VERSION,
    Channel,
    Document,
    Presence,
    StateReport,
    decode,
    device_topic,
    encode,
    parse_topic,
    subscription,
)


def test_topic_tree_round_trips() -> None:
    topic = device_topic("dev-1", Channel.FETCH_REQ)
    assert topic == "edgeops/v1/dev/dev-1/fetch/req"
    assert parse_topic(topic) == ("dev-1", Channel.FETCH_REQ)
    assert subscription(Channel.STATE) == "edgeops/v1/dev/+/state"


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "x" * 64, "-lead", "sp ace"])
def test_device_ids_that_cannot_be_topic_levels_are_refused(device_id: str) -> None:
    with pytest.raises(ProtocolError, match="device id"):
        device_topic(device_id, Channel.STATE)


@pytest.mark.parametrize(
    "topic", ["other/v1/dev/a/state", "edgeops/v1/dev/a/unknown", "edgeops/v1/dev/a+b/state"]
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


def test_retained_channels() -> None:
    assert {c for c in Channel if c.retained} == {Channel.STATE, Channel.PRESENCE, Channel.DESIRED}


def test_state_report_round_trips_and_keeps_unknown_fields() -> None:
    report = StateReport("dev-1", "9.9.9", hardware={"arch": "armv7l"}, free_memory_bytes=1024)
    wire = json.loads(encode(report))
    assert wire["schema"] == SCHEMA_VERSION and wire["type"] == "state"
    wire["future_field"] = {"nested": [1, 2]}
    again = decode(Channel.STATE, json.dumps(wire).encode())
    assert isinstance(again, StateReport)
    assert again.hardware == {"arch": "armv7l"} and again.free_memory_bytes == 1024
    assert again.to_dict() == wire


def test_presence_round_trips() -> None:
    presence = Presence("dev-2", online=False, ts=12.5)
    assert decode(Channel.PRESENCE, encode(presence)) == presence


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"{not json", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"schema": 2, "type": "presence"}', "schema is 2"),
        (b'{"schema": 1, "type": "state"}', "type 'state', expected 'presence'"),
        (
            b'{"schema": 1, "type": "presence", "online": true, "ts": 1}',
            "missing field 'device_id'",
        ),
        (
            b'{"schema": 1, "type": "presence", "device_id": "d", "online": "yes", "ts": 1}',
            "'online' must be bool",
        ),
        (b"x" * 300_000, "exceeds"),
        (b"[" * 50_000 + b"]" * 50_000, "not valid UTF-8 JSON"),  # nesting past the limit
        (b'{"schema": 1, "type": "presence", "device_id": "d", "online": true, "ts": NaN}', "NaN"),
    ],
)
def test_malformed_payloads_raise_protocol_error_naming_the_problem(
    payload: bytes, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(Channel.PRESENCE, payload)


def test_dispatcher_counts_and_drops_malformed_messages() -> None:
    seen: list[tuple[str, Document]] = []
    dispatcher = Dispatcher()
    dispatcher.on(Channel.PRESENCE, lambda device_id, doc: seen.append((device_id, doc)))
    good = Message(device_topic("d1", Channel.PRESENCE), encode(Presence("d1", True)), 1, True)
    spoofed = Message(device_topic("d2", Channel.PRESENCE), encode(Presence("d1", True)), 1, False)
    garbage = Message(device_topic("d1", Channel.PRESENCE), b"{oops", 1, False)
    unhandled = Message(device_topic("d1", Channel.EVENTS), b"{}", 1, False)
    bad_topic = Message("edgeops/v1/dev/d1/nope", b"{}", 1, False)
    results = [dispatcher.dispatch(m) for m in (good, spoofed, garbage, unhandled, bad_topic)]
    assert results == [True, False, False, False, False]
    assert [device_id for device_id, _ in seen] == ["d1"]
    assert dispatcher.dropped == {"presence": 2, "events": 1, "topic": 1}


def test_cleared_retained_message_is_not_malformed() -> None:
    dispatcher = Dispatcher()
    dispatcher.on(Channel.STATE, lambda device_id, doc: None)
    assert dispatcher.dispatch(Message(device_topic("d1", Channel.STATE), b"", 1, True))
    assert not dispatcher.dropped
