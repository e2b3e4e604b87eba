"""The ``fault`` step: power cuts, partitions, packet loss, a broker restart, a corrupted
download chunk, a skewed clock.

Boards given as ``{random: N}`` are drawn with the run's seeded generator, so the same seed
hits the same boards at the same moments. A fault with a duration (``partition``,
``packet_loss``) heals what it broke when its time is up; with ``background: true`` it runs
in a thread while the next steps go on (``wait`` and the end of the run wait for it).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from hil.plan import Step
from hil.steps.context import Outcome, RunContext, StepError

__all__ = ["FETCH_RESPONSES", "UPDATING_STATES", "fault"]

UPDATING_STATES = ("downloading", "verifying", "installing", "testing")
"""Update states a power cut ``during: update`` waits for."""
FETCH_RESPONSES = "edgeops/v1/dev/*/fetch/res"
"""The topics (``fnmatch``) of the chunks devices download releases in."""
POWER_CUT_WINDOW_S = 0.5
"""A power cut during an update falls a seeded random time up to this long after the board
was first seen updating."""
UPDATE_WAIT_S = 180.0


def _draw(ctx: RunContext, step: Step) -> list[str]:
    pick: dict[str, Any] = step.params["boards"]
    among = list(pick["of"])
    if pick["random"] is None:
        return among
    return sorted(ctx.rng.sample(among, pick["random"]), key=among.index)


def _board(ctx: RunContext, name: str, method: str) -> Any:
    board = ctx.board(name)
    if not hasattr(board, method):
        raise StepError(f"board {name} ({type(board).__name__}) cannot {method.replace('_', ' ')}")
    return board


def _update_state(ctx: RunContext, name: str) -> str | None:
    try:
        state = ctx.board(name).read_metrics().get("update_state")
    except Exception:  # noqa: BLE001 - a board that does not answer is in no state
        return None
    return None if state is None else str(state)


def _power_cut_during_update(ctx: RunContext, name: str, delay_s: float, off_s: float) -> str:
    board = _board(ctx, name, "power_cut")
    deadline = time.monotonic() + ctx.remaining(UPDATE_WAIT_S)
    state = _update_state(ctx, name)
    while state not in UPDATING_STATES and time.monotonic() < deadline:
        time.sleep(0.02)
        state = _update_state(ctx, name)
    if state not in UPDATING_STATES:
        note = f"no update seen (state {state}); cut anyway"
    else:
        time.sleep(delay_s)
        note = f"{delay_s:.2f} s after the update was seen ({state})"
    at = _update_state(ctx, name)
    ctx.event("fault", f"power cut in state {at}, {note}, off {off_s:g} s", name)
    board.power_cut(off_s)
    return f"{name}: cut in {at}"


def _timed(
    ctx: RunContext,
    name: str,
    apply: Callable[[], None],
    heal: Callable[[], None],
    seconds: float,
    what: str,
) -> None:
    apply()
    ctx.event("fault", f"{what} for {seconds:g} s", name)
    try:
        time.sleep(seconds)
    finally:
        heal()
        ctx.event("fault", f"{what} healed", name)


def fault(ctx: RunContext, step: Step) -> Outcome:
    """Inject the step's fault (see the module docstring)."""
    p = step.params
    kind = p["kind"]
    outcome = Outcome(metrics={"kind": kind})
    names = _draw(ctx, step)
    if names:
        outcome.metrics["boards"] = ", ".join(names)
    jobs: list[Callable[[], object]] = []
    if kind == "power_cut":
        if p["during"] == "update":
            for name in names:
                delay = ctx.rng.uniform(0.0, POWER_CUT_WINDOW_S)
                jobs.append(
                    functools.partial(_power_cut_during_update, ctx, name, delay, p["off_s"])
                )
        else:
            for name in names:
                board = _board(ctx, name, "power_cut")
                ctx.event("fault", f"power cut, off {p['off_s']:g} s", name)
                board.power_cut(p["off_s"])
    elif kind == "partition":
        for name in names:
            board = _board(ctx, name, "partition")
            jobs.append(
                functools.partial(
                    _timed, ctx, name, board.partition, board.heal, p["seconds"], "partition"
                )
            )
    elif kind == "packet_loss":
        for name in names:
            board = _board(ctx, name, "netem")
            jobs.append(
                functools.partial(
                    _timed,
                    ctx,
                    name,
                    functools.partial(board.netem, loss_pct=p["pct"]),
                    board.clear_netem,
                    p["seconds"],
                    f"{p['pct']:g} % packet loss",
                )
            )
    elif kind == "broker_restart":
        ctx.event("fault", f"broker restart, down {p['down_s']:g} s")
        ctx.hub.restart_broker(p["down_s"])
    elif kind == "corrupt_chunk":
        for name in names:
            board = ctx.board(name)
            proxy = getattr(board, "proxy", None)
            if proxy is None:
                raise StepError(f"board {name} has no MQTT proxy to corrupt a chunk with")
            proxy.corrupt_next(FETCH_RESPONSES)
            ctx.event("fault", "the next download chunk it receives will be corrupted", name)
    elif kind == "clock_skew":
        for name in names:
            board = ctx.board(name)
            set_skew = getattr(board, "set_clock_skew", None)
            if set_skew is not None:  # the board changes its clock from its next start on
                set_skew(p["seconds"])
                board.reset()
            else:
                remake = ctx.cache.get(("remake", name))
                if remake is None:
                    raise StepError(f"board {name} cannot be booted again with another clock")
                remake(p["seconds"])
            ctx.event("fault", f"booted again with its clock {p['seconds']:+g} s off", name)
    if not jobs:
        return outcome
    errors: list[str] = []
    results: list[str] = []

    def run(job: Callable[[], object]) -> None:
        try:
            value = job()
            if isinstance(value, str):
                results.append(value)
        except Exception as exc:  # noqa: BLE001 - reported as the step's error
            errors.append(str(exc))
            ctx.event("note", f"fault {kind} did not complete: {exc}")

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    if p["background"]:
        ctx.background.extend(threads)
        outcome.message = f"{kind} on {len(threads)} boards, in the background"
        return outcome
    for thread in threads:
        thread.join(ctx.remaining(UPDATE_WAIT_S + p["seconds"] + 30.0))
    if errors:
        raise StepError(f"{kind}: {errors[0]}")
    outcome.message = "; ".join(sorted(results))
    return outcome
