"""Input from the network (acceptance): a malformed payload on any device topic is logged and
dropped; neither the agent nor the hub crashes, and both keep working afterwards.

A real agent (the ``edgeops-agent`` program, provisioned for trusted updates) and the real
hub side (its bridge over a SQLite database, and its fetch server on the release repository)
share a private Mosquitto. The test publishes garbage of every kind — not JSON, not an
object, another schema, wrong field types, NaN, absurd nesting, oversized payloads, frames
without a header, requests that try to leave the repository — on every topic the agent
subscribes to (``desired``, ``fetch/res``, ``cmd``) and every topic the hub subscribes to
(``state``, ``presence``, ``telemetry``, ``events``, ``fetch/req``). Afterwards the agent is
still running and counted what it dropped, the hub's threads are alive and counted theirs,
no private key left the repository, and a real update still goes through end to end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.fetch.wire import decode_response
from device_agent.link import Message, MqttLink
from device_agent.protocol import Channel, device_topic
from tests.fixtures.mqtt import wait_subscribed
from tests.fixtures.trust import AgentProcess, TrustHub, wait_for

DEVICE = "noisy"

GARBAGE: list[bytes] = [
    b"",
    b"\x00\xff\xfe\xfd binary",
    b"{not json",
    b"[]",
    b"null",
    b"42",
    b'"a string"',
    b'{"schema": 99, "type": "whatever"}',
    b'{"schema": 1}',
    b'{"schema": 1, "type": "nonsense", "device_id": 7}',
    b'{"schema": 1, "type": "state", "value": NaN}',
    b"[" * 100_000,  # nesting deep enough to exhaust a recursive parser
    b'{"a": "' + b"x" * 300_000 + b'"}',  # above the 256 KiB payload bound
]

DESIRED: list[dict[str, Any]] = [
    {"schema": 1, "type": "desired", "release": 5},
    {"schema": 1, "type": "desired", "release": {"target": 5}},
    {"schema": 1, "type": "desired", "release": {"target": "../../../etc/passwd"}},
    {"schema": 1, "type": "desired", "release": {"target": "a//b"}},
    {"schema": 1, "type": "desired", "release": {"target": "x" * 5000}},
    {"schema": 1, "type": "desired", "release": {"target": "no/such/target/model.tflite"}},
    {"schema": 1, "type": "desired", "challenger": 7},
    {"schema": 1, "type": "desired", "challenger": {"model_id": "m", "path": "/etc"}},
]

FETCH_RES: list[bytes] = [
    b"no header line at all",
    b"\n" + b"\x00" * 100,
    b'{"schema": 1, "type": "fetch_res"}\nbytes',
    b'{"schema":1,"type":"fetch_res","req_id":"feedbeef","path":"targets/x","offset":0,'
    b'"total":3,"status":"ok"}\nabc',  # answers nothing that was asked
    b'{"schema":1,"type":"fetch_res","req_id":"feedbeef","path":"metadata/root.json",'
    b'"offset":-5,"status":"ok","total":1}\n',
    b'{"schema":1,"type":"fetch_res","req_id":"feedbeef","path":"metadata/root.json",'
    b'"offset":0,"status":"not_found"}\nbytes where none may be',
    b'{"schema":1,"type":"fetch_res","req_id":"' + b"z" * 5000 + b'"}\n',
]

EVENTS: list[dict[str, Any]] = [
    {"schema": 1, "type": "event", "device_id": DEVICE, "seq": -1, "event": "update",
     "ts": 1.0, "detail": {}},
    {"schema": 1, "type": "event", "device_id": DEVICE, "seq": "one", "event": "update",
     "ts": 1.0, "detail": {}},
    {"schema": 1, "type": "event", "device_id": DEVICE, "seq": 10**6, "event": "update",
     "ts": 1.0, "detail": {"state": "x" * 500}},
    {"schema": 1, "type": "event", "device_id": "someone-else", "seq": 3, "event": "update",
     "ts": 1.0, "detail": {"state": "committed"}},
    {"schema": 1, "type": "event", "device_id": DEVICE, "seq": 4, "event": "update",
     "ts": 1.0, "detail": "not an object"},
]  # fmt: skip

STATES: list[dict[str, Any]] = [
    {"schema": 1, "type": "state", "device_id": DEVICE},
    {"schema": 1, "type": "state", "device_id": DEVICE, "agent_version": 3, "hardware": [],
     "ts": "now"},
    {"schema": 1, "type": "state", "device_id": "impostor", "agent_version": "1",
     "hardware": {}, "ts": 1.0},
    {"schema": 1, "type": "presence", "device_id": DEVICE, "online": "yes", "ts": 1.0},
    {"schema": 1, "type": "telemetry", "device_id": DEVICE, "seq": "x"},
]  # fmt: skip

FETCH_REQ: list[dict[str, Any]] = [
    {"schema": 1, "type": "fetch_req", "req_id": "r1", "path": "../keys/online/targets.pem",
     "offset": 0, "length": 100},
    {"schema": 1, "type": "fetch_req", "req_id": "r2",
     "path": "metadata/../../keys/online/targets.pem", "offset": 0, "length": 100},
    {"schema": 1, "type": "fetch_req", "req_id": "r3", "path": "/etc/passwd", "offset": 0,
     "length": 100},
    {"schema": 1, "type": "fetch_req", "req_id": "r4", "path": "metadata/root.json",
     "offset": -1, "length": 100},
    {"schema": 1, "type": "fetch_req", "req_id": "r5", "path": "metadata/root.json",
     "offset": 0, "length": 10**9},
    {"schema": 1, "type": "fetch_req", "req_id": "r6", "path": "metadata/root.json",
     "offset": 0, "length": 0},
    {"schema": 1, "type": "fetch_req", "req_id": "r7", "path": "keys/online/targets.pem",
     "offset": 0, "length": 100},
    {"schema": 1, "type": "fetch_req", "req_id": "r8", "path": "metadata/no-such.json",
     "offset": 0, "length": 100},
    {"schema": 1, "type": "fetch_req", "req_id": "r9" * 100, "path": "metadata/root.json",
     "offset": 0, "length": 100},
]  # fmt: skip


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def test_malformed_payloads_on_every_device_topic_are_dropped_and_nothing_crashes(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    hub = trust_hub
    server = hub.serve()
    old, new = hub.releases["old"], hub.releases["new"]
    champion = hub.bundle(old.path, tmp_path / "champion")
    agent = AgentProcess.provision(
        tmp_path / "devices",
        device_id=DEVICE,
        mqtt_url=hub.url,
        data_dir=tmp_path / "device-data",
        trust_root=hub.root_json,
        champion=champion,
        champion_target=old.path,
    )
    attacker = MqttLink(hub.endpoint, client_id="attacker")
    attacker.subscribe(device_topic(DEVICE, Channel.FETCH_RES))
    attacker.start(wait_s=10)
    agent.start()
    try:
        wait_for(lambda: agent.champion_id() == old.model_id, what="the agent runs release 1")
        wait_for(lambda: agent.health().get("status") == "connected", what="agent connected")
        wait_subscribed(attacker, device_topic(DEVICE, Channel.FETCH_RES))

        def send(channel: Channel, payloads: list[bytes], device: str = DEVICE) -> None:
            topic = device_topic(device, channel)
            for payload in payloads:
                assert attacker.publish(topic, payload, qos=1, wait_s=10), topic

        # the agent's topics
        send(Channel.DESIRED, GARBAGE + [_json(d) for d in DESIRED])
        send(Channel.FETCH_RES, GARBAGE + FETCH_RES)
        send(Channel.CMD, GARBAGE)
        # the hub's topics
        for channel in (Channel.STATE, Channel.PRESENCE, Channel.TELEMETRY, Channel.EVENTS):
            send(channel, GARBAGE)
        send(Channel.EVENTS, [_json(d) for d in EVENTS])
        send(Channel.STATE, [_json(d) for d in STATES])
        send(Channel.PRESENCE, [_json(d) for d in STATES])
        send(Channel.TELEMETRY, [_json(d) for d in STATES])
        send(Channel.FETCH_REQ, GARBAGE + [_json(d) for d in FETCH_REQ])
        attacker.publish("edgeops/v1/dev/bad id!/state", b"{}", qos=1, wait_s=10)
        attacker.publish("edgeops/v1/dev/x/no-such-channel", b"{}", qos=1, wait_s=10)
        time.sleep(2.0)  # let every receiver work through its inbox

        # the agent: alive, connected, counting what it dropped
        assert agent.running, agent.log_text()[-3000:]
        health = wait_for(
            lambda: (h := agent.health()).get("dropped_messages", {}).get("desired") and h,
            timeout=10,
            what="the agent's drop counters",
        )
        assert health["status"] == "connected"
        assert health["slots"]["champion"]["model_id"] == old.model_id
        wait_for(
            lambda: agent.update_state().get("state") in (None, "idle", "rolled_back"),
            timeout=20,
            what="the updater at rest (the unknown target refused)",
        )
        assert agent.pointer().get("active") == "a"
        logged = [r for r in agent.log_records() if "dropped" in str(r.get("msg", ""))]
        assert len(logged) >= len(GARBAGE), "the agent did not log what it dropped"

        # the hub: both threads alive, drops counted, no key bytes answered
        assert hub.bridge_alive
        dropped = hub.bridge.dispatcher.dropped
        for name in ("state", "presence", "telemetry", "events"):
            assert dropped[name] > 0, (name, dict(dropped))
        assert server._thread is not None and server._thread.is_alive()
        assert server.stats.dropped + server.stats.bad_request > 0
        mine = {str(d["req_id"]) for d in FETCH_REQ}
        answered: dict[str, str] = {}
        for event in _drain(attacker):
            if not isinstance(event, Message):
                continue
            assert b"PRIVATE KEY" not in event.payload
            try:
                header, _ = decode_response(event.payload)
            except ProtocolError:
                continue  # the garbage this test sent to the device's fetch/res itself
            if header.req_id in mine:
                answered[header.req_id] = header.status
        # every request that could be attributed was refused, none was served
        assert answered, "the fetch server answered none of the bad requests"
        assert "ok" not in answered.values(), answered

        # and everything still works: a real update, end to end
        hub.desire(DEVICE, new.path)
        wait_for(
            lambda: agent.update_state().get("state") == "committed",
            timeout=60,
            what="release 2 committed after the garbage",
        )
        wait_for(lambda: agent.champion_id() == new.model_id, timeout=10, what="new champion")
        wait_for(lambda: hub.update_state(DEVICE) == "committed", timeout=20, what="hub state")
    finally:
        attacker.stop()
        code = agent.stop()
    assert code == 0


def _drain(link: MqttLink) -> list[Any]:
    events = []
    while (event := link.get(timeout_s=0.2)) is not None:
        events.append(event)
    return events


def test_forged_answers_to_a_pending_fetch_are_dropped_and_the_download_goes_on(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    """While the device waits for a chunk (the hub holds the request back), frames that name
    the pending request id but answer something else — another path, another offset, no
    header, an error status with bytes, a header that is not an object — are dropped by the
    fetcher; the real answer then completes the download and the update commits."""
    from device_agent.fetch.wire import decode_request
    from tests.test_update_resume import GATE, GatedServer

    hub = trust_hub
    old, new = hub.releases["old"], hub.releases["new"]
    gated = GatedServer(hub.repository.repository_dir, hub.endpoint, gate=GATE, client_id="hub")
    gated.start()
    sniffer = MqttLink(hub.endpoint, client_id="sniffer")
    sniffer.subscribe(device_topic(DEVICE, Channel.FETCH_REQ))
    sniffer.start(wait_s=10)
    agent = AgentProcess.provision(
        tmp_path / "devices",
        device_id=DEVICE,
        mqtt_url=hub.url,
        data_dir=tmp_path / "device-data",
        trust_root=hub.root_json,
        champion=hub.bundle(old.path, tmp_path / "champion"),
        champion_target=old.path,
    )
    agent.start()
    try:
        wait_for(lambda: agent.champion_id() == old.model_id, what="the agent runs release 1")
        hub.desire(DEVICE, new.path)
        wait_for(lambda: gated.held > 0, timeout=60, what="the request held at the gate")
        pending = None
        while (event := sniffer.get(timeout_s=5)) is not None:
            if isinstance(event, Message):
                request = decode_request(event.payload)
                if request.path.startswith("targets/") and request.offset == GATE:
                    pending = request
                    break
        assert pending is not None, "the pending target request was not seen"
        rid, path = pending.req_id, pending.path
        forged = [
            f'{{"schema":1,"type":"fetch_res","req_id":"{rid}","path":"metadata/root.json",'
            f'"offset":{GATE},"total":{new.length},"status":"ok"}}\nxyz'.encode(),
            f'{{"schema":1,"type":"fetch_res","req_id":"{rid}","path":"{path}",'
            f'"offset":0,"total":{new.length},"status":"ok"}}\nxyz'.encode(),
            f'{{"schema":1,"type":"fetch_res","req_id":"{rid}","path":"{path}",'
            f'"offset":{GATE},"status":"error"}}\nbytes'.encode(),
            f'["schema",1,"{rid}"]\n'.encode(),
            f'{{"schema":2,"type":"fetch_res","req_id":"{rid}"}}\n'.encode(),
            b"\xff" * 64,
        ]
        topic = device_topic(DEVICE, Channel.FETCH_RES)
        for frame in forged:
            assert sniffer.publish(topic, frame, qos=1, wait_s=10)
        time.sleep(1.0)
        assert agent.running
        assert agent.update_state().get("state") == "downloading"
        gated.open()
        wait_for(
            lambda: agent.update_state().get("state") == "committed",
            timeout=60,
            what="release 2 committed after the forged answers",
        )
        wait_for(lambda: agent.champion_id() == new.model_id, timeout=10, what="new champion")
        logged = [r for r in agent.log_records() if "dropped" in str(r.get("msg", ""))]
        assert len(logged) >= len(forged), [r["msg"] for r in logged]
    finally:
        sniffer.stop()
        code = agent.stop()
        gated.stop()
    assert code == 0
