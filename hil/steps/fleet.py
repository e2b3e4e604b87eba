"""Steps that go through the hub: ``release``, ``deploy``, ``rollout``, ``wait``, ``check``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from hil.plan import Step
from hil.steps.context import BoardModel, Outcome, Release, RunContext, StepError, StepFailure

__all__ = ["alter_one_weight", "check", "deploy", "release", "rollout", "wait"]

FINAL_UPDATE_STATES = ("committed", "rolled_back")
_FULLY_CONNECTED = 9
_CONV_2D = 3
_INT8 = 9  # TensorType.INT8


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:  # pragma: no cover - the hub installs LiteRT
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated
    return schema_py_generated


def alter_one_weight(tflite: bytes) -> tuple[bytes, str]:
    """``tflite`` with one int8 weight changed, and which one: the weight of largest
    magnitude of the last fully-connected (else convolution) operator is negated (-128
    becomes 127, 0 becomes 127). Everything else, the file's length included, is unchanged.
    """
    schema = _schema()
    data = bytearray(tflite)
    model = schema.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    chosen: tuple[int, str] | None = None
    for wanted in (_FULLY_CONNECTED, _CONV_2D):
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin != wanted or op.InputsLength() < 2:
                continue
            tensor_index = op.Inputs(1)
            tensor = graph.Tensors(tensor_index)
            if tensor.Type() != _INT8 or tensor.Buffer() == 0:
                continue
            chosen = (tensor_index, tensor.Name().decode(errors="replace"))
        if chosen is not None:
            break
    if chosen is None:
        raise StepError("the model has no int8 fully-connected or convolution weights to alter")
    tensor = graph.Tensors(chosen[0])
    values = model.Buffers(tensor.Buffer()).DataAsNumpy()
    if not isinstance(values, np.ndarray) or values.size == 0:
        raise StepError(f"weights {chosen[1]} are not stored in the model's buffers")
    offset = int(values.ctypes.data - base)
    weights = np.frombuffer(bytes(data[offset : offset + values.size]), dtype=np.int8)
    index = int(np.argmax(np.abs(weights.astype(np.int16))))
    old = int(weights[index])
    new = 127 if old in (-128, 0) else -old
    data[offset + index] = new & 0xFF
    return bytes(data), f"weight {index} of {chosen[1]}: {old} -> {new}"


def release(ctx: RunContext, step: Step) -> Outcome:
    """Train (once per epochs count) and release the digits model; for a firmware release,
    measure the model's flash and RAM on the target."""
    p = step.params
    hub = ctx.hub
    pair = hub.digits_model(p["epochs"])
    model_id = pair.keras_id if p["runtime"] == "onnx" else pair.int8_id
    outcome = Outcome()
    tflite: bytes | None = None
    reference: bytes | None = None
    tampered = p["tamper"] is not None
    if p["firmware"] is not None:
        reference = hub.model_tflite(pair.int8_id)
        tflite = reference
        if tampered:
            tflite, what = alter_one_weight(reference)
            ctx.event("tamper", f"release {p['id']}: {what}")
            outcome.metrics["tampered"] = what
            path = hub.release_firmware(
                tflite, hub.model_card(pair.int8_id), p["firmware"], f"{ctx.plan.name}-tampered"
            )
        else:
            path = hub.release(pair.int8_id, runtime="mcu", firmware=p["firmware"])
        from hil.steps.measure import footprint_of

        footprint = footprint_of(ctx, tflite, p["firmware"])
        outcome.observed["flash_bytes"] = footprint["flash_bytes"]
        outcome.observed["ram_bytes"] = footprint["ram_bytes"]
        outcome.metrics.update({k: v for k, v in footprint.items() if k != "target"})
    else:
        path = hub.release(model_id, runtime=p["runtime"])
    ctx.releases[p["id"]] = Release(
        id=p["id"],
        target_path=path,
        model_id=model_id,
        runtime="mcu" if p["firmware"] else p["runtime"],
        firmware=p["firmware"],
        tflite=tflite,
        reference_tflite=reference,
        tampered=tampered,
    )
    outcome.metrics["target"] = path
    outcome.metrics["model_id"] = model_id
    outcome.message = f"released {path}"
    return outcome


def _update_done(path: str) -> Any:
    def done(state: dict[str, Any]) -> bool:
        if state.get("update_target") != path and state.get("target") != path:
            return False
        return state.get("update_state") in FINAL_UPDATE_STATES

    return done


