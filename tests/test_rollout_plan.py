"""The rollout planner: selection, the contract pre-check (the agent's own check_contract) and
the wave schedule, on 1,000 synthetic devices, on a real database, and through the CLI."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from device_agent.card import ModelCard
from device_agent.protocol import StateReport
from edgeops.db import Database
from edgeops.fleet import DeviceView, FleetService, IdentityService
from edgeops.rollout import (
    RolloutSpec,
    RolloutSpecError,
    dump_spec,
    parse_spec,
    plan_rollout,
    release_contract,
    schedule,
)
from edgeops.rollout.plan import facts_of
from edgeops.trust import TrustRepository, build_custom
from tests.clitools import assert_one_line_error, run_cli

GIB = 1024**3
MIB = 1024**2
RELEASE = "digits/2/litert/model.tflite"
OLD_TARGET = "digits/1/litert/model.tflite"


def model_card(min_agent_version: str = "0.1.0", arena_bytes: int = 4096) -> ModelCard:
    return ModelCard(
        model_id="m-new",
        version="2",
        name="digits",
        task="classification",
        runtime="litert",
        quantization={"mode": "none"},  # type: ignore[arg-type]
        input_spec={"name": "in", "shape": [1, 64], "dtype": "float32"},  # type: ignore[arg-type]
        output_spec={"name": "out", "shape": [1, 10], "dtype": "float32"},  # type: ignore[arg-type]
        arena_bytes=arena_bytes,
        min_agent_version=min_agent_version,
    )


def contract(**changes: Any) -> dict[str, Any]:
    """The custom metadata of the release: fits x86_64/aarch64 with 64 MiB free, LiteRT."""
    return build_custom(
        model_card(),
        "litert",
        changes.get("hardware", {"arch": ["x86_64", "aarch64"]}),
        changes.get("min_free_memory_bytes", 64 * MIB),
    )


def spec(**changes: Any) -> RolloutSpec:
    document: dict[str, Any] = {
        "name": "digits-2",
        "release": RELEASE,
        "waves": {
            "canary": {"percent": 1.0},
            "exponential": {
                "base_rate_per_minute": 10,
                "increment_factor": 2.0,
                "max_rate_per_minute": 200,
            },
        },
    }
    document.update(changes)
    return parse_spec(json.dumps(document), "json")


def state(
    device_id: str,
    *,
    arch: str = "aarch64",
    agent: str = "0.1.0",
    free: int | None = GIB,
    loaded_runtime: str | None = "litert",
    target: str = OLD_TARGET,
    model_id: str = "m-old",
) -> StateReport:
    slots: dict[str, Any] = {"active": "a", "a": {"target": target, "model_id": model_id}}
    if loaded_runtime is not None:
        slots["champion"] = {"model_id": model_id, "runtime": loaded_runtime}
    return StateReport(
        device_id=device_id,
        agent_version=agent,
        hardware={"arch": arch, "os": "linux"},
        slots=slots,
        free_memory_bytes=free,
        ts=1_700_000_000.0,
    )


def view(report: StateReport | None, device_id: str, tags: dict[str, str]) -> DeviceView:
    if report is None:
        return DeviceView(device_id=device_id, tags=tags)
    return DeviceView(
        device_id=device_id,
        online=True,
        agent_version=report.agent_version,
        hardware=dict(report.hardware),
        tags=tags,
        reported=report.to_dict(),
        state_ts=report.ts,
    )


EXPECTED_KINDS = {
    "hardware": 50,
    "memory": 20,
    "agent_version": 10,
    "unreported": 10,
    "runtime": 10,
    "current": 4,
}


def fleet_of_1000() -> list[DeviceView]:
    """1,000 rows as FleetService.list_devices gives them; 104 the release does not fit."""
    devices = []
    for i in range(1000):
        device_id = f"dev-{i:04d}"
        tags = {"site": "berlin" if i < 900 else "paris", "line": "ab"[i % 2]}
        report: StateReport | None
        if i % 20 == 0:
            report = state(device_id, arch="armv7l")
        elif i % 50 == 1:
            report = state(device_id, free=MIB)
        elif i % 100 == 2:
            report = state(device_id, agent="0.0.9")
        elif i % 100 == 3:
            report = None
        elif i % 100 == 4:
            report = state(device_id, loaded_runtime="onnxruntime", target="digits/1/onnx/m.onnx")
        elif i % 250 == 5:
            report = state(device_id, target=RELEASE, model_id="m-new")
        else:
            report = state(device_id)
        devices.append(view(report, device_id, tags))
    return devices


# -- 1,000 devices ----------------------------------------------------------------------------


def test_1000_devices_are_selected_prechecked_and_all_scheduled() -> None:
    devices = fleet_of_1000()
    started = time.perf_counter()
    plan = plan_rollout(spec(), devices, contract())
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"planning 1,000 devices took {elapsed:.1f} s"

    assert len(plan.selected) == 1000
    assert Counter(device.kind for device in plan.excluded) == EXPECTED_KINDS
    assert len(plan.compatible) == 1000 - sum(EXPECTED_KINDS.values()) == 896
    reasons = {device.device_id: device for device in plan.excluded}
    assert reasons["dev-0020"].kind == "hardware" and "arch=armv7l" in reasons["dev-0020"].reason
    assert "needs 67108864 bytes" in reasons["dev-0001"].reason
    assert "0.0.9" in reasons["dev-0002"].reason
    assert reasons["dev-0003"].reason == "no state report received yet"
    assert "litert runtime" in reasons["dev-0004"].reason and "onnx" in reasons["dev-0004"].reason
    assert reasons["dev-0005"].reason == f"already runs {RELEASE}"

    # every compatible device in exactly one wave, no excluded one anywhere
    scheduled = [device_id for wave in plan.waves for device_id in wave.devices]
    assert sorted(scheduled) == sorted(device.device_id for device in plan.compatible)
    assert len(set(scheduled)) == len(scheduled) == plan.scheduled == 896
    assert not set(scheduled) & set(reasons)

    canary, *exponential = plan.waves
    assert canary.kind == "canary" and canary.size == math.ceil(896 * 0.01) == 9
    assert canary.minutes == (9,) and canary.start_minute == 0
    # no rate-increase criteria: the rate doubles every minute, up to 200
    assert [wave.rate_per_minute for wave in exponential] == [10, 20, 40, 80, 160, 200, 200, 200]
    assert [wave.size for wave in exponential] == [10, 20, 40, 80, 160, 200, 200, 177]
    assert [wave.start_minute for wave in exponential] == list(range(1, 9))
    assert plan.minutes == 9
    for wave in exponential:
        assert all(count <= (wave.rate_per_minute or 0) for count in wave.minutes)

    document = plan.to_dict()
    assert document["counts"] == {
        "selected": 1000,
        "compatible": 896,
        "excluded": 104,
        "scheduled": 896,
        "waves": 9,
        "minutes": 9,
    }
    json.dumps(document)  # JSON-ready


def test_the_plan_is_deterministic_and_the_shuffle_seedable() -> None:
    devices = fleet_of_1000()
    by_id = plan_rollout(spec(), devices, contract())
    assert by_id == plan_rollout(spec(), list(reversed(devices)), contract())
    order = [device_id for wave in by_id.waves for device_id in wave.devices]
    assert order == sorted(order)  # no seed: by device id

    seeded = [plan_rollout(spec(seed=seed), devices, contract()) for seed in (1, 1, 2)]
    orders = [[d for wave in plan.waves for d in wave.devices] for plan in seeded]
    assert orders[0] == orders[1]
    assert orders[0] != orders[2] and orders[0] != order
    assert sorted(orders[0]) == sorted(orders[2]) == order
    assert [w.size for w in seeded[0].waves] == [w.size for w in by_id.waves]


def test_rate_increase_criteria_hold_the_rate_until_met() -> None:
    rollout = spec(
        waves={
            "canary": {"count": 5},
            "exponential": {
                "base_rate_per_minute": 10,
                "increment_factor": 1.5,
                "rate_increase_criteria": {"notified": 25},
            },
        }
    )
    waves = schedule(rollout, [f"d{i:03d}" for i in range(200)])
    assert [(w.rate_per_minute, w.minutes, w.start_minute) for w in waves] == [
        (None, (5,), 0),
        (10, (10, 10, 5), 1),  # the 25th device meets the criteria: the rate grows at once
        (15, (15, 10), 4),
        (22, (22, 3), 6),  # 10 * 1.5**2 = 22.5 -> 22 a minute
        (33, (25,), 8),
        (50, (25,), 9),
        (75, (25,), 10),
        (113, (25,), 11),
        (170, (20,), 12),  # the last 20
    ]
    assert sum(w.size for w in waves) == 200


def test_the_aws_extremes_schedule_everything() -> None:
    ids = [f"d{i:04d}" for i in range(1000)]
    fastest = spec(
        waves={
            "canary": {"count": 1},
            "exponential": {
                "base_rate_per_minute": 1000,
                "increment_factor": 5,
                "max_rate_per_minute": 1000,
            },
        }
    )
    waves = schedule(fastest, ids)
    assert [w.minutes for w in waves] == [(1,), (999,)]

    slowest = spec(
        waves={
            "canary": {"count": 1},
            "exponential": {
                "base_rate_per_minute": 1,
                "increment_factor": 1.1,
                "max_rate_per_minute": 1,
            },
        }
    )
    waves = schedule(slowest, ids[:50])
    assert all(w.minutes == (1,) for w in waves) and len(waves) == 50

    creeping = spec(
        waves={
            "canary": {"count": 1},
            "exponential": {"base_rate_per_minute": 1, "increment_factor": 1.1},
        }
    )
    waves = schedule(creeping, ids)
    rates = [w.rate_per_minute or 0 for w in waves[1:]]
    assert rates[:9] == [1] * 8 + [2]  # 1.1**7 = 1.95, 1.1**8 = 2.14: two a minute
    assert rates == sorted(rates) and sum(w.size for w in waves) == 1000


def test_a_canary_as_large_as_the_fleet_leaves_no_exponential_wave() -> None:
    waves = schedule(
        spec(
            waves={
                "canary": {"count": 50},
                "exponential": {"base_rate_per_minute": 5, "increment_factor": 2},
            }
        ),
        ["a", "b", "c"],
    )
    assert [(w.kind, w.size) for w in waves] == [("canary", 3)]
    assert schedule(spec(), []) == []


def test_the_canary_and_the_waves_carry_their_abort_conditions() -> None:
    rollout = spec(
        waves={
            "canary": {"count": 10, "abort": {"min_devices": 5, "failure_percent": 20.0}},
            "exponential": {"base_rate_per_minute": 10, "increment_factor": 2},
            "abort": {"min_devices": 10, "failure_count": 3},
        }
    )
    canary, first = schedule(rollout, [f"d{i}" for i in range(20)])
    assert canary.abort.failure_percent == 20.0
    assert first.abort.failure_count == 3
    # 20 % of the canary failing install aborts it; a failure below min_devices does not
    assert canary.abort.aborts(finished=10, failures=2)
    assert not canary.abort.aborts(finished=10, failures=1)
    assert not canary.abort.aborts(finished=4, failures=4)
    assert first.abort.aborts(finished=10, failures=3)
    assert not first.abort.aborts(finished=9, failures=9)


# -- selection --------------------------------------------------------------------------------


def test_selection_by_tags_hardware_and_current_model() -> None:
    devices = fleet_of_1000()
    paris = plan_rollout(spec(selection={"tags": {"site": "paris"}}), devices, contract())
    assert paris.selected == tuple(f"dev-{i:04d}" for i in range(900, 1000))

    line_a = plan_rollout(
        spec(selection={"tags": {"site": ["paris"], "line": ["a"]}}), devices, contract()
    )
    assert line_a.selected == tuple(f"dev-{i:04d}" for i in range(900, 1000, 2))

    arm = plan_rollout(spec(selection={"hardware": {"arch": "armv7l"}}), devices, contract())
    assert len(arm.selected) == 50 and not arm.compatible and not arm.waves
    assert {device.kind for device in arm.excluded} == {"hardware"}

    on_new = plan_rollout(spec(selection={"current_model": ["m-new"]}), devices, contract())
    assert on_new.selected == ("dev-0005", "dev-0255", "dev-0505", "dev-0755")
    assert {device.kind for device in on_new.excluded} == {"current"}


def test_an_unknown_tag_key_is_named() -> None:
    devices = fleet_of_1000()
    with pytest.raises(RolloutSpecError) as caught:
        plan_rollout(spec(selection={"tags": {"sit": "berlin"}}), devices, contract())
    assert caught.value.field == "selection.tags.sit"
    assert "unknown tag key: no enrolled device has it (keys seen: line, site)" in str(caught.value)
    with pytest.raises(RolloutSpecError, match=r"^selection.hardware.board: unknown hardware"):
        plan_rollout(spec(selection={"hardware": {"board": "rpi4"}}), devices, contract())


def test_an_empty_target_set_is_named() -> None:
    with pytest.raises(RolloutSpecError) as caught:
        plan_rollout(
            spec(selection={"tags": {"site": "rome"}, "current_model": "m-x"}),
            fleet_of_1000(),
            contract(),
        )
    assert str(caught.value) == (
        "selection: empty target set: no device of the 1000 known matches site=rome, "
        "current model m-x"
    )
    with pytest.raises(RolloutSpecError, match=r"^selection: empty target set"):
        plan_rollout(spec(), [], contract())


# -- the pre-check ----------------------------------------------------------------------------


def test_a_malformed_contract_is_the_release_s_fault() -> None:
    broken = contract()
    broken["edgeops"]["min_free_memory_bytes"] = "lots"
    with pytest.raises(RolloutSpecError, match=r"^release: digits/2/litert/model.tflite: its"):
        plan_rollout(spec(), fleet_of_1000(), broken)
    with pytest.raises(RolloutSpecError, match="no 'edgeops' contract"):
        plan_rollout(spec(), fleet_of_1000(), {})


@dataclass
class Row:
    """A device row as a misbehaving agent could leave it (no DeviceView validation)."""

    device_id: str
    agent_version: str | None = "0.1.0"
    online: bool = True
    hardware: Any = field(default_factory=lambda: {"arch": "x86_64"})
    tags: Any = field(default_factory=dict)
    reported: Any = field(default_factory=lambda: {"schema": 1})


def test_garbage_state_excludes_only_that_device() -> None:
    rows = [
        Row("bad-version", agent_version="banana"),
        Row("bad-slots", reported={"slots": "junk", "free_memory_bytes": "lots", "runtimes": 3}),
        Row("bad-hardware", hardware=["x86_64"], tags=None),
        Row("good"),
    ]
    plan = plan_rollout(spec(), rows, contract())
    excluded = {device.device_id: device.kind for device in plan.excluded}
    assert excluded == {"bad-version": "agent_version", "bad-hardware": "hardware"}
    compatible = {device.device_id: device for device in plan.compatible}
    assert set(compatible) == {"bad-slots", "good"}
    # no runtime reported: the release's is assumed, and the plan says so
    assert compatible["good"].notes == (
        "reports no runtimes; litert assumed (the device checks again)",
    )


def test_runtimes_reported_in_state_are_used() -> None:
    onnx_only = Row("onnx-only", reported={"runtimes": ["onnx"]})
    both = Row("both", reported={"runtimes": ["onnx", "litert"]})
    plan = plan_rollout(spec(), [onnx_only, both], contract())
    assert [device.device_id for device in plan.compatible] == ["both"]
    assert plan.compatible[0].notes == ()
    assert plan.excluded[0].device_id == "onnx-only" and plan.excluded[0].kind == "runtime"


def test_a_gateway_reports_the_firmware_runtime() -> None:
    # a gateway (an agent with an attached microcontroller) takes generated firmware
    gateway = Row("gateway", reported={"runtimes": ["firmware", "litert"]})
    facts, note = facts_of(gateway, "mcu")
    assert facts.runtimes == {"firmware", "litert"} and note == ""
    plain = Row("plain", reported={"runtimes": ["litert"]})
    assert facts_of(plain, "mcu")[0].runtimes == {"litert"}


# -- a real database and release repository ---------------------------------------------------


def record_fleet(database: Database) -> None:
    fleet = FleetService(database)
    identities = IdentityService(database)
    for device_id, tags in (
        ("cam-1", {"site": "berlin"}),
        ("cam-2", {"site": "berlin"}),
        ("cam-3", {"site": "berlin"}),
        ("cam-4", {"site": "berlin"}),
        ("cam-5", {"site": "paris"}),
        ("cam-6", {"site": "berlin"}),  # enrolled, never reported
    ):
        identities.enroll(device_id, tags)
    fleet.record_state(state("cam-1"))
    fleet.record_state(state("cam-2", arch="x86_64"))
    fleet.record_state(state("cam-3", arch="riscv64"))
    fleet.record_state(state("cam-4", free=8 * MIB))
    fleet.record_state(state("cam-5"))


def test_a_plan_from_a_real_database(database: Database) -> None:
    record_fleet(database)
    devices = FleetService(database).list_devices()
    rollout = spec(selection={"tags": {"site": "berlin"}}, seed=3)
    plan = plan_rollout(rollout, devices, contract())
    assert plan.selected == ("cam-1", "cam-2", "cam-3", "cam-4", "cam-6")
    assert [(d.device_id, d.kind) for d in plan.excluded] == [
        ("cam-3", "hardware"),
        ("cam-4", "memory"),
        ("cam-6", "unreported"),
    ]
    assert [d.device_id for d in plan.compatible] == ["cam-1", "cam-2"]
    assert plan.compatible[0].current_model == "m-old" and plan.compatible[0].online is False
    assert [wave.size for wave in plan.waves] == [1, 1]


def make_repository(trust_dir: Path) -> TrustRepository:
    repository = TrustRepository(trust_dir)
    repository.init(trust_dir.parent / "offline-root-keys")
    repository.add_target(RELEASE, b"model bytes", contract())
    return repository


def test_release_contract_reads_the_target_or_names_the_release(tmp_path: Path) -> None:
    repository = make_repository(tmp_path / "trust")
    assert release_contract(repository, RELEASE) == contract()
    with pytest.raises(RolloutSpecError) as caught:
        release_contract(repository, "digits/9/litert/model.tflite")
    assert str(caught.value) == (
        "release: unknown release 'digits/9/litert/model.tflite': not a target of the release "
        f"repository; released targets: {RELEASE}"
    )


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def hub_data_dir(isolated_environment: Path) -> Path:
    """The data dir of a hub with six devices and one release."""
    isolated_environment.mkdir(parents=True, exist_ok=True)
    database = Database(f"sqlite:///{isolated_environment / 'edgeops.db'}")
    try:
        database.upgrade()
        record_fleet(database)
    finally:
        database.dispose()
    make_repository(isolated_environment / "trust")
    return isolated_environment


def write_spec(directory: Path, name: str, **changes: Any) -> Path:
    path = directory / name
    rollout = spec(selection={"tags": {"site": "berlin"}}, **changes)
    path.write_text(dump_spec(rollout, "json" if name.endswith(".json") else "yaml"))
    return path


def test_cli_plan_and_validate(hub_data_dir: Path, tmp_path: Path) -> None:
    spec_file = write_spec(tmp_path, "rollout.yaml")
    result = run_cli("edgeops", "rollout", "plan", str(spec_file), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["counts"]["selected"] == 5 and plan["counts"]["compatible"] == 2
    assert {d["device_id"]: d["kind"] for d in plan["excluded"]} == {
        "cam-3": "hardware",
        "cam-4": "memory",
        "cam-6": "unreported",
    }
    assert [w["devices"] for w in plan["waves"]] == [["cam-1"], ["cam-2"]]

    human = run_cli("edgeops", "rollout", "plan", str(spec_file))
    assert human.returncode == 0, human.stderr
    assert "cam-3" in human.stdout and "riscv64" in human.stdout
    assert "canary" in human.stdout and "exponential" in human.stdout

    json_file = write_spec(tmp_path, "rollout.json")
    valid = run_cli("edgeops", "rollout", "validate", str(json_file), "--json")
    assert valid.returncode == 0, valid.stderr
    assert json.loads(valid.stdout)["counts"]["waves"] == 2
    alone = run_cli("edgeops", "rollout", "validate", str(json_file), "--document-only")
    assert alone.returncode == 0 and "is valid" in alone.stdout


def test_cli_refuses_bad_specs_with_the_field_named(hub_data_dir: Path, tmp_path: Path) -> None:
    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text(
        dump_spec(spec(), "yaml").replace("increment_factor: 2.0", "increment_factor: 7.5")
    )
    unknown_tag = tmp_path / "tag.yaml"
    unknown_tag.write_text(dump_spec(spec(selection={"tags": {"room": "1"}}), "yaml"))
    empty = tmp_path / "empty.yaml"
    empty.write_text(dump_spec(spec(selection={"tags": {"site": "rome"}}), "yaml"))
    unknown_release = tmp_path / "release.yaml"
    unknown_release.write_text(dump_spec(spec(release="digits/3/litert/model.tflite"), "yaml"))

    for path, needle in (
        (out_of_range, "waves.exponential.increment_factor: must be between 1.1 and 5"),
        (unknown_tag, "selection.tags.room: unknown tag key"),
        (empty, "selection: empty target set"),
        (unknown_release, "release: unknown release 'digits/3/litert/model.tflite'"),
    ):
        for command in ("plan", "validate"):
            result = run_cli("edgeops", "rollout", command, str(path))
            assert result.returncode == 2, (command, path, result.stderr)
            assert_one_line_error(result, "edgeops: error:", needle)
