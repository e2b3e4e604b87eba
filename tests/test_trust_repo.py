"""The hub's TUF release repository, checked with python-tuf's own verification.

Every test builds real metadata with :class:`edgeops.trust.TrustRepository` (Ed25519 keys on
disk) and reads it the way a device does: a real ``tuf.ngclient.Updater`` over the files (a
directory fetcher), over the HTTP routes (FastAPI TestClient), or over MQTT through the
:class:`FetchServer` on a private Mosquitto.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from device_agent.fetch.wire import (
    MAX_CHUNK_BYTES,
    FetchRequest,
    decode_response,
    encode_request,
)
from device_agent.link import Message, MqttEndpoint, MqttLink
from edgeops.trust import (
    FetchServer,
    KeyFileError,
    MetadataError,
    RootKeysError,
    TargetPathError,
    ThresholdError,
    TimestampRefresher,
    TrustAlreadyInitialisedError,
    TrustNotInitialisedError,
    TrustRepository,
    UnknownRoleError,
)
from edgeops.trust.keys import load_signer
from tests.clitools import BIN
from tests.fixtures.mqtt import next_message, wait_subscribed

TARGET = "digits-mlp/3/litert/model.tflite"
CUSTOM = {"edgeops": {"runtime": "litert", "hardware": {"arch": ["x86_64"]}}}


# -- helpers ----------------------------------------------------------------------------------


class DirectoryFetcher(FetcherInterface):
    """Serves ``<scheme>:<relative path>`` URLs from a repository directory, as a server would."""

    def __init__(self, repository_dir: Path) -> None:
        self.repository_dir = repository_dir
        self.fetched: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        relative = url.partition(":")[2]
        self.fetched.append(relative)
        path = self.repository_dir / relative
        if not path.is_file():
            raise tuf_exceptions.DownloadHTTPError(f"{relative} not found", 404)
        yield path.read_bytes()


class HttpFetcher(FetcherInterface):
    """Plain HTTP GETs (urllib) against the hub's routes."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                yield response.read()
        except urllib.error.HTTPError as exc:
            raise tuf_exceptions.DownloadHTTPError(url, exc.code) from None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    content: bytes