def deploy(ctx: RunContext, step: Step) -> Outcome:
    """Linux boards (gateways included) through the hub; bare QEMU boards flashed directly."""
    p = step.params
    rel = ctx.release(p["release"])
    outcome = Outcome()
    states: dict[str, str | None] = {}
    reasons: dict[str, str | None] = {}
    latencies: list[float] = []
    linux: dict[str, str] = {}
    for name in p["boards"]:
        spec = ctx.plan.board(name)
        if spec.kind == "linux":
            linux[ctx.device_id(name)] = name
            continue
        board = ctx.board(name)
        started = time.monotonic()
        elf = ctx.hub.firmware_image(rel.target_path, ctx.workdir / "images" / rel.id / name)
        board.deploy(elf)
        latencies.append((time.monotonic() - started) * 1000.0)
        states[name] = "committed"
        reasons[name] = None
        ctx.loaded[name] = _mcu_model(rel)
        ctx.event("state", f"flashed {rel.target_path}", name)
    if linux:
        hub = ctx.hub
        started = time.monotonic()
        unacked = hub.deploy(list(linux), rel.target_path)
        if unacked:
            raise StepError(f"the broker did not acknowledge the desired state of {unacked}")
        done = hub.wait_devices(
            list(linux), _update_done(rel.target_path), ctx.remaining(p["wait_s"])
        )
        elapsed = (time.monotonic() - started) * 1000.0
        for device_id, state in done.items():
            name = linux[device_id]
            states[name] = state["update_state"]
            reasons[name] = state.get("update_reason")
            latencies.append(elapsed)
            ctx.event("state", f"{rel.target_path}: {state['update_state']}", name)
            if state["update_state"] == "committed":
                spec = ctx.plan.board(name)
                if spec.gateway_for is not None:
                    ctx.loaded[spec.gateway_for] = _mcu_model(rel)
                    ctx.loaded[name] = BoardModel(release=rel)
                else:
                    ctx.loaded[name] = BoardModel(release=rel)
    outcome.observed.update(states=states, reasons=reasons, latencies_ms=latencies)
    outcome.metrics["target"] = rel.target_path
    for name, final in states.items():
        outcome.metrics[f"state.{name}"] = final
        if reasons.get(name):
            outcome.metrics[f"reason.{name}"] = reasons[name]
    if latencies:
        outcome.metrics["deploy_s_max"] = round(max(latencies) / 1000.0, 3)
    if len(states) <= 4:
        outcome.message = ", ".join(f"{name}: {final}" for name, final in states.items())
    else:
        tally = Counter(str(final) for final in states.values())
        outcome.message = ", ".join(f"{count} {final}" for final, count in tally.items())
    return outcome


def _mcu_model(rel: Release) -> BoardModel:
    from hil.steps.measure import tflite_input

    assert rel.tflite is not None
    shape, dtype = tflite_input(rel.tflite)
    return BoardModel(release=rel, tflite=rel.tflite, input_shape=shape, input_dtype=dtype)


def rollout(ctx: RunContext, step: Step) -> Outcome:
    """Create a rollout of a release to Linux boards; wait for it unless ``wait: false``."""
    p = step.params
    rel = ctx.release(p["release"])
    hub = ctx.hub
    ids = [ctx.device_id(name) for name in p["boards"]]
    rollout_id = hub.rollout(
        rel.target_path,
        ids,
        current_model=None,
        name=f"{ctx.plan.name}-{step.name}",
        canary=p["canary"],
        rate_per_minute=p["rate_per_minute"],
    )
    ctx.event("state", f"rollout {rollout_id} of {rel.target_path} to {len(ids)} boards")
    outcome = Outcome(metrics={"rollout": rollout_id, "target": rel.target_path})
    ctx.cache["rollout"] = (rel, tuple(p["boards"]))
    if not p["wait"]:
        ctx.open_rollout = rollout_id
        outcome.message = f"rollout {rollout_id} started"
        return outcome
    return _finish_rollout(ctx, rollout_id, p["wait_s"], outcome)


def _finish_rollout(ctx: RunContext, rollout_id: str, wait_s: float, outcome: Outcome) -> Outcome:
    status = ctx.hub.wait_rollout(rollout_id, ctx.remaining(wait_s))
    ctx.event("state", f"rollout {rollout_id}: {status['status']}")
    outcome.observed["state"] = status["status"]
    outcome.observed["reason"] = status.get("reason")
    for key, value in status.get("counts", {}).items():
        outcome.metrics[f"devices.{key}"] = int(value)
    outcome.metrics["rollout"] = rollout_id
    outcome.metrics["status"] = status["status"]
    outcome.message = f"rollout {rollout_id} {status['status']}"
    if status.get("reason"):
        outcome.metrics["reason"] = str(status["reason"])
        outcome.message += f": {status['reason']}"
    rel, names = ctx.cache.get("rollout", (None, ()))
    if status["status"] == "succeeded" and isinstance(rel, Release):
        for name in names:
            ctx.loaded[name] = BoardModel(release=rel)
    return outcome


