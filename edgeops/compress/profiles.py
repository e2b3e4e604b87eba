"""Device profiles: what a target device offers a model (flash, RAM, runtime, operators).

The built-in profiles are in ``edgeops/compress/profiles.toml``; users add or replace
profiles with a TOML file of the same shape::

    [profiles.my-board]
    runtime = "tflm"            # or "litert"
    flash_bytes = 262144
    ram_bytes = 65536
    ops = ["CONV_2D", "FULLY_CONNECTED", "RESHAPE", "SOFTMAX"]   # optional: any builtin
    modes = ["int8"]                                              # optional
    latency_budget_ms = 20.0                                      # optional
    description = "..."                                           # optional

A malformed file raises :class:`ProfileError` naming the file, the profile and the field.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeops.compress.errors import ProfileError, UnknownProfileError
from edgeops.compress.quantize import QUANTIZATION_MODES

__all__ = ["RUNTIMES", "DeviceProfile", "Needs", "get_profile", "load_profiles"]

RUNTIMES = ("tflm", "litert")
_FIELDS = {
    "runtime",
    "flash_bytes",
    "ram_bytes",
    "ops",
    "modes",
    "latency_budget_ms",
    "description",
}
_DEFAULT_MODES = {"tflm": ("int8",), "litert": ("int8", "float16", "dynamic")}


@dataclass(frozen=True)
class Needs:
    """What one compressed model needs from a device."""

    flash_bytes: int
    ram_bytes: int | None  # None: the profile's runtime cannot run it (no TFLM arena)
    ops: tuple[str, ...]
    latency_ms: float | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """A target device's budget for one model."""

    name: str
    runtime: str
    flash_bytes: int
    ram_bytes: int
    ops: frozenset[str] | None = None  # None: every TFLite builtin
    modes: tuple[str, ...] = ("int8",)
    latency_budget_ms: float | None = None
    description: str = ""
    source: str = "built-in"
    extra: dict[str, Any] = field(default_factory=dict)

    def misfits(self, needs: Needs) -> list[str]:
        """Why a model with ``needs`` does not fit; empty if it fits."""
        reasons: list[str] = []
        if needs.flash_bytes > self.flash_bytes:
            reasons.append(f"flash {needs.flash_bytes} B > {self.flash_bytes} B")
        if needs.ram_bytes is None:
            reasons.append(f"{self.runtime} cannot plan its memory (not a full-integer model)")
        elif needs.ram_bytes > self.ram_bytes:
            reasons.append(f"RAM {needs.ram_bytes} B > {self.ram_bytes} B")
        if self.ops is not None:
            missing = sorted(set(needs.ops) - self.ops)
            if missing:
                reasons.append(f"ops not supported: {', '.join(missing)}")
        if (
            self.latency_budget_ms is not None
            and needs.latency_ms is not None
            and needs.latency_ms > self.latency_budget_ms
        ):
            reasons.append(f"latency {needs.latency_ms:.3f} ms > {self.latency_budget_ms} ms")
        return reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runtime": self.runtime,
            "flash_bytes": self.flash_bytes,
            "ram_bytes": self.ram_bytes,
            "ops": sorted(self.ops) if self.ops is not None else None,
            "modes": list(self.modes),
            "latency_budget_ms": self.latency_budget_ms,
            "description": self.description,
            "source": self.source,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


def _builtin_text() -> tuple[str, str]:
    resource = resources.files("edgeops.compress").joinpath("profiles.toml")
    return resource.read_text(encoding="utf-8"), "built-in profiles.toml"


def _positive_int(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(f"{where}: {name} must be a positive integer (bytes), not {value!r}")
    return value


def _string_list(value: Any, where: str, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ProfileError(f"{where}: {name} must be a list of names, not {value!r}")
    return list(value)


def _parse_profile(name: str, table: Any, source: str) -> DeviceProfile:
    where = f"{source}: profile {name!r}"
    if not isinstance(table, dict):
        raise ProfileError(f"{where} must be a table, not {type(table).__name__}")
    for required in ("runtime", "flash_bytes", "ram_bytes"):
        if required not in table:
            raise ProfileError(f"{where}: missing field {required!r}")
    runtime = table["runtime"]
    if runtime not in RUNTIMES:
        raise ProfileError(
            f"{where}: runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}"
        )
    ops = table.get("ops")
    modes = table.get("modes", list(_DEFAULT_MODES[runtime]))
    mode_list = _string_list(modes, where, "modes")
    unknown = [m for m in mode_list if m not in QUANTIZATION_MODES]
    if unknown or not mode_list:
        raise ProfileError(
            f"{where}: modes must be a non-empty list of {', '.join(QUANTIZATION_MODES)}, "
            f"not {modes!r}"
        )
    latency = table.get("latency_budget_ms")
    if latency is not None and (
        isinstance(latency, bool)
        or not isinstance(latency, int | float)
        or not math.isfinite(latency)
        or latency <= 0
    ):
        raise ProfileError(f"{where}: latency_budget_ms must be a positive number, not {latency!r}")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"{where}: description must be a string, not {description!r}")
    return DeviceProfile(
        name=name,
        runtime=runtime,
        flash_bytes=_positive_int(table["flash_bytes"], where, "flash_bytes"),
        ram_bytes=_positive_int(table["ram_bytes"], where, "ram_bytes"),
        ops=frozenset(_string_list(ops, where, "ops")) if ops is not None else None,
        modes=tuple(mode_list),
        latency_budget_ms=float(latency) if latency is not None else None,
        description=description,
        source=source,
        extra={k: v for k, v in table.items() if k not in _FIELDS},
    )


def _parse(text: str, source: str) -> dict[str, DeviceProfile]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source} is not valid TOML: {exc}") from None
    tables = document.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise ProfileError(f"{source} has no [profiles.NAME] tables")
    return {name: _parse_profile(name, table, source) for name, table in tables.items()}


def load_profiles(extra: Path | None = None) -> dict[str, DeviceProfile]:
    """The built-in profiles, plus (replacing same-named ones) those in the file ``extra``."""
    profiles = _parse(*_builtin_text())
    if extra is not None:
        try:
            text = Path(extra).read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read profile file {extra}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ProfileError(f"profile file {extra} is not UTF-8 text") from None
        profiles.update(_parse(text, str(extra)))
    return profiles


def get_profile(name: str, extra: Path | None = None) -> DeviceProfile:
    """The profile called ``name``; :class:`UnknownProfileError` lists the known ones."""
    profiles = load_profiles(extra)
    try:
        return profiles[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown device profile {name!r}; known profiles: {', '.join(sorted(profiles))}"
        ) from None
