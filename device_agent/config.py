"""Configuration: one settings object per program, from a TOML file and ``EDGEOPS_`` variables.

Precedence, highest first: explicit overrides (command-line options), environment variables,
the TOML file, defaults. Every error is a :class:`ConfigError` whose message names the
source and the field; callers print it as one line.

The hub's :class:`edgeops.config.Settings` builds on :class:`FileBackedSettings` from here,
so both programs read files and report errors the same way.
"""

from __future__ import annotations

import json
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from device_agent.command import TemplateError, fill_template, parse_template
from device_agent.errors import ConfigError, ProtocolError
from device_agent.fsio import atomic_write_bytes
from device_agent.link import MqttEndpoint, TlsFiles, mask_url
from device_agent.protocol import validate_device_id
from device_agent.sources import SourceConfig

DEFAULT_DATA_DIR = Path("~/.edgeops")

# Values people leave in examples; refused as secrets unless dev mode is on.
PLACEHOLDER_SECRETS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "changethis",
        "secret",
        "password",
        "admin",
        "example",
        "default",
        "edgeops",
    }
)

_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("edgeops_file_values", default={})  # noqa: B039
_FILE_NAME: ContextVar[str] = ContextVar("edgeops_file_name", default="")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file, or raise ConfigError naming the file and the line."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None


def describe_validation_error(exc: ValidationError, env_prefix: str) -> str:
    """One line naming every offending field, its source and what was expected."""
    source = _FILE_NAME.get()
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not loc:  # a rule across fields
            parts.append(message)
            continue
        where = f"{loc} (env {env_prefix}{loc.upper()}"
        where += f" or {source})" if source else ")"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {loc!r}" + (f" in {source}" if source else ""))
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict) or value is None else f", got {value!r}"
        parts.append(f"{where}: {message}{shown}")
    return "invalid configuration: " + "; ".join(parts)


def is_placeholder(secret: str | None) -> bool:
    return secret is not None and secret.strip().lower() in PLACEHOLDER_SECRETS


class FileBackedSettings(BaseSettings):
    """Settings that also read a TOML file, below the environment in precedence."""

    CONFIG_ENV: ClassVar[str] = "EDGEOPS_CONFIG"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, init_kwargs=_FILE_VALUES.get()),
        )

    @classmethod
    def load(cls, config_file: Path | str | None = None, **overrides: Any) -> Self:
        """Build the settings; ``None`` overrides are ignored (an option that was not given)."""
        path = config_file or os.environ.get(cls.CONFIG_ENV) or None
        file_values = read_toml(Path(path).expanduser()) if path else {}
        values_token = _FILE_VALUES.set(file_values)
        name_token = _FILE_NAME.set(str(path) if path else "")
        env_prefix = str(cls.model_config.get("env_prefix", ""))
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, env_prefix)) from None
        finally:
            _FILE_VALUES.reset(values_token)
            _FILE_NAME.reset(name_token)


MCU_PLACEHOLDERS = frozenset({"image", "port"})
"""The placeholders a flash command may hold: ``{image}`` (required) and ``{port}``."""


