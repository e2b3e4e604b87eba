"""The hub process: MQTT bridge, API and background jobs, composed."""

from edgeops.hub.bridge import HubBridge

__all__ = ["HubBridge"]
