"""Runtimes: a bundle on LiteRT, ONNX Runtime and a (fake) board over a serial line computes
what the hub computed for the same model, and bad samples are refused without harm."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import threading
import tty
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.runtime import (
    BundleError,
    FrameKind,
    InferenceError,
    InputError,
    LiteRTRuntime,
    ModelBundle,
    RuntimeLoadError,
    SerialFrameError,
    SerialRuntime,
    TensorCodec,
    open_runtime,
)
from device_agent.runtime._serial import encode_frame, read_frame

ROOT = Path(__file__).resolve().parents[1]


# -- bundles ----------------------------------------------------------------------------------


def test_bundle_holds_card_rule_and_reference(int8_model_dir: Path) -> None:
    bundle = ModelBundle.load(int8_model_dir)
    assert bundle.format == "tflite" and bundle.model_path == int8_model_dir / "model.tflite"
    assert bundle.model_id == bundle.card.model_id != ""
    assert bundle.rule.input_shape == (64,) and bundle.rule.model_input_shape == (8, 8, 1)
    assert bundle.reference is not None and bundle.reference.num_features >= 1
    assert bundle.card.quantization.mode == "int8"


def _copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_card(directory: Path, edit: Callable[[dict[str, object]], None]) -> None:
    card = json.loads((directory / "card.json").read_text())
    edit(card)
    (directory / "card.json").write_text(json.dumps(card))


BAD_BUNDLES: list[tuple[str, Callable[[Path], object], str]] = [
    ("no directory", lambda d: shutil.rmtree(d), "not a directory"),
    ("no card", lambda d: (d / "card.json").unlink(), "card.json is missing"),
    ("card not JSON", lambda d: (d / "card.json").write_text("{"), "not valid JSON"),
    ("no model", lambda d: (d / "model.tflite").unlink(), "no model file"),
    ("empty model", lambda d: (d / "model.tflite").write_bytes(b""), "empty"),
    (
        "two models",
        lambda d: (d / "model.onnx").write_bytes(b"x"),
        "exactly one model file",
    ),
    (
        "runtime mismatch",
        lambda d: _edit_card(d, lambda c: c.update(runtime="onnx")),
        "does not run model.tflite",
    ),
    (
        "bad rule",
        lambda d: _edit_card(d, lambda c: c.update(preprocessing={"input_shape": [64]})),
        "preprocessing",
    ),
    (
        "rule and tensor disagree",
        lambda d: _edit_card(
            d,
            lambda c: c.update(
                preprocessing={"input_shape": [63], "offset": [0.0], "scale": [1.0]}
            ),
        ),
        "the input tensor is",
    ),
    (
        "bad reference",
        lambda d: _edit_card(d, lambda c: c.update(reference={"feature_edges": [[0.0]]})),
        "reference",
    ),
]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [pytest.param(fault, expected, id=name) for name, fault, expected in BAD_BUNDLES],
)
def test_bad_bundle_is_refused_naming_the_path(
    int8_model_dir: Path, tmp_path: Path, fault: Callable[[Path], object], expected: str
) -> None:
    bundle = _copy_bundle(int8_model_dir, tmp_path / "bundle")
    fault(bundle)
    with pytest.raises(BundleError, match=expected) as caught:
        ModelBundle.load(bundle)
    assert str(bundle) in str(caught.value)


def test_a_parsed_card_spares_no_check_of_the_directory(
    int8_model_dir: Path, tmp_path: Path
) -> None:
    """Cards are parsed once per process for the same bytes; what the directory holds is
    checked at every load, and a card that does not parse is refused every time."""
    bundle = _copy_bundle(int8_model_dir, tmp_path / "bundle")
    first, again = ModelBundle.load(bundle), ModelBundle.load(bundle)
    assert again.card is first.card  # the same bytes: parsed once
    (bundle / "model.tflite").unlink()
    with pytest.raises(BundleError, match="no model file"):
        ModelBundle.load(bundle)
    broken = _copy_bundle(int8_model_dir, tmp_path / "broken")
    (broken / "card.json").write_bytes((int8_model_dir / "card.json").read_bytes()[:-40])
    for _ in range(2):
        with pytest.raises(BundleError, match="not valid JSON"):
            ModelBundle.load(broken)


def test_garbage_model_file_is_a_load_error(int8_model_dir: Path, tmp_path: Path) -> None:
    bundle = _copy_bundle(int8_model_dir, tmp_path / "bundle")
    (bundle / "model.tflite").write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(RuntimeLoadError, match="LiteRT cannot load"):
        open_runtime(ModelBundle.load(bundle))


def test_card_quantization_must_match_the_model(int8_model_dir: Path, tmp_path: Path) -> None:
    bundle = _copy_bundle(int8_model_dir, tmp_path / "bundle")

    def wrong_scale(card: dict[str, object]) -> None:
        quantization = card["quantization"]
        assert isinstance(quantization, dict)
        quantization["input"]["scale"] *= 2

    _edit_card(bundle, wrong_scale)
    with pytest.raises(RuntimeLoadError, match="the card says the input is int8"):
        open_runtime(ModelBundle.load(bundle))


# -- tensor coding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "zero_point"), [("int8", -128), ("int8", 5), ("uint8", 0), ("int16", -3)]
)
def test_codec_is_the_affine_formula_with_clipping(dtype: str, zero_point: int) -> None:
    info = np.iinfo(dtype)
    codec = TensorCodec((1, 500), dtype, 0.0125, zero_point)
    x = np.random.default_rng(0).normal(0.0, 1000.0, (1, 500)).astype(np.float32)
    expected = np.clip(np.round(x.astype(np.float64) / 0.0125) + zero_point, info.min, info.max)
    np.testing.assert_array_equal(codec.encode(x), expected.astype(dtype))
    q = np.arange(info.min, info.max + 1, max(1, (info.max - info.min) // 999)).astype(dtype)
    decoded = ((q.astype(np.float64) - zero_point) * 0.0125).astype(np.float32)
    np.testing.assert_array_equal(codec.decode(q[None]), decoded)


# -- LiteRT -----------------------------------------------------------------------------------


def test_int8_runtime_replays_the_cards_test_vectors(
    int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    """The card's vectors were measured by the hub on the first test samples: the agent's
    path from the raw sample reproduces the features, the int8 input and the output."""
    x, _ = digits_samples
    with open_runtime(ModelBundle.load(int8_model_dir)) as runtime:
        assert runtime.name == "litert" and runtime.num_classes == 10
        assert isinstance(runtime, LiteRTRuntime)
        quantization = runtime.bundle.card.quantization.output
        assert quantization is not None
        vectors = runtime.bundle.card.test_vectors
        assert vectors
        for index, vector in enumerate(vectors):
            prediction = runtime.infer(x[index])
            np.testing.assert_array_equal(
                prediction.model_inputs, np.asarray(vector["features"], np.float32)[0]
            )
            expected = (
                np.asarray(vector["expected_output"], np.float64) - quantization.zero_point
            ) * quantization.scale
            np.testing.assert_array_equal(
                prediction.probabilities, expected.astype(np.float32).reshape(-1)
            )
            assert prediction.probabilities.dtype == np.float32
            assert prediction.label == int(np.argmax(expected))
            assert prediction.confidence == pytest.approx(float(expected.max()))
            assert prediction.latency_s > 0


def test_int8_runtime_agrees_with_the_hubs_evaluation(
    int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    from edgeops.evaluate import load_runner

    bundle = ModelBundle.load(int8_model_dir)
    x, y = digits_samples
    expected = load_runner(bundle.model_path.read_bytes(), "tflite").run(bundle.rule.apply(x))
    with open_runtime(bundle) as runtime:
        got = np.stack([runtime.infer(sample).probabilities for sample in x])
    np.testing.assert_array_equal(got, expected)
    assert (got.argmax(axis=1) == y).mean() > 0.5


def test_float_tflite_and_onnx_agree(
    float_model_dir: Path, onnx_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    x = digits_samples[0][:64]
    with (
        open_runtime(ModelBundle.load(float_model_dir)) as litert,
        open_runtime(ModelBundle.load(onnx_model_dir)) as onnx,
    ):
        assert (litert.name, onnx.name) == ("litert", "onnxruntime")
        assert litert.num_classes == onnx.num_classes == 10
        for sample in x:
            a, b = litert.infer(sample), onnx.infer(sample)
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
            assert a.probabilities.sum() == pytest.approx(1.0, abs=1e-4)
            np.testing.assert_array_equal(a.model_inputs, b.model_inputs)


BAD_SAMPLES: list[tuple[str, object, str]] = [
    ("too short", np.zeros(63, np.float32), r"shape \[64\], got shape \[63\]"),
    ("batch", np.zeros((1, 64), np.float32), r"got shape \[1, 64\]"),
    ("image", np.zeros((8, 8, 1), np.float32), r"got shape \[8, 8, 1\]"),
    ("scalar", 3.0, r"got shape \[\]"),
    ("text", np.array(["1"] * 64), "must hold numbers, got dtype <U1"),
    ("objects", np.array([None] * 64), "dtype object"),
    ("complex", np.zeros(64, np.complex64), "dtype complex64"),
    ("ragged", [[1.0], [1.0, 2.0]], "not an array of numbers"),
    ("nan", np.r_[np.zeros(63), np.nan], r"1 NaN or infinite"),
    ("inf", np.full(64, np.inf, np.float32), r"64 NaN or infinite"),
]


@pytest.mark.parametrize(
    ("sample", "message"),
    [pytest.param(sample, message, id=name) for name, sample, message in BAD_SAMPLES],
)
def test_bad_sample_is_an_input_error_and_the_runtime_carries_on(
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    sample: object,
    message: str,
) -> None:
    with open_runtime(ModelBundle.load(int8_model_dir)) as runtime:
        good = runtime.infer(digits_samples[0][0])
        with pytest.raises(InputError, match=message):
            runtime.infer(sample)  # type: ignore[arg-type]
        again = runtime.infer(digits_samples[0][0])
    np.testing.assert_array_equal(good.probabilities, again.probabilities)


def test_lists_and_integer_samples_are_numbers(
    int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    sample = digits_samples[0][3]
    with open_runtime(ModelBundle.load(int8_model_dir)) as runtime:
        reference = runtime.infer(sample).probabilities
        from_list = runtime.infer(sample.tolist())
        from_ints = runtime.infer(sample.astype(np.int16))
    np.testing.assert_array_equal(from_list.probabilities, reference)
    np.testing.assert_array_equal(from_ints.probabilities, reference)


def test_closed_runtime_refuses_work(int8_model_dir: Path) -> None:
    runtime = open_runtime(ModelBundle.load(int8_model_dir))
    runtime.close()
    runtime.close()
    with pytest.raises(InferenceError, match="closed"):
        runtime.infer(np.zeros(64, np.float32))


def test_threads_share_one_runtime(
    int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    x = digits_samples[0][:40]
    with open_runtime(ModelBundle.load(int8_model_dir), num_threads=1) as runtime:
        expected = [runtime.infer(s).label for s in x]
        results: dict[int, list[int]] = {}

        def work(worker: int) -> None:
            results[worker] = [runtime.infer(s).label for s in x]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert all(results[i] == expected for i in range(4))


def test_tflite_runtime_is_the_fallback_when_ai_edge_litert_is_missing(
    int8_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tflite_runtime has the same Interpreter API; a stand-in module serves LiteRT's class
    under that name, since both cannot be installed side by side here."""
    from ai_edge_litert.interpreter import Interpreter

    package = types.ModuleType("tflite_runtime")
    module = types.ModuleType("tflite_runtime.interpreter")
    module.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", module)
    with open_runtime(ModelBundle.load(int8_model_dir)) as runtime:
        assert runtime.name == "tflite_runtime"
        assert runtime.infer(np.zeros(64, np.float32)).probabilities.shape == (10,)


