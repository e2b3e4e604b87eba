"""Runs a validated plan: sets up the hub, the network and the boards, runs the steps in
order, checks their assertions, tears everything down, and writes the reports.

:func:`run_plan` is the whole of it. What it does, in order:

1. Starts what the plan needs: the rig's hub (:class:`hil.hub.RigHub`, when a step
   releases, deploys, rolls out or checks the fleet, or a Linux board needs a broker);
   the network namespaces of the Linux boards (:class:`hil.netns.Network`); every board.
   A board the rig cannot run on this machine (no network namespaces, no QEMU, a serial
   port that is not there) is left out with the reason; a board that fails to start is
   recorded as broken with its error.
2. Runs the steps in order. Each is timed, and its outcome checked against its ``expect:``
   assertions (and, for ``deploy``, ``state: committed`` unless another state is
   expected). A step whose boards were left out is ``skipped`` with their reason; one that
   needs a broken board or hub, or raises, is ``error``; one whose assertion does not hold
   is ``failed``. A step whose evidence is still being gathered when its function returns
   (:attr:`hil.steps.context.Outcome.pending`: a fault in the background, a corruption
   waiting for its chunk) is concluded, its metrics added and its assertions checked, once
   those threads have ended (checked after every step; at the end of the run they get up
   to a minute more). A failed or erred step fails the plan, and the next steps still run,
   unless it says ``stop_on_failure`` (the rest are then ``skipped``). Once the plan's
   ``timeout_s`` has passed, the steps not yet run are ``error``.
3. Tells the fault and evidence threads still running to stop (a link fault in force is
   healed; up to 15 s for them), and concludes the steps they were gathering evidence for
   with what they had. Then stops everything it started, however the run ends (an error,
   Ctrl-C, SIGTERM), and
   writes ``results.json``, ``junit.xml`` and ``report.html`` (:mod:`hil.report`),
   also for an interrupted run.

Progress goes to stderr: a line per step as it starts and ends, a line per fault.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from hil.errors import HilError
from hil.plan import BoardSpec, Plan, Step
from hil.report import PlanResult, StepResult, write_reports
from hil.steps import STEP_FUNCTIONS
from hil.steps.context import Outcome, RunContext, StepFailure

__all__ = ["check_expectations", "needs", "run_plan"]

log = logging.getLogger(__name__)

_HUB_ACTIONS = ("release", "deploy", "rollout", "wait", "check")


def needs(plan: Plan, step: Step) -> tuple[bool, tuple[str, ...]]:
    """Whether ``step`` needs the hub, and the boards it acts on."""
    boards: list[str] = []
    value = step.params.get("boards")
    if isinstance(value, dict):
        boards.extend(value["of"])
    elif isinstance(value, tuple | list):
        boards.extend(value)
    if step.action == "conformance" and step.params.get("models") == "zoo":
        for target in step.params["targets"]:
            boards.extend(
                spec.name for spec in plan.boards if spec.kind == "qemu" and spec.target == target
            )
    if step.action in ("conformance", "latency", "soak"):
        for name in list(boards):
            boards.extend(s.name for s in plan.boards if s.gateway_for == name)
    if step.action == "deploy":
        for name in list(boards):
            spec = plan.board(name)
            if spec.gateway_for is not None:
                boards.append(spec.gateway_for)
    hub = step.action in _HUB_ACTIONS or (
        step.action == "fault" and step.params["kind"] == "broker_restart"
    )
    return hub, tuple(dict.fromkeys(boards))


def _plan_needs_hub(plan: Plan) -> bool:
    return any(spec.kind == "linux" for spec in plan.boards) or any(
        needs(plan, step)[0] for step in plan.steps
    )


# -- assertions --------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def check_expectations(step: Step, outcome: Outcome) -> list[str]:
    """The step's assertions that do not hold, one sentence each (empty: all hold)."""
    observed = outcome.observed
    expect = dict(step.expect)
    if step.action == "deploy":
        expect.setdefault("state", "committed")
    problems: list[str] = []
    latencies = [float(v) for v in observed.get("latencies_ms", [])]
    for key, wanted in expect.items():
        if key == "bit_exact":
            got = observed.get("bit_exact")
            if got is None or int(observed.get("samples", 1)) == 0:
                # nothing compared is no evidence either way, of equality or of a mismatch
                first = observed.get("first_error")
                detail = f" (first error: {first})" if first else ""
                problems.append(f"bit_exact: nothing was compared{detail}")
            elif bool(got) != wanted:
                detail = observed.get("mismatch", "")
                problems.append(
                    f"bit_exact is {str(bool(got)).lower()}, expected {str(wanted).lower()}"
                    + (f" ({detail})" if detail else "")
                )
        elif key in ("max_latency_ms", "mean_latency_ms"):
            if not latencies:
                problems.append(f"{key}: no latency was measured")
                continue
            got_ms = max(latencies) if key == "max_latency_ms" else sum(latencies) / len(latencies)
            if got_ms > wanted:
                what = "max" if key == "max_latency_ms" else "mean"
                problems.append(f"{what} latency {_fmt(got_ms)} ms > {_fmt(wanted)} ms")
        elif key == "state":
            states: dict[str, str | None] = observed.get("states") or {}
            if "state" in observed:
                states = {"rollout": observed["state"]}
            if not states:
                problems.append("no state was observed")
            wrong = {k: v for k, v in states.items() if v != wanted}
            if wrong:
                shown = ", ".join(f"{k} {v}" for k, v in wrong.items())
                problems.append(f"state: expected {wanted}, got {shown}")
        elif key == "reason_contains":
            reasons: dict[str, str | None] = observed.get("reasons") or {}
            if "reason" in observed:
                reasons = {"rollout": observed["reason"]}
            for board, reason in reasons.items() or {"?": None}.items():
                if reason is None or wanted.lower() not in str(reason).lower():
                    problems.append(f"{board}: reason {reason!r} does not contain {wanted!r}")
        elif key in ("flash_bytes_max", "ram_bytes_max"):
            what = key.removesuffix("_max")
            got_bytes = observed.get(what)
            if got_bytes is None:
                problems.append(f"{what}: nothing was measured")
            elif got_bytes > wanted:
                problems.append(f"{what.replace('_', ' ')} {got_bytes:,} > {wanted:,}")
        elif key == "errors_max":
            errors = int(observed.get("errors", 0))
            if int(observed.get("samples", len(latencies))) == 0:
                # no error among no samples shows nothing: the step did not run its inferences
                first = observed.get("first_error")
                problems.append(
                    f"errors_max: no sample was answered ({errors} errors"
                    + (f", first: {first})" if first else ")")
                )
            elif errors > wanted:
                first = observed.get("first_error")
                problems.append(
                    f"{errors} errors > {wanted}" + (f" (first: {first})" if first else "")
                )
        elif key == "corrupted_min":
            counts: dict[str, int] = observed.get("corrupted") or {}
            if not counts:
                problems.append("no chunk corruption was watched for")
            for board, count in counts.items():
                if count < wanted:
                    problems.append(
                        f"{board}: {count} chunks corrupted < {wanted} "
                        "(no download passed its proxy in time)"
                    )
        elif key == "samples_min":
            samples = int(observed.get("samples", len(latencies)))
            if samples < wanted:
                problems.append(f"{samples} samples < {wanted}")
    return problems


