"""`/api/v1/...` routes: datasets."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
