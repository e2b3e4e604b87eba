"""Test plans of the rig: YAML files read into typed, fully validated dataclasses.

A plan names the boards it needs and the steps it runs on them, in order; see
``docs/hil.md`` for the format. :func:`load_plan` reads and validates a whole plan before
anything runs: every mistake is a :class:`PlanError` whose one-line message names the file
and the path inside it, e.g. ``smoke.yaml: steps[4].expect: unknown assertion 'bitexact'
(known: bit_exact, errors_max, max_latency_ms, mean_latency_ms)``.

:func:`shipped_plans` lists the plans that come with the rig (``hil/plans/*.yaml``);
:func:`resolve_plan` turns a path or a shipped plan's name into a file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from device_agent.command import TemplateError, parse_template
from hil.errors import HilError

__all__ = [
    "ACTIONS",
    "ASSERTIONS",
    "BOARD_KINDS",
    "CHECKS",
    "FAULT_KINDS",
    "INVARIANTS",
    "PLANS_DIR",
    "BoardSpec",
    "Plan",
    "PlanError",
    "Step",
    "load_plan",
    "parse_plan",
    "resolve_plan",
    "shipped_plans",
]

PLANS_DIR = Path(__file__).parent / "plans"

BOARD_KINDS = ("qemu", "linux", "serial")
QEMU_TARGETS = ("mps2-an385", "mps2-an386")
FAULT_KINDS = (
    "power_cut",
    "partition",
    "packet_loss",
    "broker_restart",
    "corrupt_chunk",
    "clock_skew",
)
INVARIANTS = ("every_board_has_valid_model", "telemetry_exactly_once")
CHECKS = INVARIANTS
DEVICE_STATES = ("committed", "rolled_back")
ROLLOUT_STATES = ("succeeded", "failed", "aborted", "paused", "running")
RUNTIMES = ("litert", "onnx", "mcu")
TAMPERS = ("one_weight",)

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


class PlanError(HilError):
    """A plan that cannot run: the message names the file, the path in it and the problem."""


@dataclass(frozen=True)
class BoardSpec:
    """One board, or ``count`` alike Linux boards, of a plan."""

    name: str
    kind: str
    """``qemu``, ``linux`` or ``serial``."""
    target: str | None = None
    """qemu: the emulated machine (``mps2-an385`` Cortex-M3, ``mps2-an386`` Cortex-M4)."""
    count: int = 1
    """linux: how many alike boards; more than one are named ``<name>-1`` ... ``<name>-N``."""
    gateway_for: str | None = None
    """linux: the qemu board this board's agent flashes and tests firmware releases on."""
    memory_limit_bytes: int | None = None
    """linux: the agent process's memory limit."""
    clock_skew_s: float = 0.0
    """linux: the agent's clock offset from the hub's at start."""
    agent: Mapping[str, Any] = field(default_factory=dict)
    """linux: extra agent settings (``EDGEOPS_AGENT_*`` names, lower case, without prefix)."""
    port: str | None = None
    """serial: the board's serial port."""
    flash_command: str | None = None
    """serial: the command that flashes an image (``{image}`` is replaced by its path)."""
    reset_command: str | None = None
    power_command: str | None = None
    baud: int = 115200

    @property
    def instances(self) -> tuple[str, ...]:
        """The names of the boards this entry stands for."""
        if self.count == 1:
            return (self.name,)
        return tuple(f"{self.name}-{i}" for i in range(1, self.count + 1))


@dataclass(frozen=True)
class Step:
    """One step: an action with its parameters, and what must hold afterwards."""

    index: int
    name: str
    action: str
    params: Mapping[str, Any]
    """The action's parameters, validated and with defaults filled in."""
    expect: Mapping[str, Any]
    """Assertions: name -> expected value (see :data:`ASSERTIONS`)."""
    stop_on_failure: bool = False
    """When this step fails, skip the steps after it."""
    timeout_s: float | None = None

    @property
    def boards(self) -> tuple[str, ...]:
        """The boards the step acts on (expanded instance names), empty if none."""
        value = self.params.get("boards", ())
        return tuple(value)


@dataclass(frozen=True)
class Plan:
    """A validated plan."""

    name: str
    description: str
    seed: int
    timeout_s: float
    boards: tuple[BoardSpec, ...]
    steps: tuple[Step, ...]
    source: str = "<plan>"
    """The file the plan was read from (its name only, as errors show it)."""

    def board(self, name: str) -> BoardSpec:
        """The spec that defines board instance ``name``."""
        for spec in self.boards:
            if name == spec.name or name in spec.instances:
                return spec
        raise KeyError(name)

    @property
    def instances(self) -> tuple[str, ...]:
        """Every board instance of the plan, in the order defined."""
        return tuple(name for spec in self.boards for name in spec.instances)


