"""MCU code generation: int8 .tflite to C99, compiled with the host gcc and for the Cortex-M3
(arm-none-eabi-gcc, run under QEMU's mps2-an385) under -Werror, and compared byte for byte
with the tflite-micro interpreter on at least 100 inputs per model.

Models: every architecture of the zoo (trained one epoch on a built-in dataset, compressed
to full int8 by the hub's CompressService; :data:`ZOO_RECIPES`) and small random Keras models
converted to full int8 with a representative dataset, which between them use every kernel:
strides, SAME and VALID padding, dilation, depth multipliers, per-channel and per-tensor
scales, fused RELU/RELU6, odd sizes, broadcasting, constant operands, SPACE_TO_BATCH_ND and
BATCH_TO_SPACE_ND with paddings and crops, and the SHAPE/STRIDED_SLICE/PACK arithmetic of a
Keras Reshape with a dynamic batch, folded at generation time. Some of those models are
converted again with a float32 input and/or output (QUANTIZE first, DEQUANTIZE last) and
compared bit for bit as floats.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeops.firmware import (
    FirmwareError,
    FloatModelError,
    UnsupportedModelError,
    generate,
    generate_sources,
)
from edgeops.firmware.conformance import (
    check_conformance,
    random_float_inputs,
    random_inputs,
)
from edgeops.firmware.graph import read_tflite
from tests.clitools import assert_one_line_error, run_cli
from tests.test_firmware_cortexm import require_cortex_m_toolchain

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the host gcc")

SAMPLES = 128
CONFORMANCE_TARGETS = ("host", "mps2-an385")
"""Where every model's library runs against TFLM: the host build and the Cortex-M3 under QEMU."""

ZOO_RECIPES: dict[str, tuple[str, float]] = {
    "mlp": ("digits", 1.0),
    "cnn": ("digits", 1.0),
    "ds-cnn": ("digits", 0.25),
    "mobilenet": ("digits", 0.25),
    "cnn1d": ("basic_motions", 0.25),
    "autoencoder": ("digits", 0.25),
}
"""Architecture: (built-in dataset, width). Each is trained one epoch (seed 0) and compressed
to full int8 with a loss limit no variant can miss, so the int8 fallback policy (QAT, 16x8)
never runs."""


def _convert(
    model: Any,
    shape: tuple[int, ...],
    *,
    per_channel: bool = True,
    dynamic: bool = False,
    float_input: bool = False,
    float_output: bool = False,
) -> bytes:
    """``model`` as a full-integer int8 .tflite, calibrated on seeded random inputs; with
    ``float_input``/``float_output`` its input/output stays float32 (the converter adds a
    QUANTIZE first / a DEQUANTIZE last)."""
    from edgeops._tf import load_tf, native_stderr_silenced

    tf, _ = load_tf()
    calibration = np.random.default_rng(0).normal(0.0, 1.0, (48, *shape)).astype(np.float32)
    if dynamic:  # batch dimension None: Keras Reshape emits SHAPE/STRIDED_SLICE/PACK
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    else:
        spec = tf.TensorSpec((1, *shape), tf.float32)
        function = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function()], model
        )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative() -> Iterator[list[np.ndarray]]:
        for row in calibration:
            yield [row[np.newaxis]]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.float32 if float_input else tf.int8
    converter.inference_output_type = tf.float32 if float_output else tf.int8
    if not per_channel:
        converter._experimental_disable_per_channel = True
    with native_stderr_silenced():
        flatbuffer: bytes = converter.convert()
    return flatbuffer


