"""The hub's TUF release repository: root, targets, snapshot and timestamp, on disk.

Layout under ``root_dir`` (``Settings.trust_dir``), served byte for byte to devices::

    repository/metadata/root.json            newest root (a copy of <N>.root.json)
    repository/metadata/<N>.root.json        every root version
    repository/metadata/<N>.targets.json     consistent snapshot: versioned targets
    repository/metadata/<N>.snapshot.json    ... and snapshot
    repository/metadata/timestamp.json
    repository/targets/<dir>/<sha256>.<name> target files, named by their hash
    keys/online/{targets,snapshot,timestamp}.pem   online Ed25519 keys (mode 0600)

Root keys are offline: ``root-<n>.pem`` in a directory given to :meth:`TrustRepository.init`
and needed again only to sign a new root (:meth:`TrustRepository.rotate`). Every file is
written to a temp file, fsynced and renamed; a change writes target files, then targets,
then snapshot, then timestamp (and root before all of them), so a reader never sees a
timestamp that names a snapshot not yet on disk. Changes from several threads or processes
are serialised by a lock file.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from device_agent.fsio import atomic_write_bytes
from edgeops.trust.errors import (
    KeyFileError,
    MetadataError,
    RootKeysError,
    ThresholdError,
    TrustAlreadyInitialisedError,
    TrustNotInitialisedError,
    UnknownRoleError,
)
from edgeops.trust.keys import (
    generate_key,
    load_signer,
    read_key_dir,
    signer_for,
    write_private_key,
)
from edgeops.trust.metadata import (
    DEFAULT_EXPIRIES,
    HASH_ALGORITHM,
    ONLINE_ROLES,
    ROLES,
    Expiries,
    check_target_path,
    check_threshold,
    meta_of,
    sign_root,
    signable_custom,
    successor_root,
)

if TYPE_CHECKING:
    from edgeops.config import Settings

__all__ = ["TrustRepository", "repository_for"]

_SERIALIZER = JSONSerializer(compact=True)
_ROOT_KEY_GLOB = "root-*.pem"

S = TypeVar("S", Root, Timestamp, Snapshot, Targets)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TrustRepository:
    """The release repository under ``root_dir``; see the module docstring for the layout.

    ``clock`` returns the current time (aware, UTC); expiry dates are computed from it.
    """

    def __init__(
        self,
        root_dir: Path,
        *,
        expiries: Expiries = DEFAULT_EXPIRIES,
        root_expiry: timedelta | None = None,
        targets_expiry: timedelta | None = None,
        snapshot_expiry: timedelta | None = None,
        timestamp_expiry: timedelta | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.root_dir = Path(root_dir)
        self.expiries = Expiries(
            root=root_expiry or expiries.root,
            targets=targets_expiry or expiries.targets,
            snapshot=snapshot_expiry or expiries.snapshot,
            timestamp=timestamp_expiry or expiries.timestamp,
        )
        for role in ROLES:
            if self.expiries.of(role) <= timedelta(0):
                raise ThresholdError(f"the {role} expiry must be positive")
        self._clock = clock

    # -- places -----------------------------------------------------------------------------

    @property
    def repository_dir(self) -> Path:
        """What devices may read: ``metadata/`` and ``targets/``."""
        return self.root_dir / "repository"

    @property
    def metadata_dir(self) -> Path:
        return self.repository_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.repository_dir / "targets"

    @property
    def online_key_dir(self) -> Path:
        return self.root_dir / "keys" / "online"

    @property
    def default_root_key_dir(self) -> Path:
        """Where ``init`` puts the root keys when no directory is given (move them away!)."""
        return self.root_dir / "offline-root-keys"

    @property
    def root_json_path(self) -> Path:
        """The newest root metadata: the file a device is provisioned with."""
        return self.metadata_dir / "root.json"

    def online_key_path(self, role: str) -> Path:
        if role not in ONLINE_ROLES:
            raise UnknownRoleError(
                f"role {role!r} has no online key; online roles: {', '.join(ONLINE_ROLES)}"
            )
        return self.online_key_dir / f"{role}.pem"

    def exists(self) -> bool:
        """True once :meth:`init` has completed."""
        return self.root_json_path.is_file()

    def target_file_path(self, target: TargetFile) -> Path:
        """Where the bytes of ``target`` are stored (the consistent-snapshot name)."""
        directory, _, name = target.path.rpartition("/")
        stored = f"{target.hashes[HASH_ALGORITHM]}.{name}"
        return self.targets_dir / directory / stored if directory else self.targets_dir / stored

    # -- creating ---------------------------------------------------------------------------

    def init(
        self, root_key_dir: Path | None = None, *, root_keys: int = 1, root_threshold: int = 1
    ) -> Path:
        """Create the repository: ``root_keys`` offline root keys (signing threshold
        ``root_threshold``), one online key for each of targets, snapshot and timestamp, and
        version 1 of every role (no targets). Returns the directory holding the root keys.
        """
        check_threshold("root", root_keys, root_threshold)
        key_dir = Path(root_key_dir) if root_key_dir is not None else self.default_root_key_dir
        with self._locked(creating=True):
            if self.exists():
                raise TrustAlreadyInitialisedError(
                    f"a trust repository already exists at {self.root_dir} (root version "
                    f"{self._load_root().signed.version}); rotate keys with `edgeops keys rotate`"
                )
            clashing = sorted(key_dir.glob(_ROOT_KEY_GLOB)) if key_dir.is_dir() else []
            if clashing:
                raise KeyFileError(
                    f"root key directory {key_dir} already holds {clashing[0].name}; "
                    "choose an empty directory"
                )
            root_signers: list[CryptoSigner] = []
            for index in range(1, root_keys + 1):
                private = generate_key()
                write_private_key(key_dir / f"root-{index}.pem", private)
                root_signers.append(signer_for(private))
            online: dict[str, CryptoSigner] = {}
            for role in ONLINE_ROLES:
                private = generate_key()
                write_private_key(self.online_key_path(role), private)
                online[role] = signer_for(private)

            now = self._clock()
            root = Root(expires=now + self.expiries.root, consistent_snapshot=True)
            for signer in root_signers:
                root.add_key(signer.public_key, "root")
            root.roles["root"].threshold = root_threshold
            for role, signer in online.items():
                root.add_key(signer.public_key, role)
            root_md = sign_root(root, root_signers, None)

            self.targets_dir.mkdir(parents=True, exist_ok=True)
            self._write_chain(Metadata(Targets(expires=now)), online)
            self._write_root(root_md)
        return key_dir

    # -- reading ----------------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        """The newest root metadata."""
        self._require()
        return self._load_root()

    def timestamp(self) -> Metadata[Timestamp]:
        self._require()
        return self._load(self.metadata_dir / "timestamp.json", Timestamp)

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return self._load(self.metadata_dir / f"{version}.snapshot.json", Snapshot)

    def targets_metadata(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta["targets.json"].version
        return self._load(self.metadata_dir / f"{version}.targets.json", Targets)

    def targets(self) -> list[TargetFile]:
        """Every target of the current targets metadata, sorted by path."""
        targets = self.targets_metadata().signed.targets
        return [targets[path] for path in sorted(targets)]

    def get_target(self, path: str) -> TargetFile:
        targets = self.targets_metadata().signed.targets
        if path not in targets:
            raise MetadataError(f"target {path!r} is not in the targets metadata")
        return targets[path]

    def versions(self) -> dict[str, int]:
        """The current version of every role."""
        return {
            "root": self.root().signed.version,
            "targets": self.targets_metadata().signed.version,
            "snapshot": self.snapshot().signed.version,
            "timestamp": self.timestamp().signed.version,
        }

    def describe(self) -> dict[str, Any]:
        """The roles as a JSON document: version, expiry, threshold, key ids, key files."""
        root = self.root().signed
        targets = self.targets_metadata().signed
        documents: dict[str, Signed] = {
            "root": root,
            "targets": targets,
            "snapshot": self.snapshot().signed,
            "timestamp": self.timestamp().signed,
        }
        roles: dict[str, Any] = {}
        for name, signed in documents.items():
            role = root.roles[name]
            roles[name] = {
                "version": signed.version,
                "expires": signed.expires.isoformat(),
                "expired": signed.is_expired(self._clock()),
                "threshold": role.threshold,
                "keyids": list(role.keyids),
                "online": name in ONLINE_ROLES,
                "key_file": str(self.online_key_path(name)) if name in ONLINE_ROLES else None,
            }
        return {
            "trust_dir": str(self.root_dir),
            "metadata_dir": str(self.metadata_dir),
            "root_json": str(self.root_json_path),
            "consistent_snapshot": bool(root.consistent_snapshot),
            "targets": len(targets.targets),
            "roles": roles,
        }

    def verify(self) -> None:
        """Check the whole chain as a device would; raise MetadataError naming what fails.

        Every root version is signed by its predecessor's and its own threshold; targets,
        snapshot and timestamp by the current root's keys; snapshot names the current targets
        (version, length, hash) and timestamp the current snapshot.
        """
        self._require()
        previous: Root | None = None
        version = 1
        while (path := self.metadata_dir / f"{version}.root.json").is_file():
            md = self._load(path, Root)
            if md.signed.version != version:
                raise MetadataError(f"{path.name} holds root version {md.signed.version}")
            result = md.signed.get_root_verification_result(
                previous, md.signed_bytes, md.signatures
            )
            if not result.verified:
                raise MetadataError(f"{path.name} is not signed by enough root keys")
            previous = md.signed
            version += 1
        current = self.root()
        if previous is None or current.signed.version != previous.version:
            raise MetadataError("root.json is not the newest <N>.root.json")
        timestamp = self.timestamp()
        snapshot = self.snapshot()
        targets = self.targets_metadata()
        delegated: list[tuple[str, Metadata[Any]]] = [
            ("timestamp", timestamp),
            ("snapshot", snapshot),
            ("targets", targets),
        ]
        for name, delegate in delegated:
            try:
                current.verify_delegate(name, delegate)
            except UnsignedMetadataError as exc:
                raise MetadataError(f"{name} metadata does not verify: {exc}") from None
        self._check_meta(
            timestamp.signed.snapshot_meta,
            self.metadata_dir / f"{snapshot.signed.version}.snapshot.json",
        )
        self._check_meta(
            snapshot.signed.meta["targets.json"],
            self.metadata_dir / f"{targets.signed.version}.targets.json",
        )
        for target in targets.signed.targets.values():
            stored = self.target_file_path(target)
            if not stored.is_file():
                raise MetadataError(f"target file {stored} of {target.path!r} is missing")
            try:
                with stored.open("rb") as fh:
                    target.verify_length_and_hashes(fh)
            except LengthOrHashMismatchError as exc:
                raise MetadataError(f"target file {stored}: {exc}") from None

    # -- changing ---------------------------------------------------------------------------

    def add_target(self, path: str, data: bytes, custom: Mapping[str, Any]) -> TargetFile:
        """Store ``data`` as target ``path`` with ``custom`` metadata, then sign new targets,
        snapshot and timestamp versions. Re-adding identical bytes and metadata changes nothing.
        """
        check_target_path(path)
        target = TargetFile.from_data(path, data, [HASH_ALGORITHM])
        target.unrecognized_fields["custom"] = signable_custom(custom)
        with self._locked():
            targets_md = self.targets_metadata()
            existing = targets_md.signed.targets.get(path)
            if existing is not None and existing == target:
                return existing
            online = self._online_signers()
            atomic_write_bytes(self.target_file_path(target), data)
            targets_md.signed.targets[path] = target
            self._write_chain(targets_md, online, bump=True)
        return target

    def refresh_timestamp(self, force: bool = False) -> bool:
        """Re-sign timestamp (new version and expiry) if ``force`` or less than half of its
        lifetime is left. Returns True if a new timestamp was written."""
        with self._locked():
            timestamp = self.timestamp()
            if not force and not self._expiring(timestamp.signed, "timestamp"):
                return False
            signer = self._online_signers()["timestamp"]
            timestamp.signed.version += 1
            timestamp.signed.expires = self._clock() + self.expiries.timestamp
            self._sign_write(timestamp, signer, self.metadata_dir / "timestamp.json")
        return True

    def refresh(self, force: bool = False) -> list[str]:
        """Re-sign every online role with less than half of its lifetime left (all with
        ``force``); a new targets or snapshot version brings new versions of the roles after
        it. Returns the roles re-signed."""
        with self._locked():
            targets_md = self.targets_metadata()
            snapshot_md = self.snapshot()
            root_md = self.root()
            # a rotation interrupted after the new root was written leaves roles signed by
            # the replaced key: sign them again now, not when they would expire
            stale = {
                role
                for role, md in (
                    ("targets", targets_md),
                    ("snapshot", snapshot_md),
                    ("timestamp", self.timestamp()),
                )
                if not self._trusted(root_md, role, md)
            }
            force_targets = force or "targets" in stale
            force_snapshot = force or "snapshot" in stale
            if "timestamp" in stale:
                force = True
            if force_targets or self._expiring(targets_md.signed, "targets"):
                self._write_chain(targets_md, self._online_signers(), bump=True)
                return list(ONLINE_ROLES)
            if force_snapshot or self._expiring(snapshot_md.signed, "snapshot"):
                self._write_chain(None, self._online_signers(), bump=True)
                return ["snapshot", "timestamp"]
        return ["timestamp"] if self.refresh_timestamp(force) else []

    def rotate(
        self,
        role: str,
        root_key_dir: Path | None = None,
        *,
        root_keys: int | None = None,
        root_threshold: int | None = None,
    ) -> dict[str, int]:
        """Replace the keys of ``role`` and sign a new root with the offline root keys.

        ``root``: new root keys (``root_keys`` of them, threshold ``root_threshold``; by
        default as many as now) are written into ``root_key_dir`` as ``root-<n>.pem``; the old
        key files move to ``root_key_dir/retired-v<N>/``. The new root ``N+1`` is signed by
        the old keys at the old threshold and the new keys at the new threshold.
        ``targets``/``snapshot``/``timestamp``: a new online key replaces the old one in the
        new root, and that role and the roles after it are signed again with new versions.
        Returns the role versions afterwards.
        """
        if role not in ROLES:
            raise UnknownRoleError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if role != "root" and (root_keys is not None or root_threshold is not None):
            raise ThresholdError("--root-keys and --root-threshold apply to rotating root only")
        key_dir = Path(root_key_dir) if root_key_dir is not None else self.default_root_key_dir
        with self._locked():
            old_root = self.root().signed
            old_signers = self._root_signers(key_dir, old_root)
            new_root, new_keys = successor_root(
                old_root,
                role,
                self._clock() + self.expiries.root,
                root_keys=root_keys,
                root_threshold=root_threshold,
            )
            signers = [signer for _, signer in old_signers.values()]
            if role == "root":
                signers += [signer_for(private) for private in new_keys]
            new_md = sign_root(new_root, signers, old_root)
            if role == "root":  # keys first: a crash now leaves the published root as it was
                retired = key_dir / f"retired-v{old_root.version}"
                retired.mkdir(mode=0o700, exist_ok=True)
                for path, _ in old_signers.values():
                    path.replace(retired / path.name)
                for index, private in enumerate(new_keys, start=1):
                    destination = key_dir / f"root-{index}.pem"
                    if destination.exists():  # a stray key file: keep it, out of the way
                        destination.replace(retired / destination.name)
                    write_private_key(destination, private)
                self._write_root(new_md)
            else:
                # the new key waits beside the old one until the root that trusts it is
                # written: a crash in between leaves a usable pair (see _online_signers)
                pending = self._pending_key_path(role)
                write_private_key(pending, new_keys[0])
                self._write_root(new_md)
                pending.replace(self.online_key_path(role))
                self._resign_after_rotation(role, new_root)
        return self.versions()

    # -- internals --------------------------------------------------------------------------

    def _resign_after_rotation(self, role: str, root: Root) -> None:
        """Sign ``role`` with its new key (new version), and the roles after it."""
        online = self._online_signers(root)
        if role == "targets":
            self._write_chain(self.targets_metadata(), online, bump=True)
        elif role == "snapshot":
            self._write_chain(None, online, bump=True)
        else:
            timestamp = self.timestamp()
            timestamp.signed.version += 1
            timestamp.signed.expires = self._clock() + self.expiries.timestamp
            self._sign_write(timestamp, online["timestamp"], self.metadata_dir / "timestamp.json")

    def _require(self) -> None:
        if not self.exists():
            raise TrustNotInitialisedError(
                f"no trust repository at {self.root_dir}: run `edgeops keys init` first"
            )

    @contextmanager
    def _locked(self, *, creating: bool = False) -> Iterator[None]:
        """Hold the repository's lock (``creating``: the repository need not exist yet)."""
        if not creating:
            self._require()
        self.root_dir.mkdir(parents=True, exist_ok=True)
        with (self.root_dir / ".lock").open("a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _trusted(root: Metadata[Root], role: str, md: Metadata[Any]) -> bool:
        try:
            root.verify_delegate(role, md)
        except UnsignedMetadataError:
            return False
        return True

    def _expiring(self, signed: Signed, role: str) -> bool:
        return signed.expires - self._clock() < self.expiries.of(role) / 2

    def _load_root(self) -> Metadata[Root]:
        return self._load(self.root_json_path, Root)

    def _load(self, path: Path, kind: type[S]) -> Metadata[S]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MetadataError(f"metadata file {path} is missing") from None
        except OSError as exc:
            raise MetadataError(f"metadata file {path} cannot be read: {exc.strerror}") from None
        try:
            md: Metadata[Any] = Metadata.from_bytes(data)
        except DeserializationError as exc:
            raise MetadataError(f"metadata file {path} is malformed: {exc}") from None
        if not isinstance(md.signed, kind):
            raise MetadataError(f"metadata file {path} holds {md.signed.type}, not {kind.type}")
        return md

    def _check_meta(self, meta: MetaFile, path: Path) -> None:
        try:
            with path.open("rb") as fh:
                meta.verify_length_and_hashes(fh)
        except OSError as exc:
            raise MetadataError(f"metadata file {path} cannot be read: {exc.strerror}") from None
        except LengthOrHashMismatchError as exc:
            raise MetadataError(f"{path.name} does not match its meta entry: {exc}") from None

    def _pending_key_path(self, role: str) -> Path:
        path = self.online_key_path(role)
        return path.with_name(path.name + ".new")

    def _settle_pending_key(self, role: str, root: Root) -> None:
        """Finish or undo a rotation of ``role`` that a crash interrupted.

        A ``<role>.pem.new`` whose key the root trusts replaces the old key file (the crash
        came after the new root was written); one the root does not trust is dropped (the
        crash came before, and the published root still names the old key).
        """
        pending = self._pending_key_path(role)
        if not pending.exists():
            return
        if load_signer(pending).public_key.keyid in root.roles[role].keyids:
            pending.replace(self.online_key_path(role))
        else:
            pending.unlink()

    def _online_signers(self, root: Root | None = None) -> dict[str, CryptoSigner]:
        root = root if root is not None else self.root().signed
        signers: dict[str, CryptoSigner] = {}
        for role in ONLINE_ROLES:
            self._settle_pending_key(role, root)
            path = self.online_key_path(role)
            signer = load_signer(path)
            if signer.public_key.keyid not in root.roles[role].keyids:
                raise KeyFileError(
                    f"online {role} key {path} (key id {signer.public_key.keyid[:12]}) is not "
                    f"a {role} key of root version {root.version}"
                )
            signers[role] = signer
        return signers

    def _root_signers(self, key_dir: Path, root: Root) -> dict[str, tuple[Path, CryptoSigner]]:
        if not key_dir.is_dir():
            raise KeyFileError(
                f"root key directory {key_dir} does not exist; pass --root-key-dir with the "
                "offline root keys"
            )
        found = read_key_dir(key_dir)
        interrupted = key_dir / f"retired-v{root.version}"
        if interrupted.is_dir():  # a root rotation moved these keys, then stopped
            found = {**read_key_dir(interrupted), **found}
        role = root.roles["root"]
        usable = {keyid: found[keyid] for keyid in role.keyids if keyid in found}
        if len(usable) < role.threshold:
            raise RootKeysError(
                f"root version {root.version} needs {role.threshold} of its "
                f"{len(role.keyids)} keys; {len(usable)} found in {key_dir}"
            )
        return usable

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(_SERIALIZER)
        atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.root.json", data)
        atomic_write_bytes(self.root_json_path, data)

    def _sign_write(self, md: Metadata[Any], signer: CryptoSigner, path: Path) -> bytes:
        md.signatures.clear()
        md.sign(signer)
        data = md.to_bytes(_SERIALIZER)
        atomic_write_bytes(path, data)
        return data

    def _write_chain(
        self,
        targets_md: Metadata[Targets] | None,
        online: Mapping[str, CryptoSigner],
        *,
        bump: bool = False,
    ) -> None:
        """Sign and write targets (unless None), then snapshot, then timestamp.

        With ``bump``, each written role gets its current version + 1; otherwise (at init)
        version 1 of snapshot and timestamp are made from nothing.
        """
        now = self._clock()
        snapshot_md: Metadata[Snapshot]
        timestamp_md: Metadata[Timestamp]
        if bump:
            snapshot_md = self.snapshot()
            timestamp_md = self.timestamp()
            snapshot_md.signed.version += 1
            timestamp_md.signed.version += 1
        else:
            snapshot_md = Metadata(Snapshot(expires=now))
            timestamp_md = Metadata(Timestamp(expires=now))
        if targets_md is not None:
            if bump:
                targets_md.signed.version += 1
            targets_md.signed.expires = now + self.expiries.targets
            version = targets_md.signed.version
            data = self._sign_write(
                targets_md, online["targets"], self.metadata_dir / f"{version}.targets.json"
            )
            snapshot_md.signed.meta["targets.json"] = meta_of(version, data)
        snapshot_md.signed.expires = now + self.expiries.snapshot
        version = snapshot_md.signed.version
        data = self._sign_write(
            snapshot_md, online["snapshot"], self.metadata_dir / f"{version}.snapshot.json"
        )
        timestamp_md.signed.snapshot_meta = meta_of(version, data)
        timestamp_md.signed.expires = now + self.expiries.timestamp
        self._sign_write(timestamp_md, online["timestamp"], self.metadata_dir / "timestamp.json")


def repository_for(settings: Settings) -> TrustRepository:
    """The release repository of ``settings``: ``trust_dir``, with its configured expiries."""
    return TrustRepository(
        settings.trust_dir,
        expiries=Expiries(
            root=timedelta(seconds=settings.trust_root_expiry_s),
            targets=timedelta(seconds=settings.trust_targets_expiry_s),
            snapshot=timedelta(seconds=settings.trust_snapshot_expiry_s),
            timestamp=timedelta(seconds=settings.trust_timestamp_expiry_s),
        ),
    )
