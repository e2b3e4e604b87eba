"""A response body computed once and served to every request until what it shows changes:
what keeps ``GET /api/v1/devices`` cheap at hundreds of requests a second.

Listing a fleet of 1,000 devices costs about 40 ms of CPU (one query, 370 kB of JSON); at
200 requests/s that is more than the hub's cores. :class:`Snapshot` computes it once and
then, for each request:

- serves the same bytes while they are younger than ``check_s`` (0.2 s);
- after that asks ``version()``, a cheap query (for the device list: the row counts and the
  newest change times of the devices and their credentials); the same answer means nothing
  changed, and the bytes are served another ``check_s``;
- a different version, or bytes older than ``max_age_s`` (10 s; the bound for a change the
  version cannot see, such as a transaction that commits after a newer one), makes one
  request compute them again while the others still get the previous bytes (stale while
  revalidating: no request queues behind the refresh);
- :meth:`invalidate` (called by this process's own writes, e.g. an enrollment through the
  API) makes the next request compute afresh, so a caller always sees its own change.

Each body carries a strong ETag (its SHA-256), so a client polling with ``If-None-Match``
gets ``304 Not Modified`` while nothing changed, and is kept gzip-compressed too (a
1,000-device list: 370 kB, 12 kB compressed) for clients that accept it.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHECK_S = 0.2
MAX_AGE_S = 10.0


@dataclass
class Body:
    data: bytes
    gzipped: bytes
    """``data`` gzip-compressed, for clients that send ``Accept-Encoding: gzip``"""
    etag: str
    version: object
    made_at: float
    checked_at: float = field(default=0.0)


class Snapshot:
    """A body made by ``compute``, made again when ``version()`` changes; thread-safe.
    Without ``version`` the body is made again every ``check_s``."""

    def __init__(
        self,
        compute: Callable[[], bytes],
        version: Callable[[], object] | None = None,
        *,
        check_s: float = CHECK_S,
        max_age_s: float = MAX_AGE_S,
    ) -> None:
        self._compute = compute
        self._version = version
        self.check_s = check_s
        self.max_age_s = max_age_s
        self._body: Body | None = None
        self._generation = 0  # bumped by invalidate(): a body made before it is not kept
        self._lock = threading.Lock()  # guards the fields
        self._refreshing = threading.Lock()  # held by the one request checking or computing

    def get(self) -> Body:
        with self._lock:
            body = self._body
        if body is not None and time.monotonic() - body.checked_at < self.check_s:
            return body
        if body is not None and not self._refreshing.acquire(blocking=False):
            return body  # another request is checking or computing: serve the previous bytes
        if body is None:
            self._refreshing.acquire()  # nothing to serve yet: wait for the first one
        try:
            return self._refresh()
        finally:
            self._refreshing.release()

    def _refresh(self) -> Body:
        with self._lock:  # someone may have finished while this one waited
            body, generation = self._body, self._generation
        now = time.monotonic()
        if body is not None and now - body.checked_at < self.check_s:
            return body
        version = self._version() if self._version is not None else None
        if (
            body is not None
            and self._version is not None
            and version == body.version
            and now - body.made_at < self.max_age_s
        ):
            body.checked_at = now
            return body
        data = self._compute()  # the version was read first: a change meanwhile is seen next
        etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
        gzipped = gzip.compress(data, compresslevel=5, mtime=0)
        fresh = Body(data, gzipped, etag, version, made_at=now, checked_at=now)
        with self._lock:
            if self._generation == generation:
                self._body = fresh
        return fresh

    def invalidate(self) -> None:
        """Forget the body: the next :meth:`get` computes it again before answering."""
        with self._lock:
            self._body = None
            self._generation += 1
