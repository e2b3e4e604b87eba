"""Firmware project templates (Jinja2 + C) for microcontroller targets, filled by the hub.

This directory ships as package data; :func:`template_root` locates it after installation.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def template_root() -> Traversable:
    """The directory holding the templates, wherever the package is installed."""
    return files(__name__)
