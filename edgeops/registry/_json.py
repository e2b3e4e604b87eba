"""Turning caller-supplied parameters, metrics and configs into plain JSON documents."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from edgeops.registry.errors import RegistryError


def json_document(
    value: Mapping[str, Any], what: str, error: type[RegistryError] = RegistryError
) -> dict[str, Any]:
    """A JSON-only copy of ``value``; ``error`` naming ``what`` if it cannot be one.

    NumPy scalars and arrays (anything with ``item()`` / ``tolist()``) become numbers and
    lists, tuples become lists, paths become strings. NaN and infinity are refused, because
    JSON (and PostgreSQL's JSONB) cannot hold them.
    """
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        text = json.dumps(dict(value), allow_nan=False, default=_plain)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} cannot be stored as JSON: {exc}") from exc
    document: dict[str, Any] = json.loads(text)
    return document


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()  # numpy arrays and scalars
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
