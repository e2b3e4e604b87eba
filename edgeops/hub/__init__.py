"""The hub process: MQTT bridge, desired-state publisher, API and background jobs, composed."""

from edgeops.hub.bridge import HubBridge
from edgeops.hub.desired import DesiredPublisher

__all__ = ["DesiredPublisher", "HubBridge"]
