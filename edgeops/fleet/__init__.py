"""The fleet: device twins as reported over MQTT (state, presence, events) and as desired by
the hub, in the database, and the devices' broker identities (enrollment, revocation, the
broker's password/ACL files)."""

from edgeops.fleet.desired import DesiredStateError, Difference, TwinView
from edgeops.fleet.identity import Enrollment, EnrollmentError, IdentityService
from edgeops.fleet.models import (
    Device,
    DeviceCredential,
    DeviceEventRecord,
    DeviceEventView,
    DeviceView,
    IdentityView,
)
from edgeops.fleet.service import FleetService

__all__ = [
    "DesiredStateError",
    "Device",
    "DeviceCredential",
    "DeviceEventRecord",
    "DeviceEventView",
    "DeviceView",
    "Difference",
    "Enrollment",
    "EnrollmentError",
    "FleetService",
    "IdentityService",
    "IdentityView",
    "TwinView",
]
