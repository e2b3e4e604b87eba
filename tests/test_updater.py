"""The device updater: state machine, A/B slots, persisted state and the resume map.

Real slots on disk, real model bundles (int8 / float .tflite, .onnx) and real runtimes; the
TUF client is a small double serving a local directory with real ``TargetFile`` metadata (the
TUF and MQTT paths are tested end to end elsewhere). A power cut is simulated at the
updater's own failpoints (``updater.after:<state>``, ``updater.switched``): ``PowerCut``, a
BaseException nothing in the updater catches, is raised there instead of SIGKILL; a fresh
:class:`Updater` then boots from what is on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from device_agent.card import ModelCard
from device_agent.config import AgentSettings
from device_agent.daemon import AgentDaemon
from device_agent.errors import AgentError
from device_agent.fsio import make_dir
from device_agent.runtime import ModelBundle, Runtime, open_runtime
from device_agent.updater.errors import ContractError, TrustError
from device_agent.updater.machine import (
    AT_REST,
    TRANSITIONS,
    IllegalTransitionError,
    UpdateEvent,
    UpdateState,
    next_state,
)
from device_agent.updater.slots import Pointer, SlotError, Slots
from device_agent.updater.updater import (
    ChampionHealth,
    SmokeTestError,
    Transition,
    Updater,
    UpdateRecord,
    smoke_test,
)

S, E = UpdateState, UpdateEvent
TARGET = "digits-mlp/2/litert/model.tflite"


class PowerCut(BaseException):
    """The process dies here (nothing after this point runs)."""


# -- doubles ---------------------------------------------------------------------------------


@dataclass
class LocalRepository:
    """Serves targets from a directory, with real TargetFile length/hash metadata."""

    root: Path
    downloads: Path
    files: dict[str, Path] = field(default_factory=dict)
    customs: dict[str, dict[str, Any]] = field(default_factory=dict)
    transport_failures: int = 0
    tamper: bool = False
    no_space_in: Path | None = None
    """If set, a download writes a partial file there, then the disk is full (ENOSPC)."""
    downloaded: int = 0
    refreshed: int = 0

    def add(
        self, path: str, bundle_dir: Path, card_edit: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        bundle = ModelBundle.load(bundle_dir)
        source = self.root / path
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.model_path, source)
        card = bundle.card.to_dict()
        if card_edit is not None:
            card_edit(card)
        self.files[path] = source
        self.customs[path] = {
            "edgeops": {"card": card, "hardware": {}, "min_free_memory_bytes": None,
                        "runtime": "litert" if bundle.format == "tflite" else "onnx"}
        }  # fmt: skip

    def refresh(self) -> None:
        self.refreshed += 1
        if self.transport_failures:
            self.transport_failures -= 1
            raise TrustError("transport", "the hub did not answer")

    def get_target(self, path: str) -> TargetFile:
        if path not in self.files:
            raise TrustError("unknown_target", f"no target {path}")
        target = TargetFile.from_file(path, str(self.files[path]))
        target.unrecognized_fields["custom"] = self.customs[path]
        return target

    def download(self, target: TargetFile) -> Path:
        self.downloaded += 1
        if self.no_space_in is not None:
            self.no_space_in.mkdir(parents=True, exist_ok=True)
            (self.no_space_in / "0123.part").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.downloads.mkdir(parents=True, exist_ok=True)
        destination = self.downloads / Path(target.path).name
        shutil.copyfile(self.files[target.path], destination)
        if self.tamper:
            data = bytearray(destination.read_bytes())
            data[len(data) // 2] ^= 0xFF
            destination.write_bytes(bytes(data))
        return destination


def contract(custom: Any) -> ModelCard:
    edgeops = custom["edgeops"]
    if edgeops["hardware"].get("arch") == ["riscv64"]:
        raise ContractError("hardware", "the target needs arch riscv64, this device is x86_64")
    return ModelCard.from_dict(edgeops["card"])


class Host:
    """The daemon's side: a real runtime as the champion, and the reported transitions.

    ``runtime_errors`` counts the champion's errors since it was loaded, as the daemon does.
    """

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.champion: Runtime | None = None
        self.runtime_errors = 0
        self.fail_after_activation = False
        self.transitions: list[Transition] = []
        self.refuse_activation = False
        self.activations: list[Path | None] = []
        self.load(slots.active_dir())

    def load(self, bundle_dir: Path | None) -> None:
        if self.champion is not None:
            self.champion.close()
        self.champion = None if bundle_dir is None else open_runtime(ModelBundle.load(bundle_dir))
        self.runtime_errors = 0

    def activate(self, bundle_dir: Path | None) -> None:
        self.activations.append(bundle_dir)
        if self.refuse_activation and bundle_dir != self.slots.dir("a"):
            raise AgentError("the source gives samples of another shape")
        self.load(bundle_dir)
        if self.fail_after_activation:
            self.runtime_errors += 3

    def health(self) -> ChampionHealth:
        model_id = self.champion.model_id if self.champion else None
        return ChampionHealth(model_id, self.runtime_errors)

    def report(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def path(self) -> list[tuple[str, str]]:
        return [(str(t.event), str(t.state)) for t in self.transitions]


class Cuts:
    """Arms one failpoint of this process; reaching it raises PowerCut."""

    def __init__(self) -> None:
        self.armed: str | None = None
        self.reached: list[str] = []

    def check(self, name: str) -> None:
        self.reached.append(name)
        if name == self.armed:
            self.armed = None
            raise PowerCut(name)


@pytest.fixture
def cuts(monkeypatch: pytest.MonkeyPatch) -> Cuts:
    from device_agent import failpoints

    armed = Cuts()
    monkeypatch.setattr(failpoints, "check", armed.check)
    return armed


@pytest.fixture
def repo(tmp_path: Path, float_model_dir: Path) -> LocalRepository:
    repository = LocalRepository(tmp_path / "repo", tmp_path / "state" / "downloads")
    repository.add(TARGET, float_model_dir)
    return repository


@pytest.fixture
def state_dir(tmp_path: Path, int8_model_dir: Path) -> Path:
    state = tmp_path / "state"
    assert Slots(state / "slots").seed(int8_model_dir)
    return state


def make_updater(state_dir: Path, repo: LocalRepository, **kwargs: Any) -> tuple[Updater, Host]:
    host = Host(Slots(state_dir / "slots"))
    updater = Updater(
        state_dir,
        trust=lambda: repo,
        contract=contract,
        host=host,
        health_s=kwargs.pop("health_s", 0.0),
        retry_delay_s=0.0,
        health_poll_s=0.01,
        **kwargs,
    )
    return updater, host


def active_model(state_dir: Path) -> str:
    """The model id the active slot holds (it must load)."""
    active = Slots(state_dir / "slots").active_dir()
    assert active is not None
    return ModelBundle.load(active).model_id


# -- the machine -----------------------------------------------------------------------------


def test_happy_path_and_failures_follow_the_table() -> None:
    path = [E.START, E.DOWNLOADED, E.VERIFIED, E.INSTALLED, E.HEALTHY]
    state = S.IDLE
    for event in path:
        state = next_state(state, event)
    assert state == S.COMMITTED
    for in_progress in (S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.TESTING):
        assert next_state(in_progress, E.FAILED) == S.ROLLING_BACK
    assert next_state(S.ROLLING_BACK, E.ROLLED_BACK) == S.ROLLED_BACK
    reachable = {S.IDLE} | set(TRANSITIONS.values())
    assert reachable == set(UpdateState)


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.IDLE, E.HEALTHY), (S.COMMITTED, E.FAILED), (S.INSTALLING, E.CANCEL),
     (S.ROLLED_BACK, E.RESUME), (S.TESTING, E.DOWNLOADED)],
)  # fmt: skip
def test_illegal_transitions_raise(state: UpdateState, event: UpdateEvent) -> None:
    with pytest.raises(IllegalTransitionError, match=f"{event}.*{state}"):
        next_state(state, event)


# -- slots -----------------------------------------------------------------------------------


def test_seed_write_and_switch(tmp_path: Path, int8_model_dir: Path, onnx_model_dir: Path) -> None:
    slots = Slots(tmp_path / "slots")
    assert slots.pointer() is None and slots.inactive() == "a"
    assert slots.seed(int8_model_dir) and not slots.seed(int8_model_dir)
    assert slots.pointer() == Pointer(active="a")
    with pytest.raises(SlotError, match="slot a is active"):
        slots.write("a", int8_model_dir / "model.tflite", ModelBundle.load(int8_model_dir).card)
    (slots.dir("b") / "junk").parent.mkdir(parents=True)
    (slots.dir("b") / "junk").write_text("left by a power cut")
    onnx = ModelBundle.load(onnx_model_dir)
    bundle = slots.write("b", onnx.model_path, onnx.card)
    assert sorted(p.name for p in slots.dir("b").iterdir()) == ["card.json", "model.onnx"]
    assert bundle.model_id == onnx.model_id and slots.active() == "a"
    slots.switch(Pointer(active="b", previous="a", targets={"b": "m/1/onnx/model.onnx"}))
    assert slots.describe() == {
        "active": "b",
        "a": {"target": None, "model_id": ModelBundle.load(int8_model_dir).model_id},
        "b": {"target": "m/1/onnx/model.onnx", "model_id": onnx.model_id},
    }
    assert json.loads(slots.pointer_file.read_text())["previous"] == "a"
    # a changed configured model (no release yet) goes to the inactive slot and is activated
    seeded = Slots(tmp_path / "seeded")
    assert seeded.seed(int8_model_dir) and seeded.seed(onnx_model_dir)
    assert seeded.pointer() == Pointer(active="b", previous="a")
    assert not seeded.seed(onnx_model_dir)
    slots.pointer_file.write_text('{"active": "a", "previous": null, "targets": {"a": null}}')
    assert slots.pointer() == Pointer(active="a")  # a factory-installed slot without a target
    slots.pointer_file.write_text('{"active": "c"}')
    with pytest.raises(SlotError, match="'active' must be one of"):
        slots.pointer()


def test_smoke_test_reproduces_the_cards_vectors(
    int8_model_dir: Path, float_model_dir: Path, onnx_model_dir: Path, tmp_path: Path
) -> None:
    for directory in (int8_model_dir, float_model_dir, onnx_model_dir):
        assert smoke_test(directory).card.test_vectors
    broken = tmp_path / "broken"
    shutil.copytree(int8_model_dir, broken)
    card = json.loads((broken / "card.json").read_text())
    card["test_vectors"][1]["expected_output"] = [[127] * 10]
    (broken / "card.json").write_text(json.dumps(card))
    with pytest.raises(SmokeTestError, match="test vector 1: output differs"):
        smoke_test(broken)
    (broken / "model.tflite").write_bytes(b"TFL3 not a model")
    with pytest.raises(SmokeTestError, match="does not load: LiteRT cannot load"):
        smoke_test(broken)


# -- updates ---------------------------------------------------------------------------------


def test_update_commits_and_switches_the_pointer(
    state_dir: Path, repo: LocalRepository, float_model_dir: Path, int8_model_dir: Path
) -> None:
    updater, host = make_updater(state_dir, repo, health_s=0.05)
    old = active_model(state_dir)
    assert updater.update(TARGET) == S.COMMITTED
    assert host.path() == [
        ("start", "downloading"), ("downloaded", "verifying"), ("verified", "installing"),
        ("installed", "testing"), ("healthy", "committed"),
    ]  # fmt: skip
    assert all(t.target == TARGET and t.attempt == 1 for t in host.transitions)
    pointer = updater.slots.pointer()
    assert pointer == Pointer(active="b", previous="a", targets={"b": TARGET})
    new = ModelBundle.load(float_model_dir).model_id
    assert active_model(state_dir) == new and host.health().model_id == new
    assert ModelBundle.load(state_dir / "slots" / "a").model_id == old
    saved = json.loads(updater.state_file.read_text())
    assert saved["state"] == "committed" and saved["target"] == TARGET
    assert not list((state_dir / "downloads").iterdir())  # the slot holds the copy
    # the same target again: nothing to do
    assert not updater.wants(TARGET) and updater.update(TARGET) == S.COMMITTED
    assert len(host.transitions) == 5


def test_incompatible_target_is_refused_before_download(
    state_dir: Path, repo: LocalRepository, float_model_dir: Path
) -> None:
    repo.add("other/1/litert/model.tflite", float_model_dir)
    repo.customs["other/1/litert/model.tflite"]["edgeops"]["hardware"] = {"arch": ["riscv64"]}
    updater, host = make_updater(state_dir, repo)
    old = active_model(state_dir)
    assert updater.update("other/1/litert/model.tflite") == S.ROLLED_BACK
    assert host.path() == [
        ("start", "downloading"), ("failed", "rolling_back"), ("rolled_back", "rolled_back"),
    ]  # fmt: skip
    assert host.transitions[1].reason == (
        "hardware: the target needs arch riscv64, this device is x86_64"
    )
    assert repo.downloaded == 0 and active_model(state_dir) == old
    assert host.activations == []  # the champion was never touched
    assert not updater.wants("other/1/litert/model.tflite")  # not retried by itself


def test_tampered_artifact_fails_verification(state_dir: Path, repo: LocalRepository) -> None:
    repo.tamper = True
    updater, host = make_updater(state_dir, repo)
    old = active_model(state_dir)
    assert updater.update(TARGET) == S.ROLLED_BACK
    failed = [t for t in host.transitions if t.event == E.FAILED]
    assert failed[0].previous == S.VERIFYING
    assert failed[0].reason is not None and failed[0].reason.startswith("hash_mismatch: ")
    assert active_model(state_dir) == old and updater.slots.pointer() == Pointer(active="a")


def test_failed_smoke_test_never_activates(
    state_dir: Path, tmp_path: Path, float_model_dir: Path
) -> None:
    def corrupt(card: dict[str, Any]) -> None:
        card["test_vectors"][0]["expected_output"] = [[0.5] * 10]

    repo = LocalRepository(tmp_path / "repo2", state_dir / "downloads")
    repo.add(TARGET, float_model_dir, corrupt)
    updater, host = make_updater(state_dir, repo)
    assert updater.update(TARGET) == S.ROLLED_BACK
    failed = next(t for t in host.transitions if t.event == E.FAILED)
    assert failed.previous == S.TESTING and failed.reason is not None
    assert failed.reason.startswith("smoke_test: ")
    assert updater.slots.pointer() == Pointer(active="a") and host.activations == []


def test_unhealthy_champion_is_rolled_back(
    state_dir: Path, repo: LocalRepository, int8_model_dir: Path
) -> None:
    updater, host = make_updater(state_dir, repo, health_s=5.0)
    host.fail_after_activation = True
    old = active_model(state_dir)
    assert updater.update(TARGET) == S.ROLLED_BACK
    failed = next(t for t in host.transitions if t.event == E.FAILED)
    assert failed.reason is not None and failed.reason.startswith("health: ")
    assert "failed on 3 sample(s)" in failed.reason
    assert updater.slots.pointer() == Pointer(active="a")
    assert host.activations == [state_dir / "slots" / "b", state_dir / "slots" / "a"]
    assert host.health().model_id == old == active_model(state_dir)


def test_a_champion_the_daemon_cannot_swap_in_is_rolled_back(
    state_dir: Path, repo: LocalRepository
) -> None:
    updater, host = make_updater(state_dir, repo)
    host.refuse_activation = True
    old = active_model(state_dir)
    assert updater.update(TARGET) == S.ROLLED_BACK
    failed = next(t for t in host.transitions if t.event == E.FAILED)
    assert failed.reason == "activation: the source gives samples of another shape"
    assert updater.slots.pointer() == Pointer(active="a") and active_model(state_dir) == old
    assert host.activations == [state_dir / "slots" / "b", state_dir / "slots" / "a"]


def test_transient_failures_retry_until_the_attempts_run_out(
    state_dir: Path, repo: LocalRepository, int8_model_dir: Path
) -> None:
    repo.transport_failures = 2
    updater, host = make_updater(state_dir, repo)
    assert updater.update(TARGET) == S.COMMITTED
    retries = [t for t in host.transitions if t.event == E.RETRY]
    assert [t.attempt for t in retries] == [2, 3]
    assert all(t.reason == "transport: the hub did not answer" for t in retries)

    # the next release never gets through: two attempts, then it is given up
    later = "digits-mlp/3/litert/model.tflite"
    repo.add(later, int8_model_dir)
    repo.transport_failures = 5
    updater, host = make_updater(state_dir, repo, max_attempts=2)
    assert updater.update(later) == S.ROLLED_BACK
    assert host.path() == [
        ("start", "downloading"), ("retry", "downloading"), ("failed", "rolling_back"),
        ("rolled_back", "rolled_back"),
    ]  # fmt: skip
    assert host.transitions[2].reason == (
        "gave up after 2 attempts: transport: the hub did not answer"
    )
    assert updater.slots.pointer() == Pointer(active="b", previous="a", targets={"b": TARGET})


# -- power cuts and the resume map -----------------------------------------------------------


HAPPY_CUTS = [
    f"updater.{where}:{state}"
    for state in ("downloading", "verifying", "installing", "testing", "committed")
    for where in ("enter", "after")
] + ["updater.switched"]


def restart(state_dir: Path, repo: LocalRepository, desired: str) -> tuple[Updater, Host]:
    """What the daemon does at start: boot, resume, then the desired release."""
    updater, host = make_updater(state_dir, repo)
    if updater.boot(desired):
        updater.resume()
    if updater.wants(desired):
        updater.update(desired)
    return updater, host


@pytest.mark.parametrize("failpoint", HAPPY_CUTS)
def test_power_cut_anywhere_ends_on_the_old_or_the_new_model(
    state_dir: Path, repo: LocalRepository, float_model_dir: Path, cuts: Cuts, failpoint: str
) -> None:
    old, new = active_model(state_dir), ModelBundle.load(float_model_dir).model_id
    updater, before = make_updater(state_dir, repo)
    cuts.armed = failpoint
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    assert active_model(state_dir) in (old, new)  # the pointer names a complete slot
    updater, after = restart(state_dir, repo, TARGET)
    assert updater.state == S.COMMITTED and active_model(state_dir) == new
    reported = before.transitions + after.transitions
    assert reported[-1].state == S.COMMITTED  # the hub hears the final state
    assert not list((state_dir / "downloads").iterdir())


@pytest.mark.parametrize("cut_at", [S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.TESTING])
def test_resume_map_of_the_states_in_progress(
    state_dir: Path, repo: LocalRepository, float_model_dir: Path, cuts: Cuts, cut_at: UpdateState
) -> None:
    old = active_model(state_dir)
    updater, host = make_updater(state_dir, repo)
    cuts.armed = f"updater.after:{cut_at}"
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    assert active_model(state_dir) == old
    if cut_at == S.INSTALLING:  # the cut left a half-written slot behind
        (state_dir / "slots" / "b").mkdir(exist_ok=True)
        (state_dir / "slots" / "b" / "model.tflite").write_bytes(b"half")

    updater, host = make_updater(state_dir, repo)  # the restart
    assert updater.state == cut_at
    assert updater.boot(TARGET) is True
    assert host.path() == [("resume", str(cut_at))] and host.transitions[0].attempt == 2
    assert updater.resume() == S.COMMITTED
    assert active_model(state_dir) == ModelBundle.load(float_model_dir).model_id


def test_cut_after_the_switch_counts_boots_and_a_crash_loop_rolls_back(
    state_dir: Path, repo: LocalRepository, float_model_dir: Path, cuts: Cuts
) -> None:
    old = active_model(state_dir)
    new = ModelBundle.load(float_model_dir).model_id
    updater, host = make_updater(state_dir, repo, max_attempts=10)
    cuts.armed = "updater.switched"  # dies right after the pointer switch
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    assert active_model(state_dir) == new
    for boots in (1, 2):  # restarts that die while the new model is tested
        updater, host = make_updater(state_dir, repo, max_attempts=10)
        assert updater.boot(TARGET) is True
        assert updater.record.boots == boots
    # the third restart in testing is a crash loop: rolled back before the model loads
    updater, host = make_updater(state_dir, repo, max_attempts=10)
    assert updater.boot(TARGET) is False
    assert host.path() == [
        ("resume", "testing"), ("failed", "rolling_back"), ("rolled_back", "rolled_back"),
    ]  # fmt: skip
    assert host.transitions[1].reason == "crash loop: 3 restarts while testing the new model"
    assert updater.slots.pointer() == Pointer(active="a") and active_model(state_dir) == old


def test_cut_after_the_switch_then_healthy_commits(
    state_dir: Path, repo: LocalRepository, float_model_dir: Path, cuts: Cuts
) -> None:
    updater, host = make_updater(state_dir, repo)
    cuts.armed = "updater.switched"
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    updater, host = make_updater(state_dir, repo)  # loads the new champion from the pointer
    assert updater.boot(TARGET) is True and updater.resume() == S.COMMITTED
    assert host.activations == []  # the champion loaded at start is the one tested
    assert active_model(state_dir) == ModelBundle.load(float_model_dir).model_id


def test_cut_while_rolling_back_finishes_the_rollback(
    state_dir: Path, repo: LocalRepository, cuts: Cuts
) -> None:
    old = active_model(state_dir)
    updater, host = make_updater(state_dir, repo, health_s=5.0)
    host.fail_after_activation = True
    cuts.armed = "updater.after:rolling_back"  # persisted, pointer not yet switched back
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    assert updater.slots.active() == "b"
    updater, host = make_updater(state_dir, repo)
    assert updater.boot(TARGET) is False
    assert host.path() == [("resume", "rolling_back"), ("rolled_back", "rolled_back")]
    assert host.transitions[-1].reason is not None
    assert host.transitions[-1].reason.startswith("health: ")
    assert updater.slots.pointer() == Pointer(active="a") and active_model(state_dir) == old


def test_download_is_cancelled_when_the_desired_release_moved_on(
    state_dir: Path, repo: LocalRepository, cuts: Cuts
) -> None:
    updater, host = make_updater(state_dir, repo)
    cuts.armed = "updater.after:verifying"
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    updater, host = make_updater(state_dir, repo)
    assert updater.boot("digits-mlp/9/litert/model.tflite") is False
    assert host.path() == [("cancel", "idle")] and updater.state == S.IDLE
    assert not list((state_dir / "downloads").iterdir())
    assert updater.slots.pointer() == Pointer(active="a")


def test_repeated_interruptions_exhaust_the_attempts(
    state_dir: Path, repo: LocalRepository, cuts: Cuts
) -> None:
    updater, host = make_updater(state_dir, repo, max_attempts=2)
    cuts.armed = "updater.after:installing"
    with pytest.raises(PowerCut):
        updater.update(TARGET)
    updater, host = make_updater(state_dir, repo, max_attempts=2)
    cuts.armed = "updater.after:installing"
    with pytest.raises(PowerCut):  # the resume itself is cut
        updater.boot(TARGET)
    updater, host = make_updater(state_dir, repo, max_attempts=2)
    assert updater.boot(TARGET) is False
    assert [t.reason for t in host.transitions if t.event == E.FAILED] == [
        "gave up after 2 attempts (interrupted each time)"
    ]
    assert updater.state == S.ROLLED_BACK and updater.slots.pointer() == Pointer(active="a")


def test_record_round_trips_and_a_damaged_state_file_means_idle(
    state_dir: Path, repo: LocalRepository
) -> None:
    record = UpdateRecord(state=S.TESTING, target=TARGET, slot="b", attempt=2, boots=1)
    assert UpdateRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    updater, _ = make_updater(state_dir, repo)
    updater.state_file.parent.mkdir(parents=True, exist_ok=True)
    updater.state_file.write_text("{not json")
    updater, _host = make_updater(state_dir, repo)
    assert updater.state == S.IDLE and updater.boot(TARGET) is False
    assert set(AT_REST) == {S.IDLE, S.COMMITTED, S.ROLLED_BACK}


# -- review fixes ----------------------------------------------------------------------------


def test_errors_of_the_replaced_champion_do_not_hide_the_new_models(
    state_dir: Path, repo: LocalRepository
) -> None:
    updater, host = make_updater(state_dir, repo, health_s=5.0)
    host.runtime_errors = 5  # the old champion failed on samples before the swap
    host.fail_after_activation = True  # the new one fails on 3
    assert updater.update(TARGET) == S.ROLLED_BACK
    failed = next(t for t in host.transitions if t.event == E.FAILED)
    assert failed.reason is not None and "failed on 3 sample(s)" in failed.reason


def test_the_daemon_counts_runtime_errors_from_the_swap_on(
    tmp_path: Path, float_model_dir: Path
) -> None:
    settings = AgentSettings(
        device_id="health-1", mqtt_url="mqtt://127.0.0.1:1", data_dir=tmp_path / "data"
    )
    daemon = AgentDaemon(settings)
    daemon.errors["runtime"] = 4  # the old champion's samples, run until the swap
    daemon._swap_champion(float_model_dir)
    try:
        model_id = ModelBundle.load(float_model_dir).model_id
        assert daemon._champion_health() == ChampionHealth(model_id, 0)
        daemon.errors["runtime"] += 1
        assert daemon._champion_health() == ChampionHealth(model_id, 1)
    finally:
        daemon._swap_champion(None)


def test_a_full_disk_frees_the_download_and_fails_the_update(
    state_dir: Path, repo: LocalRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device_agent.updater import updater as updater_module

    updater, host = make_updater(state_dir, repo)
    repo.no_space_in = updater.partial_dir
    real_write = updater_module.atomic_write_json

    def write_while_space(path: Path, document: Any) -> None:
        if list(updater.partial_dir.glob("*.part")):  # the partial fills the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, document)

    monkeypatch.setattr(updater_module, "atomic_write_json", write_while_space)
    assert updater.update(TARGET) == S.ROLLED_BACK
    assert host.path() == [
        ("start", "downloading"), ("failed", "rolling_back"), ("rolled_back", "rolled_back"),
    ]  # fmt: skip
    assert host.transitions[1].reason == "io: [Errno 28] No space left on device"
    assert repo.downloaded == 1 and list(updater.partial_dir.glob("*.part")) == []
    assert json.loads(updater.state_file.read_text())["state"] == "rolled_back"


def test_no_download_without_room_for_two_copies(
    state_dir: Path, repo: LocalRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    updater, host = make_updater(state_dir, repo)
    assert updater.update(TARGET) == S.ROLLED_BACK
    failed = host.transitions[1]
    assert failed.event == E.FAILED and failed.reason is not None
    assert failed.reason.startswith("io: 1000 bytes free")
    assert repo.downloaded == 0 and updater.slots.pointer() == Pointer(active="a")


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path fsync'd from now on."""
    seen: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(Path(f"/proc/self/fd/{fd}").readlink())
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_make_dir_fsyncs_the_parent_of_each_directory_it_creates(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    make_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert fsynced == [tmp_path, tmp_path / "a"]
    fsynced.clear()
    make_dir(tmp_path / "a" / "b")
    assert fsynced == []


def test_the_slot_and_update_directories_are_created_durably(
    tmp_path: Path, repo: LocalRepository, int8_model_dir: Path, fsynced: list[Path]
) -> None:
    state = tmp_path / "fresh"
    state.mkdir()
    assert Slots(state / "slots").seed(int8_model_dir)
    assert state in fsynced  # the entry of slots/
    fsynced.clear()
    updater, _ = make_updater(state, repo)
    assert updater.update(TARGET) == S.COMMITTED
    assert state in fsynced  # the entry of update/


def test_the_slots_report_never_pairs_an_old_target_with_a_new_model(
    state_dir: Path, repo: LocalRepository, int8_model_dir: Path, cuts: Cuts
) -> None:
    second, third = "digits-mlp/3/litert/model.tflite", "digits-mlp/4/litert/model.tflite"
    repo.add(second, int8_model_dir)
    repo.add(third, int8_model_dir)
    updater, _ = make_updater(state_dir, repo)
    assert updater.update(TARGET) == S.COMMITTED  # slot b
    assert updater.update(second) == S.COMMITTED  # slot a
    cuts.armed = "updater.enter:testing"  # slot b now holds the third release's model
    with pytest.raises(PowerCut):
        updater.update(third)
    report = updater.slots.describe()
    int8 = ModelBundle.load(int8_model_dir).model_id
    assert report["b"] == {"target": None, "model_id": int8}
    assert report["a"] == {"target": second, "model_id": int8}
    updater, _ = restart(state_dir, repo, third)
    assert updater.slots.describe()["b"] == {"target": third, "model_id": int8}
