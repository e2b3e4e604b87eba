"""The drift watch: stored telemetry per release and cohort against the release's reference,
on SQLite and PostgreSQL; events, policies and their actions (a real HTTP webhook)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from device_agent.protocol import StateReport
from device_agent.sketch import ReferenceStats
from device_agent.telemetry import TelemetryWindow
from edgeops.db import Database
from edgeops.monitor import TelemetryService
from edgeops.monitor.models import DriftEvaluationView
from edgeops.monitor.watch import DriftPolicyError, DriftService, ReleaseInfo
from tests.fixtures.clock import Clock

FEATURES = 3
CLASSES = 4


def _reference(rng: np.random.Generator) -> ReferenceStats:
    x = rng.normal(size=(4000, FEATURES))
    probabilities = rng.dirichlet(np.ones(CLASSES) * 2, size=4000)
    return ReferenceStats.from_features(x, bins=8).with_outputs(probabilities)


class Fleet:
    """Devices sending windows of model ``m-ok`` drawn like the reference, or shifted."""

    def __init__(self, database: Database, clock: Clock) -> None:
        self.rng = np.random.default_rng(7)
        self.reference = _reference(self.rng)
        self.telemetry = TelemetryService(database, clock=clock)
        self.database = database
        self.seq: dict[str, int] = {}

    def tag(self, device_id: str, **tags: str) -> None:
        from edgeops.fleet import FleetService

        FleetService(self.database).record_state(
            StateReport(device_id=device_id, agent_version="0.1.0", hardware=dict(tags), ts=1.0)
        )

    def send(self, device_id: str, samples: int = 200, shift: float = 0.0) -> None:
        x = self.rng.normal(loc=shift, size=(samples, FEATURES))
        probabilities = self.rng.dirichlet(np.ones(CLASSES) * 2, size=samples)
        if shift:
            probabilities[:, 0] += 2.0  # the model now favours class 0
            probabilities /= probabilities.sum(axis=1, keepdims=True)
        labels = probabilities.argmax(axis=1)
        confidence = probabilities.max(axis=1)
        edges = self.reference.confidence_edges or []
        seq = self.seq[device_id] = self.seq.get(device_id, 0) + 1
        window = TelemetryWindow(
            device_id,
            "m-ok",
            seq=seq,
            start_ts=float(seq),
            end_ts=float(seq) + 1,
            samples=samples,
            feature_counts=self.reference.count_features(x),
            class_counts=np.bincount(labels, minlength=CLASSES).tolist(),
            confidence_counts=np.bincount(
                np.searchsorted(edges, confidence, side="right"), minlength=len(edges) + 1
            ).tolist(),
        )
        assert self.telemetry.record(window)

    def releases(self, model_id: str) -> ReleaseInfo | None:
        if model_id != "m-ok":
            return None
        return ReleaseInfo("m-ok", "digits-mlp", self.reference.to_dict())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(database: Database, clock: Clock) -> Fleet:
    return Fleet(database, clock)


class Webhook:
    def __init__(self, status: int = 204) -> None:
        self.received: list[dict[str, Any]] = []
        received, code = self.received, status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(code)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def test_unshifted_telemetry_is_no_drift_and_a_shift_is_one_event_per_episode(
    database: Database, clock: Clock, fleet: Fleet, webhook: Webhook
) -> None:
    watch = DriftService(database, fleet.releases, clock=clock)
    watch.set_policy("digits-mlp", action="notify", webhook_url=webhook.url, window_s=60)
    for device in ("d-1", "d-2"):
        fleet.send(device)
    [first] = watch.evaluate()
    assert (first.verdict, first.cohort, first.devices, first.windows) == ("no_drift", "*", 2, 2)
    assert first.samples == 400 and not first.onset and first.action is None

    clock.advance(61)  # the unshifted windows leave the evaluation window
    for device in ("d-1", "d-2"):
        fleet.send(device, shift=1.5)
    [drift] = watch.evaluate()
    assert drift.verdict == "drift" and drift.onset
    assert drift.report["drifted_features"] and "classes" in drift.report["drifted_outputs"]
    assert drift.action == "notify" and drift.action_result == {"status": 204}
    [posted] = webhook.received
    assert posted["type"] == "drift" and posted["model_id"] == "m-ok" and posted["id"] == drift.id

    clock.advance(5)  # still drifting: evaluated again, no second event, no second call
    [again] = watch.evaluate()
    assert again.verdict == "drift" and not again.onset and again.action is None
    assert len(webhook.received) == 1
    assert [e.id for e in watch.events()] == [drift.id]
    [status] = watch.status()
    assert status.id == again.id


def test_cohorts_split_by_a_tag_and_only_the_shifted_one_drifts(
    database: Database, clock: Clock, fleet: Fleet
) -> None:
    watch = DriftService(database, fleet.releases, clock=clock)
    watch.set_policy("digits-mlp", cohort_tag="site", window_s=60)
    fleet.tag("d-a1", site="a")
    fleet.tag("d-a2", site="a")
    fleet.tag("d-b1", site="b")
    for device in ("d-a1", "d-a2"):
        fleet.send(device)
    fleet.send("d-b1", shift=2.0)
    fleet.send("d-untagged")
    results = {e.cohort: e for e in watch.evaluate()}
    assert set(results) == {"site=a", "site=b", "site=(none)"}
    assert results["site=a"].verdict == "no_drift" and results["site=a"].devices == 2
    assert results["site=b"].verdict == "drift" and results["site=b"].onset
    assert results["site=(none)"].verdict == "no_drift"
    assert [e.cohort for e in watch.events()] == ["site=b"]


def test_too_few_samples_is_insufficient_and_does_not_end_an_episode(
    database: Database, clock: Clock, fleet: Fleet
) -> None:
    watch = DriftService(database, fleet.releases, clock=clock)
    watch.set_policy("digits-mlp", window_s=10, config={"min_samples": 50})
    fleet.send("d-1", shift=2.0)
    [drift] = watch.evaluate()
    assert drift.onset
    clock.advance(11)
    fleet.send("d-1", samples=10, shift=2.0)
    [small] = watch.evaluate()
    assert small.verdict == "insufficient" and not small.onset
    clock.advance(11)
    fleet.send("d-1", shift=2.0)
    [still] = watch.evaluate()
    assert still.verdict == "drift" and not still.onset  # the same episode
    clock.advance(11)
    assert watch.evaluate() == []  # nothing received in the window: nothing evaluated


def test_windows_of_a_model_without_a_release_are_not_evaluated(
    database: Database, clock: Clock, fleet: Fleet
) -> None:
    telemetry = TelemetryService(database, clock=clock)
    telemetry.record(
        TelemetryWindow("d-1", "m-unknown", seq=1, start_ts=0.0, end_ts=1.0, samples=500)
    )
    watch = DriftService(database, fleet.releases, clock=clock)
    assert watch.evaluate() == []


def test_retrain_runs_the_starter_once_and_records_its_run_or_its_absence(
    database: Database, clock: Clock, fleet: Fleet
) -> None:
    started: list[DriftEvaluationView] = []

    def retrainer(event: DriftEvaluationView) -> dict[str, Any]:
        started.append(event)
        return {"pipeline_run": "run-1"}

    without = DriftService(database, fleet.releases, clock=clock)
    without.set_policy("digits-mlp", action="retrain", window_s=30)
    fleet.send("d-1", shift=2.0)
    [event] = without.evaluate()
    assert event.onset and "no continuous-training pipeline" in event.action_result["error"]

    clock.advance(31)
    fleet.send("d-1")
    [cleared] = without.evaluate()
    assert cleared.verdict == "no_drift"
    clock.advance(31)
    fleet.send("d-1", shift=2.0)
    watch = DriftService(database, fleet.releases, clock=clock, retrainer=retrainer)
    [second] = watch.evaluate()
    assert second.onset and second.action_result == {"pipeline_run": "run-1"}
    assert [e.id for e in started] == [second.id]
    assert [e.id for e in watch.events()] == [second.id, event.id]


def test_a_webhook_that_is_down_is_recorded_not_raised(
    database: Database, clock: Clock, fleet: Fleet
) -> None:
    hook = Webhook()
    url = hook.url
    hook.close()  # nothing listens there any more
    watch = DriftService(database, fleet.releases, clock=clock)
    watch.set_policy("digits-mlp", action="notify", webhook_url=url, window_s=60)
    fleet.send("d-1", shift=2.0)
    [event] = watch.evaluate()
    assert event.onset and "not reached" in event.action_result["error"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"action": "page"}, "action: must be one of none, notify, retrain"),
        ({"action": "notify"}, "webhook_url: the notify action needs a webhook URL"),
        ({"action": "notify", "webhook_url": "file:///etc/passwd"}, "webhook_url: must be an"),
        ({"cohort_tag": "a=b"}, "cohort_tag: must be a tag name"),
        ({"window_s": 0.5}, "window_s: must be between 1 and"),
        ({"config": {"alpha": 2.0}}, "config: "),
        ({"config": {"sigma": 1}}, "unknown field"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(
    database: Database, fields: dict[str, Any], message: str
) -> None:
    watch = DriftService(database, lambda model_id: None)
    with pytest.raises(DriftPolicyError, match=message):
        watch.set_policy("digits-mlp", **fields)
    assert watch.list_policies() == []


def test_policies_are_replaced_listed_and_defaulted(database: Database) -> None:
    watch = DriftService(database, lambda model_id: None)
    assert watch.get_policy("digits-mlp").action == "none"  # the default, not stored
    watch.set_policy("digits-mlp", action="retrain", config={"alpha": 0.001})
    policy = watch.set_policy("digits-mlp", action="none", cohort_tag="site")
    assert (policy.action, policy.cohort_tag, policy.config["alpha"]) == ("none", "site", 0.01)
    assert [p.model_name for p in watch.list_policies()] == ["digits-mlp"]


# -- the command line --------------------------------------------------------------------------


def test_the_cli_sets_policies_shows_status_and_events_and_refuses_a_bad_field(
    isolated_environment: Any,
) -> None:
    from edgeops.config import load_settings
    from tests.clitools import assert_one_line_error, run_cli

    clock = Clock()
    database = Database(load_settings().database)
    try:
        database.upgrade()
        bad = run_cli("edgeops", "drift", "policy", "set", "digits-mlp", "--action", "notify")
        assert bad.returncode == 2
        assert_one_line_error(bad, "webhook_url: the notify action needs a webhook URL")
        bad = run_cli("edgeops", "drift", "policy", "set", "digits-mlp", "--action", "retrain")
        assert_one_line_error(bad, "labeler: the retrain action needs --labeler")
        done = run_cli(
            "edgeops", "drift", "policy", "set", "digits-mlp", "--action", "retrain",
            "--cohort-tag", "site", "--window", "120", "--alpha", "0.001",
            "--labeler", "oracle:digits", "--margin", "0.02", "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["config"]["alpha"] == 0.001
        fleet = Fleet(database, clock)
        watch = DriftService(database, fleet.releases, clock=clock)
        [policy] = watch.list_policies()
        assert (policy.action, policy.cohort_tag, policy.window_s) == ("retrain", "site", 120.0)
        assert policy.retrain == {
            "labeler": {"kind": "oracle", "dataset": "digits"},
            "margin": 0.02,
        }
        # evaluations the hub stored are what status and events show
        fleet.send("d-1", shift=2.0)
        [event] = watch.evaluate()
    finally:
        database.dispose()
    status = json.loads(run_cli("edgeops", "drift", "status", "--json").stdout)
    [shown] = status["evaluations"]
    assert (shown["id"], shown["verdict"], shown["onset"]) == (event.id, "drift", True)
    assert shown["cohort"] == "site=(none)" and shown["action"] == "retrain"
    table = run_cli("edgeops", "drift", "events", env={"COLUMNS": "200"})
    assert table.returncode == 0 and "drift (onset)" in table.stdout
    assert "no continuous-training pipeline" in table.stdout
    gone = run_cli("edgeops", "drift", "policy", "delete", "other-model")
    assert_one_line_error(gone, "no drift policy for model 'other-model'")


def test_the_hubs_retrain_action_starts_a_ct_run_with_the_policys_parameters(
    database: Database, clock: Clock, fleet: Fleet, tmp_path: Any
) -> None:
    """``edgeops hub serve`` wires the retrain action to the CT pipeline: the run is
    recorded with the event's model and window, and executes on its own (here it fails at
    once, naming the missing champion: no version of the model is in production)."""
    from edgeops.config import Settings
    from edgeops.hub.serve import _ct_starter, pipeline_runner

    runner = pipeline_runner(Settings(data_dir=tmp_path), database)
    watch = DriftService(database, fleet.releases, clock=clock)
    watch.retrainer = _ct_starter(runner, watch)
    with pytest.raises(DriftPolicyError, match="retrain: the labelling source must be given"):
        watch.set_policy("digits-mlp", action="retrain", retrain={"margin": 0.01})
    watch.set_policy(
        "digits-mlp",
        action="retrain",
        window_s=60,
        retrain={"labeler": {"kind": "oracle", "dataset": "digits"}, "margin": 0.01},
    )
    fleet.send("d-1", shift=2.0)
    [event] = watch.evaluate()
    run_id = event.action_result["pipeline_run"]
    run = runner.get(run_id)
    assert run.params["model"] == "digits-mlp" and run.params["margin"] == 0.01
    assert run.params["since"] == event.window_start.isoformat()
    deadline = time.monotonic() + 60
    while runner.get(run_id).status in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    failed = runner.get(run_id)
    assert failed.status == "failed" and "no champion" in (failed.error or "")


def test_an_action_interrupted_by_a_stop_runs_at_the_next_evaluation(
    database: Database, clock: Clock, fleet: Fleet, webhook: Webhook
) -> None:
    class Stopped(BaseException):
        """The hub process ends between storing the event and running its action."""

    def dies(url: str, document: Any) -> dict[str, Any]:
        raise Stopped

    watch = DriftService(database, fleet.releases, clock=clock, notifier=dies)
    watch.set_policy("digits-mlp", action="notify", webhook_url=webhook.url, window_s=60)
    fleet.send("d-1", shift=2.0)
    with pytest.raises(Stopped):
        watch.evaluate()
    [event] = watch.events()
    assert event.action_result == {"status": "pending"} and webhook.received == []

    restarted = DriftService(database, fleet.releases, clock=clock)
    clock.advance(30)  # not yet: it may still be running somewhere
    restarted.evaluate()
    assert webhook.received == []
    clock.advance(31)
    restarted.evaluate()
    [posted] = webhook.received
    assert posted["id"] == event.id
    [done] = restarted.events()
    assert done.action_result == {"status": 204}


def test_evaluations_older_than_the_retention_are_deleted_but_events_are_kept(
    database: Database, clock: Clock, fleet: Fleet
) -> None:
    watch = DriftService(database, fleet.releases, clock=clock, retention_s=3600)
    watch.set_policy("digits-mlp", window_s=60)
    fleet.send("d-1")
    [old] = watch.evaluate()
    clock.advance(61)
    fleet.send("d-1", shift=2.0)
    [event] = watch.evaluate()
    clock.advance(3600)
    fleet.send("d-1", shift=2.0)
    [new] = watch.evaluate()  # the first evaluation is now older than an hour
    assert (old.verdict, event.onset, new.onset) == ("no_drift", True, False)
    assert [e.id for e in watch.events()] == [event.id]
    [status] = watch.status()
    assert status.id == new.id
    with database.session() as session:
        from sqlmodel import select

        from edgeops.monitor.models import DriftEvaluationRecord

        ids = sorted(r.id for r in session.exec(select(DriftEvaluationRecord)).all())
    assert ids == [event.id, new.id]
