"""Transports for TUF metadata and targets: over the device's MQTT link, or over HTTP.

Both are :class:`tuf.ngclient.FetcherInterface` implementations built on
:class:`ResumableFetcher`, which holds what they share:

* **Never past the declared length.** ngclient passes the most a file may hold (a target's
  exact length from the signed metadata, an upper bound for metadata). A transport never asks
  for bytes past it; a server that declares a larger file, or sends more than it was asked
  for, fails the download with :class:`~tuf.api.exceptions.DownloadLengthMismatchError` at
  once (the endless-data attack), before the bytes reach the disk.
* **Resume.** With a ``partial_dir``, a target's bytes go to ``partial_dir/<sha256 of the
  URL>.part``, fsync'd after every chunk; after a restart the download goes on from that
  file's length. The file is removed once the target was verified and handed over, and when
  its content turned out to be wrong (a length or hash mismatch, a file that changed under
  the download), so the next attempt starts afresh; a resumed download that fails
  verification raises :class:`ResumedMismatchError` (its kept bytes may be what was wrong).
  The trust client downloads a target that fails verification once more from byte 0, resumed
  or not (a chunk may have been damaged on the way), before it refuses it. Metadata is small
  and always fetched whole into a temporary file.
* **Failpoints.** After each target chunk is written and fsync'd,
  :func:`device_agent.failpoints.check_bytes` is called with the number of target bytes this
  fetcher has received and written so far (in this process), so a test can cut the power at
  any byte offset.
* **Counters** for the benchmark: ``bytes_requested`` (bytes asked for), ``bytes_received_payload``
  (file bytes received), ``bytes_on_wire`` (request and response payloads, and topic names or
  HTTP headers) and the event counters ``requests``, ``resends``, ``malformed``, ``stale``.

Each transport names its base URLs (``metadata_base_url``, ``target_base_url``) for
:class:`tuf.ngclient.Updater`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from device_agent import failpoints, fsio
from device_agent.fsio import make_dir

__all__ = [
    "FetchCounters",
    "FileChangedError",
    "HttpFetcher",
    "MqttFetcher",
    "ResumableFetcher",
    "ResumedMismatchError",
]

log = logging.getLogger(__name__)


class FileChangedError(tuf_exceptions.DownloadError):
    """The server's file changed size in the middle of a download (its bytes are discarded)."""


