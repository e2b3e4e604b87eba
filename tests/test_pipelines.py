"""The persisted pipeline runner on SQLite and PostgreSQL, and the continuous-training
pipeline end to end on digits (real training, compression, release repository and rollout
engine; devices and their telemetry recorded as the hub's bridge records them)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import col

from device_agent.protocol import StateReport
from device_agent.telemetry import TelemetryWindow
from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import DatabaseError
from edgeops.pipelines import (
    METADATA_RUN_KIND,
    Pipeline,
    PipelineDefinitionError,
    PipelineError,
    PipelineRunner,
    PipelineRunNotFoundError,
    Step,
    StepContext,
)
from edgeops.pipelines.models import PipelineRunRecord, PipelineStepRecord
from edgeops.registry import Registry
from edgeops.registry.runs import RunHandle
from edgeops.store import ArtifactStore

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- helpers ----------------------------------------------------------------------------------


class Journal:
    """What the steps did, one line per call, in a file (so a child process can add to it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, line: str) -> None:
        with self.path.open("a") as handle:
            handle.write(line + "\n")

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []


def chain(directory: Path, *, crash_in: str | None = None) -> Pipeline:
    """extract -> transform -> load, each writing to the journal; ``crash_in`` names a step
    whose first attempt kills the process half-way through."""
    journal = Journal(directory / "journal.txt")

    def extract(context: StepContext) -> dict[str, Any]:
        journal.add(f"extract {context.attempt}")
        return {"rows": [1, 2, 3]}

    def transform(context: StepContext) -> dict[str, Any]:
        journal.add(f"transform {context.attempt}")
        if crash_in == "transform" and context.attempt == 1:
            import os

            os._exit(3)  # the hub dies mid-step: nothing after this is recorded
        return {"total": sum(context.inputs["extract"]["rows"])}

    def load(context: StepContext) -> dict[str, Any]:
        journal.add(f"load {context.attempt}")
        return {"written": context.inputs["transform"]["total"], "extracted": context.inputs}

    return Pipeline(
        "etl",
        [
            Step("extract", extract),
            Step("transform", transform, after=("extract",)),
            Step("load", load, after=("transform", "extract")),
        ],
    )


def crash_child(url: str, directory: str, run_id: str) -> None:
    """Run in a child process: execute ``run_id`` with a pipeline that kills the process."""
    database = Database(url)
    runner = PipelineRunner(database, [chain(Path(directory), crash_in="transform")],
                            owner="child-hub", lease_s=300.0)  # fmt: skip
    runner.execute(run_id)
    raise SystemExit(0)  # not reached: the step kills the process


