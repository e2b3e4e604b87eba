"""The compatibility contract of a release checked against the device, with a real model card."""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path
from typing import Any

import pytest

from device_agent._version import __version__
from device_agent.card import ModelCard
from device_agent.updater.contract import (
    DeviceFacts,
    available_runtimes,
    check_contract,
    compare_versions,
    free_memory_bytes,
    parse_version,
)
from device_agent.updater.errors import ContractError

GIB = 1024**3


@pytest.fixture(scope="module")
def card(int8_model_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((int8_model_dir / "card.json").read_text())
    return data


def contract(model_card: dict[str, Any], /, **changes: Any) -> dict[str, Any]:
    """A target's ``custom`` metadata holding ``model_card``, with ``changes`` to the contract.

    The card travels as JSON text, as the hub signs it (canonical JSON has no floats).
    """
    document: dict[str, Any] = {
        "card": json.dumps(model_card),
        "hardware": {"arch": ["x86_64", "aarch64"]},
        "min_free_memory_bytes": 64 * 1024 * 1024,
        "runtime": "litert",
    }
    document.update(changes)
    return {"edgeops": document}


def facts(**changes: Any) -> DeviceFacts:
    values: dict[str, Any] = {
        "hardware": {"arch": "aarch64", "os": "linux"},
        "runtimes": {"litert", "onnx"},
        "free_memory_bytes": GIB,
        "agent_version": __version__,
    }
    values.update(changes)
    return DeviceFacts(**values)


def refusal(custom: Any, device: DeviceFacts) -> ContractError:
    with pytest.raises(ContractError) as caught:
        check_contract(custom, device)
    return caught.value


def test_a_fitting_artifact_gives_its_card(card: dict[str, Any]) -> None:
    parsed = check_contract(contract(card), facts())
    assert parsed == ModelCard.from_dict(card)
    assert parsed.runtime == "litert"


def test_a_card_given_as_an_object_is_read_too(card: dict[str, Any]) -> None:
    assert check_contract(contract(card, card=copy.deepcopy(card)), facts()) == (
        ModelCard.from_dict(card)
    )


def test_a_card_that_is_not_json_is_malformed(card: dict[str, Any]) -> None:
    error = refusal(contract(card, card="{not json"), facts())
    assert error.kind == "malformed" and "not valid JSON" in str(error)


def test_this_machine_is_detected() -> None:
    device = DeviceFacts.detect({"arch": platform.machine()}, extra_runtimes={"mcu"})
    assert device.runtimes == {"litert", "onnx", "mcu"}  # the agent extra is installed
    assert available_runtimes() == {"litert", "onnx"}
    assert device.free_memory_bytes is not None and device.free_memory_bytes > 0
    assert device.agent_version == __version__
    assert device.hardware == {"arch": platform.machine()}


def test_free_memory_unknown_without_meminfo(tmp_path: Path) -> None:
    assert free_memory_bytes(tmp_path / "missing") is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    42 kB\n")
    assert free_memory_bytes(tmp_path / "meminfo") == 42 * 1024


# -- hardware -----------------------------------------------------------------------------------


def test_an_artifact_for_another_hardware_class_is_refused(card: dict[str, Any]) -> None:
    error = refusal(contract(card), facts(hardware={"arch": "armv7l"}))
    assert error.kind == "hardware"
    assert "arch=x86_64|aarch64" in str(error) and "arch=armv7l" in str(error)

    error = refusal(contract(card), facts(hardware={"os": "linux"}))
    assert error.kind == "hardware" and "no 'arch' tag" in str(error)


def test_every_required_tag_must_match(card: dict[str, Any]) -> None:
    required = {"arch": ["aarch64"], "board": ["rpi4", "rpi5"]}
    error = refusal(
        contract(card, hardware=required), facts(hardware={"arch": "aarch64", "board": "jetson"})
    )
    assert error.kind == "hardware" and "board" in str(error)
    check_contract(
        contract(card, hardware=required), facts(hardware={"arch": "aarch64", "board": "rpi5"})
    )
    check_contract(contract(card, hardware={}), facts(hardware={}))  # {}: any device


# -- runtime, memory, agent version -------------------------------------------------------------


def test_a_runtime_this_device_lacks_is_refused(card: dict[str, Any]) -> None:
    error = refusal(contract(card), facts(runtimes={"onnx"}))
    assert error.kind == "runtime" and "litert" in str(error)

    onnx_card = {**card, "runtime": "onnx"}
    assert check_contract(contract(onnx_card, runtime="onnx"), facts()).runtime == "onnx"

    mcu_card = {**card, "runtime": "tflm"}
    error = refusal(contract(mcu_card, runtime="mcu"), facts())
    assert error.kind == "runtime" and "mcu" in str(error)
    assert (
        check_contract(contract(mcu_card, runtime="mcu"), facts(runtimes={"mcu"})).runtime == "tflm"
    )


def test_too_little_free_memory_is_refused(card: dict[str, Any]) -> None:
    error = refusal(contract(card, min_free_memory_bytes=2 * GIB), facts())
    assert error.kind == "memory" and str(2 * GIB) in str(error)

    big_arena = {**card, "arena_bytes": 3 * GIB}
    error = refusal(contract(big_arena, min_free_memory_bytes=None), facts())
    assert error.kind == "memory" and "arena" in str(error)

    # a device that cannot tell its free memory is not refused for it
    check_contract(contract(big_arena), facts(free_memory_bytes=None))


def test_an_artifact_that_needs_a_newer_agent_is_refused(card: dict[str, Any]) -> None:
    newer = {**card, "min_agent_version": "99.0"}
    error = refusal(contract(newer), facts())
    assert error.kind == "agent_version"
    assert "99.0" in str(error) and __version__ in str(error)

    check_contract(contract({**card, "min_agent_version": "0.10.0"}), facts(agent_version="0.10"))
    error = refusal(contract({**card, "min_agent_version": "0.10.0"}), facts(agent_version="0.9.9"))
    assert error.kind == "agent_version"
    error = refusal(
        contract({**card, "min_agent_version": "1.0.0"}), facts(agent_version="1.0.0rc2")
    )
    assert error.kind == "agent_version"
    check_contract(
        contract({**card, "min_agent_version": "1.0.0rc2"}), facts(agent_version="1.0.0")
    )


@pytest.mark.parametrize(
    ("left", "right", "order"),
    [
        ("0.1.0", "0.1", 0),
        ("1.2", "1.10", -1),
        ("0.10.0", "0.9.9", 1),
        ("1.0.0.dev1", "1.0.0a1", -1),
        ("1.0.0a2", "1.0.0b1", -1),
        ("1.0.0rc1", "1.0.0", -1),
        ("1.0.0", "1.0.0.post1", -1),
        ("v2.0", "2.0.0+local.7", 0),
        ("1.0.0-rc.3", "1.0.0rc3", 0),
    ],
)
def test_versions_compare_as_versions(left: str, right: str, order: int) -> None:
    assert compare_versions(left, right) == order
    assert compare_versions(right, left) == -order


@pytest.mark.parametrize("text", ["", "latest", "1..2", "1.x", "1.0-beta-gamma", ">=1.0"])
def test_a_version_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a version number"):
        parse_version(text)


# -- malformed contracts ------------------------------------------------------------------------


def test_malformed_contracts_name_the_problem(card: dict[str, Any]) -> None:
    device = facts()
    cases: list[tuple[Any, str]] = [
        (None, "must be an object"),
        ({"other": {}}, "no 'edgeops' contract"),
        ({"edgeops": []}, "'edgeops' must be an object"),
        (contract(card, runtime="tpu"), "'runtime' must be one of litert, onnx, mcu"),
        (contract(card, card=None), "'card' must be an object"),
        (contract({**card, "input_spec": "x"}), "input_spec"),
        (contract({**card, "runtime": "onnx"}), "needs a card for 'litert'"),
        (contract(card, hardware={"arch": "x86_64"}), "must list the values"),
        (contract(card, hardware=["x86_64"]), "'hardware' must be an object"),
        (contract(card, min_free_memory_bytes=True), "min_free_memory_bytes"),
        (contract(card, min_free_memory_bytes=-1), "min_free_memory_bytes"),
        (contract({**card, "min_agent_version": "latest"}), "min_agent_version"),
    ]
    for custom, message in cases:
        error = refusal(custom, device)
        assert error.kind == "malformed", (custom, error)
        assert message in str(error), (message, str(error))


def test_contract_errors_accept_only_their_kinds() -> None:
    with pytest.raises(ValueError, match="contract error kind 'disk'"):
        ContractError("disk", "no")
