"""Microcontroller boards of the rig: the generated firmware with the serial harness on
QEMU's mps2-an385 (Cortex-M3) and mps2-an386 (Cortex-M4), driven as a :class:`QemuBoard`
over its UART's pseudo-terminal, and as a :class:`SerialBoard` whose port is that
pseudo-terminal and whose flash, reset and power commands are ``python -m hil.boards.qemu``.

Everything is real: arm-none-eabi-gcc under -Werror, qemu-system-arm -icount, the frames of
``device_agent.runtime._serial`` over a raw pty. Outputs over the UART are compared byte for
byte with the semihosting build under QEMU and with the host build of the same library.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent.runtime._errors import SerialFrameError
from device_agent.runtime._serial import FrameKind, encode_frame, read_frame, request_info
from edgeops.firmware import generate
from edgeops.firmware.conformance import (
    build_host,
    random_float_inputs,
    random_inputs,
    run_host,
)
from edgeops.firmware.cortexm import QemuRun, build_firmware, build_id, run_qemu
from hil.boards import BoardError
from hil.boards.qemu import QemuBoard, flash_qemu, stop_qemu
from hil.boards.serial import SerialBoard
from tests.clitools import assert_one_line_error
from tests.test_firmware_cortexm import (
    QEMU_TARGETS,
    require_cortex_m_toolchain,
    small_float_io_tflite,
    small_tflite,
)

SAMPLES = 12
QEMU_CLI = f"{sys.executable} -m hil.boards.qemu"


@dataclass(frozen=True)
class Firmware:
    """One library built with both harnesses, and the reference outputs."""

    target: str
    library_dir: Path
    arena_bytes: int
    serial_elf: Path
    semihosting_elf: Path
    inputs: np.ndarray
    semihosting: QemuRun
    host: np.ndarray


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Firmware]:
    """The small int8 MLP for both QEMU targets and its float-I/O twin for mps2-an385, each
    built with the serial and the semihosting harness and run on seeded inputs."""
    require_cortex_m_toolchain()
    root = tmp_path_factory.mktemp("mcu-boards")
    built: dict[str, Firmware] = {}
    for key, tflite, target in (
        ("mps2-an385", small_tflite(), "mps2-an385"),
        ("mps2-an386", small_tflite(), "mps2-an386"),
        ("float", small_float_io_tflite(), "mps2-an385"),
    ):
        library_dir = root / f"lib-{key}"
        library = generate(tflite, library_dir, target=target)
        if library.float_input:
            scale, zero_point = library.input_quantization
            inputs = random_float_inputs(library.input_size, SAMPLES, scale, zero_point, seed=7)
        else:
            inputs = random_inputs(library.input_size, SAMPLES, seed=4)
        semihosting_elf = build_firmware(library_dir, root / f"semihosting-{key}", target)
        host_program = build_host(library_dir, root / f"host-{key}")
        built[key] = Firmware(
            target=target,
            library_dir=library_dir,
            arena_bytes=library.arena_bytes,
            serial_elf=build_firmware(library_dir, root / f"serial-{key}", target, "serial"),
            semihosting_elf=semihosting_elf,
            inputs=inputs,
            semihosting=run_qemu(
                semihosting_elf,
                inputs,
                library.output_size,
                target,
                float_output=library.float_output,
            ),
            host=run_host(
                host_program, inputs, library.output_size, float_output=library.float_output
            ),
        )
    return built


@pytest.fixture(scope="module")
def boards(
    firmware: dict[str, Firmware], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, QemuBoard]]:
    """A QemuBoard per target running the int8 firmware, for the module."""
    running: dict[str, QemuBoard] = {}
    try:
        for target in QEMU_TARGETS:
            board = QemuBoard(f"m-{target}", tmp_path_factory.mktemp(f"board-{target}"), target)
            running[target] = board
            board.deploy(firmware[target].serial_elf)
        yield running
    finally:
        for board in running.values():
            board.close()


@pytest.fixture
def m3(boards: dict[str, QemuBoard]) -> QemuBoard:
    return boards["mps2-an385"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target", QEMU_TARGETS)
def test_outputs_over_the_uart_equal_the_semihosting_run_and_the_host_build(
    boards: dict[str, QemuBoard], firmware: dict[str, Firmware], target: str
) -> None:
    board = boards[target]
    built = firmware[target]
    outputs = []
    cycles = []
    for sample in built.inputs:
        answer = board.infer(sample)
        assert answer.values.dtype == np.int8 and answer.values.shape == (4,)
        assert answer.cycles is not None and answer.latency_s > 0
        outputs.append(answer.values)
        cycles.append(answer.cycles)
    received = np.stack(outputs)
    assert received.tobytes() == built.semihosting.outputs.tobytes()
    assert received.tobytes() == built.host.tobytes()
    assert len({row.tobytes() for row in received}) > SAMPLES // 2  # the inputs matter
    # the same invoke, measured by the same timer: equal to within a tick per sample
    mean = float(np.mean(cycles))
    assert abs(mean - built.semihosting.instructions_per_inference) <= 2 * 40, cycles
    assert all(count % 40 == 0 for count in cycles)


@pytest.mark.parametrize("target", QEMU_TARGETS)
def test_info_frame_and_metrics_describe_the_running_image(
    boards: dict[str, QemuBoard], firmware: dict[str, Firmware], target: str
) -> None:
    board = boards[target]
    built = firmware[target]
    metrics = board.read_metrics()
    assert metrics["harness"] == "edgeops-serial"
    assert metrics["target"] == board.target
    assert metrics["build_id"] == build_id(built.library_dir, board.target)
    assert metrics["input_size"] == metrics["input_bytes"] == 16
    assert metrics["output_size"] == metrics["output_bytes"] == 4
    assert metrics["arena_bytes"] == built.arena_bytes > 0
    assert metrics["float_input"] == metrics["float_output"] == 0
    assert metrics["image_sha256"] == _sha256(built.serial_elf) == _sha256(board.image)
    assert isinstance(metrics["pid"], int) and metrics["tty"] == str(board.tty)
    assert board.tty.is_symlink() and str(board.tty.readlink()).startswith("/dev/pts/")
    before = metrics["requests"]
    assert isinstance(before, int)
    board.infer(built.inputs[0])
    after = board.read_metrics()
    assert after["requests"] == before + 2  # the inference and this info request
    assert after["last_cycles"] is not None and after["last_cycles"] == board.link.last_cycles


def test_wrong_input_and_broken_frames_get_error_frames(
    m3: QemuBoard, firmware: dict[str, Firmware]
) -> None:
    board = m3
    built = firmware[board.target]
    errors_before = board.read_metrics()["errors"]
    with pytest.raises(BoardError) as wrong:
        board.infer(np.zeros(15, dtype=np.int8))
    message = str(wrong.value)
    assert message.startswith(f"board {board.name}: the board reported an error")
    assert "holds 15 bytes, the model takes 16 (16 int8 values)" in message
    with pytest.raises(BoardError, match="takes int8 input tensors, got float64"):
        board.send_input(np.zeros(16))
    port = board.link.port()
    corrupt = bytearray(encode_frame(FrameKind.REQUEST, 77, built.inputs[0].tobytes()))
    corrupt[-1] ^= 0x01
    port.write(b"line noise \x00\xff E" + bytes(corrupt))
    answer = read_frame(port, 10.0)
    assert (answer.kind, answer.seq) == (FrameKind.ERROR, 77)
    assert answer.payload == b"frame fails its CRC check"
    port.write(encode_frame(FrameKind.RESULT, 78, b""))
    answer = read_frame(port, 10.0)
    assert answer.kind is FrameKind.ERROR and b"not a request" in answer.payload
    # after the noise the board still answers, and counted the three errors
    np.testing.assert_array_equal(board.infer(built.inputs[1]).values, built.host[1])
    assert board.read_metrics()["errors"] == int(errors_before or 0) + 3


def test_power_cut_and_reset_then_inference_works(
    m3: QemuBoard, firmware: dict[str, Firmware]
) -> None:
    board = m3
    built = firmware[board.target]
    before = board.read_metrics()
    board.power_cut(0.2)
    after = board.read_metrics()
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    assert after["requests"] == 2  # a fresh boot: the readiness info request and this one
    assert after["image_sha256"] == before["image_sha256"]
    assert board.tty.is_symlink() and str(board.tty.readlink()).startswith("/dev/pts/")
    np.testing.assert_array_equal(board.infer(built.inputs[2]).values, built.host[2])
    board.reset()
    assert board.read_metrics()["restarts"] == before["restarts"] + 2
    np.testing.assert_array_equal(board.infer(built.inputs[3]).values, built.host[3])


def test_deploy_of_another_image_changes_what_runs(
    m3: QemuBoard, firmware: dict[str, Firmware]
) -> None:
    """The float-I/O build on the same board: another image hash and build id, float32 in
    and out, bit for bit as the semihosting build; then the int8 image again."""
    board = m3
    int8, floats = firmware["mps2-an385"], firmware["float"]
    before = board.read_metrics()
    board.deploy(floats.serial_elf)
    metrics = board.read_metrics()
    assert metrics["image_sha256"] == _sha256(floats.serial_elf) != before["image_sha256"]
    assert metrics["build_id"] != before["build_id"]
    assert metrics["float_input"] == metrics["float_output"] == 1
    assert metrics["input_bytes"] == 64 and metrics["output_bytes"] == 16
    outputs = np.stack([board.infer(sample).values for sample in floats.inputs[:4]])
    assert outputs.dtype == np.float32
    assert outputs.tobytes() == floats.semihosting.outputs[:4].tobytes()
    with pytest.raises(BoardError, match="takes float32 input tensors, got int8"):
        board.send_input(int8.inputs[0])
    board.deploy(int8.serial_elf)
    assert board.read_metrics()["image_sha256"] == before["image_sha256"]


def test_an_image_that_ends_is_a_board_error_with_its_console(
    firmware: dict[str, Firmware], tmp_path: Path
) -> None:
    """The semihosting build exits at once on a board (no input file): the flash fails
    with what QEMU printed, leaves nothing running, and its file operations stay in the
    state directory."""
    state = tmp_path / "board"
    with pytest.raises(BoardError) as ended:
        flash_qemu(state, firmware["mps2-an385"].semihosting_elf, "mps2-an385")
    message = str(ended.value)
    assert message.startswith(f"board {state}: QEMU exited before the firmware answered")
    assert "cannot open edgeops_inputs.bin" in message and "\n" not in message
    assert not (state / "qemu.pid").exists() and not (state / "tty").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board"]


def _qemu_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hil.boards.qemu", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_flash_command_line_leaves_the_board_running_detached(
    firmware: dict[str, Firmware], tmp_path: Path
) -> None:
    import json

    helped = _qemu_cli("--help")
    assert helped.returncode == 0
    assert "flash" in helped.stdout and "stop" in helped.stdout and "tty" in helped.stdout
    assert _qemu_cli("flash", "--help").returncode == 0
    bad = _qemu_cli("flash", "--dir", str(tmp_path / "b"), "--target", "stm32", "x.elf")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert _qemu_cli("explode").returncode == 2
    not_elf = tmp_path / "firmware.bin"
    not_elf.write_bytes(b"\0" * 64)
    assert_one_line_error(
        _qemu_cli("flash", "--dir", str(tmp_path / "b"), str(not_elf)),
        "is not a 32-bit Arm ELF image",
    )
    assert_one_line_error(_qemu_cli("reset", "--dir", str(tmp_path / "b")), "has no image")

    state = tmp_path / "b"
    try:
        flashed = _qemu_cli("flash", "--dir", str(state), str(firmware["mps2-an385"].serial_elf))
        assert flashed.returncode == 0, flashed.stderr
        info = json.loads(flashed.stdout)
        assert info["tty"] == str(state / "tty") and info["target"] == "mps2-an385"
        pid = int((state / "qemu.pid").read_text())
        assert Path(f"/proc/{pid}").exists()  # outlived the command that started it
        assert (state / "console.log").read_text().count("char device redirected") == 1
        # a program that knows nothing of the rig talks to it through the tty
        import serial

        with serial.Serial(str(state / "tty"), 115200, timeout=0) as port:
            assert request_info(port, 10.0)["build_id"] == info["build_id"]
        # a second flash keeps the tty's path and replaces the process
        again = _qemu_cli("flash", "--dir", str(state), str(firmware["float"].serial_elf))
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["float_input"] is True
        assert int((state / "qemu.pid").read_text()) != pid
        assert (
            not Path(f"/proc/{pid}/cmdline").exists()
            or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        shown = _qemu_cli("info", "--dir", str(state))
        assert shown.returncode == 0 and json.loads(shown.stdout)["float_output"] is True
    finally:
        stopped = _qemu_cli("stop", "--dir", str(state))
    assert stopped.returncode == 0
    assert not (state / "qemu.pid").exists() and not (state / "tty").exists()
    assert (state / "image.elf").read_bytes() == firmware["float"].serial_elf.read_bytes()
    assert_one_line_error(_qemu_cli("info", "--dir", str(state)), "is not running")


def test_serial_board_over_a_qemu_boards_tty(firmware: dict[str, Firmware], tmp_path: Path) -> None:
    """A SerialBoard whose port is a QEMU board's tty and whose commands are the QEMU
    command line: the path a real board with openocd or esptool takes."""
    state = tmp_path / "qemu"
    built = firmware["mps2-an386"]
    board = SerialBoard(
        "nucleo",
        str(state / "tty"),
        flash_command=f"{QEMU_CLI} flash --dir {state} --target mps2-an386 {{image}}",
        reset_command=f"{QEMU_CLI} reset --dir {state}",
        power_command=f"{QEMU_CLI} power-cycle --dir {state} --off {{off_s}}",
        ready_timeout_s=15.0,
    )
    try:
        with board:
            board.deploy(built.serial_elf)
            for index in (0, 5):
                answer = board.infer(built.inputs[index])
                np.testing.assert_array_equal(answer.values, built.host[index])
            metrics = board.read_metrics()
            assert metrics["build_id"] == build_id(built.library_dir, "mps2-an386")
            assert metrics["port"] == str(state / "tty") and metrics["restarts"] == 1
            board.power_cut(0.1)
            # booted afresh: the info requests of the power command, of the board and this one
            assert board.read_metrics()["requests"] == 3
            board.reset()
            np.testing.assert_array_equal(board.infer(built.inputs[6]).values, built.host[6])
            assert board.read_metrics()["restarts"] == 3
        # the board's port is closed now (it is opened exclusively): another may open it
        bare = SerialBoard("bare", str(state / "tty"), flash_command="true {image}")
        with pytest.raises(BoardError, match="bare has no power_command"):
            bare.power_cut()
        with pytest.raises(BoardError, match=r"cannot drive DTR/RTS.*reset_command"):
            bare.reset()
        bare.close()
    finally:
        stop_qemu(state)


def test_a_failing_flash_command_names_itself_and_what_it_said(tmp_path: Path) -> None:
    image = tmp_path / "firmware.elf"
    image.write_bytes(b"\x7fELF")
    script = "import sys; print('Error: no ST-LINK detected', file=sys.stderr); sys.exit(3)"
    board = SerialBoard(
        "stm32", "/dev/null", flash_command=f'{sys.executable} -c "{script}" {{image}}'
    )
    with pytest.raises(BoardError) as failed:
        board.deploy(image)
    message = str(failed.value)
    assert "\n" not in message and message.startswith("board stm32: the flash command")
    assert "exited with status 3" in message and "no ST-LINK detected" in message
    assert str(image) in message
    with pytest.raises(BoardError, match="not a valid template"):
        SerialBoard("x", "/dev/null", flash_command="flash {firmware}").deploy(image)
    with pytest.raises(BoardError, match="cannot run the flash command"):
        SerialBoard("x", "/dev/null", flash_command="/nonexistent/flasher {image}").deploy(image)
    with pytest.raises(BoardError, match="does not exist"):
        board.deploy(tmp_path / "missing.elf")


def test_a_board_that_never_answers_is_a_board_error(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        image = tmp_path / "firmware.elf"
        image.write_bytes(b"\x7fELF")
        board = SerialBoard(
            "mute", os.ttyname(slave), flash_command="true {image}", ready_timeout_s=1.0
        )
        with pytest.raises(BoardError) as silent:
            board.deploy(image)
        message = str(silent.value)
        assert message.startswith("board mute: did not answer an info request")
        assert "within 1 s" in message and "\n" not in message
        board.close()
    finally:
        os.close(master)
        os.close(slave)


class _NoisyBoard:
    """A board on a pty that prints boot text and a stale frame before each answer."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        port = os.fdopen(self.master, "r+b", buffering=0, closefd=False)
        while not self._stop.is_set():
            if not select.select([port], [], [], 0.05)[0]:
                continue
            try:
                frame = read_frame(port, 2.0)
            except (SerialFrameError, OSError):
                return
            noise = b"\r\nboot: ROM v1.2\r\nE\x00\xffgarbage" + encode_frame(
                FrameKind.RESULT, (frame.seq - 1) & 0xFFFF, b"\0" * 8
            )
            if not frame.payload:
                body = b'{"input_bytes": 3, "output_bytes": 2, "float_input": false}'
                answer = encode_frame(FrameKind.INFO, frame.seq, body)
            else:
                doubled = bytes((2 * b) & 0xFF for b in frame.payload[:2])
                answer = encode_frame(
                    FrameKind.RESULT, frame.seq, (7).to_bytes(4, "little") + doubled
                )
            port.write(noise + answer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.master)
        os.close(self.slave)


