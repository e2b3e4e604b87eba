"""The rollout spec: a typed document (YAML or JSON) saying what to roll out, to whom, how fast,
and when to stop.

    name: digits-v4
    release: digits-mlp/4/litert/model.tflite     # a target of the release repository
    selection:
      tags: {site: berlin}                        # enrollment tags, all must match
      hardware: {arch: [aarch64, x86_64]}         # hardware tags: a value, or any of a list
      current_model: m-3f2a9c01b7de               # devices running this model id (or a list)
    waves:
      canary: {percent: 1.0}                      # or {count: 10}
      exponential:
        base_rate_per_minute: 10                  # 1..60000 (AWS IoT Jobs: 1..1000)
        increment_factor: 2.0                     # 1.1..5.0 (AWS IoT Jobs' range)
        max_rate_per_minute: 1000                 # 1..60000, default 1000 (AWS's most)
        rate_increase_criteria: {notified: 20}    # or {succeeded: 20}; none: every minute
      success: {min_success_percent: 95.0}
      abort: {min_devices: 10, failure_percent: 10.0, failure_count: null,
              failure_types: [failed, rejected, timed_out]}
    device_timeout_seconds: 600
    gates:
      soak_seconds: 300
      max_error_rate: 0.01
      max_crash_rate: 0.001
      max_latency_p95_ratio: 1.25
      divergence: {metric: psi, max: 0.2}
      min_shadow_agreement: 0.95
    seed: 7

Every model forbids unknown fields, and every threshold is range-checked. :func:`load_spec`
/ :func:`parse_spec` read YAML or JSON, :func:`dump_spec` writes the same format back, and
``parse_spec(dump_spec(spec, fmt), fmt) == spec``. Every failure is one
:class:`RolloutSpecError` whose message starts with the field's path, e.g.
``waves.exponential.increment_factor: must be between 1.1 and 5``.

What needs the fleet and the release repository (unknown tag keys, an empty target set, an
unknown release) is checked by :mod:`edgeops.rollout.plan`, with the same error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from edgeops.errors import ConfigError

__all__ = [
    "AWS_MAX_RATE_PER_MINUTE",
    "AWS_MIN_INCREMENT_FACTOR",
    "MAX_RATE_PER_MINUTE",
    "AbortCondition",
    "Canary",
    "Divergence",
    "Exponential",
    "Gates",
    "RateIncreaseCriteria",
    "RolloutSpec",
    "RolloutSpecError",
    "Selection",
    "SpecFormat",
    "SuccessCondition",
    "Waves",
    "dump_spec",
    "load_spec",
    "parse_spec",
]

AWS_MAX_RATE_PER_MINUTE = 1000  # the default most: AWS IoT Jobs' limit
MAX_RATE_PER_MINUTE = 60_000  # a device every millisecond; AWS IoT Jobs stops at 1,000
AWS_MIN_INCREMENT_FACTOR = 1.1
AWS_MAX_INCREMENT_FACTOR = 5.0
MAX_DEVICE_TIMEOUT_S = 7 * 24 * 3600  # AWS IoT Jobs' longest in-progress timeout: 7 days
MAX_SOAK_S = 7 * 24 * 3600
MAX_LATENCY_RATIO = 100.0
MAX_PSI = 10.0  # PSI is unbounded; above ~0.25 is already "a major shift"


class RolloutSpecError(ConfigError):
    """An invalid rollout spec; the message starts with the field's path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class SpecFormat(StrEnum):
    yaml = "yaml"
    json = "json"


def _fmt(value: float) -> str:
    """1.1 -> '1.1', 5.0 -> '5', 1000 -> '1000'."""
    return f"{value:g}"


