"""A small DAG runner whose state lives in the database, so a run survives a hub restart.

    pipeline = Pipeline("example", [
        Step("fetch", fetch),
        Step("train", train, after=("fetch",), retries=2, backoff_s=5.0, timeout_s=600.0),
    ])
    runner = PipelineRunner(database, [pipeline], registry=registry)
    view = runner.run("example", {"model": "digits-cnn"})   # start and execute it here
    runner.resume()                                          # after a restart: carry on

**Steps.** A step is a named callable taking a :class:`StepContext` (the run's parameters,
the outputs of the steps it comes ``after``, the attempt number) and returning a JSON
object, its outputs. Steps run one at a time in a topological order of the DAG (ties broken
by the order they were declared in). A step that raises is tried again up to ``retries``
times, waiting ``backoff_s``, then ``backoff_factor`` times longer each time (at most
``max_backoff_s``); a step that runs past ``timeout_s`` fails that attempt. A step that
raises :class:`StepFailedError` (it gives up) or a ConfigError (retrying cannot help) fails
at once. When a step has no attempts left the run fails with the step's error; the steps
after it stay ``pending``.

**Steps must be idempotent.** A step is executed in a worker thread; a timed-out attempt is
abandoned, not killed (Python cannot stop a thread), so it may still finish in the
background while the next attempt runs. A step cut off by a dead process runs again from
the start when the run is resumed. Design steps so that doing them twice does no harm
(registering content-addressed data, writing to a run-specific place, checking whether the
work is already done).

**Persistence.** ``pipeline_runs`` and ``pipeline_steps`` (:mod:`edgeops.pipelines.models`)
hold every run's status and every step's status, attempts, inputs, outputs, start, end,
duration and error, each change in its own transaction.

**Leases.** The process executing a run holds its lease: ``lease_owner`` (an id unique to
the runner object) until ``lease_expires_at``. It takes the lease with one conditional
``UPDATE`` (the run is pending or running, and its lease is free, expired or its own) and
renews it every ``lease_s / 3`` seconds while a step works. On PostgreSQL the ``UPDATE``
locks the row, so a second hub process racing for the same run waits, sees the new owner
when it re-reads the row and updates nothing; SQLite has one writer at a time. Every record
of a step's outcome is written in a transaction that first renews the lease; if it cannot
(another process took over a run this one neglected past its expiry, or the run was
cancelled) the write is rolled back and this runner stops.

**One runner, several threads.** A runner object may be shared by threads (the hub's resume
loop and the threads executing runs it starts). The lease cannot tell them apart, since
they share its owner id, so the runner also keeps the set of runs it is executing, under a
lock: :meth:`PipelineRunner.execute` on one of them returns False at once without touching
it, and :meth:`PipelineRunner.resume` skips them.

**Errors of the runner itself.** Once a run is taken, an exception outside the step (the
database or the registry failing while an outcome is recorded) does not leave it
``running`` with its lease held: it is logged, the run fails with that error if this runner
still holds its lease (a step caught ``running`` fails with it), or at least the lease is
released, and :meth:`PipelineRunner.execute` returns normally. Only a ``BaseException``
that is not an ``Exception`` (the process being stopped) leaves the run to be resumed.

**Resume.** :meth:`PipelineRunner.resume` executes every run that is pending or running and
whose lease is free or expired, i.e. left by a process that died. Steps that succeeded are
not run again: their persisted outputs are fed to the next ones. A step found ``running``
was interrupted: it counts an interruption and runs again; after ``max_interruptions`` it
fails instead, so a step that kills the process every time cannot loop for ever. It is
meant to be called periodically: a run that cannot be executed is logged and the others
are carried on.

**Cancel.** :meth:`PipelineRunner.cancel` is one conditional ``UPDATE`` (the run is pending
or running): a run that finished meanwhile, even in another process committing at the same
moment, is reported as finished and left as it is.

**Metadata.** With a registry, every step attempt is a registry run (kind
``pipeline-step``): its parameters are the pipeline, the run id, the step, the attempt and
the step's inputs; when it ends its metrics hold the duration and the outputs, and its
status and error are the attempt's. The step's row keeps the id of that registry run
(``metadata_run_id``), and models a step registers have registry runs of their own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import ConfigError, EdgeOpsError
from edgeops.pipelines.errors import (
    LeaseLostError,
    PipelineDefinitionError,
    PipelineError,
    PipelineRunNotFoundError,
    StepFailedError,
    StepTimeoutError,
)
from edgeops.pipelines.models import ERROR_MAX_LENGTH, PipelineRunRecord, PipelineStepRecord

if TYPE_CHECKING:
    from edgeops.registry import Registry
    from edgeops.registry.runs import RunHandle

__all__ = [
    "METADATA_RUN_KIND",
    "Pipeline",
    "PipelineRunView",
    "PipelineRunner",
    "Step",
    "StepContext",
    "StepView",
]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
METADATA_RUN_KIND = "pipeline-step"
_NAME_MAX = 64
_ACTIVE = ("pending", "running")
_FINISHED = ("succeeded", "failed", "cancelled")


# -- definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a step is given: the run's parameters and its dependencies' outputs."""

    run_id: str
    pipeline: str
    step: str
    attempt: int
    params: dict[str, Any]
    inputs: dict[str, dict[str, Any]]
    """The outputs of each step this one comes after, by step name."""
    metadata_run: RunHandle | None = None

    def log(self, line: str) -> None:
        """A line for the log (and the attempt's registry run, if there is one)."""
        if self.metadata_run is not None:
            self.metadata_run.log(line)
        else:
            log.info("pipeline run %s, %s: %s", self.run_id, self.step, line)


