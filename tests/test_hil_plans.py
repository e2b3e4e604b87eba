"""The rig's test plans: validation, the reports, and the shipped plans run for real.

``edgeops-hil run smoke`` and ``edgeops-hil run mcu-conformance`` run end to end here with
real parts: a hub with its own Mosquitto, device agents in network namespaces, firmware
built with arm-none-eabi-gcc and run under qemu-system-arm, TensorFlow Lite Micro as the
reference. ``chaos`` (twenty agents) is ``make hil``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from device_agent.updater.machine import UpdateEvent, UpdateState, next_state
from hil.plan import ASSERTIONS, PlanError, load_plan, parse_plan, shipped_plans
from hil.report import PlanResult, StepResult, TimelineEvent, render_html, write_reports
from hil.runner import check_expectations, run_plan
from hil.steps.context import Outcome
from hil.steps.faults import dropped_fetch_responses, reaction_text, update_reaction
from tests.clitools import BIN, assert_one_line_error, run_cli, sigint_as_in_a_terminal

# -- plan validation ---------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "name": "tiny",
    "boards": {
        "mcu": {"kind": "qemu", "target": "mps2-an385"},
        "gw": {"kind": "linux", "gateway_for": "mcu"},
        "fleet": {"kind": "linux", "count": 3},
    },
    "steps": [
        {"name": "fw", "release": {"id": "fw", "firmware": "mps2-an385"}},
        {"name": "m", "release": {"id": "m"}},
        {"deploy": {"release": "fw", "boards": ["gw"]}, "expect": {"state": "committed"}},
        {"deploy": {"release": "m", "boards": ["fleet"]}},
        {"conformance": {"release": "fw", "boards": ["mcu"]}, "expect": {"bit_exact": True}},
        {"rollout": {"release": "m", "boards": "all", "wait": False}},
        {"fault": {"kind": "power_cut", "boards": {"random": 2}, "during": "update"}},
        {"wait": {}, "expect": {"state": "succeeded"}},
        {"check": {"invariants": ["every_board_has_valid_model"]}},
    ],
}


def _plan(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(GOOD))
    data.update(changes)
    return data


def _with_step(index: int, step: dict[str, Any]) -> dict[str, Any]:
    data = _plan()
    data["steps"][index] = step
    return data


def test_a_good_plan_validates_into_typed_steps() -> None:
    plan = parse_plan(_plan(), "tiny.yaml")
    assert plan.instances == ("mcu", "gw", "fleet-1", "fleet-2", "fleet-3")
    deploy = plan.steps[3]
    assert deploy.action == "deploy" and deploy.boards == ("fleet-1", "fleet-2", "fleet-3")
    fault = plan.steps[6]
    assert fault.params["boards"] == {"random": 2, "of": ("gw", "fleet-1", "fleet-2", "fleet-3")}
    assert plan.steps[0].params["tamper"] is None and plan.steps[1].params["runtime"] == "litert"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _with_step(
                4,
                {"conformance": {"release": "fw", "boards": ["mcu"]}, "expect": {"bitexact": True}},
            ),
            "tiny.yaml: steps[4].expect: unknown assertion 'bitexact' (known: bit_exact, "
            "errors_max, max_latency_ms, mean_latency_ms)",
        ),
        (
            _with_step(2, {"flash": {"release": "fw"}}),
            "tiny.yaml: steps[2].flash: unknown action 'flash' (known: check, conformance, "
            "deploy, fault, footprint, latency, release, rollout, soak, wait)",
        ),
        (
            _with_step(2, {"deploy": {"release": "fw", "boards": ["nosuch"]}}),
            "tiny.yaml: steps[2].deploy.boards: unknown board 'nosuch'",
        ),
        (
            _with_step(2, {"deploy": {"release": "later", "boards": ["gw"]}}),
            "tiny.yaml: steps[2].deploy.release: unknown release 'later' (known: fw, m)",
        ),
        (
            _with_step(3, {"deploy": {"release": "fw", "boards": ["fleet"]}}),
            "tiny.yaml: steps[3].deploy.boards: board 'fleet-1' is no gateway: release 'fw' "
            "is firmware",
        ),
        (
            _with_step(6, {"fault": {"kind": "meteor"}}),
            "tiny.yaml: steps[6].fault.kind: must be one of power_cut, partition, packet_loss, "
            "broker_restart, corrupt_chunk, clock_skew, not 'meteor'",
        ),
        (
            _with_step(6, {"fault": {"kind": "partition", "boards": {"random": 9}}}),
            "tiny.yaml: steps[6].fault.boards.random: cannot draw 9 of 4 boards",
        ),
        (
            _with_step(6, {"fault": {"kind": "partition", "pct": 5}}),
            "tiny.yaml: steps[6].fault.pct: 'pct' is not a parameter of a partition fault",
        ),
        (
            _with_step(
                6, {"fault": {"kind": "partition", "boards": "all"}, "expect": {"corrupted_min": 1}}
            ),
            "tiny.yaml: steps[6].expect: corrupted_min counts corrupted chunks: a corrupt_chunk "
            "fault's, not a partition fault's",
        ),
        (
            _with_step(7, {"latency": {"boards": ["mcu"]}, "expect": {"state": "committed"}}),
            "tiny.yaml: steps[7].expect: assertion 'state' does not apply to latency",
        ),
        (
            _plan(boards={"gw": {"kind": "linux", "gateway_for": "mcu"}}),
            "tiny.yaml: boards.gw.gateway_for: unknown board 'mcu'",
        ),
        (
            _plan(boards={"mcu": {"kind": "qemu", "target": "mps2-an500"}}),
            "tiny.yaml: boards.mcu.target: must be one of mps2-an385, mps2-an386, not 'mps2-an500'",
        ),
        (
            _plan(boards={"x": {"kind": "linux", "memory_limit": "lots"}}),
            "tiny.yaml: boards.x.memory_limit: must be a size in bytes",
        ),
        (_plan(timeout_s="soon"), "tiny.yaml: timeout_s: must be a number, not a string"),
        (_plan(steps=[]), "tiny.yaml: steps: must be a non-empty list of steps"),
        (
            {k: v for k, v in GOOD.items() if k != "boards"},
            "tiny.yaml: boards: missing",
        ),
    ],
    ids=[
        "bad-assertion",
        "unknown-action",
        "missing-board",
        "release-before-made",
        "firmware-to-plain-linux",
        "unknown-fault",
        "too-many-drawn",
        "parameter-of-another-fault",
        "corrupted-min-of-another-fault",
        "assertion-of-another-action",
        "unknown-gateway-target",
        "unknown-qemu-target",
        "bad-size",
        "bad-type",
        "no-steps",
        "no-boards",
    ],
)
def test_plan_errors_are_one_line_naming_file_and_path(
    data: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(PlanError) as caught:
        parse_plan(data, "tiny.yaml")
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_rollout_left_running_and_wait_without_rollout_are_refused() -> None:
    data = _plan()
    del data["steps"][7]  # the wait
    with pytest.raises(PlanError, match=r"^tiny.yaml: steps: a rollout with 'wait: false'"):
        parse_plan(data, "tiny.yaml")
    data = _plan()
    data["steps"][5] = {"latency": {"boards": ["gw"]}}
    with pytest.raises(PlanError, match=r"^tiny.yaml: steps\[6\].fault.during: no update"):
        parse_plan(data, "tiny.yaml")


def test_every_known_assertion_is_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "hil.md").read_text(encoding="utf-8")
    for name in ASSERTIONS:
        assert f"`{name}" in doc, name


def _write(tmp_path: Path, data: object, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_cli_validate_reports_a_bad_plan_in_one_line_with_exit_2(tmp_path: Path) -> None:
    bad = _write(tmp_path, _with_step(2, {"deploy": {"release": "fw", "boards": ["ghost"]}}))
    result = run_cli("edgeops-hil", "validate", str(bad))
    assert result.returncode == 2
    assert_one_line_error(result, "plan.yaml: steps[2].deploy.boards: unknown board 'ghost'")

    result = run_cli("edgeops-hil", "run", str(bad), "--report", str(tmp_path / "r"))
    assert result.returncode == 2
    assert_one_line_error(result, "unknown board 'ghost'")
    assert not (tmp_path / "r").exists()  # nothing ran

    broken = _write(tmp_path, "name: x\nboards: {a: [1,\n", "broken.yaml")
    result = run_cli("edgeops-hil", "validate", str(broken))
    assert result.returncode == 2
    assert_one_line_error(result, "broken.yaml: not valid YAML at line")

    result = run_cli("edgeops-hil", "validate", "no-such-plan")
    assert result.returncode == 2
    assert_one_line_error(result, "neither a plan file nor a shipped plan (shipped: chaos,")

    result = run_cli("edgeops-hil", "run", "smoke")  # --report is required
    assert result.returncode == 2
    assert_one_line_error(result, "--report")

    a_file = tmp_path / "a-file"
    a_file.write_text("x", encoding="utf-8")
    result = run_cli("edgeops-hil", "run", "smoke", "--report", str(a_file))
    assert result.returncode == 2
    assert_one_line_error(result, f"--report {a_file}: not a directory")


def test_cli_lists_and_validates_the_shipped_plans() -> None:
    assert set(shipped_plans()) == {"smoke", "mcu-conformance", "chaos"}
    listing = run_cli("edgeops-hil", "plans")
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()] == [
        "chaos",
        "mcu-conformance",
        "smoke",
    ]
    for name, path in shipped_plans().items():
        plan = load_plan(path)
        assert plan.name == name
        result = run_cli("edgeops-hil", "validate", name)
        assert result.returncode == 0, result.stderr
        assert f"valid plan '{name}': {len(plan.steps)} steps" in result.stdout
    chaos = load_plan(shipped_plans()["chaos"])
    assert len(chaos.instances) == 20
    kinds = {s.params["kind"] for s in chaos.steps if s.action == "fault"}
    assert kinds == {
        "power_cut",
        "partition",
        "packet_loss",
        "broker_restart",
        "corrupt_chunk",
        "clock_skew",
    }
    help_text = run_cli("edgeops-hil", "run", "--help").stdout
    assert "--report DIR" in help_text and "--seed" in help_text and "--keep" in help_text
    assert "exit status" in run_cli("edgeops-hil", "--help").stdout


# -- assertions --------------------------------------------------------------------------------


def test_expectations_name_what_does_not_hold() -> None:
    plan = parse_plan(_plan(), "tiny.yaml")
    deploy, conformance = plan.steps[2], plan.steps[4]
    ok = Outcome(observed={"states": {"gw": "committed"}, "reasons": {"gw": None}})
    assert check_expectations(deploy, ok) == []
    bad = Outcome(observed={"states": {"gw": "rolled_back"}, "reasons": {"gw": "x"}})
    assert check_expectations(deploy, bad) == ["state: expected committed, got gw rolled_back"]
    # a deploy expects committed even when the plan says nothing
    silent = parse_plan(_with_step(2, {"deploy": {"release": "fw", "boards": ["gw"]}}), "t")
    assert check_expectations(silent.steps[2], bad) != []
    assert check_expectations(conformance, Outcome()) == ["bit_exact: nothing was compared"]
    differs = Outcome(observed={"bit_exact": False, "mismatch": "3 of 8 samples differ"})
    assert check_expectations(conformance, differs) == [
        "bit_exact is false, expected true (3 of 8 samples differ)"
    ]


def test_no_sample_answered_is_no_evidence_for_bit_exact_or_errors_max() -> None:
    # bit_exact: false (a mismatch expected) and errors_max held vacuously when every board
    # erred before answering a single sample
    data = _with_step(
        4,
        {
            "conformance": {"release": "fw", "boards": ["mcu"]},
            "expect": {"bit_exact": False, "errors_max": 3},
        },
    )
    step = parse_plan(data, "tiny.yaml").steps[4]
    nothing = Outcome(
        observed={"bit_exact": False, "samples": 0, "errors": 1, "first_error": "mcu: no answer"}
    )
    assert check_expectations(step, nothing) == [
        "bit_exact: nothing was compared (first error: mcu: no answer)",
        "errors_max: no sample was answered (1 errors, first: mcu: no answer)",
    ]
    differs = Outcome(observed={"bit_exact": False, "samples": 8, "errors": 0})
    assert check_expectations(step, differs) == []
    soak = parse_plan(
        _with_step(4, {"soak": {"boards": ["fleet"]}, "expect": {"errors_max": 0}}), "t"
    ).steps[4]
    assert check_expectations(soak, Outcome(observed={"samples": 0, "errors": 0})) == [
        "errors_max: no sample was answered (0 errors)"
    ]
    assert check_expectations(soak, Outcome(observed={"samples": 5, "errors": 0})) == []


def _serial_plan(**board: Any) -> dict[str, Any]:
    devkit = {"kind": "serial", "port": "/dev/ttyACM0", "flash_command": "st-flash {image}"}
    devkit.update(board)
    return {
        "name": "desk",
        "boards": {"devkit": devkit},
        "steps": [
            {"release": {"id": "fw", "firmware": "mps2-an385"}},
            {"deploy": {"release": "fw", "boards": ["devkit"]}},
            {"conformance": {"release": "fw", "boards": ["devkit"]}, "expect": {"bit_exact": True}},
            {"latency": {"boards": ["devkit"]}, "expect": {"errors_max": 0}},
        ],
    }


def test_a_serial_board_plan_validates_and_its_commands_are_checked_as_templates() -> None:
    plan = parse_plan(
        _serial_plan(
            flash_command="esptool.py --port {port} write_flash 0x10000 {image}",
            power_command="uhubctl -l 1-1 -p 2 -a cycle -d {off_s}",
        ),
        "desk.yaml",
    )
    spec = plan.board("devkit")
    assert (spec.kind, spec.port, spec.baud) == ("serial", "/dev/ttyACM0", 115200)
    assert plan.steps[2].params["boards"] == ("devkit",)
    bad = [
        ({"flash_command": "flash {img}"}, "flash_command: must contain {image}"),
        ({"flash_command": "flash {image} {serial}"}, "unknown placeholder 'serial'"),
        ({"flash_command": "flash '{image}"}, "No closing quotation"),
        ({"reset_command": "reset {off_s}"}, "reset_command: is not a command template"),
    ]
    for change, message in bad:
        with pytest.raises(PlanError) as caught:
            parse_plan(_serial_plan(**change), "desk.yaml")
        assert message in str(caught.value), caught.value
        assert str(caught.value).startswith("desk.yaml: boards.devkit.")


def test_zoo_architectures_and_soak_rates_are_checked_before_the_run() -> None:
    data = _plan()
    data["steps"].insert(0, {"footprint": {"models": "zoo", "archs": ["mlp", "resnet"]}})
    with pytest.raises(PlanError, match=r"^t: steps\[0\].footprint.archs\[1\]: unknown arch"):
        parse_plan(data, "t")
    data["steps"][0] = {"footprint": {"models": "zoo", "archs": ["mlp", "mlp"]}}
    with pytest.raises(PlanError, match=r"archs\[1\]: 'mlp' is listed twice"):
        parse_plan(data, "t")
    # a rate whose rounds overflow was a step error at run time
    data["steps"][0] = {"soak": {"boards": ["fleet"], "rate_hz": 1e308}}
    with pytest.raises(PlanError, match=r"steps\[0\].soak.rate_hz: must be <= 1000"):
        parse_plan(data, "t")


def _corrupt_step() -> Any:
    data = _with_step(
        6, {"fault": {"kind": "corrupt_chunk", "boards": ["gw"]}, "expect": {"corrupted_min": 1}}
    )
    return parse_plan(data, "tiny.yaml").steps[6]


def test_corrupted_min_names_each_board_whose_proxy_corrupted_too_little() -> None:
    step = _corrupt_step()
    assert check_expectations(step, Outcome(observed={"corrupted": {"gw": 1}})) == []
    assert check_expectations(step, Outcome(observed={"corrupted": {"gw": 0, "x": 2}})) == [
        "gw: 0 chunks corrupted < 1 (no download passed its proxy in time)"
    ]
    assert check_expectations(step, Outcome()) == ["no chunk corruption was watched for"]


def _update_events(*steps: tuple[str, str | None]) -> list[dict[str, Any]]:
    """``update`` events as the agent reports them, walking its state machine from idle."""
    from device_agent.updater.updater import Transition

    state, events = UpdateState.IDLE, []
    for seq, (event, reason) in enumerate(steps, 1):
        new = next_state(state, UpdateEvent(event))
        detail = Transition(new, state, UpdateEvent(event), "t/1", 1, reason).detail()
        events.append({"seq": seq, "event": "update", "ts": 0.0, "detail": detail})
        state = new
    return events


def test_update_reaction_reads_retries_refusals_and_the_state_at_rest() -> None:
    steps: list[tuple[str, str | None]] = [
        ("start", None),
        ("retry", "transport: link down"),
        ("downloaded", None),
        ("failed", "hash_mismatch: targets/x: bad hash"),
        ("rolled_back", None),
    ]
    reaction = update_reaction(_update_events(*steps))
    assert reaction["update_retries"] == 1
    assert reaction["update_failures"] == 1
    assert reaction["refused"] == "hash_mismatch: targets/x: bad hash"
    assert reaction["final_state"] == "rolled_back"
    again = update_reaction(_update_events(*steps, ("start", None)))
    assert again["final_state"] is None  # updating again
    done = update_reaction(
        _update_events(
            *steps, ("start", None), ("downloaded", None), ("verified", None),
            ("installed", None), ("healthy", None),
        )
    )  # fmt: skip
    assert done["final_state"] == "committed"
    assert update_reaction([])["final_state"] is None
    text = reaction_text(2, done)
    assert text.startswith("dropped 2 damaged fetch response(s) and asked again; refused")
    assert text.endswith("update at rest: committed")


def test_dropped_fetch_responses_are_counted_in_the_agent_logs(tmp_path: Path) -> None:
    (tmp_path / "agent.run1.log").write_text(
        "W fetch: malformed fetch response dropped: fetch response has no header line\n"
        "I update: downloading\n"
        "W fetch: fetch response 0a1b dropped: it starts at offset 0, the request at 512\n",
        encoding="utf-8",
    )
    (tmp_path / "agent.run2.log").write_text("I nothing dropped here\n", encoding="utf-8")
    logs = sorted(tmp_path.glob("agent.run*.log"))
    assert dropped_fetch_responses([*logs, tmp_path / "missing.log"]) == 2


def test_a_step_with_evidence_still_coming_in_is_concluded_when_it_is_in(tmp_path: Path) -> None:
    import threading
    from contextlib import ExitStack

    from hil.runner import _settle
    from hil.steps.context import RunContext

    step = _corrupt_step()
    plan = parse_plan(_plan(), "tiny.yaml")
    ctx = RunContext(plan=plan, seed=0, workdir=tmp_path, stack=ExitStack(), progress_stream=None)
    release = threading.Event()
    outcomes = []
    for count in (1, 0):
        outcome = Outcome(observed={"corrupted": {"gw": 0}})

        def watch(outcome: Outcome = outcome, count: int = count) -> None:
            release.wait()
            outcome.record({"gw.corrupted": count}, {"corrupted": {"gw": count}})

        outcome.pending = [threading.Thread(target=watch, daemon=True)]
        outcome.pending[0].start()
        outcomes.append((step, StepResult(step.name, "fault", "passed"), outcome))
    unsettled = list(outcomes)
    _settle(ctx, unsettled, None)  # nothing in yet: both wait
    assert len(unsettled) == 2 and all(r.status == "passed" for _, r, _ in outcomes)
    release.set()
    _settle(ctx, unsettled, 30.0)
    assert unsettled == []
    (_, hit, _), (_, missed, _) = outcomes
    assert (hit.status, hit.metrics["gw.corrupted"]) == ("passed", 1)
    assert (missed.status, missed.metrics["gw.corrupted"]) == ("failed", 0)
    assert "gw: 0 chunks corrupted < 1" in missed.message


def _context(tmp_path: Path) -> Any:
    from contextlib import ExitStack

    from hil.steps.context import RunContext

    plan = parse_plan(_plan(), "tiny.yaml")
    return RunContext(plan=plan, seed=0, workdir=tmp_path, stack=ExitStack(), progress_stream=None)


def test_conformance_refuses_a_board_running_another_release_of_this_run(tmp_path: Path) -> None:
    from hil.steps.context import BoardModel, Release
    from hil.steps.measure import conformance

    ctx = _context(tmp_path)
    step = ctx.plan.steps[4]  # conformance of release fw on mcu
    made = {
        rid: Release(rid, f"digits/{n}/mcu", "m", "mcu", "mps2-an385", b"", b"")
        for n, rid in enumerate(("fw", "old"))
    }
    ctx.releases.update(made)
    ctx.loaded["mcu"] = BoardModel(release=made["old"])
    outcome = conformance(ctx, step)
    assert outcome.observed["samples"] == 0
    assert check_expectations(step, outcome) == [
        "bit_exact: nothing was compared (first error: mcu: board mcu runs release old "
        "(deployed in this run), not fw)"
    ]


def test_the_end_of_a_run_stops_the_fault_and_evidence_threads(tmp_path: Path) -> None:
    import threading

    ctx = _context(tmp_path)
    watching = threading.Thread(target=lambda: ctx.stopping.wait(600), daemon=True)
    background = threading.Thread(target=lambda: ctx.stopping.wait(600), daemon=True)
    watching.start()
    background.start()
    ctx.background.append(background)
    assert ctx.stop_threads([watching], 30.0) == []
    assert not watching.is_alive() and not background.is_alive()


# -- reports -----------------------------------------------------------------------------------


def _synthetic() -> PlanResult:
    return PlanResult(
        plan="synthetic",
        description="made up <b>not html</b>",
        seed=7,
        started_at="2026-01-01T00:00:00+00:00",
        duration_s=12.5,
        boards={"mcu": "qemu mps2-an385", "edge": "skipped: no namespaces"},
        timeline=[TimelineEvent(3.0, "fault", "power cut", "edge")],
        steps=[
            StepResult(
                "bit-exact",
                "conformance",
                "passed",
                "8 samples",
                0.0,
                2.0,
                metrics={"samples": 8, "latency_mean_ms": 1.5, "bit_exact": True},
                series={"latency_ms": [1.0, 1.5, 2.0, 1.2]},
                rows=[{"model": "mlp", "flash_bytes": 9000}],
            ),
            StepResult("slow", "latency", "failed", "max latency 9 ms > 5 ms", 2.0, 1.0),
            StepResult("crashed", "deploy", "error", "BoardError: \x01boom & <fire>", 3.0, 0.5),
            StepResult("no-net", "fault", "skipped", "boards edge not run here: no netns", 3.5),
        ],
    )


def test_reports_are_valid_junit_self_contained_html_and_json(tmp_path: Path) -> None:
    written = write_reports(_synthetic(), tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "junit.xml",
        "report.html",
        "results.json",
    ]
    assert set(written) == {"junit.xml", "report.html", "results.json"}

    root = ET.parse(written["junit.xml"]).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    for element in (root, suite):
        assert element.get("tests") == "4"
        assert element.get("failures") == "1"
        assert element.get("errors") == "1"
        assert element.get("skipped") == "1"
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert list(cases) == ["bit-exact", "slow", "crashed", "no-net"]
    assert cases["bit-exact"].get("time") == "2.000"
    assert cases["bit-exact"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in cases["bit-exact"].iter("property")}
    assert props == {"samples": "8", "latency_mean_ms": "1.5", "bit_exact": "true"}
    failure = cases["slow"].find("failure")
    assert failure is not None and failure.get("message") == "max latency 9 ms > 5 ms"
    error = cases["crashed"].find("error")
    assert error is not None and error.get("message") == "BoardError: ?boom & <fire>"
    skipped = cases["no-net"].find("skipped")
    assert skipped is not None and "no netns" in (skipped.get("message") or "")
    suite_props = {p.get("name"): p.get("value") for p in suite.find("properties") or []}
    assert suite_props["seed"] == "7"

    page = written["report.html"].read_text(encoding="utf-8")
    lowered = page.lower()
    for external in ("http:", "https:", "//", "<script", "<link", "src=", "url(", "@import"):
        assert external not in lowered, external
    assert "<svg" in page and "<style>" in page
    assert "&lt;b&gt;not html&lt;/b&gt;" in page and "&lt;fire&gt;" in page
    assert page.count('class="badge failed"') >= 2  # the verdict and the failed step
    assert "power cut" in page

    data = json.loads(written["results.json"].read_text(encoding="utf-8"))
    assert data["passed"] is False
    assert data["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    again = PlanResult.from_dict(data)
    assert again.to_dict() == data


def test_reports_survive_surrogates_control_characters_and_nan(tmp_path: Path) -> None:
    # a board's UART bytes decoded with surrogateescape, and a metric that came out NaN
    odd = "garbled \udcff\x07 <x>"
    result = PlanResult(
        plan="odd",
        boards={"far": odd},
        steps=[
            StepResult(odd, "latency", "failed", odd, metrics={"m": math.nan, odd: math.inf}),
            StepResult("ok", "soak", "passed", odd),
        ],
        timeline=[TimelineEvent(1.0, "fault", odd, "far")],
    )
    written = write_reports(result, tmp_path)
    root = ET.parse(written["junit.xml"]).getroot()
    case = root.find("testsuite/testcase")
    assert case is not None and case.get("name") == "garbled ?? <x>"
    page = written["report.html"].read_bytes().decode("utf-8")
    assert "garbled ?? &lt;x&gt;" in page
    data = json.loads(
        written["results.json"].read_text(encoding="utf-8"),
        parse_constant=lambda name: pytest.fail(f"{name} in results.json"),
    )
    assert data["steps"][0]["metrics"]["m"] is None


def test_the_working_directory_is_removed_when_the_reports_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    import hil.runner

    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(prefix: str) -> str:
        path = real_mkdtemp(prefix=prefix, dir=tmp_path)
        made.append(Path(path))
        return path

    def cannot_write(result: PlanResult, directory: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(hil.runner, "write_reports", cannot_write)
    plan = parse_plan(
        {
            "name": "away",
            "boards": {
                "far": {
                    "kind": "serial",
                    "port": "/dev/nonexistent-hil-port",
                    "flash_command": "true {image}",
                }
            },
            "steps": [{"latency": {"boards": ["far"]}}],
        },
        "away.yaml",
    )
    with pytest.raises(OSError, match="No space left"):
        run_plan(plan, tmp_path / "r", progress=None)
    assert len(made) == 1 and not made[0].exists()


def test_html_of_a_run_without_steps_or_samples_renders(tmp_path: Path) -> None:
    empty = PlanResult(plan="empty", interrupted=True)
    assert "interrupted" in render_html(empty)
    one = PlanResult(plan="one", steps=[StepResult("s", "latency", series={"x_ms": [5.0, 5.0]})])
    assert "<svg" in render_html(one)  # a constant series still plots


# -- running plans -----------------------------------------------------------------------------


def _junit_counts(path: Path) -> dict[str, str | None]:
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    return {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")}


def _results(report: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((report / "results.json").read_text(encoding="utf-8"))
    return data


def _run_env(tmp_path: Path) -> dict[str, str]:
    return {"PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}


@pytest.mark.slow
@pytest.mark.mosquitto
def test_smoke_plan_passes_and_catches_the_tampered_firmware(tmp_path: Path) -> None:
    report = tmp_path / "smoke"
    result = run_cli(
        "edgeops-hil", "run", "smoke", "--report", str(report), env=_run_env(tmp_path), timeout=280
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = _results(report)
    steps = {s["name"]: s for s in data["steps"]}
    assert all(s["status"] == "passed" for s in data["steps"]), result.stderr[-3000:]
    assert _junit_counts(report / "junit.xml") == {
        "tests": str(len(steps)),
        "failures": "0",
        "errors": "0",
        "skipped": "0",
    }
    rolled_back = steps["tampered-firmware-rolled-back"]["metrics"]
    assert rolled_back["state.gateway"] == "rolled_back"
    assert "conformance" in rolled_back["reason.gateway"]
    assert "->" in steps["release-tampered-firmware"]["metrics"]["tampered"]
    mcu = steps["conformance-mcu"]["metrics"]
    assert mcu["samples"] == 10 and mcu["mismatched_samples"] == 0
    assert steps["latency"]["metrics"]["samples"] == 40
    assert data["boards"]["gateway"].startswith("linux agent, gateway for mcu")
    # the run's working directory went away with everything in it
    assert not list(tmp_path.glob("edgeops-hil-smoke-*"))
    assert "<svg" in (report / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_mcu_conformance_plan_is_bit_exact_on_cortex_m3_and_m4(tmp_path: Path) -> None:
    report = tmp_path / "mcu"
    result = run_cli(
        "edgeops-hil",
        "run",
        "mcu-conformance",
        "--report",
        str(report),
        env=_run_env(tmp_path),
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = _results(report)
    exact, footprint = data["steps"]
    assert exact["status"] == footprint["status"] == "passed"
    rows = exact["rows"]
    assert {(r["model"], r["target"]) for r in rows} >= {
        ("mlp", "mps2-an385"),
        ("mlp", "mps2-an386"),
        ("cnn", "mps2-an386"),
    }
    assert all(r["bit_exact"] and r["samples"] > 0 and r["mismatched"] == 0 for r in rows)
    assert all(r["cycles"] and r["cycles"] > 0 for r in rows)
    figures = footprint["rows"]
    assert len(figures) == len(rows)
    assert all(r["flash_bytes"] > 0 and r["ram_bytes"] > 0 for r in figures)
    assert _junit_counts(report / "junit.xml")["failures"] == "0"


_BROKEN_PLAN = """
name: broken-board
boards:
  mcu: {kind: qemu, target: mps2-an385}
  far: {kind: serial, port: /dev/nonexistent-hil-port, flash_command: "true {image}"}