class McuSettings(BaseModel):
    """The ``[mcu]`` table of agent.toml: a microcontroller board attached to this device.

    With it the agent reports the ``firmware`` runtime and takes firmware releases: it flashes
    the release's ``firmware.elf`` with ``flash_command`` and serves inference on ``port``
    (see :mod:`device_agent.gateway`).
    """

    model_config = ConfigDict(extra="forbid")

    port: str = Field(
        min_length=1,
        description="the board's serial port (a device such as /dev/ttyACM0, or a symlink to "
        "a pseudo-terminal), opened raw with pyserial after every flash",
    )
    flash_command: str = Field(
        min_length=1,
        description="the command that flashes an image, split like a shell line (no shell "
        "runs it); {image} is replaced by the ELF's path (required), {port} by the port; it "
        "must exit 0 once the board runs the image, e.g. 'openocd -f board.cfg -c \"program "
        "{image} verify reset exit\"'",
    )
    target: str | None = Field(
        default=None,
        min_length=1,
        description="the board's firmware target (e.g. mps2-an385); firmware released for "
        "another target is refused before it is downloaded (unset: any target is flashed and "
        "the conformance test decides)",
    )
    baud: int = Field(default=115200, gt=0, description="the port's baud rate")
    timeout_s: float = Field(
        default=5.0, gt=0, description="seconds to wait for the board's answer to one input"
    )
    flash_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="seconds the flash command may take; then it and every process it "
        "started in its process group are killed",
    )

    @field_validator("flash_command")
    @classmethod
    def _flash_command(cls, value: str) -> str:
        try:
            parse_template(value, MCU_PLACEHOLDERS, required=("image",))
        except TemplateError as exc:
            if exc.missing and not exc.unknown:
                raise ValueError(
                    "flash_command must hold {image}, the path of the image to flash"
                ) from None
            raise ValueError(f"flash_command: {exc}") from None
        return value

    def flash_argv(self, image: Path) -> list[str]:
        """The flash command's words with ``{image}`` and ``{port}`` filled in."""
        words = parse_template(self.flash_command, MCU_PLACEHOLDERS)
        return fill_template(words, image=str(image), port=self.port)


