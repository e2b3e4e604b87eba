"""The dataset registry's table and the read models services hand out.

DatasetVersion  the ``dataset_versions`` table: one row per version (content hash)
DatasetView     a version's metadata, detached from any session; ``to_dict()`` for JSON
DatasetArrays   a version's arrays, split into train/val/test, with its feature rule
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

import numpy as np
from sqlmodel import Field, SQLModel

from device_agent.features import FeatureRule
from device_agent.sketch import ReferenceStats
from edgeops.data.errors import DataError
from edgeops.data.splits import SPLITS
from edgeops.db.types import JSONDocument, UTCDateTime, utcnow

NAME_MAX_LENGTH = 64


class DatasetVersion(SQLModel, table=True):
    """A dataset version as stored. Written by :class:`~edgeops.data.DatasetService` only."""

    __tablename__ = "dataset_versions"

    version: str = Field(primary_key=True, max_length=64, description="content hash, hex")
    name: str = Field(index=True, max_length=NAME_MAX_LENGTH)
    task: str = Field(max_length=32)
    source: str = Field(description="where the data came from")
    num_samples: int
    input_shape: list[int] = Field(sa_type=JSONDocument, description="one raw sample")
    classes: list[str] = Field(sa_type=JSONDocument)
    feature_names: list[str] | None = Field(
        default=None, sa_type=JSONDocument, description="table columns, in order"
    )
    split_sizes: dict[str, int] = Field(sa_type=JSONDocument)
    split_seed: int
    feature_rule: dict[str, Any] = Field(sa_type=JSONDocument)
    reference: dict[str, Any] = Field(sa_type=JSONDocument)
    artifact_sha256: str = Field(max_length=64, description="the .npz in the artifact store")
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


@dataclass(frozen=True)
class DatasetView:
    """One dataset version's metadata, as services hand it out."""

    version: str
    name: str
    task: str
    num_samples: int
    input_shape: tuple[int, ...]
    classes: list[str]
    split_sizes: dict[str, int]
    feature_rule: FeatureRule
    reference: ReferenceStats
    source: str
    created_at: datetime
    artifact_sha256: str = ""
    split_seed: int = 0
    feature_names: list[str] | None = None

    @classmethod
    def from_row(cls, row: DatasetVersion) -> Self:
        return cls(
            version=row.version,
            name=row.name,
            task=row.task,
            num_samples=row.num_samples,
            input_shape=tuple(row.input_shape),
            classes=list(row.classes),
            split_sizes=dict(row.split_sizes),
            feature_rule=FeatureRule.from_dict(row.feature_rule),
            reference=ReferenceStats.from_dict(row.reference),
            source=row.source,
            created_at=row.created_at,
            artifact_sha256=row.artifact_sha256,
            split_seed=row.split_seed,
            feature_names=None if row.feature_names is None else list(row.feature_names),
        )

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        return self.feature_rule.model_input_shape

    @property
    def short_version(self) -> str:
        return self.version[:12]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the datetime as ISO 8601 in UTC."""
        return {
            "version": self.version,
            "name": self.name,
            "task": self.task,
            "num_samples": self.num_samples,
            "input_shape": list(self.input_shape),
            "model_input_shape": list(self.model_input_shape),
            "classes": list(self.classes),
            "split_sizes": dict(self.split_sizes),
            "split_seed": self.split_seed,
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "feature_rule": self.feature_rule.to_dict(),
            "reference": self.reference.to_dict(),
            "source": self.source,
            "artifact_sha256": self.artifact_sha256,
            "created_at": self.created_at.isoformat(),
        }


@dataclass
class DatasetArrays:
    """A dataset version's raw samples by split (``y``: int64 class indices)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    feature_rule: FeatureRule
    version: str = ""
    name: str = ""
    feature_names: list[str] | None = field(default=None)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of ``split``: "train", "val" or "test"."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        x: np.ndarray = getattr(self, f"x_{split}")
        y: np.ndarray = getattr(self, f"y_{split}")
        return x, y

    def model_inputs(self, split: str) -> np.ndarray:
        """``feature_rule.apply(x_<split>)``: float32 model inputs."""
        return self.feature_rule.apply(self.split(split)[0])
