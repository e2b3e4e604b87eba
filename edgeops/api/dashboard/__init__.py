"""The hub's dashboard: server-rendered pages at ``/``, working offline."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
