"""The ``/api/v1`` routers, one module per domain; :func:`edgeops.api.create_app` mounts them."""

from __future__ import annotations

from fastapi import APIRouter

from edgeops.api.routes import (
    datasets,
    devices,
    drift,
    models,
    pipelines,
    releases,
    rollouts,
    telemetry,
)

ROUTERS: list[APIRouter] = [
    datasets.router,
    models.router,
    releases.router,
    devices.router,
    rollouts.router,
    telemetry.router,
    drift.router,
    pipelines.router,
]
