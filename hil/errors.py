"""The rig's errors: every one is printed by ``edgeops-hil`` as one line, no traceback."""

from __future__ import annotations

__all__ = ["HilError"]


class HilError(Exception):
    """Base of the rig's errors; the message says what went wrong and where."""
