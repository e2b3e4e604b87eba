"""The rollout planner: which devices, which of them the release fits, and in which waves.

Pure: it takes the spec, the devices (``FleetService.list_devices()``) and the release
target's custom metadata (its compatibility contract) and returns a :class:`RolloutPlan`; it
reads no database, repository or clock. Three steps:

1. **select** the devices matching ``spec.selection`` (tags, hardware tags, current model);
   a tag key no device has is a :class:`RolloutSpecError` (a typo would otherwise select
   nothing, or everything), so is a selection that matches no device;
2. **pre-check** each selected device against the contract with the agent's own
   :func:`device_agent.updater.contract.check_contract`, on facts from its reported state:
   hardware tags, runtimes, free memory, agent version. A device that does not fit is
   *excluded* with the reason, never targeted; one without a state report is excluded too,
   and one already running the release is left out as ``current``;
3. **schedule** the compatible devices (sorted by id, then shuffled with ``spec.seed`` if
   set): the canary, then exponential waves. Wave *k* notifies ``rate_k`` devices a minute
   until its rate-increase criteria are met (planned as if every device succeeds: the wave
   ends with the device that meets them, mid-minute if need be, as AWS IoT Jobs raises the
   rate at once), then ``rate_{k+1} = min(rate_k * increment_factor,
   max_rate_per_minute)``; a minute notifies ``floor(rate)`` devices, evenly over the minute
   (the live engine targets device *i* of a wave ``60 * i / rate`` seconds after the wave
   started). Minutes count from the canary (minute 0; a wave that ended mid-minute has the
   next one start at the next whole minute in the plan) and leave out the soak windows and
   gate checks between waves, which the live engine adds.

What a device reports that cannot be read (an agent version that is no version, hardware
that is not strings) excludes that device, with the reason; it never stops the plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from device_agent.updater.contract import DeviceFacts, check_contract
from device_agent.updater.errors import ContractError
from edgeops.rollout.spec import AbortCondition, RolloutSpec, RolloutSpecError

if TYPE_CHECKING:
    from edgeops.trust import TrustRepository

__all__ = [
    "CompatibleDevice",
    "ExcludedDevice",
    "PlannedDevice",
    "RolloutPlan",
    "Wave",
    "current_model_of",
    "facts_of",
    "plan_rollout",
    "precheck",
    "release_contract",
    "schedule",
    "select_devices",
]

# the runtime a loaded model reports in state.slots (Runtime.name) -> the target runtime
_LOADED_RUNTIME = {
    "litert": "litert",
    "tflite_runtime": "litert",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "serial": "mcu",
    "mcu": "mcu",
}
# "firmware": a gateway that flashes generated firmware onto an attached microcontroller
_TARGET_RUNTIMES = frozenset({"litert", "onnx", "mcu", "firmware"})


class PlannedDevice(Protocol):
    """What the planner reads of a device: :class:`edgeops.fleet.DeviceView` has it."""

    @property
    def device_id(self) -> str: ...
    @property
    def online(self) -> bool: ...
    @property
    def agent_version(self) -> str | None: ...
    @property
    def hardware(self) -> dict[str, str]: ...
    @property
    def tags(self) -> dict[str, str]: ...
    @property
    def reported(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CompatibleDevice:
    device_id: str
    online: bool
    current_model: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "online": self.online,
            "current_model": self.current_model,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ExcludedDevice:
    """A selected device the release is not sent to; ``kind`` is the contract's
    (``hardware``, ``runtime``, ``memory``, ``agent_version``), ``unreported`` (no state
    report yet) or ``current`` (already runs the release)."""

    device_id: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class Wave:
    """One wave: ``minutes[i]`` devices notified in minute ``start_minute + i``."""

    index: int
    kind: str  # canary | exponential
    rate_per_minute: int | None
    start_minute: int
    minutes: tuple[int, ...]
    devices: tuple[str, ...]
    abort: AbortCondition

    @property
    def size(self) -> int:
        return len(self.devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "rate_per_minute": self.rate_per_minute,
            "start_minute": self.start_minute,
            "minutes": list(self.minutes),
            "size": self.size,
            "devices": list(self.devices),
            "abort": self.abort.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class RolloutPlan:
    spec: RolloutSpec
    selected: tuple[str, ...]
    compatible: tuple[CompatibleDevice, ...]
    excluded: tuple[ExcludedDevice, ...]
    waves: tuple[Wave, ...] = field(default=())

    @property
    def scheduled(self) -> int:
        return sum(wave.size for wave in self.waves)

    @property
    def minutes(self) -> int:
        """Minutes of notifications, canary and exponential, without soak windows."""
        return sum(len(wave.minutes) for wave in self.waves)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "release": self.spec.release,
            "counts": {
                "selected": len(self.selected),
                "compatible": len(self.compatible),
                "excluded": len(self.excluded),
                "scheduled": self.scheduled,
                "waves": len(self.waves),
                "minutes": self.minutes,
            },
            "soak_seconds_per_wave": self.spec.gates.soak_seconds,
            "selected": list(self.selected),
            "compatible": [device.to_dict() for device in self.compatible],
            "excluded": [device.to_dict() for device in self.excluded],
            "waves": [wave.to_dict() for wave in self.waves],
        }


# -- reading a device's reported state --------------------------------------------------------


def _slots(device: PlannedDevice) -> Mapping[str, Any]:
    reported = device.reported if isinstance(device.reported, Mapping) else {}
    slots = reported.get("slots")
    return slots if isinstance(slots, Mapping) else {}


def _active_slot(slots: Mapping[str, Any]) -> Mapping[str, Any]:
    active = slots.get("active")
    slot = slots.get(active) if isinstance(active, str) and active in ("a", "b") else None
    return slot if isinstance(slot, Mapping) else {}


def current_model_of(device: PlannedDevice) -> str | None:
    """The model id the device runs: its champion's, else its active slot's."""
    slots = _slots(device)
    champion = slots.get("champion")
    if isinstance(champion, Mapping) and isinstance(champion.get("model_id"), str):
        return str(champion["model_id"])
    model_id = _active_slot(slots).get("model_id")
    return model_id if isinstance(model_id, str) else None


def current_target_of(device: PlannedDevice) -> str | None:
    """The target path in the device's active slot, if it says."""
    target = _active_slot(_slots(device)).get("target")
    return target if isinstance(target, str) else None


