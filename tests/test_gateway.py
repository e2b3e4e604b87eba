"""The agent as the gateway of a microcontroller board: ``[mcu]``, firmware bundles, flashing
only when the image changes, conformance on the board as the smoke test, and the previous
image restored on the board when it fails.

The unit tests use a fake board on a pseudo-terminal: a thread that reads request frames
(``device_agent/runtime/_serial.py``) and answers with the outputs LiteRT computes on the
int8 .tflite the last flashed "image" holds, and a flash command (a small Python script run
as a real subprocess) that records each image it was given and "flashes" it into the fake
board. An image is ``b"\\x7fELF"`` + one mode byte + the .tflite: mode ``B`` makes the board
add a large offset to output 0 (a wrong weight, as conformance sees it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import select
import subprocess
import sys
import tarfile
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.card import Firmware, ModelCard
from device_agent.config import AgentSettings, McuSettings
from device_agent.errors import ConfigError
from device_agent.gateway import (
    BoardError,
    FirmwareArchiveError,
    Gateway,
    extract_image,
)
from device_agent.runtime import InferenceError, ModelBundle, SerialFrameError
from device_agent.runtime._serial import FrameKind, encode_frame, read_frame
from device_agent.updater.errors import ContractError
from device_agent.updater.machine import UpdateState
from device_agent.updater.slots import Slots
from device_agent.updater.updater import SmokeTestError, Updater, smoke_test
from tests.clitools import BIN, assert_one_line_error, run_cli
from tests.test_updater import Host, LocalRepository, contract

FIRMWARE_TARGET = "digits-mlp/2/mcu/firmware-mps2-an385.tar"
OLD_TARGET = "digits-mlp/1/mcu/firmware-mps2-an385.tar"
CYCLES = 4321

FLASH_SCRIPT = """\
import hashlib, os, shutil, sys
image, board = sys.argv[1], sys.argv[2]
data = open(image, "rb").read()
with open(os.path.join(board, "flashes.log"), "a") as log:
    log.write(hashlib.sha256(data).hexdigest() + "\\n")
if os.path.exists(os.path.join(board, "fail")):
    print("Error: target not examined yet", file=sys.stderr)
    sys.exit(3)
if os.path.exists(os.path.join(board, "fail-once")):
    os.remove(os.path.join(board, "fail-once"))
    print("Error: unable to open the debug probe", file=sys.stderr)
    sys.exit(1)
shutil.copyfile(image, os.path.join(board, "current.tmp"))
os.replace(os.path.join(board, "current.tmp"), os.path.join(board, "current.elf"))
"""


# -- the fake board ---------------------------------------------------------------------------


class FakeBoard:
    """A board on a pseudo-terminal that runs what the flash script last put in ``dir``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.script = directory / "flash.py"
        self.script.write_text(FLASH_SCRIPT)
        master, slave = os.openpty()
        tty.setraw(slave)
        self.master, self.slave = master, slave
        self.tty = directory / "tty"
        self.tty.symlink_to(os.ttyname(slave))
        self.requests = 0
        self._models: dict[bytes, Any] = {}
        self._stop = threading.Event()
        self._port = os.fdopen(master, "r+b", buffering=0)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def flash_command(self) -> str:
        return f"{sys.executable} {self.script} {{image}} {self.dir}"

    def settings(self, **changes: Any) -> McuSettings:
        return McuSettings(
            port=str(self.tty), flash_command=self.flash_command, timeout_s=5.0, **changes
        )

    def flashes(self) -> list[str]:
        log = self.dir / "flashes.log"
        return log.read_text().split() if log.exists() else []

    def current(self) -> str | None:
        image = self.dir / "current.elf"
        return hashlib.sha256(image.read_bytes()).hexdigest() if image.exists() else None

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                frame = read_frame(self._port, 2.0)
            except (SerialFrameError, OSError):
                continue
            if frame.kind is not FrameKind.REQUEST:
                continue
            self.requests += 1
            self._port.write(self._answer(frame.seq, frame.payload))

    def _answer(self, seq: int, payload: bytes) -> bytes:
        image = self.dir / "current.elf"
        if not image.exists():
            return encode_frame(FrameKind.ERROR, seq, b"no image")
        data = image.read_bytes()
        mode, tflite = data[4:5], data[5:]
        interpreter = self._models.get(tflite)
        if interpreter is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_content=tflite)
            interpreter.allocate_tensors()
            self._models[tflite] = interpreter
        source = interpreter.get_input_details()[0]
        target = interpreter.get_output_details()[0]
        tensor = np.frombuffer(payload, dtype=source["dtype"]).reshape(source["shape"])
        interpreter.set_tensor(source["index"], tensor)
        interpreter.invoke()
        out = interpreter.get_tensor(target["index"]).astype(np.int16)
        if mode == b"B":
            out[0, 0] += 60
        out = np.clip(out, -128, 127).astype(target["dtype"])
        return encode_frame(FrameKind.RESULT, seq, CYCLES.to_bytes(4, "little") + out.tobytes())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._port.close()
        os.close(self.slave)