# -- setup -------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(exc, HilError):
        return message or type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _qemu_reason() -> str | None:
    from edgeops.firmware.cortexm import missing_tools

    missing = missing_tools()
    if missing:
        return f"the Arm toolchain or QEMU is missing ({', '.join(missing)})"
    return None


def _start_boards(ctx: RunContext) -> None:
    plan = ctx.plan
    qemu_reason: str | None = None
    if any(spec.kind == "qemu" for spec in plan.boards):
        qemu_reason = _qemu_reason()
    linux = [spec for spec in plan.boards if spec.kind == "linux"]
    network: Any = None
    linux_reason: str | None = None
    if linux:
        from hil.netns import netns_unavailable

        linux_reason = netns_unavailable()
    for spec in plan.boards:
        if spec.kind == "qemu":
            if qemu_reason is not None:
                ctx.unavailable[spec.name] = qemu_reason
                continue
            _start_qemu(ctx, spec)
        elif spec.kind == "serial":
            _start_serial(ctx, spec)
    if linux:
        for spec in linux:
            for name in spec.instances:
                if linux_reason is not None:
                    ctx.unavailable[name] = f"no network namespaces here: {linux_reason}"
                elif "hub" in ctx.broken:
                    ctx.broken[name] = f"the rig's hub did not start: {ctx.broken['hub']}"
        if linux_reason is None and "hub" not in ctx.broken:
            from hil.netns import Network

            try:
                network = ctx.stack.enter_context(Network())
            except Exception as exc:  # noqa: BLE001 - recorded: the boards did not start
                for spec in linux:
                    for name in spec.instances:
                        ctx.broken[name] = f"the network did not start: {_one_line(exc)}"
                return
            for spec in linux:
                for name in spec.instances:
                    _start_linux(ctx, spec, name, network)


