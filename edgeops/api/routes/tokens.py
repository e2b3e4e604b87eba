"""`/api/v1/tokens`: API tokens (admin only)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
