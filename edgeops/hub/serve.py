"""``edgeops hub serve``: migrate, connect the MQTT bridge, serve the API until stopped."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from edgeops.config import Settings
from edgeops.errors import ConfigError, EdgeOpsError

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the hub in the foreground; returns after SIGINT/SIGTERM."""
    import uvicorn

    from edgeops.api import create_app
    from edgeops.db import Database
    from edgeops.fleet import FleetService
    from edgeops.hub.bridge import HubBridge

    endpoint = settings.mqtt_endpoint
    if endpoint is None:
        raise ConfigError(
            "no broker configured: set EDGEOPS_MQTT_URL (or run `edgeops broker` and point "
            "EDGEOPS_MQTT_URL at it)"
        )
    database = Database(settings.database)
    database.check()
    database.upgrade()
    fleet = FleetService(database)
    bridge = HubBridge(endpoint, fleet, client_id=settings.mqtt_client_id, tls=settings.tls_files)
    bridge.start()
    stop = threading.Event()
    pump = threading.Thread(target=bridge.run, args=(stop,), name="hub-bridge", daemon=True)
    pump.start()
    try:
        config = uvicorn.Config(
            create_app(fleet), host=host, port=port, log_level=settings.log_level.lower()
        )
        server = uvicorn.Server(config)
        # uvicorn re-raises the signal that stopped it once it has shut down; a stop by
        # SIGINT/SIGTERM is the normal end of a service, so it lands in a handler that only
        # logs, and the hub exits 0 after cleaning up.
        previous = {sig: signal.signal(sig, _stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            raise EdgeOpsError(f"the API could not listen on {host}:{port} (address in use?)")
    finally:
        stop.set()
        pump.join(timeout=5)
        bridge.stop()
        database.dispose()


def _stopping(signum: int, frame: FrameType | None) -> None:
    log.info("hub stopping on %s", signal.Signals(signum).name)
