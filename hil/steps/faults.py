"""The ``fault`` step: power cuts, partitions, packet loss, a broker restart, a corrupted
download chunk, a skewed clock.

Boards given as ``{random: N}`` are drawn with the run's seeded generator, so the same seed
hits the same boards at the same moments. A fault with a duration (``partition``,
``packet_loss``) heals what it broke when its time is up; with ``background: true`` it runs
in a thread while the next steps go on (``wait`` and the end of the run wait for it).

Each fault leaves evidence in the step's metrics (and the timeline) that it hit and what
the board did about it: the mechanism a link fault was applied by, the packets it dropped
(nftables) and whether the board was online again at the hub afterwards; the skew a board's
clock was seen to run at; how many boards came back after a broker restart and when; the
chunks a proxy corrupted and the board's update events after it. Evidence that comes in
after the step function returns (a corruption waits for the rollout to reach the board) is
gathered by threads in :attr:`~hil.steps.context.Outcome.pending`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from device_agent.updater.machine import AT_REST
from hil.plan import Step
from hil.report import Metric
from hil.steps.context import Outcome, RunContext, StepError

__all__ = [
    "FETCH_RESPONSES",
    "MISMATCH_KINDS",
    "UPDATING_STATES",
    "dropped_fetch_responses",
    "fault",
    "update_reaction",
]

UPDATING_STATES = ("downloading", "verifying", "installing", "testing")
"""Update states a power cut ``during: update`` waits for."""
FETCH_RESPONSES = "edgeops/v1/dev/*/fetch/res"
"""The topics (``fnmatch``) of the chunks devices download releases in."""
POWER_CUT_WINDOW_S = 0.5
"""A power cut during an update falls a seeded random time up to this long after the board
was first seen updating."""
UPDATE_WAIT_S = 180.0
CORRUPTION_WAIT_S = 600.0
"""How long a ``corrupt_chunk`` fault waits for its chunk to pass the board's proxy."""
ONLINE_WAIT_S = 120.0
"""How long a board is waited for to be online again after a fault."""
AT_REST_STATES = tuple(sorted(str(state) for state in AT_REST))
"""Update states an update ends in (``idle`` after a failure before the install)."""
MISMATCH_KINDS = ("hash_mismatch", "length_mismatch", "bad_signature", "mix_and_match")
"""Reasons (their ``kind:`` prefix) an update gives when a downloaded file fails
verification."""
_DROPPED_FETCH = "dropped:"


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
        if ctx.stopping.wait(0.02):
            return f"{name}: not cut (the run ended first)"
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


# -- evidence ----------------------------------------------------------------------------------


def update_reaction(events: Sequence[dict[str, Any]]) -> dict[str, Metric]:
    """What a device's ``update`` events (as :meth:`hil.hub.RigHub.events` gives them,
    oldest first) say it did: ``update_retries`` (transient failures retried),
    ``update_failures``, ``refused`` (the first reason naming a downloaded file that failed
    verification, :data:`MISMATCH_KINDS`; None if none did) and ``final_state`` (the state
    the last event left it in if that is at rest, else None: still updating)."""
    retries = failures = 0
    refused: str | None = None
    final: str | None = None
    for item in events:
        detail = item.get("detail") or {}
        event = str(detail.get("event"))
        reason = detail.get("reason")
        retries += event == "retry"
        failures += event == "failed"
        if (
            refused is None
            and isinstance(reason, str)
            and reason.split(":", 1)[0].strip() in MISMATCH_KINDS
        ):
            refused = reason[:200]
        state = detail.get("state")
        final = str(state) if state in AT_REST_STATES else None
    return {
        "update_retries": retries,
        "update_failures": failures,
        "refused": refused,
        "final_state": final,
    }


def dropped_fetch_responses(logs: Sequence[Path]) -> int:
    """How many ``fetch/res`` frames the agent dropped (malformed, or answering another
    request than the one open), counted in its log files ``logs`` (missing ones count 0)."""
    count = 0
    for path in logs:
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace")
            count += sum(
                "fetch response" in line and _DROPPED_FETCH in line for line in text.splitlines()
            )
    return count