def _conv_model(keras: Any) -> Any:
    layers = keras.layers
    keras.utils.set_random_seed(1)
    x = inputs = keras.Input((9, 11, 3))
    x = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", activation="relu6")(x)
    x = layers.Conv2D(5, (2, 3), dilation_rate=(1, 2), padding="same")(x)
    x = layers.DepthwiseConv2D(3, strides=(1, 2), padding="same")(x)
    x = layers.MaxPooling2D(2, strides=1, padding="same")(x)
    x = layers.AveragePooling2D((2, 3), strides=2, padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(7)(x)
    return keras.Model(inputs, layers.Softmax()(x))


def _dilated_model(keras: Any) -> Any:
    layers = keras.layers
    keras.utils.set_random_seed(2)
    x = inputs = keras.Input((10, 10, 2))
    x = layers.Conv2D(4, 3, dilation_rate=2, padding="valid", activation="relu")(x)
    x = layers.DepthwiseConv2D(2, dilation_rate=2, padding="same")(x)
    x = layers.AveragePooling2D(3, strides=2, padding="valid")(x)
    x = layers.Dense(3)(layers.Flatten()(x))
    return keras.Model(inputs, x)


def _elementwise_model(keras: Any) -> Any:
    layers = keras.layers
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16,))
    x = layers.Dense(12)(inputs)
    a = layers.Activation("tanh")(x)
    b = layers.Activation("sigmoid")(x)
    c = layers.Add()([a, b])
    d = layers.Multiply()([a, c])
    # tanh and logistic outputs have fixed, different scales: the converter requantizes
    e = layers.Concatenate()([c, d, x, a, b])
    e = layers.ReLU()(e)
    e = layers.Reshape((10, 6))(e)
    e = layers.ZeroPadding1D((1, 2))(e)
    e = layers.ReLU(6.0)(e)
    y = layers.Dense(5, activation="relu")(layers.Flatten()(e))
    return keras.Model(inputs, y)


def _broadcast_model(keras: Any) -> Any:
    import tensorflow as tf

    layers = keras.layers
    keras.utils.set_random_seed(4)
    inputs = keras.Input((4, 5, 3))
    a = layers.Conv2D(3, 1)(inputs)
    g = layers.GlobalAveragePooling2D(keepdims=True)(a)
    s = layers.Add()([layers.Multiply()([a, g]), inputs])
    c = layers.Concatenate()([inputs, s])
    offsets = tf.constant([0.5, -1.0, 0.25, 2.0, 0.0, -0.5])
    c = layers.Lambda(lambda t: t + offsets)(c)
    return keras.Model(inputs, layers.Dense(4)(layers.Flatten()(c)))


def _space_to_batch_model(keras: Any) -> Any:
    """Explicit SPACE_TO_BATCH_ND and BATCH_TO_SPACE_ND around convolutions (the converter
    keeps them: no single dilated convolution replaces the pair), with paddings, crops,
    unequal block sizes and rank 3. The padded tensors have non-zero zero points, so the
    pad value TFLM uses (int8 0, not the zero point) shows in the outputs."""
    import tensorflow as tf

    layers = keras.layers
    keras.utils.set_random_seed(7)
    inputs = keras.Input((10, 9, 3))
    x = layers.Lambda(lambda t: tf.space_to_batch_nd(t, [2, 3], [[2, 2], [1, 2]]))(inputs)
    x = layers.DepthwiseConv2D(3, activation="relu")(x)
    x = layers.Conv2D(4, 1)(x)
    x = layers.Lambda(lambda t: tf.batch_to_space(t, [2, 3], [[1, 0], [0, 2]]))(x)
    x = layers.Lambda(lambda t: tf.space_to_batch_nd(t, [2, 2], [[1, 0], [1, 1]]))(x)
    x = layers.Conv2D(3, 2, activation="relu")(x)
    x = layers.Lambda(lambda t: tf.batch_to_space(t, [2, 2], [[0, 0], [0, 0]]))(x)
    x = layers.Reshape((8, 12))(x)  # rank 3: NHC
    x = layers.Lambda(lambda t: tf.space_to_batch_nd(t, [2], [[1, 1]]))(x)
    x = layers.MaxPooling1D(2, strides=1)(x)
    x = layers.Lambda(lambda t: tf.batch_to_space(t, [2], [[0, 1]]))(x)
    return keras.Model(inputs, layers.Dense(5)(layers.Flatten()(x)))