def _state_dir(ctx: RunContext, name: str) -> Path:
    path = ctx.workdir / "boards" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _start_qemu(ctx: RunContext, spec: BoardSpec) -> None:
    from hil.boards.qemu import QemuBoard

    assert spec.target is not None
    try:
        board = QemuBoard(spec.name, _state_dir(ctx, spec.name), target=spec.target)
    except Exception as exc:  # noqa: BLE001 - recorded: the board did not start
        ctx.broken[spec.name] = _one_line(exc)
        return
    ctx.stack.callback(board.close)
    ctx.boards[spec.name] = board
    ctx.board_info[spec.name] = f"qemu {spec.target}"


def _start_serial(ctx: RunContext, spec: BoardSpec) -> None:
    assert spec.port is not None and spec.flash_command is not None
    if not Path(spec.port).exists():
        ctx.unavailable[spec.name] = f"serial port {spec.port} is not there"
        return
    from hil.boards.serial import SerialBoard

    try:
        board = SerialBoard(
            spec.name,
            spec.port,
            flash_command=spec.flash_command,
            reset_command=spec.reset_command,
            power_command=spec.power_command,
            baud=spec.baud,
        )
    except Exception as exc:  # noqa: BLE001 - recorded: the board did not start
        ctx.broken[spec.name] = _one_line(exc)
        return
    ctx.stack.callback(board.close)
    ctx.boards[spec.name] = board
    ctx.board_info[spec.name] = f"serial {spec.port}"


def _start_linux(ctx: RunContext, spec: BoardSpec, name: str, network: Any) -> None:
    from hil.boards.linux import LinuxAgentBoard

    settings: dict[str, Any] = dict(spec.agent)
    info = "linux agent"
    if spec.gateway_for is not None:
        mcu = ctx.plan.board(spec.gateway_for)
        mcu_dir = _state_dir(ctx, mcu.name)
        flash = (
            f"{sys.executable} -m hil.boards.qemu flash --dir {mcu_dir} "
            f"--target {mcu.target} {{image}}"
        )
        settings["mcu"] = {"port": str(mcu_dir / "tty"), "flash_command": flash}
        info = f"linux agent, gateway for {mcu.name}"
    hub = ctx.hub

    def make(clock_skew_s: float) -> LinuxAgentBoard:
        board = LinuxAgentBoard(
            name,
            network,
            broker_port=hub.broker_port,
            state_dir=_state_dir(ctx, name),
            trust_root=hub.trust_root,
            model_dir=None,
            agent_settings=settings,
            memory_limit_bytes=spec.memory_limit_bytes,
            clock_skew_s=clock_skew_s,
        )
        ctx.stack.callback(board.close)
        board.start()
        return board

    def remake(clock_skew_s: float) -> LinuxAgentBoard:
        """The same device (state directory, settings) booted again with its clock off."""
        old = ctx.boards.pop(name)
        assert isinstance(old, LinuxAgentBoard)
        old.close()
        network.remove_host(old.link)
        try:
            ctx.boards[name] = board = make(clock_skew_s)
        except Exception as exc:
            ctx.broken[name] = f"not booted again with a skewed clock: {_one_line(exc)}"
            raise
        return board

    try:
        board = make(spec.clock_skew_s)
    except Exception as exc:
        ctx.broken[name] = _one_line(exc)
        log.debug("board %s did not start", name, exc_info=True)
        return
    ctx.cache[("remake", name)] = remake
    ctx.boards[name] = board
    ctx.board_info[name] = f"{info} ({board.device_id})"


# -- running -----------------------------------------------------------------------------------


