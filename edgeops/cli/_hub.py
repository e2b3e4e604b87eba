"""What a command needs from the hub: the configured, migrated database and artifact store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeops.hub.stores import HubStores


@contextmanager
def open_hub() -> Iterator[HubStores]:
    """The current settings' stores (see :func:`edgeops.hub.stores.open_stores`)."""
    from edgeops.cli.main import settings
    from edgeops.hub.stores import open_stores

    current = settings()
    with open_stores(current.database, current.artifacts_dir) as stores:
        yield stores