steps:
  - name: far-away
    latency: {boards: [far], samples: 3}
  - name: nothing-deployed
    latency: {boards: [mcu], samples: 3}
    expect: {errors_max: 0}
    stop_on_failure: true
  - name: never-runs
    footprint: {models: zoo, archs: [mlp], targets: [mps2-an385]}
"""


def test_skips_and_failures_are_reported_and_stop_on_failure_skips_the_rest(
    tmp_path: Path,
) -> None:
    plan = parse_plan(yaml.safe_load(_BROKEN_PLAN), "broken.yaml")
    result = run_plan(plan, tmp_path / "r", progress=None)
    assert [(s.name, s.status) for s in result.steps] == [
        ("far-away", "skipped"),
        ("nothing-deployed", "failed"),
        ("never-runs", "skipped"),
    ]
    assert "serial port /dev/nonexistent-hil-port is not there" in result.steps[0].message
    assert "nothing was deployed to it" in result.steps[1].message
    assert "step nothing-deployed failed" in result.steps[2].message
    assert not result.passed
    assert _junit_counts(tmp_path / "r" / "junit.xml") == {
        "tests": "3",
        "failures": "1",
        "errors": "0",
        "skipped": "2",
    }


_LINUX_PLAN = """
name: linux-only
boards:
  edge: {kind: linux}
  mcu: {kind: qemu, target: mps2-an385}