class _Interrupted(BaseException):
    """SIGTERM, turned into an exception the run stops at (like Ctrl-C)."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_step(ctx: RunContext, step: Step, result: StepResult) -> Outcome | None:
    """Run one step into ``result`` (never raises but for Ctrl-C / SIGTERM); its outcome if
    threads still gather evidence for it (:attr:`Outcome.pending`): the step is concluded
    by :func:`_settle` once they end."""
    plan = ctx.plan
    wants_hub, board_names = needs(plan, step)
    skipped = [name for name in board_names if name in ctx.unavailable]
    if skipped:
        result.status = "skipped"
        reasons = dict.fromkeys(ctx.unavailable[name] for name in skipped)
        result.message = f"boards {', '.join(skipped)} not run here: {'; '.join(reasons)}"
        return None
    broken = [name for name in board_names if name in ctx.broken]
    if wants_hub and "hub" in ctx.broken:
        broken.insert(0, "hub")
    if broken:
        result.status = "error"
        result.message = "; ".join(f"{name} did not start: {ctx.broken[name]}" for name in broken)
        return None
    started = time.monotonic()
    step_deadline = started + step.timeout_s if step.timeout_s else float("inf")
    ctx.deadline = min(step_deadline, ctx.t0 + plan.timeout_s)
    try:
        outcome = STEP_FUNCTIONS[step.action](ctx, step)
    except StepFailure as exc:
        result.status = "failed"
        result.message = str(exc)
        return None
    except (KeyboardInterrupt, _Interrupted):
        raise
    except Exception as exc:  # noqa: BLE001 - the step errs; the run goes on
        result.status = "error"
        result.message = _one_line(exc)
        detail = traceback.format_exc()
        log.debug("step %s: %s", step.name, detail)
        with (
            contextlib.suppress(OSError),
            (ctx.workdir / "errors.log").open("a", encoding="utf-8") as fh,
        ):
            fh.write(f"--- step {step.name}\n{detail}\n")
        return None
    if any(thread.is_alive() for thread in outcome.pending):
        with outcome.lock:
            result.metrics.update(outcome.metrics)
        result.status = "passed"
        result.message = outcome.message
        return outcome
    _conclude(step, outcome, result)
    return None


def _conclude(step: Step, outcome: Outcome, result: StepResult) -> None:
    """The step's metrics into ``result``, and its status by its assertions."""
    with outcome.lock:
        result.metrics.update(outcome.metrics)
        result.series.update(outcome.series)
        result.rows.extend(outcome.rows)
        problems = check_expectations(step, outcome)
    if problems:
        result.status = "failed"
        result.message = "; ".join(problems)
        if outcome.message:
            result.message += f" ({outcome.message})"
    else:
        result.status = "passed"
        result.message = outcome.message


_Unsettled = list[tuple[Step, StepResult, Outcome]]


