"""The compatibility contract: does a signed artifact fit this device?

A release's TUF target carries its contract in ``custom.edgeops`` (see docs/protocol.md)::

    {"edgeops": {
       "card": {...the model card...},
       "hardware": {"arch": ["x86_64", "aarch64"]},   # each tag: the device's value must be listed
       "min_free_memory_bytes": 123456,               # or null
       "runtime": "litert"                            # litert | onnx | mcu
    }}

:func:`check_contract` checks it against :class:`DeviceFacts` after TUF verified the metadata
(so the contract is signed, but it still comes from the network and is parsed strictly): the
hardware tags, a runtime this device has, free memory (at least ``min_free_memory_bytes`` and
the card's ``arena_bytes``) and the agent version the card asks for. The first failure raises
:class:`~device_agent.updater.errors.ContractError` whose ``kind`` is ``hardware``,
``runtime``, ``memory``, ``agent_version`` or ``malformed``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent._version import __version__
from device_agent.card import CardError, ModelCard
from device_agent.updater.errors import ContractError

__all__ = [
    "CARD_RUNTIME",
    "FIRMWARE_CARD_RUNTIME",
    "TARGET_RUNTIMES",
    "DeviceFacts",
    "available_runtimes",
    "check_contract",
    "compare_versions",
    "free_memory_bytes",
    "parse_version",
]

log = logging.getLogger(__name__)

CARD_RUNTIME = {"litert": "litert", "onnx": "onnx", "mcu": "tflm"}
"""Target runtime -> the runtime its model card names."""
TARGET_RUNTIMES = tuple(CARD_RUNTIME)
FIRMWARE_CARD_RUNTIME = "firmware"
"""Card runtime of generated firmware (a target of runtime ``mcu``): only a device that
reports the ``firmware`` runtime (it can flash a microcontroller) takes it."""

_RUNTIME_MODULES = {
    "litert": ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"),
    "onnx": ("onnxruntime",),
}

_VERSION = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|alpha|b|beta|c|rc|pre|preview|dev)[-_.]?(?P<pre_n>\d*))?"
    r"(?:\.?post(?P<post>\d*))?"
    r"(?:\+[A-Za-z0-9.]+)?$",
    re.IGNORECASE,
)
_PRE_RANK = {
    "dev": 0,
    "a": 1,
    "alpha": 1,
    "b": 2,
    "beta": 2,
    "c": 3,
    "rc": 3,
    "pre": 3,
    "preview": 3,
}
_FINAL_RANK = 4


@dataclass(frozen=True)
class DeviceFacts:
    """What the device is and has, for the contract check."""

    hardware: dict[str, str]
    runtimes: set[str] = field(default_factory=set)
    free_memory_bytes: int | None = None
    agent_version: str = __version__

    @classmethod
    def detect(
        cls, hardware: Mapping[str, str], *, extra_runtimes: set[str] | None = None
    ) -> DeviceFacts:
        """The facts of this machine: ``hardware`` tags as given, runtimes that import,
        available memory from /proc/meminfo, this agent's version. ``extra_runtimes`` adds
        runtimes found otherwise (``mcu`` for a microcontroller on a serial port)."""
        return cls(
            hardware=dict(hardware),
            runtimes=available_runtimes() | set(extra_runtimes or ()),
            free_memory_bytes=free_memory_bytes(),
            agent_version=__version__,
        )


def available_runtimes() -> set[str]:
    """The target runtimes this Python can run: ``litert`` and/or ``onnx``."""
    found: set[str] = set()
    for runtime, modules in _RUNTIME_MODULES.items():
        for module in modules:
            try:
                importlib.import_module(module)
            except (ImportError, OSError) as exc:  # OSError: a shared library failed to load
                log.debug("runtime %s: %s does not import: %s", runtime, module, exc)
                continue
            found.add(runtime)
            break
    return found


def installed_runtimes() -> set[str]:
    """The target runtimes whose packages are installed, found without importing them (what
    the agent reports in its state; :func:`available_runtimes` is the real check)."""
    return {
        runtime
        for runtime, modules in _RUNTIME_MODULES.items()
        if any(_installed(module) for module in modules)
    }


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def free_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` in bytes, or None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == "MemAvailable":
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def parse_version(text: str) -> tuple[tuple[int, ...], int, int, int]:
    """A sortable key of a version like ``1.2``, ``1.2.0rc1``, ``0.3.dev2``, ``1.0.post1``.

    Release numbers compare numerically with missing ones as zero (``1.2 == 1.2.0``); a
    pre-release (dev < a < b < rc) sorts before its release, a post-release after it.
    Raises ValueError for anything else.
    """
    match = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a version number (expected e.g. 1.2.3 or 1.3.0rc1)")
    release = [int(part) for part in match.group("release").split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre = match.group("pre")
    rank = _PRE_RANK[pre.lower()] if pre else _FINAL_RANK
    pre_number = int(match.group("pre_n") or 0) if pre else 0
    post = match.group("post")
    post_number = int(post or 0) + 1 if post is not None else 0
    return tuple(release), rank, pre_number, post_number


def compare_versions(left: str, right: str) -> int:
    """-1, 0 or 1 as ``left`` is older than, equal to or newer than ``right``."""
    a, b = parse_version(left), parse_version(right)
    return (a > b) - (a < b)


def check_contract(custom: Any, facts: DeviceFacts) -> ModelCard:
    """Check a target's ``custom`` metadata against ``facts``; the parsed model card.

    Raises ContractError naming the first requirement this device does not meet.
    """
    contract = _edgeops(custom)
    runtime = contract.get("runtime")
    if runtime not in CARD_RUNTIME:
        raise ContractError(
            "malformed",
            f"contract: field 'runtime' must be one of {', '.join(TARGET_RUNTIMES)}, "
            f"got {runtime!r}",
        )
    raw_card = contract.get("card")
    try:
        # the hub signs the card as JSON text (canonical JSON, which TUF signs, has no floats)
        if isinstance(raw_card, str):
            card = ModelCard.from_json(raw_card)
        else:
            card = ModelCard.from_dict(_mapping(raw_card, "card"))
    except CardError as exc:
        raise ContractError("malformed", f"contract: field 'card': {exc}") from exc
    firmware = runtime == "mcu" and card.runtime == FIRMWARE_CARD_RUNTIME
    if card.runtime != CARD_RUNTIME[runtime] and not firmware:
        raise ContractError(
            "malformed",
            f"contract: target runtime {runtime!r} needs a card for {CARD_RUNTIME[runtime]!r}, "
            f"the card says {card.runtime!r}",
        )
    _check_hardware(_mapping(contract.get("hardware", {}), "hardware"), facts)
    needed = FIRMWARE_CARD_RUNTIME if firmware else runtime
    if needed not in facts.runtimes:
        have = ", ".join(sorted(facts.runtimes)) or "none"
        raise ContractError(
            "runtime",
            f"the artifact needs the {needed} runtime; this device has: {have}",
        )
    _check_memory(contract.get("min_free_memory_bytes"), card, facts)
    _check_agent_version(card, facts)
    return card


def _edgeops(custom: Any) -> Mapping[str, Any]:
    if not isinstance(custom, Mapping):
        raise ContractError(
            "malformed", f"target custom metadata must be an object, got {type(custom).__name__}"
        )
    if "edgeops" not in custom:
        raise ContractError("malformed", "target custom metadata has no 'edgeops' contract")
    return _mapping(custom["edgeops"], "edgeops")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ContractError(
            "malformed", f"contract: field {where!r} must be an object, got {type(value).__name__}"
        )
    return value


def _check_hardware(required: Mapping[str, Any], facts: DeviceFacts) -> None:
    for tag, allowed in required.items():
        if not isinstance(allowed, list) or not all(isinstance(v, str) for v in allowed):
            raise ContractError(
                "malformed",
                f"contract: hardware tag {tag!r} must list the values it fits, got {allowed!r}",
            )
        value = facts.hardware.get(tag)
        if value is None:
            raise ContractError(
                "hardware",
                f"the artifact needs hardware tag {tag!r} in {allowed}; this device has no "
                f"{tag!r} tag",
            )
        if value not in allowed:
            raise ContractError(
                "hardware",
                f"the artifact fits hardware {tag}={'|'.join(allowed)}; this device is "
                f"{tag}={value}",
            )


def _check_memory(min_free: Any, card: ModelCard, facts: DeviceFacts) -> None:
    if min_free is not None and (
        isinstance(min_free, bool) or not isinstance(min_free, int) or min_free < 0
    ):
        raise ContractError(
            "malformed",
            f"contract: field 'min_free_memory_bytes' must be a non-negative integer or null, "
            f"got {min_free!r}",
        )
    free = facts.free_memory_bytes
    if free is None:
        if min_free is not None or card.arena_bytes is not None:
            log.warning("free memory unknown on this device: memory requirement not checked")
        return
    if min_free is not None and free < min_free:
        raise ContractError(
            "memory",
            f"the artifact needs {min_free} bytes of free memory; this device has {free}",
        )
    if card.arena_bytes is not None and free < card.arena_bytes:
        raise ContractError(
            "memory",
            f"the model's arena needs {card.arena_bytes} bytes; this device has {free} free",
        )


def _check_agent_version(card: ModelCard, facts: DeviceFacts) -> None:
    try:
        needed = parse_version(card.min_agent_version)
    except ValueError as exc:
        raise ContractError(
            "malformed", f"contract: card field 'min_agent_version': {exc}"
        ) from exc
    try:
        running = parse_version(facts.agent_version)
    except ValueError as exc:
        raise ContractError("agent_version", f"this agent's version: {exc}") from exc
    if running < needed:
        raise ContractError(
            "agent_version",
            f"the model needs agent {card.min_agent_version} or newer; this agent is "
            f"{facts.agent_version}",
        )
