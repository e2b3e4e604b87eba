"""Ed25519 signing keys for the release repository: generate, store (PEM, mode 0600), load.

Online keys (targets, snapshot, timestamp) live in ``<trust dir>/keys/online/<role>.pem`` so
the hub can sign unattended. Root keys are offline: ``root-<n>.pem`` files in a directory the
operator keeps elsewhere, needed only to sign a new root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from device_agent.fsio import atomic_write_bytes
from edgeops.trust.errors import KeyFileError

__all__ = [
    "KEY_FILE_MODE",
    "generate_key",
    "load_private_key",
    "load_signer",
    "public_key",
    "read_key_dir",
    "signer_for",
    "write_private_key",
]

KEY_FILE_MODE = 0o600


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_key(private_key: Ed25519PrivateKey) -> SSlibKey:
    """The TUF public key (with its key id) of ``private_key``."""
    return SSlibKey.from_crypto(private_key.public_key())


def signer_for(private_key: Ed25519PrivateKey) -> CryptoSigner:
    """A TUF signer for ``private_key``; its key id matches :func:`public_key`."""
    return CryptoSigner(private_key, public_key(private_key))


def write_private_key(path: Path, private_key: Ed25519PrivateKey) -> None:
    """Store ``private_key`` as unencrypted PKCS#8 PEM, atomically, readable by the owner only."""
    pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, pem, mode=KEY_FILE_MODE)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from a PEM file (raises KeyFileError naming the file)."""
    try:
        if path.is_symlink():
            raise KeyFileError(f"key file {path} is a symbolic link; refusing to read it")
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"key file {path} is not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 and os.name == "posix":
        raise KeyFileError(
            f"key file {path} is readable by others (mode {mode:o}); chmod 600 {path}"
        )
    return key


def load_signer(path: Path) -> CryptoSigner:
    """A signer for the key stored in ``path``."""
    return signer_for(load_private_key(path))


def read_key_dir(directory: Path) -> dict[str, tuple[Path, CryptoSigner]]:
    """Every ``*.pem`` private key directly in ``directory``, by key id.

    Raises KeyFileError if the directory does not exist or a ``.pem`` file in it is not a
    usable Ed25519 key.
    """
    if not directory.is_dir():
        raise KeyFileError(f"root key directory {directory} does not exist or is not a directory")
    found: dict[str, tuple[Path, CryptoSigner]] = {}
    for path in sorted(directory.glob("*.pem")):
        signer = load_signer(path)
        found[signer.public_key.keyid] = (path, signer)
    return found
