"""The live rollout engine: carries a rollout plan out, wave by wave, behind quality gates.

    engine = RolloutEngine(database, publisher, repository=repository)
    rollout_id = engine.create(spec)       # plans it; excluded devices stored with reasons
    while engine.tick():                    # idempotent; the hub calls it every second
        ...
    engine.status(rollout_id)              # waves, counts, gates (measured vs thresholds)
    engine.pause(rollout_id); engine.resume(rollout_id); engine.abort(rollout_id)

What :meth:`RolloutEngine.tick` does for every running rollout, each step one transaction:

1. **target** the current wave's devices that are due (the canary at once; an exponential
   wave at its rate, evenly: device *i* ``60 * i / rate`` seconds after the wave started, the
   first at once): remember each one's desired release, newest event seq and newest
   telemetry seq, then set ``desired.release`` through :class:`FleetService` and publish;
2. **follow** the targeted devices' ``update`` events newer than the remembered seq and
   naming the release's target: ``committed`` is success, ``failed`` / ``rolling_back`` /
   ``rolled_back`` failure (``rejected`` if the reason is a contract kind); no outcome
   within ``device_timeout_seconds`` is ``timed_out``;
3. **abort** when the wave's abort condition trips (failures of ``failure_types`` among its
   finished devices): every device the rollout targeted gets its previous desired release
   back, and the rollout is ``aborted``;
4. once every device of the wave finished: the **success condition** (else ``failed``),
   then, if the spec sets any gate, the **soak window**: the gates are measured every tick
   and decided ``soak_seconds`` after the wave finished; all pass: the next wave starts
   (or the rollout ``succeeded``); one fails: ``failed``, the gate named in the reason.

**Overlapping waves.** Without quality gates, an exponential wave whose rate rises on
devices *notified* (AWS IoT Jobs' ``numberOfNotifiedThings``), or every minute, hands over
to the next wave as soon as all its devices were notified, while their updates still run:
the rate rises without waiting for the slowest device. The devices of earlier waves are
still followed every tick, each wave's abort condition still applies to its own devices,
and its success condition is checked once they all finished; the rollout succeeds when the
devices of every wave finished. The canary, a rate that rises on devices that *succeeded*,
and any quality gate keep a wave waiting for its devices (and its soak window).

A paused rollout stands still: nothing is targeted, followed or decided; on resume its
clocks (device timeouts, the wave's batches, the soak) move on by the pause's length.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from edgeops.db import Database
from edgeops.db.types import utcnow
from edgeops.errors import BrokerError, ConfigError, EdgeOpsError, NotFoundError
from edgeops.fleet.desired import active_release
from edgeops.fleet.models import Device, DeviceEventRecord
from edgeops.fleet.service import FleetService
from edgeops.monitor.models import TelemetryWindowRecord
from edgeops.rollout.gates import GateResult, evaluate_gates
from edgeops.rollout.models import REASON_MAX_LENGTH, RolloutDeviceRecord, RolloutRecord
from edgeops.rollout.plan import plan_rollout, release_contract
from edgeops.rollout.spec import AbortCondition, RolloutSpec, RolloutSpecError

if TYPE_CHECKING:
    from edgeops.fleet.deploy import DesiredSink
    from edgeops.trust import TrustRepository

__all__ = ["RolloutEngine", "RolloutError"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
ACTIVE = ("running", "paused")
FINISHED_DEVICE = ("succeeded", "failed", "timed_out")
ROLLED_BACK_FROM = ("targeted", *FINISHED_DEVICE)
"""the devices an abort sets back: those that were sent the release"""
CONTRACT_KINDS = ("hardware", "runtime", "memory", "agent_version", "malformed")
_CHUNK = 500


class RolloutError(EdgeOpsError):
    """An operation the rollout's status does not allow (resume a running one ...)."""


def _reason(text: str) -> str:
    return text if len(text) <= REASON_MAX_LENGTH else text[: REASON_MAX_LENGTH - 3] + "..."


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _release_info(spec: RolloutSpec, custom: Mapping[str, Any]) -> dict[str, Any]:
    """The release's target, model id and reference class histogram (from its card)."""
    from edgeops.trust.errors import ReleaseError
    from edgeops.trust.release import card_of

    model_id: str | None = None
    classes: list[int] | None = None
    try:
        card = card_of(custom)
    except ReleaseError:
        card = {}
    if isinstance(card.get("model_id"), str) and card["model_id"]:
        model_id = card["model_id"]
    reference = card.get("reference")
    counts = reference.get("class_counts") if isinstance(reference, Mapping) else None
    if isinstance(counts, list) and all(isinstance(c, int) for c in counts):
        classes = [int(c) for c in counts]
    return {"target": spec.release, "model_id": model_id, "reference_class_counts": classes}


