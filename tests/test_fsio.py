"""Crash-safe file writes: every write is atomic; fsyncs unless asked not to or switched off."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import fsio


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path fsync'd from now on (the real fsync still runs)."""
    paths: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        paths.append(Path(f"/proc/self/fd/{fd}").readlink())
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return paths


def leftovers(directory: Path) -> list[str]:
    """Temporary files of the atomic writes left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_need_not_be_durable_is_still_atomic_and_fsyncs_nothing(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    target = tmp_path / "health.json"
    target.write_bytes(b"old")

    fsio.atomic_write_bytes(target, b"new snapshot", mode=0o600, durable=False)

    assert target.read_bytes() == b"new snapshot"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []
    assert fsynced == []


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "health.json"
    target.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"half of the "
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        fsio.atomic_write_chunks(target, chunks(), durable=False)

    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_default_write_fsyncs_the_file_and_its_directory(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    target = tmp_path / "desired.json"

    fsio.atomic_write_json(target, {"release": "r-1"})

    assert target.read_text() == '{\n  "release": "r-1"\n}\n'
    assert leftovers(tmp_path) == []
    assert tmp_path in fsynced  # the rename is durable
    written = [p for p in fsynced if p != tmp_path]
    assert len(written) == 1  # the data, under its temporary name, before the rename
    assert written[0].parent == tmp_path and written[0].name.startswith(".desired.json.")


def test_with_sync_off_no_write_fsyncs_but_every_write_stays_atomic(
    tmp_path: Path, fsynced: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsio, "SYNC", False)
    target = tmp_path / "new" / "dir" / "state.json"  # directories to create as well

    fsio.atomic_write_bytes(target, b"first")
    fsio.atomic_write_json(target, {"n": 2})
    fsio.atomic_write_chunks(target, [b"th", b"ird"])

    assert target.read_bytes() == b"third"
    assert leftovers(target.parent) == []
    assert fsynced == []
