"""Steps that measure boards: ``conformance``, ``latency``, ``footprint``, ``soak``.

Microcontroller boards are compared with TensorFlow Lite Micro (the ``tflite_micro``
interpreter, :func:`edgeops.evaluate.tflm.tflm_run`) on the .tflite their image was
generated from, byte for byte; Linux boards with the device agent's own runtime
(:func:`device_agent.runtime.open_runtime`) on the bundle of the release they run, run on
the rig, float32 bit for bit.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from hil.plan import Step
from hil.steps.context import BoardModel, Outcome, Release, RunContext, StepError

__all__ = [
    "build_image",
    "conformance",
    "footprint",
    "footprint_of",
    "latency",
    "soak",
    "tflite_input",
]

_TYPES = {9: "int8", 0: "float32", 3: "uint8", 7: "int16"}


def tflite_input(tflite: bytes) -> tuple[tuple[int, ...], str]:
    """The shape (without the batch dimension) and dtype of a .tflite's first input."""
    from hil.steps.fleet import _schema

    schema = _schema()
    model = schema.Model.GetRootAsModel(bytearray(tflite), 0)
    graph = model.Subgraphs(0)
    tensor = graph.Tensors(graph.Inputs(0))
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
    dtype = _TYPES.get(tensor.Type())
    if dtype is None:
        raise StepError(f"the model's input has tensor type {tensor.Type()}, not one fed here")
    return shape[1:] if len(shape) > 1 else shape, dtype


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def build_image(ctx: RunContext, tflite: bytes, target: str) -> tuple[Path, Path]:
    """The generated library and the serial-harness ELF of ``tflite`` for ``target``
    (built once per run)."""
    key = ("image", _digest(tflite), target)
    if key in ctx.cache:
        cached: tuple[Path, Path] = ctx.cache[key]
        return cached
    from edgeops.firmware.cortexm import build_firmware
    from edgeops.firmware.emit import generate

    root = ctx.workdir / "firmware" / f"{key[1]}-{target}"
    library = root / "lib"
    if not library.exists():
        generate(tflite, library, target=target)
    elf = build_firmware(library, root / "build", target, harness="serial")
    ctx.cache[key] = (library, elf)
    return library, elf


def footprint_of(ctx: RunContext, tflite: bytes, target: str) -> dict[str, Any]:
    """The model's own flash and RAM on ``target`` (:func:`measure_footprint`), once per run."""
    key = ("footprint", _digest(tflite), target)
    if key not in ctx.cache:
        from edgeops.firmware.cortexm import measure_footprint
        from edgeops.firmware.emit import generate

        root = ctx.workdir / "firmware" / f"{key[1]}-{target}"
        library = root / "lib"
        if not library.exists():
            generate(tflite, library, target=target)
        ctx.cache[key] = measure_footprint(library, target, build_dir=root / "size").to_dict()
    result: dict[str, Any] = ctx.cache[key]
    return result


def _mcu_inputs(ctx: RunContext, model: BoardModel, count: int) -> np.ndarray:
    shape = (count, *model.input_shape)
    if model.input_dtype == "float32":
        return ctx.np_rng.standard_normal(shape).astype(np.float32)
    info = np.iinfo(np.dtype(model.input_dtype))
    return ctx.np_rng.integers(info.min, info.max + 1, size=shape, dtype=np.int64).astype(
        model.input_dtype
    )


def _bundle(ctx: RunContext, rel: Release) -> Any:
    """The device-side bundle of a release, loaded (once per run)."""
    key = ("bundle", rel.target_path)
    if key not in ctx.cache:
        from device_agent.runtime import ModelBundle

        directory = ctx.hub.bundle(rel.target_path, ctx.workdir / "bundles" / rel.id)
        ctx.cache[key] = ModelBundle.load(directory)
    return ctx.cache[key]


