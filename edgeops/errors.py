"""Errors the hub raises on purpose. The CLI prints their message as one line.

EdgeOpsError
├── ConfigError         (device_agent.errors) malformed or unsafe configuration
├── DatabaseError       the database is unreachable, or a migration failed
├── BrokerError         the embedded broker could not start, or the MQTT broker is unreachable
└── NotFoundError       a named object (device, model, release ...) does not exist
"""

from __future__ import annotations

from device_agent.errors import AgentError, ConfigError, LinkError, ProtocolError

EdgeOpsError = AgentError  # one root, so a single handler catches hub and agent errors alike


class DatabaseError(EdgeOpsError):
    """The database is unreachable, refused us, or could not be migrated."""


class BrokerError(EdgeOpsError):
    """The embedded broker could not start, or the configured broker is unreachable."""


class NotFoundError(EdgeOpsError):
    """A named object does not exist."""


__all__ = [
    "BrokerError",
    "ConfigError",
    "DatabaseError",
    "EdgeOpsError",
    "LinkError",
    "NotFoundError",
    "ProtocolError",
]
