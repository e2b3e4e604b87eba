"""The hub's HTTP API (read-only fleet view for now), served by ``edgeops hub serve``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException

from device_agent._version import __version__
from edgeops.errors import NotFoundError
from edgeops.fleet import FleetService


def create_app(fleet: FleetService) -> FastAPI:
    """Build the application; routes call the same services the CLI calls."""
    app = FastAPI(title="EdgeOps hub", version=__version__, openapi_url="/openapi.json")

    @app.get("/api/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/api/v1/devices")
    def list_devices() -> list[dict[str, Any]]:
        return [device.to_dict() for device in fleet.list_devices()]

    @app.get("/api/v1/devices/{device_id}")
    def get_device(device_id: str) -> dict[str, Any]:
        try:
            return fleet.get_device(device_id).to_dict()
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    return app
