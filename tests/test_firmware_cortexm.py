"""The generated C on Cortex-M: cross-built with arm-none-eabi-gcc under -Werror and the
strict warning flags, run under QEMU's mps2-an385 (Cortex-M3) and mps2-an386 (Cortex-M4),
and compared byte for byte with the tflite-micro interpreter and the host build on more
than 100 inputs; the footprint from arm-none-eabi-size, the instructions per inference from
QEMU's -icount (calibrated against a loop of known length), and the flash/RAM limits
checked before anything is written.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeops.firmware import FirmwareError, generate
from edgeops.firmware.conformance import (
    build_host,
    check_conformance,
    random_float_inputs,
    random_inputs,
    run_host,
)
from edgeops.firmware.cortexm import (
    INSTRUCTIONS_PER_TICK,
    Footprint,
    build_firmware,
    build_id,
    measure,
    measure_footprint,
    run_qemu,
    toolchain_available,
)
from edgeops.firmware.errors import TargetLimitError, ToolchainMissingError
from edgeops.firmware.targets import Limits
from tests.clitools import assert_one_line_error, run_cli


def require_cortex_m_toolchain() -> None:
    """Fail, not skip, when the Arm toolchain or QEMU is missing: ``make test`` installs them
    (scripts/test-services.sh), so a missing tool is a broken set-up to be seen, as an
    unreachable PostgreSQL is (tests/fixtures/database.py)."""
    from edgeops.firmware.cortexm import APT_PACKAGES, missing_tools

    if not toolchain_available():
        pytest.fail(
            f"the Cortex-M toolchain is not installed ({', '.join(missing_tools())} missing): "
            f"run `make services` (scripts/test-services.sh) or apt-get install {APT_PACKAGES}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def cortex_m_toolchain() -> None:
    require_cortex_m_toolchain()


SAMPLES = 112
QEMU_TARGETS = ("mps2-an385", "mps2-an386")


@functools.cache
def _small_model() -> Any:
    from edgeops._tf import load_tf

    _, keras = load_tf()
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)]
    )


@functools.cache
def small_tflite() -> bytes:
    """A two-layer int8 MLP (16 -> 8 -> 4), converted once per test process."""
    from tests.test_firmware import _convert

    return _convert(_small_model(), (16,))


@functools.cache
def small_float_io_tflite() -> bytes:
    """The same MLP with a float32 input and output (QUANTIZE first, DEQUANTIZE last)."""
    from tests.test_firmware import _convert

    return _convert(_small_model(), (16,), float_input=True, float_output=True)


@functools.cache
def conv_tflite() -> bytes:
    """The convolutional test model of tests/test_firmware.py (strides, dilation, depth
    multiplier, both paddings, pooling, mean, softmax), converted once per test process."""
    from edgeops._tf import load_tf
    from tests.test_firmware import _conv_model, _convert

    _, keras = load_tf()
    return _convert(_conv_model(keras), (9, 11, 3))


@functools.cache
def elementwise_tflite() -> bytes:
    """TANH, LOGISTIC, ADD, MUL, CONCATENATION, RELU, PAD, RELU6 (tests/test_firmware.py's
    elementwise model, with a static batch)."""
    from edgeops._tf import load_tf
    from tests.test_firmware import _convert, _elementwise_model

    _, keras = load_tf()
    return _convert(_elementwise_model(keras), (16,))


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The conv model generated once, with TFLM's and the host build's outputs on
    SAMPLES seeded random inputs."""
    from edgeops.evaluate.tflm import tflm_run

    root = tmp_path_factory.mktemp("cortexm-conv")
    tflite = conv_tflite()
    library = generate(tflite, root / "lib", target="mps2-an385")
    inputs = random_inputs(library.input_size, SAMPLES, seed=3)
    host = run_host(build_host(root / "lib", root / "host-model"), inputs, library.output_size)
    tflm = tflm_run(tflite, inputs).outputs.reshape(SAMPLES, -1)
    return {"root": root, "library": library, "inputs": inputs, "host": host, "tflm": tflm}


@pytest.fixture(scope="module")
def conv_runs(conv: dict[str, Any]) -> dict[str, Any]:
    """The conv model built for each QEMU target and run on the same inputs."""
    runs = {}
    for target in QEMU_TARGETS:
        elf = build_firmware(conv["root"] / "lib", conv["root"] / f"build-{target}", target)
        runs[target] = run_qemu(elf, conv["inputs"], conv["library"].output_size, target)
    return runs


