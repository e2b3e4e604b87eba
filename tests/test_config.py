"""Settings: precedence, data dir, masking, and refusal of malformed or unsafe values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agent.config import AgentSettings
from device_agent.errors import ConfigError
from device_agent.link import MqttEndpoint
from edgeops.config import Settings, load_settings


def test_defaults_live_under_the_data_dir(isolated_environment: Path) -> None:
    settings = load_settings()
    assert settings.data_dir == isolated_environment
    assert settings.database == f"sqlite:///{isolated_environment / 'edgeops.db'}"
    assert settings.mqtt_url is None


def test_precedence_is_overrides_then_env_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "edgeops.toml"
    config.write_text('api_port = 7001\nlog_level = "DEBUG"\nmqtt_client_id = "from-file"\n')
    monkeypatch.setenv("EDGEOPS_API_PORT", "7002")
    monkeypatch.setenv("EDGEOPS_MQTT_CLIENT_ID", "from-env")
    settings = load_settings(config, mqtt_client_id="from-option")
    assert settings.log_level == "DEBUG"  # file only
    assert settings.api_port == 7002  # env beats file
    assert settings.mqtt_client_id == "from-option"  # option beats env


def test_config_file_found_in_data_dir_and_via_env(
    isolated_environment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_environment.mkdir(parents=True)
    (isolated_environment / "edgeops.toml").write_text("api_port = 7100\n")
    assert load_settings().api_port == 7100
    other = tmp_path / "other.toml"
    other.write_text("api_port = 7200\n")
    monkeypatch.setenv("EDGEOPS_CONFIG", str(other))
    assert load_settings().api_port == 7200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('api_port = "x\n', "is not valid TOML"),
        ("api_port = 70000\n", "api_port .*less than or equal to 65535"),
        ("no_such_setting = 1\n", "unknown setting 'no_such_setting'"),
        ('mqtt_url = "http://broker"\n', "scheme must be mqtt:// or mqtts://"),
        ('database_url = "mysql://x/y"\n', "must start with sqlite:// or postgresql://"),
        ('log_level = "LOUD"\n', "log_level"),
    ],
)
def test_malformed_config_file_gives_one_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(config)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EDGEOPS_SECRET_KEY", "changeme"),
        ("EDGEOPS_MQTT_URL", "mqtt://hub:password@127.0.0.1:1883"),
        ("EDGEOPS_DATABASE_URL", "postgresql://edgeops:change-me@db/edgeops"),
    ],
)
def test_placeholder_secrets_refused_outside_dev_mode(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match="placeholder"):
        load_settings()
    monkeypatch.setenv("EDGEOPS_DEV_MODE", "1")
    assert load_settings().dev_mode


def test_public_dict_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOPS_SECRET_KEY", "s3cr3t-value-long")
    monkeypatch.setenv("EDGEOPS_MQTT_URL", "mqtt://hub:hunter2-pw@broker:1884")
    monkeypatch.setenv("EDGEOPS_DATABASE_URL", "postgresql+psycopg://u:pg-pass-9@db:5432/e")
    shown = str(Settings.load().public_dict())
    for secret in ("s3cr3t-value-long", "hunter2-pw", "pg-pass-9"):
        assert secret not in shown
    assert "mqtt://hub:***@broker:1884" in shown


def test_mqtt_endpoint_parsing() -> None:
    endpoint = MqttEndpoint.parse("mqtts://dev%2F1:p%40ss@broker.local")
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.local", 8883, True)
    assert (endpoint.username, endpoint.password) == ("dev/1", "p@ss")
    assert endpoint.url == "mqtts://dev/1:***@broker.local:8883"
    with pytest.raises(ConfigError, match="no host"):
        MqttEndpoint.parse("mqtt://:1883")
    with pytest.raises(ConfigError, match="malformed"):
        MqttEndpoint.parse("mqtt://host:notaport")


def test_agent_settings_share_data_dir_and_broker_with_the_hub(
    isolated_environment: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGEOPS_MQTT_URL", "mqtt://127.0.0.1:1999")
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "press-7"\n[hardware]\nboard = "rpi4"\n')
    settings = AgentSettings.load(config)
    assert settings.endpoint.port == 1999
    assert settings.state_dir == isolated_environment / "agents" / "press-7"
    assert settings.hardware == {"board": "rpi4"}
    monkeypatch.setenv("EDGEOPS_AGENT_MQTT_URL", "mqtt://127.0.0.1:2000")
    assert AgentSettings.load(config).endpoint.port == 2000


def test_agent_settings_refuse_a_bad_device_id() -> None:
    with pytest.raises(ConfigError, match="device id 'a/b' is invalid"):
        AgentSettings.load(device_id="a/b")


def test_the_factory_root_never_replaces_a_rotated_one(tmp_path: Path) -> None:
    factory = tmp_path / "root-v1.json"
    factory.write_text(json.dumps({"signed": {"_type": "root", "version": 1}, "signatures": []}))
    settings = AgentSettings(
        device_id="rot-1",
        mqtt_url="mqtt://127.0.0.1:1",
        data_dir=tmp_path / "data",
        trust_root_file=factory,
    )
    metadata = settings.trust_dir / "metadata"
    installed = metadata / "root.json"
    (metadata / "root_history").mkdir(parents=True)
    # ngclient unlinks root.json, then links it to the new root: a kill between the two
    installed.symlink_to("root_history/2.root.json")  # its target never reached the disk
    assert settings.provision_trust_root() == installed
    assert installed.is_symlink()
    installed.unlink()  # the kill came before the new link
    (metadata / "root_history" / "2.root.json").write_text("{}")
    assert settings.provision_trust_root() == installed
    assert not installed.exists()  # the trust client uses the history
    (metadata / "root_history" / "2.root.json").unlink()
    assert settings.provision_trust_root() == installed  # a fresh device: provisioned
    assert installed.read_bytes() == factory.read_bytes()
