"""The stages of a model version and the one table of allowed promotions.

::

    candidate ──▶ staging ──▶ production ──▶ archived
        │            │                          ▲
        └────────────┴──────────────────────────┘   (any stage may go straight to archived)

A new version starts as a candidate. Promotion only moves forward, one step at a time, or
straight to archived; archived is final. Promoting a version to production archives the
version of the same name that was in production before (the registry does both in one
transaction), so each name has at most one production version.
"""

from __future__ import annotations

from enum import StrEnum

from edgeops.registry.errors import InvalidStageTransitionError, UnknownStageError

__all__ = ["ALLOWED_PROMOTIONS", "Stage", "check_promotion", "parse_stage"]


class Stage(StrEnum):
    CANDIDATE = "candidate"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


ALLOWED_PROMOTIONS: dict[Stage, frozenset[Stage]] = {
    Stage.CANDIDATE: frozenset({Stage.STAGING, Stage.ARCHIVED}),
    Stage.STAGING: frozenset({Stage.PRODUCTION, Stage.ARCHIVED}),
    Stage.PRODUCTION: frozenset({Stage.ARCHIVED}),
    Stage.ARCHIVED: frozenset(),
}
"""From each stage, the stages a version may be promoted to."""


def parse_stage(name: str) -> Stage:
    """The stage called ``name``; UnknownStageError listing the stages otherwise."""
    try:
        return Stage(name.strip().lower())
    except ValueError:
        known = ", ".join(stage.value for stage in Stage)
        raise UnknownStageError(f"unknown stage {name!r}; the stages are {known}") from None


def check_promotion(model: str, current: Stage, target: Stage) -> None:
    """InvalidStageTransitionError naming both stages, unless current -> target is allowed."""
    if target in ALLOWED_PROMOTIONS[current]:
        return
    if current == target:
        reason = f"it is already in {current.value}"
    elif current is Stage.ARCHIVED:
        reason = "archived is final"
    else:
        allowed = " or ".join(sorted(stage.value for stage in ALLOWED_PROMOTIONS[current]))
        reason = f"from {current.value} a model can go only to {allowed}"
    raise InvalidStageTransitionError(
        f"cannot promote model {model} from {current.value} to {target.value}: {reason}"
    )
