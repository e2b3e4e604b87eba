"""The fleet: device twins as reported over MQTT (state, presence), stored in the database."""

from edgeops.fleet.models import Device, DeviceView
from edgeops.fleet.service import FleetService

__all__ = ["Device", "DeviceView", "FleetService"]
