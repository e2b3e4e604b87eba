"""``edgeops hub serve``: migrate, connect the MQTT bridge, serve the API until stopped.

With a release repository (``edgeops keys init``), the hub also answers devices' ``fetch/req``
(:class:`edgeops.trust.FetchServer`) and re-signs the timestamp before it expires
(:class:`edgeops.trust.TimestampRefresher`); the API serves the repository over HTTP.

A thread next to the bridge pump ticks the rollout engine every second
(:meth:`edgeops.rollout.engine.RolloutEngine.tick`), publishing desired state through its
own :class:`edgeops.hub.DesiredPublisher`.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from edgeops.config import Settings
from edgeops.errors import ConfigError, EdgeOpsError

if TYPE_CHECKING:
    from device_agent.link import MqttEndpoint
    from edgeops.db import Database
    from edgeops.hub.desired import DesiredPublisher
    from edgeops.trust import FetchServer, TimestampRefresher

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str, port: int, *, connect_timeout_s: float = 10.0) -> None:
    """Run the hub in the foreground; returns after SIGINT/SIGTERM. BrokerError if the
    broker does not accept the bridge's connection within ``connect_timeout_s``."""
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
    bridge.start(wait_s=connect_timeout_s)
    stop = threading.Event()
    pump = threading.Thread(target=bridge.run, args=(stop,), name="hub-bridge", daemon=True)
    pump.start()
    fetch_server, refresher, publisher = None, None, None
    rollouts: threading.Thread | None = None
    try:
        publisher, rollouts = _start_rollouts(settings, endpoint, database, stop)
        fetch_server, refresher = _start_trust(settings, endpoint)
        config = uvicorn.Config(
            create_app(fleet, repository_dir=settings.trust_dir / "repository"),
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
            # a client that keeps its connection open must not hold the hub's stop forever
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = uvicorn.Server(config)

        def stopping(signum: int, frame: FrameType | None) -> None:
            # uvicorn re-raises the signal that stopped it once it has shut down, and a signal
            # may come before uvicorn installed its own handlers: either way the server is
            # told to exit (never lost), and the hub exits 0 after cleaning up
            log.info("hub stopping on %s", signal.Signals(signum).name)
            server.should_exit = True

        previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            raise EdgeOpsError(f"the API could not listen on {host}:{port} (address in use?)")
    finally:
        stop.set()
        if rollouts is not None:
            rollouts.join(timeout=5)
        if publisher is not None:
            publisher.stop()
        if refresher is not None:
            refresher.stop()
        if fetch_server is not None:
            fetch_server.stop()
        stop.set()
        pump.join(timeout=5)
        bridge.stop()
        database.dispose()


ROLLOUT_TICK_S = 1.0
GRACEFUL_SHUTDOWN_S = 5  # seconds


def _start_rollouts(
    settings: Settings, endpoint: MqttEndpoint, database: Database, stop: threading.Event
) -> tuple[DesiredPublisher, threading.Thread]:
    """The rollout engine's publisher (connected) and its tick thread (running until
    ``stop``)."""
    from edgeops.hub.desired import DesiredPublisher
    from edgeops.rollout.engine import RolloutEngine
    from edgeops.trust import repository_for

    publisher = DesiredPublisher(
        endpoint, client_id=settings.mqtt_client_id, tls=settings.tls_files
    )
    publisher.start()
    engine = RolloutEngine(database, publisher, repository=repository_for(settings))

    def tick() -> None:
        while not stop.wait(ROLLOUT_TICK_S):
            try:
                engine.tick()
            except Exception:
                log.exception("rollout tick failed; trying again")

    thread = threading.Thread(target=tick, name="hub-rollouts", daemon=True)
    thread.start()
    return publisher, thread


def _start_trust(
    settings: Settings, endpoint: MqttEndpoint
) -> tuple[FetchServer | None, TimestampRefresher | None]:
    """With a release repository under ``settings.trust_dir``: the MQTT fetch server (its own
    link, client id ``<hub id>-fetch``) and the timestamp refresher, both running."""
    from edgeops.trust import FetchServer, TimestampRefresher, repository_for

    repository = repository_for(settings)
    if not repository.exists():
        log.info("no release repository in %s: not serving fetch requests", repository.root_dir)
        return None, None
    refresher = TimestampRefresher(repository, interval_s=settings.trust_refresh_interval_s)
    refresher.check()
    refresher.start()
    fetch_server = FetchServer(
        repository.repository_dir,
        endpoint,
        client_id=f"{settings.mqtt_client_id[:58]}-fetch",
        tls=settings.tls_files,
    )
    try:
        fetch_server.start()
    except BaseException:
        refresher.stop()
        raise
    log.info("serving the release repository %s over MQTT", repository.repository_dir)
    return fetch_server, refresher
