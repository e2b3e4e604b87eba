"""The hub's model services for a benchmark: SQLite and an artifact store in a temporary dir."""

from __future__ import annotations

from pathlib import Path


class BenchHub:
    """Datasets, registry, training and compression on ``root`` (nothing shared with a user's
    data dir); benchmarks subclass it for what they add (bundles, a release repository ...)."""

    def __init__(self, root: Path, seed: int) -> None:
        from edgeops.compress import CompressService
        from edgeops.data import DatasetService
        from edgeops.db import Database
        from edgeops.registry import Registry
        from edgeops.store import ArtifactStore
        from edgeops.train import TrainService

        self.root = root
        self.seed = seed
        self.database = Database(f"sqlite:///{root / 'edgeops.db'}")
        self.database.upgrade()
        store = ArtifactStore(root / "artifacts")
        self.datasets = DatasetService(self.database, store)
        self.registry = Registry(self.database, store)
        self.trainer = TrainService(self.datasets, self.registry)
        self.compressor = CompressService(self.datasets, self.registry)
