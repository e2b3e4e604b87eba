"""`/api/v1/...` routes: releases."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
