"""The device's TUF client over the MQTT fetch protocol (and HTTP), against real metadata.

The repository is built in the test with ``tuf.api.metadata`` (Ed25519 keys, consistent
snapshots, the layout the hub serves), served by the hub's :class:`FetchServer` on a private
Mosquitto; the device side is :class:`TrustClient` over :class:`MqttFetcher`. Each refusal
must come out as a :class:`TrustError` of the specific kind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from device_agent.fetch import HttpFetcher
from device_agent.link import MqttEndpoint
from device_agent.updater.errors import TrustError, UnknownTargetError, UpdateRefused
from device_agent.updater.trust import TrustClient, trust_error
from edgeops.trust.server import FetchServer
from tests.test_fetch import Device, RangeServer

TARGET = "digits/1/litert/model.tflite"
CONTRACT = {"edgeops": {"runtime": "litert", "hardware": {}, "min_free_memory_bytes": None}}


def expiry(days: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


class TufRepo:
    """A TUF repository on disk in the hub's layout (``metadata/``, ``targets/``)."""

    def __init__(self, directory: Path, *, root_keys: int = 1, root_threshold: int = 1) -> None:
        self.directory = directory
        self.metadata_dir = directory / "metadata"
        self.metadata_dir.mkdir(parents=True)
        self.signers: dict[str, list[Signer]] = {
            role: [CryptoSigner.generate_ed25519()] for role in ("targets", "snapshot", "timestamp")
        }
        self.signers["root"] = [CryptoSigner.generate_ed25519() for _ in range(root_keys)]
        root = Root(expires=expiry(365), consistent_snapshot=True)
        for role, signers in self.signers.items():
            for signer in signers:
                root.add_key(signer.public_key, role)
        root.roles["root"].threshold = root_threshold
        self.root = Metadata(root)
        self.targets = Metadata(Targets(expires=expiry(90)))
        self.snapshot = Metadata(Snapshot(expires=expiry(7)))
        self.timestamp = Metadata(Timestamp(expires=expiry(1)))
        self.write_root()
        self.publish(bump=False)

    @staticmethod
    def signed(metadata: Metadata[Any], signers: Sequence[Signer]) -> bytes:
        metadata.signatures.clear()
        for signer in signers:
            metadata.sign(signer, append=True)
        return metadata.to_bytes(JSONSerializer())

    def write(self, name: str, data: bytes) -> None:
        (self.metadata_dir / name).write_bytes(data)

    def read(self, name: str) -> bytes:
        return (self.metadata_dir / name).read_bytes()

    def write_root(self, signers: Sequence[Signer] | None = None) -> bytes:
        data = self.signed(self.root, self.signers["root"] if signers is None else signers)
        self.write(f"{self.root.signed.version}.root.json", data)
        self.write("root.json", data)
        return data

    def target_file(self, path: str, data: bytes) -> Path:
        directory, _, name = path.rpartition("/")
        return self.directory / "targets" / directory / f"{hashlib.sha256(data).hexdigest()}.{name}"

    def add_target(self, path: str, data: bytes, custom: dict[str, Any] | None = None) -> None:
        target = TargetFile.from_data(path, data, ["sha256"])
        target.unrecognized_fields["custom"] = custom if custom is not None else CONTRACT
        self.targets.signed.targets[path] = target
        file = self.target_file(path, data)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)

    def publish(
        self,
        *,
        bump: bool = True,
        targets_signers: Sequence[Signer] | None = None,
        timestamp_expires: datetime | None = None,
    ) -> None:
        """Sign and write targets, snapshot and timestamp (new versions unless ``bump=False``)."""
        targets, snapshot, timestamp = self.targets, self.snapshot, self.timestamp
        if bump:
            targets.signed.version += 1
            snapshot.signed.version += 1
            timestamp.signed.version += 1
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        timestamp.signed.expires = timestamp_expires or expiry(1)
        signers = self.signers["targets"] if targets_signers is None else targets_signers
        self.write(f"{targets.signed.version}.targets.json", self.signed(targets, signers))
        self.write(
            f"{snapshot.signed.version}.snapshot.json",
            self.signed(snapshot, self.signers["snapshot"]),
        )
        self.write("timestamp.json", self.signed(timestamp, self.signers["timestamp"]))


@pytest.fixture
def repo(tmp_path: Path) -> TufRepo:
    repository = TufRepo(tmp_path / "repository")
    repository.add_target(TARGET, b"model bytes " * 1000)
    repository.publish()
    return repository


