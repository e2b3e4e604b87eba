"""The attack matrix (acceptance): nothing reaches a device unless it is signed, fresh and meant
for it, and a refused update leaves the device running its current model.

Each test serves the device a repository an attacker made from the hub's real one (real
metadata edited and re-signed with ``tuf.api.metadata``: with a key of the attacker's, with
the hub's online keys where the attack assumes them stolen, with an old root key), or runs a
fetch server that lies about the bytes. The device is the real agent program, provisioned
with the hub's root and running release 1; the desired release names release 2. Every attack
must end with the update rolled back for the specific reason (the ``reason`` of the persisted
update state and of the ``update`` event starts with the error kind), the agent still
running, its health naming release 1 as the champion, the slot pointer unchanged and the
active slot reproducing its card's test vectors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, TargetFile

from device_agent.fetch.wire import FetchRequest, FetchResponse, encode_response
from edgeops.trust import FetchServer
from edgeops.trust.files import read_range
from edgeops.trust.keys import generate_key, signer_for
from tests.fixtures.trust import (
    AgentProcess,
    Forger,
    TrustHub,
    edit_card,
    replays_test_vectors,
    wait_for,
)

UPDATE_TIMEOUT_S = 60.0


# -- the victim -------------------------------------------------------------------------------


def provision(hub: TrustHub, tmp_path: Path, device_id: str, **settings: Any) -> AgentProcess:
    """A device running release "old" from slot a, trusting the hub's current root."""
    old = hub.releases["old"]
    champion = hub.bundle(old.path, tmp_path / f"{device_id}-champion")
    return AgentProcess.provision(
        tmp_path / "devices",
        device_id=device_id,
        mqtt_url=hub.url,
        data_dir=tmp_path / "device-data",
        trust_root=hub.root_json,
        champion=champion,
        champion_target=old.path,
        **settings,
    )


def start_running_old(hub: TrustHub, agent: AgentProcess) -> None:
    agent.start()
    wait_for(
        lambda: agent.champion_id() == hub.releases["old"].model_id,
        timeout=60,
        what=f"{agent.device_id} runs release 1",
    )


def refused(
    hub: TrustHub, agent: AgentProcess, target: str, kind: str, *, running: str = "old"
) -> dict[str, Any]:
    """Desire ``target``; assert the update ends rolled back for ``kind`` and the device still
    runs release ``running``. Returns the final persisted update state."""
    pointer_before = agent.pointer()
    slots_before = _slot_files(agent)
    hub.desire(agent.device_id, target)
    state = wait_for(
        lambda: (
            (s := agent.update_state()).get("target") == target
            and s.get("state") == "rolled_back"
            and s
        ),
        timeout=UPDATE_TIMEOUT_S,
        what=f"the update to {target} rolled back",
    )
    reason = str(state.get("reason"))
    assert reason.startswith(f"{kind}:"), f"expected a {kind} refusal, got: {reason}"
    assert agent.running, "the agent died"
    expected = hub.releases[running]
    wait_for(lambda: agent.champion_id() == expected.model_id, timeout=10, what="champion")
    assert agent.pointer() == pointer_before
    assert _slot_files(agent) == slots_before, "a refused artifact was written into a slot"
    assert agent.active_target() == expected.path
    replays_test_vectors(agent.active_slot())
    # the hub recorded the refusal as an update event, and the device's update state
    wait_for(
        lambda: any(
            e.get("state") == "rolled_back" and str(e.get("reason", "")).startswith(f"{kind}:")
            for e in hub.events(agent.device_id)
        ),
        timeout=20,
        what="the hub recorded the rolled_back event",
    )
    wait_for(lambda: hub.update_state(agent.device_id) == "rolled_back", timeout=20)
    return dict(state)


