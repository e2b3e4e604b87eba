"""The registry service: runs, model versions, stages and lineage, one transaction each.

Model references (``ref``) accepted wherever a model is named:

=================  ==============================================================
``m-3f2a9c01b7de``  that version (ids are ``m-`` and 12 hex digits)
``NAME``            the newest version of NAME
``NAME:SEQ``        version SEQ of NAME (1, 2, 3 ... in registration order)
``NAME@STAGE``      the newest version of NAME in STAGE (e.g. ``digits-cnn@production``)
=================  ==============================================================
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from device_agent.card import ModelCard
from edgeops import store as artifact_store
from edgeops.db import Database
from edgeops.db.locks import lock_key
from edgeops.db.types import utcnow
from edgeops.registry._json import json_document
from edgeops.registry.codeversion import code_version
from edgeops.registry.errors import (
    CorruptArtifactError,
    InvalidModelError,
    MissingArtifactError,
    ModelNotFoundError,
    RegistryError,
    RunNotFoundError,
)
from edgeops.registry.models import (
    MODEL_FORMATS,
    MODEL_NAME_MAX_LENGTH,
    ModelVersion,
    ModelVersionView,
    Run,
    RunStatus,
    RunView,
)
from edgeops.registry.runs import RunHandle
from edgeops.registry.stages import Stage, check_promotion, parse_stage
from edgeops.store import ArtifactStore

__all__ = ["Registry"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the current time, aware UTC."""

MODEL_ID_PATTERN = re.compile(r"^m-[0-9a-f]{12}$")
NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MODEL_NAME_MAX_LENGTH - 1}}}$")
_REGISTER_ATTEMPTS = 5  # backstop: registrations of a name are serialised by _lock_name


