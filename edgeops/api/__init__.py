"""HTTP API of the hub."""

from edgeops.api.app import create_app

__all__ = ["create_app"]
