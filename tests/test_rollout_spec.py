"""The rollout spec: YAML and JSON round trips, the AWS IoT Jobs ranges at their edges, and
every bad field named in one error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeops.errors import ConfigError
from edgeops.rollout import RolloutSpec, RolloutSpecError, dump_spec, load_spec, parse_spec

FULL_YAML = """\
name: digits-v4
release: digits-mlp/4/litert/model.tflite
selection:
  tags: {site: berlin, line: [a, b]}
  hardware: {arch: [aarch64, x86_64]}
  current_model: m-3f2a9c01b7de
waves:
  canary: {percent: 1.5, abort: {min_devices: 2, failure_count: 1}}
  exponential:
    base_rate_per_minute: 10
    increment_factor: 1.5
    max_rate_per_minute: 400
    rate_increase_criteria: {succeeded: 25}
  success: {min_success_percent: 97.5}
  abort:
    min_devices: 10
    failure_percent: 12.25
    failure_count: 30
    failure_types: [failed, timed_out]
device_timeout_seconds: 900
gates:
  soak_seconds: 120
  max_error_rate: 0.02
  max_crash_rate: 0.001
  max_latency_p95_ratio: 1.25
  divergence: {metric: js, max: 0.1}
  min_shadow_agreement: 0.9
seed: 42
"""


def minimal() -> dict[str, Any]:
    return {
        "name": "r1",
        "release": "digits/2/litert/model.tflite",
        "waves": {
            "canary": {"count": 5},
            "exponential": {"base_rate_per_minute": 10, "increment_factor": 2.0},
        },
    }


def with_change(path: str, value: Any, document: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``document`` (default :func:`minimal`) with ``a.b.c`` set to ``value``."""
    changed = copy.deepcopy(document if document is not None else minimal())
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return changed


def refused(document: Any) -> RolloutSpecError:
    with pytest.raises(RolloutSpecError) as caught:
        parse_spec(json.dumps(document), "json")
    return caught.value


# -- round trips ------------------------------------------------------------------------------


def test_a_full_spec_round_trips_through_yaml_and_json() -> None:
    spec = parse_spec(FULL_YAML)
    assert spec.waves.canary.percent == 1.5
    assert spec.waves.canary.abort is not None and spec.waves.canary.abort.failure_count == 1
    assert spec.selection.tags == {"site": "berlin", "line": ["a", "b"]}
    assert spec.gates.divergence is not None and spec.gates.divergence.metric == "js"
    for fmt in ("yaml", "json"):
        text = dump_spec(spec, fmt)
        again = parse_spec(text, fmt)
        assert again == spec
        assert again.to_dict() == spec.to_dict()
        assert dump_spec(again, fmt) == text  # a second trip changes nothing, byte for byte
    # YAML's output is YAML, JSON's is JSON, and both say the same
    assert yaml.safe_load(dump_spec(spec, "yaml")) == json.loads(dump_spec(spec, "json"))


def test_a_minimal_spec_gets_defaults_that_round_trip(tmp_path: Path) -> None:
    spec = parse_spec(json.dumps(minimal()), "json")
    assert spec.waves.exponential.max_rate_per_minute == 1000
    assert spec.waves.exponential.rate_increase_criteria is None
    assert spec.waves.abort.failure_percent == 10.0
    assert spec.device_timeout_seconds == 600
    assert spec.gates.soak_seconds == 300 and spec.gates.max_error_rate is None
    for name, fmt in (("spec.yaml", "yaml"), ("spec.yml", "yaml"), ("spec.json", "json")):
        path = tmp_path / name
        path.write_text(dump_spec(spec, fmt))
        assert load_spec(path) == spec


def test_json_is_read_from_a_yaml_file_too(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(minimal()))
    assert load_spec(path).name == "r1"


def test_a_spec_is_immutable() -> None:
    spec = parse_spec(FULL_YAML)
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"


# -- AWS IoT Jobs ranges ----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1, 1000, 60_000])
def test_rate_per_minute_accepts_the_aws_edges_and_beyond(rate: int) -> None:
    document = with_change("waves.exponential.base_rate_per_minute", rate)
    document = with_change("waves.exponential.max_rate_per_minute", rate, document)
    spec = parse_spec(json.dumps(document), "json")
    assert spec.waves.exponential.base_rate_per_minute == rate
    assert spec.waves.exponential.max_rate_per_minute == rate


