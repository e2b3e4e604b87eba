"""Crash-safe file writes: temp file in the same directory, fsync, atomic rename, fsync dir.

``SYNC`` is True on a device. The fleet simulator (:mod:`edgeops.fleet.simulator`) sets it to
False in its worker processes only: there, a thousand simulated devices share one disk, and
their fsyncs would queue behind each other in its journal as no real fleet's do; every write
stays atomic (temp file + rename). The power-cut tests run with it True.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SYNC = True  # fsync files and directories (see the module docstring)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    if not SYNC:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    """Create directory ``path`` and its missing parents, fsyncing the parent of each one
    created, so a power cut never loses a directory files were then written into."""
    missing: list[Path] = []
    current = Path(path)
    while not current.is_dir() and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old or the new file.

    ``durable=False`` skips the fsyncs, for a file that is only a snapshot rewritten all the
    time (the health file): still never half-written, but it may be the older one after a
    power cut.
    """
    atomic_write_chunks(path, [data], mode=mode, durable=durable)


def atomic_write_chunks(
    path: Path, chunks: Iterable[bytes], *, mode: int = 0o644, durable: bool = True
) -> None:
    """Like :func:`atomic_write_bytes`, streaming ``chunks`` (for large files)."""
    make_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            if durable and SYNC:
                os.fsync(fh.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(
    path: Path, document: Any, *, mode: int = 0o644, durable: bool = True
) -> None:
    """Write ``document`` as indented JSON, atomically."""
    atomic_write_bytes(
        path,
        json.dumps(document, indent=2, sort_keys=True).encode() + b"\n",
        mode=mode,
        durable=durable,
    )
