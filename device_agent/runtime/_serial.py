"""A model on a microcontroller behind a serial port (UART, USB CDC, or a pseudo-terminal).

The host does what every runtime does — check the sample, apply the feature rule, quantize
with the card's input parameters — and sends the input tensor's bytes; the board runs the
model (the generated C library of :mod:`edgeops.firmware`, or TFLite Micro) and sends back
the output tensor's bytes and the cycles it took. The host dequantizes with the card's output
parameters. The EdgeOps serial harness (``firmware_templates/mps2/main_serial.c``) speaks
this framing; tests use it under QEMU and a fake board on a pseudo-terminal.

**Frames** (all integers little-endian)::

    offset  size  field
    0       2     magic  b"EO"
    2       1     kind   b"Q" request (host -> board); b"R" result, b"E" error, b"I" info
                         (board -> host)
    3       2     seq    uint16, chosen by the host, echoed by the board
    5       4     n      uint32, payload length (at most MAX_PAYLOAD bytes)
    9       n     payload
    9+n     4     crc    uint32, CRC-32 (zlib.crc32) of bytes 2 .. 9+n (kind, seq, n, payload)

Payloads: a request carries the input tensor exactly as stored (int8 bytes for a full-int8
model, float32 for a float one); a result carries ``uint32 cycles`` followed by the output
tensor as stored; an error carries a UTF-8 message. A request with an empty payload asks the
board what it runs: it answers with an info frame whose payload is a UTF-8 JSON object (the
EdgeOps serial harness, ``firmware_templates/mps2/main_serial.c``, reports ``build_id``,
``target``, ``input_size``, ``output_size``, ``input_bytes``, ``output_bytes``,
``arena_bytes``, ``float_input``, ``float_output`` and the ``requests`` and ``errors`` since
boot); :func:`request_info` sends one.

The host sends one request at a time and waits up to ``timeout_s`` for the result with the
same ``seq``; results with another seq (late answers to timed-out requests) are skipped.
Bytes before a magic are skipped (the board may print boot text); a bad CRC, an oversized
length or a silent board raise :class:`SerialFrameError`, and the next request starts afresh.

The port must be raw: a tty in its default (cooked) mode echoes the host's bytes and
translates some of them (CR to LF, ^C to a signal, ...). :func:`open_port` opens a device
path with pyserial, which sets raw mode, and without a read timeout of its own, as the
runtime expects.
"""

from __future__ import annotations

import enum
import json
import math
import select
import struct
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from device_agent.runtime._base import TensorCodec, TensorRuntime
from device_agent.runtime._bundle import ModelBundle
from device_agent.runtime._errors import InferenceError, RuntimeLoadError, SerialFrameError

if TYPE_CHECKING:
    import serial

__all__ = [
    "MAGIC",
    "MAX_PAYLOAD",
    "FrameKind",
    "SerialFrame",
    "SerialPort",
    "SerialRuntime",
    "encode_frame",
    "error_text",
    "open_port",
    "read_frame",
    "request_info",
]

MAGIC = b"EO"
MAX_PAYLOAD = 1 << 20  # bytes; larger lengths are garbage, not a frame
MAX_SKIPPED = 64 * 1024  # bytes of noise tolerated before a magic
_HEADER = struct.Struct("<cHI")  # kind, seq, payload length
_CRC = struct.Struct("<I")
_CYCLES = struct.Struct("<I")


class FrameKind(enum.Enum):
    REQUEST = b"Q"
    RESULT = b"R"
    ERROR = b"E"
    INFO = b"I"


@dataclass(frozen=True)
class SerialFrame:
    kind: FrameKind
    seq: int
    payload: bytes


class SerialPort(Protocol):
    """What the runtime needs of a port: a pyserial ``Serial``, or an unbuffered file over a
    tty (``open(path, "r+b", buffering=0)``). ``read`` may return fewer bytes than asked."""

    def read(self, size: int = ..., /) -> bytes | None: ...

    def write(self, data: bytes, /) -> int | None: ...

    def flush(self) -> None: ...


