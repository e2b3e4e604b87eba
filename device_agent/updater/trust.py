"""The device's TUF client: fresh, signed metadata first, then only artifacts it vouches for.

:class:`TrustClient` wraps :class:`tuf.ngclient.Updater` over one of the agent's fetchers
(:class:`~device_agent.fetch.MqttFetcher` or :class:`~device_agent.fetch.HttpFetcher`).
Trust starts from the provisioned ``root.json`` in ``metadata_dir``; ngclient keeps every root
it verified in ``metadata_dir/root_history/`` and points ``root.json`` at the newest, so after
a root rotation the device trusts the new root from then on (a power cut between the two
steps of that switch is covered: the newest verified root in the history is used).

Every refresh walks the whole client workflow of the TUF specification (root rotation,
timestamp, snapshot, targets: signatures and thresholds, version monotonicity, expiry,
consistency); a download is verified for length and hashes before it is handed over. Every
failure becomes a :class:`~device_agent.updater.errors.TrustError` whose ``kind`` names the
attack or fault it detected (see :func:`trust_error`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from device_agent import fsio
from device_agent.fetch import ResumedMismatchError
from device_agent.fetch.mqtt import METADATA_BASE_URL, TARGET_BASE_URL
from device_agent.fsio import atomic_write_bytes, fsync_dir, make_dir
from device_agent.updater.errors import TrustError, UnknownTargetError, UpdateRefused

__all__ = ["ROOT_FILE", "TrustClient", "trust_error"]

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"
ROOT_HISTORY = "root_history"

_SIGNED_BY = re.compile(r"signed by (\d+)/(\d+) keys")
_ROLLBACK_MESSAGES = (
    re.compile(r"^New timestamp version \d+ must be >="),
    re.compile(r"^New snapshot version must be >="),
    re.compile(r"^Expected \S+\.json version"),  # a new snapshot lowering a role's version
)


class TrustClient:
    """Refresh signed metadata, look targets up and download them, verified."""

    def __init__(
        self,
        metadata_dir: Path,
        fetcher: FetcherInterface,
        targets_dir: Path,
        *,
        metadata_base_url: str | None = None,
        target_base_url: str | None = None,
        config: UpdaterConfig | None = None,
    ) -> None:
        """Base URLs default to the fetcher's ``metadata_base_url``/``target_base_url``
        attributes, else to the MQTT ones (``mqtt:metadata/``, ``mqtt:targets/``)."""
        self.metadata_dir = Path(metadata_dir)
        self.targets_dir = Path(targets_dir)
        self.fetcher = fetcher
        self.metadata_base_url: str = metadata_base_url or str(
            getattr(fetcher, "metadata_base_url", METADATA_BASE_URL)
        )
        self.target_base_url: str = target_base_url or str(
            getattr(fetcher, "target_base_url", TARGET_BASE_URL)
        )
        self.config = config or UpdaterConfig()
        self._updater: Updater | None = None
        self._refreshed = False
        self._root_bytes()  # a device without a trusted root is refused here, not later

    # -- trust anchor -----------------------------------------------------------------------

    def _root_bytes(self) -> bytes:
        """The newest root this device verified (or was provisioned with).

        That is the highest-version root in ``root_history/`` that parses (ngclient writes
        only verified roots there), else ``root.json``: after a power cut ``root.json`` may be
        missing, or a stale copy of the provisioned root, while the history holds the newer
        one.
        """
        root = self.metadata_dir / ROOT_FILE
        history = self.metadata_dir / ROOT_HISTORY
        versions = sorted(
            (
                (int(path.name.split(".", 1)[0]), path)
                for path in history.glob("*.root.json")
                if path.name.split(".", 1)[0].isdigit()
            ),
            reverse=True,
        )
        for _, path in versions:
            try:
                data = path.read_bytes()
                parsed = Metadata[Root].from_bytes(data)
            except (OSError, DeserializationError) as exc:
                log.warning("verified root %s unusable (%s); trying an older one", path, exc)
                continue
            if parsed.signed.type == Root.type:  # not another role under a root name
                return data
            log.warning("%s holds no root metadata; trying an older one", path)
        try:
            return root.read_bytes()
        except FileNotFoundError:
            raise UpdateRefused(
                "no_trusted_root",
                f"no trusted root: {root} is missing (provision the hub's root.json with the "
                "agent setting trust_root_file)",
            ) from None
        except OSError as exc:
            raise UpdateRefused(
                "no_trusted_root", f"trusted root {root} unreadable: {exc}"
            ) from exc

    def _new_updater(self) -> Updater:
        make_dir(self.metadata_dir)
        make_dir(self.targets_dir)
        bootstrap = self._root_bytes()
        try:
            return _DurableUpdater(
                str(self.metadata_dir),
                self.metadata_base_url,
                str(self.targets_dir),
                self.target_base_url,
                self.fetcher,
                self.config,
                bootstrap=bootstrap,
            )
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
            raise trust_error(exc, f"trusted root in {self.metadata_dir}") from exc

    # -- the client workflow ----------------------------------------------------------------

    def refresh(self) -> None:
        """Fetch and verify root (rotations), timestamp, snapshot and targets metadata.

        Each call starts a fresh ngclient session from the newest trusted root, so a
        long-running agent sees new releases.
        """
        updater = self._new_updater()
        self._updater, self._refreshed = updater, False
        try:
            updater.refresh()
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
            raise trust_error(exc, "metadata refresh") from exc
        self._refreshed = True

    def get_target(self, path: str) -> TargetFile:
        """The signed description of target ``path`` (refreshing first if needed)."""
        if self._updater is None or not self._refreshed:
            self.refresh()
        assert self._updater is not None
        try:
            target = self._updater.get_targetinfo(path)
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
            raise trust_error(exc, f"metadata for target {path!r}") from exc
        if target is None:
            raise UnknownTargetError(
                f"target {path!r} is not listed in the signed targets metadata of the hub's "
                "repository (not released, or released under another path)"
            )
        return target

    def download(self, target: TargetFile) -> Path:
        """Download ``target`` into ``targets_dir`` (verified for length and hashes).

        The file is named after the URL-encoded target path; it appears only once verified
        and fsync'd (written under a temporary name, then renamed). A file already there that
        matches the metadata is used without a download.
        """
        if self._updater is None or not self._refreshed:
            self.refresh()
        assert self._updater is not None
        final = self.targets_dir / quote(target.path, safe="")
        cached = self._updater.find_cached_target(target, str(final))
        if cached is not None:
            log.info("target %s already downloaded and verified: %s", target.path, cached)
            return final
        temporary = final.with_name(f".{final.name}.download")
        try:
            try:
                self._updater.download_target(target, str(temporary))
            except tuf_exceptions.LengthOrHashMismatchError as exc:
                # a resumed download's kept bytes (a zero-filled tail left by a power cut), or
                # a chunk damaged on the way: once more from byte 0 (the partial is gone); a
                # second mismatch is the target's, and is refused
                resumed = isinstance(exc, ResumedMismatchError)
                log.warning(
                    "%s of %s failed verification (%s); downloading it again from the start",
                    "resumed download" if resumed else "download",
                    target.path,
                    exc,
                )
                self._updater.download_target(target, str(temporary))
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError) as exc:
            temporary.unlink(missing_ok=True)
            raise trust_error(exc, f"target {target.path!r}", target=True) from exc
        except OSError:  # e.g. a full disk: leave no half-written copy behind
            temporary.unlink(missing_ok=True)
            raise
        if fsio.SYNC:
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
        temporary.replace(final)
        fsync_dir(self.targets_dir)
        return final


class _DurableUpdater(Updater):
    """ngclient's updater, writing metadata (and the root history) temp + fsync + rename +
    directory fsync, so a power cut never leaves a verified root or metadata file empty."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        atomic_write_bytes(Path(filename), data)

    def _update_root_symlink(self) -> None:
        super()._update_root_symlink()
        fsync_dir(Path(self._dir))


