"""A microcontroller board attached to this device: the agent as its gateway.

With an ``[mcu]`` table in agent.toml (:class:`~device_agent.config.McuSettings`) the agent
reports the ``firmware`` runtime and takes firmware releases (a bundle of a card of runtime
``firmware`` holding ``firmware.tar``, see :mod:`device_agent.runtime._bundle`).
:class:`Gateway` is the :class:`~device_agent.updater.updater.Runtimes` the updater and the
daemon open bundles with; other bundles still run in this process.

Opening a firmware bundle:

1. the archive (an uncompressed tar, as releases are) is read and its image extracted:
   exactly one regular member ``<dir>/firmware.elf`` of at most :data:`MAX_IMAGE_BYTES`,
   starting with the ELF magic; an archive with an absolute member name or a ``..``
   component is refused whole; the image is written to ``<state_dir>/mcu/images/<sha256>.elf``
   (temp + fsync + rename), the only file taken out;
2. the board is flashed with it only if it does not already run that image: the SHA-256 of
   the image on the board is kept in ``<state_dir>/mcu/board.json``, written atomically.
   Before the flash command runs the file says ``{"sha256": null, "flashing": "<new>"}``
   (the board's image is unknown from then on, until the command succeeds and the file says
   ``{"sha256": "<new>"}``), so a power cut of this device in between makes the next open
   flash again;
3. the port is closed while the flash command runs (a flasher may need it) and (re)opened
   raw with pyserial after every flash and after a read or write on it failed or found it
   hung up (a board that restarts may come back on another device node behind the same
   name); inference is served through :class:`~device_agent.runtime.SerialRuntime`'s
   framing.

The runtime of a bundle answers only while the board runs that bundle's image: while an
update tests another image on the board, the champion's samples fail with
:class:`~device_agent.runtime.InferenceError` at once (counted as runtime errors of the
champion in place, never of the new one).

The updater's smoke test of a firmware bundle is the conformance test on the board: the new
image is flashed, the card's test vectors run on it, and the result is reported as a
``conformance`` event (:meth:`Gateway.tested`), passed or not. A rollback calls
:meth:`Gateway.restore`, which flashes the active slot's image again; so does the first open
of the champion at start-up if the board's recorded image is not the active slot's.

Tolerance: the generated firmware is bit-exact with TensorFlow Lite Micro, but a card's
expected outputs were computed by LiteRT on the hub, whose optimized integer kernels may round
a requantization differently from the reference kernels TFLite Micro follows: the same one
output quantization step as for any integer model (a wrong weight moves outputs by many
steps).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from device_agent.command import run_in_group
from device_agent.config import McuSettings
from device_agent.errors import AgentError
from device_agent.fsio import atomic_write_chunks, atomic_write_json
from device_agent.runtime import (
    InferenceError,
    ModelBundle,
    Runtime,
    SerialFrameError,
    SerialRuntime,
)
from device_agent.runtime._serial import SerialPort, open_port
from device_agent.updater.updater import Replay, Runtimes

__all__ = [
    "BOARD_FILE",
    "FIRMWARE_FORMAT",
    "IMAGE_NAME",
    "MAX_IMAGE_BYTES",
    "BoardError",
    "BoardRuntime",
    "FirmwareArchiveError",
    "Gateway",
    "extract_image",
]

log = logging.getLogger(__name__)

try:  # tcflush's termios.error is no OSError
    import termios

    _TTY_ERRORS: tuple[type[Exception], ...] = (OSError, termios.error)
except ImportError:  # pragma: no cover - not a POSIX system
    _TTY_ERRORS = (OSError,)

IMAGE_NAME = "firmware.elf"
FIRMWARE_FORMAT = "firmware"
BOARD_FILE = "board.json"
MAX_IMAGE_BYTES = 16 * 1024 * 1024
"""The largest image taken out of a firmware archive (a microcontroller's flash is smaller)."""
MAX_MEMBERS = 10_000
_ELF_MAGIC = b"\x7fELF"
_CHUNK = 1 << 16
_OUTPUT_TAIL = 300  # characters of a failed flash command's output quoted in its error
_HUNG_UP = "closed the connection"  # SerialFrameError of a port whose other end is gone


class BoardError(AgentError):
    """The attached board could not be flashed or reached; the message names its port.

    ``kind`` is ``transport``: during an update the updater retries it (a debug probe busy, a
    board that came back late), up to ``update_max_attempts``, then fails the update and rolls
    back, which flashes the previous image again.
    """

    kind = "transport"


class FirmwareArchiveError(AgentError):
    """A firmware archive that is unsafe or does not hold exactly one image."""


def extract_image(
    archive: Path, images_dir: Path, *, max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[Path, str]:
    """Take the one ``<dir>/firmware.elf`` out of ``archive`` into ``images_dir``.

    Returns the image's path (``<sha256>.elf``) and its SHA-256. FirmwareArchiveError (one
    line, naming the archive) if the archive does not read, names a member outside its
    directory (absolute, ``..``), holds no or several images, or the image is not a regular
    file, is empty, larger than ``max_bytes`` or not an ELF file.
    """
    where = f"firmware archive {archive}"
    try:
        with tarfile.open(archive, mode="r:") as tar:  # releases are uncompressed tar
            found: list[tarfile.TarInfo] = []
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise FirmwareArchiveError(f"{where}: more than {MAX_MEMBERS} members")
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or member.name.startswith("\\"):
                    raise FirmwareArchiveError(
                        f"{where}: member {member.name[:120]!r} points outside the archive"
                    )
                if path.name == IMAGE_NAME:
                    found.append(member)
            if len(found) != 1:
                names = ", ".join(repr(m.name[:120]) for m in found[:4])
                raise FirmwareArchiveError(
                    f"{where}: holds {len(found)} {IMAGE_NAME} members"
                    + (f" ({names})" if names else "")
                    + f"; a firmware archive holds exactly one <dir>/{IMAGE_NAME}"
                )
            member = found[0]
            if len(PurePosixPath(member.name).parts) != 2:
                raise FirmwareArchiveError(
                    f"{where}: the image {member.name[:120]!r} is not <dir>/{IMAGE_NAME}"
                )
            if not member.isreg():
                raise FirmwareArchiveError(
                    f"{where}: {member.name[:120]!r} is not a regular file (a link or device)"
                )
            if member.size > max_bytes:
                raise FirmwareArchiveError(
                    f"{where}: the image has {member.size} bytes, more than the limit of "
                    f"{max_bytes}"
                )
            if member.size == 0:
                raise FirmwareArchiveError(f"{where}: the image {member.name[:120]!r} is empty")
            source = tar.extractfile(member)
            if source is None:
                raise FirmwareArchiveError(f"{where}: {member.name[:120]!r} cannot be read")
            with source:
                data = source.read(max_bytes + 1)
    except (tarfile.TarError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FirmwareArchiveError(f"{where}: not a readable tar archive: {first}") from exc
    except OSError as exc:
        raise FirmwareArchiveError(f"{where}: cannot read: {exc}") from exc
    if len(data) != member.size or len(data) > max_bytes:
        raise FirmwareArchiveError(f"{where}: the image is not as long as the archive says")
    if not data.startswith(_ELF_MAGIC):
        raise FirmwareArchiveError(f"{where}: {member.name[:120]!r} is not an ELF image")
    digest = hashlib.sha256(data).hexdigest()
    image = images_dir / f"{digest}.elf"
    if not (image.is_file() and image.stat().st_size == len(data)):
        atomic_write_chunks(image, [data])
    return image, digest


class Gateway(Runtimes):
    """The board on ``settings.port`` and the images it runs (see the module docstring).

    ``state_dir`` is the agent's own directory (the board's files go to ``mcu/`` in it).
    ``event(name, detail)`` sends an agent event (the ``conformance`` results). Thread-safe:
    the updater's worker flashes and tests while the daemon's main loop runs samples.
    """

    def __init__(
        self,
        settings: McuSettings,
        state_dir: Path,
        *,
        event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.directory = Path(state_dir) / "mcu"
        self.board_file = self.directory / BOARD_FILE
        self.images_dir = self.directory / "images"
        self._event = event
        self._flash_lock = threading.Lock()  # one flash (and the check before it) at a time
        self._io = threading.Lock()  # the port, and which image the board runs
        self._port: Any = None
        self._running: str | None = self._recorded()
        self.flashes = 0
        """Flash commands run by this process (successful or not)."""

    @property
    def port_name(self) -> str:
        return self.settings.port

    # -- what the board runs ---------------------------------------------------------------

    def _recorded(self) -> str | None:
        """The SHA-256 of the image the board runs as recorded, None if unknown (never
        flashed, a flash that did not finish, or a record of another port)."""
        try:
            document = _read_json(self.board_file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning(
                "board state %s unreadable (%s): the board's image is unknown", self.board_file, exc
            )
            return None
        if not isinstance(document, dict) or document.get("flashing"):
            return None
        if document.get("port") != self.port_name:  # another board was configured
            return None
        sha = document.get("sha256")
        return sha if isinstance(sha, str) and len(sha) == 64 else None

    @property
    def running_image(self) -> str | None:
        """The SHA-256 of the image the board runs, None if unknown."""
        with self._io:
            return self._running

    def image_of(self, bundle: ModelBundle) -> tuple[Path, str]:
        """The image of a firmware bundle (extracted once) and its SHA-256."""
        return extract_image(bundle.model_path, self.images_dir)

    def ensure(self, bundle: ModelBundle) -> tuple[str, bool]:
        """Make the board run ``bundle``'s image: flash it only if the board runs another
        (or an unknown) one. Returns the image's SHA-256 and whether it was flashed.
        BoardError if it cannot be flashed, or its files in :attr:`directory` cannot be
        written (a full disk): the champion's load at start-up reports it, never crashes."""
        with self._flash_lock:
            try:
                image, digest = self.image_of(bundle)
                if self.running_image == digest:
                    return digest, False
                self._flash(image, digest)
                self._prune(keep=digest)
            except OSError as exc:
                raise BoardError(
                    f"board {self.port_name}: cannot write its files in {self.directory}: {exc}"
                ) from exc
            return digest, True

    def _flash(self, image: Path, digest: str) -> None:
        with self._io:  # from here on the board's image is unknown, on disk and in memory
            self._close_port()
            self._running = None
            atomic_write_json(
                self.board_file,
                {"port": self.port_name, "sha256": None, "flashing": digest, "ts": _now()},
            )
        argv = self.settings.flash_argv(image)
        log.info("flashing %s on %s", image.name, self.port_name)
        self.flashes += 1
        returncode, said = self._run_flash(argv)
        if returncode != 0:
            tail = " ".join(said.split())[-_OUTPUT_TAIL:]
            raise BoardError(
                f"board {self.port_name}: the flash command exited with {returncode}"
                + (f": {tail}" if tail else "")
            )
        with self._io:
            atomic_write_json(
                self.board_file, {"port": self.port_name, "sha256": digest, "ts": _now()}
            )
            self._running = digest
        log.info("board %s runs image %s", self.port_name, digest[:12])

    def _run_flash(self, argv: list[str]) -> tuple[int, str]:
        """Run the flash command in a process group of its own; its exit status and what it
        printed (stderr, else stdout). On a timeout the whole group is killed: a wrapper
        script's flasher (openocd, a debug probe's server) must not keep the probe or the
        port."""
        timeout = self.settings.flash_timeout_s
        try:
            done = run_in_group(argv, timeout)
        except FileNotFoundError:
            raise BoardError(
                f"board {self.port_name}: flash command {argv[0]!r} not found"
            ) from None
        except OSError as exc:
            raise BoardError(f"board {self.port_name}: flash command failed: {exc}") from None
        except subprocess.TimeoutExpired:
            raise BoardError(
                f"board {self.port_name}: the flash command did not finish in {timeout:g} s"
            ) from None
        return done.returncode, (done.stderr.strip() or done.stdout.strip())

    def _prune(self, keep: str) -> None:
        """Remove extracted images other than ``keep`` (each is taken out again when needed)."""
        if not self.images_dir.is_dir():
            return
        for path in self.images_dir.iterdir():
            if path.name != f"{keep}.elf":
                path.unlink(missing_ok=True)

    # -- the port --------------------------------------------------------------------------

    def port_for(self, digest: str) -> SerialPort:
        """The open port, if the board runs image ``digest`` (call with ``_io`` held);
        InferenceError if it runs another one, BoardError if the port does not open."""
        if self._running != digest:
            raise InferenceError(
                f"board {self.port_name} runs another image than this model's "
                f"({(self._running or 'unknown')[:12]}, not {digest[:12]})"
            )
        if self._port is None:
            self._port = self._open_port()
        port: SerialPort = self._port
        return port

    def _open_port(self) -> Any:
        try:
            port = open_port(self.port_name, baud=self.settings.baud)
        except SerialFrameError as exc:
            raise BoardError(f"board {self.port_name}: {exc}") from exc
        try:
            port.reset_input_buffer()  # boot text and answers meant for an earlier image
        except _TTY_ERRORS as exc:
            port.close()
            raise BoardError(f"board {self.port_name}: the port does not read: {exc}") from exc
        return port

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except OSError as exc:
                log.debug("closing %s: %s", self.port_name, exc)

    def drop_port(self) -> None:
        """Close the port; the next request opens it again."""
        with self._io:
            self._close_port()

    def close(self) -> None:
        self.drop_port()

    # -- Runtimes --------------------------------------------------------------------------

    def open(self, bundle: ModelBundle) -> Runtime:
        """A firmware bundle on the board (flashed first if it runs another image); any other
        bundle in this process."""
        if bundle.format != FIRMWARE_FORMAT:
            return super().open(bundle)
        digest, _ = self.ensure(bundle)
        return BoardRuntime(self, bundle, digest)

    def label(self, bundle: ModelBundle) -> str:
        if bundle.format != FIRMWARE_FORMAT:
            return super().label(bundle)
        return f"conformance on {self.port_name}"

    def tested(self, bundle: ModelBundle, replay: Replay) -> None:
        """Report a firmware bundle's conformance test as a ``conformance`` event."""
        if bundle.format != FIRMWARE_FORMAT:
            return
        detail = conformance_detail(bundle, replay, self.port_name)
        log.info(
            "conformance of %s on %s: %s",
            bundle.model_id,
            self.port_name,
            "passed" if replay.passed else replay.reason,
        )
        if self._event is not None:
            self._event("conformance", detail)

    def restore(self, bundle_dir: Path | None) -> str | None:
        """Flash the active slot's image again if the board runs another one. Nothing to do
        for an active slot that is not a firmware bundle; with no active slot the board keeps
        what it runs (a note says so if it was ever flashed)."""
        if bundle_dir is None:
            if self.running_image is None and not self.board_file.exists():
                return None  # never flashed: nothing to undo
            return f"no previous image to restore on {self.port_name}"
        bundle = ModelBundle.load(bundle_dir)
        if bundle.format != FIRMWARE_FORMAT:
            return None
        _, flashed = self.ensure(bundle)
        return f"previous image restored on {self.port_name}" if flashed else None

    def describe(self) -> dict[str, Any]:
        """``{"port", "image_sha256"}`` for the state report."""
        return {"port": self.port_name, "image_sha256": self.running_image}


class BoardRuntime(SerialRuntime):
    """A firmware bundle served by the board; it answers while the board runs its image."""

    def __init__(self, gateway: Gateway, bundle: ModelBundle, digest: str) -> None:
        super().__init__(bundle, _NO_PORT, timeout_s=gateway.settings.timeout_s)
        self.gateway = gateway
        self.image_sha256 = digest

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        gateway = self.gateway
        with gateway._io:
            self._port = gateway.port_for(self.image_sha256)
            try:
                return super()._run(inputs)
            except SerialFrameError as exc:
                if isinstance(exc.__cause__, OSError) or _HUNG_UP in str(exc):
                    # a port that failed or hung up (a board that reset and came back on
                    # another device node behind the same name): the next request reopens it
                    gateway._close_port()
                raise
            except OSError as exc:
                gateway._close_port()  # reopened by the next request
                raise BoardError(f"board {gateway.port_name}: {exc}") from exc


class _NoPort:
    """The port of a :class:`BoardRuntime` before its first request (replaced per request)."""

    def read(self, size: int = -1, /) -> bytes | None:
        raise OSError("no port")

    def write(self, data: bytes, /) -> int | None:
        raise OSError("no port")

    def flush(self) -> None:
        return None


_NO_PORT = _NoPort()


def conformance_detail(bundle: ModelBundle, replay: Replay, board: str) -> dict[str, Any]:
    """The detail of a ``conformance`` event."""
    firmware = bundle.card.firmware
    latencies = [1000.0 * s for s in replay.latencies_s]
    return {
        "model_id": bundle.model_id,
        "target": firmware.target if firmware is not None else None,
        "board": board,
        "passed": replay.passed,
        "vectors": replay.vectors,
        "failed": list(replay.failed),
        "max_error": _finite(replay.max_error),
        "tolerance": _finite(replay.tolerance),
        "mean_cycles": round(sum(replay.cycles) / len(replay.cycles)) if replay.cycles else None,
        "latency_ms_mean": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "latency_ms_max": round(max(latencies), 3) if latencies else None,
        "reason": replay.reason,
    }


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _now() -> float:
    return round(time.time(), 3)