def reaction_text(dropped: int, reaction: dict[str, Metric]) -> str:
    """:func:`update_reaction` (and the fetch responses dropped) in words."""
    words = []
    if dropped:
        words.append(f"dropped {dropped} damaged fetch response(s) and asked again")
    if reaction["refused"]:
        words.append(f"refused the download ({reaction['refused']})")
    if reaction["update_retries"]:
        words.append(f"{reaction['update_retries']} update retries")
    if reaction["update_failures"]:
        words.append(f"{reaction['update_failures']} failed update(s)")
    final = reaction["final_state"]
    words.append(f"update at rest: {final}" if final else "update not at rest")
    return "; ".join(words)


def _agent_logs(board: Any) -> list[Path]:
    state_dir = getattr(board, "state_dir", None)
    return sorted(Path(state_dir).glob("agent.run*.log")) if state_dir is not None else []


def _update_events(ctx: RunContext, name: str) -> list[dict[str, Any]]:
    try:
        return ctx.hub.events(ctx.device_id(name), "update")
    except Exception:  # noqa: BLE001 - a device the hub does not know has no events
        return []


def _online(ctx: RunContext, name: str) -> bool | None:
    """Whether the hub sees the board online and its agent says it is connected (None:
    could not be asked)."""
    board = ctx.boards.get(name)
    if board is None:  # being booted again
        return None
    try:
        hub_online = bool(ctx.hub.device_state(ctx.device_id(name))["online"])
        health = getattr(board, "health", None)
        connected = health is None or health(timeout_s=1.0).get("status") == "connected"
    except Exception:  # noqa: BLE001 - a board or hub that does not answer says nothing
        return None
    return hub_online and connected


def _wait_online(ctx: RunContext, name: str, timeout_s: float) -> float | None:
    """Seconds until the board is online (:func:`_online`) and has sent bytes to the broker
    through its MQTT proxy since this was called (a board without a proxy: online is
    enough), or None if not in ``timeout_s``."""
    started = time.monotonic()
    first = getattr(ctx.boards.get(name), "proxy", None)
    sent = first.stats.bytes_to_broker if first is not None else 0

    def sending() -> bool:
        proxy = getattr(ctx.boards.get(name), "proxy", None)
        if proxy is None:
            return first is None
        return bool(proxy.stats.bytes_to_broker > (sent if proxy is first else 0))

    while True:
        if _online(ctx, name) and sending():
            return round(time.monotonic() - started, 2)
        if time.monotonic() - started >= timeout_s or ctx.stopping.wait(0.25):
            return None


def _plan_deadline(ctx: RunContext) -> float:
    return ctx.t0 + ctx.plan.timeout_s


# -- link faults ---------------------------------------------------------------------------------


def _link_lock(ctx: RunContext, name: str) -> threading.Lock:
    lock: threading.Lock = ctx.cache.setdefault(("link_lock", name), threading.Lock())
    return lock


def _apply_link_fault(board: Any, fault: dict[str, Any]) -> str:
    """Apply ``fault`` (``{"kind": "partition"}`` or ``{"kind": "packet_loss", "pct":
    ...}``) to the board's link; the mechanism, in words."""
    if fault["kind"] == "partition":
        board.partition()
        return "neighbour entries pinned to an address nobody has"
    return str(board.netem(loss_pct=fault["pct"]))


def _dropped(board: Any) -> int | None:
    """Packets the board's nftables packet loss dropped (None: no such count: netem)."""
    network, link = getattr(board, "network", None), getattr(board, "link", None)
    if network is None or link is None or not network.loss_pct(link):
        return None
    try:
        return int(network.dropped_packets(link))
    except Exception:  # noqa: BLE001 - a count that cannot be read is no count
        return None


