"""Pure pieces of the release repository: roles, lifetimes, checks, building a new root.

Nothing here touches the disk: :mod:`edgeops.trust.repository` loads and stores, these
functions decide what the metadata says.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile, Root

from edgeops.trust.errors import MetadataError, RootKeysError, TargetPathError, ThresholdError
from edgeops.trust.keys import generate_key, public_key

__all__ = [
    "DEFAULT_EXPIRIES",
    "HASH_ALGORITHM",
    "MAX_ROOT_KEYS",
    "MAX_TARGET_PATH_LENGTH",
    "ONLINE_ROLES",
    "ROLES",
    "Expiries",
    "check_target_path",
    "check_threshold",
    "meta_of",
    "sign_root",
    "signable_custom",
    "successor_root",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
HASH_ALGORITHM = "sha256"
MAX_ROOT_KEYS = 32
MAX_TARGET_PATH_LENGTH = 400  # "targets/" + 64 hex + "." + path stays within the wire's 512
_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Expiries:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value


DEFAULT_EXPIRIES = Expiries()


def check_target_path(path: str) -> str:
    """``path`` if it is a safe relative target path, else TargetPathError naming it."""
    if not isinstance(path, str) or not path:
        raise TargetPathError(f"target path {path!r} is empty")
    if len(path) > MAX_TARGET_PATH_LENGTH:
        raise TargetPathError(
            f"target path {path[:60]!r}... is {len(path)} characters long; "
            f"at most {MAX_TARGET_PATH_LENGTH}"
        )
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise TargetPathError(
                f"target path {path!r} is not a relative path of segments made of "
                "letters, digits, '.', '_' and '-'"
            )
    return path


def check_threshold(role: str, keys: int, threshold: int) -> None:
    """Raise ThresholdError unless ``threshold`` of ``keys`` keys can work."""
    if keys < 1 or keys > MAX_ROOT_KEYS:
        raise ThresholdError(f"{role} needs between 1 and {MAX_ROOT_KEYS} keys, got {keys}")
    if threshold < 1 or threshold > keys:
        raise ThresholdError(
            f"{role} threshold {threshold} is impossible with {keys} key(s): choose 1 to {keys}"
        )


def meta_of(version: int, data: bytes) -> MetaFile:
    """The snapshot/timestamp entry for a metadata file: version, length and sha256."""
    return MetaFile(
        version=version,
        length=len(data),
        hashes={HASH_ALGORITHM: hashlib.sha256(data).hexdigest()},
    )


def signable_custom(custom: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``custom`` that TUF can sign.

    Signatures cover the canonical JSON form of the metadata (OLPC canonical JSON), which has
    no floating-point numbers: custom metadata holds only objects, arrays, strings, integers,
    booleans and null (a float is refused here, naming where it is).
    """
    try:
        copied = json.loads(json.dumps(dict(custom), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"custom metadata is not plain JSON: {exc}") from None
    if not isinstance(copied, dict):
        raise MetadataError("custom metadata must be a JSON object")
    where = _first_float(copied, "custom")
    if where is not None:
        raise MetadataError(
            f"custom metadata holds a floating-point number at {where}; TUF's canonical JSON "
            "cannot sign floats (store such documents as JSON text)"
        )
    return copied


def _first_float(value: Any, where: str) -> str | None:
    if isinstance(value, float):
        return where
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_float(item, f"{where}.{key}")
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_float(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def successor_root(
    previous: Root,
    role: str,
    expires: datetime,
    *,
    root_keys: int | None = None,
    root_threshold: int | None = None,
) -> tuple[Root, list[Ed25519PrivateKey]]:
    """Root version N+1 with new keys for ``role``, and those new private keys.

    For ``root``: ``root_keys`` new keys (default: as many as now) with ``root_threshold``
    (default: as now, at most the key count). For an online role: one new key replacing the
    role's keys. Every other key and threshold stays.
    """
    if role not in ROLES:
        raise MetadataError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    root = Root.from_dict(copy.deepcopy(previous.to_dict()))  # to_dict shares its lists
    root.version = previous.version + 1
    root.expires = expires
    count, threshold = 1, previous.roles[role].threshold
    if role == "root":
        count = root_keys if root_keys is not None else len(previous.roles["root"].keyids)
        threshold = root_threshold if root_threshold is not None else min(threshold, count)
        check_threshold("root", count, threshold)
    for keyid in list(root.roles[role].keyids):
        root.revoke_key(keyid, role)
    private_keys = [generate_key() for _ in range(count)]
    for private in private_keys:
        root.add_key(public_key(private), role)
    root.roles[role].threshold = threshold
    return root, private_keys


def sign_root(root: Root, signers: Iterable[Signer], previous: Root | None) -> Metadata[Root]:
    """``root`` signed by ``signers``; RootKeysError unless it verifies as the successor of
    ``previous`` (the previous root's threshold and its own)."""
    md = Metadata(root)
    for signer in signers:
        md.sign(signer, append=True)
    result = root.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    if not result.verified:
        against = f"against root {previous.version}" if previous is not None else "by itself"
        raise RootKeysError(
            f"root {root.version} would not verify {against}: signed by "
            f"{len(result.first.signed)}/{result.first.threshold} previous and "
            f"{len(result.second.signed)}/{result.second.threshold} own root keys"
        )
    return md