@pytest.mark.parametrize("target", QEMU_TARGETS)
def test_cortex_m_outputs_equal_tflm_and_host_byte_for_byte(
    conv: dict[str, Any], conv_runs: dict[str, Any], target: str
) -> None:
    run = conv_runs[target]
    assert run.outputs.shape == (SAMPLES, 7) and run.outputs.dtype == np.int8
    np.testing.assert_array_equal(run.outputs, conv["tflm"])
    np.testing.assert_array_equal(run.outputs, conv["host"])
    # the comparison means something: outputs vary from sample to sample
    assert len({row.tobytes() for row in run.outputs}) > SAMPLES // 2
    assert run.instructions_per_inference > 0


def test_conformance_under_qemu_covers_the_fixed_point_kernels(tmp_path: Path) -> None:
    """TANH, LOGISTIC, ADD, MUL (64-bit intermediate products on a 32-bit CPU) on the
    Cortex-M3 through the conformance API."""
    tflite = elementwise_tflite()
    report = check_conformance(
        tflite, random_inputs(16, SAMPLES, seed=5), workdir=tmp_path, target="mps2-an385"
    )
    assert report.samples == SAMPLES
    assert report.bit_exact, report.to_dict()
    assert report.target == "mps2-an385"
    assert report.instructions_per_inference is not None
    assert report.instructions_per_inference > 0
    assert {"TANH", "LOGISTIC", "ADD", "MUL"} <= set(report.ops)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", QEMU_TARGETS)
def test_float_io_model_on_cortex_m_equals_tflm_bit_for_bit(target: str, tmp_path: Path) -> None:
    """Float32 in, float32 out on the Cortex-M3 and M4 (soft float): the library's QUANTIZE
    and DEQUANTIZE functions around the int8 invoke give the bits of TFLM and of the host
    build, and the footprint stays under the estimate."""
    from edgeops.evaluate.tflm import tflm_run

    tflite = small_float_io_tflite()
    library = generate(tflite, tmp_path / "lib", target=target)
    assert library.float_input and library.float_output
    scale, zero_point = library.input_quantization
    inputs = random_float_inputs(16, SAMPLES, scale, zero_point, seed=9)
    footprint, run = measure(tflite, target, inputs=inputs)
    assert run is not None and run.outputs.dtype == np.float32
    assert run.outputs.shape == (SAMPLES, 4)
    tflm = np.asarray(tflm_run(tflite, inputs).outputs, dtype="<f4").reshape(SAMPLES, -1)
    host = run_host(build_host(tmp_path / "lib", tmp_path / "host"), inputs, 4, float_output=True)
    assert run.outputs.tobytes() == tflm.tobytes()
    assert host.tobytes() == tflm.tobytes()
    assert len({row.tobytes() for row in run.outputs}) > SAMPLES // 2
    assert library.usage is not None
    assert footprint.flash_bytes <= library.usage.flash_bytes
    assert footprint.ram_bytes <= library.usage.ram_bytes


def _int8_constant_bytes(library_dir: Path) -> int:
    source = (library_dir / "edgeops_model.c").read_text()
    return sum(int(n) for n in re.findall(r"static const int8_t eo_const\d+\[(\d+)\]", source))


def test_footprint_is_consistent(conv: dict[str, Any], tmp_path: Path) -> None:
    library_dir = conv["root"] / "lib"
    library = conv["library"]
    footprint = measure_footprint(library_dir, "mps2-an385", build_dir=tmp_path / "size")
    assert isinstance(footprint, Footprint)
    assert footprint.target == "mps2-an385"
    assert footprint.text > 0 and footprint.rodata > 0
    assert footprint.arena_bytes == library.arena_bytes > 0
    assert footprint.arena_bytes <= footprint.bss  # the arena is zero-initialised data
    assert footprint.rodata >= _int8_constant_bytes(library_dir)  # the weights are in flash
    assert footprint.flash_bytes == footprint.text + footprint.rodata + footprint.data
    assert footprint.ram_bytes == footprint.data + footprint.bss
    # the generation-time estimate checked against the limits is an upper bound
    assert library.usage is not None
    assert footprint.flash_bytes <= library.usage.flash_bytes
    assert footprint.ram_bytes <= library.usage.ram_bytes
    document = footprint.to_dict()
    assert document["flash_bytes"] == footprint.flash_bytes
    assert document["ram_bytes"] == footprint.ram_bytes


