"""The three command-line programs, as a new user meets them."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.clitools import assert_one_line_error, run_cli


@pytest.mark.parametrize("program", ["edgeops", "edgeops-agent", "edgeops-hil"])
def test_help_exits_zero_and_explains(program: str) -> None:
    result = run_cli(program, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


@pytest.mark.parametrize(
    "command",
    [["version"], ["config", "show"], ["db", "upgrade"], ["broker"], ["hub", "serve"], ["demo"]],
)
def test_every_hub_command_has_help(command: list[str]) -> None:
    result = run_cli("edgeops", *command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: edgeops" in result.stdout


@pytest.mark.parametrize("program", ["edgeops", "edgeops-agent", "edgeops-hil"])
def test_version(program: str) -> None:
    result = run_cli(program, "version")
    assert result.returncode == 0
    assert result.stdout.strip().endswith("0.1.0")


def test_config_show_json_is_valid_json_with_secrets_masked() -> None:
    result = run_cli(
        "edgeops", "config", "show", "--json",
        env={"EDGEOPS_MQTT_URL": "mqtt://hub:Xk9-very-secret@127.0.0.1:1883"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["mqtt_url"] == "mqtt://hub:***@127.0.0.1:1883"
    assert "Xk9-very-secret" not in result.stdout


def test_unknown_option_is_a_usage_error_without_traceback() -> None:
    result = run_cli("edgeops", "config", "show", "--no-such-option")
    assert result.returncode == 2
    assert "No such option: --no-such-option" in result.stderr
    assert "Traceback" not in result.stderr
    agent = run_cli("edgeops-agent", "run", "--no-such-option")
    assert agent.returncode == 2 and "unrecognized arguments" in agent.stderr


def test_malformed_config_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "edgeops.toml"
    config.write_text("api_port = [unclosed\n")
    result = run_cli("edgeops", "--config", str(config), "config", "show")
    assert result.returncode == 2
    assert_one_line_error(result, "edgeops: error:", str(config), "not valid TOML")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_database_is_one_line() -> None:
    port = _closed_port()
    result = run_cli(
        "edgeops", "db", "upgrade",
        env={"EDGEOPS_DATABASE_URL": f"postgresql://edgeops:pw-42z@127.0.0.1:{port}/edgeops"},
    )  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result, "cannot connect to database", f"127.0.0.1:{port}")
    assert "pw-42z" not in result.stderr


def test_unreachable_broker_is_one_line() -> None:
    port = _closed_port()
    result = run_cli(
        "edgeops", "hub", "serve", "--connect-timeout", "1",
        env={"EDGEOPS_MQTT_URL": f"mqtt://127.0.0.1:{port}"},
    )  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result, "cannot connect to MQTT broker", f"127.0.0.1:{port}")


def test_db_upgrade_creates_the_database_in_a_fresh_data_dir(isolated_environment: Path) -> None:
    result = run_cli("edgeops", "db", "upgrade", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["revision"]
    assert (isolated_environment / "edgeops.db").is_file()
    again = run_cli("edgeops", "db", "upgrade", "--json")
    assert json.loads(again.stdout) == json.loads(result.stdout)


def test_agent_bad_configuration_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "ok-1"\nheartbeat_s = -3\n')
    result = run_cli("edgeops-agent", "run", "--config", str(config))
    assert result.returncode == 2
    assert_one_line_error(result, "edgeops-agent: error:", "heartbeat_s")


def test_embedded_broker_on_a_taken_port_is_one_line(mosquitto: Any) -> None:
    result = run_cli("edgeops", "broker", "--port", str(mosquitto.port), timeout=60)
    assert result.returncode == 1
    assert_one_line_error(
        result, "cannot listen on", f":{mosquitto.port}", "address already in use"
    )
