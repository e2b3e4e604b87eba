"""The actions a plan's steps take; :data:`STEP_FUNCTIONS` maps each to its function."""

from __future__ import annotations

from collections.abc import Callable

from hil.plan import Step
from hil.steps.context import Outcome, RunContext
from hil.steps.faults import fault
from hil.steps.fleet import check, deploy, release, rollout, wait
from hil.steps.measure import conformance, footprint, latency, soak

__all__ = ["STEP_FUNCTIONS", "StepFunction"]

StepFunction = Callable[[RunContext, Step], Outcome]

STEP_FUNCTIONS: dict[str, StepFunction] = {
    "release": release,
    "deploy": deploy,
    "rollout": rollout,
    "wait": wait,
    "conformance": conformance,
    "latency": latency,
    "footprint": footprint,
    "soak": soak,
    "fault": fault,
    "check": check,
}