def test_bigger_model_costs_more_flash_and_instructions(conv_runs: dict[str, Any]) -> None:
    footprint, run = measure(small_tflite(), "mps2-an385")
    big, big_run = measure(conv_tflite(), "mps2-an385", inputs=random_inputs(297, 4, seed=1))
    assert run is not None and big_run is not None
    assert 0 < footprint.flash_bytes < big.flash_bytes
    assert 0 < run.instructions_per_inference < big_run.instructions_per_inference
    # the same build and inputs of another length agree to within a few timer ticks
    a, b = big_run.instructions_per_inference, conv_runs["mps2-an385"].instructions_per_inference
    assert abs(a - b) <= 0.05 * b
    # a target without QEMU machine gets its footprint only
    zephyr, none = measure(small_tflite(), "zephyr")
    assert none is None and zephyr.flash_bytes > 0


CALIBRATION_H = """#ifndef EDGEOPS_MODEL_H
#define EDGEOPS_MODEL_H
#include <stdint.h>
#define EDGEOPS_MODEL_INPUT_SIZE 2
#define EDGEOPS_MODEL_OUTPUT_SIZE 1
#define EDGEOPS_MODEL_ARENA_SIZE 0
void edgeops_model_init(void);
int edgeops_model_invoke(const int8_t *input, int8_t *output);
#endif
"""

CALIBRATION_C = r"""#include "edgeops_model.h"

void edgeops_model_init(void) {
}

/* Runs 256 * input[0] + input[1] iterations (bytes read unsigned, at least 1) of a
 * two-instruction loop: SUBS, BNE. */
int edgeops_model_invoke(const int8_t *input, int8_t *output) {
    uint32_t n = ((uint32_t)(uint8_t)input[0] << 8) | (uint32_t)(uint8_t)input[1];
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(n) : : "cc");
    output[0] = (int8_t)n;
    return 0;
}
"""


WARNING_BODIES = {
    "-Werror=conversion": "int32_t sum = input[0];\n    output[0] = sum;",
    "-Werror=double-promotion": "float x = input[0];\n    output[0] = (int8_t)(x * 2.0);",
    "-Werror=unused-variable": "int32_t unused;\n    output[0] = input[0];",
    "-Werror=unused-parameter": "output[0] = 0;  /* input unused */",
}
"""One warning each of -Wconversion, -Wdouble-promotion, -Wall and -Wextra, in otherwise
valid C; the flag gcc names in its error."""


@pytest.mark.parametrize("flag", sorted(WARNING_BODIES))
def test_a_warning_fails_the_host_and_the_cortex_m_build(flag: str, tmp_path: Path) -> None:
    """The strict flags are really applied: one warning in the library fails both builds,
    as a one-line error that names it."""
    library = tmp_path / "warning"
    library.mkdir()
    (library / "edgeops_model.h").write_text(CALIBRATION_H)
    body = WARNING_BODIES[flag]
    (library / "edgeops_model.c").write_text(
        '#include "edgeops_model.h"\n\nvoid edgeops_model_init(void) {\n}\n\n'
        "int edgeops_model_invoke(const int8_t *input, int8_t *output) {\n"
        f"    {body}\n    return 0;\n}}\n"
    )
    (library / "edgeops_kernels.c").write_text("typedef int eo_no_kernels;\n")
    with pytest.raises(FirmwareError) as host:
        build_host(library, tmp_path / "host-model")
    with pytest.raises(FirmwareError) as cortex_m:
        build_firmware(library, tmp_path / "build", "mps2-an385")
    for caught in (host, cortex_m):
        message = str(caught.value)
        assert flag in message and "\n" not in message, message
    assert not (tmp_path / "build" / "edgeops_firmware.elf").exists()