class Http:
    """A tiny client for the served API: GET with optional headers, any status."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Answer(
                    response.status, {k.lower(): v for k, v in response.headers.items()},
                    response.read(),
                )  # fmt: skip
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


@contextmanager
def served_api(tmp_path: Path, repository_dir: Path | None) -> Iterator[Http]:
    """The hub's FastAPI app on a real uvicorn server on a free loopback port."""
    import uvicorn

    from edgeops.api import create_app
    from edgeops.api.context import ApiContext
    from edgeops.config import Settings
    from edgeops.db import Database

    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    context = ApiContext(Settings(data_dir=tmp_path), database)
    app = create_app(context, repository_dir=repository_dir)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            threading.Event().wait(0.025)
        assert server.started, "the API server did not start"
        yield Http(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        database.dispose()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def device(repo: TrustRepository, home: Path, fetcher: FetcherInterface | None = None) -> Updater:
    """A device's updater provisioned with the repository's root.json of today."""
    metadata = home / "metadata"
    targets = home / "targets"
    metadata.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    if not (metadata / "root.json").exists():
        (metadata / "root.json").write_bytes(repo.root_json_path.read_bytes())
    return Updater(
        str(metadata),
        "dir:metadata/",
        str(targets),
        "dir:targets/",
        fetcher=fetcher or DirectoryFetcher(repo.repository_dir),
        bootstrap=None,
    )


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepository:
    repository = TrustRepository(tmp_path / "trust")
    repository.init(tmp_path / "offline", root_keys=3, root_threshold=2)
    return repository


@pytest.fixture
def offline(tmp_path: Path) -> Path:
    return tmp_path / "offline"


# -- creating ---------------------------------------------------------------------------------


def test_init_writes_a_verifiable_chain_with_a_root_threshold_of_two(
    repo: TrustRepository, offline: Path, tmp_path: Path
) -> None:
    root = Metadata[Root].from_file(str(repo.root_json_path))
    assert root.signed.roles["root"].threshold == 2
    assert len(root.signed.roles["root"].keyids) == 3
    assert len(root.signatures) == 3
    assert root.signed.consistent_snapshot is True
    assert repo.root_json_path.read_bytes() == (repo.metadata_dir / "1.root.json").read_bytes()
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == [
        "1.root.json",
        "1.snapshot.json",
        "1.targets.json",
        "root.json",
        "timestamp.json",
    ]
    for role in ("timestamp", "snapshot", "targets"):  # tuf's own check of every delegation
        root.verify_delegate(
            role, getattr(repo, "targets_metadata" if role == "targets" else role)()
        )
    root.verify_delegate("root", root)
    # keys: offline root keys and online role keys, owner-only
    assert sorted(p.name for p in offline.iterdir()) == ["root-1.pem", "root-2.pem", "root-3.pem"]
    for key_file in [*offline.iterdir(), *repo.online_key_dir.iterdir()]:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    assert sorted(p.name for p in repo.online_key_dir.iterdir()) == [
        "snapshot.pem", "targets.pem", "timestamp.pem"
    ]  # fmt: skip
    assert not (tmp_path / "trust" / "offline-root-keys").exists()
    updater = device(repo, tmp_path / "device")
    updater.refresh()
    assert updater.get_targetinfo(TARGET) is None
    repo.verify()


def test_root_signed_below_its_threshold_is_refused_by_tuf(repo: TrustRepository) -> None:
    root = Metadata[Root].from_file(str(repo.root_json_path))
    first = next(iter(root.signatures))
    root.signatures = {first: root.signatures[first]}
    with pytest.raises(tuf_exceptions.UnsignedMetadataError):
        root.verify_delegate("root", root)


def test_init_refuses_impossible_thresholds_and_a_second_init(
    repo: TrustRepository, tmp_path: Path
) -> None:
    with pytest.raises(ThresholdError, match="threshold 3 is impossible with 2 key"):
        TrustRepository(tmp_path / "other").init(tmp_path / "k2", root_keys=2, root_threshold=3)
    with pytest.raises(ThresholdError, match="threshold 0"):
        TrustRepository(tmp_path / "other").init(tmp_path / "k2", root_keys=2, root_threshold=0)
    with pytest.raises(TrustAlreadyInitialisedError, match="already exists"):
        repo.init(tmp_path / "k3")
    with pytest.raises(KeyFileError, match=r"already holds root-1\.pem"):
        TrustRepository(tmp_path / "third").init(tmp_path / "offline")


def test_default_root_key_dir_is_inside_the_trust_dir(tmp_path: Path) -> None:
    repository = TrustRepository(tmp_path / "trust")
    key_dir = repository.init()
    assert key_dir == tmp_path / "trust" / "offline-root-keys"
    assert (key_dir / "root-1.pem").is_file()
    assert repository.rotate("timestamp")["root"] == 2


def test_everything_needs_an_initialised_repository(tmp_path: Path) -> None:
    repository = TrustRepository(tmp_path / "nothing")
    assert not repository.exists()
    for call in (
        repository.targets,
        repository.versions,
        repository.describe,
        repository.refresh_timestamp,
        lambda: repository.add_target(TARGET, b"x", {}),
        lambda: repository.rotate("timestamp", tmp_path),
    ):
        with pytest.raises(TrustNotInitialisedError, match="edgeops keys init"):
            call()


# -- targets ----------------------------------------------------------------------------------


def test_add_target_bumps_the_chain_and_a_device_downloads_and_verifies_it(
    repo: TrustRepository, tmp_path: Path
) -> None:
    data = os.urandom(150_000)
    target = repo.add_target(TARGET, data, CUSTOM)
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    stored = repo.targets_dir / "digits-mlp/3/litert" / f"{target.hashes['sha256']}.model.tflite"
    assert repo.target_file_path(target) == stored and stored.read_bytes() == data
    snapshot = repo.snapshot()
    assert snapshot.signed.meta["targets.json"].version == 2
    assert snapshot.signed.meta["targets.json"].length == len(
        (repo.metadata_dir / "2.targets.json").read_bytes()
    )
    assert repo.timestamp().signed.snapshot_meta.version == 2
    assert [t.path for t in repo.targets()] == [TARGET]

    updater = device(repo, tmp_path / "device")
    updater.refresh()
    info = updater.get_targetinfo(TARGET)
    assert info is not None and info.custom == CUSTOM and info.length == len(data)
    downloaded = Path(updater.download_target(info))
    assert downloaded.read_bytes() == data
    repo.verify()


def test_re_adding_the_same_target_changes_nothing_and_new_bytes_make_new_versions(
    repo: TrustRepository,
) -> None:
    repo.add_target(TARGET, b"one", CUSTOM)
    before = repo.versions()
    repo.add_target(TARGET, b"one", CUSTOM)
    assert repo.versions() == before
    second = repo.add_target(TARGET, b"two", CUSTOM)
    assert repo.versions()["targets"] == before["targets"] + 1
    assert repo.get_target(TARGET) == second
    # the old consistent-snapshot file stays for devices mid-update
    assert len(list((repo.targets_dir / "digits-mlp/3/litert").iterdir())) == 2


@pytest.mark.parametrize(
    "path", ["", "/abs/model.tflite", "a//b", "a/../b", "./a", "a/b c", "a/b\\c", "x" * 401]
)
def test_unsafe_target_paths_are_refused(repo: TrustRepository, path: str) -> None:
    with pytest.raises(TargetPathError):
        repo.add_target(path, b"x", {})


def test_custom_metadata_must_be_json_that_tuf_can_sign(repo: TrustRepository) -> None:
    with pytest.raises(MetadataError, match="custom metadata is not plain JSON"):
        repo.add_target(TARGET, b"x", {"bad": float("nan")})
    with pytest.raises(MetadataError, match=r"floating-point number at custom\.a\.b\[1\]"):
        repo.add_target(TARGET, b"x", {"a": {"b": [1, 0.5]}})
    assert repo.versions()["targets"] == 1


def test_verify_finds_a_tampered_target_file(repo: TrustRepository) -> None:
    target = repo.add_target(TARGET, b"genuine bytes", CUSTOM)
    repo.target_file_path(target).write_bytes(b"tampered bytes")
    with pytest.raises(MetadataError, match="target file"):
        repo.verify()


# -- rotation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_rotating_an_online_role_re_signs_root_and_devices_follow(
    repo: TrustRepository, offline: Path, tmp_path: Path, role: str
) -> None:
    repo.add_target(TARGET, b"model bytes", CUSTOM)
    updater = device(repo, tmp_path / "device")
    updater.refresh()
    old_key = load_signer(repo.online_key_path(role))
    before = repo.versions()
    after = repo.rotate(role, offline)
    assert after["root"] == before["root"] + 1
    chain = {"targets": ("targets", "snapshot", "timestamp"), "snapshot": ("snapshot", "timestamp")}
    for name in chain.get(role, ("timestamp",)):
        assert after[name] == before[name] + 1, name
    new_root = Metadata[Root].from_file(str(repo.metadata_dir / "2.root.json"))
    old_root = Metadata[Root].from_file(str(repo.metadata_dir / "1.root.json"))
    assert new_root.signed.get_root_verification_result(
        old_root.signed, new_root.signed_bytes, new_root.signatures
    ).verified
    assert old_key.public_key.keyid not in new_root.signed.roles[role].keyids
    assert load_signer(repo.online_key_path(role)).public_key.keyid in (
        new_root.signed.roles[role].keyids
    )
    repo.verify()
    fresh = device(repo, tmp_path / "device")  # the same device, a later run
    fresh.refresh()
    assert fresh.get_targetinfo(TARGET) is not None

    # a timestamp signed with the retired timestamp key no longer passes
    if role == "timestamp":
        forged = repo.timestamp()
        forged.signed.version += 1
        forged.signatures.clear()
        forged.sign(old_key)
        with pytest.raises(tuf_exceptions.UnsignedMetadataError):
            repo.root().verify_delegate("timestamp", forged)


