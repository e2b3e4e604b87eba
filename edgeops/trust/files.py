"""Reading the repository's files for devices, safely: by offset, no symlinks, no way out.

Both transports (the MQTT fetch server and the HTTP routes) read through :func:`read_range`:
the path must be a wire path (``metadata/...`` or ``targets/...``, checked by
:func:`device_agent.fetch.wire.validate_path`), no component of it may be a symbolic link,
and the file must be a regular file inside ``repository_dir``. Only the bytes asked for are
read (``os.pread``), never the whole file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import ProtocolError
from device_agent.fetch.wire import validate_path

__all__ = [
    "FileRange",
    "RepositoryFileNotFoundError",
    "iter_range",
    "open_file",
    "read_range",
    "repository_file_size",
]


class RepositoryFileNotFoundError(LookupError):
    """No regular file at that path (or one reached through a symbolic link)."""


@dataclass(frozen=True)
class FileRange:
    """``data`` = ``file[offset:offset + len(data)]``; ``total`` is the file's size."""

    offset: int
    total: int
    data: bytes


def open_file(repository_dir: Path, path: str) -> int:
    """A read-only descriptor of ``repository_dir/path`` (raises ProtocolError for a bad
    path, RepositoryFileNotFoundError if there is no regular file there)."""
    validate_path(path)
    directory = os.open(repository_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *parents, name = path.split("/")
        for part in parents:  # walk down without following any symbolic link
            try:
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory
                )
            except OSError as exc:
                raise RepositoryFileNotFoundError(path) from exc
            os.close(directory)
            directory = child
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                raise RepositoryFileNotFoundError(path) from exc
            raise
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RepositoryFileNotFoundError(path)
    return fd


def repository_file_size(repository_dir: Path, path: str) -> int:
    """The size of a servable file (same checks as :func:`read_range`)."""
    fd = open_file(repository_dir, path)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_range(repository_dir: Path, path: str, offset: int, length: int) -> FileRange:
    """Up to ``length`` bytes of ``path`` from ``offset`` (fewer at the end of the file;
    none at or past it)."""
    if offset < 0 or length < 0:
        raise ProtocolError(f"byte range {offset}+{length} of {path!r} is negative")
    fd = open_file(repository_dir, path)
    try:
        total = os.fstat(fd).st_size
        wanted = min(length, max(0, total - offset))
        parts: list[bytes] = []
        got = 0
        while got < wanted:
            part = os.pread(fd, wanted - got, offset + got)
            if not part:
                break  # the file shrank under us: serve what there is
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
    finally:
        os.close(fd)
    return FileRange(offset=offset, total=total, data=data)


def iter_range(fd: int, offset: int, length: int, chunk_bytes: int = 64 * 1024) -> Iterator[bytes]:
    """``length`` bytes of the open file ``fd`` from ``offset``, in chunks; closes ``fd``."""
    return RangeIterator(fd, offset, length, chunk_bytes)


class RangeIterator:
    """Chunks of a byte range of an open file; owns the descriptor from the start.

    It is closed at the end of the range, by :meth:`close`, or when the iterator is dropped
    before its first chunk (an HTTP client that hung up at once) — which a generator would not
    do: a generator that never started never runs its ``finally``.
    """

    def __init__(self, fd: int, offset: int, length: int, chunk_bytes: int) -> None:
        self._fd = fd
        self._position = offset
        self._end = offset + length
        self._chunk_bytes = chunk_bytes

    def __iter__(self) -> RangeIterator:
        return self

    def __next__(self) -> bytes:
        if self._fd < 0 or self._position >= self._end:
            self.close()
            raise StopIteration
        part = os.pread(
            self._fd, min(self._chunk_bytes, self._end - self._position), self._position
        )
        if not part:  # the file shrank under us: serve what there is
            self.close()
            raise StopIteration
        self._position += len(part)
        return part

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        self.close()
