"""`/api/v1/...` routes: models."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
