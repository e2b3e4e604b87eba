"""The rig's boards: see :mod:`hil.boards.base` for the interface."""

from __future__ import annotations

from hil.boards.base import Board, BoardError, BoardOutput, Metrics

__all__ = ["Board", "BoardError", "BoardOutput", "Metrics"]
