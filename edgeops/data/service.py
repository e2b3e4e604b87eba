"""The dataset service: register, resolve and load dataset versions.

A registration reads and checks the input, encodes the classes, splits, fits the feature
rule on the training split, hashes the content into the version id (see
:mod:`edgeops.data.content`), computes the reference statistics of the training split's
model inputs, stores the arrays in the artifact store and only then inserts the row, in one
transaction. Bad input raises before anything is written. Registering the same content
again under the same name returns the existing version; under another name it is refused.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlmodel import col, select

from device_agent.features import FEATURE_RULE_KINDS, FeatureRule, FeatureRuleError
from device_agent.sketch import DEFAULT_BINS, ReferenceStats
from edgeops.data.builtin import BASIC_MOTIONS_VAL_FRACTION, BUILTINS, SourceData
from edgeops.data.content import TASK, DatasetContent
from edgeops.data.errors import (
    AmbiguousReferenceError,
    DataError,
    DatasetConflictError,
    DatasetInputError,
    DatasetNotFoundError,
    InvalidNameError,
)
from edgeops.data.importer import read_labelled_file
from edgeops.data.models import NAME_MAX_LENGTH, DatasetArrays, DatasetVersion, DatasetView
from edgeops.data.splits import carve, check_class_counts, encode_labels, stratified_split
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.store import ArtifactStore, CorruptArtifactError, MissingArtifactError

__all__ = ["DatasetService"]

Clock = Callable[[], datetime]
Step = Callable[[str], None]
"""Told what the service is doing now ("reading", "hashing" ...), for progress displays."""

NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_LENGTH - 1}}}$")
_FULL_ID = re.compile(r"^[0-9a-f]{64}$")
_ID_PREFIX = re.compile(r"^[0-9a-f]{8,63}$")
MIN_PREFIX = 8


class DatasetService:
    """The registry of dataset versions, over a database and an artifact store."""

    def __init__(
        self,
        database: Database,
        store: ArtifactStore,
        *,
        clock: Clock = utcnow,
        on_step: Step | None = None,
    ) -> None:
        self._db = database
        self._store = store
        self._clock = clock
        self._on_step = on_step

    # -- registering --------------------------------------------------------------------

    def register_builtin(self, name: str, *, seed: int = 0) -> DatasetView:
        """Register a built-in dataset ("digits", "mnist5k", "basic_motions"); idempotent."""
        builtin = BUILTINS.get(name)
        if builtin is None:
            raise DatasetNotFoundError(
                f"there is no built-in dataset {name!r}; built-in: {', '.join(BUILTINS)}"
            )
        self._step(f"loading {name}")
        data = builtin.load()
        content = self._prepare(name, data, seed=seed, rule=builtin.rule)
        return self._register(name, content, data.source, seed=seed)

    def import_file(
        self,
        path: Path,
        *,
        name: str,
        label_column: str | None,
        seed: int = 0,
        features: str = "standardize",
    ) -> DatasetView:
        """Register the labelled data in a CSV, Parquet or NPZ file as a version of ``name``.

        ``features`` is the kind of feature rule fitted on the training split (see
        :mod:`device_agent.features`): per column for tables, per channel (last axis) for
        NPZ arrays with more axes.
        """
        _check_name(name)
        if features not in FEATURE_RULE_KINDS:
            raise DataError(
                f"unknown feature rule kind {features!r}; known: {', '.join(FEATURE_RULE_KINDS)}"
            )
        self._step(f"reading {path.name}")
        data = read_labelled_file(Path(path), label_column=label_column)

        def rule(x_train: np.ndarray) -> FeatureRule:
            return FeatureRule.fit(features, x_train)

        content = self._prepare(name, data, seed=seed, rule=rule)
        return self._register(name, content, data.source, seed=seed)

    def register_samples(
        self,
        name: str,
        x: np.ndarray,
        labels: np.ndarray,
        *,
        feature_rule: FeatureRule,
        source: str,
        seed: int = 0,
    ) -> DatasetView:
        """Register raw samples and their labels as a version of ``name``, keeping a given
        ``feature_rule`` (e.g. a deployed model's, so new data is preprocessed as on the
        device) instead of fitting one. Idempotent like the other registrations."""
        _check_name(name)
        data = SourceData(
            x=np.asarray(x, dtype=np.float32), labels=np.asarray(labels), source=source
        )
        content = self._prepare(name, data, seed=seed, rule=lambda _x_train: feature_rule)
        return self._register(name, content, source, seed=seed)

    def _prepare(
        self,
        name: str,
        data: SourceData,
        *,
        seed: int,
        rule: Callable[[np.ndarray], FeatureRule],
    ) -> DatasetContent:
        """Classes, split and feature rule: the content of a version, checked."""
        self._step("splitting")
        what = f"dataset {name!r}"
        y, classes = encode_labels(data.labels, what=f"the labels of {what}")
        if data.given_split is None:
            check_class_counts(y, classes, what=what)
            splits = stratified_split(y, seed=seed)
        else:
            check_class_counts(y[data.given_split["train"]], classes, what=f"{what} (train)")
            train, val = carve(
                data.given_split["train"], y, seed=seed, fraction=BASIC_MOTIONS_VAL_FRACTION
            )
            splits = {"train": train, "val": val, "test": data.given_split["test"]}
        try:
            feature_rule = rule(data.x[splits["train"]])
        except FeatureRuleError as exc:
            raise DatasetInputError(f"{what}: {exc}") from exc
        return DatasetContent(
            x=data.x,
            y=y,
            splits=splits,
            classes=classes,
            feature_rule=feature_rule,
            feature_names=data.feature_names,
            task=TASK,
        )

    def _register(
        self, name: str, content: DatasetContent, source: str, *, seed: int
    ) -> DatasetView:
        self._step("hashing")
        version = content.version()
        existing = self._existing(name, version)
        if existing is not None:
            # the arrays are stored again (a no-op when intact): importing the same data
            # repairs a damaged or missing artifact
            self._store.put_bytes(content.to_npz())
            return existing
        self._step("computing reference statistics")
        x_train, _ = content.split("train")
        reference = ReferenceStats.from_features(
            content.feature_rule.apply(x_train),
            bins=DEFAULT_BINS,
            feature_names=content.feature_names,
        )
        self._step("storing")
        digest = self._store.put_bytes(content.to_npz())
        row = DatasetVersion(
            version=version,
            name=name,
            task=content.task,
            source=source,
            num_samples=len(content.x),
            input_shape=list(content.feature_rule.input_shape),
            classes=list(content.classes),
            feature_names=content.feature_names,
            split_sizes={split: len(index) for split, index in content.splits.items()},
            split_seed=seed,
            feature_rule=content.feature_rule.to_dict(),
            reference=reference.to_dict(),
            artifact_sha256=digest,
            created_at=self._clock(),
        )
        try:
            with self._db.session() as session:
                session.add(row)
        except sa.exc.IntegrityError:
            # registered by another process since we looked: theirs stands
            existing = self._existing(name, version)
            if existing is None:
                raise
            return existing
        return DatasetView.from_row(row)

    def _existing(self, name: str, version: str) -> DatasetView | None:
        with self._db.session() as session:
            row = session.get(DatasetVersion, version)
            if row is None:
                return None
            if row.name != name:
                raise DatasetConflictError(
                    f"the same data, split and feature rule are already registered as dataset "
                    f"{row.name!r} (version {version[:12]}); use that name or version"
                )
            return DatasetView.from_row(row)

    # -- finding ------------------------------------------------------------------------

    def resolve(self, ref: str) -> DatasetView:
        """A version id, a unique id prefix (>= 8 hex digits), or a name (its newest version).

        A built-in name never registered is registered on first use (seed 0).
        """
        ref = ref.strip()
        if _FULL_ID.fullmatch(ref) or _ID_PREFIX.fullmatch(ref):
            return self._by_version(ref)
        with self._db.session() as session:
            row = session.exec(
                select(DatasetVersion)
                .where(DatasetVersion.name == ref)
                .order_by(col(DatasetVersion.created_at).desc(), col(DatasetVersion.version))
                .limit(1)
            ).first()
            if row is not None:
                return DatasetView.from_row(row)
            names = sorted(set(session.exec(select(DatasetVersion.name)).all()))
        if ref in BUILTINS:
            return self.register_builtin(ref)
        known = ", ".join(names) if names else "none registered"
        raise DatasetNotFoundError(
            f"dataset {ref!r} not found; datasets: {known}; built-in: {', '.join(BUILTINS)}"
        )

    def _by_version(self, ref: str) -> DatasetView:
        with self._db.session() as session:
            rows = session.exec(
                select(DatasetVersion)
                .where(col(DatasetVersion.version).startswith(ref))
                .order_by(col(DatasetVersion.version))
                .limit(2)
            ).all()
            views = [DatasetView.from_row(row) for row in rows]
        if not views:
            raise DatasetNotFoundError(f"no dataset version {ref!r}")
        if len(views) > 1:
            raise AmbiguousReferenceError(
                f"dataset version prefix {ref!r} matches several versions "
                f"({', '.join(v.short_version for v in views)}, ...); give more digits"
            )
        return views[0]

    def list(self) -> builtins.list[DatasetView]:
        """Every version, by name, newest first within a name."""
        with self._db.session() as session:
            rows = session.exec(select(DatasetVersion)).all()
            views = [DatasetView.from_row(row) for row in rows]
        views.sort(key=lambda v: (v.name, -v.created_at.timestamp(), v.version))
        return views

    def load(self, version_id: str) -> DatasetArrays:
        """The arrays of a version (any reference :meth:`resolve` takes), split."""
        view = self.resolve(version_id)
        what = f"dataset {view.name!r} version {view.short_version}"
        try:
            stored = self._store.get_bytes(view.artifact_sha256)
        except (CorruptArtifactError, MissingArtifactError) as exc:
            raise DataError(f"the arrays of {what} cannot be read: {exc}") from None
        content = DatasetContent.from_npz(stored, what=what)
        if content.version() != view.version:
            raise DataError(
                f"the stored arrays of {what} do not hash to its version id; the artifact "
                f"sha256:{view.artifact_sha256} belongs to another dataset"
            )
        x_train, y_train = content.split("train")
        x_val, y_val = content.split("val")
        x_test, y_test = content.split("test")
        return DatasetArrays(
            x_train=x_train,
            y_train=y_train,
            x_val=x_val,
            y_val=y_val,
            x_test=x_test,
            y_test=y_test,
            classes=list(content.classes),
            feature_rule=content.feature_rule,
            version=view.version,
            name=view.name,
            feature_names=content.feature_names,
        )

    def _step(self, what: str) -> None:
        if self._on_step is not None:
            self._on_step(what)


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"dataset name {name!r} is invalid: use 1-{NAME_MAX_LENGTH} letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    if re.fullmatch(r"[0-9a-f]{8,}", name):
        raise InvalidNameError(
            f"dataset name {name!r} looks like a version id; add a letter beyond a-f"
        )
    if name in BUILTINS:
        raise InvalidNameError(f"dataset name {name!r} is reserved for the built-in dataset")
