"""The fleet: device twins as reported over MQTT (state, presence, events), in the database."""

from edgeops.fleet.models import Device, DeviceEventRecord, DeviceEventView, DeviceView
from edgeops.fleet.service import FleetService

__all__ = ["Device", "DeviceEventRecord", "DeviceEventView", "DeviceView", "FleetService"]
