"""`/api/v1/...` routes: drift."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