# -- the schema --------------------------------------------------------------------------------


class _InvalidError(Exception):
    """A validation failure at ``path`` (joined into a PlanError by the caller)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _known(names: Sequence[str]) -> str:
    return ", ".join(sorted(names))


def _check_mapping(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _InvalidError(path, f"must be a mapping, not {_type(value)}")
    for key in value:
        if not isinstance(key, str):
            raise _InvalidError(path, f"keys must be strings, not {key!r}")
    return value


def _type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _no_unknown(data: Mapping[str, Any], known: Sequence[str], path: str, what: str) -> None:
    for key in data:
        if key not in known:
            raise _InvalidError(
                _join(path, key), f"unknown {what} '{key}' (known: {_known(known)})"
            )


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


Checker = Callable[[object, str], Any]


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _InvalidError(path, f"must be a non-empty string, not {_type(value)}")
    return value


def _name(value: object, path: str) -> str:
    text = _string(value, path)
    if not _NAME.match(text):
        raise _InvalidError(path, f"'{text}' is not a name (lower-case letters, digits, '-', '_')")
    return text


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _InvalidError(path, f"must be true or false, not {_type(value)}")
    return value


def _number(minimum: float = 0.0, *, strict: bool = False, maximum: float | None = None) -> Checker:
    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _InvalidError(path, f"must be a number, not {_type(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise _InvalidError(path, "must be a finite number")
        if number < minimum or (strict and number == minimum):
            sign = ">" if strict else ">="
            raise _InvalidError(path, f"must be {sign} {minimum:g}, not {number:g}")
        if maximum is not None and number > maximum:
            raise _InvalidError(path, f"must be <= {maximum:g}, not {number:g}")
        return number

    return check


def _integer(minimum: int = 0, maximum: int | None = None) -> Checker:
    def check(value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _InvalidError(path, f"must be an integer, not {_type(value)}")
        if value < minimum:
            raise _InvalidError(path, f"must be >= {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise _InvalidError(path, f"must be <= {maximum}, not {value}")
        return value

    return check


def _choice(*choices: str) -> Checker:
    def check(value: object, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            shown = repr(value) if isinstance(value, str) else _type(value)
            raise _InvalidError(path, f"must be one of {', '.join(choices)}, not {shown}")
        return value

    return check


def _choices(*choices: str) -> Checker:
    """A list of distinct choices (a single string is a list of one)."""

    def check(value: object, path: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _InvalidError(path, f"must be a non-empty list, not {_type(value)}")
        out: list[str] = []
        for i, item in enumerate(items):
            chosen = _choice(*choices)(item, _join(path, i))
            if chosen in out:
                raise _InvalidError(_join(path, i), f"'{chosen}' is listed twice")
            out.append(chosen)
        return tuple(out)

    return check


_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _bytes(value: object, path: str) -> int:
    """An integer number of bytes, or a string such as ``64MiB``, ``512k`` or ``2G``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise _InvalidError(path, f"must be > 0, not {value}")
        return value
    if isinstance(value, str):
        match = _BYTES.match(value)
        if match:
            unit = (match.group(2) or "").lower()[:1]
            number = int(float(match.group(1)) * _UNITS[unit])
            if number > 0:
                return number
    raise _InvalidError(path, f"must be a size in bytes (e.g. 67108864 or '64MiB'), not {value!r}")


@dataclass(frozen=True)
class _Param:
    check: Checker
    required: bool = False
    default: Any = None


def _p(check: Checker, default: Any = None, *, required: bool = False) -> _Param:
    return _Param(check, required, default)


def _boards_param(value: object, path: str) -> Any:
    """Board references are resolved against the plan later; here only the shape."""
    if value == "all":
        return "all"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _InvalidError(
            path, f"must be 'all', a board name or a list of them, not {_type(value)}"
        )
    return [_string(item, _join(path, i)) for i, item in enumerate(items)]


