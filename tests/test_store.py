"""The content-addressed artifact store: atomic writes, verified reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgeops.store import ArtifactStore, CorruptArtifactError, MissingArtifactError


def test_bytes_and_files_are_stored_once_under_their_sha256(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    digest = store.put_bytes(b"model bytes")
    assert digest == hashlib.sha256(b"model bytes").hexdigest()
    assert store.put_bytes(b"model bytes") == digest
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * (3 << 20))
    file_digest = store.put_file(source)
    assert store.get_bytes(file_digest) == source.read_bytes()
    assert store.has(digest) and store.get_bytes(digest) == b"model bytes"
    leftovers = [p for p in (tmp_path / "artifacts").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_corrupted_artifact_is_reported_by_its_digest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put_bytes(b"weights")
    path = store.verified_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"weightz")
    with pytest.raises(CorruptArtifactError, match=f"sha256:{digest} is corrupted"):
        store.get_bytes(digest)


def test_missing_and_malformed_digests(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(MissingArtifactError, match="is not in"):
        store.get_bytes("0" * 64)
    with pytest.raises(MissingArtifactError, match="not a SHA-256"):
        store.get_bytes("../../etc/passwd")


def test_storing_the_same_bytes_again_repairs_a_damaged_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put_bytes(b"weights")
    path = store.verified_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"weightz")
    assert store.put_bytes(b"weights") == digest
    assert store.get_bytes(digest) == b"weights"
    path.unlink()
    source = tmp_path / "w.bin"
    source.write_bytes(b"weights")
    assert store.put_file(source) == digest
    assert store.get_bytes(digest) == b"weights"
