"""How the API answers errors: JSON ``{"detail": ...}`` naming what was wrong."""

from __future__ import annotations

from fastapi import FastAPI


def install_error_handlers(app: FastAPI) -> None:
    """Map the services' errors to HTTP answers."""