def trust_error(exc: Exception, where: str, *, target: bool = False) -> TrustError:
    """The :class:`TrustError` for a tuf error raised at ``where``.

    ``target`` says the error came from verifying a downloaded artifact (rather than metadata):
    a length or hash mismatch of an artifact is ``length_mismatch``/``hash_mismatch``, while a
    metadata file that does not match what its parent role signed is ``mix_and_match``.
    """
    message = f"{where}: {exc}" if str(exc) else f"{where}: {type(exc).__name__}"
    return TrustError(_kind(exc, target=target), message)


def _kind(exc: Exception, *, target: bool) -> str:
    if isinstance(exc, tuf_exceptions.DownloadLengthMismatchError):
        return "length_mismatch"
    if isinstance(exc, tuf_exceptions.DownloadError):
        return "transport"
    if isinstance(exc, tuf_exceptions.UnsignedMetadataError):
        match = _SIGNED_BY.search(str(exc))
        if match is not None and int(match.group(1)) > 0:
            return "below_threshold"
        return "bad_signature"
    if isinstance(exc, tuf_exceptions.ExpiredMetadataError):
        return "expired"
    if isinstance(exc, tuf_exceptions.BadVersionNumberError):
        text = str(exc)
        if any(pattern.search(text) for pattern in _ROLLBACK_MESSAGES):
            return "rollback"
        return "mix_and_match"
    if isinstance(exc, tuf_exceptions.LengthOrHashMismatchError):
        if not target:
            return "mix_and_match"
        return "length_mismatch" if str(exc).startswith("Observed length") else "hash_mismatch"
    if str(exc).startswith("New snapshot is missing info"):
        return "rollback"
    if isinstance(exc, DeserializationError):
        return "bad_signature"  # not parseable as signed metadata at all
    return "mix_and_match"
