"""A microcontroller on a serial port: :class:`SerialBoard`, and the framed link every
microcontroller board of the rig talks through (:class:`SerialLink`).

The board's firmware speaks the frames of :mod:`device_agent.runtime._serial` (the EdgeOps
serial harness, ``firmware_templates/mps2/main_serial.c``, does): a request carries an input
tensor and is answered with the output tensor and the cycles the board counted, or with an
error message; an empty request is answered with an info frame (a JSON object: build id,
input and output sizes, arena bytes, ...), which is how the rig knows a board is up and what
it runs.

:class:`SerialBoard` drives real hardware through commands the operator gives, templates
filled with ``{image}`` (the image's absolute path), ``{port}`` (the serial port) and, for
the power command, ``{off_s}`` (seconds without power); they run without a shell (split with
:func:`shlex.split`), each with a time limit, and a non-zero exit is a :class:`BoardError`
naming the command and the last lines it printed. Examples::

    # STM32 (ST-LINK) with OpenOCD
    openocd -f board/st_nucleo_f4.cfg -c "program {image} verify reset exit"
    # ESP32 over its own USB serial port
    esptool.py --chip esp32 --port {port} write_flash 0x10000 {image}
    # any Zephyr board (west picks the runner of the board the build was made for)
    west flash --build-dir build --hex-file {image}
    # power through a USB hub that switches its ports (uhubctl)
    uhubctl -l 1-1 -p 2 -a cycle -d {off_s}

Without a reset command, :meth:`SerialBoard.reset` pulses RTS for 100 ms with DTR released,
the auto-reset wiring of ESP32 and ESP8266 boards (RTS drives EN), then reopens the port,
which asserts DTR: the reset of Arduino boards whose DTR line is coupled to RESET. Without a
power command, :meth:`SerialBoard.power_cut` is a :class:`BoardError`.

The port is opened raw with pyserial (:func:`device_agent.runtime._serial.open_port`) and
reopened after every flash, reset and power cut: a USB serial device re-enumerates, and a
QEMU board's pseudo-terminal changes (its ``tty`` symlink then points to the new one).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.command import TemplateError, fill_template, parse_template, run_in_group
from device_agent.runtime._errors import SerialFrameError
from device_agent.runtime._serial import (
    FrameKind,
    encode_frame,
    error_text,
    open_port,
    read_frame,
    request_info,
)
from hil.boards.base import Board, BoardError, BoardOutput, Metrics

__all__ = ["SerialBoard", "SerialLink"]

INFO_ATTEMPT_S = 2.5
"""How long one info request waits for its answer before another is sent (a QEMU
pseudo-terminal takes up to a second to notice that the host opened it)."""
COMMAND_TIMEOUT_S = 300.0
RESET_PULSE_S = 0.1
_INFO_SEQ = 0xFF00  # info requests use seqs 0xFF00-0xFFFF, inputs 1-0xFEFF
_CYCLES_BYTES = 4


class SerialLink:
    """Frames to and from one board over a raw serial port.

    :meth:`wait_ready` opens the port and sends info requests until the board answers one;
    :meth:`send` and :meth:`receive` carry one input and its answer. The board's info
    (:attr:`info`) decides the tensor types: int8 values, or float32 for a model with a float
    input (output). Every failure is a :class:`BoardError` naming the board.
    """

    def __init__(self, board: str, path: str, *, baud: int = 115200) -> None:
        self.board = board
        self.path = path
        self.baud = baud
        self.info: dict[str, Any] | None = None
        self.last_cycles: int | None = None
        self._port: Any = None
        self._seq = 0
        self._info_seq = 0
        self._pending: tuple[int, float] | None = None
        self._opened_as = ""

    def _error(self, message: str) -> BoardError:
        return BoardError(f"board {self.board}: {message}")

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def open(self) -> None:
        """Open the port (raw, pyserial); BoardError if it cannot be."""
        if self._port is not None:
            return
        opened_as = os.path.realpath(self.path)
        try:
            self._port = open_port(self.path, baud=self.baud)
        except SerialFrameError as exc:
            raise self._error(str(exc)) from None
        self._opened_as = opened_as
        self._pending = None

    def close(self) -> None:
        port, self._port = self._port, None
        self._pending = None
        if port is not None:
            with contextlib.suppress(OSError):
                port.close()

    def port(self) -> Any:
        """The open pyserial port (opening it first). A path that now resolves elsewhere
        (a QEMU board restarted by another process points its ``tty`` at a new
        pseudo-terminal) is reopened."""
        if self._port is not None and os.path.realpath(self.path) != self._opened_as:
            self.close()
        self.open()
        return self._port

    def query_info(self, timeout_s: float = INFO_ATTEMPT_S) -> dict[str, Any]:
        """The board's info frame, asked once; BoardError if it does not answer."""
        port = self.port()
        self._info_seq = (self._info_seq + 1) & 0xFF
        try:
            info = request_info(port, timeout_s, seq=_INFO_SEQ | self._info_seq)
        except SerialFrameError as exc:
            raise self._error(f"no info from {self.path}: {exc}") from None
        self.info = info
        return info

    def wait_ready(
        self, timeout_s: float, *, check: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Open the port and repeat info requests until the board answers one (its info);
        BoardError after ``timeout_s``. ``check`` runs between attempts and may raise (a
        board that is known to be dead fails at once)."""
        deadline = time.monotonic() + timeout_s
        last = "nothing tried"
        while True:
            if check is not None:
                check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise self._error(
                    f"did not answer an info request on {self.path} within {timeout_s:g} s ({last})"
                )
            try:
                return self.query_info(min(INFO_ATTEMPT_S, remaining))
            except BoardError as exc:
                last = str(exc).removeprefix(f"board {self.board}: ")
                if not Path(self.path).exists() or "cannot open" in last:
                    self.close()
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _tensor_info(self) -> dict[str, Any]:
        if self.info is None:
            self.query_info()
        assert self.info is not None
        return self.info

    def send(self, tensor: np.ndarray) -> None:
        """Send one input tensor: int8 values, or float32 for a model with a float input.
        Its length is not checked here: the board answers a wrong one with an error."""
        info = self._tensor_info()
        array = np.asarray(tensor)
        if bool(info.get("float_input")):
            if not np.issubdtype(array.dtype, np.floating):
                raise self._error(
                    f"the model takes float32 input tensors, got {array.dtype} values"
                )
            payload = np.ascontiguousarray(array, dtype="<f4").tobytes()
        else:
            if array.dtype != np.int8:
                raise self._error(f"the model takes int8 input tensors, got {array.dtype} values")
            payload = np.ascontiguousarray(array).tobytes()
        port = self.port()
        self._seq = self._seq % (_INFO_SEQ - 1) + 1
        try:
            port.write(encode_frame(FrameKind.REQUEST, self._seq, payload))
            port.flush()
        except (OSError, ValueError) as exc:  # pyserial's SerialException is an OSError
            self.close()
            raise self._error(f"writing to {self.path} failed: {exc}") from None
        self._pending = (self._seq, time.monotonic())

    def receive(self, timeout_s: float = 10.0) -> BoardOutput:
        """The answer to the input last sent; BoardError for an error frame, a silent
        board, a broken frame or an answer of the wrong size."""
        if self._pending is None:
            raise self._error("no input is waiting for an answer: send_input first")
        seq, sent = self._pending
        port = self.port()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                frame = read_frame(port, max(0.0, deadline - time.monotonic()))
                if frame.seq == seq and frame.kind in (FrameKind.RESULT, FrameKind.ERROR):
                    break
        except SerialFrameError as exc:
            self._pending = None
            if "did not answer in time" not in str(exc):
                self.close()  # a port that failed or hung up: open it afresh next time
            raise self._error(f"no answer to input {seq} on {self.path}: {exc}") from None
        latency = time.monotonic() - sent
        self._pending = None
        if frame.kind is FrameKind.ERROR:
            raise self._error(f"the board reported an error: {error_text(frame.payload)}")
        info = self._tensor_info()
        float_output = bool(info.get("float_output"))
        dtype = np.dtype("<f4") if float_output else np.dtype(np.int8)
        values = frame.payload[_CYCLES_BYTES:]
        expected = info.get("output_bytes")
        if len(frame.payload) < _CYCLES_BYTES or (
            isinstance(expected, int) and len(values) != expected
        ):
            raise self._error(
                f"result {seq} holds {len(frame.payload)} bytes, expected 4 + {expected}"
            )
        if len(values) % dtype.itemsize:
            raise self._error(f"result {seq} is not whole {dtype} values")
        cycles = int.from_bytes(frame.payload[:_CYCLES_BYTES], "little")
        self.last_cycles = cycles
        output = np.frombuffer(values, dtype=dtype).astype(np.float32 if float_output else np.int8)
        return BoardOutput(values=output, latency_s=latency, cycles=cycles, extra={"seq": seq})

    def metrics(self) -> Metrics:
        """The board's info (asked afresh) flattened, with ``last_cycles``."""
        info = self.query_info()
        metrics: Metrics = {}
        for key, value in info.items():
            if isinstance(value, bool):
                metrics[key] = int(value)
            elif isinstance(value, int | float | str) or value is None:
                metrics[key] = value
        metrics["last_cycles"] = self.last_cycles
        return metrics


def _tail(text: str, lines: int = 4) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no output"


def run_command(board: str, what: str, template: str, timeout_s: float, **values: str) -> None:
    """Run the command ``template`` filled with ``values`` (no shell, in a process group of
    its own: :func:`device_agent.command.run_in_group`); BoardError naming it and the last
    lines it printed if it cannot run, times out or exits non-zero."""
    try:
        command = fill_template(parse_template(template, values), **values)
    except TemplateError as exc:
        raise BoardError(
            f"board {board}: the {what} command {template!r} is not a valid template "
            f"(placeholders: {', '.join('{' + k + '}' for k in values)}): {exc}"
        ) from None
    shown = shlex.join(command)
    try:
        done = run_in_group(command, timeout_s)
    except OSError as exc:
        raise BoardError(
            f"board {board}: cannot run the {what} command `{shown}`: {exc.strerror or exc}"
        ) from None
    except subprocess.TimeoutExpired as exc:
        said = exc.stderr or exc.output or ""  # text: run_in_group decodes it
        raise BoardError(
            f"board {board}: the {what} command `{shown}` did not finish within "
            f"{timeout_s:g} s: {_tail(said if isinstance(said, str) else said.decode())}"
        ) from None
    if done.returncode != 0:
        raise BoardError(
            f"board {board}: the {what} command `{shown}` exited with status "
            f"{done.returncode}: {_tail(done.stdout + done.stderr)}"
        )


class SerialBoard(Board):
    """A microcontroller with the EdgeOps serial framing on ``port``; see the module
    docstring for the commands."""

    kind = "serial"

    def __init__(
        self,
        name: str,
        port: str,
        *,
        flash_command: str,
        reset_command: str | None = None,
        power_command: str | None = None,
        baud: int = 115200,
        ready_timeout_s: float = 10.0,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        super().__init__(name)
        self.port = port
        self.flash_command = flash_command
        self.reset_command = reset_command
        self.power_command = power_command
        self.ready_timeout_s = ready_timeout_s
        self.command_timeout_s = command_timeout_s
        self.image: Path | None = None
        self.restarts = 0
        self._link = SerialLink(name, port, baud=baud)

    @property
    def link(self) -> SerialLink:
        """The framed link to the firmware (for raw frames: ``link.port()``)."""
        return self._link

    def _run(self, what: str, template: str, **values: str) -> None:
        run_command(self.name, what, template, self.command_timeout_s, port=self.port, **values)

    def _ready(self) -> None:
        self._link.info = None
        self._link.wait_ready(self.ready_timeout_s)

    def deploy(self, image: Path) -> None:
        """Flash ``image`` with the flash command (the port is closed meanwhile, as the
        flasher may need it), then wait until the board answers an info request."""
        image = Path(image).resolve()
        if not image.is_file():
            raise BoardError(f"board {self.name}: image {image} does not exist")
        self._link.close()
        self._run("flash", self.flash_command, image=str(image))
        self.image = image
        self.restarts += 1
        self._ready()

    def reset(self) -> None:
        """Run the reset command, or pulse RTS (see the module docstring); wait until ready."""
        if self.reset_command is not None:
            self._link.close()
            self._run("reset", self.reset_command, image=str(self.image or ""))
        else:
            port = self._link.port()
            try:
                port.dtr = False
                port.rts = True
                time.sleep(RESET_PULSE_S)
                port.rts = False
            except (OSError, ValueError) as exc:
                self._link.close()
                raise BoardError(
                    f"board {self.name}: {self.port} cannot drive DTR/RTS ({exc}); give the "
                    "board a reset_command"
                ) from None
            self._link.close()
        self.restarts += 1
        self._ready()

    def power_cut(self, off_s: float = 0.0) -> None:
        """Run the power command with ``{off_s}``; BoardError if the board has none."""
        if self.power_command is None:
            raise BoardError(f"board {self.name} has no power_command: it cannot cut power")
        self._link.close()
        self._run(
            "power", self.power_command, image=str(self.image or ""), off_s=f"{max(0.0, off_s):g}"
        )
        self.restarts += 1
        self._ready()

    def send_input(self, tensor: np.ndarray) -> None:
        self._link.send(tensor)

    def read_output(self, timeout_s: float = 10.0) -> BoardOutput:
        return self._link.receive(timeout_s)

    def read_metrics(self) -> Metrics:
        """The board's info frame (build id, sizes, arena, requests and errors since boot),
        the port, the restarts the rig caused and the cycles of the last answer."""
        metrics = self._link.metrics()
        metrics["port"] = self.port
        metrics["restarts"] = self.restarts
        return metrics

    def close(self) -> None:
        self._link.close()