def test_the_maximum_rate_defaults_to_1000_or_a_higher_base_rate() -> None:
    document = with_change("waves.exponential.base_rate_per_minute", 3000)
    document["waves"]["exponential"].pop("max_rate_per_minute", None)
    spec = parse_spec(json.dumps(document), "json")
    assert spec.waves.exponential.max_rate_per_minute == 3000
    assert parse_spec(dump_spec(spec, "json"), "json") == spec
    document = with_change("waves.exponential.base_rate_per_minute", 10)
    document["waves"]["exponential"].pop("max_rate_per_minute", None)
    assert parse_spec(json.dumps(document), "json").waves.exponential.max_rate_per_minute == 1000


@pytest.mark.parametrize("field", ["base_rate_per_minute", "max_rate_per_minute"])
@pytest.mark.parametrize("rate", [0, 60_001, -5])
def test_rate_per_minute_is_refused_outside_1_to_60000(field: str, rate: int) -> None:
    error = refused(with_change(f"waves.exponential.{field}", rate))
    assert str(error) == f"waves.exponential.{field}: must be between 1 and 60000"
    assert error.field == f"waves.exponential.{field}"


@pytest.mark.parametrize("factor", [1.1, 5, 5.0, 2.5])
def test_increment_factor_accepts_the_aws_edges(factor: float) -> None:
    spec = parse_spec(json.dumps(with_change("waves.exponential.increment_factor", factor)), "json")
    assert spec.waves.exponential.increment_factor == float(factor)


@pytest.mark.parametrize("factor", [1.0, 1.09, 5.01, 6, 0])
def test_increment_factor_is_refused_outside_1_1_to_5(factor: float) -> None:
    error = refused(with_change("waves.exponential.increment_factor", factor))
    assert str(error) == "waves.exponential.increment_factor: must be between 1.1 and 5"


def test_increment_factor_must_be_finite() -> None:
    error = parse_error("waves:\n  exponential:\n    increment_factor: .nan\n")
    assert error.field == "waves.exponential.increment_factor"


def parse_error(fragment: str) -> RolloutSpecError:
    """The error of the minimal spec with a YAML ``fragment`` merged over it."""
    document = minimal()
    _merge(document, yaml.safe_load(fragment))
    with pytest.raises(RolloutSpecError) as caught:
        parse_spec(yaml.safe_dump(document))
    return caught.value


def _merge(into: dict[str, Any], change: dict[str, Any]) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def test_max_rate_below_base_rate_is_refused() -> None:
    document = with_change("waves.exponential.base_rate_per_minute", 100)
    error = refused(with_change("waves.exponential.max_rate_per_minute", 50, document))
    assert error.field == "waves.exponential"
    assert "max_rate_per_minute (50) is below base_rate_per_minute (100)" in str(error)