class ResumedMismatchError(tuf_exceptions.LengthOrHashMismatchError):
    """A download resumed from a partial file failed verification (the partial is removed).

    The kept bytes may be what was wrong (a power cut can leave a zero-filled tail), so the
    download deserves one more try from the start."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class FetchCounters:
    """Byte and event counters of one fetcher; updated under a lock, read at any time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_requested = 0
        self.bytes_received_payload = 0
        self.bytes_on_wire = 0
        self.requests = 0
        self.resends = 0
        self.malformed = 0
        self.stale = 0
        self.target_bytes_written = 0

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dictionary (for reports and benchmarks)."""
        with self._lock:
            return {
                "bytes_requested": self.bytes_requested,
                "bytes_received_payload": self.bytes_received_payload,
                "bytes_on_wire": self.bytes_on_wire,
                "requests": self.requests,
                "resends": self.resends,
                "malformed": self.malformed,
                "stale": self.stale,
                "target_bytes_written": self.target_bytes_written,
            }


class ResumableFetcher(FetcherInterface):
    """Length-checked, resumable downloads; a transport supplies :meth:`_read`."""

    metadata_base_url: str
    target_base_url: str

    def __init__(self, *, partial_dir: Path | None = None) -> None:
        self.partial_dir = partial_dir
        self.counters = FetchCounters()

    # -- counters, as attributes of the fetcher ---------------------------------------------

    @property
    def bytes_requested(self) -> int:
        return self.counters.bytes_requested

    @property
    def bytes_received_payload(self) -> int:
        return self.counters.bytes_received_payload

    @property
    def bytes_on_wire(self) -> int:
        return self.counters.bytes_on_wire

    # -- what a transport implements --------------------------------------------------------

    @abstractmethod
    def _read(self, url: str, offset: int, limit: int | None) -> Iterator[tuple[int | None, bytes]]:
        """Yield ``(total, data)`` pieces of ``url`` from ``offset`` on, in order.

        ``total`` is the file's size as the server declares it (None if it does not say).
        Never ask for bytes at or past ``limit`` when it is given (read at most one byte more
        to notice a server that sends more). Raise only ``DownloadError`` subclasses:
        ``DownloadHTTPError`` with 404 for a missing file.
        """

    # -- FetcherInterface -------------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._checked(url, 0, None)

    def _checked(self, url: str, offset: int, max_length: int | None) -> Iterator[bytes]:
        """The bytes of ``url`` from ``offset``, refusing more than ``max_length`` in all."""
        if max_length is not None and offset >= max_length:
            return
        received = offset
        declared: int | None = None
        for total, data in self._read(url, offset, max_length):
            if total is not None:
                if declared is None:
                    declared = total
                elif total != declared:
                    raise FileChangedError(
                        f"{url} changed during the download: its size went from {declared} "
                        f"to {total} bytes"
                    )
                if max_length is not None and total > max_length:
                    raise tuf_exceptions.DownloadLengthMismatchError(
                        f"{url}: the server declares {total} bytes, the signed metadata "
                        f"allows at most {max_length}"
                    )
            received += len(data)
            if max_length is not None and received > max_length:
                raise tuf_exceptions.DownloadLengthMismatchError(
                    f"{url}: the server sent more than the {max_length} bytes the signed "
                    "metadata allows"
                )
            if declared is not None and received > declared:
                raise tuf_exceptions.DownloadLengthMismatchError(
                    f"{url}: the server sent {received} bytes of a file it declares to hold "
                    f"{declared}"
                )
            yield data

    def is_target(self, url: str) -> bool:
        return url.startswith(self.target_base_url)

    def partial_path(self, url: str) -> Path | None:
        """Where the received bytes of target ``url`` are kept across restarts (or None)."""
        if self.partial_dir is None or not self.is_target(url):
            return None
        return self.partial_dir / f"{hashlib.sha256(url.encode()).hexdigest()}.part"

    def clear_partials(self, keep: set[Path] | None = None) -> int:
        """Remove the partial files in ``partial_dir`` except ``keep``; how many were removed."""
        if self.partial_dir is None or not self.partial_dir.is_dir():
            return 0
        removed = 0
        for path in self.partial_dir.glob("*.part"):
            if keep is None or path not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` (at most ``max_length`` bytes) into a file open for reading."""
        partial = self.partial_path(url)
        if partial is None:
            with tempfile.TemporaryFile() as temp:
                for data in self._checked(url, 0, max_length):
                    temp.write(data)
                    if self.is_target(url):
                        self._target_written(len(data))
                temp.seek(0)
                yield temp
            return
        make_dir(partial.parent)
        discard = False
        with partial.open("a+b") as handle:
            try:
                offset = handle.seek(0, os.SEEK_END)
                if offset > max_length:
                    log.warning(
                        "partial download %s holds %d bytes, more than the %d of %s: restarting",
                        partial,
                        offset,
                        max_length,
                        url,
                    )
                    handle.truncate(0)
                    offset = 0
                elif offset:
                    log.info("resuming %s at byte %d of %d", url, offset, max_length)
                resumed_from = offset
                try:
                    for data in self._checked(url, offset, max_length):
                        handle.write(data)
                        handle.flush()
                        if fsio.SYNC:
                            os.fsync(handle.fileno())
                        self._target_written(len(data))
                except (tuf_exceptions.DownloadLengthMismatchError, FileChangedError):
                    discard = True
                    raise
                handle.seek(0)
                try:
                    yield handle
                except tuf_exceptions.LengthOrHashMismatchError as exc:
                    discard = True
                    if resumed_from > 0 and not isinstance(exc, ResumedMismatchError):
                        raise ResumedMismatchError(str(exc), resumed_from) from exc
                    raise
                discard = True  # verified and handed over: nothing left to resume
            finally:
                if discard:
                    partial.unlink(missing_ok=True)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        with self.download_file(url, max_length) as handle:
            return handle.read()

    def _target_written(self, amount: int) -> None:
        self.counters.add(target_bytes_written=amount)
        failpoints.check_bytes(self.counters.target_bytes_written)


# The transports build on the base above; imported last so `device_agent.fetch.mqtt` and
# `device_agent.fetch.http` can import it from this package.
from device_agent.fetch.http import HttpFetcher  # noqa: E402
from device_agent.fetch.mqtt import MqttFetcher  # noqa: E402