def _linux_inputs(ctx: RunContext, rel: Release, count: int) -> np.ndarray:
    shape = tuple(_bundle(ctx, rel).rule.input_shape)
    # the digits model's raw features are pixel intensities 0..16
    return ctx.np_rng.uniform(0.0, 16.0, size=(count, *shape)).astype(np.float32)


def _agent_reference(ctx: RunContext, rel: Release, inputs: np.ndarray) -> list[np.ndarray]:
    """What a device agent running ``rel`` answers to each raw sample of ``inputs``.

    A .tflite or .onnx release: the agent's own runtime (:func:`open_runtime`) on the
    release's bundle, in this process. A firmware release served by a gateway's board: the
    agent's path with TensorFlow Lite Micro in the board's place: the bundle's feature
    rule, the card's input quantization, TFLM on the .tflite the firmware was generated
    from, the card's output dequantization (one sigmoid output reported as two classes).
    """
    from device_agent.runtime import TensorCodec, check_sample, open_runtime

    bundle = _bundle(ctx, rel)
    if bundle.format != "firmware":
        key = ("runtime", rel.target_path)
        if key not in ctx.cache:
            ctx.cache[key] = open_runtime(bundle)
        runtime = ctx.cache[key]
        return [np.asarray(runtime.infer(x).probabilities) for x in inputs]
    if rel.tflite is None:
        raise StepError(f"release {rel.id}: no .tflite known for its firmware")
    card, rule = bundle.card, bundle.rule
    q_in, q_out = card.quantization.input, card.quantization.output
    out_dims = tuple(int(d) for d in card.output_spec.shape[1:] if d is not None)
    encode = TensorCodec(
        (1, *rule.model_input_shape),
        card.input_spec.dtype,
        q_in.scale if q_in is not None else 0.0,
        q_in.zero_point if q_in is not None else 0,
    )
    decode = TensorCodec(
        (1, *out_dims),
        card.output_spec.dtype,
        q_out.scale if q_out is not None else 0.0,
        q_out.zero_point if q_out is not None else 0,
    )
    # encode() answers in a buffer of its own it reuses: copy each sample out
    quantized = np.stack(
        [
            np.array(encode.encode(rule.apply(check_sample(x, rule.input_shape)[None])))
            for x in inputs
        ]
    )
    raw_outputs = _tflm_reference(rel.tflite, quantized)
    answers = []
    for row in raw_outputs:
        out = np.asarray(decode.decode(row.reshape(1, *out_dims))).reshape(-1)
        if out.size == 1:
            out = np.array([1.0 - out[0], out[0]], dtype=np.float32)
        answers.append(out)
    return answers


def _gateway_of(ctx: RunContext, name: str) -> str | None:
    """The Linux board a microcontroller board is reached through, if it has a gateway."""
    for spec in ctx.plan.boards:
        if spec.gateway_for == name:
            return spec.name
    return None


def _loaded(ctx: RunContext, name: str) -> BoardModel:
    model = ctx.loaded.get(name)
    if model is None:
        raise StepError(f"board {name}: nothing was deployed to it in this run")
    return model


def _compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, int]:
    a = np.ascontiguousarray(np.asarray(ours).reshape(-1))
    b = np.ascontiguousarray(np.asarray(theirs, dtype=a.dtype).reshape(-1))
    if a.shape != b.shape:
        return False, -1
    same = a.tobytes() == b.tobytes()
    if a.dtype.kind == "f":
        diff = int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32)).max())
    else:
        diff = int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()) if a.size else 0
    return same, diff


def _show(values: Any) -> str:
    flat = np.asarray(values).reshape(-1)
    shown = ", ".join(f"{v:.6g}" if flat.dtype.kind == "f" else str(v) for v in flat[:6])
    return f"[{shown}{', ...' if flat.size > 6 else ''}]"


