"""HTTP API of the hub: ``create_app`` (see :mod:`edgeops.api.app`).

The package imports FastAPI only when ``create_app`` is first asked for: importing its table
module (``edgeops.api.models``, which every database migration loads) stays cheap for the
CLI's commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeops.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from edgeops.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
