"""`/api/v1/...` routes: pipelines."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
