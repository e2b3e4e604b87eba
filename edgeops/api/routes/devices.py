"""`/api/v1/...` routes: devices."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