def _link_fault(
    ctx: RunContext,
    outcome: Outcome,
    name: str,
    fault: dict[str, Any],
    seconds: float,
    what: str,
) -> None:
    """Apply a link fault for ``seconds``, heal it, and wait for the board to be online
    again; the evidence into ``outcome``. The board is looked up by name each time: a
    ``clock_skew`` meanwhile boots it again behind a new link (and applies the fault there
    again, see :func:`_boot_skewed`)."""
    lock = _link_lock(ctx, name)
    with lock:
        mechanism = _apply_link_fault(ctx.board(name), fault)
        fault["dropped"] = 0
        ctx.cache[("link_fault", name)] = fault
    ctx.event("fault", f"{what} for {seconds:g} s ({mechanism})", name)
    metrics: dict[str, Metric] = {f"{name}.mechanism": mechanism}
    offline_seen = False
    end = time.monotonic() + seconds
    try:
        while (left := end - time.monotonic()) > 0:
            if ctx.stopping.wait(min(1.0, left)):
                break  # the run ends: heal now
            offline_seen = offline_seen or _online(ctx, name) is False
    finally:
        with lock:
            board: Any = ctx.board(name)
            if fault["kind"] == "packet_loss":
                dropped = _dropped(board)
                if dropped is not None:
                    metrics[f"{name}.dropped_packets"] = fault["dropped"] + dropped
            ctx.cache.pop(("link_fault", name), None)
            if fault["kind"] == "partition":
                board.heal()
            else:
                board.clear_netem()
        ctx.event("fault", f"{what} healed", name)
    metrics[f"{name}.offline_seen"] = offline_seen
    back_s = _wait_online(ctx, name, ONLINE_WAIT_S)
    missed = "the run ended first" if ctx.stopping.is_set() else f"not within {ONLINE_WAIT_S:g} s"
    metrics[f"{name}.online_again_s"] = back_s if back_s is not None else missed
    if back_s is None:
        ctx.event("note", f"not online again at the hub after the heal: {missed}", name)
    else:
        ctx.event("note", f"online again at the hub {back_s:.1f} s after the heal", name)
    outcome.record(metrics)


# -- the others ---------------------------------------------------------------------------------


def _watch_corruption(ctx: RunContext, outcome: Outcome, name: str, armed: dict[str, Any]) -> None:
    """Wait for the armed corruption to pass the board's proxy, then for the board's update
    to come to rest; what happened into ``outcome``."""
    proxies: dict[int, tuple[Any, int]] = {id(armed["proxy"]): (armed["proxy"], armed["before"])}

    def corrupted() -> int:
        proxy = getattr(ctx.boards.get(name), "proxy", None)
        if proxy is not None and id(proxy) not in proxies:  # booted again: a new proxy
            proxies[id(proxy)] = (proxy, 0)
        return sum(p.stats.corrupted - base for p, base in proxies.values())

    deadline = min(time.monotonic() + CORRUPTION_WAIT_S, _plan_deadline(ctx))
    while corrupted() < 1 and time.monotonic() < deadline and not ctx.stopping.wait(0.2):
        pass
    count = corrupted()
    metrics: dict[str, Metric] = {f"{name}.corrupted": count}
    outcome.record(metrics, {"corrupted": {name: count}})
    if count < 1:
        ctx.event("note", "no download chunk passed its proxy: nothing was corrupted", name)
        return
    metrics[f"{name}.corrupted_at_s"] = round(ctx.now(), 1)
    topics = [t for p, _ in proxies.values() for t in p.stats.corrupted_topics]
    ctx.event("fault", f"a download chunk was corrupted on its way to it ({topics[-1]})", name)
    reaction = update_reaction([])
    deadline = min(time.monotonic() + 2 * UPDATE_WAIT_S, _plan_deadline(ctx))
    while True:
        reaction = update_reaction(_update_events(ctx, name)[armed["events"] :])
        if reaction["final_state"] is not None or time.monotonic() >= deadline:
            break
        if ctx.stopping.wait(0.5):
            break
    dropped = dropped_fetch_responses(_agent_logs(ctx.boards.get(name))) - armed["dropped"]
    metrics[f"{name}.fetch_responses_dropped"] = dropped
    shown = {**reaction, "refused": reaction["refused"] or "nothing"}
    shown["final_state"] = reaction["final_state"] or "not at rest"
    metrics.update({f"{name}.{key}": value for key, value in shown.items()})
    text = reaction_text(dropped, reaction)
    metrics[f"{name}.reaction"] = text
    ctx.event("note", f"after the corrupted chunk: {text}", name)
    outcome.record(metrics, {"corrupted": {name: corrupted()}})