def test_rotating_root_writes_a_root_signed_by_old_and_new_keys(
    repo: TrustRepository, offline: Path, tmp_path: Path
) -> None:
    updater = device(repo, tmp_path / "device")
    updater.refresh()
    old_signers = [load_signer(p) for p in sorted(offline.glob("root-*.pem"))]
    after = repo.rotate("root", offline, root_keys=4, root_threshold=3)
    assert after["root"] == 2
    retired = offline / "retired-v1"
    assert sorted(p.name for p in retired.iterdir()) == ["root-1.pem", "root-2.pem", "root-3.pem"]
    assert sorted(p.name for p in offline.glob("root-*.pem")) == [
        f"root-{i}.pem" for i in range(1, 5)
    ]
    old = Metadata[Root].from_file(str(repo.metadata_dir / "1.root.json")).signed
    new = Metadata[Root].from_file(str(repo.metadata_dir / "2.root.json"))
    result = new.signed.get_root_verification_result(old, new.signed_bytes, new.signatures)
    assert result.first.verified and result.second.verified
    assert new.signed.roles["root"].threshold == 3 and len(new.signed.roles["root"].keyids) == 4
    assert not {s.public_key.keyid for s in old_signers} & set(new.signed.roles["root"].keyids)

    fresh = device(repo, tmp_path / "device")
    fresh.refresh()  # walks 1 -> 2

    # root 3 signed only by the old (retired) root keys: refused by the device
    forged = Metadata(Root.from_dict(new.signed.to_dict()))
    forged.signed.version = 3
    for signer in old_signers:
        forged.sign(signer, append=True)
    (repo.metadata_dir / "3.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(tuf_exceptions.UnsignedMetadataError):
        device(repo, tmp_path / "device").refresh()


class _CrashError(Exception):
    """Stands for the hub dying at one point of a rotation."""


def _crash(*args: object, **kwargs: object) -> None:
    raise _CrashError


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_a_rotation_cut_before_the_new_root_leaves_the_old_key_in_service(
    repo: TrustRepository, offline: Path, tmp_path: Path, role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.add_target(TARGET, b"model bytes", CUSTOM)
    old_key = load_signer(repo.online_key_path(role)).public_key.keyid
    with monkeypatch.context() as patch:
        patch.setattr(TrustRepository, "_write_root", _crash)
        with pytest.raises(_CrashError):
            repo.rotate(role, offline)
    assert repo.versions()["root"] == 1
    assert repo.refresh(force=True)  # the hub goes on signing with the old key
    assert load_signer(repo.online_key_path(role)).public_key.keyid == old_key
    assert not list(repo.online_key_path(role).parent.glob("*.new"))
    fresh = device(repo, tmp_path / "device")
    fresh.refresh()
    assert fresh.get_targetinfo(TARGET) is not None


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_a_rotation_cut_after_the_new_root_is_finished_by_the_next_refresh(
    repo: TrustRepository, offline: Path, tmp_path: Path, role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.add_target(TARGET, b"model bytes", CUSTOM)
    old_key = load_signer(repo.online_key_path(role)).public_key.keyid
    with monkeypatch.context() as patch:
        patch.setattr(TrustRepository, "_resign_after_rotation", _crash)
        with pytest.raises(_CrashError):
            repo.rotate(role, offline)
    assert repo.versions()["root"] == 2  # the new root is out; the role is still signed
    # with the replaced key, so a device would refuse it until the hub signs it again
    assert role in repo.refresh()  # not forced: the stale signature is enough
    new_key = load_signer(repo.online_key_path(role)).public_key.keyid
    assert new_key != old_key and new_key in repo.root().signed.roles[role].keyids
    repo.verify()
    fresh = device(repo, tmp_path / "device")
    fresh.refresh()
    assert fresh.get_targetinfo(TARGET) is not None


def test_a_root_rotation_cut_after_the_keys_moved_can_be_run_again(
    repo: TrustRepository, offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(TrustRepository, "_write_root", _crash)
        with pytest.raises(_CrashError):
            repo.rotate("root", offline)
    assert repo.versions()["root"] == 1  # old keys in retired-v1, new ones not yet trusted
    assert repo.rotate("root", offline)["root"] == 2  # finds the old keys where they went
    fresh = device(repo, tmp_path / "device")
    fresh.refresh()


def test_rotation_needs_the_threshold_of_root_keys(
    repo: TrustRepository, offline: Path, tmp_path: Path
) -> None:
    (offline / "root-3.pem").unlink()
    assert repo.rotate("snapshot", offline)["root"] == 2  # two of three still reach 2
    (offline / "root-2.pem").unlink()
    with pytest.raises(RootKeysError, match=r"needs 2 of its 3 keys; 1 found in"):
        repo.rotate("snapshot", offline)
    with pytest.raises(KeyFileError, match="does not exist"):
        repo.rotate("targets", tmp_path / "elsewhere")
    with pytest.raises(UnknownRoleError, match="unknown role 'mirror'"):
        repo.rotate("mirror", offline)
    assert repo.versions()["root"] == 2


def test_a_world_readable_key_file_is_refused(repo: TrustRepository, offline: Path) -> None:
    (offline / "root-1.pem").chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        repo.rotate("timestamp", offline)


# -- expiry -----------------------------------------------------------------------------------


def test_timestamp_is_re_signed_when_half_of_its_lifetime_is_gone(tmp_path: Path) -> None:
    clock = Clock()
    repository = TrustRepository(
        tmp_path / "trust", timestamp_expiry=timedelta(hours=2), clock=clock
    )
    repository.init(tmp_path / "offline")
    assert repository.timestamp().signed.expires == clock.now + timedelta(hours=2)
    clock.now += timedelta(minutes=59)
    assert repository.refresh_timestamp() is False
    clock.now += timedelta(minutes=2)
    assert repository.refresh_timestamp() is True
    timestamp = repository.timestamp().signed
    assert timestamp.version == 2 and timestamp.expires == clock.now + timedelta(hours=2)
    assert repository.refresh_timestamp() is False
    assert repository.refresh_timestamp(force=True) is True
    assert repository.timestamp().signed.version == 3
    repository.verify()


def test_refresh_re_signs_snapshot_and_targets_before_they_expire(tmp_path: Path) -> None:
    clock = Clock()
    repository = TrustRepository(tmp_path / "trust", clock=clock)
    repository.init(tmp_path / "offline")
    assert repository.refresh() == []
    clock.now += timedelta(days=4)  # snapshot (7 d) past half, targets (90 d) not
    assert repository.refresh() == ["snapshot", "timestamp"]
    assert repository.versions() == {"root": 1, "targets": 1, "snapshot": 2, "timestamp": 2}
    clock.now += timedelta(days=46)
    assert repository.refresh() == ["targets", "snapshot", "timestamp"]
    assert repository.versions()["targets"] == 2
    repository.verify()


def test_refresher_thread_keeps_the_timestamp_fresh(tmp_path: Path) -> None:
    clock = Clock()
    repository = TrustRepository(tmp_path / "trust", clock=clock)
    repository.init(tmp_path / "offline")
    clock.now += timedelta(hours=13)
    refresher = TimestampRefresher(repository, interval_s=0.05)
    refresher.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while repository.timestamp().signed.version < 2 and datetime.now(UTC) < deadline:
            refresher._stop.wait(0.05)
    finally:
        refresher.stop()
    assert repository.timestamp().signed.version == 2
    assert refresher.refreshes == 1 and refresher.failures == 0


def test_refresher_logs_and_counts_a_failure(tmp_path: Path) -> None:
    clock = Clock()
    repository = TrustRepository(tmp_path / "trust", clock=clock)
    repository.init(tmp_path / "offline")
    clock.now += timedelta(hours=13)
    repository.online_key_path("timestamp").unlink()
    refresher = TimestampRefresher(repository, interval_s=60)
    assert refresher.check() == []
    assert refresher.failures == 1 and "timestamp.pem" in (refresher.last_error or "")


def test_an_expired_timestamp_is_refused_by_the_device(tmp_path: Path) -> None:
    clock = Clock()
    repository = TrustRepository(tmp_path / "trust", clock=clock)
    repository.init(tmp_path / "offline")
    clock.now -= timedelta(days=2)  # everything signed two days ago: timestamp (1 d) expired
    repository.refresh_timestamp(force=True)
    with pytest.raises(tuf_exceptions.ExpiredMetadataError):
        device(repository, tmp_path / "device").refresh()


def test_describe_lists_roles_keys_and_expiry(repo: TrustRepository) -> None:
    document = repo.describe()
    json.dumps(document)
    assert document["roles"]["root"]["threshold"] == 2
    assert document["roles"]["root"]["online"] is False
    assert document["roles"]["timestamp"]["key_file"].endswith("keys/online/timestamp.pem")
    assert document["targets"] == 0 and document["consistent_snapshot"] is True


# -- HTTP -------------------------------------------------------------------------------------


@pytest.fixture
def http(repo: TrustRepository, tmp_path: Path) -> Iterator[Http]:
    with served_api(tmp_path, repo.repository_dir) as client:
        yield client


def test_http_routes_serve_a_release_to_a_real_updater(
    repo: TrustRepository, http: Http, tmp_path: Path
) -> None:
    data = os.urandom(70_000)
    repo.add_target(TARGET, data, CUSTOM)
    home = tmp_path / "device"
    (home / "metadata").mkdir(parents=True)
    (home / "targets").mkdir()
    (home / "metadata" / "root.json").write_bytes(repo.root_json_path.read_bytes())
    updater = Updater(
        str(home / "metadata"),
        f"{http.base}/v1/tuf/metadata/",
        str(home / "targets"),
        f"{http.base}/v1/tuf/targets/",
        fetcher=HttpFetcher(),
        bootstrap=None,
    )
    updater.refresh()
    info = updater.get_targetinfo(TARGET)
    assert info is not None
    assert Path(updater.download_target(info)).read_bytes() == data


def test_a_range_dropped_before_its_first_chunk_closes_its_file(repo: TrustRepository) -> None:
    """An HTTP client that hangs up at once must not leak the hub's file descriptor."""
    import gc

    from edgeops.trust.files import iter_range, open_file

    fds = []
    for _ in range(3):
        fd = open_file(repo.repository_dir, "metadata/timestamp.json")
        fds.append(fd)
        iter_range(fd, 0, 10)  # never iterated
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    fd = open_file(repo.repository_dir, "metadata/timestamp.json")
    chunks = iter_range(fd, 0, 10, chunk_bytes=4)
    assert (
        b"".join(chunks) == (repo.repository_dir / "metadata" / "timestamp.json").read_bytes()[:10]
    )
    with pytest.raises(OSError):
        os.fstat(fd)  # closed at the end of the range


def test_http_ranges(repo: TrustRepository, http: Http) -> None:
    data = bytes(range(256)) * 40
    target = repo.add_target(TARGET, data, CUSTOM)
    url = f"/v1/tuf/targets/digits-mlp/3/litert/{target.hashes['sha256']}.model.tflite"
    whole = http.get(url)
    assert whole.status == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    tail = http.get(url, headers={"Range": "bytes=10000-"})
    assert tail.status == 206 and tail.content == data[10000:]
    assert tail.headers["content-range"] == f"bytes 10000-{len(data) - 1}/{len(data)}"
    middle = http.get(url, headers={"Range": "bytes=5-9"})
    assert middle.status == 206 and middle.content == data[5:10]
    assert middle.headers["content-range"] == f"bytes 5-9/{len(data)}"
    suffix = http.get(url, headers={"Range": "bytes=-3"})
    assert suffix.status == 206 and suffix.content == data[-3:]
    clipped = http.get(url, headers={"Range": "bytes=10238-99999"})
    assert clipped.status == 206 and clipped.content == data[10238:]
    beyond = http.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    several = http.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert several.status == 200 and several.content == data
    meta = http.get("/v1/tuf/metadata/timestamp.json")
    assert meta.status == 200
    assert meta.content == (repo.metadata_dir / "timestamp.json").read_bytes()


def test_http_routes_refuse_missing_files_traversal_and_symlinks(
    repo: TrustRepository, http: Http, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (repo.targets_dir / "link.bin").symlink_to(secret)
    (repo.targets_dir / "linked-dir").symlink_to(tmp_path)
    for url in (
        "/v1/tuf/metadata/99.root.json",
        "/v1/tuf/metadata/..%2F..%2Fkeys%2Fonline%2Ftimestamp.pem",
        "/v1/tuf/targets/..%2Fmetadata%2Froot.json",
        "/v1/tuf/targets/%2E%2E/%2E%2E/keys/online/timestamp.pem",
        "/v1/tuf/targets/link.bin",
        "/v1/tuf/targets/linked-dir/secret.txt",
        "/v1/tuf/targets/",
    ):
        response = http.get(url)
        assert response.status == 404, url
        assert b"private" not in response.content and b"PRIVATE KEY" not in response.content


def test_http_routes_without_a_repository_answer_404(tmp_path: Path) -> None:
    with served_api(tmp_path, None) as client:
        assert client.get("/v1/tuf/metadata/root.json").status == 404


# -- MQTT fetch server ------------------------------------------------------------------------


def _request(path: str, offset: int = 0, length: int = 65536) -> FetchRequest:
    return FetchRequest(req_id=uuid.uuid4().hex, path=path, offset=offset, length=length)


def test_fetch_server_answers_chunks_not_found_and_refusals(repo: TrustRepository) -> None:
    data = os.urandom(100_000)
    target = repo.add_target(TARGET, data, CUSTOM)
    server = FetchServer(repo.repository_dir, MqttEndpoint.parse("mqtt://127.0.0.1:1"))
    stored = f"targets/digits-mlp/3/litert/{target.hashes['sha256']}.model.tflite"
    req_topic = "edgeops/v1/dev/dev-1/fetch/req"

    def ask(request: FetchRequest | bytes, topic: str = req_topic) -> tuple[Any, bytes] | None:
        payload = request if isinstance(request, bytes) else encode_request(request)
        answer = server.handle(topic, payload)
        if answer is None:
            return None
        assert answer[0] == "edgeops/v1/dev/dev-1/fetch/res"
        return decode_response(answer[1])

    chunks = []
    offset = 0
    while offset < len(data):
        answered = ask(_request(stored, offset, 30_000))
        assert answered is not None
        header, body = answered
        assert header.status == "ok" and header.total == len(data) and header.offset == offset
        chunks.append(body)
        offset += len(body)
    assert b"".join(chunks) == data and len(chunks) == 4
    past_end = ask(_request(stored, len(data) + 5))
    assert past_end is not None and past_end[0].status == "ok" and past_end[1] == b""
    missing = ask(_request("metadata/42.root.json"))
    assert missing is not None and missing[0].status == "not_found" and missing[1] == b""
    traversal = json.dumps(
        {"schema": 1, "type": "fetch_req", "req_id": "abc1", "path": "targets/../../keys/online/"
         "timestamp.pem", "offset": 0, "length": 10}
    ).encode()  # fmt: skip
    refused = ask(traversal)
    assert refused is not None and refused[0].status == "bad_request" and refused[1] == b""
    assert refused[0].req_id == "abc1"
    assert ask(b"\x00garbage") is None
    assert ask(b'{"schema": 1, "type": "fetch_req"}') is None
    assert server.handle("edgeops/v1/dev/dev-1/state", encode_request(_request(stored))) is None
    assert server.handle("not/a/device/topic", b"{}") is None
    assert server.stats.dropped == 4 and server.stats.bad_request == 1
    assert server.stats.not_found == 1 and server.stats.ok == 5


def test_fetch_server_refuses_symlinks_inside_the_repository(
    repo: TrustRepository, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("private")
    (repo.targets_dir / "evil.bin").symlink_to(tmp_path / "secret")
    (repo.metadata_dir / "evil.json").symlink_to(repo.online_key_path("timestamp"))
    server = FetchServer(repo.repository_dir, MqttEndpoint.parse("mqtt://127.0.0.1:1"))
    (repo.targets_dir / "a-directory").mkdir()
    for path in ("targets/evil.bin", "metadata/evil.json", "targets/a-directory"):
        answer = server.handle("edgeops/v1/dev/d/fetch/req", encode_request(_request(path)))
        assert answer is not None
        header, body = decode_response(answer[1])
        assert header.status in ("not_found", "bad_request") and body == b"", path


def test_fetch_server_answers_over_mosquitto_on_the_asking_device_only(
    repo: TrustRepository, mosquitto_url: str
) -> None:
    endpoint = MqttEndpoint.parse(mosquitto_url)
    server = FetchServer(repo.repository_dir, endpoint, client_id="hub-fetch-test")
    server.start()
    one = MqttLink(endpoint, client_id="dev-1")
    two = MqttLink(endpoint, client_id="dev-2")
    try:
        for link, name in ((one, "dev-1"), (two, "dev-2")):
            link.subscribe(f"edgeops/v1/dev/{name}/fetch/res", 1)
            link.start(wait_s=10)
            wait_subscribed(link, f"edgeops/v1/dev/{name}/fetch/res")
        request = _request("metadata/root.json", 0, 100)
        one.publish("edgeops/v1/dev/dev-1/fetch/req", encode_request(request), qos=1)
        message = next_message(one, "edgeops/v1/dev/dev-1/fetch/res")
        assert isinstance(message, Message)
        header, body = decode_response(message.payload)
        assert header.req_id == request.req_id and header.status == "ok"
        assert body == repo.root_json_path.read_bytes()[:100]
        assert header.total == repo.root_json_path.stat().st_size
        # dev-2 heard nothing of dev-1's answer, and is answered on its own topic
        request = _request("metadata/timestamp.json")
        two.publish("edgeops/v1/dev/dev-2/fetch/req", encode_request(request), qos=1)
        message = next_message(two, "edgeops/v1/dev/dev-2/fetch/res")
        assert isinstance(message, Message)
        header, body = decode_response(message.payload)
        assert header.req_id == request.req_id
        assert body == (repo.metadata_dir / "timestamp.json").read_bytes()
        # the largest chunk the wire allows, in one frame
        big = repo.add_target(TARGET, os.urandom(300_000), CUSTOM)
        stored = f"targets/digits-mlp/3/litert/{big.hashes['sha256']}.model.tflite"
        request = _request(stored, 1000, MAX_CHUNK_BYTES)
        one.publish("edgeops/v1/dev/dev-1/fetch/req", encode_request(request), qos=1)
        message = next_message(one, "edgeops/v1/dev/dev-1/fetch/res")
        assert isinstance(message, Message)
        header, body = decode_response(message.payload)
        assert header.total == 300_000 and len(body) == MAX_CHUNK_BYTES
        assert body == repo.target_file_path(big).read_bytes()[1000 : 1000 + MAX_CHUNK_BYTES]
        # a malformed request is dropped; the server keeps answering
        one.publish("edgeops/v1/dev/dev-1/fetch/req", b"{not json", qos=1)
        request = _request("metadata/1.snapshot.json")
        one.publish("edgeops/v1/dev/dev-1/fetch/req", encode_request(request), qos=1)
        message = next_message(one, "edgeops/v1/dev/dev-1/fetch/res")
        assert isinstance(message, Message)
        assert decode_response(message.payload)[0].req_id == request.req_id
    finally:
        one.stop()
        two.stop()
        server.stop()
    assert server.stats.dropped >= 1 and server.stats.ok >= 3


# -- the running hub --------------------------------------------------------------------------


@pytest.mark.slow
def test_hub_serve_serves_the_repository_and_keeps_the_timestamp_fresh(
    mosquitto_url: str, isolated_environment: Path, tmp_path: Path
) -> None:
    repository = TrustRepository(
        isolated_environment / "trust", timestamp_expiry=timedelta(seconds=4)
    )
    repository.init(tmp_path / "offline")
    data = os.urandom(5000)
    repository.add_target(TARGET, data, CUSTOM)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {
        **os.environ,
        "EDGEOPS_MQTT_URL": mosquitto_url,
        "EDGEOPS_TRUST_TIMESTAMP_EXPIRY_S": "4",
        "EDGEOPS_TRUST_REFRESH_INTERVAL_S": "0.2",
    }
    hub = subprocess.Popen(
        [str(BIN / "edgeops"), "hub", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    link = MqttLink(MqttEndpoint.parse(mosquitto_url), client_id="served-dev")
    try:
        link.subscribe("edgeops/v1/dev/served-dev/fetch/res", 1)
        link.start(wait_s=10)
        wait_subscribed(link, "edgeops/v1/dev/served-dev/fetch/res")
        request = _request("metadata/root.json")
        answer = None
        for _ in range(60):  # until the hub's fetch server is up
            link.publish("edgeops/v1/dev/served-dev/fetch/req", encode_request(request), qos=1)
            answer = next_message(link, "edgeops/v1/dev/served-dev/fetch/res", timeout_s=1)
            if answer is not None:
                break
        assert isinstance(answer, Message), "the hub never answered a fetch request"
        assert decode_response(answer.payload)[1] == repository.root_json_path.read_bytes()

        client = Http(f"http://127.0.0.1:{port}")
        for _ in range(120):  # the API starts after the fetch server
            try:
                first = client.get("/v1/tuf/metadata/timestamp.json")
                break
            except urllib.error.URLError:
                threading.Event().wait(0.5)
        else:
            pytest.fail("the hub's API never answered")
        assert first.status == 200
        # the refresher re-signs the 4 s timestamp once 2 s are left
        fresh = Metadata[Timestamp].from_bytes(first.content)
        deadline = datetime.now(UTC) + timedelta(seconds=60)
        while fresh.signed.version < 3 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.2)
            fresh = Metadata[Timestamp].from_bytes(
                client.get("/v1/tuf/metadata/timestamp.json").content
            )
        assert fresh.signed.version >= 3
        repository.root().verify_delegate("timestamp", fresh)
        home = tmp_path / "device"
        (home / "metadata").mkdir(parents=True)
        (home / "targets").mkdir()
        (home / "metadata" / "root.json").write_bytes(repository.root_json_path.read_bytes())
        updater = Updater(
            str(home / "metadata"),
            f"{client.base}/v1/tuf/metadata/",
            str(home / "targets"),
            f"{client.base}/v1/tuf/targets/",
            fetcher=HttpFetcher(),
            bootstrap=None,
        )
        updater.refresh()
        info = updater.get_targetinfo(TARGET)
        assert info is not None and Path(updater.download_target(info)).read_bytes() == data
    finally:
        link.stop()
        hub.send_signal(signal.SIGINT)
        try:
            hub.wait(timeout=90)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait()
    stderr = hub.stderr.read() if hub.stderr else ""
    assert hub.returncode == 0, f"the hub did not stop cleanly on SIGINT:\n{stderr}"
    assert "Traceback" not in stderr