def _runtimes(device: PlannedDevice) -> set[str]:
    """Runtimes the device says it has (``runtimes`` in its state, if the agent reports it),
    and the one its loaded model runs on; empty if it says nothing."""
    reported = device.reported if isinstance(device.reported, Mapping) else {}
    found: set[str] = set()
    listed = reported.get("runtimes")
    if isinstance(listed, list):
        found |= {item for item in listed if isinstance(item, str) and item in _TARGET_RUNTIMES}
    champion = _slots(device).get("champion")
    if isinstance(champion, Mapping):
        loaded = _LOADED_RUNTIME.get(str(champion.get("runtime")))
        if loaded is not None:
            found.add(loaded)
    target = current_target_of(device)
    if target is not None:
        parts = target.split("/")
        if len(parts) >= 2 and parts[-2] in _TARGET_RUNTIMES:
            found.add(parts[-2])
    return found


def facts_of(device: PlannedDevice, needed_runtime: str | None = None) -> tuple[DeviceFacts, str]:
    """The contract facts of ``device`` from its reported state, and a note if a runtime was
    assumed: a device that reports no runtime at all is assumed to have ``needed_runtime``
    (it checks the contract itself again before installing, so nothing is bricked)."""
    reported = device.reported if isinstance(device.reported, Mapping) else {}
    free = reported.get("free_memory_bytes")
    if isinstance(free, bool) or not isinstance(free, int):
        free = None
    hardware = device.hardware if isinstance(device.hardware, Mapping) else {}
    runtimes = _runtimes(device)
    note = ""
    if not runtimes and needed_runtime is not None:
        runtimes = {needed_runtime}
        note = f"reports no runtimes; {needed_runtime} assumed (the device checks again)"
    facts = DeviceFacts(
        hardware={str(k): str(v) for k, v in hardware.items()},
        runtimes=runtimes,
        free_memory_bytes=free,
        agent_version=str(device.agent_version),
    )
    return facts, note


