"""What the API's routes work with: the hub's settings, its database and the services built
on them, each made once per application on first use.

Routes get the context with ``Depends(get_context)``; :func:`edgeops.api.create_app` puts it
on ``app.state.context``. Every service here is the one the CLI uses, so a route and the
matching command change the same rows in the same transactions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from fastapi import Request

from edgeops.config import Settings

if TYPE_CHECKING:
    from edgeops.api.snapshot import Snapshot
    from edgeops.api.tokens import TokenService
    from edgeops.data import DatasetService
    from edgeops.db import Database
    from edgeops.fleet import FleetService, IdentityService
    from edgeops.fleet.deploy import DesiredSink
    from edgeops.monitor import TelemetryService
    from edgeops.monitor.watch import DriftService
    from edgeops.pipelines import PipelineRunner
    from edgeops.registry import Registry
    from edgeops.rollout.engine import RolloutEngine
    from edgeops.store import ArtifactStore
    from edgeops.trust import TrustRepository


@dataclass
class ApiContext:
    """The hub as the API sees it. ``database`` is migrated and owned by the caller."""

    settings: Settings
    database: Database
    publisher: DesiredSink | None = None
    """where rollout changes made over the API publish desired state (the hub's
    :class:`edgeops.hub.DesiredPublisher`); None: they are stored, and the hub's engine
    publishes what its waves need as it ticks"""
    extra: dict[str, object] = field(default_factory=dict)
    """room for what a test or the server wants to hang on the context"""

    @cached_property
    def store(self) -> ArtifactStore:
        from edgeops.store import ArtifactStore

        return ArtifactStore(self.settings.artifacts_dir)

    @cached_property
    def fleet(self) -> FleetService:
        from edgeops.fleet import FleetService

        return FleetService(self.database)

    @cached_property
    def identities(self) -> IdentityService:
        """The identity service ``edgeops devices`` uses, with the hub's broker user."""
        from edgeops.fleet import IdentityService

        endpoint = self.settings.mqtt_endpoint
        if endpoint is not None and endpoint.username:
            return IdentityService(self.database, hub_user=endpoint.username)
        return IdentityService(self.database)

    @cached_property
    def device_list(self) -> Snapshot:
        """The body of ``GET /api/v1/devices``, made again when the devices change (see
        :mod:`edgeops.api.snapshot`); the API's own device changes invalidate it."""
        import json

        from edgeops.api.snapshot import Snapshot

        def compute() -> bytes:
            summaries = self.identities.list_summaries()
            return json.dumps(summaries, separators=(",", ":"), allow_nan=False).encode()

        return Snapshot(compute, self.identities.list_version)

    @cached_property
    def datasets(self) -> DatasetService:
        from edgeops.data import DatasetService

        return DatasetService(self.database, self.store)

    @cached_property
    def registry(self) -> Registry:
        from edgeops.registry import Registry

        return Registry(self.database, self.store)

    @cached_property
    def repository(self) -> TrustRepository:
        from edgeops.trust import repository_for

        return repository_for(self.settings)

    @cached_property
    def rollouts(self) -> RolloutEngine:
        """The engine the routes use, publishing through :attr:`publisher` (an abort
        publishes the releases it sets back); the hub's own engine thread carries the
        waves out."""
        from edgeops.rollout.engine import RolloutEngine

        return RolloutEngine(self.database, self.publisher, repository=self.repository)

    @cached_property
    def telemetry(self) -> TelemetryService:
        from edgeops.monitor import TelemetryService

        return TelemetryService(self.database)

    @cached_property
    def drift(self) -> DriftService:
        from edgeops.monitor.watch import DriftService, RepositoryReleases

        return DriftService(self.database, RepositoryReleases(self.repository), retrainer=None)

    @cached_property
    def pipelines(self) -> PipelineRunner:
        from edgeops.hub.serve import pipeline_runner

        return pipeline_runner(self.settings, self.database)

    @cached_property
    def tokens(self) -> TokenService:
        from edgeops.api.tokens import TokenService

        return TokenService(self.database)


def get_context(request: Request) -> ApiContext:
    """The application's :class:`ApiContext` (a FastAPI dependency)."""
    context: ApiContext = request.app.state.context
    return context
