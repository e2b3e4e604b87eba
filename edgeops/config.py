"""The hub's settings: one object, from ``EDGEOPS_*`` variables and an optional TOML file.

Everything the hub writes lives under ``data_dir`` (``EDGEOPS_DATA_DIR``, default
``~/.edgeops``), so a run in a fresh temporary data dir starts from nothing. The TOML file is
``--config FILE``, else ``EDGEOPS_CONFIG``, else ``<data_dir>/edgeops.toml`` when present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from device_agent.config import DEFAULT_DATA_DIR, FileBackedSettings, is_placeholder
from device_agent.errors import ConfigError
from device_agent.link import MqttEndpoint, TlsFiles, mask_url

__all__ = ["ConfigError", "Settings", "load_settings"]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
DAY_S = 86400.0


class Settings(FileBackedSettings):
    """Effective configuration of the hub and of the ``edgeops`` command."""

    model_config = SettingsConfigDict(env_prefix="EDGEOPS_", extra="forbid")

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR, description="root of everything EdgeOps writes"
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/edgeops.db. "
        "PostgreSQL: postgresql+psycopg://user:pass@host:5432/db",
    )
    mqtt_url: str | None = Field(
        default=None,
        description="broker URL mqtt://user:pass@host:port (mqtts:// for TLS); "
        "unset: the demo starts the embedded broker",
    )
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_client_id: str = Field(default="edgeops-hub", min_length=1, max_length=64)
    broker_password_file: Path | None = Field(
        default=None,
        description="Mosquitto password file that `edgeops broker acl sync` writes "
        "(default <data_dir>/mosquitto/passwd)",
    )
    broker_acl_file: Path | None = Field(
        default=None,
        description="Mosquitto ACL file that `edgeops broker acl sync` writes "
        "(default <data_dir>/mosquitto/acl)",
    )
    broker_pid_file: Path | None = Field(
        default=None,
        description="pid file of the Mosquitto to send SIGHUP after a sync (unset: no signal)",
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_cors_origins: tuple[str, ...] = Field(
        default=(),
        description="origins allowed to call the API from a browser (CORS); empty: CORS off",
    )
    public_url: str | None = Field(
        default=None,
        description="the address browsers use to reach the hub, e.g. https://hub.example.com "
        "(behind a reverse proxy): dashboard forms must come from this origin, and an https "
        "address makes the login cookie Secure; unset: forms must come from the Host header",
    )
    secret_key: SecretStr | None = Field(
        default=None, description="key for signing API tokens and sessions"
    )
    dev_mode: bool = Field(
        default=False, description="local experiments: allows placeholder secrets"
    )
    log_level: LogLevel = "INFO"
    trust_root_expiry_s: float = Field(
        default=365 * DAY_S, gt=0, description="lifetime of a new root version (365 days)"
    )
    trust_targets_expiry_s: float = Field(
        default=90 * DAY_S, gt=0, description="lifetime of a new targets version (90 days)"
    )
    trust_snapshot_expiry_s: float = Field(
        default=7 * DAY_S, gt=0, description="lifetime of a new snapshot version (7 days)"
    )
    trust_timestamp_expiry_s: float = Field(
        default=DAY_S,
        gt=0,
        description="lifetime of a new timestamp (1 day); the running hub re-signs it at half",
    )
    trust_refresh_interval_s: float = Field(
        default=60.0, gt=0, description="how often the running hub checks for expiring metadata"
    )
    ingest_share: bool = Field(
        default=False,
        description="hub serve takes telemetry through the MQTT shared subscription that "
        "`edgeops hub ingest` workers share (set it when they run; see docs/monitoring.md)",
    )
    drift_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="how often the running hub evaluates drift of every release (edgeops drift)",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"public URL {value!r} has an invalid port") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"public URL {value!r} must start with http:// or https://")
        if not parts.hostname or parts.username is not None or parts.password is not None:
            raise ValueError(f"public URL {value!r} must name a host (and no user)")
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in value:
            raise ValueError(
                f"public URL {value!r} must be an origin: no path other than /, no query"
            )
        host = parts.hostname.lower()
        if ":" in host:
            host = f"[{host}]"
        scheme = parts.scheme.lower()
        default = 443 if scheme == "https" else 80
        return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value:
            try:
                MqttEndpoint.parse(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value or None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if not scheme.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"database URL {mask_url(value)!r} must start with sqlite:// or postgresql://"
            )
        return value

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Self:
        if self.dev_mode:
            return self
        checks: list[tuple[str, str | None]] = [
            ("secret_key", self.secret_key.get_secret_value() if self.secret_key else None),
            ("mqtt_url password", self.mqtt_endpoint.password if self.mqtt_endpoint else None),
            ("database_url password", _url_password(self.database_url)),
        ]
        for name, secret in checks:
            if is_placeholder(secret):
                raise ValueError(
                    f"{name} is a placeholder value; set a real secret "
                    "(placeholders are allowed only with EDGEOPS_DEV_MODE=1)"
                )
        return self

    @property
    def database(self) -> str:
        """The effective database URL."""
        return self.database_url or f"sqlite:///{self.data_dir / 'edgeops.db'}"

    @property
    def artifacts_dir(self) -> Path:
        """The content-addressed artifact store."""
        return self.data_dir / "artifacts"

    @property
    def trust_dir(self) -> Path:
        """The TUF release repository and its online keys (see edgeops.trust)."""
        return self.data_dir / "trust"

    @property
    def broker_files(self) -> tuple[Path, Path]:
        """The effective Mosquitto password and ACL files the hub manages."""
        directory = self.data_dir / "mosquitto"
        return (
            self.broker_password_file or directory / "passwd",
            self.broker_acl_file or directory / "acl",
        )

    @property
    def mqtt_endpoint(self) -> MqttEndpoint | None:
        return MqttEndpoint.parse(self.mqtt_url) if self.mqtt_url else None

    @property
    def tls_files(self) -> TlsFiles:
        return TlsFiles(self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)

    def public_dict(self) -> dict[str, Any]:
        """The effective configuration with every secret masked, for display."""
        data = self.model_dump(mode="json")
        data["database_url"] = mask_url(self.database)
        data["mqtt_url"] = mask_url(self.mqtt_url) if self.mqtt_url else None
        data["secret_key"] = "***" if self.secret_key else None
        return data


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from overrides, environment, and the TOML file (see module docstring)."""
    if config_file is None and not os.environ.get(Settings.CONFIG_ENV):
        data_dir = Path(
            overrides.get("data_dir") or os.environ.get("EDGEOPS_DATA_DIR") or DEFAULT_DATA_DIR
        ).expanduser()
        default_file = data_dir / "edgeops.toml"
        if default_file.is_file():
            config_file = default_file
    return Settings.load(config_file, **overrides)