def wait(ctx: RunContext, step: Step) -> Outcome:
    """Wait for the running rollout to end, then for background faults to heal."""
    if ctx.open_rollout is None:
        raise StepError("no rollout is running (the rollout step did not start one)")
    rollout_id, ctx.open_rollout = ctx.open_rollout, None
    try:
        return _finish_rollout(ctx, rollout_id, step.params["wait_s"], Outcome())
    finally:
        ctx.join_background(ctx.remaining(120.0))


def _valid_models(ctx: RunContext, names: tuple[str, ...], wait_s: float) -> list[str]:
    hub = ctx.hub
    released = {rel.target_path for rel in ctx.releases.values()}
    ids = {ctx.device_id(name): name for name in names}

    def valid(state: dict[str, Any]) -> bool:
        return (
            bool(state.get("online"))
            and state.get("target") in released
            and state.get("update_state") in (*FINAL_UPDATE_STATES, "idle", None)
        )

    problems: list[str] = []
    try:
        hub.wait_devices(list(ids), valid, ctx.remaining(wait_s))
    except Exception as exc:  # noqa: BLE001 - what does not hold is the finding
        problems.append(str(exc))
    for name in ids.values():
        try:
            health = ctx.board(name).read_metrics()
        except Exception as exc:  # noqa: BLE001 - what does not hold is the finding
            problems.append(f"{name}: no health report: {exc}")
            continue
        if health.get("model_error"):
            problems.append(f"{name}: model error: {health['model_error']}")
    return problems


def _delivered(ctx: RunContext, device_id: str) -> tuple[list[int], list[int]]:
    """The sequence numbers of the device's windows and events the hub stored."""
    hub = ctx.hub
    windows = hub.telemetry_windows(device_id)
    events = [int(e["seq"]) for e in hub.events(device_id)]
    return windows, events


def _gaps(windows: list[int], events: list[int]) -> list[int]:
    numbers = set(windows) | set(events)
    return sorted(set(range(1, max(numbers, default=0) + 1)) - numbers)


def _telemetry_once(
    ctx: RunContext, names: tuple[str, ...], wait_s: float, outcome: Outcome
) -> list[str]:
    """Windows and events share the offline buffer's sequence numbers (1, 2, ...): once a
    board's buffer is empty, the numbers the hub stored for it, windows and events
    together, must run from 1 without a gap; a window is stored once per number (the
    table's key), and none may have been refused for reusing a number."""
    hub = ctx.hub
    problems: list[str] = []
    deadline = time.monotonic() + ctx.remaining(wait_s)
    total = duplicates = 0
    for name in names:
        device_id = ctx.device_id(name)
        board = ctx.board(name)
        while True:
            health = board.read_metrics()
            pending = health.get("buffer_pending")
            windows, events = _delivered(ctx, device_id)
            settled = not pending and not _gaps(windows, events)
            if settled or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if pending:
            problems.append(f"{name}: {pending} messages still in its offline buffer")
        dropped = health.get("buffer_dropped_total")
        if dropped:
            problems.append(f"{name}: its offline buffer dropped {dropped} messages at its bound")
        missing = _gaps(windows, events)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            problems.append(f"{name}: {len(missing)} messages never reached the hub (seq {shown})")
        replayed = hub.telemetry_replayed(device_id)
        if replayed:
            problems.append(f"{name}: {replayed} windows sent again under a used seq")
        duplicates += hub.telemetry_duplicates(device_id)
        total += len(windows)
    outcome.metrics["telemetry_windows"] = total
    outcome.metrics["telemetry_redeliveries_dropped"] = duplicates
    stats = hub.telemetry_stats()
    rejected = {k: v for k, v in dict(stats.get("rejected", {})).items() if v}
    if rejected:
        problems.append(
            "the hub rejected windows: " + ", ".join(f"{k} {v}" for k, v in rejected.items())
        )
    if total == 0:
        problems.append("no telemetry window reached the hub: nothing shows exactly-once delivery")
    return problems


def check(ctx: RunContext, step: Step) -> Outcome:
    """Fleet invariants over the plan's Linux boards; StepFailure naming what does not hold."""
    p = step.params
    outcome = Outcome()
    problems: list[str] = []
    for invariant in p["invariants"]:
        if invariant == "every_board_has_valid_model":
            found = _valid_models(ctx, p["boards"], p["wait_s"])
        else:
            found = _telemetry_once(ctx, p["boards"], p["wait_s"], outcome)
        outcome.metrics[invariant] = "holds" if not found else "broken"
        problems.extend(f"{invariant}: {problem}" for problem in found)
    if problems:
        raise StepFailure("; ".join(problems))
    outcome.message = f"{', '.join(p['invariants'])} hold for {len(p['boards'])} boards"
    return outcome
