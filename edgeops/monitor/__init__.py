"""Monitoring: telemetry windows from the devices, ingested idempotently.

    telemetry = TelemetryService(database)
    telemetry.record(window)          # False for a (device, seq) already stored
    telemetry.list_windows("dev-1")   # the newest windows, oldest first

Drift statistics and quality gates over these windows come next (see docs/architecture.md).
"""

from edgeops.monitor.models import TelemetryWindowRecord, TelemetryWindowView
from edgeops.monitor.service import TelemetryService

__all__ = ["TelemetryService", "TelemetryWindowRecord", "TelemetryWindowView"]