def _skew_seen(board: Any) -> float | None:
    """The board's clock minus the rig's, from the ``ts`` of its health document once its
    agent says it is connected (the document is written at the connection, then every
    ``heartbeat_s``: read right after a boot, it is a fraction of a second old), or None
    if it does not answer."""
    wait_status = getattr(board, "wait_status", None)
    if wait_status is None:
        return None
    try:
        doc = wait_status("connected", timeout_s=30.0)
    except Exception:  # noqa: BLE001 - a board that does not answer shows no skew
        return None
    ts = doc.get("ts")
    return round(float(ts) - time.time(), 1) if isinstance(ts, int | float) else None


def _boot_skewed(ctx: RunContext, name: str, seconds: float) -> dict[str, Metric]:
    """Boot the board again with its clock ``seconds`` off; the evidence. A Linux board is
    booted behind a new link and proxy: a partition or packet loss in force on the old link
    is applied again on the new one, and a corruption armed on the old proxy re-armed."""
    metrics: dict[str, Metric] = {}
    board: Any = ctx.board(name)
    set_skew = getattr(board, "set_clock_skew", None)
    if set_skew is not None:  # the board changes its clock from its next start on
        set_skew(seconds)
        board.reset()
        ctx.event("fault", f"booted again with its clock {seconds:+g} s off", name)
    else:
        remake = ctx.cache.get(("remake", name))
        if remake is None:
            raise StepError(f"board {name} cannot be booted again with another clock")
        with _link_lock(ctx, name):
            active: dict[str, Any] | None = ctx.cache.get(("link_fault", name))
            old_proxy = getattr(board, "proxy", None)
            armed = old_proxy.pending_corruptions() if old_proxy is not None else 0
            if active is not None and active["kind"] == "packet_loss":
                active["dropped"] = active.get("dropped", 0) + (_dropped(board) or 0)
            board = remake(seconds)
            ctx.event("fault", f"booted again with its clock {seconds:+g} s off", name)
            if armed:
                board.proxy.corrupt_next(FETCH_RESPONSES, armed)
                ctx.event("fault", "its armed chunk corruption moved to its new proxy", name)
            if active is not None:
                mechanism = _apply_link_fault(board, active)
                what = "partition" if active["kind"] == "partition" else "packet loss"
                ctx.event("fault", f"its {what} applied again on its new link ({mechanism})", name)
                metrics[f"{name}.link_fault_reapplied"] = what
    skew = _skew_seen(board)
    metrics[f"{name}.skew_seen_s"] = skew if skew is not None else "unreadable"
    if skew is None:
        ctx.event("note", "its clock could not be read (health document)", name)
    else:
        ctx.event("note", f"its clock runs {skew:+.1f} s off the rig's (health document)", name)
    return metrics