def encode_frame(kind: FrameKind, seq: int, payload: bytes) -> bytes:
    """One frame's bytes (see the module docstring)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = _HEADER.pack(kind.value, seq & 0xFFFF, len(payload)) + payload
    return MAGIC + body + _CRC.pack(zlib.crc32(body))


def read_frame(port: SerialPort, timeout_s: float) -> SerialFrame:
    """The next frame on ``port``; SerialFrameError if none arrives in time or it is bad."""
    reader = _Reader(port, time.monotonic() + timeout_s)
    skipped = 0
    window = reader.exactly(2)
    while window != MAGIC:
        skipped += 1
        if skipped > MAX_SKIPPED:
            raise SerialFrameError(f"no frame magic in {MAX_SKIPPED} bytes from the device")
        window = window[1:] + reader.exactly(1)
    header = reader.exactly(_HEADER.size)
    kind_byte, seq, length = _HEADER.unpack(header)
    try:
        kind = FrameKind(kind_byte)
    except ValueError:
        raise SerialFrameError(f"unknown frame kind {kind_byte!r} from the device") from None
    if length > MAX_PAYLOAD:
        raise SerialFrameError(f"frame length {length} exceeds the limit of {MAX_PAYLOAD}")
    payload = reader.exactly(length)
    (crc,) = _CRC.unpack(reader.exactly(_CRC.size))
    if crc != zlib.crc32(header + payload):
        raise SerialFrameError(f"frame {seq} from the device fails its CRC check")
    return SerialFrame(kind, seq, payload)


def open_port(path: str, *, baud: int = 115200) -> serial.Serial:
    """``path`` (a serial device, a pseudo-terminal or a symlink to one) opened raw with
    pyserial at ``baud``, reads returning what is there (the framing functions wait with
    ``select`` and their own deadline), and exclusively: another opener that asks for an
    exclusive port too (pyserial's ``exclusive=True``, an advisory ``flock``, as this function
    does) gets SerialFrameError, as it does when the port cannot be opened; a program that
    opens the device without locking it is not kept out."""
    try:
        import serial
    except ImportError:  # pragma: no cover - pyserial ships with the agent extra
        raise SerialFrameError("pyserial is not installed: pip install pyserial") from None
    try:
        return serial.Serial(path, baud, timeout=0, write_timeout=10.0, exclusive=True)
    except (OSError, ValueError, serial.SerialException) as exc:
        raise SerialFrameError(f"cannot open serial port {path}: {exc}") from None


def request_info(port: SerialPort, timeout_s: float = 5.0, *, seq: int = 0xFF00) -> dict[str, Any]:
    """Ask the board behind ``port`` what it runs (an empty request) and return its info
    frame's JSON object. Frames with another seq are skipped; an error frame, a silent board
    or a payload that is not a JSON object raise SerialFrameError."""
    seq &= 0xFFFF
    try:
        _write_all(port, encode_frame(FrameKind.REQUEST, seq, b""))
    except OSError as exc:
        raise SerialFrameError(f"writing to the device failed: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        frame = read_frame(port, max(0.0, deadline - time.monotonic()))
        if frame.seq == seq and frame.kind is not FrameKind.REQUEST:
            break
    if frame.kind is FrameKind.ERROR:
        message = error_text(frame.payload)
        raise SerialFrameError(f"the device answered the info request with an error: {message}")
    if frame.kind is not FrameKind.INFO:
        raise SerialFrameError(
            f"the device answered the info request with a {frame.kind.name.lower()} frame"
        )
    try:
        info = json.loads(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SerialFrameError("the device's info frame is not UTF-8 JSON") from None
    if not isinstance(info, dict):
        raise SerialFrameError("the device's info frame is not a JSON object")
    return info


ERROR_TEXT_CHARS = 300
"""Characters of a board's error message quoted in an exception (a board sends what it wants)."""


def error_text(payload: bytes) -> str:
    """An error frame's message as one line (whitespace runs made one space, undecodable
    bytes replaced) of at most :data:`ERROR_TEXT_CHARS` characters."""
    text = " ".join(payload[: 4 * ERROR_TEXT_CHARS].decode("utf-8", errors="replace").split())
    return text if len(text) <= ERROR_TEXT_CHARS else text[: ERROR_TEXT_CHARS - 3] + "..."