@pytest.fixture
def hub(mosquitto_url: str, repo: TufRepo) -> Iterator[FetchServer]:
    server = FetchServer(repo.directory, MqttEndpoint.parse(mosquitto_url))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def device(mosquitto_url: str) -> Iterator[Device]:
    dev = Device(mosquitto_url)
    yield dev
    dev.stop()


def provision(tmp_path: Path, repo: TufRepo, root_version: int = 1) -> Path:
    """The device's trust directory, holding the root it was provisioned with."""
    metadata_dir = tmp_path / "device" / "trust" / "metadata"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo.metadata_dir / f"{root_version}.root.json", metadata_dir / "root.json")
    return metadata_dir


def mqtt_client(tmp_path: Path, device: Device, **fetcher_options: Any) -> TrustClient:
    metadata_dir = tmp_path / "device" / "trust" / "metadata"
    fetcher = device.make_fetcher(partial_dir=tmp_path / "device" / "partial", **fetcher_options)
    return TrustClient(metadata_dir, fetcher, tmp_path / "device" / "targets")


def refused(client: TrustClient, path: str = TARGET) -> TrustError:
    with pytest.raises(TrustError) as caught:
        client.download(client.get_target(path))
    return caught.value


# -- what is accepted ---------------------------------------------------------------------------


def test_a_released_model_is_looked_up_and_downloaded_verified(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path, int8_model_dir: Path
) -> None:
    model = (int8_model_dir / "model.tflite").read_bytes()
    repo.add_target("digits/2/litert/model.tflite", model, {"edgeops": {"runtime": "litert"}})
    repo.publish()
    provision(tmp_path, repo)
    client = mqtt_client(tmp_path, device)

    client.refresh()
    target = client.get_target("digits/2/litert/model.tflite")
    assert target.length == len(model)
    assert target.custom == {"edgeops": {"runtime": "litert"}}
    path = client.download(target)
    assert path.read_bytes() == model
    assert path.parent == tmp_path / "device" / "targets"

    fetcher = device.fetcher
    assert fetcher is not None
    requests = fetcher.counters.requests
    assert client.download(target) == path  # verified copy on disk: no transfer
    assert fetcher.counters.requests == requests
    assert list((tmp_path / "device" / "partial").glob("*.part")) == []


