"""TUF metadata and targets over HTTP(S) from the hub's API, resumed with ``Range`` requests.

The hub serves ``GET /v1/tuf/metadata/{name}`` and ``GET /v1/tuf/targets/{path}`` and honours
``Range: bytes=N-M`` (206 with ``Content-Range``). Every request names the byte range it
wants, ending at the most the signed metadata allows; at most one byte more is read, to notice
a server that sends more (the endless-data attack). A connection that breaks or stalls
mid-file is opened again from the current offset, until no byte arrived for ``deadline_s``
seconds. A server that ignores ``Range`` (200 with the whole file) is served too: the bytes
already held are read and skipped.

``bytes_on_wire`` counts the body bytes and the request and response header lines.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from tuf.api import exceptions as tuf_exceptions

from device_agent.fetch import ResumableFetcher
from device_agent.fetch.wire import DEFAULT_CHUNK_BYTES

__all__ = ["HttpFetcher"]

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIABLE = re.compile(r"^bytes \*/(\d+)$")
_RETRY_PAUSE_S = 0.5


class HttpFetcher(ResumableFetcher):
    """A ``tuf.ngclient`` fetcher over the hub's HTTP API, resuming with ``Range``."""

    def __init__(
        self,
        hub_url: str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout_s: float = 10.0,
        deadline_s: float = 600.0,
        partial_dir: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        super().__init__(partial_dir=partial_dir)
        parts = urlsplit(hub_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"hub URL {hub_url!r} must be http://host[:port] or https://...")
        if chunk_bytes < 1 or timeout_s <= 0 or deadline_s <= 0:
            raise ValueError("chunk_bytes, timeout_s and deadline_s must be positive")
        base = hub_url.rstrip("/")
        self.metadata_base_url = f"{base}/v1/tuf/metadata/"
        self.target_base_url = f"{base}/v1/tuf/targets/"
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._pool = urllib3.PoolManager(
            ca_certs=str(ca_file) if ca_file is not None else None,
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=False,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.clear()

    def _read(self, url: str, offset: int, limit: int | None) -> Iterator[tuple[int | None, bytes]]:
        last_progress = time.monotonic()
        while True:
            if limit is not None and offset >= limit:
                return
            response = self._open(url, offset, limit)
            try:
                total, start = self._check_status(url, response, offset)
                if total is not None and offset >= total:
                    return
                pieces = self._body(response, offset, start, limit)
                while True:
                    try:
                        data = next(pieces)
                    except StopIteration:
                        return
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        if time.monotonic() - last_progress >= self.deadline_s:
                            raise tuf_exceptions.SlowRetrievalError(
                                f"{url}: no progress at offset {offset} for "
                                f"{self.deadline_s:g} s: {exc}"
                            ) from exc
                        log.info(
                            "download of %s broke at offset %d (%s); resuming", url, offset, exc
                        )
                        time.sleep(_RETRY_PAUSE_S)
                        break
                    if data:
                        last_progress = time.monotonic()
                    offset += len(data)
                    yield total, data
            finally:
                response.release_conn()

    def _open(self, url: str, offset: int, limit: int | None) -> urllib3.BaseHTTPResponse:
        """GET ``[offset, limit)``; a refused connection is retried until the deadline."""
        end = "" if limit is None else str(limit - 1)
        headers = {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}
        started = time.monotonic()
        while True:
            try:
                response = self._pool.request(
                    "GET", url, headers=headers, preload_content=False, redirect=False
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if time.monotonic() - started >= self.deadline_s:
                    raise tuf_exceptions.SlowRetrievalError(
                        f"{url}: no answer for {self.deadline_s:g} s: {exc}"
                    ) from exc
                log.info("GET %s failed (%s); trying again", url, exc)
                time.sleep(_RETRY_PAUSE_S)
                continue
            request_line = f"GET {urlsplit(url).path} HTTP/1.1\r\n"
            self.counters.add(
                requests=1,
                bytes_requested=0 if limit is None else limit - offset,
                bytes_on_wire=len(request_line)
                + sum(len(k) + len(v) + 4 for k, v in headers.items())
                + sum(len(k) + len(v) + 4 for k, v in response.headers.items())
                + len("HTTP/1.1 200 OK\r\n\r\n"),
            )
            return response

    def _check_status(
        self, url: str, response: urllib3.BaseHTTPResponse, offset: int
    ) -> tuple[int | None, int]:
        """The file's declared size and the offset the body starts at; raise on errors."""
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None:
                raise tuf_exceptions.DownloadError(
                    f"{url}: 206 answer without a valid Content-Range header"
                )
            start = int(match.group(1))
            if start != offset:
                raise tuf_exceptions.DownloadError(
                    f"{url}: asked for bytes from {offset}, the server sent from {start}"
                )
            total = None if match.group(3) == "*" else int(match.group(3))
            return total, start
        if status == 200:
            length = response.headers.get("Content-Length")
            return (int(length) if length and length.isdigit() else None), 0
        if status == 416:
            match = _UNSATISFIABLE.match(response.headers.get("Content-Range", ""))
            if match is not None and int(match.group(1)) == offset:
                return offset, offset  # the file ends exactly where we are
            raise tuf_exceptions.DownloadError(
                f"{url}: the server cannot serve bytes from {offset} (416)"
            )
        raise tuf_exceptions.DownloadHTTPError(f"{url}: HTTP {status}", status)

    def _body(
        self, response: urllib3.BaseHTTPResponse, offset: int, start: int, limit: int | None
    ) -> Iterator[bytes]:
        """The body's bytes from ``offset`` on (skipping those before it), capped past ``limit``."""
        position = start
        while True:
            amount = self.chunk_bytes
            if limit is not None:
                # one byte past the limit, so that a server sending more is noticed
                amount = min(amount, limit + 1 - max(position, offset))
            data = response.read1(amount)
            if not data:
                return
            self.counters.add(bytes_on_wire=len(data))
            if position < offset:  # a 200 answer: skip what is already held
                skip = min(len(data), offset - position)
                position += skip
                data = data[skip:]
                if not data:
                    continue
            position += len(data)
            self.counters.add(bytes_received_payload=len(data))
            yield data
