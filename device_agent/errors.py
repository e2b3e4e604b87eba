"""Errors raised by the device agent package.

AgentError
├── ConfigError        the configuration file or environment is malformed or incomplete
├── ProtocolError      a payload or topic from the network does not follow the wire protocol
└── LinkError          the MQTT connection could not be made or was lost for good
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent package raises on purpose."""


class ConfigError(AgentError):
    """Configuration is malformed, incomplete or unsafe. The message names the source and field."""


class ProtocolError(AgentError):
    """Untrusted input from the network that does not follow the wire protocol."""


class LinkError(AgentError):
    """Transport failure on the MQTT link (unreachable broker, refused credentials, TLS)."""