RANDOM_MODELS: dict[str, tuple[Callable[[Any], Any], tuple[int, ...], dict[str, bool]]] = {
    "conv-per-channel": (_conv_model, (9, 11, 3), {}),
    "conv-per-tensor": (_conv_model, (9, 11, 3), {"per_channel": False}),
    "dilated": (_dilated_model, (10, 10, 2), {}),
    "elementwise": (_elementwise_model, (16,), {"dynamic": True}),
    "broadcast": (_broadcast_model, (4, 5, 3), {}),
    "space-to-batch": (_space_to_batch_model, (10, 9, 3), {}),
}


FLOAT_IO_MODELS: dict[str, tuple[str, dict[str, bool]]] = {
    "float-in-float-out": ("elementwise", {"float_input": True, "float_output": True}),
    "float-in": ("conv-per-channel", {"float_input": True}),
    "float-out": ("dilated", {"float_output": True}),
}
"""A second conversion of some random models' Keras models, keeping a float32 input and/or
output (the converter's default without ``inference_input_type``/``inference_output_type``)."""


@pytest.fixture(scope="module")
def keras_models() -> dict[str, Any]:
    from edgeops._tf import load_tf

    _, keras = load_tf()
    return {name: build(keras) for name, (build, _, _) in RANDOM_MODELS.items()}


@pytest.fixture(scope="module")
def random_models(keras_models: dict[str, Any]) -> dict[str, bytes]:
    return {
        name: _convert(keras_models[name], shape, **options)
        for name, (_, shape, options) in RANDOM_MODELS.items()
    }


