"""A Cortex-M board under QEMU: :class:`QemuBoard`, and the flash command a gateway runs.

The board is ``qemu-system-arm -M mps2-an385`` (Cortex-M3) or ``-M mps2-an386`` (Cortex-M4)
running a firmware built with the serial harness (``edgeops.firmware.cortexm.build_firmware(
..., harness="serial")``, the ``firmware.elf`` of a released firmware archive) under
``-icount shift=0 -nographic -monitor none``, its UART 0 on a pseudo-terminal (``-serial
pty``). Semihosting is enabled only so that a fault ends QEMU (the harness's start-up code
exits with status 70 + the exception number) instead of locking the core up.

Everything of a board is in its state directory:

- ``image.elf``: the "flash", replaced atomically by a flash; it survives resets and power
  cuts;
- ``qemu.pid``: the running QEMU's process id (QEMU runs in a session of its own, detached:
  it outlives the process that flashed it);
- ``console.log``: what QEMU printed, appended boot after boot;
- ``tty``: a symlink to the pseudo-terminal of the board's UART, replaced atomically when
  QEMU starts (the pseudo-terminal changes at every start; the path does not) and removed
  when it stops. Open it raw (:func:`device_agent.runtime._serial.open_port`, or pyserial):
  a pseudo-terminal in its default mode echoes and translates bytes;
- ``board.json``: the target and the number of QEMU starts.

:func:`flash_qemu` replaces the image, stops the running QEMU if any, starts a new one and
returns once the firmware answers an info frame on ``tty``; :func:`stop_qemu` stops it. The
same as a command line (the flash command of a gateway's attached board)::

    python -m hil.boards.qemu flash --dir /srv/boards/m3 --target mps2-an385 firmware.elf
    python -m hil.boards.qemu reset --dir /srv/boards/m3
    python -m hil.boards.qemu power-cycle --dir /srv/boards/m3 --off 1.5
    python -m hil.boards.qemu info --dir /srv/boards/m3
    python -m hil.boards.qemu stop --dir /srv/boards/m3

A state directory is locked (``flock`` on ``.lock``) while a command changes it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hil.boards.base import Board, BoardError, BoardOutput, Metrics
from hil.boards.serial import SerialLink
from hil.errors import HilError

__all__ = [
    "MACHINES",
    "QemuBoard",
    "flash_qemu",
    "main",
    "qemu_command",
    "restart_qemu",
    "stop_qemu",
]

QEMU = "qemu-system-arm"
MACHINES = {"mps2-an385": "mps2-an385", "mps2-an386": "mps2-an386"}
"""Target name to the ``qemu-system-arm -M`` machine."""
DEFAULT_TARGET = "mps2-an385"
READY_TIMEOUT_S = 30.0
"""How long a start waits for the firmware to answer an info frame."""
PTY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0

IMAGE = "image.elf"
PID = "qemu.pid"
CONSOLE = "console.log"
TTY = "tty"
STATE = "board.json"
LOCK = ".lock"

_PTY = re.compile(rb"char device redirected to (/dev/\S+) \(label serial0\)")
_ELF_ARM = 40  # e_machine of a 32-bit Arm ELF


def qemu_command(target: str, image: Path) -> list[str]:
    """The QEMU command line that runs ``image`` as a board of ``target``."""
    machine = _machine(target)
    return [
        QEMU,
        "-M",
        machine,
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        "pty",
        "-icount",
        "shift=0",
        "-semihosting-config",
        "enable=on,target=native",
        "-kernel",
        str(image),
    ]


def _machine(target: str) -> str:
    try:
        return MACHINES[target]
    except KeyError:
        raise BoardError(
            f"unknown QEMU board target {target!r}; targets: {', '.join(MACHINES)}"
        ) from None


def _name(state_dir: Path) -> str:
    return f"board {state_dir}"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BoardError(f"{_name(state_dir)}: cannot use the state directory: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _check_image(image: Path, state_dir: Path) -> bytes:
    try:
        data = Path(image).read_bytes()
    except OSError as exc:
        raise BoardError(f"{_name(state_dir)}: cannot read image {image}: {exc.strerror}") from None
    if (
        len(data) < 20
        or data[:4] != b"\x7fELF"
        or data[4] != 1
        or int.from_bytes(data[18:20], "little") != _ELF_ARM
    ):
        raise BoardError(f"{_name(state_dir)}: {image} is not a 32-bit Arm ELF image")
    return data


def _read_state(state_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((state_dir / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    _write_atomic(state_dir / STATE, json.dumps(state, sort_keys=True).encode() + b"\n")


def _proc_state(pid: int) -> str | None:
    """The process's state letter from /proc, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    if state == "Z":
        _reap(pid)
        return False
    return state is not None