class Registry:
    """Records runs and model versions; serves artifacts verified against their hash."""

    def __init__(self, database: Database, store: ArtifactStore, *, clock: Clock = utcnow) -> None:
        self._db = database
        self._store = store
        self._clock = clock

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, kind: str, params: Mapping[str, Any]) -> RunHandle:
        """Record the start of a run of ``kind`` with ``params``; use the handle in ``with``."""
        if not kind or len(kind) > 64:
            raise RegistryError(f"run kind must be 1-64 characters, got {kind!r}")
        document = json_document(params, f"parameters of the {kind} run")
        run = Run(
            id=f"r-{secrets.token_hex(6)}",
            kind=kind,
            status=RunStatus.RUNNING,
            params=document,
            code_version=code_version(),
            started_at=self._clock(),
        )
        with self._db.session() as session:
            session.add(run)
        log.info("run %s (%s) started", run.id, kind)
        return RunHandle(self, run.id, kind, document, run.started_at)

    def _finish_run(self, handle: RunHandle, status: str, error: str | None) -> None:
        """Record the end of ``handle``'s run (called by the handle)."""
        ended = self._clock()
        with self._db.session() as session:
            run = session.get(Run, handle.id)
            if run is None:
                raise RunNotFoundError(f"run {handle.id} vanished from the database")
            run.status = status
            run.error = error
            run.metrics = dict(handle.metrics)
            run.logs = list(handle.logs)
            run.ended_at = ended
            run.duration_s = max(0.0, (ended - run.started_at).total_seconds())
        log.info("run %s %s", handle.id, status)

    def get_run(self, run_id: str) -> RunView:
        """The run ``run_id`` with the ids of the models it registered."""
        with self._db.session() as session:
            run = session.get(Run, run_id.strip())
            if run is None:
                raise RunNotFoundError(f"run {run_id!r} not found")
            return RunView.from_run(run, self._model_ids_of(session, run.id))

    def list_runs(self, *, kind: str | None = None) -> list[RunView]:
        """Every run (of ``kind``, if given), oldest first."""
        with self._db.session() as session:
            query = select(Run).order_by(col(Run.started_at), col(Run.id))
            if kind is not None:
                query = query.where(Run.kind == kind)
            runs = session.exec(query).all()
            produced: dict[str, list[str]] = {}
            rows = session.exec(
                select(ModelVersion.run_id, ModelVersion.id).order_by(
                    col(ModelVersion.created_at), col(ModelVersion.id)
                )
            ).all()
            for run_id, model_id in rows:
                produced.setdefault(run_id, []).append(model_id)
            return [RunView.from_run(run, produced.get(run.id, [])) for run in runs]

    @staticmethod
    def _model_ids_of(session: Session, run_id: str) -> list[str]:
        query = (
            select(ModelVersion.id)
            .where(ModelVersion.run_id == run_id)
            .order_by(col(ModelVersion.created_at), col(ModelVersion.id))
        )
        return list(session.exec(query).all())

    # -- model versions ---------------------------------------------------------------------

    def register_model(
        self,
        *,
        name: str,
        artifact: bytes,
        format: str,
        run_id: str,
        dataset_version: str,
        parent_id: str | None,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        card: ModelCard | None = None,
    ) -> ModelVersionView:
        """Store ``artifact`` and record it as the next version of ``name``, a candidate.

        The artifact is written to the store first (atomically, fsynced); then the row, in
        one transaction. A crash in between leaves an unreferenced artifact, never a row
        without its bytes. ``card`` gets this version's id, sequence number and lineage
        before it is stored with the row. ``parent_id`` may be any model reference.
        """
        _check_name(name)
        if format not in MODEL_FORMATS:
            raise InvalidModelError(
                f"model {name!r}: format must be one of {', '.join(MODEL_FORMATS)}, got {format!r}"
            )
        if not isinstance(artifact, bytes | bytearray | memoryview) or len(artifact) == 0:
            raise InvalidModelError(f"model {name!r}: the artifact is empty or not bytes")
        if not dataset_version or len(dataset_version) > 128:
            raise InvalidModelError(
                f"model {name!r}: dataset_version must be 1-128 characters, got {dataset_version!r}"
            )
        config_doc = json_document(config, f"config of model {name!r}", InvalidModelError)
        metrics_doc = json_document(metrics, f"metrics of model {name!r}", InvalidModelError)
        data = bytes(artifact)
        digest = self._store.put_bytes(data)  # durable before any row points at it
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            try:
                with self._db.session() as session:
                    view = self._insert_model(
                        session,
                        name=name,
                        format=format,
                        digest=digest,
                        size_bytes=len(data),
                        run_id=run_id,
                        dataset_version=dataset_version,
                        parent_ref=parent_id,
                        config=config_doc,
                        metrics=metrics_doc,
                        card=card,
                    )
            except sa.exc.IntegrityError as exc:
                # the seq or the random id was taken after all (the name lock makes this rare)
                if attempt == _REGISTER_ATTEMPTS:
                    raise RegistryError(
                        f"could not register model {name!r} after {attempt} attempts: "
                        "concurrent registrations kept taking its next version number"
                    ) from exc
                continue
            log.info("registered model %s (%s)", view.id, view.ref)
            return view
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_model(
        self,
        session: Session,
        *,
        name: str,
        format: str,
        digest: str,
        size_bytes: int,
        run_id: str,
        dataset_version: str,
        parent_ref: str | None,
        config: dict[str, Any],
        metrics: dict[str, Any],
        card: ModelCard | None,
    ) -> ModelVersionView:
        _lock_name(session, name)
        if session.get(Run, run_id) is None:
            raise RunNotFoundError(f"model {name!r}: run {run_id!r} not found")
        parent = None if parent_ref is None else _resolve(session, parent_ref, "parent model")
        newest = session.exec(
            select(func.max(ModelVersion.seq)).where(ModelVersion.name == name)
        ).one()
        model_id = f"m-{secrets.token_hex(6)}"
        seq = (newest or 0) + 1
        version_code = code_version()
        card_doc: dict[str, Any] | None = None
        if card is not None:
            lineage = {
                **card.lineage,
                "run_id": run_id,
                "dataset_version": dataset_version,
                "parent_id": None if parent is None else parent.id,
                "code_version": version_code,
            }
            named = replace(card, model_id=model_id, version=str(seq), name=name, lineage=lineage)
            card_doc = json_document(named.to_dict(), f"card of model {name!r}", InvalidModelError)
        now = self._clock()
        row = ModelVersion(
            id=model_id,
            name=name,
            seq=seq,
            stage=Stage.CANDIDATE.value,
            format=format,
            artifact_sha256=digest,
            size_bytes=size_bytes,
            run_id=run_id,
            dataset_version=dataset_version,
            parent_id=None if parent is None else parent.id,
            code_version=version_code,
            config=config,
            metrics=metrics,
            card=card_doc,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        return ModelVersionView.from_model(row)

    def get_model(self, ref: str) -> ModelVersionView:
        """The model version ``ref`` names (see the module docstring for the forms)."""
        with self._db.session() as session:
            return ModelVersionView.from_model(_resolve(session, ref))

    def list_models(
        self, *, name: str | None = None, stage: str | None = None
    ) -> list[ModelVersionView]:
        """Every model version (of ``name``, in ``stage``, if given), by name, then seq."""
        query = select(ModelVersion).order_by(col(ModelVersion.name), col(ModelVersion.seq))
        if name is not None:
            query = query.where(ModelVersion.name == name)
        if stage is not None:
            query = query.where(ModelVersion.stage == parse_stage(stage).value)
        with self._db.session() as session:
            return [ModelVersionView.from_model(row) for row in session.exec(query).all()]

    def load_artifact(self, model_id: str) -> bytes:
        """The model's artifact bytes, checked against its recorded sha256.

        ``model_id`` may be any model reference. A changed file raises CorruptArtifactError,
        a vanished one MissingArtifactError, each naming the model and the digest.
        """
        model = self.get_model(model_id)
        digest = model.artifact_sha256
        try:
            return self._store.get_bytes(digest)
        except artifact_store.CorruptArtifactError as exc:
            raise CorruptArtifactError(f"model {model.id} ({model.ref}): {exc}") from exc
        except artifact_store.MissingArtifactError as exc:
            raise MissingArtifactError(
                f"model {model.id} ({model.ref}): artifact sha256:{digest} is missing "
                f"from the store {self._store.root}"
            ) from exc

    def promote(self, model_id: str, stage: str) -> ModelVersionView:
        """Move a model version to ``stage``, following the stage rules (edgeops.registry.stages).

        Promoting to production archives the version of the same name that was in production,
        in the same transaction. ``model_id`` may be any model reference.
        """
        target = parse_stage(stage)
        try:
            with self._db.session() as session:
                resolved = _resolve(session, model_id)
                # Promotions (and registrations) of one name run one by one; read again after.
                _lock_name(session, resolved.name)
                model_key = resolved.id
                model = session.exec(
                    select(ModelVersion)
                    .where(ModelVersion.id == model_key)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                ).one()
                siblings = session.exec(
                    select(ModelVersion)
                    .where(ModelVersion.name == model.name, ModelVersion.id != model.id)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                ).all()
                label = f"{model.id} ({model.name}:{model.seq})"
                check_promotion(label, Stage(model.stage), target)
                now = self._clock()
                if target is Stage.PRODUCTION:
                    for other in siblings:
                        if other.stage == Stage.PRODUCTION.value:
                            other.stage = Stage.ARCHIVED.value
                            other.updated_at = now
                            log.info("archived %s (%s:%s)", other.id, other.name, other.seq)
                    session.flush()  # before the new one, for the one-production index
                model.stage = target.value
                model.updated_at = now
                session.flush()
                view = ModelVersionView.from_model(model)
        except sa.exc.IntegrityError as exc:
            raise RegistryError(
                f"cannot promote model {model_id} to {target.value}: another version of it was "
                "promoted at the same time; try again"
            ) from exc
        log.info("promoted %s (%s) to %s", view.id, view.ref, view.stage)
        return view

    def lineage(self, model_id: str) -> list[ModelVersionView]:
        """The chain from this version up through its parents: ``[model, parent, ...]``."""
        chain: list[ModelVersionView] = []
        with self._db.session() as session:
            current: ModelVersion | None = _resolve(session, model_id)
            seen: set[str] = set()
            while current is not None and current.id not in seen:
                seen.add(current.id)
                chain.append(ModelVersionView.from_model(current))
                current = (
                    None
                    if current.parent_id is None
                    else session.get(ModelVersion, current.parent_id)
                )
        return chain


# -- references -----------------------------------------------------------------------------


def _lock_name(session: Session, name: str) -> None:
    """Serialise registrations of ``name`` until this transaction ends, so each reads the
    newest ``seq``: a transaction-scoped advisory lock on PostgreSQL; on SQLite, taking the
    database's write lock at once (a write that changes nothing), as writers queue there."""
    lock_key(session, f"edgeops.model_versions:{name}", Run)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidModelError(
            f"model name {name!r} is invalid: expected 1-{MODEL_NAME_MAX_LENGTH} letters, "
            "digits, '_', '.' or '-', starting with a letter or digit"
        )
    if MODEL_ID_PATTERN.fullmatch(name):
        raise InvalidModelError(f"model name {name!r} looks like a model id; choose another")


def _resolve(session: Session, ref: str, what: str = "model") -> ModelVersion:
    """The row ``ref`` names; ModelNotFoundError saying what exists otherwise."""
    ref = ref.strip()
    if MODEL_ID_PATTERN.fullmatch(ref):
        row = session.get(ModelVersion, ref)
        if row is None:
            raise ModelNotFoundError(f"{what} {ref} not found")
        return row
    query = select(ModelVersion).where(ModelVersion.name == _ref_name(ref))
    name, sep, suffix = ref.partition(":")
    if sep:
        if not suffix.isdigit():
            raise ModelNotFoundError(
                f"{what} {ref!r}: after ':' comes a version number, got {suffix!r}"
            )
        seq = int(suffix)
        row = (  # a number past any integer column holds no version (and is no SQL error)
            session.exec(query.where(ModelVersion.seq == seq)).first() if seq < 2**31 else None
        )
        if row is None:
            raise ModelNotFoundError(f"{what} {ref!r} not found: {_versions_of(session, name)}")
        return row
    name, sep, stage = ref.partition("@")
    if sep:
        query = query.where(ModelVersion.stage == parse_stage(stage).value)
    row = session.exec(query.order_by(col(ModelVersion.seq).desc())).first()
    if row is None:
        if sep:
            raise ModelNotFoundError(
                f"{what} {ref!r} not found: no version of {name!r} is in {stage.strip()} "
                f"({_versions_of(session, name)})"
            )
        raise ModelNotFoundError(f"{what} {ref!r} not found: {_versions_of(session, name)}")
    return row


def _ref_name(ref: str) -> str:
    for separator in (":", "@"):
        if separator in ref:
            return ref.partition(separator)[0]
    return ref


def _versions_of(session: Session, name: str) -> str:
    """What exists under ``name``, for a not-found message."""
    seqs = session.exec(
        select(ModelVersion.seq).where(ModelVersion.name == name).order_by(col(ModelVersion.seq))
    ).all()
    if seqs:
        return f"{name!r} has versions 1-{seqs[-1]}" if len(seqs) > 1 else f"{name!r} has version 1"
    names = session.exec(
        select(ModelVersion.name).distinct().order_by(col(ModelVersion.name)).limit(10)
    ).all()
    if not names:
        return "the registry holds no models yet"
    return f"no model is named {name!r}; known names: {', '.join(names)}"