@pytest.fixture(scope="module")
def float_io_models(keras_models: dict[str, Any]) -> dict[str, bytes]:
    converted: dict[str, bytes] = {}
    for name, (source, edges) in FLOAT_IO_MODELS.items():
        _, shape, options = RANDOM_MODELS[source]
        converted[name] = _convert(keras_models[source], shape, **options, **edges)
    return converted


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every zoo architecture per :data:`ZOO_RECIPES`, one epoch each, compressed to int8, in
    a data dir of their own."""
    from edgeops.compress import CompressService
    from edgeops.hub.stores import open_stores
    from edgeops.train import TrainService

    root = tmp_path_factory.mktemp("firmware-zoo")
    with open_stores(f"sqlite:///{root / 'edgeops.db'}", root / "artifacts") as stores:
        datasets, registry = stores.datasets(), stores.registry()
        for dataset in sorted({dataset for dataset, _ in ZOO_RECIPES.values()}):
            datasets.register_builtin(dataset)
        found: dict[str, Any] = {"data_dir": root}
        for arch, (dataset, width) in ZOO_RECIPES.items():
            keras = TrainService(datasets, registry).train(
                dataset,
                arch,
                epochs=1,
                seed=0,
                width=width,
                progress=False,
                evaluate_on_runtime=False,
            )
            int8 = CompressService(datasets, registry).compress(
                keras.id, quantize="int8", max_loss_pp=100.0, progress=False
            )
            assert int8.config["compression"]["quantization"] == "int8"
            found[arch] = (int8.id, registry.load_artifact(int8.id))
            found[f"keras_{arch}"] = keras.id
        arrays = datasets.load("digits")
        found["x_test"] = np.asarray(arrays.model_inputs("test"), dtype=np.float32)
        yield found


def _assert_bit_exact(
    tflite: bytes, tmp_path: Path, *, empty_arena: bool = False, target: str = "host"
) -> tuple[str, ...]:
    if target != "host":
        require_cortex_m_toolchain()
    graph = read_tflite(tflite)
    size = graph.tensor(graph.inputs[0]).size
    report = check_conformance(
        tflite, random_inputs(size, SAMPLES, seed=7), workdir=tmp_path, target=target
    )
    assert report.samples == SAMPLES and report.target == target
    assert report.bit_exact, report.to_dict()
    assert (report.instructions_per_inference is not None) == (target != "host")
    assert report.arena_bytes <= report.tflm_arena_bytes
    assert (report.arena_bytes == 0) == empty_arena
    return report.ops


def test_zoo_recipes_cover_every_architecture() -> None:
    from edgeops.train.zoo import ARCHITECTURES

    assert sorted(ZOO_RECIPES) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("target", CONFORMANCE_TARGETS)
@pytest.mark.parametrize("arch", list(ZOO_RECIPES))
def test_zoo_model_is_bit_exact_with_tflm(
    zoo: dict[str, Any], arch: str, target: str, tmp_path: Path
) -> None:
    ops = _assert_bit_exact(zoo[arch][1], tmp_path, target=target)
    assert "FULLY_CONNECTED" in ops
    assert ops[-1] == ("FULLY_CONNECTED" if arch == "autoencoder" else "SOFTMAX")
    if arch in ("ds-cnn", "mobilenet"):
        assert {"DEPTHWISE_CONV_2D", "MEAN"} <= set(ops)


def test_real_digits_inputs_give_varied_outputs(zoo: dict[str, Any], tmp_path: Path) -> None:
    """The comparison means something: on real digits the outputs differ from sample to
    sample and the library's argmax agrees with TFLM's on every one."""
    from edgeops.evaluate.runtimes import LiteRTRunner
    from edgeops.evaluate.tflm import tflm_run
    from edgeops.firmware.conformance import build_host, run_host

    tflite = zoo["cnn"][1]
    x = zoo["x_test"][:SAMPLES]
    inputs = LiteRTRunner(tflite).input.quantize(x).reshape(SAMPLES, -1)
    library = generate(tflite, tmp_path / "lib")
    ours = run_host(build_host(tmp_path / "lib", tmp_path / "model"), inputs, 10)
    theirs = tflm_run(tflite, inputs).outputs.reshape(SAMPLES, -1)
    assert library.output_size == 10
    np.testing.assert_array_equal(ours, theirs)
    assert len({row.tobytes() for row in ours}) > SAMPLES // 2
    assert len(set(np.argmax(ours, axis=1).tolist())) > 3


@pytest.mark.parametrize("target", CONFORMANCE_TARGETS)
@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_model_is_bit_exact_with_tflm(
    random_models: dict[str, bytes], name: str, target: str, tmp_path: Path
) -> None:
    _assert_bit_exact(random_models[name], tmp_path, target=target)


def test_random_models_cover_every_kernel(random_models: dict[str, bytes]) -> None:
    """Between them the random models exercise every operator and option the kernels have."""
    ops: set[str] = set()
    options: set[str] = set()
    folded: set[str] = set()
    for tflite in random_models.values():
        graph = read_tflite(tflite)
        folded.update(graph.folded)
        for op in graph.operators:
            ops.add(op.op)
            o = op.options
            if max(o.get("strideH", 1), o.get("strideW", 1)) > 1:
                options.add(f"{op.op}:stride")
            if max(o.get("dilationHFactor", 1), o.get("dilationWFactor", 1)) > 1:
                options.add(f"{op.op}:dilation")
            if "padding" in o:
                options.add(f"{op.op}:{'SAME' if o['padding'] == 0 else 'VALID'}")
            if o.get("fusedActivationFunction") in (1, 3):
                options.add(f"fused:{o['fusedActivationFunction']}")
            if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                weights = graph.tensor(op.inputs[1])
                options.add(f"{op.op}:{'per-channel' if weights.per_channel else 'per-tensor'}")
            if op.op == "DEPTHWISE_CONV_2D":
                in_c = graph.tensor(op.inputs[0]).shape[-1]
                if graph.tensor(op.outputs[0]).shape[-1] > in_c:
                    options.add("depth-multiplier")
            if op.op in ("SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND"):
                margins = graph.tensor(op.inputs[2]).data
                assert margins is not None
                block = graph.tensor(op.inputs[1]).data
                assert block is not None
                if margins.any():
                    options.add(f"{op.op}:margins")
                if len(set(block.tolist())) > 1:
                    options.add(f"{op.op}:unequal-block")
                if len(graph.tensor(op.inputs[0]).shape) == 3:
                    options.add(f"{op.op}:rank-3")
                if op.op == "SPACE_TO_BATCH_ND" and graph.tensor(op.inputs[0]).zero_point:
                    options.add("SPACE_TO_BATCH_ND:pad-value-matters")
            if op.op in ("ADD", "MUL"):
                a, b = (graph.tensor(i) for i in op.inputs[:2])
                if a.shape != b.shape:
                    options.add(f"{op.op}:broadcast")
                if a.is_constant or b.is_constant:
                    options.add(f"{op.op}:constant")
    assert {
        "FULLY_CONNECTED",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "MAX_POOL_2D",
        "AVERAGE_POOL_2D",
        "MEAN",
        "RESHAPE",
        "SOFTMAX",
        "ADD",
        "MUL",
        "LOGISTIC",
        "TANH",
        "RELU",
        "RELU6",
        "CONCATENATION",
        "PAD",
        "QUANTIZE",
        "SPACE_TO_BATCH_ND",
        "BATCH_TO_SPACE_ND",
    } <= ops
    assert {
        "CONV_2D:stride",
        "DEPTHWISE_CONV_2D:stride",
        "CONV_2D:dilation",
        "DEPTHWISE_CONV_2D:dilation",
        "CONV_2D:SAME",
        "CONV_2D:VALID",
        "DEPTHWISE_CONV_2D:SAME",
        "DEPTHWISE_CONV_2D:VALID",
        "MAX_POOL_2D:SAME",
        "AVERAGE_POOL_2D:SAME",
        "AVERAGE_POOL_2D:VALID",
        "fused:1",
        "fused:3",
        "CONV_2D:per-channel",
        "CONV_2D:per-tensor",
        "DEPTHWISE_CONV_2D:per-channel",
        "DEPTHWISE_CONV_2D:per-tensor",
        "FULLY_CONNECTED:per-channel",
        "FULLY_CONNECTED:per-tensor",
        "depth-multiplier",
        "MUL:broadcast",
        "ADD:constant",
        "SPACE_TO_BATCH_ND:margins",
        "SPACE_TO_BATCH_ND:unequal-block",
        "SPACE_TO_BATCH_ND:pad-value-matters",
        "BATCH_TO_SPACE_ND:margins",
        "BATCH_TO_SPACE_ND:unequal-block",
        "SPACE_TO_BATCH_ND:rank-3",
        "BATCH_TO_SPACE_ND:rank-3",
    } <= options
    assert {"SHAPE", "STRIDED_SLICE", "PACK"} <= folded


def test_generated_library_layout(random_models: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "lib"
    library = generate(random_models["conv-per-channel"], out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "edgeops_kernels.c",
        "edgeops_kernels.h",
        "edgeops_model.c",
        "edgeops_model.h",
        "edgeops_model.json",
    ]
    header = (out / "edgeops_model.h").read_text()
    assert f"#define EDGEOPS_MODEL_INPUT_SIZE {9 * 11 * 3}" in header
    assert "#define EDGEOPS_MODEL_OUTPUT_SIZE 7" in header
    assert f"#define EDGEOPS_MODEL_ARENA_SIZE {library.arena_bytes}" in header
    assert "int edgeops_model_invoke(const int8_t *input, int8_t *output);" in header
    source = (out / "edgeops_model.c").read_text() + (out / "edgeops_kernels.c").read_text()
    assert "malloc" not in source
    manifest = json.loads((out / "edgeops_model.json").read_text())
    assert manifest["arena_bytes"] == library.arena_bytes
    assert manifest["ops"] == library.ops
    with pytest.raises(FirmwareError, match="already exists"):
        generate(random_models["conv-per-channel"], out)


def test_memory_plan_reuses_the_arena(random_models: dict[str, bytes]) -> None:
    """The arena is smaller than the sum of the intermediate tensors: dead buffers are
    reused; and no two buffers alive at the same step overlap."""
    from edgeops.firmware.lower import lower
    from edgeops.firmware.plan import plan_memory

    graph = read_tflite(random_models["conv-per-channel"])
    steps = lower(graph)
    plan = plan_memory(graph, steps)
    total = sum(b.size for b in plan.buffers)
    assert plan.arena_bytes < total
    placed = [(b, plan.offsets[b.root]) for b in plan.buffers]
    for i, (a, offset_a) in enumerate(placed):
        assert offset_a + a.size <= plan.arena_bytes
        for b, offset_b in placed[i + 1 :]:
            if a.first <= b.last and b.first <= a.last:
                assert offset_a + a.size <= offset_b or offset_b + b.size <= offset_a


def test_float_model_is_refused(tmp_path: Path) -> None:
    from edgeops._tf import load_tf

    tf, keras = load_tf()
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    float_tflite = converter.convert()
    with pytest.raises(FloatModelError, match="full-integer int8 model is required"):
        generate(float_tflite, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", CONFORMANCE_TARGETS)
@pytest.mark.parametrize("name", sorted(FLOAT_IO_MODELS))
def test_float_io_model_is_bit_exact_with_tflm(
    float_io_models: dict[str, bytes], name: str, target: str, tmp_path: Path
) -> None:
    """A model with a float32 input (QUANTIZE first) and/or output (DEQUANTIZE last): the
    library's float conversions around the int8 invoke give the same float32 bits as TFLM
    running the whole model, on 128 inputs full of exact .5 ties and values past both ends
    of the int8 range."""
    if target != "host":
        require_cortex_m_toolchain()
    tflite = float_io_models[name]
    edges = FLOAT_IO_MODELS[name][1]
    library = generate_sources(tflite)
    assert (library.float_input, library.float_output) == (
        edges.get("float_input", False),
        edges.get("float_output", False),
    )
    assert "DEQUANTIZE" not in library.ops and library.ops[0] != "QUANTIZE"
    if library.float_input:
        scale, zero_point = library.input_quantization
        inputs: np.ndarray = random_float_inputs(
            library.input_size, SAMPLES, scale, zero_point, seed=7
        )
        quotients = (inputs / np.float32(scale)).astype(np.float64)
        assert np.count_nonzero(np.abs(quotients - np.trunc(quotients)) == 0.5) > inputs.size // 4
        steps = np.round(quotients) + zero_point
        assert np.count_nonzero(steps > 127) > 0 and np.count_nonzero(steps < -128) > 0
    else:
        inputs = random_inputs(library.input_size, SAMPLES, seed=7)
    report = check_conformance(tflite, inputs, workdir=tmp_path, target=target)
    assert report.samples == SAMPLES and report.target == target
    assert (report.float_input, report.float_output) == (library.float_input, library.float_output)
    assert report.bit_exact, report.to_dict()


QUANTIZE_MAIN_C = r"""
#include <stdio.h>
#include "edgeops_model.h"

