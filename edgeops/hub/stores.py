"""The hub's stores opened together: the migrated database and the artifact store.

Commands, benchmarks and tests that work on datasets and models build their services from
these, so every caller opens, migrates and closes them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeops.data import DatasetService
    from edgeops.db import Database
    from edgeops.registry import Registry
    from edgeops.store import ArtifactStore


@dataclass
class HubStores:
    database: Database
    store: ArtifactStore

    def datasets(self, on_step: Callable[[str], None] | None = None) -> DatasetService:
        from edgeops.data import DatasetService

        return DatasetService(self.database, self.store, on_step=on_step)

    def registry(self) -> Registry:
        from edgeops.registry import Registry

        return Registry(self.database, self.store)


@contextmanager
def open_stores(database_url: str, artifacts_dir: Path) -> Iterator[HubStores]:
    """The database at ``database_url`` (migrated if behind) and the artifact store."""
    from edgeops.db import Database
    from edgeops.store import ArtifactStore

    database = Database(database_url)
    try:
        if database.current_revision() != database.head_revision():
            database.upgrade()
        yield HubStores(database, ArtifactStore(artifacts_dir))
    finally:
        database.dispose()