def _broker_restart(ctx: RunContext, down_s: float) -> dict[str, Metric]:
    """Restart the broker; how many boards behind a proxy reconnected and were online at the
    hub again, and how long after the broker came back the last one took."""
    proxies: dict[str, tuple[Any, int]] = {}
    for name, board in ctx.boards.items():
        proxy = getattr(board, "proxy", None)
        if proxy is not None:
            proxies[name] = (proxy, proxy.stats.connections)
    ctx.event("fault", f"broker restart, down {down_s:g} s")
    ctx.hub.restart_broker(down_s)
    up = time.monotonic()
    back: dict[str, float] = {}
    deadline = up + ONLINE_WAIT_S
    while len(back) < len(proxies) and time.monotonic() < deadline:
        for name, (proxy, before) in proxies.items():
            if name in back:
                continue
            current = getattr(ctx.boards.get(name), "proxy", None)
            reconnected = current is not None and current.stats.connections > (
                before if current is proxy else 0
            )
            if reconnected and _online(ctx, name):
                back[name] = round(time.monotonic() - up, 2)
        time.sleep(0.25)
    metrics: dict[str, Metric] = {
        "boards_online_again": len(back),
        "boards_behind_proxies": len(proxies),
        "online_again_s": max(back.values()) if back else "none online again",
    }
    missing = sorted(set(proxies) - set(back))
    if missing:
        metrics["not_online_again"] = ", ".join(missing)
    ctx.event(
        "note",
        f"{len(back)} of {len(proxies)} boards reconnected and online again"
        + (f", the last {max(back.values()):.1f} s after the broker came back" if back else "")
        + (f"; not back within {ONLINE_WAIT_S:g} s: {', '.join(missing)}" if missing else ""),
    )
    return metrics


def fault(ctx: RunContext, step: Step) -> Outcome:
    """Inject the step's fault and gather its evidence (see the module docstring)."""
    p = step.params
    kind = p["kind"]
    outcome = Outcome(metrics={"kind": kind})
    names = _draw(ctx, step)
    if names:
        outcome.metrics["boards"] = ", ".join(names)
    jobs: list[Callable[[], object]] = []
    watches: list[Callable[[], object]] = []
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
    elif kind in ("partition", "packet_loss"):
        for name in names:
            _board(ctx, name, "partition" if kind == "partition" else "netem")
            if kind == "partition":
                link_fault: dict[str, Any] = {"kind": "partition"}
                what = "partition"
            else:
                link_fault = {"kind": "packet_loss", "pct": p["pct"]}
                what = f"{p['pct']:g} % packet loss"
            jobs.append(
                functools.partial(_link_fault, ctx, outcome, name, link_fault, p["seconds"], what)
            )
    elif kind == "broker_restart":
        outcome.metrics.update(_broker_restart(ctx, p["down_s"]))
    elif kind == "corrupt_chunk":
        for name in names:
            board = ctx.board(name)
            proxy = getattr(board, "proxy", None)
            if proxy is None:
                raise StepError(f"board {name} has no MQTT proxy to corrupt a chunk with")
            armed = {
                "proxy": proxy,
                "before": proxy.stats.corrupted,
                "events": len(_update_events(ctx, name)),
                "dropped": dropped_fetch_responses(_agent_logs(board)),
            }
            proxy.corrupt_next(FETCH_RESPONSES)
            outcome.record({f"{name}.corrupted": 0}, {"corrupted": {name: 0}})
            ctx.event("fault", "the next download chunk it receives will be corrupted", name)
            watches.append(functools.partial(_watch_corruption, ctx, outcome, name, armed))
    elif kind == "clock_skew":
        for name in names:
            outcome.metrics.update(_boot_skewed(ctx, name, p["seconds"]))
    if not jobs and not watches:
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
            outcome.record({"fault_error": str(exc)})
            ctx.event("note", f"fault {kind} did not complete: {exc}")

    outcome.pending = [
        threading.Thread(target=run, args=(watch,), daemon=True) for watch in watches
    ]
    for thread in outcome.pending:
        thread.start()
    if watches:
        outcome.message = f"{kind} armed on {len(watches)} boards, watched in the background"
    if not jobs:
        return outcome
    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    if p["background"]:
        ctx.background.extend(threads)
        outcome.pending.extend(threads)
        outcome.message = f"{kind} on {len(threads)} boards, in the background"
        return outcome
    for thread in threads:
        thread.join(ctx.remaining(UPDATE_WAIT_S + p["seconds"] + 2 * ONLINE_WAIT_S))
    if errors:
        raise StepError(f"{kind}: {errors[0]}")
    outcome.message = "; ".join(sorted(results))
    return outcome