class Later:
    """A clock ``offset`` ahead of the real one (another hub, after the lease expired); the
    offset may be changed as a test goes on."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return utcnow() + self.offset


# -- definitions ------------------------------------------------------------------------------


def noop(context: StepContext) -> None:
    return None


def test_definitions_are_checked() -> None:
    with pytest.raises(PipelineDefinitionError, match="a cycle among steps a, b"):
        Pipeline("p", [Step("a", noop, after=("b",)), Step("b", noop, after=("a",))])
    with pytest.raises(PipelineDefinitionError, match="'x', which is not a step"):
        Pipeline("p", [Step("a", noop, after=("x",))])
    with pytest.raises(PipelineDefinitionError, match="step 'a' twice"):
        Pipeline("p", [Step("a", noop), Step("a", noop)])
    with pytest.raises(PipelineDefinitionError, match="retries must be at least 0"):
        Pipeline("p", [Step("a", noop, retries=-1)])
    with pytest.raises(PipelineDefinitionError, match="after must be a tuple"):
        Pipeline("p", [Step("a", noop, after="b")])  # type: ignore[arg-type]
    # declared order breaks ties; dependencies come first
    order = Pipeline(
        "p", [Step("c", noop, after=("b",)), Step("a", noop), Step("b", noop, after=("a",))]
    ).order
    assert [step.name for step in order] == ["a", "b", "c"]


# -- the runner on both databases -------------------------------------------------------------


def test_steps_run_in_order_with_outputs_and_metadata(database: Database, tmp_path: Path) -> None:
    registry = Registry(database, ArtifactStore(tmp_path / "artifacts"))
    runner = PipelineRunner(database, [chain(tmp_path)], registry=registry)

    view = runner.run("etl", {"source": "demo"})

    assert view.status == "succeeded" and view.error is None
    assert Journal(tmp_path / "journal.txt").lines() == ["extract 1", "transform 1", "load 1"]
    assert [s.name for s in view.steps] == ["extract", "transform", "load"]
    assert all(s.status == "succeeded" and s.attempts == 1 for s in view.steps)
    load = view.step("load")
    assert load.inputs == {"transform": {"total": 6}, "extract": {"rows": [1, 2, 3]}}
    assert load.outputs == {"written": 6, "extracted": load.inputs}
    assert load.duration_s is not None and load.duration_s >= 0
    assert view.lease_owner is None and view.finished_at is not None
    assert view.params == {"source": "demo"}
    # each step attempt is a registry run holding inputs, outputs and duration
    runs = {run.id: run for run in registry.list_runs(kind=METADATA_RUN_KIND)}
    assert len(runs) == 3
    recorded = runs[load.metadata_run_id or ""]
    assert recorded.status == "succeeded"
    assert recorded.params["inputs"] == load.inputs
    assert recorded.params["pipeline_run"] == view.id and recorded.params["step"] == "load"
    assert recorded.metrics["outputs"] == load.outputs
    assert recorded.metrics["duration_s"] == pytest.approx(load.duration_s, abs=0.5)
    assert [v.id for v in runner.list_runs()] == [view.id]
    with pytest.raises(PipelineRunNotFoundError, match="p-missing"):
        runner.get("p-missing")


def test_retries_with_backoff_then_success(database: Database) -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky(context: StepContext) -> dict[str, Any]:
        calls.append(context.attempt)
        if context.attempt < 3:
            raise ConnectionError(f"broker away (attempt {context.attempt})")
        return {"ok": True}

    pipeline = Pipeline("flaky", [Step("call", flaky, retries=3, backoff_s=0.5)])
    runner = PipelineRunner(database, [pipeline], sleep=slept.append)

    view = runner.run("flaky")

    assert view.status == "succeeded"
    assert calls == [1, 2, 3]
    assert slept == [0.5, 1.0]  # the backoff doubles
    step = view.step("call")
    assert step.attempts == 3 and step.status == "succeeded" and step.outputs == {"ok": True}
    assert step.error is None


def test_a_failure_is_recorded_with_its_error(database: Database, tmp_path: Path) -> None:
    registry = Registry(database, ArtifactStore(tmp_path / "artifacts"))

    def broken(context: StepContext) -> None:
        raise ValueError(f"column 'x' is missing (attempt {context.attempt})")

    pipeline = Pipeline(
        "broken",
        [Step("first", noop), Step("second", broken, after=("first",), retries=1,
              backoff_s=0.0), Step("third", noop, after=("second",))],
    )  # fmt: skip
    view = PipelineRunner(database, [pipeline], registry=registry).run("broken")

    assert view.status == "failed"
    assert view.error == "step second: ValueError: column 'x' is missing (attempt 2)"
    second = view.step("second")
    assert (second.status, second.attempts) == ("failed", 2)
    assert second.error == "ValueError: column 'x' is missing (attempt 2)"
    assert view.step("first").status == "succeeded"
    assert view.step("third").status == "pending" and view.step("third").attempts == 0
    failed = registry.get_run(second.metadata_run_id or "")
    assert failed.status == "failed" and "column 'x' is missing" in (failed.error or "")


def test_a_step_that_gives_up_is_not_retried(database: Database) -> None:
    from edgeops.pipelines import StepFailedError

    slept: list[float] = []

    def give_up(context: StepContext) -> None:
        raise StepFailedError("no champion: promote a version first")

    pipeline = Pipeline("p", [Step("a", give_up, retries=3, backoff_s=1.0)])
    view = PipelineRunner(database, [pipeline], sleep=slept.append).run("p")
    step = view.step("a")
    assert (view.status, step.attempts, slept) == ("failed", 1, [])
    assert step.error == "no champion: promote a version first"


def test_a_step_past_its_timeout_fails(database: Database) -> None:
    release = threading.Event()

    def stuck(context: StepContext) -> None:
        release.wait(30)

    pipeline = Pipeline("stuck", [Step("wait", stuck, timeout_s=0.2)])
    try:
        view = PipelineRunner(database, [pipeline]).run("stuck")
    finally:
        release.set()
    assert view.status == "failed"
    assert "ran longer than its timeout of 0.2 s" in (view.step("wait").error or "")


class SimulatedCrash(BaseException):
    """Escapes the runner like the process dying would: nothing more is recorded."""


def test_resume_after_a_crash_skips_finished_steps(database: Database, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.txt")
    crash = {"armed": True}

    def make() -> Pipeline:
        def first(context: StepContext) -> dict[str, Any]:
            journal.add("first")
            return {"value": 20}

        def second(context: StepContext) -> dict[str, Any]:
            journal.add("second")
            if crash["armed"]:
                raise SimulatedCrash
            return {"value": context.inputs["first"]["value"] + 1}

        return Pipeline("p", [Step("first", first), Step("second", second, after=("first",))])

    runner = PipelineRunner(database, [make()], owner="hub-1")
    run_id = runner.start("p")
    with pytest.raises(SimulatedCrash):
        runner.execute(run_id)
    left = runner.get(run_id)
    assert (left.status, left.lease_owner) == ("running", "hub-1")
    assert [s.status for s in left.steps] == ["succeeded", "running"]

    crash["armed"] = False
    # the lease has not expired: another hub leaves the run alone
    assert PipelineRunner(database, [make()], owner="hub-2").resume() == []
    later = PipelineRunner(database, [make()], owner="hub-2", clock=Later(timedelta(minutes=5)))
    assert later.resume() == [run_id]

    view = later.get(run_id)
    assert view.status == "succeeded"
    assert journal.lines() == ["first", "second", "second"]  # first was not run again
    second = view.step("second")
    assert (second.attempts, second.interruptions, second.outputs) == (2, 1, {"value": 21})
    assert second.inputs == {"first": {"value": 20}}
    assert later.resume() == []  # nothing left


def test_resume_after_the_process_was_killed(database_url: str, tmp_path: Path) -> None:
    database = Database(database_url)
    database.upgrade()
    try:
        run_id = PipelineRunner(database, [chain(tmp_path)]).start("etl", {"n": 1})
        child = subprocess.run(
            [sys.executable, "-c",
             "import sys; from tests.test_pipelines import crash_child; crash_child(*sys.argv[1:])",
             database_url, str(tmp_path), run_id],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert child.returncode == 3, child.stderr
        journal = Journal(tmp_path / "journal.txt")
        assert journal.lines() == ["extract 1", "transform 1"]

        runner = PipelineRunner(database, [chain(tmp_path)], owner="new-hub")
        left = runner.get(run_id)
        assert (left.status, left.lease_owner) == ("running", "child-hub")
        assert runner.resume() == []  # the dead process's lease still holds
        assert not runner.execute(run_id)

        after_expiry = PipelineRunner(
            database, [chain(tmp_path)], owner="new-hub", clock=Later(timedelta(minutes=10))
        )
        assert after_expiry.resume() == [run_id]
        view = after_expiry.get(run_id)
        assert view.status == "succeeded"
        assert journal.lines() == ["extract 1", "transform 1", "transform 2", "load 1"]
        assert view.step("transform").interruptions == 1
        assert view.step("load").outputs == {
            "written": 6,
            "extracted": {"transform": {"total": 6}, "extract": {"rows": [1, 2, 3]}},
        }
    finally:
        database.dispose()


def test_two_runners_racing_for_one_run(database_url: str) -> None:
    first, second = Database(database_url), Database(database_url)
    first.upgrade()
    executions: list[str] = []
    loser_done = threading.Event()

    def work(context: StepContext) -> dict[str, Any]:
        executions.append(context.run_id)
        loser_done.wait(20)  # hold the run until the other runner has given up
        return {}

    try:
        runners = [
            PipelineRunner(db, [Pipeline("race", [Step("work", work)])], owner=f"hub-{i}")
            for i, db in enumerate((first, second))
        ]
        run_id = runners[0].start("race")
        barrier = threading.Barrier(2)
        results: dict[int, bool] = {}

        def go(index: int) -> None:
            barrier.wait()
            results[index] = runners[index].execute(run_id)
            if not results[index]:
                loser_done.set()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results.values()) == [False, True]
        assert executions == [run_id]
        assert runners[0].get(run_id).status == "succeeded"
    finally:
        first.dispose()
        second.dispose()


def test_a_runner_that_lost_its_lease_records_nothing(database: Database) -> None:
    stalled, release = threading.Event(), threading.Event()

    def slow(context: StepContext) -> dict[str, Any]:
        if context.attempt == 1:  # the first hub stalls here past its lease
            stalled.set()
            release.wait(30)
            return {"by": "first"}
        return {"by": "second"}

    def make() -> Pipeline:
        return Pipeline("p", [Step("slow", slow)])

    first = PipelineRunner(database, [make()], owner="hub-1", lease_s=0.6)
    run_id = first.start("p")
    worker = threading.Thread(target=first.execute, args=(run_id,))
    worker.start()
    try:
        assert stalled.wait(30)
        second = PipelineRunner(database, [make()], owner="hub-2",
                                clock=Later(timedelta(minutes=10)))  # fmt: skip
        assert second.execute(run_id)
    finally:
        release.set()
        worker.join(30)
    view = second.get(run_id)
    assert view.status == "succeeded"
    step = view.step("slow")
    assert step.outputs == {"by": "second"} and (step.attempts, step.interruptions) == (2, 1)


def test_cancel_stops_a_run(database: Database) -> None:
    runner = PipelineRunner(database, [Pipeline("p", [Step("a", noop)])])
    run_id = runner.start("p")
    view = runner.cancel(run_id)
    assert view.status == "cancelled" and view.steps[0].status == "cancelled"
    assert not runner.execute(run_id)
    assert runner.resume() == []


def test_cancel_stops_a_running_run(database: Database) -> None:
    started, release = threading.Event(), threading.Event()

    def hold(context: StepContext) -> dict[str, Any]:
        started.set()
        release.wait(30)
        return {"done": True}

    pipeline = Pipeline("p", [Step("hold", hold), Step("after", noop, after=("hold",))])
    runner = PipelineRunner(database, [pipeline], owner="hub-1", lease_s=300.0)
    run_id = runner.start("p")
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(runner.execute(run_id)))
    worker.start()
    try:
        assert started.wait(30)
        view = runner.cancel(run_id)
        assert (view.status, view.error, view.lease_owner) == ("cancelled", "cancelled", None)
        assert [step.status for step in view.steps] == ["cancelled", "cancelled"]
    finally:
        release.set()
        worker.join(30)
    assert results == [True]
    assert runner.get(run_id) == view  # the step's outcome came too late: nothing recorded


def test_cancel_never_overwrites_a_finished_run(database: Database, database_url: str) -> None:
    runner = PipelineRunner(database, [Pipeline("p", [Step("a", noop)])], owner="hub-1")
    done = runner.run("p")
    with pytest.raises(PipelineError, match=f"pipeline run {done.id} already succeeded"):
        runner.cancel(done.id)
    assert runner.get(done.id) == done
    with pytest.raises(PipelineRunNotFoundError, match="p-000000000000"):
        runner.cancel("p-000000000000")

    # another hub process commits "succeeded" just before cancel writes
    run_id = runner.start("p")
    other = Database(database_url)
    armed = [True]

    def finish_elsewhere(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if armed and statement.lstrip().upper().startswith("UPDATE PIPELINE_RUNS"):
            armed.clear()
            with other.session() as session:
                record = session.get(PipelineRunRecord, run_id)
                assert record is not None
                record.status, record.finished_at = "succeeded", utcnow()

    sa.event.listen(database.engine, "before_cursor_execute", finish_elsewhere)
    try:
        with pytest.raises(PipelineError, match=f"pipeline run {run_id} already succeeded"):
            runner.cancel(run_id)
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", finish_elsewhere)
        other.dispose()
    assert not armed  # the other process did write first
    view = runner.get(run_id)
    assert (view.status, view.error) == ("succeeded", None)
    assert view.steps[0].status == "pending"  # cancel changed nothing


# -- one runner shared by threads, and its own errors -----------------------------------------


def test_one_runner_never_executes_a_run_twice_at_once(database: Database) -> None:
    started, release = threading.Event(), threading.Event()
    attempts: list[int] = []

    def hold(context: StepContext) -> dict[str, Any]:
        attempts.append(context.attempt)
        if len(attempts) == 1:
            started.set()
            release.wait(30)
        return {"attempt": context.attempt}

    clock = Later(timedelta(0))
    runner = PipelineRunner(database, [Pipeline("p", [Step("hold", hold)])], owner="hub-1",
                            lease_s=300.0, clock=clock)  # fmt: skip
    run_id = runner.start("p")
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(runner.execute(run_id)))
    worker.start()
    try:
        assert started.wait(30)
        assert runner.executing(run_id)
        before = runner.get(run_id)
        assert not runner.execute(run_id)  # another thread of the same runner
        clock.offset = timedelta(minutes=10)  # the resume loop finds the lease expired
        assert runner.resume() == []
        assert runner.get(run_id) == before  # neither touched it
    finally:
        release.set()
        worker.join(30)
    assert results == [True] and attempts == [1]
    view = runner.get(run_id)
    step = view.step("hold")
    assert view.status == "succeeded" and not runner.executing(run_id)
    assert (step.attempts, step.interruptions, step.outputs) == (1, 0, {"attempt": 1})


class FailingRegistry(Registry):
    """A registry whose store fails when the registry run of ``step`` starts, after
    ``meanwhile`` (something another process does at that moment)."""

    def __init__(
        self,
        database: Database,
        store: ArtifactStore,
        step: str,
        meanwhile: Callable[[str], object] | None = None,
    ) -> None:
        super().__init__(database, store)
        self.step = step
        self.meanwhile = meanwhile

    def start_run(self, kind: str, params: Mapping[str, Any]) -> RunHandle:
        if params.get("step") == self.step:
            if self.meanwhile is not None:
                self.meanwhile(str(params["pipeline_run"]))
            raise DatabaseError("metadata store: disk I/O error")
        return super().start_run(kind, params)


def test_a_registry_failure_fails_the_run_and_frees_it(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    runner = PipelineRunner(database, [chain(tmp_path)], owner="hub-1",
                            registry=FailingRegistry(database, store, "transform"))  # fmt: skip
    run_id = runner.start("etl")
    results: list[bool] = []
    with caplog.at_level(logging.ERROR, logger="edgeops.pipelines.runner"):
        worker = threading.Thread(target=lambda: results.append(runner.execute(run_id)))
        worker.start()
        worker.join(60)
    assert results == [True]  # returned normally in the thread that executed it

    view = runner.get(run_id)
    assert (
        view.error == "step transform: runner error: DatabaseError: metadata store: disk I/O error"
    )
    assert (view.status, view.lease_owner) == ("failed", None) and view.finished_at is not None
    assert [step.status for step in view.steps] == ["succeeded", "pending", "pending"]
    assert Journal(tmp_path / "journal.txt").lines() == ["extract 1"]
    assert any(run_id in r.getMessage() and "disk I/O error" in r.getMessage()
               for r in caplog.records if r.levelno >= logging.ERROR)  # fmt: skip
    later = PipelineRunner(database, [chain(tmp_path)], clock=Later(timedelta(minutes=10)))
    assert later.resume() == []  # nothing left running for another hub to pick up

    # the run was cancelled when the error came: it stays cancelled
    runner.registry = FailingRegistry(database, store, "transform", meanwhile=runner.cancel)
    cancelled = runner.start("etl")
    assert runner.execute(cancelled)
    view = runner.get(cancelled)
    assert (view.status, view.error) == ("cancelled", "cancelled")
    assert [step.status for step in view.steps] == ["succeeded", "cancelled", "cancelled"]


def test_a_failure_to_record_an_outcome_fails_the_run(database: Database, tmp_path: Path) -> None:
    runner = PipelineRunner(database, [chain(tmp_path)], owner="hub-1")
    run_id = runner.start("etl")
    armed = [True]

    def disk_error(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        # the database fails as the outcome of "transform" is written
        if (
            armed
            and statement.lstrip().upper().startswith("UPDATE PIPELINE_STEPS")
            and "transform" in str(parameters)
            and "succeeded" in str(parameters)
        ):
            armed.clear()
            raise sa.exc.OperationalError(statement, parameters, Exception("disk I/O error"))

    sa.event.listen(database.engine, "before_cursor_execute", disk_error)
    try:
        assert runner.execute(run_id)
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", disk_error)
    assert not armed
    view = runner.get(run_id)
    assert (view.status, view.lease_owner) == ("failed", None)
    assert (view.error or "").startswith("step transform: runner error: DatabaseError: ")
    assert (view.error or "").endswith("disk I/O error")
    transform = view.step("transform")
    assert (transform.status, transform.error, transform.outputs) == ("failed", view.error, None)
    assert view.step("load").status == "pending"
    assert Journal(tmp_path / "journal.txt").lines() == ["extract 1", "transform 1"]
    assert not runner.executing(run_id) and runner.resume() == []


def test_a_heartbeat_failure_is_not_an_attempt_that_failed(database: Database) -> None:
    working, failed = threading.Event(), threading.Event()

    def work(context: StepContext) -> dict[str, Any]:
        working.set()
        failed.wait(30)  # until the runner's heartbeat has hit the database error
        return {}

    def lost_database(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if (
            working.is_set()
            and not failed.is_set()
            and statement.lstrip().upper().startswith("UPDATE PIPELINE_RUNS")
        ):
            failed.set()
            raise sa.exc.OperationalError(statement, parameters, Exception("connection lost"))

    pipeline = Pipeline("p", [Step("work", work, retries=2, backoff_s=0.0)])
    runner = PipelineRunner(database, [pipeline], owner="hub-1", lease_s=0.6)
    run_id = runner.start("p")
    sa.event.listen(database.engine, "before_cursor_execute", lost_database)
    try:
        assert runner.execute(run_id)
    finally:
        failed.set()
        sa.event.remove(database.engine, "before_cursor_execute", lost_database)
    view = runner.get(run_id)
    step = view.step("work")
    assert (view.status, view.lease_owner) == ("failed", None)
    assert (view.error or "").startswith("step work: runner error: DatabaseError: ")
    assert (view.error or "").endswith("connection lost")
    assert (step.status, step.attempts, step.error) == ("failed", 1, view.error)  # no retry


def test_resume_goes_on_past_a_run_it_cannot_execute(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path / "journal.txt")
    doomed: list[str] = []

    def clean_up(context: StepContext) -> None:
        journal.add("clean up")
        with database.session() as session:  # another run vanishes meanwhile
            session.execute(
                sa.delete(PipelineStepRecord).where(col(PipelineStepRecord.run_id) == doomed[0])
            )
            session.execute(
                sa.delete(PipelineRunRecord).where(col(PipelineRunRecord.id) == doomed[0])
            )

    def work(context: StepContext) -> None:
        journal.add(f"work {context.run_id}")

    clock = Later(timedelta(0))
    runner = PipelineRunner(
        database,
        [Pipeline("clean", [Step("clean", clean_up)]), Pipeline("work", [Step("work", work)])],
        clock=clock,
    )
    first = runner.start("clean")
    clock.offset = timedelta(seconds=1)
    doomed.append(runner.start("work"))
    clock.offset = timedelta(seconds=2)
    last = runner.start("work")
    clock.offset = timedelta(seconds=3)

    with caplog.at_level(logging.ERROR, logger="edgeops.pipelines.runner"):
        assert runner.resume() == [first, last]
    assert journal.lines() == ["clean up", f"work {last}"]
    assert runner.get(last).status == "succeeded"
    assert any(doomed[0] in r.getMessage() and "not found" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# -- continuous training end to end -----------------------------------------------------------


def _device_state(device_id: str, champion: str) -> StateReport:
    return StateReport(
        device_id=device_id,
        agent_version="0.1.0",
        hardware={"arch": "x86_64"},
        slots={
            "active": "a",
            "a": {"target": "digits-mlp-int8/1/litert/model.tflite", "model_id": champion},
            "champion": {"model_id": champion, "runtime": "litert"},
        },
        free_memory_bytes=1024**3,
        ts=1_700_000_000.0,
    )


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    from edgeops.cli.main import main

    code = main(argv)
    captured = capsys.readouterr()
    try:
        document = json.loads(captured.out) if captured.out.strip() else None
    except ValueError:
        document = captured.out
    return code, document


def test_continuous_training_end_to_end(
    isolated_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeops.compress import CompressService
    from edgeops.config import load_settings
    from edgeops.fleet import FleetService
    from edgeops.hub.stores import open_stores
    from edgeops.monitor import TelemetryService
    from edgeops.rollout import RolloutEngine
    from edgeops.train import TrainService
    from edgeops.trust import repository_for

    settings = load_settings(None)
    repository = repository_for(settings)
    repository.init(isolated_environment / "offline-root-keys")
    with open_stores(settings.database, settings.artifacts_dir) as stores:
        datasets, registry = stores.datasets(), stores.registry()
        datasets.register_builtin("digits")
        keras = TrainService(datasets, registry).train(
            "digits", "mlp", epochs=2, seed=0, progress=False, evaluate_on_runtime=False
        )
        champion = CompressService(datasets, registry).compress(
            keras.id, quantize="int8", progress=False
        )
        registry.promote(champion.id, "staging")
        registry.promote(champion.id, "production")
        # two devices run the champion and sent raw samples (the digits test split)
        arrays = datasets.load("digits")
        fleet, telemetry = FleetService(stores.database), TelemetryService(stores.database)
        for index, device_id in enumerate(("dev-a", "dev-b")):
            fleet.record_state(_device_state(device_id, champion.id))
            for seq in range(1, 4):
                start = (index * 3 + seq - 1) * 40
                samples = arrays.x_test[start : start + 40]
                telemetry.record(
                    TelemetryWindow(device_id, champion.id, seq=seq, start_ts=float(seq),
                                    end_ts=seq + 1.0, samples=len(samples),
                                    raw_samples=[[float(v) for v in row] for row in samples])
                )  # fmt: skip
        fleet.record_state(_device_state("dev-other", "m-000000000000"))  # another model

    # a challenger that must win by 100 pp cannot: registered, decision recorded, no release
    code, refused = _main(
        ["pipelines", "run", "ct", "--model", champion.name, "--margin", "1.0", "--json"], capsys
    )
    assert code == 0, refused
    assert refused["status"] == "succeeded"
    steps = {step["name"]: step for step in refused["steps"]}
    assert all(step["status"] == "succeeded" for step in steps.values())
    collected = steps["collect"]["outputs"]
    assert collected["champion"] == champion.id
    assert (collected["samples"], collected["windows"]) == (240, 6)
    assert collected["devices"] == ["dev-a", "dev-b"]
    labelled = steps["label"]["outputs"]
    assert (labelled["labelled"], labelled["train"], labelled["holdout"]) == (240, 120, 120)
    assert labelled["labeler"]["kind"] == "oracle"
    retrained = steps["retrain"]["outputs"]
    # the reference's training and validation splits plus the new training samples
    assert retrained["dataset_samples"] == len(arrays.x_train) + len(arrays.x_val) + 120
    challenger_id = steps["compress"]["outputs"]["challenger"]
    scores = steps["evaluate"]["outputs"]
    assert scores["samples"] == 120 and 0.0 <= scores["challenger_score"] <= 1.0
    decision = steps["decide"]["outputs"]
    assert decision["promote"] is False and "below the margin of +100.00 pp" in decision["reason"]
    assert steps["release"]["outputs"] == {"released": False, "reason": decision["reason"]}
    assert steps["rollout"]["outputs"]["rollout"] is None

    # the challenger is a new version of the champion's name, descended from the new training
    with open_stores(settings.database, settings.artifacts_dir) as stores:
        registry = stores.registry()
        challenger = registry.get_model(challenger_id)
        assert challenger.name == champion.name and challenger.seq == champion.seq + 1
        assert challenger.stage == "candidate"
        assert (
            registry.get_model(challenger.parent_id or "").dataset_version == retrained["dataset"]
        )
        assert registry.get_model(retrained["keras_model"]).name == keras.name

    # a margin any challenger meets: promoted, released, canary rollout created
    code, accepted = _main(
        ["pipelines", "run", "ct", "--model", champion.name, "--margin", "-1",
         "--promote-wait", "0", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, accepted
    steps = {step["name"]: step for step in accepted["steps"]}
    assert steps["retrain"]["outputs"]["reused"] is True  # same data, same seeded settings
    assert steps["compress"]["outputs"]["challenger"] == challenger_id
    assert steps["decide"]["outputs"]["promote"] is True
    assert steps["decide"]["outputs"]["challenger_stage"] == "staging"
    released = steps["release"]["outputs"]
    assert released["released"] is True
    assert released["target"] == f"{champion.name}/{champion.seq + 1}/litert/model.tflite"
    assert repository.get_target(released["target"]).length == released["length"]
    rollout = steps["rollout"]["outputs"]
    with open_stores(settings.database, settings.artifacts_dir) as stores:
        status = RolloutEngine(stores.database, None, repository=repository).status(
            rollout["rollout"]
        )
    assert status["status"] == "running"
    assert rollout["spec"]["selection"]["current_model"] == champion.id
    assert rollout["spec"]["waves"]["canary"]["count"] == 1
    assert rollout["spec"]["gates"]["divergence"] == {"metric": "psi", "max": 0.25}
    # nothing carries the rollout out here: the challenger is not promoted, and it says why
    promoted = steps["promote"]["outputs"]
    assert promoted["promoted"] is False and "promote the challenger by hand" in promoted["reason"]

    # the CLI shows what happened
    code, listed = _main(["pipelines", "list", "--json"], capsys)
    assert code == 0 and [run["id"] for run in listed] == [accepted["id"], refused["id"]]
    code, shown = _main(["pipelines", "show", refused["id"], "--json"], capsys)
    assert code == 0 and shown == refused
    code, text = _main(["pipelines", "show", accepted["id"]], capsys)
    assert code == 0 and "rollout" in text and "succeeded" in text
    code, resumed = _main(["pipelines", "resume", "--json"], capsys)
    assert code == 0 and resumed == []


def test_ct_refuses_a_model_without_champion(
    isolated_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _main(["pipelines", "run", "ct", "--model", "nothing-here"], capsys)
    assert code == 1
    code, listed = _main(["pipelines", "list", "--json"], capsys)
    assert code == 0 and listed[0]["status"] == "failed"
    assert "no champion" in listed[0]["steps"][0]["error"]
    code, _ = _main(["pipelines", "show", "p-000000000000"], capsys)
    assert code == 1


# -- labelling sources ------------------------------------------------------------------------


def test_a_labelled_file_labels_the_samples_it_holds(tmp_path: Path) -> None:
    from edgeops.pipelines import LabelingError, LabelledFileLabeler, labeler_from_params

    rng = np.random.default_rng(0)
    known = rng.integers(0, 17, size=(30, 64)).astype(np.float32)
    labels = np.array([i % 3 for i in range(30)], dtype=np.int64)
    path = tmp_path / "labelled.npz"
    np.savez(path, x=known, y=labels)
    labeler = LabelledFileLabeler(path)
    unknown = known[0] + 5.0
    found = labeler.label(np.stack([known[4], unknown, known[29] + 1e-6]))
    assert found == ["1", None, "2"]
    again = labeler_from_params(labeler.describe(), datasets=None)  # type: ignore[arg-type]
    assert again.label(known[:3]) == ["0", "1", "2"]
    with pytest.raises(LabelingError, match="10 values each, the labelled ones 64"):
        labeler.label(np.zeros((1, 10)))
    (tmp_path / "broken.csv").write_text("a,b\n1,2\n")
    from edgeops.data import LabelColumnError

    with pytest.raises(LabelColumnError, match="'label'"):
        LabelledFileLabeler(tmp_path / "broken.csv", label_column="label")