# -- 1. selection -----------------------------------------------------------------------------


def _matches(have: Mapping[str, Any], wanted: Mapping[str, str | list[str]]) -> bool:
    for key, value in wanted.items():
        actual = have.get(key)
        if actual is None:
            return False
        if isinstance(value, list):
            if actual not in value:
                return False
        elif actual != value:
            return False
    return True


def select_devices(spec: RolloutSpec, devices: Sequence[PlannedDevice]) -> list[PlannedDevice]:
    """The devices ``spec.selection`` picks, by id.

    Raises RolloutSpecError for a tag or hardware key that no device has, and for a
    selection that picks no device.
    """
    selection = spec.selection
    for field_name, wanted, seen in (
        ("tags", selection.tags, {key for d in devices for key in _dict(d.tags)}),
        ("hardware", selection.hardware, {key for d in devices for key in _dict(d.hardware)}),
    ):
        for key in wanted:
            if key not in seen:
                known = ", ".join(sorted(seen)) or "none"
                raise RolloutSpecError(
                    f"selection.{field_name}.{key}",
                    f"unknown {'tag' if field_name == 'tags' else 'hardware tag'} key: no "
                    f"enrolled device has it (keys seen: {known})",
                )
    models = selection.current_model
    wanted_models = {models} if isinstance(models, str) else set(models or ())
    chosen = [
        device
        for device in devices
        if _matches(_dict(device.tags), selection.tags)
        and _matches(_dict(device.hardware), selection.hardware)
        and (not wanted_models or current_model_of(device) in wanted_models)
    ]
    if not chosen:
        raise RolloutSpecError(
            "selection",
            f"empty target set: no device of the {len(devices)} known matches "
            f"{_describe_selection(spec)}",
        )
    return sorted(chosen, key=lambda device: device.device_id)


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _describe_selection(spec: RolloutSpec) -> str:
    parts = [
        f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in spec.selection.tags.items()
    ]
    parts += [
        f"hardware {k}={'|'.join(v) if isinstance(v, list) else v}"
        for k, v in spec.selection.hardware.items()
    ]
    models = spec.selection.current_model
    if models is not None:
        parts.append(f"current model {'|'.join(models) if isinstance(models, list) else models}")
    return ", ".join(parts) or "anything"


# -- 2. the contract pre-check ----------------------------------------------------------------


def _needed_runtime(custom: Mapping[str, Any]) -> str | None:
    contract = custom.get("edgeops") if isinstance(custom, Mapping) else None
    runtime = contract.get("runtime") if isinstance(contract, Mapping) else None
    return runtime if isinstance(runtime, str) else None


def precheck(
    spec: RolloutSpec,
    devices: Iterable[PlannedDevice],
    custom: Mapping[str, Any],
    busy: Mapping[str, str] | None = None,
) -> tuple[list[CompatibleDevice], list[ExcludedDevice]]:
    """Split ``devices`` into those the release fits and those it does not, with reasons.

    ``busy`` maps devices another rollout still has in hand to that rollout's id: they are
    excluded (``busy``), so two rollouts never fight over one device's desired release.

    A malformed contract is the release's fault, not a device's: RolloutSpecError on
    ``release``.
    """
    needed = _needed_runtime(custom)
    compatible: list[CompatibleDevice] = []
    excluded: list[ExcludedDevice] = []
    for device in devices:
        if device.agent_version is None or not _dict(device.reported):
            excluded.append(
                ExcludedDevice(device.device_id, "unreported", "no state report received yet")
            )
            continue
        if busy and device.device_id in busy:
            excluded.append(
                ExcludedDevice(
                    device.device_id, "busy", f"rollout {busy[device.device_id]} is updating it"
                )
            )
            continue
        if current_target_of(device) == spec.release:
            excluded.append(
                ExcludedDevice(device.device_id, "current", f"already runs {spec.release}")
            )
            continue
        facts, note = facts_of(device, needed)
        try:
            check_contract(custom, facts)
        except ContractError as exc:
            if exc.kind == "malformed":
                raise RolloutSpecError(
                    "release", f"{spec.release}: its compatibility contract is malformed: {exc}"
                ) from None
            excluded.append(ExcludedDevice(device.device_id, exc.kind, str(exc)))
            continue
        compatible.append(
            CompatibleDevice(
                device.device_id,
                bool(device.online),
                current_model_of(device),
                (note,) if note else (),
            )
        )
    return compatible, excluded