class AgentSettings(FileBackedSettings):
    """The device agent's configuration (``agent.toml`` and ``EDGEOPS_AGENT_*`` variables).

    ``data_dir`` and ``mqtt_url`` also honour the hub-wide ``EDGEOPS_DATA_DIR`` and
    ``EDGEOPS_MQTT_URL`` so one environment can configure a whole demo.
    """

    CONFIG_ENV: ClassVar[str] = "EDGEOPS_AGENT_CONFIG"
    model_config = SettingsConfigDict(
        env_prefix="EDGEOPS_AGENT_", extra="forbid", populate_by_name=True
    )

    device_id: str = Field(description="this device's id: its MQTT client id and topic level")
    mqtt_url: str = Field(
        default="mqtt://127.0.0.1:1883",
        validation_alias=AliasChoices("mqtt_url", "EDGEOPS_AGENT_MQTT_URL", "EDGEOPS_MQTT_URL"),
        description="broker URL, mqtt://user:pass@host:port or mqtts:// for TLS",
    )
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        validation_alias=AliasChoices("data_dir", "EDGEOPS_AGENT_DATA_DIR", "EDGEOPS_DATA_DIR"),
        description="root of everything EdgeOps writes; the agent uses agents/<device_id>/",
    )
    hardware: dict[str, str] = Field(
        default_factory=dict, description="hardware tags reported to the hub, e.g. arch=aarch64"
    )
    heartbeat_s: float = Field(default=30.0, gt=0, description="state re-publish interval")
    dev_mode: bool = Field(
        default=False,
        validation_alias=AliasChoices("dev_mode", "EDGEOPS_AGENT_DEV_MODE", "EDGEOPS_DEV_MODE"),
    )
    model_dir: Path | None = Field(
        default=None,
        description="the champion bundle (card.json + model.tflite or model.onnx); without "
        "it the agent only reports presence and state",
    )
    source: SourceConfig | None = Field(
        default=None, description="where samples come from (TOML table [source], kind = ...)"
    )
    window_samples: int | None = Field(
        default=1000,
        ge=0,
        description="a telemetry window closes after this many samples (0: no bound)",
    )
    window_seconds: float | None = Field(
        default=60.0, ge=0, description="... or after this many seconds, first wins (0: no bound)"
    )
    raw_sample_rate: float = Field(
        default=0.0, ge=0, description="raw input samples kept per window for retraining"
    )
    buffer_max_items: int = Field(
        default=100_000, gt=0, description="bound of the offline buffer (messages on disk)"
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description="local HTTP health endpoint on 127.0.0.1"
    )
    models_dir: Path | None = Field(
        default=None, description="where challenger bundles live (default <state_dir>/models)"
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="on SIGTERM, how long to wait for the broker's acks"
    )
    trust_root_file: Path | None = Field(
        default=None,
        description="the hub's TUF root.json, provisioned out of band; copied to "
        "<state_dir>/trust/metadata/root.json on first start (without a trusted root every "
        "update is refused)",
    )
    update_transport: Literal["mqtt", "http"] = Field(
        default="mqtt",
        description="how TUF metadata and targets are fetched: over this device's MQTT fetch "
        "topics, or from the hub's HTTP API (hub_url)",
    )
    hub_url: str | None = Field(
        default=None, description="the hub's HTTP API, http(s)://host:port, for update_transport"
    )
    update_health_s: float = Field(
        default=10.0,
        ge=0,
        description="seconds a new model must run healthy after activation before it is committed",
    )
    mcu: McuSettings | None = Field(
        default=None,
        description="a microcontroller board attached to this device (TOML table [mcu]: "
        "port, flash_command with {image} and optionally {port}, baud, timeout_s, "
        "flash_timeout_s); with it the agent reports the firmware runtime, flashes firmware "
        "releases and runs their test vectors on the board",
    )
    update_max_attempts: int = Field(
        default=3,
        ge=1,
        description="tries of one update (transient failures, interrupted starts) before it "
        "is given up and rolled back",
    )

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        try:
            return validate_device_id(value)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        try:
            MqttEndpoint.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("model_dir", "models_dir", "trust_root_file")
    @classmethod
    def _expand_optional(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("window_samples", "window_seconds")
    @classmethod
    def _zero_is_unset(cls, value: float | None) -> float | None:
        # TOML has no null: 0 switches a bound off
        return None if value == 0 else value

    @model_validator(mode="after")
    def _some_window_bound(self) -> Self:
        if self.window_samples is None and self.window_seconds is None:
            raise ValueError("window_samples and window_seconds are both unset; set at least one")
        return self

    @model_validator(mode="after")
    def _http_transport_needs_hub_url(self) -> Self:
        if self.update_transport == "http":
            if not self.hub_url:
                raise ValueError("update_transport = 'http' needs hub_url (http://host:port)")
            if not self.hub_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"hub_url must start with http:// or https://, got {self.hub_url!r}"
                )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Self:
        if not self.dev_mode and is_placeholder(self.endpoint.password):
            raise ValueError(
                f"the MQTT password in {mask_url(self.mqtt_url)} is a placeholder; "
                "set a real one (or EDGEOPS_DEV_MODE=1 for local experiments)"
            )
        return self

    @property
    def endpoint(self) -> MqttEndpoint:
        return MqttEndpoint.parse(self.mqtt_url)

    @property
    def tls_files(self) -> TlsFiles:
        return TlsFiles(self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)

    @property
    def state_dir(self) -> Path:
        """Where this agent keeps its own files."""
        return self.data_dir / "agents" / self.device_id

    @property
    def trust_dir(self) -> Path:
        """The device's TUF client state: ``metadata/`` (trusted root and the rest)."""
        return self.state_dir / "trust"

    def provision_trust_root(self) -> Path | None:
        """Copy ``trust_root_file`` in as the trusted root on first start; its path, or None.

        A root already there is kept: after a root rotation it is newer than the provisioned
        file. So is a ``root.json`` symlink whose target is gone, and a ``root_history/`` with
        any root in it (ngclient replaces ``root.json`` by unlink + symlink; a power cut in
        between must not bring the factory root back). ConfigError if the file is missing or
        is not a TUF root document.
        """
        installed = self.trust_dir / "metadata" / "root.json"
        history = installed.parent / "root_history"
        if os.path.lexists(installed) or any(history.glob("*.root.json")):
            return installed
        if self.trust_root_file is None:
            return None
        source = self.trust_root_file
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"trust_root_file {source}: cannot read: {exc}") from None
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"trust_root_file {source}: not valid JSON: {exc}") from None
        signed = document.get("signed") if isinstance(document, dict) else None
        if not isinstance(signed, dict) or signed.get("_type") != "root":
            raise ConfigError(f"trust_root_file {source}: not a TUF root metadata document")
        atomic_write_bytes(installed, data)
        return installed

    @property
    def challenger_dir(self) -> Path:
        """Where challenger bundles named by the desired state must live."""
        return self.models_dir if self.models_dir is not None else self.state_dir / "models"
