"""The power-cut matrix (acceptance): kill -9 the agent in every updater state and at random
byte offsets of a download; after a restart the device runs the old or the new model — never
none, never a half-written one — and the hub shows the final state.

One device and one repository serve the whole matrix (to keep it quick). The repository holds
release 1 and release 2 (digits MLPs of about 98 KB) and a release 3 whose card's test
vectors do not match its model, so its smoke test fails and the update rolls back (the path
through ``rolling_back`` and ``rolled_back``). The hub's fetch server answers in chunks of at
most 8 KiB here, so a cut at a random byte offset lands in one of a dozen places in the file
rather than at the two 64 KiB chunk boundaries.

Each cut: the desired release names the other release (or release 3), the agent starts with
one failpoint armed (``EDGEOPS_AGENT_FAILPOINTS``: ``updater.enter:<state>``,
``updater.after:<state>``, ``updater.switched`` or ``fetch.bytes:<N>``) and must die by
SIGKILL there; it is started again without failpoints and must come to rest with the active
slot's model running as champion; that slot must load and reproduce its card's test
vectors, name release 1 or release 2 (release 3 never), and the hub's recorded update state
must equal the device's. 15 state cuts and 36 byte cuts: 51 in all.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from device_agent.fetch.wire import FetchRequest
from edgeops.trust import FetchServer
from tests.fixtures.trust import (
    AgentProcess,
    Forger,
    TrustHub,
    edit_card,
    replays_test_vectors,
    wait_for,
)

DEVICE = "cut"
SMALL_CHUNK = 8 * 1024
BYTE_CUTS = 36
SEED = 20261127
AT_REST = ("idle", "committed", "rolled_back")

HAPPY_CUTS = [
    "updater.enter:downloading",
    "updater.after:downloading",
    "updater.enter:verifying",
    "updater.after:verifying",
    "updater.enter:installing",
    "updater.after:installing",
    "updater.enter:testing",
    "updater.after:testing",
    "updater.switched",
    "updater.enter:committed",
    "updater.after:committed",
]
FAILING_CUTS = [
    "updater.enter:rolling_back",
    "updater.after:rolling_back",
    "updater.enter:rolled_back",
    "updater.after:rolled_back",
]


class SmallChunkServer(FetchServer):
    """The hub's fetch server, answering at most ``SMALL_CHUNK`` bytes per request (the
    fetcher goes on from the offset it reached, as after any short answer)."""

    def answer(self, request: FetchRequest) -> bytes:
        return super().answer(dataclasses.replace(request, length=min(request.length, SMALL_CHUNK)))


@dataclasses.dataclass
class Matrix:
    hub: TrustHub
    agent: AgentProcess
    targets: dict[str, str]  # "old"/"new"/"bad" -> target path
    model_ids: dict[str, str]  # target path -> model id (good releases only)
    cuts: int = 0

    def other(self) -> str:
        """The good release the device does not run."""
        active = self.agent.active_target()
        return self.targets["new"] if active == self.targets["old"] else self.targets["old"]

    def cut(self, failpoint: str, target: str) -> None:
        """Desire ``target``, run the agent until ``failpoint`` kills it, restart, check."""
        agent = self.agent
        before = agent.active_target()
        self.hub.desire(DEVICE, target)
        agent.start(failpoints=f"{failpoint}=kill")
        try:
            code = agent.wait_exit(timeout=60)
        except Exception:
            agent.kill9()
            raise AssertionError(
                f"failpoint {failpoint} was not reached; update state {agent.update_state()}"
            ) from None
        assert code == -signal.SIGKILL, f"{failpoint}: exit {code}\n{agent.log_text()[-3000:]}"
        self.cuts += 1
        agent.start()
        try:
            self.check_recovered(failpoint, before, target)
        finally:
            agent.kill9()  # at rest: one more cut, with nothing in flight
        assert "Traceback" not in agent.log_text(), agent.log_text()[-3000:]

    def check_recovered(self, failpoint: str, before: str | None, target: str) -> None:
        agent = self.agent
        state = wait_for(
            lambda: (
                (s := agent.update_state()).get("state") in AT_REST
                and agent.champion_id() is not None
                and agent.champion_id() == self.model_ids.get(str(agent.active_target()))
                and s
            ),
            timeout=60,
            what=f"the device at rest after a cut at {failpoint}",
        )
        active = agent.active_target()
        assert active in (before, target), (failpoint, before, target, active)
        assert active != self.targets["bad"], f"{failpoint}: release 3 was activated"
        replays_test_vectors(agent.active_slot())
        if target != self.targets["bad"]:
            # a good release the device was asked for ends committed, whatever the cut
            assert state["state"] == "committed" and active == target, (failpoint, state)
        else:
            assert state["state"] == "rolled_back" and active == before, (failpoint, state)
        wait_for(
            lambda: self.hub.update_state(DEVICE) == state["state"],
            timeout=20,
            what=f"the hub shows {state['state']} after a cut at {failpoint} "
            f"(it shows {self.hub.update_state(DEVICE)})",
        )


def _bad_release(hub: TrustHub, name: str) -> str:
    """Release 2's bytes as a third release whose card expects other outputs (signed by the
    hub as usual: only the device's smoke test can tell)."""
    new = hub.releases["new"]
    forger = Forger(hub.repository.repository_dir)
    data = forger.target_file(new.path).read_bytes()
    custom = copy.deepcopy(forger.load("targets").signed.targets[new.path].custom)

    def wrong_outputs(card: dict[str, Any]) -> None:
        for vector in card["test_vectors"]:
            vector["expected_output"] = [[0.1] * len(vector["expected_output"][0])]

    edit_card(custom, wrong_outputs)
    path = f"{name}/3/litert/model.tflite"
    hub.repository.add_target(path, data, custom)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_power_cuts_in_every_state_and_mid_download_leave_a_whole_model(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    hub = trust_hub
    old, new = hub.releases["old"], hub.releases["new"]
    name = old.path.split("/", 1)[0]
    bad = _bad_release(hub, name)
    server = SmallChunkServer(hub.repository.repository_dir, hub.endpoint, client_id="hub-fetch")
    server.start()
    agent = AgentProcess.provision(
        tmp_path / "devices",
        device_id=DEVICE,
        mqtt_url=hub.url,
        data_dir=tmp_path / "device-data",
        trust_root=hub.root_json,
        champion=hub.bundle(old.path, tmp_path / "champion"),
        champion_target=old.path,
        # the health window after activation: no source feeds the champion here, so it
        # checks only that the new model stayed champion; a longer one adds nothing
        # but time to each of the ~45 updates that pass through testing
        update_health_s=0.1,
    )
    matrix = Matrix(
        hub,
        agent,
        {"old": old.path, "new": new.path, "bad": bad},
        {old.path: old.model_id, new.path: new.model_id},
    )
    rng = random.Random(SEED)
    offsets = sorted(rng.randrange(1, new.length) for _ in range(BYTE_CUTS))
    plan: list[tuple[str, str]] = []
    for failpoint in HAPPY_CUTS:
        plan.append((failpoint, "good"))
    for failpoint in FAILING_CUTS:
        plan.append((failpoint, "bad"))
        plan.append((f"fetch.bytes:{offsets.pop()}", "good"))  # moves the desired release on
    plan += [(f"fetch.bytes:{offset}", "good") for offset in offsets]
    try:
        for failpoint, kind in plan:
            matrix.cut(failpoint, matrix.other() if kind == "good" else bad)
    finally:
        agent.kill9()
        server.stop()
    assert matrix.cuts == len(HAPPY_CUTS) + len(FAILING_CUTS) + BYTE_CUTS >= 50
    recorded = hub.events(DEVICE)
    assert {e["state"] for e in recorded} >= {
        "downloading",
        "verifying",
        "installing",
        "testing",
        "committed",
        "rolling_back",
        "rolled_back",
    }
