"""The projects generated for each target: the expected files, sources that compile with the
host gcc (and arm-none-eabi-gcc where the target is a Cortex-M) under the strict warning
flags against stub SDK headers (tests/fixtures/firmware_stubs), the bare-metal project's
own Makefile building and running under QEMU, and the command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeops.firmware import FirmwareError, generate
from edgeops.firmware.conformance import random_inputs
from edgeops.firmware.targets import C_FLAGS, TARGETS
from tests.clitools import assert_one_line_error, run_cli
from tests.test_firmware_cortexm import require_cortex_m_toolchain, small_tflite

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the host gcc")

STUBS = Path(__file__).parent / "fixtures" / "firmware_stubs"
LIBRARY = [
    "edgeops_kernels.c",
    "edgeops_kernels.h",
    "edgeops_model.c",
    "edgeops_model.h",
    "edgeops_model.json",
]

PROJECTS = {
    "zephyr": (["CMakeLists.txt", "prj.conf", "src/main.c"], ["src/main.c"]),
    "arduino": (
        ["examples/edgeops_model/edgeops_model.ino", "library.properties"],
        ["examples/edgeops_model/edgeops_model.ino"],
    ),
    "esp-idf": (
        [
            "CMakeLists.txt",
            "example/CMakeLists.txt",
            "example/main/CMakeLists.txt",
            "example/main/main.c",
        ],
        ["example/main/main.c"],
    ),
    "mps2-an385": (
        ["Makefile", "main.c", "main_serial.c", "mps2.ld", "semihosting.h", "startup.c", "uart.h"],
        [],
    ),
}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _compile(compiler: str, source: Path, include: Path, *flags: str) -> None:
    language = ["-x", "c"] if source.suffix == ".ino" and compiler != "g++" else []
    if compiler == "g++":
        language = ["-x", "c++"]
    std = [f for f in C_FLAGS if not (compiler == "g++" and f == "-std=c99")]
    command = [
        compiler, *std, *flags, "-fsyntax-only", "-I", str(STUBS), "-I", str(include),
        *language, str(source),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("target", sorted(PROJECTS))
def test_project_files_are_generated(target: str, tmp_path: Path) -> None:
    expected, _ = PROJECTS[target]
    out = tmp_path / "out"
    library = generate(small_tflite(), out, target=target)
    assert _files(out) == sorted(LIBRARY + expected)
    assert library.project_files == sorted(expected)
    manifest = json.loads((out / "edgeops_model.json").read_text())
    assert manifest["target"] == target
    assert manifest["project_files"] == sorted(expected)
    assert manifest["files"] == sorted(name for name in LIBRARY if name != "edgeops_model.json")
    assert manifest["estimated_flash_bytes"] > manifest["arena_bytes"] >= 0
    assert expected, f"no project files listed for {target}"
    # no template syntax left over (an undefined variable is already an error: StrictUndefined)
    for name in expected:
        text = (out / name).read_text()
        assert "{{" not in text and "{%" not in text, name


@pytest.mark.parametrize("target", ["zephyr", "arduino", "esp-idf"])
def test_project_sources_compile_warning_free(target: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(small_tflite(), out, target=target)
    _, sources = PROJECTS[target]
    cross = TARGETS[target].cpu_flags
    if cross:
        require_cortex_m_toolchain()
    for name in sources:
        _compile("gcc", out / name, out)
        if name.endswith(".ino") and shutil.which("g++"):  # as C++ too where g++ is here
            _compile("g++", out / name, out)
        if cross:
            _compile("arm-none-eabi-gcc", out / name, out, *cross)
    for name in ("edgeops_model.c", "edgeops_kernels.c"):
        _compile("gcc", out / name, out)
        if cross:
            _compile("arm-none-eabi-gcc", out / name, out, *cross)


def test_project_texts_name_the_library(tmp_path: Path) -> None:
    generate(small_tflite(), tmp_path / "zephyr", target="zephyr")
    generate(small_tflite(), tmp_path / "esp", target="esp-idf")
    generate(small_tflite(), tmp_path / "arduino", target="arduino")
    zephyr = (tmp_path / "zephyr" / "CMakeLists.txt").read_text()
    assert "find_package(Zephyr" in zephyr and "edgeops_kernels.c" in zephyr
    esp = (tmp_path / "esp" / "CMakeLists.txt").read_text()
    assert "idf_component_register(" in esp and '"edgeops_model.c"' in esp
    assert "EXTRA_COMPONENT_DIRS" in (tmp_path / "esp" / "example" / "CMakeLists.txt").read_text()
    properties = (tmp_path / "arduino" / "library.properties").read_text()
    assert "includes=edgeops_model.h" in properties and "Input 16 int8 values" in properties


def test_bare_metal_makefile_builds_and_runs_under_qemu(tmp_path: Path) -> None:
    """The user's path: `make` and `make run` in the generated mps2-an386 project."""
    from edgeops.evaluate.tflm import tflm_run

    require_cortex_m_toolchain()
    out = tmp_path / "m4"
    library = generate(small_tflite(), out, target="mps2-an386")
    makefile = (out / "Makefile").read_text()
    assert "-mcpu=cortex-m4" in makefile and "-M mps2-an386" in makefile
    build = subprocess.run(
        ["make"], cwd=out, capture_output=True, text=True, timeout=120, check=False
    )
    assert build.returncode == 0, build.stderr
    inputs = random_inputs(library.input_size, 8, seed=9)
    (out / "edgeops_inputs.bin").write_bytes(inputs.tobytes())
    run = subprocess.run(
        ["make", "run"], cwd=out, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "edgeops: samples 8" in run.stdout + run.stderr  # the semihosting console
    outputs = np.frombuffer((out / "edgeops_outputs.bin").read_bytes(), dtype=np.int8)
    expected = tflm_run(small_tflite(), inputs).outputs.reshape(-1)
    np.testing.assert_array_equal(outputs, expected)

    # `make serial`: the image that answers serial frames on UART0, run as a board
    from hil.boards.qemu import QemuBoard

    serial = subprocess.run(
        ["make", "serial"], cwd=out, capture_output=True, text=True, timeout=120, check=False
    )
    assert serial.returncode == 0, serial.stderr
    with QemuBoard("m4", tmp_path / "board", target="mps2-an386") as board:
        board.deploy(out / "edgeops_firmware_serial.elf")
        answers = [board.infer(sample).values for sample in inputs.reshape(8, -1)]
        assert board.read_metrics()["target"] == "mps2-an386"
    np.testing.assert_array_equal(np.concatenate(answers), expected)


def test_cli_writes_a_bare_metal_project(tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(small_tflite())
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(model), "--target", "mps2-an385",
        "--out", str(tmp_path / "m3"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = "Makefile, main.c, main_serial.c, mps2.ld, semihosting.h, startup.c, uart.h"
    assert f"project files: {files}" in result.stdout
    assert "Cortex-M3" in result.stdout
    assert (tmp_path / "m3" / "startup.c").is_file()
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(model), "--target", "esp-idf",
        "--out", str(tmp_path / "esp"), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["target"] == "esp-idf"
    assert "example/main/main.c" in document["project_files"]


def test_bad_target_is_a_one_line_error(tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(small_tflite())
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(model), "--target", "stm32",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "unknown target 'stm32'", "mps2-an385", "esp-idf")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FirmwareError, match="unknown target 'stm32'"):
        generate(small_tflite(), tmp_path / "out", target="stm32")
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(model), "--target", "zephyr",
        "--flash-bytes", "0", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "flash limit must be a positive number of bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite"]