class RolloutEngine:
    """Creates rollouts and carries them out (see the module docstring).

    ``publisher`` publishes desired documents (:class:`edgeops.hub.DesiredPublisher`, or any
    :class:`~edgeops.fleet.deploy.DesiredSink`); None stores the desired state only (the
    hub's publisher sends it later). ``repository`` is the release repository :meth:`create`
    reads the release's contract from, unless it is given the contract (``custom``).
    """

    def __init__(
        self,
        database: Database,
        publisher: DesiredSink | None,
        *,
        clock: Clock = utcnow,
        repository: TrustRepository | None = None,
    ) -> None:
        self.database = database
        self.publisher = publisher
        self.clock = clock
        self.repository = repository
        self.fleet = FleetService(database, clock=clock)

    # -- creating --------------------------------------------------------------------------

    def busy_devices(self) -> dict[str, str]:
        """Devices a running or paused rollout has not finished with, and its id."""
        with self.database.session() as session:
            rows = session.exec(
                select(RolloutDeviceRecord.device_id, RolloutDeviceRecord.rollout_id)
                .join(RolloutRecord, col(RolloutRecord.id) == col(RolloutDeviceRecord.rollout_id))
                .where(col(RolloutRecord.status).in_(ACTIVE))
                .where(col(RolloutDeviceRecord.status).in_(("pending", "targeted")))
            ).all()
        return {str(device_id): str(rollout_id) for device_id, rollout_id in rows}

    def create(self, spec: RolloutSpec, *, custom: Mapping[str, Any] | None = None) -> str:
        """Plan ``spec`` on the fleet now and store the rollout, running; its id.

        ``custom`` is the release target's custom metadata (default: read from
        ``repository``). RolloutSpecError as the planner raises it, or on ``selection`` if
        no selected device is compatible.
        """
        if custom is None:
            if self.repository is None:
                raise ConfigError("no release repository to read the release's contract from")
            custom = release_contract(self.repository, spec.release)
        plan = plan_rollout(spec, self.fleet.list_devices(), custom, self.busy_devices())
        if not plan.waves:
            raise RolloutSpecError(
                "selection",
                f"no compatible device: all {len(plan.selected)} selected devices are excluded "
                "(`edgeops rollout plan` lists why)",
            )
        now = self.clock()
        rollout_id = f"r-{secrets.token_hex(5)}"
        previous = {device.device_id: device.current_model for device in plan.compatible}
        waves = [
            {
                "index": wave.index,
                "kind": wave.kind,
                "rate_per_minute": wave.rate_per_minute,
                "minutes": list(wave.minutes),
                "size": wave.size,
                "abort": wave.abort.model_dump(mode="json"),
            }
            for wave in plan.waves
        ]
        with self.database.session() as session:
            session.add(
                RolloutRecord(
                    id=rollout_id,
                    name=spec.name,
                    spec=spec.to_dict(),
                    release=_release_info(spec, custom),
                    waves=waves,
                    gates={},
                    status="running",
                    current_wave=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            for wave in plan.waves:
                for position, device_id in enumerate(wave.devices):
                    session.add(
                        RolloutDeviceRecord(
                            rollout_id=rollout_id,
                            device_id=device_id,
                            wave=wave.index,
                            position=position,
                            status="pending",
                            previous_model=previous.get(device_id),
                            updated_at=now,
                        )
                    )
            for excluded in plan.excluded:
                session.add(
                    RolloutDeviceRecord(
                        rollout_id=rollout_id,
                        device_id=excluded.device_id,
                        status="excluded",
                        kind=excluded.kind,
                        reason=_reason(excluded.reason),
                        updated_at=now,
                    )
                )
        log.info(
            "rollout %s (%s) created: %d devices in %d waves, %d excluded",
            rollout_id,
            spec.name,
            plan.scheduled,
            len(plan.waves),
            len(plan.excluded),
        )
        return rollout_id

    # -- reading ---------------------------------------------------------------------------

    def _rollout(self, session: Session, rollout_id: str) -> RolloutRecord:
        record = session.get(RolloutRecord, rollout_id)
        if record is None:
            raise NotFoundError(f"rollout {rollout_id!r} not found")
        return record

    def _load(self, rollout_id: str) -> tuple[RolloutRecord, list[RolloutDeviceRecord]]:
        with self.database.session() as session:
            record = self._rollout(session, rollout_id)
            devices = session.exec(
                select(RolloutDeviceRecord).where(col(RolloutDeviceRecord.rollout_id) == rollout_id)
            ).all()
            session.expunge_all()
            return record, list(devices)

    def list_rollouts(self) -> list[dict[str, Any]]:
        """Every rollout, newest first: id, name, release, status, current wave, reason."""
        with self.database.session() as session:
            records = session.exec(
                select(RolloutRecord).order_by(col(RolloutRecord.created_at).desc())
            ).all()
            return [
                {
                    "id": r.id,
                    "name": r.name,
                    "release": r.release.get("target"),
                    "status": r.status,
                    "current_wave": r.current_wave,
                    "waves": len(r.waves),
                    "reason": r.reason,
                    "created_at": r.created_at.isoformat(),
                }
                for r in records
            ]

    def status(self, rollout_id: str) -> dict[str, Any]:
        """The rollout as a JSON-ready document: status, counts, waves, gates, excluded."""
        record, devices = self._load(rollout_id)
        spec = RolloutSpec.model_validate(record.spec)
        counts = Counter(device.status for device in devices)
        by_wave: dict[int, list[RolloutDeviceRecord]] = {}
        for device in devices:
            if device.wave is not None:
                by_wave.setdefault(device.wave, []).append(device)
        soak = timedelta(seconds=spec.gates.soak_seconds)
        waves = []
        for wave in record.waves:
            index = int(wave["index"])
            members = by_wave.get(index, [])
            wave_counts = Counter(device.status for device in members)
            if index < record.current_wave:
                # an overlapped wave hands over once notified: running until its devices end
                state = "running" if wave_counts.get("targeted") else "passed"
            elif index > record.current_wave:
                state = "pending"
            elif record.status in ("succeeded",):
                state = "passed"
            elif record.status in ("failed", "aborted"):
                state = record.status
            elif record.wave_finished_at is not None:
                state = "soaking"
            elif record.wave_started_at is not None:
                state = "running"
            else:
                state = "pending"
            soak_until = (
                (record.wave_finished_at + soak).isoformat()
                if index == record.current_wave and record.wave_finished_at is not None
                else None
            )
            waves.append(
                {
                    **{k: wave[k] for k in ("index", "kind", "rate_per_minute", "size")},
                    "state": state,
                    "counts": dict(sorted(wave_counts.items())),
                    "started_at": (
                        record.wave_started_at.isoformat()
                        if index == record.current_wave and record.wave_started_at
                        else None
                    ),
                    "soak_until": soak_until,
                    "gates": record.gates.get(str(index), {}).get("results", []),
                    "gates_decided": record.gates.get(str(index), {}).get("decided", False),
                }
            )
        return {
            "id": record.id,
            "name": record.name,
            "release": record.release,
            "status": record.status,
            "reason": record.reason,
            "current_wave": record.current_wave,
            "created_at": record.created_at.isoformat(),
            "updated_at": record.updated_at.isoformat(),
            "finished_at": record.finished_at.isoformat() if record.finished_at else None,
            "counts": {status: counts.get(status, 0) for status in _DEVICE_ORDER},
            "device_timeout_seconds": spec.device_timeout_seconds,
            "soak_seconds": spec.gates.soak_seconds,
            "gates": spec.gates.model_dump(mode="json"),
            "waves": waves,
            "excluded": [
                {"device_id": d.device_id, "kind": d.kind, "reason": d.reason}
                for d in sorted(devices, key=lambda d: d.device_id)
                if d.status == "excluded"
            ],
            "failed": [
                {
                    "device_id": d.device_id,
                    "wave": d.wave,
                    "status": d.status,
                    "kind": d.kind,
                    "reason": d.reason,
                }
                for d in sorted(devices, key=lambda d: d.device_id)
                if d.status in ("failed", "timed_out")
                or (d.status == "rolled_back" and d.kind is not None)
            ],
        }

    def devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every device of the rollout: wave, status, kind, reason, previous release."""
        _, devices = self._load(rollout_id)
        return [
            {
                "device_id": d.device_id,
                "wave": d.wave,
                "status": d.status,
                "kind": d.kind,
                "reason": d.reason,
                "previous_release": d.previous_release,
            }
            for d in sorted(
                devices, key=lambda d: (d.wave if d.wave is not None else -1, d.position)
            )
        ]

    # -- operator actions ------------------------------------------------------------------

    def pause(self, rollout_id: str) -> None:
        """Stop a running rollout where it stands (RolloutError if it is not running)."""
        now = self.clock()
        with self.database.session() as session:
            record = self._rollout(session, rollout_id)
            if record.status != "running":
                raise RolloutError(f"rollout {rollout_id} is {record.status}, not running")
            record.status, record.paused_at, record.updated_at = "paused", now, now
            session.add(record)

    def resume(self, rollout_id: str) -> None:
        """Carry a paused rollout on; its clocks move on by the pause's length."""
        now = self.clock()
        with self.database.session() as session:
            record = self._rollout(session, rollout_id)
            if record.status != "paused":
                raise RolloutError(f"rollout {rollout_id} is {record.status}, not paused")
            paused = now - (record.paused_at or now)
            if record.wave_started_at is not None:
                record.wave_started_at += paused
            if record.wave_finished_at is not None:
                record.wave_finished_at += paused
            record.status, record.paused_at, record.updated_at = "running", None, now
            session.add(record)
            targeted = session.exec(
                select(RolloutDeviceRecord).where(
                    col(RolloutDeviceRecord.rollout_id) == rollout_id,
                    col(RolloutDeviceRecord.status) == "targeted",
                )
            ).all()
            for device in targeted:
                if device.targeted_at is not None:
                    device.targeted_at += paused
                    session.add(device)

    def abort(self, rollout_id: str, reason: str = "aborted by the operator") -> int:
        """Abort a running, paused or failed rollout: every device it targeted gets its
        previous desired release back. Returns how many devices were rolled back. Aborting
        an aborted rollout again finishes a roll-back that was interrupted (0 devices left:
        RolloutError)."""
        record, devices = self._load(rollout_id)
        if record.status == "aborted" and any(d.status in ROLLED_BACK_FROM for d in devices):
            # an abort that stopped half way (the hub stopped between its steps): finish it
            return self._roll_back(rollout_id, self.clock())
        if record.status not in (*ACTIVE, "failed"):
            raise RolloutError(f"rollout {rollout_id} is {record.status}; nothing to abort")
        return self._abort(rollout_id, reason, from_statuses=(*ACTIVE, "failed"))

    # -- the tick --------------------------------------------------------------------------

    def tick(self) -> int:
        """Advance every running rollout one step; how many are still running after."""
        with self.database.session() as session:
            ids = list(
                session.exec(
                    select(RolloutRecord.id).where(col(RolloutRecord.status) == "running")
                ).all()
            )
        running = 0
        for rollout_id in ids:
            try:
                if self.advance(rollout_id):
                    running += 1
            except Exception:
                log.exception("rollout %s: tick failed; trying again next tick", rollout_id)
                running += 1
        return running

    def advance(self, rollout_id: str) -> bool:
        """One tick of one rollout; True while it is running."""
        record, devices = self._load(rollout_id)
        if record.status != "running":
            return False
        spec = RolloutSpec.model_validate(record.spec)
        now = self.clock()
        index = record.current_wave
        wave = record.waves[index]
        members = sorted((d for d in devices if d.wave == index), key=lambda d: d.position)
        # 1. target the due devices
        started = record.wave_started_at or now
        allowed = _due_count(wave, max(0.0, (now - started).total_seconds()))
        due = [d.device_id for d in members if d.status == "pending" and d.position < allowed]
        if due:
            self._target(record, due, now, first=record.wave_started_at is None)
            record, devices = self._load(rollout_id)
            if record.status != "running":
                return False
            members = sorted((d for d in devices if d.wave == index), key=lambda d: d.position)
        # 2. follow the targeted devices (of earlier waves too, when waves overlap)
        targeted = [d for d in devices if d.status == "targeted" and (d.wave or 0) <= index]
        if targeted:
            self._follow(rollout_id, record.release, targeted, spec, now)
            record, devices = self._load(rollout_id)
            if record.status != "running":
                return False
            members = sorted((d for d in devices if d.wave == index), key=lambda d: d.position)
        # 3. the abort condition, and the success condition of overlapped waves that finished
        for earlier in range(index + 1):
            group = members if earlier == index else [d for d in devices if d.wave == earlier]
            abort = AbortCondition.model_validate(record.waves[earlier]["abort"])
            finished = [d for d in group if d.status in FINISHED_DEVICE]
            failures = [d for d in finished if _failure_type(d) in abort.failure_types]
            if abort.aborts(len(finished), len(failures)):
                shown = record.waves[earlier]
                self._abort(
                    rollout_id,
                    f"wave {earlier} ({shown['kind']}): {len(failures)} of {len(finished)} "
                    f"finished devices failed ({_describe(abort)})",
                    from_statuses=("running",),
                )
                return False
            if earlier < index and len(finished) == len(group):
                short = _short_of_success(earlier, record.waves[earlier], group, spec)
                if short is not None:
                    self._finish(rollout_id, "failed", short)
                    return False
        # 4. success condition, soak and gates once the wave is done
        if any(d.status == "pending" for d in members):
            return True
        if any(d.status == "targeted" for d in members):
            if index + 1 < len(record.waves) and _overlaps(spec, wave):
                # every device of this wave was notified: the rate rises now (AWS IoT Jobs'
                # numberOfNotifiedThings); the wave's outcome is still followed and checked
                return self._next_wave(rollout_id, index)
            return True
        if index + 1 >= len(record.waves) and any(
            d.status in ("pending", "targeted") for d in devices
        ):
            return True  # the last wave is done; earlier, overlapped ones are not yet
        if record.wave_finished_at is None:
            short = _short_of_success(index, wave, members, spec)
            if short is not None:
                self._finish(rollout_id, "failed", short)
                return False
            self._update(rollout_id, wave_finished_at=now)
            record.wave_finished_at = now
        if _has_gates(spec):
            results = self._measure(record, members, spec)
            decided = now >= record.wave_finished_at + timedelta(seconds=spec.gates.soak_seconds)
            gates = dict(record.gates)
            gates[str(index)] = {
                "results": [r.to_dict() for r in results],
                "decided": decided,
                "measured_at": now.isoformat(),
            }
            failed = [r for r in results if not r.passed]
            if not decided:
                self._update(rollout_id, gates=gates)
                return True
            if failed:
                self._finish(
                    rollout_id,
                    "failed",
                    f"wave {index} ({wave['kind']}): quality gate "
                    + "; ".join(f"{r.name} failed: {r.describe()}" for r in failed),
                    gates=gates,
                )
                return False
            self._update(rollout_id, gates=gates)
        # promote
        if index + 1 >= len(record.waves):
            self._finish(rollout_id, "succeeded", None)
            return False
        return self._next_wave(rollout_id, index)

    def _next_wave(self, rollout_id: str, index: int) -> bool:
        self._update(
            rollout_id, current_wave=index + 1, wave_started_at=None, wave_finished_at=None
        )
        log.info("rollout %s: wave %d passed; wave %d starts", rollout_id, index, index + 1)
        return self.advance(rollout_id)  # the next wave's first batch goes out now

    # -- steps -----------------------------------------------------------------------------

    def _update(self, rollout_id: str, **values: Any) -> None:
        """Change the running rollout's row (nothing if it stopped running meanwhile)."""
        values["updated_at"] = self.clock()
        with self.database.session() as session:
            session.exec(
                sa.update(RolloutRecord)
                .where(col(RolloutRecord.id) == rollout_id, col(RolloutRecord.status) == "running")
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    def _finish(self, rollout_id: str, status: str, reason: str | None, **values: Any) -> None:
        now = self.clock()
        self._update(rollout_id, status=status, reason=_reason(reason) if reason else None,
                     finished_at=now, **values)  # fmt: skip
        log.info("rollout %s %s%s", rollout_id, status, f": {reason}" if reason else "")

    def _target(self, record: RolloutRecord, ids: list[str], now: datetime, *, first: bool) -> None:
        """Remember the devices' previous release and seqs (one transaction), then set their
        desired release and publish it."""
        release = record.release
        with self.database.session() as session:
            current = session.exec(
                select(RolloutRecord.status).where(col(RolloutRecord.id) == record.id)
            ).first()
            if current != "running":
                return
            rows = {
                d.device_id: d
                for chunk in _chunks(ids)
                for d in session.exec(select(Device).where(col(Device.device_id).in_(chunk))).all()
            }
            event_seqs = _max_seqs(session, DeviceEventRecord, ids)
            window_seqs = _max_seqs(session, TelemetryWindowRecord, ids)
            pending = set(_with_status(session, record.id, ids, "pending"))
            chosen = [device_id for device_id in ids if device_id in pending]
            _bulk_update(
                session,
                record.id,
                [
                    {
                        "device_id": device_id,
                        "status": "targeted",
                        "previous_release": _previous_release(rows.get(device_id)),
                        "event_seq": event_seqs.get(device_id, 0),
                        "window_seq": window_seqs.get(device_id, 0),
                        "targeted_at": now,
                        "updated_at": now,
                    }
                    for device_id in chosen
                ],
                only_status="pending",
            )
            if first:
                session.exec(
                    sa.update(RolloutRecord)
                    .where(col(RolloutRecord.id) == record.id)
                    .values(wave_started_at=now, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
        if not chosen:
            return
        document: dict[str, Any] = {"target": release["target"]}
        if release.get("model_id"):
            document["model_id"] = release["model_id"]
        self._set_release(chosen, document)
        log.info(
            "rollout %s: wave %d: %d devices targeted", record.id, record.current_wave, len(chosen)
        )

    def _set_release(self, ids: Sequence[str], release: dict[str, Any] | None) -> None:
        for chunk in _chunks(list(ids)):
            views = self.fleet.set_desired_many(chunk, {"release": release})
            if self.publisher is None:
                continue
            try:
                missing = self.publisher.publish_many(views)
            except BrokerError as exc:
                log.error("desired release not published to %d devices: %s", len(views), exc)
                continue
            if missing:
                log.warning("desired release not acknowledged for %d devices", len(missing))

    def _follow(
        self,
        rollout_id: str,
        release: Mapping[str, Any],
        targeted: list[RolloutDeviceRecord],
        spec: RolloutSpec,
        now: datetime,
    ) -> None:
        """Decide the targeted devices whose update finished or timed out (one transaction)."""
        target = release["target"]
        baseline = {d.device_id: d.event_seq or 0 for d in targeted}
        ids = list(baseline)
        decided: dict[str, tuple[str, str | None, str | None, int | None]] = {}
        with self.database.session() as session:
            for chunk in _chunks(ids):
                events = session.exec(
                    select(DeviceEventRecord)
                    .where(
                        col(DeviceEventRecord.device_id).in_(chunk),
                        col(DeviceEventRecord.event) == "update",
                    )
                    .order_by(col(DeviceEventRecord.seq))
                ).all()
                for event in events:
                    device_id = event.device_id
                    if event.seq <= baseline[device_id] or device_id in decided:
                        continue
                    detail = event.detail if isinstance(event.detail, dict) else {}
                    if detail.get("target") != target:
                        continue
                    state, reason = detail.get("state"), detail.get("reason")
                    text = reason if isinstance(reason, str) else None
                    if state == "committed":
                        decided[device_id] = ("succeeded", None, None, event.seq)
                    elif detail.get("event") == "failed" or state in (
                        "rolling_back",
                        "rolled_back",
                    ):
                        kind = (text or "").partition(":")[0].strip()
                        failure = "rejected" if kind in CONTRACT_KINDS else "failed"
                        decided[device_id] = (
                            "failed",
                            failure,
                            f"update {state}: {text or 'no reason given'}",
                            event.seq,
                        )
        timeout = timedelta(seconds=spec.device_timeout_seconds)
        for device in targeted:
            if device.device_id in decided or device.targeted_at is None:
                continue
            if now - device.targeted_at >= timeout:
                decided[device.device_id] = (
                    "timed_out",
                    "timed_out",
                    f"no outcome within {spec.device_timeout_seconds} s",
                    None,
                )
        if not decided:
            return
        with self.database.session() as session:
            _bulk_update(
                session,
                rollout_id,
                [
                    {
                        "device_id": device_id,
                        "status": status,
                        "kind": failure_kind,
                        "reason": _reason(why) if why else None,
                        "outcome_seq": seq,
                        "finished_at": now,
                        "updated_at": now,
                    }
                    for device_id, (status, failure_kind, why, seq) in decided.items()
                ],
                only_status="targeted",
            )

    def _abort(self, rollout_id: str, reason: str, *, from_statuses: Sequence[str]) -> int:
        """Mark the rollout aborted (one transaction), then roll its devices back
        (:meth:`_roll_back`)."""
        now = self.clock()
        with self.database.session() as session:
            changed = session.exec(
                sa.update(RolloutRecord)
                .where(
                    col(RolloutRecord.id) == rollout_id,
                    col(RolloutRecord.status).in_(list(from_statuses)),
                )
                .values(status="aborted", reason=_reason(reason), finished_at=now, updated_at=now)
                .returning(col(RolloutRecord.id))
                .execution_options(synchronize_session=False)
            ).first()
        if changed is None:
            raise RolloutError(f"rollout {rollout_id} is no longer {' or '.join(from_statuses)}")
        log.warning("rollout %s aborted: %s", rollout_id, reason)
        return self._roll_back(rollout_id, now)

    def _roll_back(self, rollout_id: str, now: datetime) -> int:
        """Give every device of an aborted rollout not rolled back yet its previous desired
        release back (committed per release), then mark those rolled back (one transaction).
        Repeating it after an interruption touches only the devices left."""
        _, devices = self._load(rollout_id)
        touched = [d for d in devices if d.status in ROLLED_BACK_FROM]
        groups: dict[str, tuple[dict[str, Any] | None, list[str]]] = {}
        for device in touched:
            key = repr(sorted((device.previous_release or {}).items()))
            groups.setdefault(key, (device.previous_release, []))[1].append(device.device_id)
        for previous, ids in groups.values():
            self._set_release(ids, previous)
        with self.database.session() as session:
            _bulk_update(
                session,
                rollout_id,
                [
                    {
                        "device_id": device.device_id,
                        "status": "rolled_back",
                        "kind": device.kind,
                        "reason": _reason(
                            f"was {device.status}"
                            + (f" ({device.reason})" if device.reason else "")
                            + "; desired release set back"
                        ),
                        "updated_at": now,
                    }
                    for device in touched
                ],
            )
        return len(touched)

    def _measure(
        self, record: RolloutRecord, members: list[RolloutDeviceRecord], spec: RolloutSpec
    ) -> list[GateResult]:
        """The gates over the wave's committed devices' telemetry since they committed."""
        committed = [d for d in members if d.status == "succeeded"]
        model_id = record.release.get("model_id")
        baseline = {d.device_id: d.window_seq or 0 for d in committed}
        previous_model = {d.device_id: d.previous_model for d in committed}
        new_windows: list[dict[str, Any]] = []
        previous_windows: list[dict[str, Any]] = []
        crashed: set[str] = set()
        ids = list(baseline)
        commit_seq = {d.device_id: d.outcome_seq or 0 for d in committed}
        with self.database.session() as session:
            for chunk in _chunks(ids):
                windows = session.exec(
                    select(TelemetryWindowRecord).where(
                        col(TelemetryWindowRecord.device_id).in_(chunk)
                    )
                ).all()
                for window in windows:
                    document = window.window if isinstance(window.window, dict) else {}
                    if window.seq > baseline[window.device_id]:
                        if model_id is None or window.model_id == model_id:
                            new_windows.append(document)
                    elif window.model_id == (previous_model[window.device_id] or window.model_id):
                        previous_windows.append(document)
                events = session.exec(
                    select(DeviceEventRecord).where(
                        col(DeviceEventRecord.device_id).in_(chunk),
                        col(DeviceEventRecord.event).in_(["update", "model_load_failed"]),
                    )
                ).all()
                for event in events:
                    if event.seq <= commit_seq[event.device_id]:
                        continue
                    detail = event.detail if isinstance(event.detail, dict) else {}
                    if (
                        event.event == "update"
                        and detail.get("state") in ("rolling_back", "rolled_back")
                    ) or (event.event == "model_load_failed" and detail.get("role") == "champion"):
                        crashed.add(event.device_id)
                for device in session.exec(
                    select(Device).where(col(Device.device_id).in_(chunk))
                ).all():
                    health = device.reported.get("health") if device.reported else None
                    if isinstance(health, str) and health != "ok":
                        crashed.add(device.device_id)
        return evaluate_gates(
            spec.gates,
            new_windows,
            previous_windows,
            committed=len(committed),
            crashed=len(crashed),
            reference_classes=record.release.get("reference_class_counts"),
        )


_DEVICE_ORDER = (
    "pending",
    "targeted",
    "succeeded",
    "failed",
    "timed_out",
    "rolled_back",
    "excluded",
)


def _due_count(wave: Mapping[str, Any], elapsed_s: float) -> int:
    """How many of ``wave``'s devices are due ``elapsed_s`` after it started: all of a wave
    without a rate (the canary); else one every ``60 / rate`` seconds, the first at once."""
    size = sum(int(m) for m in wave["minutes"])
    rate = wave.get("rate_per_minute")
    if rate is None:
        return size
    return min(size, math.floor(elapsed_s * int(rate) / 60.0 + 1e-9) + 1)


def _failure_type(device: RolloutDeviceRecord) -> str | None:
    if device.status == "timed_out":
        return "timed_out"
    if device.status == "failed":
        return device.kind or "failed"
    return None


def _describe(abort: AbortCondition) -> str:
    parts = []
    if abort.failure_count is not None:
        parts.append(f"at least {abort.failure_count}")
    if abort.failure_percent is not None:
        parts.append(f"{abort.failure_percent:g} %")
    return f"abort at {' or '.join(parts)} after {abort.min_devices} finished"


def _overlaps(spec: RolloutSpec, wave: Mapping[str, Any]) -> bool:
    """Whether the next wave may start once every device of ``wave`` was notified, before
    they all finished: an exponential wave whose rate rises on devices notified (or every
    minute), in a rollout without quality gates. The canary, a rate that rises on devices
    that succeeded, and gates (measured on a finished wave) make a wave wait."""
    if wave.get("kind") == "canary" or _has_gates(spec):
        return False
    criteria = spec.waves.exponential.rate_increase_criteria
    return criteria is None or criteria.notified is not None


def _short_of_success(
    index: int, wave: Mapping[str, Any], members: Sequence[Any], spec: RolloutSpec
) -> str | None:
    """Why the finished wave missed the success condition, or None if it met it."""
    succeeded = sum(1 for d in members if d.status == "succeeded")
    percent = succeeded * 100.0 / len(members) if members else 0.0
    wanted = spec.waves.success.min_success_percent
    if percent >= wanted:
        return None
    return (
        f"wave {index} ({wave['kind']}): {succeeded} of {len(members)} devices "
        f"succeeded ({percent:.1f} %), below the {wanted:g} % required"
    )


def _has_gates(spec: RolloutSpec) -> bool:
    gates = spec.gates
    return any(
        value is not None
        for value in (
            gates.max_error_rate,
            gates.max_crash_rate,
            gates.max_latency_p95_ratio,
            gates.divergence,
            gates.min_shadow_agreement,
        )
    )


def _previous_release(device: Device | None) -> dict[str, Any] | None:
    """What an abort sets back: the desired release before, else the reported active one."""
    if device is None:
        return None
    desired = device.desired.get("release") if isinstance(device.desired, dict) else None
    if isinstance(desired, dict) and isinstance(desired.get("target"), str):
        return dict(desired)
    target, model_id = active_release(device.reported if isinstance(device.reported, dict) else {})
    if target is None:
        return None
    return {"target": target, **({"model_id": model_id} if model_id else {})}


def _with_status(session: Session, rollout_id: str, ids: list[str], status: str) -> list[str]:
    """Which of ``ids`` have ``status`` in the rollout now."""
    found: list[str] = []
    for chunk in _chunks(ids):
        found += session.exec(
            select(RolloutDeviceRecord.device_id).where(
                col(RolloutDeviceRecord.rollout_id) == rollout_id,
                col(RolloutDeviceRecord.device_id).in_(chunk),
                col(RolloutDeviceRecord.status) == status,
            )
        ).all()
    return found


def _bulk_update(
    session: Session,
    rollout_id: str,
    rows: list[dict[str, Any]],
    *,
    only_status: str | None = None,
) -> None:
    """Change rollout devices, one statement executed for many rows (every row must name
    the same columns); only rows still in ``only_status`` if given."""
    if not rows:
        return
    table = RolloutDeviceRecord.metadata.tables[RolloutDeviceRecord.__tablename__]
    columns = [name for name in rows[0] if name != "device_id"]
    statement = (
        sa.update(table)
        .where(
            table.c.rollout_id == sa.bindparam("b_rollout_id"),
            table.c.device_id == sa.bindparam("b_device_id"),
        )
        .values({name: sa.bindparam(f"b_{name}") for name in columns})
    )
    if only_status is not None:
        statement = statement.where(table.c.status == only_status)
    params = [
        {"b_rollout_id": rollout_id, **{f"b_{name}": value for name, value in row.items()}}
        for row in rows
    ]
    session.connection().execute(statement, params)


def _max_seqs(
    session: Session, table: type[DeviceEventRecord] | type[TelemetryWindowRecord], ids: list[str]
) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(ids):
        rows = session.exec(
            select(col(table.device_id), sa.func.max(col(table.seq)))
            .where(col(table.device_id).in_(chunk))
            .group_by(col(table.device_id))
        ).all()
        found.update({device_id: int(seq) for device_id, seq in rows if seq is not None})
    return found