steps:
  - name: on-edge
    latency: {boards: [edge], samples: 3}
  - name: on-mcu
    footprint: {models: zoo, archs: [mlp], targets: [mps2-an385]}
    expect: {flash_bytes_max: 1000000}
"""


@pytest.mark.mosquitto
def test_linux_boards_are_skipped_with_the_reason_where_namespaces_are_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hil.netns

    monkeypatch.setattr(hil.netns, "netns_unavailable", lambda: "not root (test)")
    plan = parse_plan(yaml.safe_load(_LINUX_PLAN), "linux.yaml")
    result = run_plan(plan, tmp_path / "r", progress=None)
    edge, mcu = result.steps
    assert (edge.status, edge.message) == (
        "skipped",
        "boards edge not run here: no network namespaces here: not root (test)",
    )
    assert mcu.status == "passed", mcu.message
    assert result.passed  # a skipped step, with its reason, does not fail the run
    assert result.boards["edge"] == "skipped: no network namespaces here: not root (test)"


_INTERRUPTIBLE = """
name: interruptible
boards:
  mcu: {kind: qemu, target: mps2-an385}
steps:
  - name: first
    conformance: {models: zoo, archs: [mlp], targets: [mps2-an385], vectors: 4}
  - name: long
    soak: {boards: [mcu], duration_s: 600, rate_hz: 1}
  - name: after
    footprint: {models: zoo, archs: [mlp], targets: [mps2-an385]}
