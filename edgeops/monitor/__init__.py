"""Monitoring: telemetry windows from the devices, ingested idempotently.

    telemetry = TelemetryService(database)
    telemetry.record(window)          # False for a (device, seq) already stored
    telemetry.list_windows("dev-1")   # the newest windows, oldest first
    telemetry.record_many(windows)    # one INSERT; stored, duplicates, replayed seqs

    report = detect_drift(aggregate_windows(windows), card["reference"])
    report.verdict                    # "drift", "no_drift" or "insufficient"

How drift is tested: docs/monitoring.md.

Ingest workers sharing the telemetry stream, validation and the release catalogue:
:mod:`edgeops.monitor.ingest` (``edgeops hub ingest``).
"""

from edgeops.monitor.drift import (
    DriftConfig,
    DriftError,
    DriftReport,
    DriftTest,
    WindowAggregate,
    aggregate_windows,
    detect_drift,
)
from edgeops.monitor.ingest import (
    IngestStats,
    IngestWorker,
    ReleaseCatalogue,
    TelemetryRejectedError,
    TelemetryValidator,
    run_ingest,
    telemetry_share,
)
from edgeops.monitor.models import TelemetryWindowRecord, TelemetryWindowView
from edgeops.monitor.service import TelemetryService

__all__ = [
    "DriftConfig",
    "DriftError",
    "DriftReport",
    "DriftTest",
    "IngestStats",
    "IngestWorker",
    "ReleaseCatalogue",
    "TelemetryRejectedError",
    "TelemetryService",
    "TelemetryValidator",
    "TelemetryWindowRecord",
    "TelemetryWindowView",
    "WindowAggregate",
    "aggregate_windows",
    "detect_drift",
    "run_ingest",
    "telemetry_share",
]
