"""`/api/v1/...` routes: rollouts."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
