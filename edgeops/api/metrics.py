"""Prometheus metrics of the hub at ``/metrics``."""

from __future__ import annotations

from fastapi import FastAPI

from edgeops.api.context import ApiContext


def install_metrics(app: FastAPI, context: ApiContext) -> None:
    """Serve ``/metrics`` and time every request."""
