"""The content-addressed artifact store under ``<data_dir>/artifacts``.

Every artifact (dataset arrays, models, compressed models, model cards) is stored once,
under its SHA-256: ``artifacts/sha256/ab/cdef...``. Writes go to a temp file in the same
directory, are fsynced and renamed into place, so a crash never leaves a partial artifact
under a real name; reads verify the hash, so a corrupted file is reported by its digest
instead of being used.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from device_agent.fsio import atomic_write_chunks
from edgeops.errors import EdgeOpsError

__all__ = ["ArtifactStore", "CorruptArtifactError", "MissingArtifactError"]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class CorruptArtifactError(EdgeOpsError):
    """An artifact's bytes no longer match the digest it is stored under."""


class MissingArtifactError(EdgeOpsError):
    """No artifact is stored under this digest."""


class ArtifactStore:
    """Immutable blobs addressed by their SHA-256 (hex)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise MissingArtifactError(f"{digest!r} is not a SHA-256 hex digest")
        return self.root / "sha256" / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its digest.

        Storing the same bytes twice writes nothing, unless the stored copy was damaged:
        then it is replaced, so storing an artifact again repairs it.
        """
        digest = hashlib.sha256(data).hexdigest()
        target = self._path(digest)
        if not self._intact(target, digest):
            atomic_write_chunks(target, [data], mode=0o444)
        return digest

    def put_file(self, source: Path) -> str:
        """Store the file at ``source`` (streamed); returns its digest."""
        sha = hashlib.sha256()
        with source.open("rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                sha.update(chunk)
        digest = sha.hexdigest()
        target = self._path(digest)
        if not self._intact(target, digest):
            with source.open("rb") as fh:
                atomic_write_chunks(target, iter(lambda: fh.read(_CHUNK), b""), mode=0o444)
        return digest

    @staticmethod
    def _intact(path: Path, digest: str) -> bool:
        """Whether ``path`` exists and hashes to ``digest``."""
        try:
            with path.open("rb") as fh:
                sha = hashlib.sha256()
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    sha.update(chunk)
        except FileNotFoundError:
            return False
        return sha.hexdigest() == digest

    def get_bytes(self, digest: str) -> bytes:
        """The artifact's bytes, verified against ``digest``."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingArtifactError(f"artifact sha256:{digest} is not in {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CorruptArtifactError(
                f"artifact sha256:{digest} is corrupted (its bytes hash to {actual[:12]}...); "
                "store the same content again (re-import the dataset, re-run the step that "
                "made the model) to repair it"
            )
        return data

    def verified_path(self, digest: str) -> Path:
        """A path to read the artifact from, after checking its hash."""
        self.get_bytes(digest)
        return self._path(digest)