"""


def _qemu_pids(state_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system-arm" in cmdline and str(state_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_ctrl_c_stops_the_boards_and_still_writes_the_reports(tmp_path: Path) -> None:
    plan_file = _write(tmp_path, _INTERRUPTIBLE)
    report = tmp_path / "r"
    process = subprocess.Popen(
        [str(BIN / "edgeops-hil"), "run", str(plan_file), "--report", str(report), "--keep"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **_run_env(tmp_path)},
        preexec_fn=sigint_as_in_a_terminal,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "long (soak) ..." in line:  # a model ran on the board, the soak runs for minutes
            break
    state_dir = (report / "work" / "boards" / "mcu").resolve()
    assert _qemu_pids(state_dir), "".join(lines)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, "".join(lines) + rest
    assert "Traceback" not in rest
    assert "interrupted" in rest
    deadline = time.monotonic() + 10
    while _qemu_pids(state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _qemu_pids(state_dir) == []
    data = _results(report)
    assert data["interrupted"] is True and data["passed"] is False
    assert [s["status"] for s in data["steps"]] == ["passed", "error", "skipped"], data["steps"]
    assert data["steps"][1]["message"] == "interrupted while it ran"
    ET.parse(report / "junit.xml")


def test_alter_one_weight_changes_exactly_one_byte_and_the_model_answers_otherwise() -> None:
    from edgeops.evaluate.tflm import tflm_run
    from hil.models import zoo_models
    from hil.steps.fleet import alter_one_weight

    (mlp,) = zoo_models(0, ["mlp"])
    altered, what = alter_one_weight(mlp.tflite)
    assert len(altered) == len(mlp.tflite)
    diff = np.flatnonzero(np.frombuffer(altered, np.uint8) != np.frombuffer(mlp.tflite, np.uint8))
    assert len(diff) == 1, what
    inputs = np.ascontiguousarray(mlp.inputs.reshape(len(mlp.inputs), -1))
    before = np.asarray(tflm_run(mlp.tflite, inputs).outputs)
    after = np.asarray(tflm_run(altered, inputs).outputs)
    assert not np.array_equal(before, after)
