"""What a command needs from the hub: the settings, the migrated database, the artifact store.

Every command that works on datasets or models opens them the same way, here, and builds
the services it calls from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeops.config import Settings
    from edgeops.data import DatasetService
    from edgeops.db import Database
    from edgeops.registry import Registry
    from edgeops.store import ArtifactStore


@dataclass
class HubContext:
    settings: Settings
    database: Database
    store: ArtifactStore

    def datasets(self, on_step: Callable[[str], None] | None = None) -> DatasetService:
        from edgeops.data import DatasetService

        return DatasetService(self.database, self.store, on_step=on_step)

    def registry(self) -> Registry:
        from edgeops.registry import Registry

        return Registry(self.database, self.store)


@contextmanager
def open_hub() -> Iterator[HubContext]:
    """The current settings' database, migrated if behind, and the artifact store."""
    from edgeops.cli.main import settings
    from edgeops.db import Database
    from edgeops.store import ArtifactStore

    current = settings()
    database = Database(current.database)
    try:
        if database.current_revision() != database.head_revision():
            database.upgrade()
        yield HubContext(current, database, ArtifactStore(current.artifacts_dir))
    finally:
        database.dispose()