def test_garbage_before_frames_is_skipped(tmp_path: Path) -> None:
    fake = _NoisyBoard()
    image = tmp_path / "firmware.elf"
    image.write_bytes(b"\x7fELF")
    try:
        with SerialBoard("noisy", fake.path, flash_command="true {image}") as board:
            board.deploy(image)
            answer = board.infer(np.array([3, -4, 5], dtype=np.int8))
            assert answer.values.tolist() == [6, -8] and answer.cycles == 7
            assert board.read_metrics()["input_bytes"] == 3
    finally:
        fake.close()


def test_serial_runtime_talks_to_the_firmware_through_the_tty(
    int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The device agent's SerialRuntime on the digits model's firmware, through the QEMU
    board's tty opened with open_port, agrees with LiteRT on the host."""
    from device_agent.runtime import ModelBundle, open_runtime
    from device_agent.runtime._serial import SerialRuntime, open_port

    require_cortex_m_toolchain()
    library_dir = tmp_path / "lib"
    generate((int8_model_dir / "model.tflite").read_bytes(), library_dir, target="mps2-an385")
    elf = build_firmware(library_dir, tmp_path / "build", "mps2-an385", harness="serial")
    state = tmp_path / "board"
    flash_qemu(state, elf, "mps2-an385")
    bundle = ModelBundle.load(int8_model_dir)
    port = open_port(str(state / "tty"))
    try:
        remote = SerialRuntime(bundle, port, timeout_s=10.0)
        with open_runtime(bundle) as local:
            for sample in digits_samples[0][:16]:
                got = remote.infer(sample).probabilities
                want = local.infer(sample).probabilities
                assert int(np.argmax(got)) == int(np.argmax(want))
                np.testing.assert_allclose(got, want, atol=2.5 / 256)
                assert remote.last_cycles is not None and remote.last_cycles > 0
        remote.close()
    finally:
        port.close()
        stop_qemu(state)
