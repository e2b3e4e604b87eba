"""`/api/v1/...` routes: telemetry."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