def _pick_param(value: object, path: str) -> Any:
    """Boards a fault hits: like ``boards``, or ``{random: N}`` for N boards drawn by seed."""
    if isinstance(value, dict):
        data = _check_mapping(value, path)
        _no_unknown(data, ("random", "of"), path, "key")
        if "random" not in data:
            raise _InvalidError(_join(path, "random"), "missing (how many boards to draw)")
        count = _integer(1)(data["random"], _join(path, "random"))
        among = _boards_param(data.get("of", "all"), _join(path, "of"))
        return {"random": count, "of": among}
    return _boards_param(value, path)


def _names_list(value: object, path: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _InvalidError(path, f"must be a non-empty list of names, not {_type(value)}")
    return tuple(_string(item, _join(path, i)) for i, item in enumerate(items))


_ZOO_OR_RELEASE = ("zoo", "release")

# action -> parameters. Every action also takes `name`, `expect`, `stop_on_failure` and
# `timeout_s` (see _STEP_KEYS).
PARAMS: dict[str, dict[str, _Param]] = {
    "release": {
        "model": _p(_choice("digits"), "digits"),
        "epochs": _p(_integer(1, 200), 3),
        "runtime": _p(_choice(*RUNTIMES), "litert"),
        "firmware": _p(_choice(*QEMU_TARGETS)),
        "tamper": _p(_choice(*TAMPERS)),
        "id": _p(_name),
    },
    "deploy": {
        "release": _p(_name, required=True),
        "boards": _p(_boards_param, "all"),
        "wait_s": _p(_number(1.0), 60.0),
    },
    "rollout": {
        "release": _p(_name, required=True),
        "boards": _p(_boards_param, "all"),
        "canary": _p(_integer(0), 1),
        "rate_per_minute": _p(_integer(1), 600),
        "wait": _p(_boolean, True),
        "wait_s": _p(_number(1.0), 120.0),
    },
    "wait": {
        "wait_s": _p(_number(1.0), 120.0),
    },
    "conformance": {
        "models": _p(_choice(*_ZOO_OR_RELEASE), "release"),
        "release": _p(_name),
        "archs": _p(_names_list),
        "targets": _p(_choices(*QEMU_TARGETS)),
        "boards": _p(_boards_param),
        "vectors": _p(_integer(1, 1000), 10),
    },
    "latency": {
        "boards": _p(_boards_param, "all"),
        "samples": _p(_integer(1, 100_000), 50),
    },
    "footprint": {
        "release": _p(_name),
        "models": _p(_choice(*_ZOO_OR_RELEASE), "release"),
        "archs": _p(_names_list),
        "targets": _p(_choices(*QEMU_TARGETS)),
    },
    "soak": {
        "boards": _p(_boards_param, "all"),
        "duration_s": _p(_number(0.1, strict=False), 10.0),
        "rate_hz": _p(_number(0.0, strict=True, maximum=1000.0), 5.0),
    },
    "fault": {
        "kind": _p(_choice(*FAULT_KINDS), required=True),
        "boards": _p(_pick_param),
        "during": _p(_choice("update"), None),
        "off_s": _p(_number(0.0), 1.0),
        "seconds": _p(_number(0.0), 5.0),
        "pct": _p(_number(0.0, maximum=100.0), 10.0),
        "down_s": _p(_number(0.0), 2.0),
        "background": _p(_boolean, False),
    },
    "check": {
        "invariants": _p(_choices(*INVARIANTS), required=True),
        "boards": _p(_boards_param, "all"),
        "wait_s": _p(_number(0.0), 60.0),
    },
}


# which parameters a fault kind uses (besides kind, boards, background)
FAULT_PARAMS: dict[str, tuple[str, ...]] = {
    "power_cut": ("during", "off_s"),
    "partition": ("seconds",),
    "packet_loss": ("pct", "seconds"),
    "broker_restart": ("down_s",),
    "corrupt_chunk": (),
    "clock_skew": ("seconds",),
}
_FAULTS_WITH_BOARDS = ("power_cut", "partition", "packet_loss", "corrupt_chunk", "clock_skew")

ACTIONS = tuple(PARAMS)

# assertion -> its checker; ASSERTS_FOR: which assertions each action can make
ASSERTIONS: dict[str, Checker] = {
    "bit_exact": _boolean,
    "max_latency_ms": _number(0.0, strict=True),
    "mean_latency_ms": _number(0.0, strict=True),
    "state": _choice(*DEVICE_STATES, *ROLLOUT_STATES),
    "reason_contains": _string,
    "flash_bytes_max": _integer(1),
    "ram_bytes_max": _integer(1),
    "errors_max": _integer(0),
    "samples_min": _integer(1),
    "corrupted_min": _integer(0),
}
ASSERTS_FOR: dict[str, tuple[str, ...]] = {
    "release": ("flash_bytes_max", "ram_bytes_max"),
    "deploy": ("state", "reason_contains", "max_latency_ms"),
    "rollout": ("state", "reason_contains"),
    "wait": ("state", "reason_contains"),
    "conformance": ("bit_exact", "max_latency_ms", "mean_latency_ms", "errors_max"),
    "latency": ("max_latency_ms", "mean_latency_ms", "errors_max", "samples_min"),
    "footprint": ("flash_bytes_max", "ram_bytes_max"),
    "soak": ("errors_max", "max_latency_ms", "mean_latency_ms", "samples_min"),
    "fault": ("corrupted_min",),
    "check": (),
}
_STATES_FOR = {"deploy": DEVICE_STATES, "rollout": ROLLOUT_STATES, "wait": ROLLOUT_STATES}
_STEP_KEYS = ("name", "action", "expect", "stop_on_failure", "timeout_s")
_TOP_KEYS = ("name", "description", "seed", "timeout_s", "boards", "steps")
_BOARD_KEYS: dict[str, tuple[str, ...]] = {
    "qemu": ("kind", "target"),
    "linux": ("kind", "count", "gateway_for", "memory_limit", "clock_skew_s", "agent"),
    "serial": ("kind", "port", "flash_command", "reset_command", "power_command", "baud"),
}


# -- parsing -----------------------------------------------------------------------------------


def _parse_board(name: str, value: object, path: str) -> BoardSpec:
    data = _check_mapping(value, path)
    if "kind" not in data:
        raise _InvalidError(_join(path, "kind"), f"missing (one of {', '.join(BOARD_KINDS)})")
    kind = _choice(*BOARD_KINDS)(data["kind"], _join(path, "kind"))
    _no_unknown(data, _BOARD_KEYS[kind], path, f"{kind} board setting")
    if kind == "qemu":
        target = _choice(*QEMU_TARGETS)(data.get("target", "mps2-an385"), _join(path, "target"))
        return BoardSpec(name=name, kind=kind, target=target)
    if kind == "serial":
        for key in ("port", "flash_command"):
            if key not in data:
                raise _InvalidError(_join(path, key), "missing (a serial board needs it)")
        flash = _command("image", "port", needs="image")(
            data["flash_command"], _join(path, "flash_command")
        )
        return BoardSpec(
            name=name,
            kind=kind,
            port=_string(data["port"], _join(path, "port")),
            flash_command=flash,
            reset_command=_opt(data, "reset_command", _command("image", "port"), path),
            power_command=_opt(data, "power_command", _command("image", "port", "off_s"), path),
            baud=_integer(300)(data.get("baud", 115200), _join(path, "baud")),
        )
    agent = _check_mapping(data.get("agent", {}), _join(path, "agent"))
    for key in agent:
        if not _NAME.match(key) or "-" in key:
            raise _InvalidError(_join(_join(path, "agent"), key), "is not an agent setting name")
    count = _integer(1, 200)(data.get("count", 1), _join(path, "count"))
    gateway = _opt(data, "gateway_for", _name, path)
    if gateway is not None and count != 1:
        raise _InvalidError(_join(path, "count"), "a gateway board must have count 1")
    memory = data.get("memory_limit")
    return BoardSpec(
        name=name,
        kind=kind,
        count=count,
        gateway_for=gateway,
        memory_limit_bytes=None if memory is None else _bytes(memory, _join(path, "memory_limit")),
        clock_skew_s=float(
            _number(-86400.0 * 365)(data.get("clock_skew_s", 0.0), _join(path, "clock_skew_s"))
        ),
        agent=dict(agent),
    )


def _command(*placeholders: str, needs: str | None = None) -> Checker:
    """A command template run without a shell (:func:`hil.boards.serial.run_command`): it
    must split into words and use only ``placeholders``, ``needs`` among them
    (:func:`device_agent.command.parse_template`)."""

    def check(value: object, path: str) -> str:
        text = _string(value, path)
        try:
            parse_template(text, placeholders, required=(needs,) if needs else ())
        except TemplateError as exc:
            if exc.missing:
                raise _InvalidError(path, "must contain {" + exc.missing[0] + "}") from None
            if exc.empty:
                raise _InvalidError(path, "is an empty command") from None
            known = ", ".join("{" + name + "}" for name in placeholders)
            problem = (
                "unknown placeholder " + ", ".join(repr(name) for name in exc.unknown)
                if exc.unknown
                else str(exc)
            )
            raise _InvalidError(
                path, f"is not a command template ({problem}; placeholders: {known})"
            ) from None
        return text

    return check


def _opt(data: Mapping[str, Any], key: str, check: Checker, path: str) -> Any:
    if key not in data or data[key] is None:
        return None
    return check(data[key], _join(path, key))


def _resolve_boards(
    value: Any, boards: tuple[BoardSpec, ...], path: str, kinds: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Board references (``all``, a board's name, a group's name, one instance) to instances."""
    chosen = [b for b in boards if kinds is None or b.kind in kinds]
    if value == "all":
        names = [n for b in chosen for n in b.instances]
        if not names:
            kinds_text = "/".join(kinds) if kinds else "any"
            raise _InvalidError(path, f"'all' names no board: the plan has no {kinds_text} board")
        return tuple(names)
    out: list[str] = []
    for i, ref in enumerate(value):
        where = _join(path, i) if len(value) > 1 else path
        spec = next((b for b in boards if ref == b.name or ref in b.instances), None)
        if spec is None:
            known = [n for b in boards for n in {b.name, *b.instances}]
            raise _InvalidError(where, f"unknown board '{ref}' (known: {_known(known)})")
        if kinds is not None and spec.kind not in kinds:
            raise _InvalidError(
                where, f"board '{ref}' is a {spec.kind} board; this needs {' or '.join(kinds)}"
            )
        for name in spec.instances if ref == spec.name else (ref,):
            if name not in out:
                out.append(name)
    return tuple(out)


def _parse_step(
    index: int,
    value: object,
    boards: tuple[BoardSpec, ...],
    releases: dict[str, Mapping[str, Any]],
    state: dict[str, Any],
) -> Step:
    path = f"steps[{index}]"
    data = _check_mapping(value, path)
    actions = [key for key in data if key in PARAMS]
    if "action" in data:
        action = _choice(*ACTIONS)(data["action"], _join(path, "action"))
        params_raw: dict[str, Any] = {
            k: v for k, v in data.items() if k not in _STEP_KEYS and k not in PARAMS
        }
        if actions:
            raise _InvalidError(
                _join(path, actions[0]), "give the action once, as 'action:' or a key"
            )
        unknown = [k for k in data if k not in _STEP_KEYS and k not in PARAMS[action]]
        if unknown:
            known = [*PARAMS[action], *_STEP_KEYS]
            raise _InvalidError(
                _join(path, unknown[0]),
                f"unknown parameter '{unknown[0]}' of {action} (known: {_known(known)})",
            )
    else:
        if not actions:
            others = [k for k in data if k not in _STEP_KEYS]
            if others:
                raise _InvalidError(
                    _join(path, others[0]),
                    f"unknown action '{others[0]}' (known: {_known(ACTIONS)})",
                )
            raise _InvalidError(path, f"no action (one of: {_known(ACTIONS)})")
        if len(actions) > 1:
            raise _InvalidError(
                _join(path, actions[1]), f"a step has one action, not {len(actions)}"
            )
        action = actions[0]
        for key in data:
            if key not in _STEP_KEYS and key != action:
                raise _InvalidError(
                    _join(path, key),
                    f"unknown step key '{key}' (known: {_known([*_STEP_KEYS, action])}); "
                    f"the action's parameters go under '{action}:'",
                )
        body = data[action]
        params_raw = {} if body is None else _check_mapping(body, _join(path, action))
        _no_unknown(params_raw, list(PARAMS[action]), _join(path, action), f"{action} parameter")
    ppath = _join(path, action) if "action" not in data else path
    params: dict[str, Any] = {}
    for key, spec in PARAMS[action].items():
        if key in params_raw and params_raw[key] is not None:
            params[key] = spec.check(params_raw[key], _join(ppath, key))
        elif spec.required:
            raise _InvalidError(_join(ppath, key), f"missing (the {action} action needs it)")
        else:
            params[key] = spec.default
    name = data.get("name", f"{action}-{index + 1}")
    name = _string(name, _join(path, "name"))
    if name in state["names"]:
        raise _InvalidError(_join(path, "name"), f"step name '{name}' is used twice")
    state["names"].add(name)

    _check_action(action, params, params_raw, boards, releases, state, ppath)

    expect_raw = _check_mapping(data.get("expect") or {}, _join(path, "expect"))
    expect: dict[str, Any] = {}
    allowed = ASSERTS_FOR[action]
    for key, raw in expect_raw.items():
        epath = _join(path, "expect")
        if key not in ASSERTIONS:
            raise _InvalidError(
                epath,
                f"unknown assertion '{key}' (known: {_known(allowed) or 'none for ' + action})",
            )
        if key not in allowed:
            raise _InvalidError(
                epath,
                f"assertion '{key}' does not apply to {action} "
                f"(known: {_known(allowed) or 'none'})",
            )
        if key == "state":
            expect[key] = _choice(*_STATES_FOR[action])(raw, _join(epath, key))
        else:
            expect[key] = ASSERTIONS[key](raw, _join(epath, key))
    if "reason_contains" in expect and "state" not in expect:
        raise _InvalidError(
            _join(path, "expect"), "reason_contains needs a state to compare it with"
        )
    if "corrupted_min" in expect and params.get("kind") != "corrupt_chunk":
        raise _InvalidError(
            _join(path, "expect"),
            f"corrupted_min counts corrupted chunks: a corrupt_chunk fault's, not a "
            f"{params.get('kind')} fault's",
        )
    stop = _boolean(data.get("stop_on_failure", False), _join(path, "stop_on_failure"))
    timeout = _opt(data, "timeout_s", _number(0.0, strict=True), path)
    return Step(
        index=index,
        name=name,
        action=action,
        params=params,
        expect=expect,
        stop_on_failure=stop,
        timeout_s=timeout,
    )


def _check_action(
    action: str,
    params: dict[str, Any],
    raw: Mapping[str, Any],
    boards: tuple[BoardSpec, ...],
    releases: dict[str, Mapping[str, Any]],
    state: dict[str, Any],
    path: str,
) -> None:
    """Cross-references: boards exist and fit the action, releases are made before use."""

    def release_ref(required: bool) -> Mapping[str, Any] | None:
        ref = params.get("release")
        if ref is None:
            if required:
                raise _InvalidError(_join(path, "release"), "missing (which release)")
            return None
        if ref not in releases:
            known = _known(list(releases)) or "none made before this step"
            raise _InvalidError(_join(path, "release"), f"unknown release '{ref}' (known: {known})")
        return releases[ref]

    if action == "release":
        rid = params["id"] or f"r{len(releases) + 1}"
        if rid in releases:
            raise _InvalidError(_join(path, "id"), f"release id '{rid}' is used twice")
        params["id"] = rid
        if params["tamper"] is not None and params["firmware"] is None:
            raise _InvalidError(_join(path, "tamper"), "tampering alters firmware: give 'firmware'")
        releases[rid] = params
    elif action in ("deploy", "rollout"):
        release = release_ref(True)
        assert release is not None
        kinds = ("linux", "qemu", "serial") if action == "deploy" else ("linux",)
        names = _resolve_boards(params["boards"], boards, _join(path, "boards"), kinds)
        for name in names:
            spec = next(b for b in boards if name in b.instances)
            if spec.kind in ("qemu", "serial") and release["firmware"] is None:
                raise _InvalidError(
                    _join(path, "boards"),
                    f"board '{name}' is a {spec.kind} board: release "
                    f"'{params['release']}' has no firmware",
                )
            if spec.kind == "linux" and action == "deploy":
                mcu = next((b for b in boards if b.name == spec.gateway_for), None)
                if mcu is None and release["firmware"] is not None:
                    raise _InvalidError(
                        _join(path, "boards"),
                        f"board '{name}' is no gateway: release '{params['release']}' is firmware",
                    )
                if mcu is not None and release["firmware"] not in (None, mcu.target):
                    raise _InvalidError(
                        _join(path, "boards"),
                        f"gateway '{name}' flashes {mcu.target}; release "
                        f"'{params['release']}' has firmware for {release['firmware']}",
                    )
            if spec.kind == "qemu" and release["firmware"] != spec.target:
                raise _InvalidError(
                    _join(path, "boards"),
                    f"board '{name}' emulates {spec.target}; release '{params['release']}' "
                    f"has firmware for {release['firmware']}",
                )
        params["boards"] = names
        if action == "rollout":
            if not params["wait"]:
                state["open_rollout"] = True
            elif state.get("open_rollout"):
                raise _InvalidError(path, "a rollout is already running: add a 'wait' step first")
            if params["canary"] >= len(names) and params["canary"]:
                raise _InvalidError(
                    _join(path, "canary"), f"must be less than the {len(names)} boards"
                )
    elif action == "wait":
        if not state.get("open_rollout"):
            raise _InvalidError(path, "nothing to wait for: no rollout with 'wait: false' before")
        state["open_rollout"] = False
    elif action in ("conformance", "footprint"):
        if params["archs"] is not None:
            from edgeops.train.zoo import ARCHITECTURES

            for i, arch in enumerate(params["archs"]):
                if arch not in ARCHITECTURES:
                    raise _InvalidError(
                        _join(_join(path, "archs"), i),
                        f"unknown architecture '{arch}' (known: {_known(ARCHITECTURES)})",
                    )
                if arch in params["archs"][:i]:
                    raise _InvalidError(_join(_join(path, "archs"), i), f"'{arch}' is listed twice")
        if params["models"] == "zoo":
            if params.get("release") is not None:
                raise _InvalidError(
                    _join(path, "release"), "give models: zoo or a release, not both"
                )
            if params["targets"] is None:
                params["targets"] = QEMU_TARGETS
            if action == "conformance":
                if params.get("boards") is not None:
                    raise _InvalidError(
                        _join(path, "boards"),
                        "models: zoo runs on the plan's qemu board of each target; "
                        "give targets, not boards",
                    )
                for target in params["targets"]:
                    if not any(b.kind == "qemu" and b.target == target for b in boards):
                        raise _InvalidError(
                            _join(path, "targets"),
                            f"no qemu board emulates {target}: add one to boards",
                        )
        else:
            if "archs" in raw:
                raise _InvalidError(_join(path, "archs"), "archs go with models: zoo")
            release = release_ref(True)
            assert release is not None
            if action == "footprint":
                if release["firmware"] is None:
                    raise _InvalidError(
                        _join(path, "release"),
                        f"release '{params['release']}' has no firmware to measure",
                    )
                if params["targets"] is None:
                    params["targets"] = (release["firmware"],)
                elif params["targets"] != (release["firmware"],):
                    raise _InvalidError(
                        _join(path, "targets"),
                        f"release '{params['release']}' has firmware for {release['firmware']}",
                    )
            else:
                if params["targets"] is not None:
                    raise _InvalidError(_join(path, "targets"), "targets go with models: zoo")
                refs = params["boards"] if params["boards"] is not None else "all"
                params["boards"] = _resolve_boards(
                    refs, boards, _join(path, "boards"), ("qemu", "serial", "linux")
                )
                for name in params["boards"]:
                    spec = next(b for b in boards if name in b.instances)
                    problem = None
                    if spec.gateway_for is not None:
                        problem = (
                            f"board '{name}' is a gateway: name its microcontroller board "
                            f"'{spec.gateway_for}' (reached through it)"
                        )
                    elif spec.kind == "linux" and release["firmware"] is not None:
                        problem = (
                            f"board '{name}' runs no firmware; release "
                            f"'{params['release']}' is firmware"
                        )
                    elif spec.kind != "linux" and release["firmware"] is None:
                        problem = (
                            f"board '{name}' is a microcontroller; release "
                            f"'{params['release']}' has no firmware"
                        )
                    elif spec.kind == "qemu" and release["firmware"] != spec.target:
                        problem = (
                            f"board '{name}' emulates {spec.target}; release "
                            f"'{params['release']}' has firmware for {release['firmware']}"
                        )
                    if problem:
                        raise _InvalidError(_join(path, "boards"), problem)
    elif action in ("latency", "soak"):
        params["boards"] = _resolve_boards(params["boards"], boards, _join(path, "boards"))
    elif action == "check":
        params["boards"] = _resolve_boards(
            params["boards"], boards, _join(path, "boards"), ("linux",)
        )
    elif action == "fault":
        kind = params["kind"]
        used = (*FAULT_PARAMS[kind], "kind", "boards", "background")
        for key in raw:
            if key not in used:
                raise _InvalidError(
                    _join(path, key),
                    f"'{key}' is not a parameter of a {kind} fault (known: {_known(used)})",
                )
        if kind in _FAULTS_WITH_BOARDS:
            pick = params["boards"] if params["boards"] is not None else "all"
            bpath = _join(path, "boards")
            if isinstance(pick, dict):
                among = _resolve_boards(pick["of"], boards, _join(bpath, "of"), ("linux",))
                if pick["random"] > len(among):
                    raise _InvalidError(
                        _join(bpath, "random"),
                        f"cannot draw {pick['random']} of {len(among)} boards",
                    )
                params["boards"] = {"random": pick["random"], "of": among}
            else:
                params["boards"] = {
                    "random": None,
                    "of": _resolve_boards(pick, boards, bpath, ("linux",)),
                }
        elif "boards" in raw:
            raise _InvalidError(
                _join(path, "boards"), f"a {kind} fault hits no board in particular"
            )
        else:
            params["boards"] = {"random": None, "of": ()}
        if kind == "power_cut" and params["during"] == "update" and not state.get("open_rollout"):
            raise _InvalidError(
                _join(path, "during"),
                "no update is running: put the fault after a rollout with 'wait: false'",
            )


def parse_plan(data: object, source: str = "<plan>") -> Plan:
    """Validate ``data`` (a plan as read from YAML); PlanError names ``source`` and the path."""
    try:
        return _parse(data, source)
    except _InvalidError as fail:
        where = f"{fail.path}: " if fail.path else ""
        raise PlanError(f"{source}: {where}{fail.message}") from None


def _parse(data: object, source: str) -> Plan:
    top = _check_mapping(data, "")
    _no_unknown(top, _TOP_KEYS, "", "key")
    for key in ("name", "boards", "steps"):
        if key not in top:
            raise _InvalidError(key, "missing")
    name = _name(top["name"], "name")
    description = top.get("description", "")
    if not isinstance(description, str):
        raise _InvalidError("description", f"must be a string, not {_type(description)}")
    seed = _integer(0)(top.get("seed", 0), "seed")
    timeout = float(_number(1.0)(top.get("timeout_s", 600), "timeout_s"))
    boards_raw = _check_mapping(top["boards"], "boards")
    if not boards_raw:
        raise _InvalidError("boards", "a plan needs at least one board")
    boards: list[BoardSpec] = []
    seen: set[str] = set()
    for key, value in boards_raw.items():
        path = _join("boards", key)
        _name(key, path)
        spec = _parse_board(key, value, path)
        for instance in spec.instances:
            if instance in seen:
                raise _InvalidError(path, f"board name '{instance}' is used twice")
            seen.add(instance)
        boards.append(spec)
    board_tuple = tuple(boards)
    gateways: dict[str, str] = {}
    for spec in board_tuple:
        if spec.gateway_for is None:
            continue
        path = _join(_join("boards", spec.name), "gateway_for")
        target = next((b for b in board_tuple if b.name == spec.gateway_for), None)
        if target is None:
            raise _InvalidError(path, f"unknown board '{spec.gateway_for}'")
        if target.kind != "qemu":
            raise _InvalidError(
                path, f"board '{spec.gateway_for}' is a {target.kind} board, not qemu"
            )
        if spec.gateway_for in gateways:
            raise _InvalidError(
                path,
                f"board '{spec.gateway_for}' already has gateway '{gateways[spec.gateway_for]}'",
            )
        gateways[spec.gateway_for] = spec.name
    steps_raw = top["steps"]
    if not isinstance(steps_raw, list) or not steps_raw:
        raise _InvalidError("steps", "must be a non-empty list of steps")
    releases: dict[str, Mapping[str, Any]] = {}
    state: dict[str, Any] = {"names": set()}
    steps = tuple(
        _parse_step(i, raw, board_tuple, releases, state) for i, raw in enumerate(steps_raw)
    )
    if state.get("open_rollout"):
        raise _InvalidError(
            "steps", "a rollout with 'wait: false' is never waited for: add a 'wait' step"
        )
    return Plan(
        name=name,
        description=description.strip(),
        seed=seed,
        timeout_s=timeout,
        boards=board_tuple,
        steps=steps,
        source=source,
    )


def load_plan(path: Path) -> Plan:
    """Read and validate the plan at ``path``."""
    source = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise PlanError(f"{source}: not valid YAML{at}: {problem}") from None
    if data is None:
        raise PlanError(f"{source}: the plan is empty")
    return parse_plan(data, source)


def shipped_plans() -> dict[str, Path]:
    """The plans that come with the rig, by name."""
    return {path.stem: path for path in sorted(PLANS_DIR.glob("*.yaml"))}


def resolve_plan(plan: str) -> Path:
    """A path to a plan file, or the name of a shipped plan, to the file."""
    path = Path(plan)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in plan:
        if not path.is_file():
            raise PlanError(f"{plan}: no such plan file")
        return path
    shipped = shipped_plans()
    if plan in shipped:
        return shipped[plan]
    known = ", ".join(shipped) or "none"
    raise PlanError(f"{plan}: neither a plan file nor a shipped plan (shipped: {known})")