def _between(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number between {_fmt(low)} and {_fmt(high)}")
        if low_open and (value <= low or value > high):
            raise ValueError(f"must be above {_fmt(low)} and at most {_fmt(high)}")
        if value < low or value > high:
            raise ValueError(f"must be between {_fmt(low)} and {_fmt(high)}")
        return value

    return check


def _at_least(low: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return check


PositiveInt = Annotated[StrictInt, AfterValidator(_at_least(1))]
Percent = Annotated[StrictFloat, AfterValidator(_between(0.0, 100.0, low_open=True))]
Rate = Annotated[StrictFloat, AfterValidator(_between(0.0, 1.0))]
PerMinute = Annotated[StrictInt, AfterValidator(_between(1, MAX_RATE_PER_MINUTE))]
Factor = Annotated[
    StrictFloat, AfterValidator(_between(AWS_MIN_INCREMENT_FACTOR, AWS_MAX_INCREMENT_FACTOR))
]
LatencyRatio = Annotated[StrictFloat, AfterValidator(_between(1.0, MAX_LATENCY_RATIO))]
SoakSeconds = Annotated[StrictInt, AfterValidator(_between(0, MAX_SOAK_S))]
TimeoutSeconds = Annotated[StrictInt, AfterValidator(_between(1, MAX_DEVICE_TIMEOUT_S))]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_TAG = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            "must be 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


def _release(value: str) -> str:
    from edgeops.trust.errors import TargetPathError
    from edgeops.trust.metadata import check_target_path

    try:
        return check_target_path(value)
    except TargetPathError as exc:
        raise ValueError(f"not a target path: {exc}") from None


TagValue = StrictStr | list[StrictStr]


def _tag_map(value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    for key, wanted in value.items():
        if not _TAG.fullmatch(key):
            raise ValueError(f"tag key {key!r} must be 1-64 letters, digits, '_', '.', '-'")
        if isinstance(wanted, list) and not wanted:
            raise ValueError(f"tag {key!r}: the list of values is empty")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selection(_Model):
    """Which devices: every given criterion must hold (no criterion: the whole fleet)."""

    tags: Annotated[dict[str, TagValue], AfterValidator(_tag_map)] = Field(
        default_factory=dict, description="enrollment tags: key -> value or any of values"
    )
    hardware: Annotated[dict[str, TagValue], AfterValidator(_tag_map)] = Field(
        default_factory=dict, description="reported hardware tags: key -> value or any of values"
    )
    current_model: StrictStr | list[StrictStr] | None = Field(
        default=None, description="model id(s) the device runs now (champion or active slot)"
    )

    @model_validator(mode="after")
    def _models_not_empty(self) -> Self:
        if isinstance(self.current_model, list) and not self.current_model:
            raise ValueError("current_model: the list of model ids is empty")
        return self


FailureType = Literal["failed", "rejected", "timed_out"]
FAILURE_TYPES: tuple[FailureType, ...] = ("failed", "rejected", "timed_out")


class AbortCondition(_Model):
    """A wave aborts the rollout once ``min_devices`` of it finished and failures reach
    ``failure_count`` or ``failure_percent`` of the finished ones (at least one is given)."""

    min_devices: PositiveInt = 1
    failure_count: PositiveInt | None = None
    failure_percent: Percent | None = None
    failure_types: list[FailureType] = Field(
        default_factory=lambda: list(FAILURE_TYPES),
        description="what counts as a failure: failed install or health check, contract "
        "refused on the device, no answer within device_timeout_seconds",
    )

    @model_validator(mode="after")
    def _some_threshold(self) -> Self:
        if self.failure_count is None and self.failure_percent is None:
            raise ValueError("give failure_count, failure_percent or both")
        if not self.failure_types:
            raise ValueError("failure_types: name at least one failure type")
        if len(set(self.failure_types)) != len(self.failure_types):
            raise ValueError("failure_types: a failure type is listed twice")
        return self

    def aborts(self, finished: int, failures: int) -> bool:
        """Whether ``failures`` out of ``finished`` devices of a wave trip this condition."""
        if finished < self.min_devices or finished <= 0:
            return False
        if self.failure_count is not None and failures >= self.failure_count:
            return True
        return self.failure_percent is not None and (
            failures * 100.0 / finished >= self.failure_percent
        )


class Canary(_Model):
    """The first wave: a count of devices or a percent of the compatible ones (rounded up)."""

    count: PositiveInt | None = None
    percent: Percent | None = None
    abort: AbortCondition | None = Field(
        default=None, description="the canary's own abort condition (default: waves.abort)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.count is None) == (self.percent is None):
            raise ValueError("give exactly one of count and percent")
        return self

    def size(self, total: int) -> int:
        """The canary's device count out of ``total`` compatible devices (at least 1)."""
        if total <= 0:
            return 0
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, max(1, math.ceil(total * self.percent / 100.0 - 1e-9)))


class RateIncreaseCriteria(_Model):
    """When the rate grows: after this many devices of the current rate were notified, or
    succeeded (exactly one; AWS IoT Jobs' numberOfNotifiedThings / numberOfSucceededThings)."""

    notified: PositiveInt | None = None
    succeeded: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.notified is None) == (self.succeeded is None):
            raise ValueError("give exactly one of notified and succeeded")
        return self

    @property
    def threshold(self) -> int:
        value = self.notified if self.notified is not None else self.succeeded
        assert value is not None
        return value


class Exponential(_Model):
    """After the canary: ``base_rate_per_minute`` devices a minute, notified evenly (one
    every ``60 / rate`` seconds), the rate multiplied by ``increment_factor`` each time the
    criteria are met, never above ``max_rate_per_minute``."""

    base_rate_per_minute: PerMinute
    increment_factor: Factor
    max_rate_per_minute: PerMinute = AWS_MAX_RATE_PER_MINUTE
    rate_increase_criteria: RateIncreaseCriteria | None = Field(
        default=None, description="none: the rate grows every minute"
    )

    @model_validator(mode="before")
    @classmethod
    def _max_defaults_to_base(cls, data: Any) -> Any:
        """Without ``max_rate_per_minute``: 1,000 (AWS's most), or the base rate if higher."""
        if isinstance(data, dict) and "max_rate_per_minute" not in data:
            base = data.get("base_rate_per_minute")
            if (
                isinstance(base, int)
                and not isinstance(base, bool)
                and base > AWS_MAX_RATE_PER_MINUTE
            ):
                return {**data, "max_rate_per_minute": base}
        return data

    @model_validator(mode="after")
    def _max_not_below_base(self) -> Self:
        if self.max_rate_per_minute < self.base_rate_per_minute:
            raise ValueError(
                f"max_rate_per_minute ({self.max_rate_per_minute}) is below "
                f"base_rate_per_minute ({self.base_rate_per_minute})"
            )
        return self


class SuccessCondition(_Model):
    """A wave succeeds when this share of its devices committed the release (gates apart)."""

    min_success_percent: Percent = 100.0


class Waves(_Model):
    canary: Canary
    exponential: Exponential
    success: SuccessCondition = Field(default_factory=SuccessCondition)
    abort: AbortCondition = Field(
        default_factory=lambda: AbortCondition(min_devices=1, failure_percent=10.0)
    )


class Divergence(_Model):
    """Output distribution vs the release's reference: PSI (0..10) or Jensen-Shannon (0..1,
    base 2)."""

    metric: Literal["psi", "js"]
    max: StrictFloat

    @model_validator(mode="after")
    def _in_range(self) -> Self:
        high = MAX_PSI if self.metric == "psi" else 1.0
        if not math.isfinite(self.max) or not 0.0 < self.max <= high:
            raise ValueError(f"max: must be above 0 and at most {_fmt(high)} for {self.metric}")
        return self


class Gates(_Model):
    """A wave is promoted only when its devices' field metrics over ``soak_seconds`` pass
    every threshold given (a threshold left out is no gate)."""

    soak_seconds: SoakSeconds = 300
    max_error_rate: Rate | None = None
    max_crash_rate: Rate | None = None
    max_latency_p95_ratio: LatencyRatio | None = Field(
        default=None, description="inference latency p95 / the previous release's p95"
    )
    divergence: Divergence | None = None
    min_shadow_agreement: Rate | None = Field(
        default=None, description="agreement with the champion, where shadow data exists"
    )


class RolloutSpec(_Model):
    """A rollout, as the operator writes it. See the module docstring."""

    spec_version: Literal[1] = 1
    name: Annotated[StrictStr, AfterValidator(_name)]
    release: Annotated[StrictStr, AfterValidator(_release)] = Field(
        description="target path in the release repository"
    )
    selection: Selection = Field(default_factory=Selection)
    waves: Waves
    device_timeout_seconds: TimeoutSeconds = 600
    gates: Gates = Field(default_factory=Gates)
    seed: StrictInt | None = Field(
        default=None, description="shuffle the compatible devices with this seed (none: by id)"
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- reading and writing ----------------------------------------------------------------------


_BRANCHES = {"str", "int", "float", "bool"}


def _is_branch(item: int | str) -> bool:
    """A pydantic union branch label in an error's location (``str``, ``list[str]``)."""
    return isinstance(item, str) and ("[" in item or item in _BRANCHES)


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """The field path and the message of one pydantic error, in our words."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid"))
    union = False
    while loc and _is_branch(loc[-1]):  # str | list[str]: a value that is neither
        loc, union = loc[:-1], True
    if union and kind.endswith("_type"):
        message = f"must be a string or a list of strings; got {error.get('input')!r}"
    elif kind == "value_error":
        message = str(error.get("ctx", {}).get("error", message))
        # a model validator names its own field: "failure_types: ..." -> path.failure_types
        head, sep, rest = message.partition(": ")
        if sep and re.fullmatch(r"[a-z_]+", head):
            loc = (*loc, head)
            message = rest
    elif kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "missing (required)"
    elif kind == "literal_error":
        message = (
            f"must be one of {error.get('ctx', {}).get('expected', '')}; got {error.get('input')!r}"
        )
    elif kind.endswith("_type"):
        message = f"{message[0].lower()}{message[1:]}; got {error.get('input')!r}"
    return _path(loc), message


def _validate(document: Any) -> RolloutSpec:
    if not isinstance(document, Mapping):
        raise RolloutSpecError(
            "", f"a rollout spec must be a mapping, got {type(document).__name__}"
        )
    try:
        return RolloutSpec.model_validate(document)
    except ValidationError as exc:
        path, message = _problem(exc.errors()[0])
        raise RolloutSpecError(path, message) from None


def parse_spec(text: str, fmt: SpecFormat | str = SpecFormat.yaml) -> RolloutSpec:
    """The spec in ``text`` (YAML or JSON), validated."""
    fmt = SpecFormat(fmt)
    try:
        document = json.loads(text) if fmt is SpecFormat.json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise RolloutSpecError("", f"not valid {fmt.value.upper()}: {detail}") from None
    return _validate(document)


def spec_format(path: Path) -> SpecFormat:
    """JSON for ``.json``, else YAML (which reads JSON too)."""
    return SpecFormat.json if path.suffix.lower() == ".json" else SpecFormat.yaml


def load_spec(path: Path) -> RolloutSpec:
    """The spec in the file ``path``: ``.json`` is JSON, anything else YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RolloutSpecError(
            "", f"cannot read rollout spec {path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise RolloutSpecError("", f"rollout spec {path} is not UTF-8 text") from None
    return parse_spec(text, spec_format(path))


def dump_spec(spec: RolloutSpec, fmt: SpecFormat | str = SpecFormat.yaml) -> str:
    """``spec`` as YAML or JSON text; :func:`parse_spec` reads it back equal."""
    document = spec.to_dict()
    if SpecFormat(fmt) is SpecFormat.json:
        return json.dumps(document, indent=2, allow_nan=False) + "\n"
    dumped: str = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    return dumped