# -- 3. the waves -----------------------------------------------------------------------------


def schedule(spec: RolloutSpec, device_ids: Sequence[str]) -> list[Wave]:
    """The canary and exponential waves over ``device_ids`` (sorted, then shuffled with
    ``spec.seed`` if set); every device is in exactly one wave."""
    order = sorted(device_ids)
    if spec.seed is not None:
        random.Random(spec.seed).shuffle(order)
    total = len(order)
    if total == 0:
        return []
    waves_spec = spec.waves
    canary_size = waves_spec.canary.size(total)
    waves = [
        Wave(
            index=0,
            kind="canary",
            rate_per_minute=None,
            start_minute=0,
            minutes=(canary_size,),
            devices=tuple(order[:canary_size]),
            abort=waves_spec.canary.abort or waves_spec.abort,
        )
    ]
    exponential = waves_spec.exponential
    criteria = exponential.rate_increase_criteria
    rate = float(exponential.base_rate_per_minute)
    position = canary_size
    minute = 1
    while position < total:
        per_minute = max(1, min(math.floor(rate + 1e-9), exponential.max_rate_per_minute))
        threshold = criteria.threshold if criteria is not None else per_minute
        minutes: list[int] = []
        start, start_minute = position, minute
        notified = 0
        while position < total and notified < threshold:
            count = min(per_minute, total - position, threshold - notified)
            minutes.append(count)
            position += count
            notified += count
            minute += 1
        waves.append(
            Wave(
                index=len(waves),
                kind="exponential",
                rate_per_minute=per_minute,
                start_minute=start_minute,
                minutes=tuple(minutes),
                devices=tuple(order[start:position]),
                abort=waves_spec.abort,
            )
        )
        rate = min(rate * exponential.increment_factor, float(exponential.max_rate_per_minute))
    return waves


def plan_rollout(
    spec: RolloutSpec,
    devices: Sequence[PlannedDevice],
    custom: Mapping[str, Any],
    busy: Mapping[str, str] | None = None,
) -> RolloutPlan:
    """Select, pre-check and schedule: see the module docstring (``busy``: see
    :func:`precheck`)."""
    selected = select_devices(spec, devices)
    compatible, excluded = precheck(spec, selected, custom, busy)
    waves = schedule(spec, [device.device_id for device in compatible])
    return RolloutPlan(
        spec=spec,
        selected=tuple(device.device_id for device in selected),
        compatible=tuple(compatible),
        excluded=tuple(excluded),
        waves=tuple(waves),
    )


def release_contract(repository: TrustRepository, release: str) -> dict[str, Any]:
    """The custom metadata (compatibility contract) of target ``release``.

    The one step that reads something: the release repository. RolloutSpecError on
    ``release`` if the repository has no such target.
    """
    from edgeops.trust.errors import MetadataError

    try:
        target = repository.get_target(release)
    except MetadataError:
        known = sorted(target.path for target in repository.targets())
        hint = f"; released targets: {', '.join(known[:5])}" if known else "; nothing released"
        more = f" (and {len(known) - 5} more)" if len(known) > 5 else ""
        raise RolloutSpecError(
            "release",
            f"unknown release {release!r}: not a target of the release repository{hint}{more}",
        ) from None
    custom = target.custom
    return dict(custom) if isinstance(custom, Mapping) else {}