int main(void) {
    static float input[EDGEOPS_MODEL_INPUT_SIZE];
    static int8_t output[EDGEOPS_MODEL_INPUT_SIZE];
    while (fread(input, sizeof input[0], EDGEOPS_MODEL_INPUT_SIZE, stdin) ==
           EDGEOPS_MODEL_INPUT_SIZE) {
        edgeops_model_quantize_input(input, output);
        fwrite(output, 1, sizeof output, stdout);
    }
    return 0;
}
"""


def test_quantize_input_rounds_half_away_from_zero_and_clamps(
    float_io_models: dict[str, bytes], tmp_path: Path
) -> None:
    """``edgeops_model_quantize_input`` alone against TFLM's formula written in numpy:
    round(x / scale) in float32, ties away from zero (numpy's own rounding is half to even,
    so the tie cases fail if the C rounds like numpy), plus the zero point, clamped."""
    import subprocess

    from edgeops.firmware.conformance import HOST_CFLAGS

    library = generate(float_io_models["float-in-float-out"], tmp_path / "lib")
    scale, zero_point = library.input_quantization
    s = np.float32(scale)
    ties = np.arange(-200.5, 200.0, 1.0)  # every tie from -200.5 to 199.5
    exact = (ties * float(s)).astype(np.float32)
    exact = exact[(exact / s).astype(np.float64) == ties]
    assert exact.size > 300 and (exact < 0).sum() > 100
    extremes = np.array([1e30, -1e30, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32)
    values = np.concatenate(
        [exact, extremes, random_float_inputs(64, 8, scale, zero_point).ravel()]
    )
    values = np.resize(values, -(-values.size // library.input_size) * library.input_size)
    quotient = (values / s).astype(np.float64)
    with np.errstate(invalid="ignore"):
        rounded = np.sign(quotient) * np.floor(np.abs(quotient) + 0.5)
    expected = np.clip(rounded + zero_point, -128, 127).astype(np.int8)
    main = tmp_path / "quantize_main.c"
    main.write_text(QUANTIZE_MAIN_C)
    executable = tmp_path / "quantize"
    lib = tmp_path / "lib"
    subprocess.run(
        ["gcc", *HOST_CFLAGS, "-I", str(lib), str(lib / "edgeops_model.c"),
         str(lib / "edgeops_kernels.c"), str(main), "-o", str(executable)],
        check=True, capture_output=True,
    )  # fmt: skip
    ran = subprocess.run(
        [str(executable)], input=values.astype("<f4").tobytes(), capture_output=True, check=True
    )
    ours = np.frombuffer(ran.stdout, dtype=np.int8)
    np.testing.assert_array_equal(ours, expected)
    assert np.count_nonzero(ours != np.clip(np.round(quotient) + zero_point, -128, 127)) > 50


def test_float_io_library_adds_the_conversions_only_for_float_edges(
    float_io_models: dict[str, bytes], random_models: dict[str, bytes], tmp_path: Path
) -> None:
    float_io = generate(float_io_models["float-in-float-out"], tmp_path / "float")
    header = (tmp_path / "float" / "edgeops_model.h").read_text()
    assert "#define EDGEOPS_MODEL_FLOAT_INPUT 1" in header
    assert "#define EDGEOPS_MODEL_FLOAT_OUTPUT 1" in header
    assert "void edgeops_model_quantize_input(const float *input, int8_t *output);" in header
    assert "void edgeops_model_dequantize_output(const int8_t *input, float *output);" in header
    assert "int edgeops_model_invoke(const int8_t *input, int8_t *output);" in header
    manifest = json.loads((tmp_path / "float" / "edgeops_model.json").read_text())
    assert manifest["float_input"] is True and manifest["float_output"] is True
    assert float_io.summary()["float_input"] is True
    # the same Keras model converted int8 in, int8 out: the same invoke, no float symbols
    int8 = generate(random_models["elementwise"], tmp_path / "int8")
    assert int8.ops == float_io.ops
    int8_header = (tmp_path / "int8" / "edgeops_model.h").read_text()
    int8_source = (tmp_path / "int8" / "edgeops_model.c").read_text()
    assert "FLOAT" not in int8_header and "float" not in int8_header + int8_source
    manifest = json.loads((tmp_path / "int8" / "edgeops_model.json").read_text())
    assert manifest["float_input"] is False and manifest["float_output"] is False
    only_out = generate_sources(float_io_models["float-out"])
    assert "EDGEOPS_MODEL_FLOAT_INPUT" not in only_out.files["edgeops_model.h"]
    assert "quantize_input" not in only_out.files["edgeops_model.c"]
    assert "EDGEOPS_MODEL_FLOAT_OUTPUT" in only_out.files["edgeops_model.h"]
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite",
        str(_write(tmp_path, float_io_models["float-in"])), "--out", str(tmp_path / "cli"),
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["float_input"], document["float_output"]) == (True, False)


def test_unsupported_operator_is_named_at_generation_time(tmp_path: Path) -> None:
    from edgeops._tf import load_tf

    _, keras = load_tf()
    keras.utils.set_random_seed(6)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2DTranspose(2, 3, strides=2)(inputs)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    tflite = _convert(model, (6, 6, 2))
    with pytest.raises(UnsupportedModelError, match="TRANSPOSE_CONV") as caught:
        generate_sources(tflite)
    assert "supported:" in str(caught.value)
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(_write(tmp_path, tflite)),
        "--target", "host", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "unsupported operator", "TRANSPOSE_CONV")
    assert not (tmp_path / "out").exists()


def test_garbage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FirmwareError, match=r"not a \.tflite"):
        generate_sources(b"definitely not a flatbuffer")
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(_write(tmp_path, b"\0" * 64)),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "not a .tflite")


def _write(directory: Path, data: bytes) -> Path:
    path = directory / "model.tflite"
    path.write_bytes(data)
    return path


def test_cli_generates_from_a_file_and_from_the_registry(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    model_id, tflite = zoo["mlp"]
    result = run_cli(
        "edgeops", "firmware", "generate", "--tflite", str(_write(tmp_path, tflite)),
        "--target", "host", "--out", str(tmp_path / "from-file"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "arena:" in result.stdout and "FULLY_CONNECTED" in result.stdout
    env = {"EDGEOPS_DATA_DIR": str(zoo["data_dir"])}
    result = run_cli(
        "edgeops", "firmware", "generate", "--model", model_id, "--out",
        str(tmp_path / "from-registry"), "--json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ops"][-1] == "SOFTMAX"
    assert (tmp_path / "from-registry" / "edgeops_model.c").read_text() == (
        tmp_path / "from-file" / "edgeops_model.c"
    ).read_text()
    result = run_cli(
        "edgeops", "firmware", "generate", "--model", zoo["keras_mlp"], "--out",
        str(tmp_path / "keras"), env=env,
    )  # fmt: skip
    assert_one_line_error(result, "keras model", "int8")
    assert not (tmp_path / "keras").exists()


def test_input_renamed_to_output_is_copied(tmp_path: Path) -> None:
    """A model that only reshapes: its input and output are the caller's two buffers, so
    the renaming becomes a copy, and the arena is empty."""
    from edgeops._tf import load_tf

    _, keras = load_tf()
    inputs = keras.Input((2, 3))
    tflite = _convert(keras.Model(inputs, keras.layers.Reshape((6,))(inputs)), (2, 3))
    library = generate_sources(tflite)
    assert library.ops == ["RESHAPE"]
    assert library.arena_bytes == 0
    assert "eo_copy(6, input, output);" in library.files["edgeops_model.c"]
    _assert_bit_exact(tflite, tmp_path, empty_arena=True)


@pytest.mark.parametrize(
    ("real", "expected"),
    [
        (0.5, (1 << 30, 0)),
        (1.0, (1 << 30, 1)),
        (0.75, (3 << 29, 0)),
        (2.0**-40, (0, 0)),
        (0.0, (0, 0)),
        (1.0 - 2.0**-40, (1 << 30, 1)),  # the significand rounds up to 2^31: renormalized
    ],
)
def test_quantize_multiplier_matches_tflite(real: float, expected: tuple[int, int]) -> None:
    from edgeops.firmware.quant import quantize_multiplier

    assert quantize_multiplier(real) == expected
