"""Resume (acceptance): a download interrupted by a broker outage, or by a power cut of the
device, goes on from the offset it reached; bytes already received are not sent again.

The hub's fetch server here records every request it reads and holds back (does not answer)
target requests at or past a gate offset, so the interruption falls exactly in the middle of
the download: the first 64 KiB chunk of release 2 (about 98 KB) has arrived, the request for
the second is pending. Then either the private Mosquitto is stopped and started again, or the
agent is killed (-9) and restarted; the gate opens; the download must finish from that offset
(the server never reads the first chunk again) and the update must commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.errors import ProtocolError
from device_agent.fetch.wire import decode_request
from edgeops.trust import FetchServer
from tests.fixtures.trust import AgentProcess, TrustHub, replays_test_vectors, wait_for

GATE = 64 * 1024


class GatedServer(FetchServer):
    """The hub's fetch server, recording requests and holding target requests at or past
    ``gate`` until :meth:`open`."""

    def __init__(self, *args: object, gate: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate: int | None = gate
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str, int, int]] = []  # (time, path, offset, length)
        self.answered: list[tuple[float, str, int, int]] = []  # target chunks answered
        self.held = 0

    def open(self) -> None:
        with self.lock:
            self.gate = None

    def handle(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        try:
            request = decode_request(payload)
        except ProtocolError:
            return super().handle(topic, payload)
        now = time.monotonic()
        target = request.path.startswith("targets/")
        with self.lock:
            self.requests.append((now, request.path, request.offset, request.length))
            if target and self.gate is not None and request.offset >= self.gate:
                self.held += 1
                return None
        answer = super().handle(topic, payload)
        if target and answer is not None:
            header_end = answer[1].index(b"\n")
            with self.lock:
                self.answered.append(
                    (now, request.path, request.offset, len(answer[1]) - header_end - 1)
                )
        return answer

    def target_answers(self) -> list[tuple[float, str, int, int]]:
        with self.lock:
            return list(self.answered)


@pytest.fixture
def gated(trust_hub: TrustHub) -> Iterator[GatedServer]:
    server = GatedServer(
        trust_hub.repository.repository_dir, trust_hub.endpoint, gate=GATE, client_id="hub-fetch"
    )
    server.start()
    yield server
    server.stop()


def _device(hub: TrustHub, tmp_path: Path, device_id: str) -> AgentProcess:
    old = hub.releases["old"]
    return AgentProcess.provision(
        tmp_path / "devices",
        device_id=device_id,
        mqtt_url=hub.url,
        data_dir=tmp_path / "device-data",
        trust_root=hub.root_json,
        champion=hub.bundle(old.path, tmp_path / f"{device_id}-champion"),
        champion_target=old.path,
    )


def _stalled_at_the_gate(hub: TrustHub, gated: GatedServer, agent: AgentProcess) -> Path:
    """Start the agent, ask for release 2 and wait until half of it is on the device's disk;
    the partial file."""
    agent.start()
    wait_for(lambda: agent.champion_id() == hub.releases["old"].model_id, what="release 1 runs")
    hub.desire(agent.device_id, hub.releases["new"].path)
    wait_for(lambda: gated.held > 0, timeout=60, what="the request past the gate")
    partial_dir = agent.state_dir / "update" / "partial"
    partials = wait_for(
        lambda: [p for p in partial_dir.glob("*.part") if p.stat().st_size == GATE],
        timeout=10,
        what="the first chunk on disk",
    )
    assert agent.update_state().get("state") == "downloading"
    return Path(partials[0])


def _finished_from_the_gate(
    hub: TrustHub, gated: GatedServer, agent: AgentProcess, opened_at: float
) -> None:
    new = hub.releases["new"]
    wait_for(
        lambda: agent.update_state().get("state") == "committed",
        timeout=60,
        what="release 2 committed",
    )
    wait_for(lambda: agent.champion_id() == new.model_id, timeout=10, what="release 2 runs")
    replays_test_vectors(agent.active_slot())
    answers = [a for a in gated.target_answers() if a[1].endswith(".model.tflite")]
    before = [a for a in answers if a[0] < opened_at]
    after = [a for a in answers if a[0] >= opened_at]
    # before the interruption: exactly the first chunk; after it: only bytes past it
    assert [(a[2], a[3]) for a in before] == [(0, GATE)], before
    assert after and all(a[2] == GATE for a in after), after
    assert {a[3] for a in after} == {new.length - GATE}, after
    served_from_zero = [a for a in answers if a[2] == 0]
    assert len(served_from_zero) == 1, "the first chunk was sent again"
    # every target byte crossed the wire once, except repeated answers to re-sent requests
    # for the second chunk (identical requests queued during the outage)
    assert sum(a[3] for a in before) + after[0][3] == new.length


def test_a_broker_outage_mid_download_resumes_from_the_offset(
    trust_hub: TrustHub, gated: GatedServer, tmp_path: Path
) -> None:
    agent = _device(trust_hub, tmp_path, "outage")
    try:
        partial = _stalled_at_the_gate(trust_hub, gated, agent)
        trust_hub.mosquitto.stop()
        time.sleep(3.0)  # the device notices, keeps its partial file and asks again meanwhile
        assert agent.running
        assert agent.update_state().get("state") == "downloading"
        assert partial.stat().st_size == GATE
        trust_hub.mosquitto.start()
        opened_at = time.monotonic()
        gated.open()
        _finished_from_the_gate(trust_hub, gated, agent, opened_at)
        # one download, never restarted: no retry transition, no second start
        transitions = [e for e in trust_hub.events(agent.device_id) if e["state"] == "downloading"]
        assert len(transitions) == 1, transitions
    finally:
        code = agent.stop()
    assert code == 0


def test_a_power_cut_mid_download_resumes_from_the_partial_file(
    trust_hub: TrustHub, gated: GatedServer, tmp_path: Path
) -> None:
    agent = _device(trust_hub, tmp_path, "cut-mid")
    try:
        partial = _stalled_at_the_gate(trust_hub, gated, agent)
        agent.kill9()
        assert partial.stat().st_size == GATE
        opened_at = time.monotonic()
        gated.open()
        agent.start()
        _finished_from_the_gate(trust_hub, gated, agent, opened_at)
        resumed = [r for r in agent.log_records() if "resuming" in str(r.get("msg", ""))]
        assert resumed and str(GATE) in resumed[0]["msg"], resumed
    finally:
        code = agent.stop()
    assert code == 0
