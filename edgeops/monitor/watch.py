"""The drift watch: every release's field telemetry against its reference, per cohort, stored.

    watch = DriftService(database, RepositoryReleases(repository), retrainer=start_ct)
    watch.set_policy("digits-mlp", action="retrain", cohort_tag="site", window_s=300)
    watch.evaluate()          # one evaluation per release and cohort seen in its window
    watch.status()            # the newest evaluation of each release and cohort
    watch.events()            # the drift events (onsets), newest first

**What is compared.** For each model id that sent telemetry within the evaluation window
(``window_s`` of the model's policy, by the card's model name; 600 s without one), the
windows the hub *received* in ``(now - window_s, now]`` are split into cohorts by one device
tag (the policy's ``cohort_tag``: the operator's tags from enrollment, then the hardware
tags; devices without it form the cohort ``<tag>=(none)``; no tag: one cohort ``*``),
summed (:func:`edgeops.monitor.drift.aggregate_windows`) and tested against the release
card's reference (:func:`edgeops.monitor.drift.detect_drift` with the policy's
:class:`~edgeops.monitor.drift.DriftConfig`). Windows of a model id that no release in the
repository has are not evaluated (ingest refuses them anyway).

**Events.** Every evaluation is stored (``drift_evaluations``; those that are not events
are deleted after ``retention_s``, a week by default). The first ``drift`` verdict of
a release and cohort after a ``no_drift`` one (or after none) is an *onset*, a drift event;
``insufficient`` evaluations neither start nor end an episode. The policy's action runs on an
onset only, so a lasting drift fires it once:

* ``none``: recorded, shown by ``edgeops drift status``;
* ``notify``: the event is POSTed as JSON to the policy's webhook (5 s timeout); the HTTP
  status, or the error, is stored with the event -- a failing webhook never stops the watch;
* ``retrain``: the hub's continuous-training starter (``retrainer``) is called with the event
  and what it returns (the pipeline run's id) is stored; without one, the event records why
  nothing started.

The evaluation row is committed, its action marked pending, before the action runs (an
action is never taken for an event that is not stored), and the action's result is written
to it afterwards. An action still pending a minute later was interrupted (the hub stopped)
and the next evaluation runs it: actions run at least once. Evaluators in several hub
processes decide the onsets of one release and cohort one at a time
(:func:`edgeops.db.locks.lock_key`), so an episode has one event.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import col, select

from edgeops.db import Database
from edgeops.db.locks import lock_key
from edgeops.db.types import utcnow
from edgeops.errors import ConfigError, EdgeOpsError, NotFoundError
from edgeops.fleet.models import Device
from edgeops.monitor.drift import (
    DriftConfig,
    DriftError,
    WindowAggregate,
    aggregate_windows,
    detect_drift,
)
from edgeops.monitor.models import (
    ACTION_MAX_LENGTH,
    COHORT_MAX_LENGTH,
    MODEL_NAME_MAX_LENGTH,
    TAG_KEY_MAX_LENGTH,
    URL_MAX_LENGTH,
    DriftEvaluationRecord,
    DriftEvaluationView,
    DriftPolicyRecord,
    DriftPolicyView,
    TelemetryWindowRecord,
)

if TYPE_CHECKING:
    from edgeops.trust import TrustRepository

__all__ = [
    "ACTIONS",
    "ALL_DEVICES",
    "DEFAULT_WINDOW_S",
    "DriftPolicyError",
    "DriftService",
    "ReleaseInfo",
    "RepositoryReleases",
    "Retrainer",
    "post_webhook",
]

log = logging.getLogger(__name__)

ACTIONS = ("none", "notify", "retrain")
ALL_DEVICES = "*"
DEFAULT_WINDOW_S = 600.0
MAX_WINDOW_S = 7 * 24 * 3600.0
WEBHOOK_TIMEOUT_S = 5.0
ACTION_GRACE_S = 60.0  # a pending action older than this was interrupted
DEFAULT_RETENTION_S = 7 * 24 * 3600.0  # evaluations kept; drift events are kept for good

Clock = Callable[[], datetime]


class DriftPolicyError(ConfigError):
    """A drift policy that cannot be stored; the message names the field."""


@dataclass(frozen=True)
class ReleaseInfo:
    """What the watch needs of a release: its model's name and the card's reference."""

    model_id: str
    name: str | None
    reference: Mapping[str, Any]


ReleaseLookup = Callable[[str], ReleaseInfo | None]
"""Model id -> its release, or None if no release has it."""

Notifier = Callable[[str, Mapping[str, Any]], dict[str, Any]]
"""(webhook URL, event document) -> what happened, stored with the event."""

Retrainer = Callable[[DriftEvaluationView], Mapping[str, Any]]
"""Starts continuous training for a drift event; returns what to store (a run id ...)."""


class RepositoryReleases:
    """Releases from the hub's TUF repository, through the cached
    :class:`~edgeops.monitor.ingest.ReleaseCatalogue` (re-read every 30 s, and at once when
    a model id it does not know is asked for, so a release made a moment ago is found)."""

    def __init__(self, repository: TrustRepository) -> None:
        from edgeops.monitor.ingest import ReleaseCatalogue

        self.catalogue = ReleaseCatalogue(repository)

    def __call__(self, model_id: str) -> ReleaseInfo | None:
        card = self.catalogue.card(model_id)
        if card is None:
            return None
        name, reference = card.get("name"), card.get("reference")
        return ReleaseInfo(
            model_id=model_id,
            name=name if isinstance(name, str) and name else None,
            reference=reference if isinstance(reference, Mapping) else {},
        )


def post_webhook(url: str, document: Mapping[str, Any]) -> dict[str, Any]:
    """POST ``document`` as JSON; returns ``{"status": code}`` or ``{"error": text}``."""
    body = json.dumps(document, sort_keys=True, default=str).encode()
    request = urllib.request.Request(  # noqa: S310 - set_policy allows http(s) only
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "edgeops-drift-watch"},
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:  # noqa: S310 - scheme checked
            return {"status": int(response.status)}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "error": f"HTTP {exc.code} {exc.reason}"}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return {"error": f"webhook {url} not reached: {reason}"}


class DriftService:
    """Evaluates drift, stores evaluations and policies, runs the actions (module docstring)."""

    def __init__(
        self,
        db: Database,
        releases: ReleaseLookup,
        *,
        clock: Clock = utcnow,
        notifier: Notifier = post_webhook,
        retrainer: Retrainer | None = None,
        retention_s: float = DEFAULT_RETENTION_S,
    ) -> None:
        self._db = db
        self._releases = releases
        self._clock = clock
        self._notifier = notifier
        self.retrainer = retrainer
        self.retention_s = retention_s

    # -- policies --------------------------------------------------------------------------

    def set_policy(
        self,
        model_name: str,
        *,
        action: str = "none",
        webhook_url: str | None = None,
        cohort_tag: str | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        config: Mapping[str, Any] | None = None,
        retrain: Mapping[str, Any] | None = None,
    ) -> DriftPolicyView:
        """Create or replace the policy of ``model_name``; DriftPolicyError names a bad field.

        ``retrain``: the continuous-training parameters the ``retrain`` action starts runs
        with (:class:`edgeops.pipelines.ct.CTParams` without ``model`` and ``since``, which
        the event gives); when given it must name the labelling source, and the hub's
        continuous-training starter needs it (``edgeops drift policy set`` asks for it).
        """
        record = DriftPolicyRecord(
            model_name=_model_name(model_name),
            action=_action(action),
            webhook_url=_webhook(webhook_url, action),
            cohort_tag=_cohort_tag(cohort_tag),
            window_s=_window(window_s),
            config=_config(config or {}).to_dict(),
            retrain=_retrain(model_name, retrain, action),
            updated_at=self._clock(),
        )
        with self._db.session() as session:
            session.merge(record)
        return self.get_policy(model_name)

    def get_policy(self, model_name: str) -> DriftPolicyView:
        """The stored policy, or the default one (not stored) for a model without one."""
        with self._db.session() as session:
            record = session.get(DriftPolicyRecord, model_name)
            if record is not None:
                return DriftPolicyView.from_record(record)
        return DriftPolicyView(
            model_name=model_name,
            config=DriftConfig().to_dict(),
            updated_at=self._clock(),
        )

    def list_policies(self) -> list[DriftPolicyView]:
        with self._db.session() as session:
            records = session.exec(
                select(DriftPolicyRecord).order_by(col(DriftPolicyRecord.model_name))
            ).all()
            return [DriftPolicyView.from_record(r) for r in records]

    def delete_policy(self, model_name: str) -> None:
        with self._db.session() as session:
            record = session.get(DriftPolicyRecord, model_name)
            if record is None:
                raise NotFoundError(f"no drift policy for model {model_name!r}")
            session.delete(record)

    # -- evaluating ------------------------------------------------------------------------

    def evaluate(self, model_ids: Iterable[str] | None = None) -> list[DriftEvaluationView]:
        """Evaluate every release (or the given model ids) that sent telemetry within its
        window; store and return the evaluations, running the action of each onset."""
        now = self._clock()
        policies = {p.model_name: p for p in self.list_policies()}
        self._run_interrupted_actions(now, policies)
        self._forget(now)
        longest = max([DEFAULT_WINDOW_S, *(p.window_s for p in policies.values())])
        if model_ids is None:
            model_ids = self._recent_models(now - timedelta(seconds=longest))
        evaluations: list[DriftEvaluationView] = []
        for model_id in sorted(set(model_ids)):
            release = self._releases(model_id)
            if release is None:
                log.debug("model %s has no release; its telemetry is not evaluated", model_id)
                continue
            policy = policies.get(release.name or "") or self.get_policy(release.name or "")
            evaluations.extend(self._evaluate_release(release, policy, now))
        return evaluations

    def _recent_models(self, since: datetime) -> list[str]:
        query = (
            select(TelemetryWindowRecord.model_id)
            .where(col(TelemetryWindowRecord.received_at) > since)
            .distinct()
        )
        with self._db.session() as session:
            return [str(m) for m in session.exec(query).all()]

    def _evaluate_release(
        self, release: ReleaseInfo, policy: DriftPolicyView, now: datetime
    ) -> list[DriftEvaluationView]:
        start = now - timedelta(seconds=policy.window_s)
        config = DriftConfig.from_dict(policy.config)
        with self._db.session() as session:
            rows = session.exec(
                select(TelemetryWindowRecord.device_id, TelemetryWindowRecord.window)
                .where(col(TelemetryWindowRecord.model_id) == release.model_id)
                .where(col(TelemetryWindowRecord.received_at) > start)
                .where(col(TelemetryWindowRecord.received_at) <= now)
                .order_by(col(TelemetryWindowRecord.device_id), col(TelemetryWindowRecord.seq))
            ).all()
            cohorts = self._cohorts(session, {str(d) for d, _ in rows}, policy.cohort_tag)
        grouped: dict[str, list[tuple[str, Mapping[str, Any]]]] = defaultdict(list)
        for device_id, window in rows:
            grouped[cohorts.get(str(device_id), ALL_DEVICES)].append((str(device_id), window))
        results = []
        for cohort, members in sorted(grouped.items()):
            try:
                aggregate = aggregate_windows(window for _, window in members)
                report = detect_drift(aggregate, release.reference, config).to_dict()
                verdict = str(report["verdict"])
                samples = aggregate.samples
            except DriftError as exc:
                log.warning("model %s, cohort %s: not evaluated: %s", release.model_id, cohort, exc)
                report = {"verdict": "insufficient", "notes": [f"not evaluated: {exc}"]}
                verdict = "insufficient"
                samples = sum(int(w.get("samples", 0) or 0) for _, w in members)
            record = DriftEvaluationRecord(
                model_id=release.model_id,
                model_name=release.name,
                cohort=cohort[:COHORT_MAX_LENGTH],
                evaluated_at=now,
                window_start=start,
                window_end=now,
                devices=len({d for d, _ in members}),
                windows=len(members),
                samples=samples,
                verdict=verdict,
                report=report,
            )
            results.append(self._store(record, policy))
        return results

    @staticmethod
    def _cohorts(session: Any, device_ids: set[str], tag: str | None) -> dict[str, str]:
        if tag is None or not device_ids:
            return {}
        cohorts = {device_id: f"{tag}=(none)" for device_id in device_ids}
        found = session.exec(
            select(Device.device_id, Device.tags, Device.hardware).where(
                col(Device.device_id).in_(sorted(device_ids))
            )
        ).all()
        for device_id, tags, hardware in found:
            value = (tags or {}).get(tag, (hardware or {}).get(tag))
            if value is not None:
                cohorts[str(device_id)] = f"{tag}={value}"
        return cohorts

    def _store(self, record: DriftEvaluationRecord, policy: DriftPolicyView) -> DriftEvaluationView:
        with self._db.session() as session:
            # evaluators in other processes decide onsets of the same release and cohort
            # one after the other, each reading what the one before wrote
            lock_key(
                session, f"edgeops.drift:{record.model_id}:{record.cohort}", DriftEvaluationRecord
            )
            if record.verdict == "drift":
                previous = session.exec(
                    select(DriftEvaluationRecord.verdict)
                    .where(col(DriftEvaluationRecord.model_id) == record.model_id)
                    .where(col(DriftEvaluationRecord.cohort) == record.cohort)
                    .where(col(DriftEvaluationRecord.verdict).in_(("drift", "no_drift")))
                    .order_by(col(DriftEvaluationRecord.id).desc())
                    .limit(1)
                ).first()
                record.onset = previous != "drift"
            if record.onset and policy.action != "none":
                record.action = policy.action
                record.action_result = {"status": "pending"}
            session.add(record)
            session.flush()
            view = DriftEvaluationView.from_record(record)
        if view.onset:
            log.warning(
                "drift: model %s, cohort %s (%d samples from %d devices): %s",
                view.model_id,
                view.cohort,
                view.samples,
                view.devices,
                ", ".join(
                    view.report.get("drifted_outputs", []) + view.report.get("drifted_features", [])
                )
                or "psi rule",
            )
            if view.action is not None:
                view = self._act(view, policy)
        return view

    def _forget(self, now: datetime) -> int:
        """Delete evaluations older than ``retention_s`` that are not drift events (an
        evaluation's report is a few KB; one a minute per release and cohort adds up)."""
        cutoff = now - timedelta(seconds=self.retention_s)
        with self._db.session() as session:
            result = session.exec(
                sa.delete(DriftEvaluationRecord)
                .where(col(DriftEvaluationRecord.evaluated_at) < cutoff)
                .where(sa.not_(col(DriftEvaluationRecord.onset)))
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)

    def _run_interrupted_actions(
        self, now: datetime, policies: Mapping[str, DriftPolicyView]
    ) -> None:
        """Actions stored as pending whose process stopped before they ran (for at least
        :data:`ACTION_GRACE_S`) run now: an action runs at least once."""
        since = now - timedelta(seconds=MAX_WINDOW_S)
        with self._db.session() as session:
            rows = session.exec(
                select(DriftEvaluationRecord)
                .where(col(DriftEvaluationRecord.onset))
                .where(col(DriftEvaluationRecord.action).is_not(None))
                .where(col(DriftEvaluationRecord.evaluated_at) > since)
                .where(
                    col(DriftEvaluationRecord.evaluated_at)
                    < now - timedelta(seconds=ACTION_GRACE_S)
                )
            ).all()
            pending = [
                DriftEvaluationView.from_record(r)
                for r in rows
                if r.action_result.get("status") == "pending"
            ]
        for event in pending:
            policy = policies.get(event.model_name or "")
            if policy is None or policy.action != event.action:
                self._record_result(event, {"error": "not run: the policy changed meanwhile"})
                continue
            log.warning("drift action %s of event %d was interrupted; running it", event.action,
                        event.id)  # fmt: skip
            self._act(event, policy)

    def _act(self, event: DriftEvaluationView, policy: DriftPolicyView) -> DriftEvaluationView:
        result: dict[str, Any]
        if policy.action == "notify":
            assert policy.webhook_url is not None  # set_policy requires it
            result = self._notifier(policy.webhook_url, {"type": "drift", **event.to_dict()})
        elif self.retrainer is None:
            result = {"error": "no continuous-training pipeline is configured on this hub"}
        else:
            try:
                result = dict(self.retrainer(event))
            except Exception as exc:  # recorded with the event; the watch goes on
                log.exception("drift action retrain for model %s failed", event.model_id)
                result = {"error": f"continuous training not started: {exc}"}
        if "error" in result:
            log.error("drift action %s for model %s: %s", policy.action, event.model_id, result)
        return self._record_result(event, result)

    def _record_result(
        self, event: DriftEvaluationView, result: dict[str, Any]
    ) -> DriftEvaluationView:
        with self._db.session() as session:
            record = session.get(DriftEvaluationRecord, event.id)
            assert record is not None
            record.action_result = result
            session.add(record)
            session.flush()
            return DriftEvaluationView.from_record(record)

    def drift_since(self, event: DriftEvaluationView) -> datetime:
        """When the drift of ``event`` began, at the latest: the newest ``no_drift``
        evaluation of its release and cohort before it, else its window's start."""
        with self._db.session() as session:
            last_clear = session.exec(
                select(DriftEvaluationRecord.evaluated_at)
                .where(col(DriftEvaluationRecord.model_id) == event.model_id)
                .where(col(DriftEvaluationRecord.cohort) == event.cohort)
                .where(col(DriftEvaluationRecord.verdict) == "no_drift")
                .where(col(DriftEvaluationRecord.id) < event.id)
                .order_by(col(DriftEvaluationRecord.id).desc())
                .limit(1)
            ).first()
        return max(last_clear, event.window_start) if last_clear else event.window_start

    # -- reading ---------------------------------------------------------------------------

    def release(self, model_id: str) -> ReleaseInfo | None:
        """The release of ``model_id`` the watch compares with (its card's reference)."""
        return self._releases(model_id)

    def live(self, evaluation: DriftEvaluationView) -> WindowAggregate | None:
        """The telemetry ``evaluation`` compared, summed again: its model's windows received
        in its window, of the devices in its cohort today (None: no such window is left)."""
        tag = None if evaluation.cohort == ALL_DEVICES else evaluation.cohort.split("=", 1)[0]
        with self._db.session() as session:
            rows = session.exec(
                select(TelemetryWindowRecord.device_id, TelemetryWindowRecord.window)
                .where(col(TelemetryWindowRecord.model_id) == evaluation.model_id)
                .where(col(TelemetryWindowRecord.received_at) > evaluation.window_start)
                .where(col(TelemetryWindowRecord.received_at) <= evaluation.window_end)
                .order_by(col(TelemetryWindowRecord.device_id), col(TelemetryWindowRecord.seq))
            ).all()
            cohorts = self._cohorts(session, {str(d) for d, _ in rows}, tag)
        windows = [
            window
            for device_id, window in rows
            if cohorts.get(str(device_id), ALL_DEVICES) == evaluation.cohort
        ]
        try:
            return aggregate_windows(windows) if windows else None
        except DriftError:
            return None

    def status(self, model_id: str | None = None) -> list[DriftEvaluationView]:
        """The newest evaluation of each release and cohort (of ``model_id`` only if given)."""
        newest = (
            select(sa.func.max(DriftEvaluationRecord.id))
            .group_by(col(DriftEvaluationRecord.model_id), col(DriftEvaluationRecord.cohort))
            .scalar_subquery()
        )
        query = select(DriftEvaluationRecord).where(col(DriftEvaluationRecord.id).in_(newest))
        if model_id is not None:
            query = query.where(col(DriftEvaluationRecord.model_id) == model_id)
        query = query.order_by(
            col(DriftEvaluationRecord.model_id), col(DriftEvaluationRecord.cohort)
        )
        with self._db.session() as session:
            return [DriftEvaluationView.from_record(r) for r in session.exec(query).all()]

    def event_counts(self) -> dict[str, int]:
        """How many drift events (onsets) each model id has had: one grouped count."""
        query = (
            select(col(DriftEvaluationRecord.model_id), sa.func.count())
            .where(col(DriftEvaluationRecord.onset))
            .group_by(col(DriftEvaluationRecord.model_id))
        )
        with self._db.session() as session:
            return {model_id: int(count) for model_id, count in session.exec(query).all()}

    def drifting_models(self) -> list[str]:
        """The model ids whose newest evaluation, in at least one cohort, says ``drift``."""
        newest = (
            select(sa.func.max(DriftEvaluationRecord.id))
            .group_by(col(DriftEvaluationRecord.model_id), col(DriftEvaluationRecord.cohort))
            .scalar_subquery()
        )
        query = (
            select(col(DriftEvaluationRecord.model_id))
            .where(col(DriftEvaluationRecord.id).in_(newest))
            .where(col(DriftEvaluationRecord.verdict) == "drift")
            .distinct()
            .order_by(col(DriftEvaluationRecord.model_id))
        )
        with self._db.session() as session:
            return [str(model_id) for model_id in session.exec(query).all()]

    def events(self, model_id: str | None = None, limit: int = 50) -> list[DriftEvaluationView]:
        """Drift events (onsets), newest first."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        query = select(DriftEvaluationRecord).where(col(DriftEvaluationRecord.onset))
        if model_id is not None:
            query = query.where(col(DriftEvaluationRecord.model_id) == model_id)
        query = query.order_by(col(DriftEvaluationRecord.id).desc()).limit(limit)
        with self._db.session() as session:
            return [DriftEvaluationView.from_record(r) for r in session.exec(query).all()]


# -- validation --------------------------------------------------------------------------------


def _model_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MODEL_NAME_MAX_LENGTH:
        raise DriftPolicyError(
            f"model_name: must be a model name of 1 to {MODEL_NAME_MAX_LENGTH} characters, "
            f"got {name!r}"
        )
    return name


def _action(action: str) -> str:
    if action not in ACTIONS or len(action) > ACTION_MAX_LENGTH:
        raise DriftPolicyError(f"action: must be one of {', '.join(ACTIONS)}, got {action!r}")
    return action


def _webhook(url: str | None, action: str) -> str | None:
    if url is None:
        if action == "notify":
            raise DriftPolicyError("webhook_url: the notify action needs a webhook URL")
        return None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or len(url) > URL_MAX_LENGTH:
        raise DriftPolicyError(f"webhook_url: must be an http:// or https:// URL, got {url!r}")
    return url


def _cohort_tag(tag: str | None) -> str | None:
    if tag is None:
        return None
    if not tag or len(tag) > TAG_KEY_MAX_LENGTH or "=" in tag:
        raise DriftPolicyError(
            f"cohort_tag: must be a tag name of 1 to {TAG_KEY_MAX_LENGTH} characters "
            f"without '=', got {tag!r}"
        )
    return tag


def _window(window_s: float) -> float:
    if isinstance(window_s, bool) or not isinstance(window_s, int | float):
        raise DriftPolicyError(f"window_s: must be a number of seconds, got {window_s!r}")
    if not 1.0 <= float(window_s) <= MAX_WINDOW_S:
        raise DriftPolicyError(
            f"window_s: must be between 1 and {MAX_WINDOW_S:.0f} seconds, got {window_s}"
        )
    return float(window_s)


def _retrain(model_name: str, retrain: Mapping[str, Any] | None, action: str) -> dict[str, Any]:
    if retrain is None:
        return {}
    if not isinstance(retrain, Mapping):
        raise DriftPolicyError("retrain: must be an object of continuous-training parameters")
    given = sorted(set(retrain) & {"model", "since"})
    if given:
        raise DriftPolicyError(
            f"retrain: {', '.join(given)} come from the drift event, not the policy"
        )
    from edgeops.pipelines.ct import CTParams

    try:
        CTParams.from_dict({**retrain, "model": model_name})
    except EdgeOpsError as exc:
        raise DriftPolicyError(f"retrain: {exc}") from None
    return dict(retrain)


def _config(config: Mapping[str, Any]) -> DriftConfig:
    try:
        return DriftConfig.from_dict(config)
    except DriftError as exc:
        raise DriftPolicyError(f"config: {exc}") from None