def test_a_target_not_in_the_signed_metadata_is_refused(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    provision(tmp_path, repo)
    client = mqtt_client(tmp_path, device)
    with pytest.raises(UnknownTargetError, match="not listed") as caught:
        client.get_target("digits/9/litert/model.tflite")
    assert isinstance(caught.value, UpdateRefused) and isinstance(caught.value, TrustError)
    assert caught.value.kind == "unknown_target"


def test_the_same_repository_over_http(repo: TufRepo, tmp_path: Path) -> None:
    server = RangeServer(repo.directory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        metadata_dir = provision(tmp_path, repo)
        fetcher = HttpFetcher(server.url, partial_dir=tmp_path / "partial")
        client = TrustClient(metadata_dir, fetcher, tmp_path / "targets")
        path = client.download(client.get_target(TARGET))
        assert path.read_bytes() == b"model bytes " * 1000
    finally:
        server.shutdown()
        server.server_close()


# -- the attacks, each with its own kind --------------------------------------------------------


def test_a_tampered_artifact_byte_is_a_hash_mismatch(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    file = repo.target_file(TARGET, b"model bytes " * 1000)
    data = bytearray(file.read_bytes())
    data[500] ^= 0x01
    file.write_bytes(bytes(data))
    provision(tmp_path, repo)
    error = refused(mqtt_client(tmp_path, device))
    assert error.kind == "hash_mismatch"
    assert TARGET in str(error)
    assert list((tmp_path / "device" / "partial").glob("*.part")) == []  # next try: afresh


@pytest.mark.parametrize("change", [b"extra", -100])
def test_an_artifact_of_the_wrong_length_is_a_length_mismatch(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path, change: bytes | int
) -> None:
    file = repo.target_file(TARGET, b"model bytes " * 1000)
    data = file.read_bytes()
    file.write_bytes(data + change if isinstance(change, bytes) else data[:change])
    provision(tmp_path, repo)
    assert refused(mqtt_client(tmp_path, device)).kind == "length_mismatch"


def test_endless_metadata_is_a_length_mismatch(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    repo.write("timestamp.json", b" " * 1_000_000)
    provision(tmp_path, repo)
    client = mqtt_client(tmp_path, device)
    with pytest.raises(TrustError) as caught:
        client.refresh()
    assert caught.value.kind == "length_mismatch"
    fetcher = device.fetcher
    assert fetcher is not None and fetcher.bytes_received_payload < 70_000


def test_targets_signed_by_an_unauthorised_key_are_a_bad_signature(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    repo.publish(targets_signers=[CryptoSigner.generate_ed25519()])
    provision(tmp_path, repo)
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "bad_signature"
    assert "targets" in str(caught.value)


def test_a_new_root_below_the_threshold_is_refused(
    mosquitto_url: str, device: Device, tmp_path: Path
) -> None:
    repo = TufRepo(tmp_path / "repository", root_keys=2, root_threshold=2)
    server = FetchServer(repo.directory, MqttEndpoint.parse(mosquitto_url))
    server.start()
    try:
        provision(tmp_path, repo)
        repo.root.signed.version = 2
        repo.write_root(signers=repo.signers["root"][:1])  # one of the two keys
        with pytest.raises(TrustError) as caught:
            mqtt_client(tmp_path, device).refresh()
        assert caught.value.kind == "below_threshold"
        assert "1/2" in str(caught.value)

        repo.write_root()  # both keys: accepted
        mqtt_client(tmp_path, device).refresh()
        assert (tmp_path / "device/trust/metadata/root.json").resolve().name == "2.root.json"
    finally:
        server.stop()


def test_rolling_back_timestamp_or_snapshot_is_refused(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    provision(tmp_path, repo)
    old_timestamp = repo.read("timestamp.json")
    old_snapshot_version = repo.snapshot.signed.version
    repo.publish()
    mqtt_client(tmp_path, device).refresh()  # the device has seen the newer release

    repo.write("timestamp.json", old_timestamp)
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "rollback"
    assert "timestamp" in str(caught.value)

    # a newer timestamp naming an older snapshot
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.snapshot_meta = MetaFile(version=old_snapshot_version)
    repo.write("timestamp.json", repo.signed(repo.timestamp, repo.signers["timestamp"]))
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "rollback"
    assert "snapshot" in str(caught.value)


def test_an_older_targets_version_in_a_new_snapshot_is_a_rollback(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    provision(tmp_path, repo)
    repo.publish()
    mqtt_client(tmp_path, device).refresh()
    repo.snapshot.signed.version += 1
    repo.snapshot.signed.meta["targets.json"] = MetaFile(version=repo.targets.signed.version - 1)
    repo.write(
        f"{repo.snapshot.signed.version}.snapshot.json",
        repo.signed(repo.snapshot, repo.signers["snapshot"]),
    )
    repo.timestamp.signed.version += 1
    repo.timestamp.signed.snapshot_meta = MetaFile(version=repo.snapshot.signed.version)
    repo.write("timestamp.json", repo.signed(repo.timestamp, repo.signers["timestamp"]))
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "rollback"


def test_an_expired_timestamp_replayed_is_refused(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    repo.publish(timestamp_expires=datetime.now(UTC) - timedelta(hours=1))
    provision(tmp_path, repo)
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "expired"


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_metadata_mixed_from_two_releases_is_refused(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path, role: str
) -> None:
    provision(tmp_path, repo)
    old_version = getattr(repo, role).signed.version
    repo.publish()
    new_version = getattr(repo, role).signed.version
    repo.write(f"{new_version}.{role}.json", repo.read(f"{old_version}.{role}.json"))
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "mix_and_match"


def test_after_root_rotation_the_old_root_key_is_refused_and_the_new_one_accepted(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    metadata_dir = provision(tmp_path, repo)
    old_key = repo.signers["root"][0]
    new_key = CryptoSigner.generate_ed25519()
    root = repo.root.signed
    root.revoke_key(old_key.public_key.keyid, "root")
    root.add_key(new_key.public_key, "root")
    root.version = 2
    repo.write_root(signers=[old_key, new_key])  # signed by the old root and the new one
    mqtt_client(tmp_path, device).refresh()
    assert (metadata_dir / "root.json").resolve().name == "2.root.json"

    root.version = 3
    repo.write_root(signers=[old_key])  # the revoked key alone
    with pytest.raises(TrustError) as caught:
        mqtt_client(tmp_path, device).refresh()
    assert caught.value.kind == "bad_signature"
    assert (metadata_dir / "root.json").resolve().name == "2.root.json"

    repo.write_root(signers=[new_key])
    client = mqtt_client(tmp_path, device)
    client.refresh()
    assert (metadata_dir / "root.json").resolve().name == "3.root.json"
    assert client.download(client.get_target(TARGET)).read_bytes() == b"model bytes " * 1000


def test_no_answer_from_the_hub_is_a_transport_error(
    device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    provision(tmp_path, repo)  # no fetch server runs
    client = mqtt_client(tmp_path, device, timeout_s=0.2, deadline_s=1.0)
    with pytest.raises(TrustError) as caught:
        client.refresh()
    assert caught.value.kind == "transport"


# -- the trust anchor ---------------------------------------------------------------------------


def test_the_newest_verified_root_is_used_when_root_json_is_lost(
    hub: FetchServer, device: Device, repo: TufRepo, tmp_path: Path
) -> None:
    metadata_dir = provision(tmp_path, repo)
    mqtt_client(tmp_path, device).refresh()
    (metadata_dir / "root.json").unlink()  # a power cut between ngclient's unlink and symlink
    client = mqtt_client(tmp_path, device)
    client.refresh()
    assert client.get_target(TARGET).length == len(b"model bytes " * 1000)


def test_a_device_without_a_root_is_refused(tmp_path: Path) -> None:
    fetcher = HttpFetcher("http://127.0.0.1:9")
    with pytest.raises(UpdateRefused, match="trust_root_file") as caught:
        TrustClient(tmp_path / "metadata", fetcher, tmp_path / "targets")
    assert caught.value.kind == "no_trusted_root"


def test_a_corrupt_provisioned_root_is_refused(tmp_path: Path) -> None:
    metadata_dir = tmp_path / "metadata"
    metadata_dir.mkdir()
    (metadata_dir / "root.json").write_bytes(b"{not json")
    client = TrustClient(metadata_dir, HttpFetcher("http://127.0.0.1:9"), tmp_path / "targets")
    with pytest.raises(TrustError) as caught:
        client.refresh()
    assert caught.value.kind == "bad_signature"


# -- the mapping itself -------------------------------------------------------------------------


MAPPING: list[tuple[Exception, bool, str]] = [
    (tuf_exceptions.DownloadLengthMismatchError("more"), False, "length_mismatch"),
    (tuf_exceptions.SlowRetrievalError("slow"), False, "transport"),
    (tuf_exceptions.DownloadHTTPError("gone", 404), False, "transport"),
    (tuf_exceptions.UnsignedMetadataError("root was signed by 1/2 keys"), False, "below_threshold"),
    (
        tuf_exceptions.UnsignedMetadataError("targets was signed by 0/1 keys"),
        False,
        "bad_signature",
    ),
    (tuf_exceptions.ExpiredMetadataError("timestamp.json is expired"), False, "expired"),
    (
        tuf_exceptions.BadVersionNumberError("New timestamp version 1 must be >= 2"),
        False,
        "rollback",
    ),
    (tuf_exceptions.BadVersionNumberError("New snapshot version must be >= 2"), False, "rollback"),
    (
        tuf_exceptions.BadVersionNumberError("Expected targets.json version 1, got 2."),
        False,
        "rollback",
    ),
    (
        tuf_exceptions.BadVersionNumberError("Expected snapshot version 2, got 1"),
        False,
        "mix_and_match",
    ),
    (tuf_exceptions.BadVersionNumberError("Expected targets v2, got v1."), False, "mix_and_match"),
    (
        tuf_exceptions.BadVersionNumberError("Expected root version 2 instead got 3"),
        False,
        "mix_and_match",
    ),
    (
        tuf_exceptions.LengthOrHashMismatchError("Observed hash a does not match"),
        False,
        "mix_and_match",
    ),
    (
        tuf_exceptions.LengthOrHashMismatchError("Observed hash a does not match"),
        True,
        "hash_mismatch",
    ),
    (
        tuf_exceptions.LengthOrHashMismatchError("Observed length 1 does not match"),
        True,
        "length_mismatch",
    ),
    (
        tuf_exceptions.RepositoryError("New snapshot is missing info for 'targets.json'"),
        False,
        "rollback",
    ),
    (tuf_exceptions.RepositoryError("Expected 'targets', got 'snapshot'"), False, "mix_and_match"),
    (DeserializationError("not json"), False, "bad_signature"),
]


@pytest.mark.parametrize(("error", "target", "kind"), MAPPING)
def test_every_tuf_error_maps_to_one_kind(error: Exception, target: bool, kind: str) -> None:
    mapped = trust_error(error, "somewhere", target=target)
    assert mapped.kind == kind
    assert str(mapped).startswith("somewhere: ")


# -- review fixes -------------------------------------------------------------------------------


@pytest.fixture
def http_hub(repo: TufRepo) -> Iterator[RangeServer]:
    server = RangeServer(repo.directory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_newest_parseable_root_in_the_history_is_trusted(repo: TufRepo, tmp_path: Path) -> None:
    metadata_dir = provision(tmp_path, repo)  # root.json: the factory root, copied back
    history = metadata_dir / "root_history"
    history.mkdir()
    v1 = repo.read("1.root.json")
    repo.root.signed.version = 2
    v2 = repo.write_root()
    (history / "1.root.json").write_bytes(v1)
    (history / "2.root.json").write_bytes(v2)
    (history / "3.root.json").write_bytes(b"\0" * 512)  # a power cut before it reached disk
    client = TrustClient(metadata_dir, HttpFetcher("http://127.0.0.1:9"), tmp_path / "targets")
    assert client._root_bytes() == v2
    (history / "2.root.json").write_bytes(b"")
    assert client._root_bytes() == v1
    (metadata_dir / "root.json").write_bytes(v2)
    for path in history.iterdir():
        path.write_bytes(b"{}")
    assert client._root_bytes() == v2  # no root in the history parses: root.json


def test_metadata_and_the_root_history_are_written_durably(
    http_hub: RangeServer, repo: TufRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device_agent.updater import trust

    written: list[str] = []
    real = trust.atomic_write_bytes

    def spy(path: Path, data: bytes) -> None:
        written.append(path.relative_to(metadata_dir).as_posix())
        real(path, data)

    monkeypatch.setattr(trust, "atomic_write_bytes", spy)
    metadata_dir = provision(tmp_path, repo)
    TrustClient(metadata_dir, HttpFetcher(http_hub.url), tmp_path / "targets").refresh()
    assert written == [
        "root_history/1.root.json", "timestamp.json", "snapshot.json", "targets.json",
    ]  # fmt: skip
    assert (metadata_dir / "root.json").resolve() == metadata_dir / "root_history/1.root.json"


def test_the_trust_directories_are_created_durably(
    repo: TufRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata_dir = provision(tmp_path, repo)
    fsynced: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        fsynced.append(Path(f"/proc/self/fd/{fd}").readlink())
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    targets_dir = metadata_dir.parent / "targets"
    TrustClient(metadata_dir, HttpFetcher("http://127.0.0.1:9"), targets_dir)._new_updater()
    assert targets_dir.is_dir() and metadata_dir.parent in fsynced  # the entry of targets/
    assert metadata_dir in fsynced  # the entries of root_history/ and root.json


def test_a_resumed_download_that_fails_verification_starts_over_once(
    http_hub: RangeServer, repo: TufRepo, tmp_path: Path
) -> None:
    data = b"model bytes " * 1000
    fetcher = HttpFetcher(http_hub.url, partial_dir=tmp_path / "partial")
    client = TrustClient(provision(tmp_path, repo), fetcher, tmp_path / "targets")
    target = client.get_target(TARGET)
    served = repo.target_file(TARGET, data).relative_to(repo.directory / "targets")
    partial = fetcher.partial_path(fetcher.target_base_url + served.as_posix())
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:4000] + b"\0" * 2000)  # a power cut's zero-filled tail
    assert client.download(target).read_bytes() == data
    assert not partial.exists()

    # a tampered artifact is refused after that one fresh try
    (tmp_path / "targets" / quote(TARGET, safe="")).unlink()
    file = repo.target_file(TARGET, data)
    file.write_bytes(data[:-1] + b"!")
    partial.write_bytes(data[:4000])
    ranges = len(http_hub.ranges)
    assert refused(client).kind == "hash_mismatch"
    assert http_hub.ranges[ranges:] == ["bytes=4000-11999", "bytes=0-11999"]
    assert not partial.exists()


def test_a_chunk_damaged_on_the_way_is_downloaded_again_once(
    http_hub: RangeServer, repo: TufRepo, tmp_path: Path
) -> None:
    class DamagedOnce(HttpFetcher):
        """Flips one byte of the first target chunk it receives (a link that corrupts)."""

        damaged = 0

        def _checked(self, url: str, offset: int, max_length: int | None) -> Iterator[bytes]:
            for data in super()._checked(url, offset, max_length):
                if not self.damaged and "/targets/" in url:
                    self.damaged += 1
                    data = bytes([data[0] ^ 0x01]) + data[1:]
                yield data

    data = b"model bytes " * 1000
    repo.target_file(TARGET, data)
    fetcher = DamagedOnce(http_hub.url, partial_dir=tmp_path / "partial")
    client = TrustClient(provision(tmp_path, repo), fetcher, tmp_path / "targets")
    ranges = len(http_hub.ranges)
    assert client.download(client.get_target(TARGET)).read_bytes() == data
    assert fetcher.damaged == 1
    # the target (12,000 bytes) was asked for twice, whole: a fresh try after the mismatch
    assert http_hub.ranges[ranges:].count("bytes=0-11999") == 2