StepFunction = Callable[[StepContext], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Step:
    """A named step: its callable, what it comes after, retries with backoff, a timeout."""

    name: str
    run: StepFunction
    after: tuple[str, ...] = ()
    retries: int = 0
    backoff_s: float = 1.0
    backoff_factor: float = 2.0
    max_backoff_s: float = 300.0
    timeout_s: float | None = None

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt."""
        return min(self.max_backoff_s, self.backoff_s * self.backoff_factor ** (failures - 1))


class Pipeline:
    """A named DAG of steps, checked when it is built; :attr:`order` is the execution order."""

    def __init__(self, name: str, steps: Sequence[Step]) -> None:
        _check_name(name, "pipeline name")
        if not steps:
            raise PipelineDefinitionError(f"pipeline {name!r} has no steps")
        by_name: dict[str, Step] = {}
        for step in steps:
            _check_name(step.name, f"pipeline {name!r}: step name")
            if step.name in by_name:
                raise PipelineDefinitionError(f"pipeline {name!r}: step {step.name!r} twice")
            _check_step(name, step)
            by_name[step.name] = step
        for step in steps:
            for dependency in step.after:
                if dependency not in by_name:
                    raise PipelineDefinitionError(
                        f"pipeline {name!r}: step {step.name!r} comes after {dependency!r}, "
                        f"which is not a step (steps: {', '.join(by_name)})"
                    )
        self.name = name
        self.steps = by_name
        self.order = _topological(name, list(steps))

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {[s.name for s in self.order]})"


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or len(value) > _NAME_MAX:
        raise PipelineDefinitionError(f"{what} must be 1-{_NAME_MAX} characters, got {value!r}")


def _check_step(pipeline: str, step: Step) -> None:
    what = f"pipeline {pipeline!r}: step {step.name!r}"
    if not callable(step.run):
        raise PipelineDefinitionError(f"{what}: run is not callable")
    after: object = step.after
    if not isinstance(after, tuple) or not all(isinstance(a, str) for a in after):
        raise PipelineDefinitionError(f"{what}: after must be a tuple of step names")
    if step.retries < 0:
        raise PipelineDefinitionError(f"{what}: retries must be at least 0, got {step.retries}")
    for label, value in (("backoff_s", step.backoff_s), ("max_backoff_s", step.max_backoff_s)):
        if not math.isfinite(value) or value < 0:
            raise PipelineDefinitionError(f"{what}: {label} must be a number >= 0, got {value}")
    if not math.isfinite(step.backoff_factor) or step.backoff_factor < 1:
        raise PipelineDefinitionError(
            f"{what}: backoff_factor must be at least 1, got {step.backoff_factor}"
        )
    if step.timeout_s is not None and (not math.isfinite(step.timeout_s) or step.timeout_s <= 0):
        raise PipelineDefinitionError(f"{what}: timeout_s must be above 0, got {step.timeout_s}")


def _topological(pipeline: str, steps: list[Step]) -> list[Step]:
    """Kahn's algorithm, always taking the earliest declared ready step."""
    remaining = {step.name: set(step.after) for step in steps}
    order: list[Step] = []
    while remaining:
        ready = [step for step in steps if step.name in remaining and not remaining[step.name]]
        if not ready:
            cycle = ", ".join(sorted(remaining))
            raise PipelineDefinitionError(f"pipeline {pipeline!r}: a cycle among steps {cycle}")
        chosen = ready[0]
        order.append(chosen)
        del remaining[chosen.name]
        for wanted in remaining.values():
            wanted.discard(chosen.name)
    return order


# -- views ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepView:
    """One step of a run, as the runner hands it out."""

    name: str
    position: int
    status: str
    attempts: int
    interruptions: int
    inputs: dict[str, Any] | None
    outputs: dict[str, Any] | None
    error: str | None
    metadata_run_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None

    @classmethod
    def of(cls, record: PipelineStepRecord) -> StepView:
        return cls(
            name=record.name,
            position=record.position,
            status=record.status,
            attempts=record.attempts,
            interruptions=record.interruptions,
            inputs=None if record.inputs is None else dict(record.inputs),
            outputs=None if record.outputs is None else dict(record.outputs),
            error=record.error,
            metadata_run_id=record.metadata_run_id,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration_s=record.duration_s,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "position": self.position,
            "status": self.status,
            "attempts": self.attempts,
            "interruptions": self.interruptions,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "error": self.error,
            "metadata_run_id": self.metadata_run_id,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True)
class PipelineRunView:
    """A run and its steps in execution order."""

    id: str
    pipeline: str
    status: str
    params: dict[str, Any]
    error: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: list[StepView] = field(default_factory=list)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at).total_seconds())

    def step(self, name: str) -> StepView:
        for step in self.steps:
            if step.name == name:
                return step
        raise PipelineError(f"pipeline run {self.id} has no step {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "status": self.status,
            "params": self.params,
            "error": self.error,
            "lease_owner": self.lease_owner,
            "lease_expires_at": _iso(self.lease_expires_at),
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_s": self.duration_s,
            "steps": [step.to_dict() for step in self.steps],
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# -- the runner -------------------------------------------------------------------------------


class _StopError(Exception):
    """Internal: the run was cancelled or its lease lost; stop without recording more."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _FaultError(Exception):
    """Internal: an exception outside a step's own code while ``step`` was being executed."""

    def __init__(self, step: str, cause: Exception) -> None:
        super().__init__(f"step {step}: {cause}")
        self.step = step
        self.cause = cause


class PipelineRunner:
    """Starts, executes and resumes persisted pipeline runs (see the module docstring).

    ``owner`` names this runner in leases (default: host, pid and a random suffix, unique
    per object; an explicit one must be unique too). Its methods may be called from several
    threads at once. ``lease_s`` is how long a lease lasts without renewal; it is renewed every
    ``lease_s / 3`` seconds while a step works. ``clock`` and ``sleep`` are for tests.
    """

    def __init__(
        self,
        database: Database,
        pipelines: Iterable[Pipeline],
        *,
        registry: Registry | None = None,
        owner: str | None = None,
        lease_s: float = 60.0,
        max_interruptions: int = 3,
        clock: Clock = utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not math.isfinite(lease_s) or lease_s <= 0:
            raise PipelineDefinitionError(f"lease_s must be above 0, got {lease_s}")
        if max_interruptions < 0:
            raise PipelineDefinitionError(
                f"max_interruptions must be at least 0, got {max_interruptions}"
            )
        self.database = database
        self.pipelines: dict[str, Pipeline] = {}
        for pipeline in pipelines:
            if pipeline.name in self.pipelines:
                raise PipelineDefinitionError(f"pipeline {pipeline.name!r} given twice")
            self.pipelines[pipeline.name] = pipeline
        self.registry = registry
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease = timedelta(seconds=lease_s)
        self.heartbeat_s = lease_s / 3.0
        self.max_interruptions = max_interruptions
        self.clock = clock
        self.sleep = sleep
        self._executing: set[str] = set()
        self._executing_lock = threading.Lock()

    # -- starting ----------------------------------------------------------------------------

    def pipeline(self, name: str) -> Pipeline:
        found = self.pipelines.get(name)
        if found is None:
            known = ", ".join(sorted(self.pipelines)) or "none"
            raise PipelineError(f"unknown pipeline {name!r}; known: {known}")
        return found

    def start(self, pipeline: str, params: Mapping[str, Any] | None = None) -> str:
        """Record a new run of ``pipeline`` (pending, every step pending); its id."""
        definition = self.pipeline(pipeline)
        document = _json_object(
            dict(params or {}), f"parameters of pipeline {pipeline!r}", PipelineError
        )
        now = self.clock()
        run_id = f"p-{secrets.token_hex(6)}"
        with self.database.session() as session:
            session.add(
                PipelineRunRecord(
                    id=run_id,
                    pipeline=pipeline,
                    status="pending",
                    params=document,
                    created_at=now,
                    updated_at=now,
                )
            )
            for position, step in enumerate(definition.order):
                session.add(
                    PipelineStepRecord(
                        run_id=run_id,
                        name=step.name,
                        position=position,
                        status="pending",
                        updated_at=now,
                    )
                )
        log.info("pipeline run %s (%s) created", run_id, pipeline)
        return run_id

    def run(self, pipeline: str, params: Mapping[str, Any] | None = None) -> PipelineRunView:
        """Start a run and execute it in this process; the run as it ended."""
        run_id = self.start(pipeline, params)
        self.execute(run_id)
        return self.get(run_id)

    # -- reading -----------------------------------------------------------------------------

    def get(self, run_id: str) -> PipelineRunView:
        """The run ``run_id`` with its steps."""
        with self.database.session() as session:
            record = session.get(PipelineRunRecord, run_id.strip())
            if record is None:
                raise PipelineRunNotFoundError(f"pipeline run {run_id!r} not found")
            return _view(record, _steps(session, record.id))

    def list_runs(self, *, pipeline: str | None = None, limit: int = 100) -> list[PipelineRunView]:
        """The newest ``limit`` runs (of ``pipeline``), newest first, with their steps."""
        query = select(PipelineRunRecord).order_by(
            col(PipelineRunRecord.created_at).desc(), col(PipelineRunRecord.id)
        )
        if pipeline is not None:
            query = query.where(PipelineRunRecord.pipeline == pipeline)
        with self.database.session() as session:
            records = session.exec(query.limit(limit)).all()
            return [_view(record, _steps(session, record.id)) for record in records]

    # -- executing ---------------------------------------------------------------------------

    def resume(self) -> list[str]:
        """Execute every pending or running run whose lease is free or expired (left by a
        process that died); the ids of the runs this runner took.

        Safe to call periodically, from any thread: runs this runner is executing already
        are skipped, runs of pipelines it does not know are left alone, and a run that
        cannot be executed is logged and passed over. Only the query for the candidates
        can raise (the database is unreachable)."""
        now = self.clock()
        query = (
            select(PipelineRunRecord.id, PipelineRunRecord.pipeline)
            .where(col(PipelineRunRecord.status).in_(_ACTIVE))
            .where(
                sa.or_(
                    col(PipelineRunRecord.lease_owner).is_(None),
                    col(PipelineRunRecord.lease_expires_at) < now,
                )
            )
            .order_by(col(PipelineRunRecord.created_at), col(PipelineRunRecord.id))
        )
        with self.database.session() as session:
            candidates = list(session.exec(query).all())
        taken: list[str] = []
        for run_id, pipeline in candidates:
            if pipeline not in self.pipelines:
                log.warning("pipeline run %s: unknown pipeline %r; left alone", run_id, pipeline)
                continue
            if self.executing(run_id):
                log.debug("pipeline run %s: already executing in this runner", run_id)
                continue
            try:
                if self.execute(run_id):
                    taken.append(run_id)
            except EdgeOpsError as exc:
                log.error("pipeline run %s: not resumed: %s", run_id, exc)
            except Exception:
                log.exception("pipeline run %s: not resumed", run_id)
        return taken

    def cancel(self, run_id: str) -> PipelineRunView:
        """Cancel a pending or running run; the runner executing it stops at its next
        heartbeat or step boundary (the step in progress is abandoned, not killed).

        One conditional ``UPDATE``: a run that has finished, even one another process
        finished a moment ago, is left as it is (PipelineError saying how it ended)."""
        now = self.clock()
        stop = (
            sa.update(PipelineRunRecord)
            .where(col(PipelineRunRecord.id) == run_id)
            .where(col(PipelineRunRecord.status).in_(_ACTIVE))
            .values(
                status="cancelled",
                error="cancelled",
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(col(PipelineRunRecord.id))
        )
        steps = (
            sa.update(PipelineStepRecord)
            .where(col(PipelineStepRecord.run_id) == run_id)
            .where(col(PipelineStepRecord.status).in_(_ACTIVE))
            .values(status="cancelled", updated_at=now)
            .execution_options(synchronize_session=False)
        )
        with self.database.session() as session:
            if session.execute(stop).first() is None:
                record = session.get(PipelineRunRecord, run_id)
                if record is None:
                    raise PipelineRunNotFoundError(f"pipeline run {run_id!r} not found")
                raise PipelineError(f"pipeline run {run_id} already {record.status}")
            session.execute(steps)
        log.info("pipeline run %s cancelled", run_id)
        return self.get(run_id)

    def executing(self, run_id: str) -> bool:
        """Whether this runner is executing ``run_id`` now (in any of its threads)."""
        with self._executing_lock:
            return run_id in self._executing

    def execute(self, run_id: str) -> bool:
        """Execute ``run_id`` here if its lease can be taken; False if another process holds
        it, it has finished, or this runner is executing it already (another thread).
        Returns once the run has ended or this runner had to stop.

        Raises only before the run is taken (PipelineRunNotFoundError, an unknown pipeline,
        the database unreachable). Once taken, an error of the runner itself fails the run
        (see the module docstring) and is logged; it is not raised."""
        with self._executing_lock:
            if run_id in self._executing:
                log.info("pipeline run %s: already executing in this runner", run_id)
                return False
            self._executing.add(run_id)
        try:
            self.pipeline(self._pipeline_of(run_id))  # unknown here: refuse before taking it
            if not self._claim(run_id):
                log.info(
                    "pipeline run %s: not taken (finished, or leased by another process)", run_id
                )
                return False
            try:
                self._execute(run_id)
            except _StopError as stop:
                log.warning("pipeline run %s: stopped (%s)", run_id, stop)
            except Exception as exc:  # noqa: BLE001 - recorded as the run's failure below
                self._fault(run_id, exc)
            return True
        finally:
            with self._executing_lock:
                self._executing.discard(run_id)

    def _pipeline_of(self, run_id: str) -> str:
        query = select(PipelineRunRecord.pipeline).where(PipelineRunRecord.id == run_id)
        with self.database.session() as session:
            name = session.exec(query).first()
        if name is None:
            raise PipelineRunNotFoundError(f"pipeline run {run_id!r} not found")
        return name

    def _fault(self, run_id: str, exc: Exception) -> None:
        """After an exception outside a step: log it, then fail the run if this runner still
        holds it, or at least give its lease up so that ``resume`` can take it."""
        if isinstance(exc, _FaultError):
            error = f"step {exc.step}: runner error: {_describe(exc.cause)}"
            cause: Exception = exc.cause
        else:
            error = f"runner error: {_describe(exc)}"
            cause = exc
        log.error("pipeline run %s: %s", run_id, error, exc_info=cause)
        now = self.clock()
        held = (
            col(PipelineRunRecord.id) == run_id,
            col(PipelineRunRecord.lease_owner) == self.owner,
        )
        fail = (
            sa.update(PipelineRunRecord)
            .where(*held)
            .where(col(PipelineRunRecord.status) == "running")
            .values(
                status="failed",
                error=_truncate(error),
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(col(PipelineRunRecord.id))
        )
        interrupted = (
            sa.update(PipelineStepRecord)
            .where(col(PipelineStepRecord.run_id) == run_id)
            .where(col(PipelineStepRecord.status) == "running")
            .values(status="failed", error=_truncate(error), finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        try:
            with self.database.session() as session:
                if session.execute(fail).first() is None:
                    log.warning(
                        "pipeline run %s: no longer held by this runner; left as it is", run_id
                    )
                    return
                session.execute(interrupted)
            log.warning("pipeline run %s failed: %s", run_id, error)
            return
        except Exception as record_error:  # noqa: BLE001 - fall back to releasing the lease
            log.error("pipeline run %s: could not record its failure: %s", run_id, record_error)
        release = (
            sa.update(PipelineRunRecord)
            .where(*held)
            .values(lease_owner=None, lease_expires_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        try:
            with self.database.session() as session:
                session.execute(release)
            log.warning("pipeline run %s: lease released; resume() can carry it on", run_id)
        except Exception as release_error:  # noqa: BLE001 - the lease expires by itself
            log.error(
                "pipeline run %s: could not release its lease either (%s); it expires within %g s",
                run_id,
                release_error,
                self.lease.total_seconds(),
            )

    def _claim(self, run_id: str) -> bool:
        now = self.clock()
        claim = (
            sa.update(PipelineRunRecord)
            .where(col(PipelineRunRecord.id) == run_id)
            .where(col(PipelineRunRecord.status).in_(_ACTIVE))
            .where(
                sa.or_(
                    col(PipelineRunRecord.lease_owner).is_(None),
                    col(PipelineRunRecord.lease_owner) == self.owner,
                    col(PipelineRunRecord.lease_expires_at) < now,
                )
            )
            .values(
                lease_owner=self.owner,
                lease_expires_at=now + self.lease,
                status="running",
                started_at=sa.func.coalesce(col(PipelineRunRecord.started_at), now),
                updated_at=now,
            )
            .returning(col(PipelineRunRecord.id))
        )
        with self.database.session() as session:
            if session.get(PipelineRunRecord, run_id) is None:
                raise PipelineRunNotFoundError(f"pipeline run {run_id!r} not found")
            taken = session.execute(claim).first() is not None
        if taken:
            log.info("pipeline run %s: lease taken by %s", run_id, self.owner)
        return taken

    def _renew(self, session: Session, run_id: str) -> None:
        """Extend the lease inside ``session``'s transaction, or stop: _StopError if the run
        was cancelled or another process holds it now."""
        now = self.clock()
        renew = (
            sa.update(PipelineRunRecord)
            .where(col(PipelineRunRecord.id) == run_id)
            .where(col(PipelineRunRecord.lease_owner) == self.owner)
            .where(col(PipelineRunRecord.status) == "running")
            .values(lease_expires_at=now + self.lease, updated_at=now)
            .returning(col(PipelineRunRecord.id))
        )
        if session.execute(renew).first() is not None:
            return
        record = session.get(PipelineRunRecord, run_id, populate_existing=True)
        if record is not None and record.status == "cancelled":
            raise _StopError("cancelled", "the run was cancelled")
        owner = None if record is None else record.lease_owner
        raise _StopError("lost", f"lease lost to {owner or 'nobody'}")

    def heartbeat(self, run_id: str) -> None:
        """Renew the lease on ``run_id`` (LeaseLostError if this runner no longer holds it)."""
        try:
            with self.database.session() as session:
                self._renew(session, run_id)
        except _StopError as stop:
            raise LeaseLostError(f"pipeline run {run_id}: {stop}") from None

    def _execute(self, run_id: str) -> None:
        with self.database.session() as session:
            record = session.get(PipelineRunRecord, run_id)
            assert record is not None
            pipeline = self.pipeline(record.pipeline)
            params = dict(record.params)
            rows = {row.name: row for row in _steps(session, run_id)}
            missing = [step for step in pipeline.order if step.name not in rows]
            now = self.clock()
            for step in missing:  # the pipeline gained a step since the run was created
                row = PipelineStepRecord(
                    run_id=run_id,
                    name=step.name,
                    position=pipeline.order.index(step),
                    status="pending",
                    updated_at=now,
                )
                session.add(row)
                rows[step.name] = row
        outputs: dict[str, dict[str, Any]] = {}
        for step in pipeline.order:
            row = rows[step.name]
            if row.status == "succeeded":
                outputs[step.name] = dict(row.outputs or {})
                continue
            inputs = {dependency: outputs[dependency] for dependency in step.after}
            try:
                result = self._run_step(run_id, pipeline, step, row, params, inputs)
            except (_StopError, _FaultError):
                raise
            except Exception as exc:
                raise _FaultError(step.name, exc) from exc
            if result is None:
                return  # failed: recorded
            outputs[step.name] = result
        self._finish(run_id, "succeeded", None)
        log.info("pipeline run %s (%s) succeeded", run_id, pipeline.name)

    def _run_step(
        self,
        run_id: str,
        pipeline: Pipeline,
        step: Step,
        row: PipelineStepRecord,
        params: dict[str, Any],
        inputs: dict[str, dict[str, Any]],
    ) -> dict[str, Any] | None:
        """Attempts of one step until it succeeds (its outputs) or gives up (None)."""
        attempts = row.attempts
        interruptions = row.interruptions
        if row.status == "running":
            interruptions += 1  # a process died during its last attempt
            log.warning(
                "pipeline run %s: step %s was interrupted during attempt %d; running it again",
                run_id,
                step.name,
                attempts,
            )
        failures = max(0, attempts - interruptions)
        if row.status == "running" and interruptions > self.max_interruptions:
            error = (
                f"interrupted {interruptions} times (the process executing it died); "
                f"not run again after {self.max_interruptions} interruptions"
            )
            self._record(
                run_id,
                step.name,
                status="failed",
                error=error,
                interruptions=interruptions,
                finished_at=self.clock(),
            )
            self._finish(run_id, "failed", f"step {step.name}: {error}")
            return None
        while True:
            attempts += 1
            handle = self._metadata_run(run_id, pipeline, step, attempts, inputs)
            try:
                started = self.clock()
                self._record(
                    run_id,
                    step.name,
                    status="running",
                    attempts=attempts,
                    interruptions=interruptions,
                    inputs=inputs,
                    error=None,
                    started_at=started,
                    finished_at=None,
                    duration_s=None,
                    metadata_run_id=None if handle is None else handle.id,
                )
                context = StepContext(
                    run_id=run_id,
                    pipeline=pipeline.name,
                    step=step.name,
                    attempt=attempts,
                    params=params,
                    inputs=inputs,
                    metadata_run=handle,
                )
                clock_start = time.monotonic()
                try:
                    outputs = self._call(run_id, step, context)
                except _StopError:
                    _close(handle, StepFailedError("stopped: the run was cancelled or taken over"))
                    raise
                except _FaultError as fault:  # the heartbeat failed, not the step
                    _close(handle, fault.cause)
                    raise
                except Exception as exc:  # noqa: BLE001 - a failing step is recorded, not fatal
                    duration = time.monotonic() - clock_start
                    _close(handle, exc)
                    failures += 1
                    error = _describe(exc)
                    if failures <= step.retries and not _final(exc):
                        delay = step.delay(failures)
                        log.warning(
                            "pipeline run %s: step %s attempt %d failed (%s); retrying in %.3g s",
                            run_id, step.name, attempts, error, delay,
                        )  # fmt: skip
                        self._record(
                            run_id,
                            step.name,
                            status="pending",
                            error=f"attempt {attempts} failed: {error}",
                            finished_at=self.clock(),
                            duration_s=duration,
                        )
                        self._wait(run_id, delay)
                        continue
                    self._record(
                        run_id,
                        step.name,
                        status="failed",
                        error=error,
                        finished_at=self.clock(),
                        duration_s=duration,
                    )
                    self._finish(run_id, "failed", f"step {step.name}: {error}")
                    log.warning("pipeline run %s: step %s failed: %s", run_id, step.name, error)
                    return None
                duration = time.monotonic() - clock_start
                if handle is not None:
                    handle.log_metrics({"duration_s": duration, "outputs": outputs})
                    _close(handle, None)
                self._record(
                    run_id,
                    step.name,
                    status="succeeded",
                    outputs=outputs,
                    error=None,
                    finished_at=self.clock(),
                    duration_s=duration,
                )
                log.info(
                    "pipeline run %s: step %s succeeded in %.2f s", run_id, step.name, duration
                )
                return outputs
            except BaseException as exc:
                # anything else leaving the attempt (the database or the registry failing
                # around the step, the process being stopped) ends its registry run, if
                # that has not ended yet, and goes up
                _close(handle, exc)
                raise

    def _call(self, run_id: str, step: Step, context: StepContext) -> dict[str, Any]:
        """Run the step in a worker thread, renewing the lease while it works."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = step.run(context)
            except BaseException as exc:  # noqa: BLE001 - handed to the runner's thread
                box["error"] = exc
            finally:
                done.set()

        worker = threading.Thread(target=work, name=f"pipeline-{run_id}-{step.name}", daemon=True)
        started = time.monotonic()
        worker.start()
        while True:
            wait = self.heartbeat_s
            if step.timeout_s is not None:
                wait = min(wait, max(0.0, step.timeout_s - (time.monotonic() - started)))
            if done.wait(wait):
                break
            if step.timeout_s is not None and time.monotonic() - started >= step.timeout_s:
                raise StepTimeoutError(
                    f"attempt {context.attempt} ran longer than its timeout of "
                    f"{step.timeout_s:g} s (abandoned)"
                )
            try:
                with self.database.session() as session:
                    self._renew(session, run_id)
            except _StopError:
                raise
            except Exception as exc:  # the database, not the step: not an attempt's failure
                raise _FaultError(step.name, exc) from exc
        if "error" in box:
            raise box["error"]
        value = box.get("value")
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise StepFailedError(
                f"returned {type(value).__name__}, not a mapping of outputs (or None)"
            )
        return _json_object(dict(value), f"outputs of step {step.name!r}")

    def _wait(self, run_id: str, seconds: float) -> None:
        """Sleep ``seconds`` (a retry's backoff), renewing the lease meanwhile."""
        remaining = seconds
        while remaining > 0:
            chunk = min(remaining, self.heartbeat_s)
            self.sleep(chunk)
            remaining -= chunk
            with self.database.session() as session:
                self._renew(session, run_id)

    def _metadata_run(
        self,
        run_id: str,
        pipeline: Pipeline,
        step: Step,
        attempt: int,
        inputs: dict[str, dict[str, Any]],
    ) -> RunHandle | None:
        if self.registry is None:
            return None
        return self.registry.start_run(
            METADATA_RUN_KIND,
            {
                "pipeline": pipeline.name,
                "pipeline_run": run_id,
                "step": step.name,
                "attempt": attempt,
                "inputs": inputs,
            },
        )

    def _record(self, run_id: str, name: str, **values: Any) -> None:
        """Update a step's row, in a transaction that first renews the lease."""
        now = self.clock()
        with self.database.session() as session:
            self._renew(session, run_id)
            row = session.get(PipelineStepRecord, (run_id, name))
            assert row is not None
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = now

    def _finish(self, run_id: str, status: str, error: str | None) -> None:
        now = self.clock()
        with self.database.session() as session:
            self._renew(session, run_id)
            record = session.get(PipelineRunRecord, run_id)
            assert record is not None
            record.status = status
            record.error = None if error is None else _truncate(error)
            record.finished_at = now
            record.updated_at = now
            record.lease_owner = None
            record.lease_expires_at = None


# -- helpers ----------------------------------------------------------------------------------


def _steps(session: Session, run_id: str) -> list[PipelineStepRecord]:
    query = (
        select(PipelineStepRecord)
        .where(PipelineStepRecord.run_id == run_id)
        .order_by(col(PipelineStepRecord.position), col(PipelineStepRecord.name))
    )
    return list(session.exec(query).all())


def _view(record: PipelineRunRecord, steps: list[PipelineStepRecord]) -> PipelineRunView:
    return PipelineRunView(
        id=record.id,
        pipeline=record.pipeline,
        status=record.status,
        params=dict(record.params),
        error=record.error,
        lease_owner=record.lease_owner,
        lease_expires_at=record.lease_expires_at,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        steps=[StepView.of(step) for step in steps],
    )


def _json_object(
    value: dict[str, Any], what: str, error: type[PipelineError] = StepFailedError
) -> dict[str, Any]:
    """``value`` as plain JSON (a round trip), or ``error`` naming what is wrong."""
    try:
        document = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise error(f"{what} are not plain JSON: {exc}") from None
    assert isinstance(document, dict)
    return document


def _final(exc: BaseException) -> bool:
    """Whether retrying cannot help: the step gave up (StepFailedError) or was configured
    wrongly (ConfigError)."""
    return isinstance(exc, StepFailedError | ConfigError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StepFailedError | StepTimeoutError):
        return _truncate(str(exc))
    text = str(exc)
    return _truncate(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _truncate(text: str) -> str:
    return text if len(text) <= ERROR_MAX_LENGTH else text[: ERROR_MAX_LENGTH - 3] + "..."


def _close(handle: RunHandle | None, error: BaseException | None) -> None:
    """End the attempt's registry run: succeeded, or failed with ``error``."""
    if handle is None:
        return
    try:
        if error is None:
            handle.__exit__(None, None, None)
        else:
            handle.__exit__(type(error), error, error.__traceback__)
    except Exception as exc:  # noqa: BLE001 - metadata must not break the run
        log.warning("could not record registry run %s: %s", handle.id, exc)