def test_no_interpreter_at_all_is_a_clear_error(
    int8_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeLoadError, match="install ai-edge-litert"):
        open_runtime(ModelBundle.load(int8_model_dir))


def test_missing_onnxruntime_is_a_clear_error(
    onnx_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeLoadError, match="pip install onnxruntime"):
        open_runtime(ModelBundle.load(onnx_model_dir))


@pytest.mark.parametrize(
    ("prefer", "message"),
    [
        ("onnxruntime", "cannot run the .tflite model"),
        ("serial", "needs its port"),
        ("tensorrt", "unknown runtime 'tensorrt'"),
    ],
)
def test_preferred_runtime_must_fit(int8_model_dir: Path, prefer: str, message: str) -> None:
    with pytest.raises(RuntimeLoadError, match=message):
        open_runtime(ModelBundle.load(int8_model_dir), prefer=prefer)


def test_runtime_package_does_not_import_the_hub() -> None:
    probe = (
        "import sys, device_agent.runtime\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('edgeops', 'tensorflow', 'onnxruntime', 'fastapi', 'pandas', 'typer', 'sqlmodel')]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == ""


# -- serial -----------------------------------------------------------------------------------


class FakeBoard:
    """A board on the far end of a pseudo-terminal: answers request frames by running the
    same .tflite on LiteRT (as TFLite Micro would on the MCU), with a made-up cycle count.

    ``mode`` injects faults: "ok", "error" (an error frame), "silent" (no answer),
    "corrupt" (a result with a bad CRC), "noisy" (boot text and a stale frame first).
    """

    def __init__(self, model_path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(model_path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.mode = "ok"
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.port = os.fdopen(slave, "r+b", buffering=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        master = os.fdopen(self.master, "r+b", buffering=0)
        while not self._stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                continue
            try:
                frame = read_frame(master, timeout_s=2.0)
            except (SerialFrameError, OSError):
                return
            master.write(self._answer(frame.seq, frame.payload))

    def _answer(self, seq: int, payload: bytes) -> bytes:
        if self.mode == "silent":
            return b""
        if self.mode == "error":
            return encode_frame(FrameKind.ERROR, seq, b"arena too small")
        x = np.frombuffer(payload, dtype=self.input["dtype"]).reshape(self.input["shape"])
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"]).tobytes()
        frame = encode_frame(FrameKind.RESULT, seq, (123456).to_bytes(4, "little") + out)
        if self.mode == "corrupt":
            return frame[:-1] + bytes([frame[-1] ^ 0xFF])
        if self.mode == "noisy":
            stale = encode_frame(FrameKind.RESULT, seq - 1, b"\0" * 14)
            return b"boot: TFLM ready\r\n" + stale + frame
        return frame

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.port.close()


@pytest.fixture
def board(int8_model_dir: Path) -> Iterator[FakeBoard]:
    fake = FakeBoard(int8_model_dir / "model.tflite")
    try:
        yield fake
    finally:
        fake.close()


def test_serial_runtime_matches_litert(
    board: FakeBoard, int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    bundle = ModelBundle.load(int8_model_dir)
    serial = SerialRuntime(bundle, board.port, timeout_s=5.0)
    assert serial.name == "serial" and serial.num_classes == 10
    with open_runtime(bundle) as local:
        for sample in digits_samples[0][:20]:
            remote = serial.infer(sample)
            np.testing.assert_array_equal(remote.probabilities, local.infer(sample).probabilities)
            assert serial.last_cycles == 123456
    serial.close()


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("error", InferenceError, "the device reported an error: arena too small"),
        ("silent", SerialFrameError, "did not answer in time"),
        ("corrupt", SerialFrameError, "CRC"),
    ],
)
def test_serial_faults_are_errors_and_the_next_sample_works(
    board: FakeBoard,
    int8_model_dir: Path,
    digits_samples: tuple[np.ndarray, np.ndarray],
    mode: str,
    error: type[Exception],
    message: str,
) -> None:
    serial = SerialRuntime(ModelBundle.load(int8_model_dir), board.port, timeout_s=0.5)
    board.mode = mode
    with pytest.raises(error, match=message):
        serial.infer(digits_samples[0][0])
    board.mode = "ok"
    assert serial.infer(digits_samples[0][0]).probabilities.shape == (10,)


def test_serial_skips_boot_text_and_stale_answers(
    board: FakeBoard, int8_model_dir: Path, digits_samples: tuple[np.ndarray, np.ndarray]
) -> None:
    bundle = ModelBundle.load(int8_model_dir)
    serial = SerialRuntime(bundle, board.port, timeout_s=5.0)
    board.mode = "noisy"
    with open_runtime(bundle) as local:
        sample = digits_samples[0][5]
        np.testing.assert_array_equal(
            serial.infer(sample).probabilities, local.infer(sample).probabilities
        )


def test_serial_input_errors_never_reach_the_board(board: FakeBoard, int8_model_dir: Path) -> None:
    serial = SerialRuntime(ModelBundle.load(int8_model_dir), board.port, timeout_s=0.5)
    board.mode = "silent"  # a request reaching it would time out instead
    with pytest.raises(InputError, match="NaN"):
        serial.infer(np.full(64, np.nan))