@pytest.fixture
def board(tmp_path: Path) -> Iterator[FakeBoard]:
    fake = FakeBoard(tmp_path / "board")
    yield fake
    fake.close()


# -- firmware bundles -------------------------------------------------------------------------


def firmware_card(int8_model_dir: Path, version: int = 2) -> ModelCard:
    card = ModelCard.from_json((int8_model_dir / "card.json").read_text())
    return dataclasses.replace(
        card,
        runtime="firmware",
        version=str(version),
        firmware=Firmware(target="mps2-an385", arena_bytes=card.arena_bytes or 1024),
    )


def archive(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def firmware_bundle(directory: Path, int8_model_dir: Path, mode: bytes, version: int) -> Path:
    """A slot-like bundle: card.json (runtime firmware) + firmware.tar holding the image."""
    directory.mkdir(parents=True)
    image = b"\x7fELF" + mode + (int8_model_dir / "model.tflite").read_bytes()
    (directory / "firmware.tar").write_bytes(
        archive({"digits-mlp-2-mps2-an385/firmware.elf": image, "x/edgeops_model.c": b"int x;"})
    )
    (directory / "card.json").write_text(firmware_card(int8_model_dir, version).to_json())
    return directory


@pytest.fixture
def good(tmp_path: Path, int8_model_dir: Path) -> Path:
    return firmware_bundle(tmp_path / "good", int8_model_dir, b"G", 2)


@pytest.fixture
def bad(tmp_path: Path, int8_model_dir: Path) -> Path:
    return firmware_bundle(tmp_path / "bad", int8_model_dir, b"B", 3)


def image_sha(bundle_dir: Path) -> str:
    with tarfile.open(bundle_dir / "firmware.tar") as tar:
        member = tar.extractfile("digits-mlp-2-mps2-an385/firmware.elf")
        assert member is not None
        return hashlib.sha256(member.read()).hexdigest()


# -- configuration ----------------------------------------------------------------------------


def test_mcu_table_is_checked_with_one_line_errors(tmp_path: Path) -> None:
    ok = AgentSettings(
        device_id="gw-1",
        mcu={"port": "/dev/ttyACM0", "flash_command": "openocd -c 'program {image} reset exit'"},
    )
    assert ok.mcu is not None and ok.mcu.baud == 115200 and ok.mcu.flash_timeout_s == 120
    assert ok.mcu.flash_argv(Path("/x/fw.elf")) == ["openocd", "-c", "program /x/fw.elf reset exit"]
    cases = {
        'mcu = {port = "/dev/ttyACM0", flash_command = "st-flash write 0x8000000"}': (
            "flash_command must hold {image}"
        ),
        'mcu = {port = "/dev/ttyACM0", flash_command = "flash {image} {speed}"}': (
            "unknown placeholder(s) {speed}"
        ),
        'mcu = {port = "/dev/ttyACM0", flash_command = "flash {image}", parity = "E"}': (
            "unknown setting 'mcu.parity'"
        ),
        'mcu = {port = "/dev/ttyACM0", flash_command = "flash {image}", baud = 0}': ("mcu.baud"),
        'mcu = {port = "/dev/ttyACM0", flash_command = "flash \'{image}"}': (
            "not a valid command line"
        ),
    }
    for index, (line, needle) in enumerate(cases.items()):
        config = tmp_path / f"agent{index}.toml"
        config.write_text(f'device_id = "gw-1"\n{line}\n')
        with pytest.raises(ConfigError, match=None) as caught:
            AgentSettings.load(config)
        message = str(caught.value)
        assert "\n" not in message and needle in message, message
    # the program says it in one line and exits non-zero
    result = run_cli("edgeops-agent", "run", "--config", str(tmp_path / "agent0.toml"))
    assert_one_line_error(result, "flash_command must hold {image}")


def test_agent_with_a_board_reports_and_takes_the_firmware_runtime(
    tmp_path: Path, board: FakeBoard, int8_model_dir: Path
) -> None:
    from device_agent.daemon import AgentDaemon

    custom = {
        "edgeops": {
            "card": firmware_card(int8_model_dir).to_json(),
            "hardware": {},
            "min_free_memory_bytes": None,
            "runtime": "mcu",
        }
    }
    plain = AgentDaemon(AgentSettings(device_id="gw-0", data_dir=tmp_path / "d0"))
    assert "firmware" not in plain._runtimes and plain.gateway is None
    with pytest.raises(ContractError, match="needs the firmware runtime"):
        plain.updates._check_contract(custom)
    gateway = AgentDaemon(
        AgentSettings(device_id="gw-1", data_dir=tmp_path / "d1", mcu=board.settings())
    )
    assert "firmware" in gateway._runtimes and gateway.gateway is not None
    assert gateway.updates._check_contract(custom).runtime == "firmware"
    assert gateway._board_report() == {"board": {"port": str(board.tty), "image_sha256": None}}
    # a board of a known target refuses firmware for another one before any download
    m4 = AgentDaemon(
        AgentSettings(
            device_id="gw-2", data_dir=tmp_path / "d2", mcu=board.settings(target="mps2-an386")
        )
    )
    with pytest.raises(
        ContractError, match=r"firmware for mps2-an385; the board on .* is a mps2-an386"
    ):
        m4.updates._check_contract(custom)
    m3 = AgentDaemon(
        AgentSettings(
            device_id="gw-3", data_dir=tmp_path / "d3", mcu=board.settings(target="mps2-an385")
        )
    )
    assert m3.updates._check_contract(custom).firmware is not None


# -- the archive ------------------------------------------------------------------------------


def test_firmware_archive_is_taken_apart_safely(tmp_path: Path) -> None:
    elf = b"\x7fELF" + b"\0" * 60
    cases: dict[str, tuple[bytes, str]] = {
        "traversal": (
            archive({"fw/firmware.elf": elf, "../../etc/cron.d/x": b"boom"}),
            "points outside the archive",
        ),
        "absolute": (archive({"/fw/firmware.elf": elf}), "points outside the archive"),
        "two": (archive({"a/firmware.elf": elf, "b/firmware.elf": elf}), "holds 2 firmware.elf"),
        "none": (archive({"a/firmware.bin": elf}), "holds 0 firmware.elf"),
        "deep": (archive({"a/b/firmware.elf": elf}), "is not <dir>/firmware.elf"),
        "link": (archive({}, links={"a/firmware.elf": "/etc/shadow"}), "not a regular file"),
        "not elf": (archive({"a/firmware.elf": b"MZ" + b"\0" * 60}), "is not an ELF image"),
        "empty": (archive({"a/firmware.elf": b""}), "is empty"),
        "garbage": (b"this is not a tar archive at all" * 40, "not a readable tar archive"),
    }
    images = tmp_path / "images"
    for name, (data, needle) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.tar"
        path.write_bytes(data)
        with pytest.raises(FirmwareArchiveError, match=None) as caught:
            extract_image(path, images)
        assert needle in str(caught.value) and "\n" not in str(caught.value), (name, caught.value)
    big = tmp_path / "big.tar"
    big.write_bytes(archive({"a/firmware.elf": elf}))
    with pytest.raises(FirmwareArchiveError, match="64 bytes, more than the limit of 32"):
        extract_image(big, images, max_bytes=32)
    assert not images.exists() or not any(images.iterdir())  # nothing taken out of bad ones
    assert not (tmp_path.parent / "etc").exists()
    image, digest = extract_image(big, images)
    assert image.read_bytes() == elf and digest == hashlib.sha256(elf).hexdigest()


# -- the board --------------------------------------------------------------------------------


def test_board_is_flashed_only_when_the_image_changes(
    tmp_path: Path, board: FakeBoard, good: Path, bad: Path, digits_samples: Any
) -> None:
    state = tmp_path / "state"
    gateway = Gateway(board.settings(), state)
    bundle = ModelBundle.load(good)
    assert bundle.format == "firmware"
    with gateway.open(bundle) as runtime:
        assert board.flashes() == [image_sha(good)] and board.current() == image_sha(good)
        x, _ = digits_samples
        prediction = runtime.infer(x[0])
        assert prediction.probabilities.shape == (10,) and runtime.name == "serial"
    from device_agent.runtime import open_runtime

    expected = open_runtime(ModelBundle.load(_tflite_bundle(tmp_path, good))).infer(x[0])
    np.testing.assert_array_equal(prediction.probabilities, expected.probabilities)
    recorded = json.loads((state / "mcu" / "board.json").read_text())
    assert recorded["sha256"] == image_sha(good) and not recorded.get("flashing")

    # the same image again, in this process and after a restart: no flash
    gateway.open(bundle).close()
    gateway.close()  # one gateway per board: the port is opened exclusively
    restarted = Gateway(board.settings(), state)
    with restarted.open(bundle) as runtime:
        runtime.infer(x[1])
    assert board.flashes() == [image_sha(good)]

    # another image: flashed; the first one's runtime now refuses at once
    champion = restarted.open(bundle)
    challenger = restarted.open(ModelBundle.load(bad))
    assert board.flashes() == [image_sha(good), image_sha(bad)]
    with pytest.raises(InferenceError, match="runs another image"):
        champion.infer(x[2])
    challenger.infer(x[2])
    assert restarted.describe()["image_sha256"] == image_sha(bad)
    restarted.close()

    # a power cut during a flash leaves the image unknown: the next open flashes again
    (state / "mcu" / "board.json").write_text(
        json.dumps({"sha256": None, "flashing": image_sha(good)})
    )
    after_cut = Gateway(board.settings(), state)
    after_cut.open(ModelBundle.load(bad)).close()
    after_cut.close()
    assert board.flashes()[-1] == image_sha(bad) and len(board.flashes()) == 3

    # a flash command that fails: one clear error, and the image stays unknown
    (board.dir / "fail").touch()
    failing = Gateway(board.settings(), state)
    with pytest.raises(BoardError, match="flash command exited with 3: Error: target not"):
        failing.open(bundle)
    assert failing.running_image is None
    assert json.loads((state / "mcu" / "board.json").read_text())["flashing"] == image_sha(good)


def _tflite_bundle(tmp_path: Path, firmware_dir: Path) -> Path:
    """The model a fake image holds, as an ordinary int8 bundle (the reference)."""
    directory = tmp_path / "reference"
    if not directory.exists():
        directory.mkdir()
        card = ModelCard.from_json((firmware_dir / "card.json").read_text())
        card = dataclasses.replace(card, runtime="litert", firmware=None)
        (directory / "card.json").write_text(card.to_json())
        with tarfile.open(firmware_dir / "firmware.tar") as tar:
            member = tar.extractfile("digits-mlp-2-mps2-an385/firmware.elf")
            assert member is not None
            (directory / "model.tflite").write_bytes(member.read()[5:])
    return directory


def test_conformance_on_the_board_is_the_smoke_test(
    tmp_path: Path, board: FakeBoard, good: Path, bad: Path
) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    gateway = Gateway(board.settings(), tmp_path / "state", event=lambda *e: events.append(e))
    smoke_test(good, gateway)
    name, passed = events[-1]
    vectors = len(ModelBundle.load(good).card.test_vectors)
    assert name == "conformance" and passed["passed"] is True and passed["failed"] == []
    assert passed["vectors"] == vectors > 0 and passed["mean_cycles"] == CYCLES
    assert passed["target"] == "mps2-an385" and passed["board"] == str(board.tty)
    assert 0 < passed["latency_ms_mean"] <= passed["latency_ms_max"]
    assert passed["max_error"] is not None and passed["max_error"] <= passed["tolerance"]

    with pytest.raises(SmokeTestError, match=f"conformance on {board.tty}: test vector 0"):
        smoke_test(bad, gateway)
    name, failed = events[-1]
    assert name == "conformance" and failed["passed"] is False
    assert failed["failed"] == list(range(vectors)) and failed["vectors"] == vectors
    assert failed["max_error"] > failed["tolerance"]
    assert failed["reason"].startswith(f"conformance on {board.tty}: test vector 0: output")


# -- the updater with a board -----------------------------------------------------------------


class BoardHost(Host):
    """The daemon's side with the board as the champion of firmware bundles."""

    gateway: Gateway

    def load(self, bundle_dir: Path | None) -> None:
        if self.champion is not None:
            self.champion.close()
        self.champion = (
            None if bundle_dir is None else self.gateway.open(ModelBundle.load(bundle_dir))
        )
        self.runtime_errors = 0


def board_updater(
    tmp_path: Path, board: FakeBoard, old: Path, new: Path
) -> tuple[Updater, BoardHost, Gateway, list[dict[str, Any]], Path]:
    state = tmp_path / "state"
    slots = Slots(state / "slots")
    assert slots.seed(old)
    repo = LocalRepository(tmp_path / "repo", state / "downloads")
    repo.add(FIRMWARE_TARGET, new)
    repo.customs[FIRMWARE_TARGET]["edgeops"]["runtime"] = "mcu"
    events: list[dict[str, Any]] = []
    gateway = Gateway(
        board.settings(), state, event=lambda name, detail: events.append({name: detail})
    )
    BoardHost.gateway = gateway
    host = BoardHost(slots)  # the champion: the old image, flashed at this "boot"
    updater = Updater(
        state,
        trust=lambda: repo,
        contract=contract,
        host=host,
        health_s=0.0,
        retry_delay_s=0.0,
        health_poll_s=0.01,
        runtimes=gateway,
    )
    return updater, host, gateway, events, state


def test_a_firmware_release_that_passes_conformance_is_committed(
    tmp_path: Path, board: FakeBoard, good: Path, int8_model_dir: Path
) -> None:
    old = firmware_bundle(tmp_path / "old", int8_model_dir, b"O", 1)
    updater, host, _gateway, events, state = board_updater(tmp_path, board, old, good)
    assert board.flashes() == [image_sha(old)]
    assert updater.update(FIRMWARE_TARGET) == UpdateState.COMMITTED
    assert board.current() == image_sha(good) and board.flashes()[-1] == image_sha(good)
    assert len(board.flashes()) == 2  # the activation found the image on the board already
    assert (Slots(state / "slots").active_dir() or Path()).joinpath("firmware.tar").is_file()
    assert [e["conformance"]["passed"] for e in events] == [True]
    assert host.champion is not None and host.champion.model_id == ModelBundle.load(good).model_id


def test_a_flash_that_fails_once_is_retried_and_one_that_keeps_failing_rolls_back(
    tmp_path: Path, board: FakeBoard, good: Path, int8_model_dir: Path
) -> None:
    old = firmware_bundle(tmp_path / "old", int8_model_dir, b"O", 1)
    updater, host, gateway, events, _state = board_updater(tmp_path, board, old, good)
    (board.dir / "fail-once").touch()  # a debug probe busy for a moment
    assert updater.update(FIRMWARE_TARGET) == UpdateState.COMMITTED
    assert board.flashes() == [image_sha(old), image_sha(good), image_sha(good)]
    retries = [t for t in host.transitions if str(t.event) == "retry"]
    assert len(retries) == 1 and "unable to open the debug probe" in (retries[0].reason or "")
    assert board.current() == image_sha(good) == gateway.running_image
    assert [e["conformance"]["passed"] for e in events] == [True]

    # a flash that keeps failing: given up after max_attempts, then rolled back
    updater, host, gateway, events, _state = board_updater(tmp_path / "again", board, old, good)
    (board.dir / "fail").touch()  # the old image went on at this boot; now the probe is gone
    flashes = len(board.flashes())
    assert updater.update(FIRMWARE_TARGET) == UpdateState.ROLLED_BACK
    reason = updater.record.reason or ""
    assert reason.startswith(f"gave up after {updater.max_attempts} attempts: "), reason
    assert "target not examined yet" in reason
    # every attempt flashed, then the rollback tried to flash the old image again
    assert len(board.flashes()) - flashes == updater.max_attempts + 1
    assert events == []  # no conformance test ran on an image that never went on


def test_a_firmware_release_that_fails_conformance_restores_the_previous_image(
    tmp_path: Path, board: FakeBoard, good: Path, bad: Path, digits_samples: Any
) -> None:
    updater, host, gateway, events, state = board_updater(tmp_path, board, good, bad)
    champion = host.champion
    assert champion is not None and board.current() == image_sha(good)
    assert updater.update(FIRMWARE_TARGET) == UpdateState.ROLLED_BACK
    reason = updater.record.reason or ""
    assert reason.startswith(f"smoke_test: conformance on {board.tty}: test vector 0: output")
    assert reason.endswith(f"; previous image restored on {board.tty}"), reason
    assert host.transitions[-1].reason == reason
    # the board was flashed with the new image, then with the old one again
    assert board.flashes() == [image_sha(good), image_sha(bad), image_sha(good)]
    assert board.current() == image_sha(good) == gateway.running_image
    assert events[-1]["conformance"]["passed"] is False
    # the champion in place answers again, as the old model
    x, _ = digits_samples
    assert champion.infer(x[0]).probabilities.shape == (10,)
    assert Slots(state / "slots").pointer().targets == {}  # type: ignore[union-attr]


def test_a_power_cut_between_flash_and_rollback_is_undone_at_boot(
    tmp_path: Path, board: FakeBoard, good: Path, bad: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from device_agent import failpoints

    updater, _, before, _, state = board_updater(tmp_path, board, good, bad)

    class PowerCut(BaseException):
        pass

    def cut(name: str) -> None:
        if name == "updater.enter:rolling_back":
            raise PowerCut(name)

    monkeypatch.setattr(failpoints, "check", cut)
    with pytest.raises(PowerCut):
        updater.update(FIRMWARE_TARGET)
    monkeypatch.undo()
    assert board.current() == image_sha(bad)  # the gateway died with the new image flashed
    assert updater.state == UpdateState.TESTING
    before.close()

    # the next start: the champion is opened first (the daemon's start), which flashes the
    # active slot's image back; then the resume map tests again and rolls back
    flashes = len(board.flashes())
    events: list[dict[str, Any]] = []
    gateway = Gateway(board.settings(), state, event=lambda name, d: events.append({name: d}))
    BoardHost.gateway = gateway
    host = BoardHost(Slots(state / "slots"))
    assert board.current() == image_sha(good) and len(board.flashes()) == flashes + 1
    restarted = Updater(
        state,
        trust=updater._trust_factory,
        contract=contract,
        host=host,
        health_s=0.0,
        retry_delay_s=0.0,
        runtimes=gateway,
    )
    assert restarted.boot(FIRMWARE_TARGET) is True
    assert restarted.resume() == UpdateState.ROLLED_BACK
    assert board.current() == image_sha(good)
    assert "previous image restored" in (restarted.record.reason or "")
    assert events[-1]["conformance"]["passed"] is False


def test_a_champion_whose_board_fails_at_start_is_tried_again(
    tmp_path: Path, board: FakeBoard, good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import device_agent.daemon as daemon_module
    from device_agent.daemon import AgentDaemon

    monkeypatch.setattr(daemon_module, "CHAMPION_RETRY_S", 0.0)
    settings = AgentSettings(device_id="gw-9", data_dir=tmp_path / "d", mcu=board.settings())
    daemon = AgentDaemon(settings)
    (board.dir / "fail").touch()  # the board's probe is unplugged at boot
    daemon._start_inference(good)
    assert daemon.champion is None and daemon._champion_retry is not None
    assert "flash command exited with 3" in (daemon._model_error or "")
    (board.dir / "fail").unlink()  # plugged in again
    daemon._retry_champion()
    try:
        assert daemon.champion is not None and daemon._model_error is None
        assert board.current() == image_sha(good)
    finally:
        if daemon.champion is not None:
            daemon.champion.close()
        if daemon.gateway is not None:
            daemon.gateway.close()


def test_agent_program_with_a_board_flashes_its_champion_at_start(
    tmp_path: Path, board: FakeBoard, good: Path, mosquitto_url: str, isolated_environment: Path
) -> None:
    """The real program: the champion of a firmware slot is the board (flashed at start,
    as the board's recorded image is not the active slot's), and samples go to it."""
    data_dir = isolated_environment  # EDGEOPS_DATA_DIR
    samples = tmp_path / "samples.csv"
    rng = np.random.default_rng(0)
    np.savetxt(samples, rng.uniform(0, 16, size=(5, 64)), delimiter=",", fmt="%.3f")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "gw-7"\nmqtt_url = "{mosquitto_url}"\n'
        f'model_dir = "{good}"\nheartbeat_s = 0.5\n'
        f'source = {{kind = "file", path = "{samples}"}}\n'
        f'mcu = {{port = "{board.tty}", flash_command = "{board.flash_command}"}}\n'
    )
    agent = subprocess.Popen(
        [str(BIN / "edgeops-agent"), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    health = data_dir / "agents" / "gw-7" / "health.json"
    doc: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and agent.poll() is None:
            if health.exists():
                doc = json.loads(health.read_text())
                if doc.get("source_exhausted"):
                    break
            time.sleep(0.1)
    finally:
        agent.terminate()
        _, stderr = agent.communicate(timeout=20)
    assert doc.get("source_exhausted") and doc["samples"] == 5, stderr[-3000:]
    assert doc["slots"]["champion"]["runtime"] == "serial"
    assert board.flashes() == [image_sha(good)] and board.requests == 5


# -- end to end: a real TUF repository, MQTT, the agent program and a QEMU board ---------------

E2E_MODEL = "digits-int8"
E2E_GOOD = f"{E2E_MODEL}/1/mcu/firmware-mps2-an385.tar"
E2E_BAD = f"{E2E_MODEL}/2/mcu/firmware-mps2-an385.tar"


def _alter_one_weight(tflite: bytes, card: ModelCard) -> bytes:
    """``tflite`` with ONE int8 weight of the output layer changed so that some test vector's
    output moves by several quantization steps under LiteRT (checked here)."""
    from ai_edge_litert.interpreter import Interpreter

    def outputs(model: bytes) -> np.ndarray:
        interpreter = Interpreter(model_content=model)
        interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        target = interpreter.get_output_details()[0]
        got = []
        for vector in card.test_vectors:
            fed = np.asarray(vector["input"], dtype=source["dtype"]).reshape(source["shape"])
            interpreter.set_tensor(source["index"], fed)
            interpreter.invoke()
            got.append(interpreter.get_tensor(target["index"]).astype(np.int32).reshape(-1))
        return np.stack(got)

    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    weights = [
        t for t in interpreter.get_tensor_details()
        if t["dtype"] == np.int8 and len(t["shape"]) == 2 and t["shape"][0] == 10
    ]  # fmt: skip
    assert weights, "the model has no int8 output layer weights"
    matrix = interpreter.get_tensor(weights[0]["index"])
    offset = tflite.find(matrix.tobytes())
    assert offset > 0 and tflite.find(matrix.tobytes(), offset + 1) == -1
    reference = outputs(tflite)
    for flat in np.argsort(-np.abs(matrix.astype(np.int32)).reshape(-1)):
        altered = bytearray(tflite)
        value = int(matrix.reshape(-1)[flat])
        altered[offset + int(flat)] = (-128 if value > 0 else 127) & 0xFF
        if np.abs(outputs(bytes(altered)) - reference).max() >= 8:
            return bytes(altered)
    raise AssertionError("no single weight changes a test vector's output by 8 steps")


@dataclasses.dataclass
class FirmwareRepository:
    template: Any  # tests.fixtures.trust.TrustTemplate
    images: dict[str, str]  # target path -> SHA-256 of its firmware.elf
    card: ModelCard


@pytest.fixture(scope="module")
def firmware_repository(
    tmp_path_factory: pytest.TempPathFactory, model_factory: Any, int8_model_dir: Path
) -> FirmwareRepository:
    """A TUF repository holding two firmware releases of the int8 digits MLP for mps2-an385:
    version 1 generated from the model, version 2 from the model with one weight altered
    (its card, test vectors included, from the correct model)."""
    from edgeops.trust import TrustRepository
    from edgeops.trust.release import build_custom, build_firmware_release
    from tests.fixtures.trust import ReleaseModels, TrustTemplate
    from tests.test_firmware_cortexm import require_cortex_m_toolchain

    require_cortex_m_toolchain()
    directory = tmp_path_factory.mktemp("firmware-repository")
    repository = TrustRepository(directory / "trust")
    repository.init(directory / "offline-root-keys", root_keys=1, root_threshold=1)
    tflite = (int8_model_dir / "model.tflite").read_bytes()
    card = ModelCard.from_json((int8_model_dir / "card.json").read_text())
    card = dataclasses.replace(card, runtime="tflm")
    images = {}
    for path, model in ((E2E_GOOD, tflite), (E2E_BAD, _alter_one_weight(tflite, card))):
        seq = path.split("/")[1]
        released, data = build_firmware_release(
            model, card, "mps2-an385", prefix=f"{E2E_MODEL}-{seq}-mps2-an385"
        )
        repository.add_target(path, data, build_custom(released, "mcu"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile(f"{E2E_MODEL}-{seq}-mps2-an385/firmware.elf")
            assert member is not None
            images[path] = hashlib.sha256(member.read()).hexdigest()
    assert images[E2E_GOOD] != images[E2E_BAD]
    models = ReleaseModels(model_factory, E2E_MODEL, "", "")
    return FirmwareRepository(TrustTemplate(directory, {}, models), images, card)


def test_firmware_releases_through_the_gateway_to_a_qemu_board(
    tmp_path: Path, mosquitto: Any, firmware_repository: FirmwareRepository
) -> None:
    """(a) a good firmware release passes conformance on the QEMU board and is committed;
    (b) a validly signed release with one weight altered fails conformance, the board is
    flashed back to the previous image, the update is rolled back, and the hub knows why."""
    from hil.boards.qemu import QemuBoard, stop_qemu
    from tests.fixtures.trust import AgentProcess, kill_leftover_agents, make_trust_hub, wait_for

    hub = make_trust_hub(tmp_path / "hub", mosquitto, firmware_repository.template)
    board_dir = tmp_path / "qemu-board"
    tty = board_dir / "tty"
    flash = f"{sys.executable} -m hil.boards.qemu flash --dir {board_dir} --target mps2-an385"
    device = "gw-qemu"
    try:
        hub.serve()
        agent = AgentProcess.provision(
            tmp_path / "device",
            device_id=device,
            mqtt_url=hub.url,
            data_dir=tmp_path / "device-data",
            trust_root=hub.root_json,
            champion=None,
            champion_target=None,
            mcu={"port": str(tty), "flash_command": f"{flash} {{image}}", "timeout_s": 10},
        )
        agent.start()

        def conformance() -> list[dict[str, Any]]:
            return [v.detail for v in hub.fleet.list_events(device, event="conformance")]

        # (a) the good release
        hub.desire(device, E2E_GOOD)
        wait_for(lambda: hub.update_state(device) == "committed", 60, "the good release")
        assert agent.active_target() == E2E_GOOD
        (passed,) = wait_for(conformance, 10, "the conformance event")
        assert passed["passed"] is True and passed["failed"] == [], passed
        assert passed["vectors"] == len(firmware_repository.card.test_vectors)
        assert passed["board"] == str(tty) and passed["target"] == "mps2-an385"
        assert passed["latency_ms_mean"] > 0 and passed["mean_cycles"] > 0
        good_sha = firmware_repository.images[E2E_GOOD]
        assert hashlib.sha256((board_dir / "image.elf").read_bytes()).hexdigest() == good_sha

        # (b) the release with one weight altered
        hub.desire(device, E2E_BAD)
        wait_for(lambda: hub.update_state(device) == "rolled_back", 60, "the rollback")
        failed = wait_for(lambda: conformance()[1:], 10, "the second conformance event")[0]
        assert failed["passed"] is False and failed["failed"], failed
        assert failed["max_error"] > failed["tolerance"]
        reason = hub.events(device)[-1]["reason"]
        assert reason.startswith(f"smoke_test: conformance on {tty}: test vector "), reason
        assert reason.endswith(f"previous image restored on {tty}"), reason
        assert agent.active_target() == E2E_GOOD
        assert agent.stop() == 0
        shown = run_cli(
            "edgeops", "devices", "show", device, "--json",
            env={"EDGEOPS_DATABASE_URL": f"sqlite:///{hub.workdir / 'hub.db'}"},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert document["update_state"] == "rolled_back"
        assert document["last_update"]["reason"] == reason
        assert document["last_conformance"]["failed"] == failed["failed"]
        table = run_cli(
            "edgeops", "devices", "show", device,
            env={"EDGEOPS_DATABASE_URL": f"sqlite:///{hub.workdir / 'hub.db'}", "COLUMNS": "400"},
        )  # fmt: skip
        assert table.returncode == 0, table.stderr
        assert "last update" in table.stdout and "previous image restored" in table.stdout
        differ = f"FAILED: {len(failed['failed'])} of {failed['vectors']} test vectors differ"
        assert differ in table.stdout, table.stdout

        # the board runs the previous image again, and answers as the model does
        assert hashlib.sha256((board_dir / "image.elf").read_bytes()).hexdigest() == good_sha
        with QemuBoard("gateway-board", board_dir) as board:
            for vector in firmware_repository.card.test_vectors:
                fed = np.asarray(vector["input"], dtype=np.int8).reshape(-1)
                got = board.infer(fed).values.astype(np.int32).reshape(-1)
                expected = np.asarray(vector["expected_output"], dtype=np.int32).reshape(-1)
                assert np.abs(got - expected).max() <= 1
    finally:
        kill_leftover_agents()
        hub.close()
        stop_qemu(board_dir)