# -- every bad input, named -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field", "needle"),
    [
        ("waves.canary", {"count": 0}, "waves.canary.count", "at least 1"),
        ("waves.canary", {"percent": 0}, "waves.canary.percent", "above 0 and at most 100"),
        ("waves.canary", {"percent": 100.5}, "waves.canary.percent", "at most 100"),
        ("waves.canary", {"count": 1, "percent": 1.0}, "waves.canary", "exactly one"),
        ("waves.canary", {}, "waves.canary", "exactly one"),
        (
            "waves.exponential.rate_increase_criteria",
            {"notified": 0},
            "waves.exponential.rate_increase_criteria.notified",
            "at least 1",
        ),
        (
            "waves.exponential.rate_increase_criteria",
            {"notified": 5, "succeeded": 5},
            "waves.exponential.rate_increase_criteria",
            "exactly one",
        ),
        ("waves.abort", {"min_devices": 3}, "waves.abort", "failure_count, failure_percent"),
        ("waves.abort", {"failure_percent": 101}, "waves.abort.failure_percent", "at most 100"),
        ("waves.abort", {"failure_count": 0}, "waves.abort.failure_count", "at least 1"),
        ("waves.abort", {"failure_count": 1, "min_devices": 0}, "waves.abort.min_devices", ""),
        (
            "waves.abort",
            {"failure_count": 1, "failure_types": ["exploded"]},
            "waves.abort.failure_types[0]",
            "'failed', 'rejected' or 'timed_out'",
        ),
        (
            "waves.abort",
            {"failure_count": 1, "failure_types": []},
            "waves.abort.failure_types",
            "at least one",
        ),
        ("waves.success", {"min_success_percent": 0}, "waves.success.min_success_percent", ""),
        ("device_timeout_seconds", 0, "device_timeout_seconds", "between 1 and 604800"),
        ("device_timeout_seconds", 604801, "device_timeout_seconds", "between 1 and 604800"),
        ("gates.soak_seconds", -1, "gates.soak_seconds", "between 0 and 604800"),
        ("gates.max_error_rate", 1.5, "gates.max_error_rate", "between 0 and 1"),
        ("gates.max_crash_rate", -0.1, "gates.max_crash_rate", "between 0 and 1"),
        ("gates.max_latency_p95_ratio", 0.9, "gates.max_latency_p95_ratio", "between 1 and 100"),
        ("gates.min_shadow_agreement", 2, "gates.min_shadow_agreement", "between 0 and 1"),
        ("gates.divergence", {"metric": "js", "max": 1.5}, "gates.divergence.max", "for js"),
        ("gates.divergence", {"metric": "psi", "max": 0}, "gates.divergence.max", "for psi"),
        ("gates.divergence", {"metric": "kl", "max": 0.1}, "gates.divergence.metric", "'psi'"),
        ("selection.tags", {"site": 7}, "selection.tags.site", "a string or a list of strings"),
        ("selection.tags", {"site": []}, "selection.tags", "list of values is empty"),
        ("selection.tags", {"bad key!": "x"}, "selection.tags", "tag key 'bad key!'"),
        ("selection.hardware", {"arch": {"x": 1}}, "selection.hardware.arch", "a string or"),
        ("selection.current_model", [], "selection.current_model", "list of model ids is empty"),
        ("selection.colour", "red", "selection.colour", "unknown field"),
        ("release", "../../etc/passwd", "release", "not a target path"),
        ("release", 3, "release", "valid string"),
        ("name", "has space", "name", "1-63 letters"),
        ("seed", "seven", "seed", "valid integer"),
        ("spec_version", 2, "spec_version", "must be one of 1"),
        ("rollback", True, "rollback", "unknown field"),
    ],
)
def test_each_bad_field_is_named(path: str, value: Any, field: str, needle: str) -> None:
    error = refused(with_change(path, value))
    assert isinstance(error, ConfigError)  # the CLI's exit code 2
    assert error.field == field, str(error)
    assert str(error).startswith(f"{field}: ")
    assert needle in str(error)


def test_types_are_strict_not_coerced() -> None:
    assert refused(with_change("waves.exponential.base_rate_per_minute", True)).field == (
        "waves.exponential.base_rate_per_minute"
    )
    assert refused(with_change("waves.exponential.base_rate_per_minute", "10")).field == (
        "waves.exponential.base_rate_per_minute"
    )
    assert refused(with_change("waves.exponential.base_rate_per_minute", 10.5)).field == (
        "waves.exponential.base_rate_per_minute"
    )


@pytest.mark.parametrize("required", ["name", "release", "waves"])
def test_a_missing_required_field_is_named(required: str) -> None:
    document = minimal()
    del document[required]
    error = refused(document)
    assert str(error) == f"{required}: missing (required)"


def test_text_that_is_not_a_spec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RolloutSpecError, match="not valid YAML"):
        parse_spec("name: [unclosed")
    with pytest.raises(RolloutSpecError, match="not valid JSON"):
        parse_spec("{name: 1}", "json")
    with pytest.raises(RolloutSpecError, match="must be a mapping, got list"):
        parse_spec("- a\n- b\n")
    with pytest.raises(RolloutSpecError, match="cannot read rollout spec"):
        load_spec(tmp_path / "absent.yaml")
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RolloutSpecError, match="not UTF-8"):
        load_spec(binary)


def test_the_model_is_the_spec_type() -> None:
    assert isinstance(parse_spec(FULL_YAML), RolloutSpec)


def test_the_example_in_the_docs_is_a_valid_spec() -> None:
    text = (Path(__file__).parent.parent / "docs" / "rollouts.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(example)
    assert spec.waves.exponential.max_rate_per_minute == 500
    assert parse_spec(dump_spec(spec)) == spec
