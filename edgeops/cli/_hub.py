"""What a command needs from the hub: the configured, migrated database and artifact store,
and how long it waits for the MQTT broker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from edgeops.hub.stores import HubStores

CONNECT_TIMEOUT_S = 10.0  # as edgeops.hub.desired.CONNECT_WAIT_S and HubBridge.start

ConnectTimeoutOption = Annotated[
    float,
    typer.Option(
        "--connect-timeout",
        min=0.1,
        metavar="SECONDS",
        help="how long to wait for the MQTT broker to accept the connection before giving up",
    ),
]


@contextmanager
def open_hub() -> Iterator[HubStores]:
    """The current settings' stores (see :func:`edgeops.hub.stores.open_stores`)."""
    from edgeops.cli.main import settings
    from edgeops.hub.stores import open_stores

    current = settings()
    with open_stores(current.database, current.artifacts_dir) as stores:
        yield stores
