"""``edgeops hub serve``: migrate, connect the MQTT bridge, serve the API until stopped.

With a release repository (``edgeops keys init``), the hub also answers devices' ``fetch/req``
(:class:`edgeops.trust.FetchServer`) and re-signs the timestamp before it expires
(:class:`edgeops.trust.TimestampRefresher`); the API serves the repository over HTTP.

A thread next to the bridge pump ticks the rollout engine every second
(:meth:`edgeops.rollout.engine.RolloutEngine.tick`), publishing desired state through its
own :class:`edgeops.hub.DesiredPublisher`. Another evaluates drift of every release every
``drift_interval_s`` (:class:`edgeops.monitor.watch.DriftService`, ``edgeops drift``); a
policy's ``retrain`` action starts the continuous-training pipeline
(:mod:`edgeops.pipelines.ct`) in a thread, and runs left unfinished (by a previous hub, or
a thread that died) are resumed at start and then every minute, in a thread of their own.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgeops.config import Settings
from edgeops.errors import ConfigError, EdgeOpsError

if TYPE_CHECKING:
    from device_agent.link import MqttEndpoint
    from edgeops.db import Database
    from edgeops.hub.desired import DesiredPublisher
    from edgeops.monitor.models import DriftEvaluationView
    from edgeops.monitor.watch import DriftService, Retrainer
    from edgeops.pipelines import PipelineRunner
    from edgeops.trust import FetchServer, TimestampRefresher

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str, port: int, *, connect_timeout_s: float = 10.0) -> None:
    """Run the hub in the foreground; returns after SIGINT/SIGTERM. BrokerError if the
    broker does not accept the bridge's connection within ``connect_timeout_s``."""
    import uvicorn

    from edgeops.api import create_app
    from edgeops.api.context import ApiContext
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
    from edgeops.monitor.ingest import SHARE_GROUP, ReleaseCatalogue
    from edgeops.trust import repository_for

    bridge = HubBridge(
        endpoint,
        fleet,
        client_id=settings.mqtt_client_id,
        tls=settings.tls_files,
        catalogue=ReleaseCatalogue(repository_for(settings)),
        # with ingest workers, the hub takes its share of the telemetry through the same
        # shared subscription; alone, a plain one (Mosquitto 2.0 does not restore shared
        # subscriptions after a restart: see docs/monitoring.md)
        share_group=SHARE_GROUP if settings.ingest_share else None,
    )
    bridge.start(wait_s=connect_timeout_s)
    stop = threading.Event()
    pump = threading.Thread(target=bridge.run, args=(stop,), name="hub-bridge", daemon=True)
    pump.start()
    fetch_server, refresher, publisher = None, None, None
    rollouts: threading.Thread | None = None
    watch: threading.Thread | None = None
    try:
        publisher, rollouts = _start_rollouts(settings, endpoint, database, stop)
        watch = _start_drift_watch(settings, database, stop)
        fetch_server, refresher = _start_trust(settings, endpoint)
        config = uvicorn.Config(
            create_app(ApiContext(settings, database, publisher=publisher)),
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
        if watch is not None:
            watch.join(timeout=5)
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
RESUME_INTERVAL_S = 60.0
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

    return publisher, run_every(ROLLOUT_TICK_S, engine.tick, stop, "hub-rollouts")


def _start_drift_watch(
    settings: Settings, database: Database, stop: threading.Event
) -> threading.Thread:
    """The drift watch's thread: every release evaluated every ``drift_interval_s`` until
    ``stop`` (its actions included)."""
    from edgeops.monitor.watch import DriftService, RepositoryReleases
    from edgeops.trust import repository_for

    runner = pipeline_runner(settings, database)
    watch = DriftService(database, RepositoryReleases(repository_for(settings)), retrainer=None)
    watch.retrainer = _ct_starter(runner, watch)

    def resume() -> None:
        for run_id in runner.resume():
            log.info("pipeline run %s resumed", run_id)

    # runs a hub left unfinished (a restart, or a run whose thread died) carry on at start
    # and then every RESUME_INTERVAL_S; a resumed run works in that thread only
    run_every(RESUME_INTERVAL_S, resume, stop, "hub-pipelines", first=True)
    return run_every(settings.drift_interval_s, watch.evaluate, stop, "hub-drift")


def run_every(
    period_s: float,
    work: Callable[[], object],
    stop: threading.Event,
    name: str,
    *,
    first: bool = False,
) -> threading.Thread:
    """A daemon thread calling ``work`` every ``period_s`` (and at once if ``first``) until
    ``stop`` is set; an exception is logged and the next turn comes as usual."""

    def loop() -> None:
        if first:
            turn()
        while not stop.wait(period_s):
            turn()

    def turn() -> None:
        try:
            work()
        except Exception:
            log.exception("%s: turn failed; trying again", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def pipeline_runner(settings: Settings, database: Database) -> PipelineRunner:
    """The continuous-training pipeline on the hub's stores; rollouts it creates are
    carried out by the hub's engine (no publisher needed to create one)."""
    from edgeops.hub.stores import HubStores
    from edgeops.pipelines import PipelineRunner
    from edgeops.pipelines.ct import CTServices, ct_pipeline
    from edgeops.store import ArtifactStore
    from edgeops.trust import repository_for

    stores = HubStores(database, ArtifactStore(settings.artifacts_dir))
    registry = stores.registry()
    services = CTServices(
        database, stores.store, stores.datasets(), registry, repository_for(settings)
    )
    return PipelineRunner(database, [ct_pipeline(services)], registry=registry)


def _ct_starter(runner: PipelineRunner, watch: DriftService) -> Retrainer:
    """The drift watch's ``retrain`` action: a continuous-training run of the drifting
    model with the policy's parameters, on the samples received since the drift began (the
    newest evaluation that found none), executed in a thread of its own. While a run of the
    model is under way, another onset (another cohort) does not start a second one."""
    from edgeops.pipelines.ct import CT_PIPELINE, CTParams

    def start(event: DriftEvaluationView) -> dict[str, Any]:
        if not event.model_name:
            return {"error": f"model {event.model_id} has no name on its card"}
        for run in runner.list_runs(pipeline=CT_PIPELINE, limit=100):
            if run.status in ("pending", "running") and run.params.get("model") == event.model_name:
                return {"pipeline_run": run.id, "note": "a run of this model was under way"}
        policy = watch.get_policy(event.model_name)
        params = CTParams.from_dict(
            {
                **policy.retrain,
                "model": event.model_name,
                "since": watch.drift_since(event).isoformat(),
            }
        )
        run_id = runner.start(CT_PIPELINE, params.to_dict())
        threading.Thread(
            target=runner.execute, args=(run_id,), name=f"hub-ct-{run_id}", daemon=True
        ).start()
        return {"pipeline_run": run_id}

    return start


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
