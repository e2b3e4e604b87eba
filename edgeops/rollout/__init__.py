"""Rollouts: the typed rollout spec and the planner (selection, contract pre-check, waves).

    from edgeops.rollout import load_spec, plan_rollout, release_contract

    spec = load_spec(Path("rollout.yaml"))
    plan = plan_rollout(spec, fleet.list_devices(), release_contract(repository, spec.release))

The live engine (notifying waves, soak windows and quality gates, pause/resume/abort with
rollback) is not built yet; see docs/rollouts.md.
"""

from edgeops.rollout.plan import (
    CompatibleDevice,
    ExcludedDevice,
    RolloutPlan,
    Wave,
    plan_rollout,
    precheck,
    release_contract,
    schedule,
    select_devices,
)
from edgeops.rollout.spec import (
    RolloutSpec,
    RolloutSpecError,
    SpecFormat,
    dump_spec,
    load_spec,
    parse_spec,
)

__all__ = [
    "CompatibleDevice",
    "ExcludedDevice",
    "RolloutPlan",
    "RolloutSpec",
    "RolloutSpecError",
    "SpecFormat",
    "Wave",
    "dump_spec",
    "load_spec",
    "parse_spec",
    "plan_rollout",
    "precheck",
    "release_contract",
    "schedule",
    "select_devices",
]