def _running_pid(state_dir: Path) -> int | None:
    """The pid of this directory's running QEMU, None if none runs (a stale pid file, or a
    pid now used by another program, is not one)."""
    try:
        pid = int((state_dir / PID).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    image = str(state_dir / IMAGE).encode()
    if not cmdline or not cmdline[0].endswith(QEMU.encode()) or image not in cmdline:
        return None
    return pid


def _kill(state_dir: Path, sig: signal.Signals) -> None:
    """Send ``sig`` to the directory's QEMU and wait until it is gone (SIGKILL after
    STOP_TIMEOUT_S); remove the pid file and the tty link."""
    pid = _running_pid(state_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid):
            if time.monotonic() > deadline and sig != signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                sig = signal.SIGKILL
                deadline = time.monotonic() + STOP_TIMEOUT_S
            elif time.monotonic() > deadline:
                raise BoardError(f"{_name(state_dir)}: QEMU (pid {pid}) does not stop")
            time.sleep(0.01)
    for name in (PID, TTY):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()


def _console_tail(state_dir: Path, offset: int = 0) -> str:
    try:
        with (state_dir / CONSOLE).open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "no console output"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "no console output"


def _launch(state_dir: Path, target: str) -> int:
    """Start QEMU detached on the directory's image; its pid once ``tty`` points to its
    pseudo-terminal."""
    executable = shutil.which(QEMU)
    if executable is None:
        raise BoardError(f"{_name(state_dir)}: {QEMU} not found: apt-get install qemu-system-arm")
    command = qemu_command(target, state_dir / IMAGE)
    console = state_dir / CONSOLE
    with console.open("ab") as log:
        offset = log.tell()
    try:
        with console.open("ab") as log:
            process = subprocess.Popen(
                [executable, *command[1:]],
                cwd=state_dir,  # semihosting file operations stay in the state directory
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError as exc:
        raise BoardError(f"{_name(state_dir)}: cannot start {QEMU}: {exc.strerror}") from None
    pid = process.pid
    try:
        _write_atomic(state_dir / PID, f"{pid}\n".encode())
    except BaseException:  # no pid file: nothing could ever stop this QEMU
        process.kill()
        process.wait()
        raise
    with warnings.catch_warnings():
        # QEMU outlives this object by design; subprocess reaps it if it ends meanwhile
        warnings.simplefilter("ignore", ResourceWarning)
        del process
    state = _read_state(state_dir)
    boots = state.get("boots")
    _write_state(
        state_dir, {"target": target, "boots": (boots if isinstance(boots, int) else 0) + 1}
    )
    deadline = time.monotonic() + PTY_TIMEOUT_S
    while True:
        with console.open("rb") as handle:
            handle.seek(offset)
            found = _PTY.search(handle.read())
        if found is not None:
            break
        if not _alive(pid):
            raise BoardError(
                f"{_name(state_dir)}: {QEMU} exited at start: {_console_tail(state_dir, offset)}"
            )
        if time.monotonic() > deadline:
            _kill(state_dir, signal.SIGKILL)
            raise BoardError(
                f"{_name(state_dir)}: {QEMU} named no pseudo-terminal within "
                f"{PTY_TIMEOUT_S:g} s: {_console_tail(state_dir, offset)}"
            )
        time.sleep(0.02)
    link = state_dir / f".{TTY}.tmp"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(found.group(1).decode())
    link.replace(state_dir / TTY)
    return pid


def _boot(state_dir: Path, target: str, link: SerialLink, ready_timeout_s: float) -> None:
    """Start QEMU on the directory's image and wait until the firmware answers on ``link``
    (left open); QEMU is stopped again if it does not."""
    pid = _launch(state_dir, target)

    def check() -> None:
        if not _alive(pid):
            raise BoardError(
                f"{link.board}: QEMU exited before the firmware answered: "
                f"{_console_tail(state_dir)}"
            )

    try:
        link.wait_ready(ready_timeout_s, check=check)
    except BoardError:
        link.close()
        _kill(state_dir, signal.SIGKILL)
        raise


def _target_of(state_dir: Path, target: str | None) -> str:
    if target is not None:
        _machine(target)
        return target
    recorded = _read_state(state_dir).get("target")
    return recorded if isinstance(recorded, str) and recorded in MACHINES else DEFAULT_TARGET


def _flash(
    state_dir: Path, image: Path, target: str, link: SerialLink, ready_timeout_s: float
) -> None:
    _machine(target)
    data = _check_image(image, state_dir)
    with _locked(state_dir):
        _kill(state_dir, signal.SIGTERM)
        _write_atomic(state_dir / IMAGE, data)
        _boot(state_dir, target, link, ready_timeout_s)


def flash_qemu(
    state_dir: Path,
    image: Path,
    target: str = DEFAULT_TARGET,
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Flash ``image`` on the QEMU board of ``state_dir`` (created if need be): replace
    ``image.elf`` atomically, stop the running QEMU, start a new one detached and wait until
    the firmware answers an info frame on ``tty``. BoardError (nothing started) if the image
    is not a 32-bit Arm ELF, QEMU fails to start or the firmware does not answer."""
    state_dir = Path(state_dir).resolve()
    link = SerialLink(_name(state_dir), str(state_dir / TTY))
    try:
        _flash(state_dir, Path(image), target, link, ready_timeout_s)
    finally:
        link.close()


def restart_qemu(
    state_dir: Path,
    *,
    power_cut: bool = False,
    off_s: float = 0.0,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Restart the QEMU board of ``state_dir`` on the image it has: a clean stop (SIGTERM),
    or with ``power_cut`` a SIGKILL and ``off_s`` seconds without power; then wait until the
    firmware answers. BoardError if nothing was flashed there."""
    state_dir = Path(state_dir).resolve()
    link = SerialLink(_name(state_dir), str(state_dir / TTY))
    try:
        _restart(state_dir, None, link, power_cut, off_s, ready_timeout_s)
    finally:
        link.close()


def _restart(
    state_dir: Path,
    target: str | None,
    link: SerialLink,
    power_cut: bool,
    off_s: float,
    ready_timeout_s: float,
) -> None:
    link.close()
    with _locked(state_dir):
        if not (state_dir / IMAGE).is_file():
            raise BoardError(f"{link.board} has no image: flash one first")
        chosen = _target_of(state_dir, target)
        _kill(state_dir, signal.SIGKILL if power_cut else signal.SIGTERM)
        if off_s > 0:
            time.sleep(off_s)
        _boot(state_dir, chosen, link, ready_timeout_s)


def stop_qemu(state_dir: Path) -> None:
    """Stop the QEMU board of ``state_dir``, if it runs (the image stays)."""
    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        return
    with _locked(state_dir):
        _kill(state_dir, signal.SIGTERM)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class QemuBoard(Board):
    """A Cortex-M board under QEMU whose state lives in ``state_dir`` (see the module
    docstring). :meth:`deploy` is :func:`flash_qemu`; :meth:`reset` restarts QEMU on the same
    image; :meth:`power_cut` kills it (SIGKILL), waits and starts it again; inputs and
    outputs travel as frames over the UART's pseudo-terminal."""

    kind = "qemu"

    def __init__(
        self,
        name: str,
        state_dir: Path,
        target: str = DEFAULT_TARGET,
        *,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        super().__init__(name)
        _machine(target)
        self.state_dir = Path(state_dir).resolve()
        self.target = target
        self.ready_timeout_s = ready_timeout_s
        self.restarts = 0
        self._link = SerialLink(name, str(self.state_dir / TTY))

    @property
    def link(self) -> SerialLink:
        """The framed link to the firmware (for raw frames: ``link.port()``)."""
        return self._link

    @property
    def tty(self) -> Path:
        """The symlink to the UART's pseudo-terminal."""
        return self.state_dir / TTY

    @property
    def image(self) -> Path:
        return self.state_dir / IMAGE

    def deploy(self, image: Path) -> None:
        self._link.close()
        self._link.info = None
        try:
            _flash(self.state_dir, Path(image), self.target, self._link, self.ready_timeout_s)
        except BoardError as exc:
            raise BoardError(_rename(exc, self.state_dir, self.name)) from None

    def reset(self) -> None:
        self._restart(power_cut=False, off_s=0.0)

    def power_cut(self, off_s: float = 0.0) -> None:
        self._restart(power_cut=True, off_s=off_s)

    def _restart(self, *, power_cut: bool, off_s: float) -> None:
        _restart(self.state_dir, self.target, self._link, power_cut, off_s, self.ready_timeout_s)
        self.restarts += 1

    def _require_running(self) -> None:
        if not self._link.is_open and _running_pid(self.state_dir) is None:
            raise BoardError(f"board {self.name} is not running: deploy an image first")

    def send_input(self, tensor: np.ndarray) -> None:
        self._require_running()
        self._link.send(tensor)

    def read_output(self, timeout_s: float = 10.0) -> BoardOutput:
        return self._link.receive(timeout_s)

    def read_metrics(self) -> Metrics:
        """The firmware's info frame (``build_id``, ``input_size``, ``output_size``,
        ``arena_bytes``, ``float_input``, ``float_output``, ``requests`` and ``errors`` since
        boot, ...), ``image_sha256``, ``target``, ``restarts`` (resets and power cuts by this
        object), ``boots`` (QEMU starts in the state directory), ``pid``, ``tty`` and the
        cycles of the last answer (``last_cycles``)."""
        self._require_running()
        metrics = self._link.metrics()
        state = _read_state(self.state_dir)
        boots = state.get("boots")
        metrics.update(
            image_sha256=_sha256(self.image),
            target=self.target,
            restarts=self.restarts,
            boots=boots if isinstance(boots, int) else None,
            pid=_running_pid(self.state_dir),
            tty=str(self.tty),
        )
        return metrics

    def close(self) -> None:
        self._link.close()
        stop_qemu(self.state_dir)


def _rename(exc: BoardError, state_dir: Path, name: str) -> str:
    return str(exc).replace(_name(state_dir), f"board {name}", 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hil.boards.qemu",
        description=(
            "Run a Cortex-M firmware image (built with the EdgeOps serial harness) as a board "
            "under qemu-system-arm, detached, its UART on a pseudo-terminal reached through "
            "DIR/tty. The state directory DIR holds image.elf (the flash), qemu.pid, "
            "console.log and board.json."
        ),
        epilog="Exit status: 0 done, 1 the board failed (one line on stderr), 2 bad usage.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--dir", required=True, type=Path, metavar="DIR", help="the board's state directory"
        )
        return command

    flash = add(
        "flash",
        "Replace the board's image with IMAGE, (re)start QEMU and wait until the firmware "
        "answers an info frame; prints the firmware's info as one line of JSON.",
    )
    flash.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        choices=sorted(MACHINES),
        help=f"the QEMU machine (default {DEFAULT_TARGET})",
    )
    flash.add_argument("image", type=Path, metavar="IMAGE", help="an ELF from the serial harness")
    flash.add_argument(
        "--timeout",
        type=float,
        default=READY_TIMEOUT_S,
        help=f"seconds to wait for the firmware (default {READY_TIMEOUT_S:g})",
    )
    reset = add("reset", "Restart QEMU cleanly on the image the board has.")
    reset.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
    cycle = add(
        "power-cycle",
        "Kill QEMU at once (SIGKILL: nothing is flushed), wait, start it again on its image.",
    )
    cycle.add_argument(
        "--off", type=float, default=0.0, metavar="SECONDS", help="seconds without power"
    )
    cycle.add_argument("--timeout", type=float, default=READY_TIMEOUT_S)
    add("info", "Print the running firmware's info frame as one line of JSON.")
    add("stop", "Stop the board's QEMU if it runs (the image stays).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; see ``python -m hil.boards.qemu --help``."""
    args = _parser().parse_args(argv)
    state_dir = args.dir.resolve()
    link = SerialLink(_name(state_dir), str(state_dir / TTY))
    try:
        if args.command == "flash":
            _flash(state_dir, args.image, args.target, link, args.timeout)
        elif args.command in ("reset", "power-cycle"):
            cut = args.command == "power-cycle"
            _restart(state_dir, None, link, cut, args.off if cut else 0.0, args.timeout)
        elif args.command == "info":
            if _running_pid(state_dir) is None:
                raise BoardError(f"{link.board} is not running")
            link.wait_ready(READY_TIMEOUT_S)
        else:
            stop_qemu(state_dir)
            return 0
        info = dict(link.info or {})
        info.update(tty=str(state_dir / TTY), image_sha256=_sha256(state_dir / IMAGE))
        sys.stdout.write(json.dumps(info, sort_keys=True) + "\n")
        return 0
    except HilError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"error: {_name(state_dir)}: {exc}\n")
        return 1
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