class _Reader:
    """Reads exact byte counts before a deadline, from blocking or timed ports."""

    def __init__(self, port: SerialPort, deadline: float) -> None:
        self._port = port
        self._deadline = deadline
        self._fd = _fileno(port)

    def exactly(self, size: int) -> bytes:
        parts: list[bytes] = []
        missing = size
        while missing > 0:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise SerialFrameError("the device did not answer in time")
            if self._fd is not None:
                ready, _, _ = select.select([self._fd], [], [], remaining)
                if not ready:
                    continue
            try:
                chunk = self._port.read(missing)
            except OSError as exc:
                raise SerialFrameError(f"reading from the device failed: {exc}") from exc
            if not chunk:
                if self._fd is not None:  # readable but empty: the other end is gone
                    raise SerialFrameError("the device closed the connection")
                time.sleep(0.001)
                continue
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)


def _write_all(port: SerialPort, data: bytes) -> None:
    """Write every byte (an unbuffered file may take only part of them per call)."""
    view = memoryview(data)
    while view:
        written = port.write(bytes(view))
        if written is None:  # a non-blocking port that is full: wait a little
            time.sleep(0.001)
            continue
        view = view[written:]
    port.flush()


def _fileno(port: SerialPort) -> int | None:
    fileno = getattr(port, "fileno", None)
    if fileno is None:
        return None
    try:
        return int(fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None


class SerialRuntime(TensorRuntime):
    """A bundle running on a board behind ``port`` (see the module docstring for the framing).

    The card's quantization parameters and tensor specs decide the bytes: the board must run
    the bundle's own model. ``last_cycles`` holds the board's cycle count for the last sample.
    """

    name = "serial"

    def __init__(self, bundle: ModelBundle, port: SerialPort, *, timeout_s: float = 5.0) -> None:
        super().__init__(bundle)
        card = bundle.card
        out_dims = card.output_spec.shape[1:]
        if not out_dims or any(d is None for d in out_dims):
            raise RuntimeLoadError(
                f"{bundle.directory}: the serial runtime needs a fixed output shape, the card "
                f"says {card.output_spec.shape}"
            )
        q_in, q_out = card.quantization.input, card.quantization.output
        try:
            self._input = TensorCodec(
                (1, *bundle.rule.model_input_shape),
                card.input_spec.dtype,
                q_in.scale if q_in is not None else 0.0,
                q_in.zero_point if q_in is not None else 0,
            )
            self._output = TensorCodec(
                (1, *(int(d) for d in out_dims if d is not None)),
                card.output_spec.dtype,
                q_out.scale if q_out is not None else 0.0,
                q_out.zero_point if q_out is not None else 0,
            )
        except TypeError as exc:
            raise RuntimeLoadError(f"{bundle.directory}: unknown tensor dtype: {exc}") from exc
        self._out_dtype = self._output.dtype.newbyteorder("<")
        self._out_bytes = self._output.size * self._output.dtype.itemsize
        self._port: SerialPort | None = port
        self._timeout_s = timeout_s
        self._seq = 0
        self.last_cycles: int | None = None
        self._set_outputs(math.prod(int(d) for d in out_dims if d is not None))

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        port = self._port
        if port is None:
            raise InferenceError("the serial runtime is closed")
        self._seq = (self._seq + 1) & 0xFFFF
        stored = self._input.encode(inputs)
        payload = stored.astype(stored.dtype.newbyteorder("<"), copy=False).tobytes()
        try:
            _write_all(port, encode_frame(FrameKind.REQUEST, self._seq, payload))
        except OSError as exc:
            raise SerialFrameError(f"writing to the device failed: {exc}") from exc
        deadline = time.monotonic() + self._timeout_s
        while True:
            frame = read_frame(port, max(0.0, deadline - time.monotonic()))
            if frame.seq != self._seq or frame.kind is FrameKind.REQUEST:
                continue  # a late answer to an earlier request, or our own echo
            break
        if frame.kind is FrameKind.ERROR:
            raise InferenceError(f"the device reported an error: {error_text(frame.payload)}")
        expected = _CYCLES.size + self._out_bytes
        if len(frame.payload) != expected:
            raise SerialFrameError(
                f"result frame {frame.seq} holds {len(frame.payload)} bytes, expected "
                f"{expected} (cycles + {self._output.size} {self._output.dtype} outputs)"
            )
        (self.last_cycles,) = _CYCLES.unpack_from(frame.payload)
        q = np.frombuffer(frame.payload, dtype=self._out_dtype, offset=_CYCLES.size)
        return self._output.decode(q)

    def _release(self) -> None:
        self._port = None