def _settle(ctx: RunContext, unsettled: _Unsettled, wait_s: float | None) -> None:
    """Conclude the steps whose evidence threads have ended (with ``wait_s``: wait that long
    in all for the rest, then conclude them with what they gathered, noted as incomplete)."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    for entry in list(unsettled):
        step, result, outcome = entry
        if deadline is not None:
            for thread in outcome.pending:
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(thread.is_alive() for thread in outcome.pending)
        if alive and deadline is None:
            continue
        unsettled.remove(entry)
        before = result.status
        _conclude(step, outcome, result)
        if alive:
            note = f"evidence incomplete: {alive} of its watches still running at the end"
            result.message = f"{result.message}; {note}" if result.message else note
        position = f"[{step.index + 1}/{len(ctx.plan.steps)}]"
        change = "" if result.status == before else f" (was {before})"
        message = f": {result.message}" if result.message else ""
        ctx.progress(f"{position} {step.name}: evidence in, {result.status}{change}{message}")


@contextlib.contextmanager
def _threads_stopped(ctx: RunContext, unsettled: _Unsettled) -> Iterator[None]:
    """On the way out (before the boards and the hub stop): tell the fault and evidence
    threads to stop, and give them a few seconds to heal what they broke and return."""
    try:
        yield
    finally:
        threads = [t for _, _, outcome in unsettled for t in outcome.pending]
        alive = ctx.stop_threads(threads, 15.0)
        if alive:
            log.warning("threads still running as the run stops: %s", ", ".join(alive))


def run_plan(
    plan: Plan,
    report_dir: Path,
    *,
    seed: int | None = None,
    keep: bool = False,
    progress: TextIO | None = sys.stderr,
) -> PlanResult:
    """Run ``plan`` and write its reports into ``report_dir``; the result.

    ``seed`` replaces the plan's seed. With ``keep``, the run's working files (the hub's
    data, the boards' state directories, logs) stay in ``report_dir/work``; otherwise they
    are in a temporary directory removed at the end. Ctrl-C or SIGTERM stop the run: what
    was started is stopped, the reports are written (the run marked interrupted), and
    KeyboardInterrupt is not raised again: the result says ``interrupted``.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    chosen_seed = plan.seed if seed is None else seed
    if keep:
        workdir = report_dir / "work"
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix=f"edgeops-hil-{plan.name}-"))
    result = PlanResult(
        plan=plan.name,
        description=plan.description,
        seed=chosen_seed,
        started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    results = [StepResult(name=step.name, action=step.action) for step in plan.steps]
    stack = ExitStack()
    ctx = RunContext(
        plan=plan, seed=chosen_seed, workdir=workdir, stack=stack, progress_stream=progress
    )
    # the hub's and the boards' own log lines go to the run's log file, not the progress
    log_handler = logging.FileHandler(workdir / "rig.log", encoding="utf-8")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger()
    root_logger.addHandler(log_handler)
    previous_level = root_logger.level
    if root_logger.level > logging.INFO or root_logger.level == logging.NOTSET:
        root_logger.setLevel(logging.INFO)
    stop_rest: str | None = None
    current: StepResult | None = None
    unsettled: _Unsettled = []
    begun = time.monotonic()
    try:
        with _sigterm_stops(), stack, _threads_stopped(ctx, unsettled):
            ctx.progress(f"plan {plan.name}: {len(plan.steps)} steps, seed {chosen_seed}")
            _setup(ctx)
            for name, reason in ctx.unavailable.items():
                ctx.progress(f"  board {name}: skipped: {reason}")
            for name, reason in ctx.broken.items():
                ctx.progress(f"  {name}: did not start: {reason}")
            for step, step_result in zip(plan.steps, results, strict=True):
                step_result.started_s = round(ctx.now(), 3)
                position = f"[{step.index + 1}/{len(plan.steps)}]"
                if stop_rest is not None:
                    step_result.status = "skipped"
                    step_result.message = stop_rest
                elif time.monotonic() >= ctx.t0 + plan.timeout_s:
                    step_result.status = "error"
                    step_result.message = f"not run: the plan's {plan.timeout_s:g} s ran out"
                else:
                    # the step is current before it is announced: an interrupt right after
                    # the line marks it interrupted, not skipped
                    begun = time.monotonic()
                    current = step_result
                    ctx.progress(f"{position} {step.name} ({step.action}) ...")
                    waiting = _run_step(ctx, step, step_result)
                    current = None
                    step_result.duration_s = round(time.monotonic() - begun, 3)
                    if waiting is not None:
                        unsettled.append((step, step_result, waiting))
                        step_result.message = "; ".join(
                            filter(None, [step_result.message, "evidence still coming in"])
                        )
                result.steps.append(step_result)
                message = f": {step_result.message}" if step_result.message else ""
                ctx.progress(
                    f"{position} {step.name}: {step_result.status} "
                    f"({step_result.duration_s:.1f} s){message}"
                )
                _settle(ctx, unsettled, None)
                if step_result.status in ("failed", "error") and step.stop_on_failure:
                    stop_rest = f"not run: step {step.name} failed and stops the plan"
            ctx.join_background(60.0)
            _settle(ctx, unsettled, 60.0)
            ctx.progress(f"plan {plan.name}: stopping boards and hub")
    except (KeyboardInterrupt, _Interrupted):
        result.interrupted = True
        if current is not None:
            current.status = "error"
            current.message = "interrupted while it ran"
            current.duration_s = round(time.monotonic() - begun, 3)
        # steps whose evidence was still coming in are judged on what they gathered, not
        # left "passed" with their assertions never checked
        with contextlib.suppress(Exception):
            _settle(ctx, unsettled, 0.0)
        if progress is not None:
            print(f"plan {plan.name}: interrupted; stopped everything", file=progress)
    finally:
        done = {id(s) for s in result.steps}
        for step_result in results:
            if id(step_result) not in done:
                if step_result is not current:
                    step_result.status = "skipped"
                    step_result.message = "not run: the run was stopped"
                result.steps.append(step_result)
        result.duration_s = round(ctx.now(), 3)
        result.timeline = list(ctx.timeline)
        result.boards = {
            **{name: info for name, info in ctx.board_info.items()},
            **{name: f"skipped: {reason}" for name, reason in ctx.unavailable.items()},
            **{name: f"did not start: {reason}" for name, reason in ctx.broken.items()},
        }
        root_logger.removeHandler(log_handler)
        root_logger.setLevel(previous_level)
        log_handler.close()
        try:
            write_reports(result, report_dir)
        finally:
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
    counts = result.counts()
    if progress is not None:
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        verdict = "passed" if result.passed else "FAILED"
        print(
            f"plan {plan.name}: {verdict} ({summary}) in {result.duration_s:.1f} s; "
            f"reports in {report_dir}",
            file=progress,
        )
    return result


def _setup(ctx: RunContext) -> None:
    plan = ctx.plan
    if _plan_needs_hub(plan):
        from hil.hub import RigHub

        ctx.progress("  starting the hub")
        try:
            hub = RigHub(ctx.workdir / "hub", seed=ctx.seed)
            ctx.stack.callback(hub.close)
            hub.start()
            ctx.set_hub(hub)
            ctx.board_info["hub"] = f"rig hub, broker on port {hub.broker_port}"
        except Exception as exc:  # noqa: BLE001 - recorded: steps needing it err
            ctx.broken["hub"] = _one_line(exc)
    ctx.progress("  starting the boards")
    _start_boards(ctx)