class _Tally:
    """Per-step counters shared by the measuring steps."""

    def __init__(self) -> None:
        self.samples = 0
        self.mismatched = 0
        self.errors = 0
        self.first_error: str | None = None
        self.first_mismatch: str | None = None
        self.latencies_ms: list[float] = []
        self.cycles: list[int] = []

    def error(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{where}: {exc}"

    def observed(self, outcome: Outcome, *, compared: bool) -> None:
        outcome.observed.update(
            latencies_ms=self.latencies_ms,
            errors=self.errors,
            samples=self.samples,
            first_error=self.first_error,
        )
        outcome.metrics.update(samples=self.samples, errors=self.errors)
        if compared:
            outcome.observed["bit_exact"] = (
                self.samples > 0 and self.mismatched == 0 and self.errors == 0
            )
            outcome.metrics["mismatched_samples"] = self.mismatched
            if self.first_mismatch:
                outcome.metrics["first_mismatch"] = self.first_mismatch
            if self.mismatched or self.errors:
                outcome.observed["mismatch"] = (
                    f"{self.mismatched} of {self.samples} samples differ"
                    + (f"; {self.first_mismatch}" if self.first_mismatch else "")
                    + (f", {self.errors} errors (first: {self.first_error})" if self.errors else "")
                )
        if self.latencies_ms:
            lat = np.asarray(self.latencies_ms)
            outcome.metrics.update(
                latency_mean_ms=round(float(lat.mean()), 3),
                latency_p95_ms=round(float(np.percentile(lat, 95)), 3),
                latency_max_ms=round(float(lat.max()), 3),
            )
            outcome.series["latency_ms"] = [round(v, 4) for v in self.latencies_ms]
        if self.cycles:
            outcome.metrics["cycles_mean"] = int(np.mean(self.cycles))
        if self.first_error:
            outcome.metrics["first_error"] = self.first_error


def _zoo_conformance(ctx: RunContext, step: Step) -> Outcome:
    from hil.models import zoo_models

    p = step.params
    outcome = Outcome()
    tally = _Tally()
    models = zoo_models(ctx.seed, p["archs"])
    for target in p["targets"]:
        name = next(s.name for s in ctx.plan.boards if s.kind == "qemu" and s.target == target)
        board = ctx.board(name)
        for model in models:
            row: dict[str, Any] = {"model": model.name, "target": target, "board": name}
            count = min(p["vectors"], len(model.inputs))
            mismatched, worst, latencies, cycles = 0, 0, [], []
            try:
                _, elf = build_image(ctx, model.tflite, target)
                board.deploy(elf)
                for i in range(count):
                    out = board.infer(model.inputs[i])
                    same, diff = _compare(out.values, model.reference[i])
                    mismatched += not same
                    worst = max(worst, diff) if diff >= 0 else worst
                    latencies.append(out.latency_s * 1000.0)
                    if out.cycles is not None:
                        cycles.append(int(out.cycles))
            except Exception as exc:  # noqa: BLE001 - counted as the step's errors
                tally.error(f"{model.name} on {target}", exc)
                row["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            tally.samples += len(latencies)
            tally.mismatched += mismatched
            tally.latencies_ms.extend(latencies)
            tally.cycles.extend(cycles)
            row.update(
                samples=len(latencies),
                mismatched=mismatched,
                max_abs_diff=worst,
                bit_exact=bool(latencies) and mismatched == 0 and "error" not in row,
                latency_mean_ms=round(float(np.mean(latencies)), 3) if latencies else None,
                cycles=int(np.mean(cycles)) if cycles else None,
            )
            outcome.rows.append(row)
            ctx.progress(
                f"  {model.name} on {target}: "
                + (row.get("error") or f"{len(latencies)} samples, {mismatched} differ")
            )
    tally.observed(outcome, compared=True)
    outcome.metrics["models"] = len(models)
    outcome.metrics["targets"] = len(p["targets"])
    outcome.message = (
        f"{len(models)} models x {len(p['targets'])} targets, {tally.samples} samples, "
        f"{tally.mismatched} differ"
    )
    return outcome


def conformance(ctx: RunContext, step: Step) -> Outcome:
    """Boards' outputs against the reference (see the module docstring)."""
    p = step.params
    if p["models"] == "zoo":
        return _zoo_conformance(ctx, step)
    rel = ctx.release(p["release"])
    outcome = Outcome()
    tally = _Tally()
    for name in p["boards"]:
        spec = ctx.plan.board(name)
        via = _gateway_of(ctx, name)
        mismatched = samples = 0
        try:
            running = ctx.loaded.get(name)
            if running is not None and running.release is not None and running.release.id != rel.id:
                # a board running another release would differ from this one's reference
                # for a reason that is no conformance finding
                raise StepError(
                    f"board {name} runs release {running.release.id} (deployed in this run), "
                    f"not {rel.id}"
                )
            if spec.kind == "linux" or via is not None:
                if via is None and rel.firmware is not None:
                    raise StepError(f"board {name} runs no firmware; release {rel.id} is one")
                board = ctx.board(via or name)
                inputs = _linux_inputs(ctx, rel, p["vectors"])
                reference = _agent_reference(ctx, rel, inputs)
            else:
                if rel.tflite is None:
                    raise StepError(f"release {rel.id} is no firmware release")
                board = ctx.board(name)
                shape, dtype = tflite_input(rel.tflite)
                model = BoardModel(
                    release=rel, tflite=rel.tflite, input_shape=shape, input_dtype=dtype
                )
                inputs = _mcu_inputs(ctx, model, p["vectors"])
                reference = list(_tflm_reference(rel.tflite, inputs))
            for i, (x, want) in enumerate(zip(inputs, reference, strict=True)):
                out = board.infer(x)
                same, _ = _compare(out.values, want)
                mismatched += not same
                if not same and tally.first_mismatch is None:
                    tally.first_mismatch = (
                        f"{name} sample {i}: got {_show(out.values)}, expected {_show(want)}"
                    )
                samples += 1
                tally.latencies_ms.append(out.latency_s * 1000.0)
                if out.cycles is not None:
                    tally.cycles.append(int(out.cycles))
        except Exception as exc:  # noqa: BLE001 - counted as the step's errors
            tally.error(name, exc)
        tally.samples += samples
        tally.mismatched += mismatched
        outcome.rows.append(
            {
                "board": name + (f" (through {via})" if via else ""),
                "release": rel.id,
                "samples": samples,
                "mismatched": mismatched,
            }
        )
    tally.observed(outcome, compared=True)
    outcome.message = (
        f"{tally.samples} samples on {len(p['boards'])} boards, {tally.mismatched} differ"
    )
    return outcome


def _tflm_reference(tflite: bytes, inputs: np.ndarray) -> np.ndarray:
    from edgeops.evaluate.tflm import tflm_run

    batch = np.ascontiguousarray(inputs.reshape(len(inputs), -1))
    outputs = np.asarray(tflm_run(tflite, batch).outputs)
    return outputs.reshape(len(inputs), -1)


def _route(ctx: RunContext, name: str) -> Any:
    """The board to send ``name``'s inputs to: its gateway's, if it has one."""
    return ctx.board(_gateway_of(ctx, name) or name)


def _inputs_for(ctx: RunContext, name: str, count: int) -> np.ndarray:
    model = _loaded(ctx, name)
    spec = ctx.plan.board(name)
    if spec.kind == "linux" or _gateway_of(ctx, name) is not None:
        if model.release is None:
            raise StepError(f"board {name}: no release known to run on it")
        return _linux_inputs(ctx, model.release, count)
    return _mcu_inputs(ctx, model, count)


def latency(ctx: RunContext, step: Step) -> Outcome:
    """``samples`` inferences on each board, one after the other; latencies as the rig
    sees them (and a microcontroller's own cycle count where it reports one)."""
    p = step.params
    outcome = Outcome()
    tally = _Tally()
    for name in p["boards"]:
        board = _route(ctx, name)
        board_ms: list[float] = []
        try:
            inputs = _inputs_for(ctx, name, p["samples"])
        except Exception as exc:  # noqa: BLE001 - counted as the step's errors
            tally.error(name, exc)
            continue
        for x in inputs:
            try:
                out = board.infer(x)
            except Exception as exc:  # noqa: BLE001 - counted as the step's errors
                tally.error(name, exc)
                continue
            board_ms.append(out.latency_s * 1000.0)
            if out.cycles is not None:
                tally.cycles.append(int(out.cycles))
        tally.samples += len(board_ms)
        tally.latencies_ms.extend(board_ms)
        if board_ms:
            outcome.series[f"latency_ms.{name}"] = [round(v, 4) for v in board_ms]
            outcome.rows.append(
                {
                    "board": name,
                    "samples": len(board_ms),
                    "mean_ms": round(float(np.mean(board_ms)), 3),
                    "p95_ms": round(float(np.percentile(board_ms, 95)), 3),
                    "max_ms": round(float(np.max(board_ms)), 3),
                }
            )
    tally.observed(outcome, compared=False)
    outcome.series.pop("latency_ms", None)
    return outcome


def footprint(ctx: RunContext, step: Step) -> Outcome:
    """Flash and RAM of each model's library on each target (model and kernels, without
    the harness)."""
    p = step.params
    outcome = Outcome()
    if p["models"] == "zoo":
        from hil.models import zoo_models

        items = [(m.name, m.tflite) for m in zoo_models(ctx.seed, p["archs"])]
    else:
        rel = ctx.release(p["release"])
        if rel.tflite is None:
            raise StepError(f"release {rel.id} is no firmware release")
        items = [(rel.id, rel.tflite)]
    flash = ram = 0
    for name, tflite in items:
        for target in p["targets"]:
            figures = footprint_of(ctx, tflite, target)
            outcome.rows.append({"model": name, **figures})
            flash = max(flash, int(figures["flash_bytes"]))
            ram = max(ram, int(figures["ram_bytes"]))
    outcome.observed.update(flash_bytes=flash, ram_bytes=ram)
    outcome.metrics.update(flash_bytes_max=flash, ram_bytes_max=ram, images=len(outcome.rows))
    outcome.series["flash_bytes"] = [float(str(r["flash_bytes"])) for r in outcome.rows]
    return outcome


def soak(ctx: RunContext, step: Step) -> Outcome:
    """Inferences on every board, ``rate_hz`` each, for ``duration_s`` seconds."""
    p = step.params
    outcome = Outcome()
    tally = _Tally()
    names = list(p["boards"])
    per_round = max(1, int(p["rate_hz"] * p["duration_s"]))
    inputs: dict[str, np.ndarray] = {}
    for name in names:
        try:
            inputs[name] = _inputs_for(ctx, name, min(per_round, 64))
        except Exception as exc:  # noqa: BLE001 - counted as the step's errors
            tally.error(name, exc)
    boards = {name: _route(ctx, name) for name in inputs}
    interval = 1.0 / p["rate_hz"]
    end = time.monotonic() + min(p["duration_s"], ctx.remaining(p["duration_s"]))
    tick = 0
    while time.monotonic() < end:
        started = time.monotonic()
        for name, board in boards.items():
            x = inputs[name][tick % len(inputs[name])]
            try:
                out = board.infer(x)
            except Exception as exc:  # noqa: BLE001 - counted as the step's errors
                tally.error(name, exc)
                continue
            tally.samples += 1
            tally.latencies_ms.append(out.latency_s * 1000.0)
        tick += 1
        # a slow rate sleeps to the next round, but never past the soak's end
        now = time.monotonic()
        time.sleep(max(0.0, min(interval - (now - started), end - now)))
    tally.observed(outcome, compared=False)
    outcome.metrics["rounds"] = tick
    return outcome