def test_instructions_per_inference_is_calibrated_by_a_known_loop(tmp_path: Path) -> None:
    """A loop of 2 instructions per iteration: the count grows by 2 per iteration, to
    within one timer tick (40 instructions) per measurement, with a small fixed overhead."""
    library = tmp_path / "calibration"
    library.mkdir()
    (library / "edgeops_model.h").write_text(CALIBRATION_H)
    (library / "edgeops_model.c").write_text(CALIBRATION_C)
    (library / "edgeops_kernels.c").write_text("typedef int eo_no_kernels;\n")
    elf = build_firmware(library, tmp_path / "build", "mps2-an385")
    counts = {}
    for iterations in (1000, 3000, 9000, 20000):
        sample = np.array([[iterations >> 8, iterations & 0xFF]], dtype=np.uint8).view(np.int8)
        run = run_qemu(elf, np.repeat(sample, 3, axis=0), 1, "mps2-an385")
        np.testing.assert_array_equal(run.outputs, 0)
        counts[iterations] = run.instructions_per_inference
    for iterations, count in counts.items():
        overhead = count - 2 * iterations
        assert -INSTRUCTIONS_PER_TICK <= overhead <= 100 + INSTRUCTIONS_PER_TICK, counts
    slope = (counts[20000] - counts[1000]) / (20000 - 1000)
    assert abs(slope - 2.0) <= 2 * INSTRUCTIONS_PER_TICK / (20000 - 1000), counts


def test_limit_exceeded_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    tflite = conv_tflite()
    out = tmp_path / "out"
    with pytest.raises(TargetLimitError) as caught:
        generate(tflite, out, target="mps2-an385", limits=Limits(flash_bytes=1000))
    message = str(caught.value)
    assert "flash of target mps2-an385" in message and "1,000 bytes of flash" in message
    assert "bytes of RAM" in message and "\n" not in message
    with pytest.raises(TargetLimitError, match="RAM of target zephyr"):
        generate(tflite, out, target="zephyr", limits=Limits(ram_bytes=64))
    assert list(tmp_path.iterdir()) == []
    # the target's own limits, as stated in the table, are far above this model
    generate(tflite, out, target="mps2-an385")
    model = tmp_path / "model.tflite"
    model.write_bytes(tflite)
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(model), "--target", "arduino",
        "--ram-bytes", "300", "--out", str(tmp_path / "cli-out"),
    )  # fmt: skip
    assert_one_line_error(result, "does not fit the RAM of target arduino", "300 bytes of RAM")
    assert not (tmp_path / "cli-out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite", "out"]


def test_bad_arguments_are_one_line_errors(
    conv: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeops.firmware import cortexm

    with pytest.raises(FirmwareError, match="not a Cortex-M target"):
        build_firmware(conv["root"] / "lib", tmp_path, "host")
    with pytest.raises(FirmwareError, match="no QEMU machine"):
        run_qemu(tmp_path / "x.elf", conv["inputs"], 7, "zephyr")
    with pytest.raises(FirmwareError, match="holds no generated library"):
        build_firmware(tmp_path, tmp_path / "build", "mps2-an385")
    with pytest.raises(FirmwareError, match="expected whole samples of 297"):
        measure(conv_tflite(), inputs=np.zeros((2, 5), dtype=np.int8))
    monkeypatch.setattr(cortexm, "missing_tools", lambda: ("qemu-system-arm",))
    with pytest.raises(ToolchainMissingError, match="apt-get install gcc-arm-none-eabi"):
        run_qemu(tmp_path / "x.elf", conv["inputs"], 7, "mps2-an385")


def test_serial_harness_builds_with_a_build_id_of_its_sources(
    conv: dict[str, Any], tmp_path: Path
) -> None:
    """The serial harness (tests/test_hil_mcu_boards.py runs it) builds warning-free for
    both targets; its build id, compiled in, depends on the library and the target."""
    library_dir = conv["root"] / "lib"
    ids = {}
    for target in QEMU_TARGETS:
        elf = build_firmware(library_dir, tmp_path / target, target, harness="serial")
        ids[target] = build_id(library_dir, target)
        assert len(ids[target]) == 16 and int(ids[target], 16) >= 0
        assert f'"build_id":"{ids[target]}","target":"{target}"'.encode() in elf.read_bytes()
    assert ids["mps2-an385"] != ids["mps2-an386"]
    assert build_id(library_dir, "mps2-an385") == ids["mps2-an385"]
    other = generate(small_tflite(), tmp_path / "small", target="mps2-an385")
    assert other.input_size == 16
    assert build_id(tmp_path / "small", "mps2-an385") != ids["mps2-an385"]
    with pytest.raises(FirmwareError, match="unknown harness 'usb'; harnesses: semihosting"):
        build_firmware(library_dir, tmp_path / "usb", "mps2-an385", harness="usb")