def _slot_files(agent: AgentProcess) -> dict[str, str]:
    """Every file under the slots (pointer excluded) by relative path, with its sha256."""
    return {
        str(path.relative_to(agent.slots_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(agent.slots_dir.rglob("*"))
        if path.is_file() and path.name != "active.json"
    }


def attack(
    hub: TrustHub,
    tmp_path: Path,
    repository: Path | None,
    kind: str,
    *,
    target: str | None = None,
    device_id: str = "victim",
    before_start: Any = None,
) -> AgentProcess:
    """Serve ``repository`` (the hub's own if None), run the victim, ask for ``target``
    (release 2 by default) and check the refusal; the agent is stopped cleanly after."""
    hub.serve(repository)
    agent = provision(hub, tmp_path, device_id)
    if before_start is not None:
        before_start(agent)
    start_running_old(hub, agent)
    try:
        refused(hub, agent, target or hub.releases["new"].path, kind)
    finally:
        code = agent.stop()
    assert code == 0
    return agent


def evil_signer() -> Any:
    return signer_for(generate_key())


def swap_bytes(forger: Forger, target_path: str, data: bytes) -> TargetFile:
    """Store ``data`` as the new content of ``target_path`` (consistent-snapshot name) and
    return a TargetFile describing it, with the original custom metadata."""
    original = forger.load("targets").signed.targets[target_path]
    info = TargetFile.from_data(target_path, data, ["sha256"])
    info.unrecognized_fields["custom"] = copy.deepcopy(original.custom)
    directory, _, name = target_path.rpartition("/")
    (forger.targets_dir / directory / f"{info.hashes['sha256']}.{name}").write_bytes(data)
    return info


def trusted_metadata(hub: TrustHub) -> Any:
    """A ``before_start`` hook: the device already trusts the hub's current timestamp,
    snapshot and targets (as after an earlier refresh), so older ones are a rollback."""
    forger = Forger(hub.repository.repository_dir)

    def seed(agent: AgentProcess) -> None:
        metadata = agent.state_dir / "trust" / "metadata"
        metadata.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub.root_json, metadata / "root.json")
        shutil.copyfile(forger.path_of("timestamp"), metadata / "timestamp.json")
        shutil.copyfile(forger.path_of("snapshot"), metadata / "snapshot.json")
        shutil.copyfile(forger.path_of("targets"), metadata / "targets.json")

    return seed


# -- the artifact -----------------------------------------------------------------------------


def test_a_tampered_artifact_byte_is_refused(trust_hub: TrustHub, tmp_path: Path) -> None:
    forger = trust_hub.forge("tampered")
    stored = forger.target_file(trust_hub.releases["new"].path)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    attack(trust_hub, tmp_path, forger.repository, "hash_mismatch")


def test_an_artifact_of_the_wrong_length_is_refused(trust_hub: TrustHub, tmp_path: Path) -> None:
    forger = trust_hub.forge("short")
    stored = forger.target_file(trust_hub.releases["new"].path)
    data = stored.read_bytes()
    stored.write_bytes(data[: len(data) - 1000])
    attack(trust_hub, tmp_path, forger.repository, "length_mismatch")


class EndlessServer(FetchServer):
    """The hub's fetch server, except that every target chunk comes with more bytes than were
    asked for (and the file is declared far larger than its signed length)."""

    def answer(self, request: FetchRequest) -> bytes:
        if not request.path.startswith("targets/"):
            return super().answer(request)
        chunk = read_range(self.repository_dir, request.path, request.offset, request.length)
        data = (chunk.data + b"\0" * request.length)[: min(2 * request.length, 262144)]
        header = FetchResponse(
            req_id=request.req_id,
            path=request.path,
            offset=request.offset,
            status="ok",
            total=chunk.total + 100 * 1024 * 1024,
        )
        return encode_response(header, data)


def test_a_server_sending_more_bytes_than_declared_is_cut_off(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    server = EndlessServer(
        trust_hub.repository.repository_dir, trust_hub.endpoint, client_id="evil-fetch"
    )
    server.start()
    try:
        agent = provision(trust_hub, tmp_path, "victim")
        start_running_old(trust_hub, agent)
        try:
            refused(trust_hub, agent, trust_hub.releases["new"].path, "length_mismatch")
        finally:
            assert agent.stop() == 0
    finally:
        server.stop()
    # nothing past the signed length reached the disk
    partials = list((agent.state_dir / "update" / "partial").glob("*.part"))
    assert all(p.stat().st_size <= trust_hub.releases["new"].length for p in partials)


# -- signatures -------------------------------------------------------------------------------


def test_targets_signed_by_an_unauthorised_key_are_refused(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    """The attacker holds the online snapshot and timestamp keys but not the targets key: it
    lists its own bytes under release 2's path and signs targets with a key of its own."""
    forger = trust_hub.forge("unauthorised")
    new = trust_hub.releases["new"]
    evil = bytearray(forger.target_file(new.path).read_bytes())
    evil[100] ^= 0xFF
    targets = forger.load("targets")
    targets.signed.targets[new.path] = swap_bytes(forger, new.path, bytes(evil))
    forger.republish(
        targets=targets,
        targets_signers=(evil_signer(),),
        snapshot_signer=trust_hub.online_signer("snapshot"),
        timestamp_signer=trust_hub.online_signer("timestamp"),
    )
    attack(trust_hub, tmp_path, forger.repository, "bad_signature")


def test_a_root_signed_below_its_threshold_is_refused(trust_hub: TrustHub, tmp_path: Path) -> None:
    """A new root signed by one of the two root keys (threshold 2) that hands the targets
    role to the attacker."""
    forger = trust_hub.forge("below-threshold")
    root = forger.load("root")
    assert root.signed.roles["root"].threshold == 2
    evil = evil_signer()
    for keyid in list(root.signed.roles["targets"].keyids):
        root.signed.revoke_key(keyid, "targets")
    root.signed.add_key(evil.public_key, "targets")
    root.signed.version += 1
    forger.write(root, trust_hub.root_signers()[0])
    attack(trust_hub, tmp_path, forger.repository, "below_threshold")


# -- freshness --------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_rolled_back_metadata_is_refused(trust_hub: TrustHub, tmp_path: Path, role: str) -> None:
    """The device trusts the current metadata; the attacker (with the online keys) serves an
    older version of ``role``: an older timestamp, a timestamp naming the previous snapshot,
    or a snapshot naming the previous targets."""
    forger = trust_hub.forge(f"rollback-{role}")
    signers = {
        "snapshot_signer": trust_hub.online_signer("snapshot"),
        "timestamp_signer": trust_hub.online_signer("timestamp"),
    }
    if role == "timestamp":
        timestamp = forger.load("timestamp")
        timestamp.signed.version -= 1
        timestamp.signed.snapshot_meta = forger.meta_for(
            forger.path_of("snapshot", forger.latest_version("snapshot") - 1),
            timestamp.signed.snapshot_meta,
            forger.latest_version("snapshot") - 1,
        )
        forger.write(timestamp, signers["timestamp_signer"])
    elif role == "snapshot":
        forger.republish(snapshot_version=forger.latest_version("snapshot") - 1, **signers)
    else:
        forger.republish(targets_version=forger.latest_version("targets") - 1, **signers)
    attack(
        trust_hub, tmp_path, forger.repository, "rollback", before_start=trusted_metadata(trust_hub)
    )


def test_an_expired_timestamp_replayed_is_refused(trust_hub: TrustHub, tmp_path: Path) -> None:
    """A freeze: the attacker replays a timestamp whose validity ended an hour ago."""
    forger = trust_hub.forge("freeze")
    timestamp = forger.load("timestamp")
    import datetime

    timestamp.signed.expires = datetime.datetime.now(datetime.UTC).replace(
        microsecond=0
    ) - datetime.timedelta(hours=1)
    timestamp.signed.version += 1
    forger.write(timestamp, trust_hub.online_signer("timestamp"))
    attack(trust_hub, tmp_path, forger.repository, "expired")


def test_metadata_mixed_from_two_releases_is_refused(trust_hub: TrustHub, tmp_path: Path) -> None:
    """The current snapshot and timestamp, with the targets metadata of the previous release
    served under the current targets version's name (each file validly signed)."""
    forger = trust_hub.forge("mix")
    current = forger.latest_version("targets")
    shutil.copyfile(forger.path_of("targets", current - 1), forger.path_of("targets", current))
    attack(trust_hub, tmp_path, forger.repository, "mix_and_match")


# -- the compatibility contract ---------------------------------------------------------------


def _rerelease(hub: TrustHub, change: Any) -> str:
    """Release 2's bytes again under its path, with its custom metadata changed by
    ``change`` (the hub's own add_target: validly signed); returns the target path."""
    new = hub.releases["new"]
    forger = Forger(hub.repository.repository_dir)
    data = forger.target_file(new.path).read_bytes()
    custom = copy.deepcopy(forger.load("targets").signed.targets[new.path].custom)
    change(custom["edgeops"])
    hub.repository.add_target(new.path, data, custom)
    return str(new.path)


def test_an_artifact_for_another_hardware_class_is_refused(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    target = _rerelease(trust_hub, lambda c: c.update(hardware={"arch": ["riscv64", "armv7l"]}))
    attack(trust_hub, tmp_path, None, "hardware", target=target)


def test_an_artifact_needing_a_newer_agent_is_refused(trust_hub: TrustHub, tmp_path: Path) -> None:
    target = _rerelease(
        trust_hub,
        lambda c: edit_card({"edgeops": c}, lambda card: card.update(min_agent_version="99.0.0")),
    )
    attack(trust_hub, tmp_path, None, "agent_version", target=target)


# -- root rotation ----------------------------------------------------------------------------


def test_after_root_rotation_the_new_root_is_accepted_and_the_old_key_refused(
    trust_hub: TrustHub, tmp_path: Path
) -> None:
    """The hub rotates both root keys (root 2 signed by the old and the new keys). A device
    provisioned with root 1 follows the rotation and installs release 2. Then an attacker
    holding the retired root keys signs a root 3 that gives it the targets role: refused,
    and the device keeps running release 2."""
    repository = trust_hub.repository
    old_keys = trust_hub.root_signers()
    provisioned = tmp_path / "root-v1.json"
    shutil.copyfile(trust_hub.root_json, provisioned)
    versions = repository.rotate("root", trust_hub.root_key_dir)
    assert versions["root"] == 2
    new_keyids = set(repository.root().signed.roles["root"].keyids)
    assert not new_keyids & {s.public_key.keyid for s in old_keys}
    trust_hub.serve()
    agent = provision(trust_hub, tmp_path, "rotated")
    # provisioned before the rotation: the device starts from root 1
    agent.config.write_text(
        agent.config.read_text().replace(str(trust_hub.root_json), str(provisioned))
    )
    new = trust_hub.releases["new"]
    start_running_old(trust_hub, agent)
    try:
        trust_hub.desire(agent.device_id, new.path)
        wait_for(
            lambda: (
                agent.update_state().get("state") == "committed"
                and agent.update_state().get("target") == new.path
            ),
            timeout=UPDATE_TIMEOUT_S,
            what="release 2 committed under the rotated root",
        )
        trusted = Metadata.from_file(str(agent.state_dir / "trust" / "metadata" / "root.json"))
        assert trusted.signed.version == 2
        assert set(trusted.signed.roles["root"].keyids) == new_keyids
        assert agent.champion_id() == new.model_id

        # the attacker's root 3, signed with the retired keys only
        evil = evil_signer()
        root = repository.root()
        root.signed.version = 3
        for keyid in list(root.signed.roles["targets"].keyids):
            root.signed.revoke_key(keyid, "targets")
        root.signed.add_key(evil.public_key, "targets")
        forger = trust_hub.forge("old-root-key")
        forger.write(root, *old_keys)
        trust_hub.serve(forger.repository)
        refused(trust_hub, agent, trust_hub.releases["old"].path, "bad_signature", running="new")
        trusted = Metadata.from_file(str(agent.state_dir / "trust" / "metadata" / "root.json"))
        assert trusted.signed.version == 2
    finally:
        assert agent.stop() == 0


def test_the_forgers_copy_is_the_hubs_repository(trust_hub: TrustHub) -> None:
    """A guard for the matrix: the forger finds a target's stored file under its
    consistent-snapshot name, and an untouched copy holds the hub's bytes."""
    forger = trust_hub.forge("guard")
    new = trust_hub.releases["new"]
    stored = forger.target_file(new.path)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == new.sha256
    assert json.loads(forger.path_of("timestamp").read_bytes())["signed"]["_type"] == "timestamp"
