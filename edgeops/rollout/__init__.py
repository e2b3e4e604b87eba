"""Rollouts: the typed rollout spec, the planner (selection, contract pre-check, waves) and
the live engine (waves, timeouts, abort with rollback, soak windows and quality gates).

    from edgeops.rollout import RolloutEngine, load_spec, plan_rollout, release_contract

    spec = load_spec(Path("rollout.yaml"))
    plan = plan_rollout(spec, fleet.list_devices(), release_contract(repository, spec.release))

    engine = RolloutEngine(database, publisher, repository=repository)
    rollout_id = engine.create(spec)
    engine.tick()                      # the hub does this every second

See docs/rollouts.md.
"""

from edgeops.rollout.engine import RolloutEngine, RolloutError
from edgeops.rollout.gates import GateResult, evaluate_gates
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
    "GateResult",
    "RolloutEngine",
    "RolloutError",
    "RolloutPlan",
    "RolloutSpec",
    "RolloutSpecError",
    "SpecFormat",
    "Wave",
    "dump_spec",
    "evaluate_gates",
    "load_spec",
    "parse_spec",
    "plan_rollout",
    "precheck",
    "release_contract",
    "schedule",
    "select_devices",
]
