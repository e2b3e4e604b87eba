"""The updater: one release at a time, from the signed repository into the inactive slot and on.

The state (see :mod:`device_agent.updater.machine`) is persisted in
``<state_dir>/update/state.json`` (temp + fsync + rename + directory fsync) **before** the side
effect it announces; every transition is reported to the host just before it is persisted
(the daemon queues it in its durable offline buffer and sends it as an ``update`` event).
Steps, one per state:

- ``downloading``: refresh the TUF metadata, look the target up, check the compatibility
  contract early (nothing incompatible is downloaded), download it (ngclient checks length
  and hashes; the fetcher keeps a partial file across restarts).
- ``verifying``: check the downloaded file against the signed length and hashes again, then
  the contract (hardware tags, runtime, free memory, agent version); the card is written
  once to ``update/card.json``.
- ``installing``: wipe the inactive slot, write the model and ``card.json``, fsync, load it.
- ``testing``: smoke test (the bundle loads in its runtime and reproduces the card's test
  vectors within tolerance; a firmware bundle is flashed to the attached board and the
  vectors run there, see :mod:`device_agent.gateway`); then the pointer is switched (the
  activation) and the host swaps the champion; then, for ``health_s`` seconds, the champion
  must stay the new model and answer samples without runtime errors (the host counts them
  from the swap on).
- ``rolling_back``: if the pointer was switched, it is switched back to what it was before the
  activation; ``runtimes`` restores attached hardware to the active slot (a board is flashed
  with the active slot's image again: the smoke test of a firmware release flashed it with
  the new one), and the host reloads that champion.

Transient failures (transport, I/O) retry the same state; every retry and every resume after
a restart counts an attempt, and past ``max_attempts`` the update fails and rolls back. A
refusal (trust, contract, smoke test, health) fails at once. So does a full disk (``io``):
``ENOSPC`` removes the partial and downloaded files first (so the state can be written), and
no download starts with less than twice the target's length free. A target that was rolled
back is not tried again until the desired release names another one.

Resume map, applied by :meth:`Updater.boot` at start-up, before the champion is loaded:

================================  ==========================================================
state found                       what it means now
================================  ==========================================================
idle, committed, rolled_back      nothing to do
downloading                       continue (the partial file is kept) if the desired release
                                  still names the target, else cancel (-> idle)
verifying                         verify again (if the desired release still names the
                                  target, else cancel)
installing                        wipe the inactive slot and install again
testing, pointer not switched     smoke test again, then activate
testing, pointer switched         count a boot; more than ``MAX_TESTING_BOOTS`` boots is a
                                  crash loop: roll back (before the model is loaded again);
                                  else keep testing (the health check starts over)
rolling_back                      finish the rollback (before the champion is loaded)
================================  ==========================================================

The active pointer always names a complete slot, so the device runs the old or the new model,
never none and never a half-written one.

Failpoints: ``updater.enter:<state>`` before a state is persisted, ``updater.after:<state>``
right after, and ``updater.switched`` right after the pointer switch (before the health
check).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tuf.api.exceptions import LengthOrHashMismatchError

from device_agent import failpoints
from device_agent.card import ModelCard
from device_agent.errors import AgentError, LinkError
from device_agent.fsio import atomic_write_bytes, atomic_write_json
from device_agent.runtime import ModelBundle, Runtime, open_runtime, parse_card
from device_agent.runtime._base import TensorRuntime
from device_agent.runtime._errors import RuntimeLoadError
from device_agent.updater.errors import TrustError, UpdateError, UpdateRefused
from device_agent.updater.machine import (
    AT_REST,
    UpdateEvent,
    UpdateState,
    next_state,
)
from device_agent.updater.slots import Pointer, Slots

__all__ = [
    "LOCAL_RUNTIMES",
    "MAX_TESTING_BOOTS",
    "ChampionHealth",
    "ContractCheck",
    "Replay",
    "Runtimes",
    "SmokeTestError",
    "Transition",
    "TrustSource",
    "UpdateRecord",
    "Updater",
    "UpdaterHost",
    "UpdaterStoppedError",
    "smoke_test",
]

log = logging.getLogger(__name__)

MAX_TESTING_BOOTS = 2
"""More restarts than this while testing after the switch is a crash loop: roll back."""

_S, _E = UpdateState, UpdateEvent


class SmokeTestError(UpdateRefused):
    """The new bundle does not reproduce its card's test vectors (or does not run)."""

    def __init__(self, message: str) -> None:
        super().__init__("smoke_test", message)


class HealthCheckError(UpdateRefused):
    """The new champion failed its health check after the activation."""

    def __init__(self, message: str) -> None:
        super().__init__("health", message)


class UpdaterStoppedError(Exception):
    """The updater was asked to stop; the persisted state is resumed at the next start.

    The host raises it from :meth:`UpdaterHost.activate` when the agent stops meanwhile."""


# -- collaborators ---------------------------------------------------------------------------


class TrustSource(Protocol):
    """What the updater needs of the TUF client (``device_agent.updater.trust.TrustClient``)."""

    def refresh(self) -> None: ...

    def get_target(self, path: str) -> Any: ...

    def download(self, target: Any) -> Path: ...


ContractCheck = Callable[[Any], ModelCard]
"""``check_contract(custom, facts)`` with this device's facts bound: the card, or an error."""


@dataclass(frozen=True)
class ChampionHealth:
    """What the host says about the running champion."""

    model_id: str | None
    runtime_errors: int
    """Runtime errors since this champion was installed (the host counts from the swap, on
    the thread that runs the samples, so the previous model's errors never count)."""


@dataclass(frozen=True)
class Transition:
    """One reported transition (the detail of an ``update`` event)."""

    state: UpdateState
    previous: UpdateState
    event: UpdateEvent
    target: str | None
    attempt: int
    reason: str | None

    def detail(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "previous": str(self.previous),
            "event": str(self.event),
            "target": self.target,
            "attempt": self.attempt,
            "reason": self.reason,
        }


class UpdaterHost(Protocol):
    """The side of the daemon the updater acts on."""

    def activate(self, bundle_dir: Path | None) -> None:
        """Make the bundle in ``bundle_dir`` the champion (None: no model); AgentError if it
        cannot be loaded."""

    def health(self) -> ChampionHealth:
        """The running champion's model id and its runtime errors since it was installed."""

    def report(self, transition: Transition) -> None:
        """Send ``transition`` to the hub (an ``update`` event)."""


# -- the persisted record --------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateRecord:
    """The content of ``update/state.json``."""

    state: UpdateState = UpdateState.IDLE
    target: str | None = None
    slot: str | None = None
    """The slot the update installs into (inactive when the update started)."""
    artifact: str | None = None
    """The downloaded, hash-checked file."""
    card_file: str | None = None
    """The card of the verified target (custom.edgeops.card), written once beside the state
    file: the state is rewritten at every transition and the card can be large."""
    attempt: int = 0
    boots: int = 0
    """Restarts while testing after the switch."""
    reason: str | None = None
    pointer_before: dict[str, Any] | None = None
    """The pointer before the activation; a rollback restores it (None: no pointer)."""
    ts: float = field(default_factory=lambda: round(time.time(), 3))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> UpdateRecord:
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {name for name in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = UpdateState(values.get("state", "idle"))
        for name in ("attempt", "boots"):
            if not isinstance(values.get(name, 0), int):
                raise ValueError(f"field {name!r} must be an integer")
        return cls(**values)


def describe(exc: BaseException) -> str:
    """The ``reason`` of a failure: ``"<kind>: <message>"`` for updater errors."""
    if isinstance(exc, UpdateError):
        return f"{exc.kind}: {exc}"
    if isinstance(exc, LinkError | ConnectionError | TimeoutError):
        return f"transport: {exc}"
    if isinstance(exc, OSError):
        return f"io: {exc}"
    return str(exc)


# -- the verified card as written -------------------------------------------------------------


class _CardTexts:
    """``card.to_json()`` of verified cards, serialized once per process.

    The contract check parses the card out of a target's custom metadata, so the same custom
    metadata gives the same card, and every agent of a process updating to one target would
    serialize it again (a card carries its test vectors and reference histograms: most of an
    update's CPU). The text is kept by the SHA-256 of the custom metadata (canonical JSON),
    with the card it was written from, and used only for a card equal to that one. The
    contract itself is checked at every update, against this device's facts of the moment.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._texts: OrderedDict[bytes, tuple[ModelCard, bytes]] = OrderedDict()

    def text(self, custom: Any, card: ModelCard) -> bytes:
        try:
            canonical = json.dumps(custom, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):  # not JSON-shaped: nothing to key by
            return card.to_json().encode()
        key = hashlib.sha256(canonical.encode()).digest()
        with self._lock:
            cached = self._texts.get(key)
        if cached is not None and cached[0] == card:
            return cached[1]
        text = card.to_json().encode()
        with self._lock:
            self._texts[key] = (card, text)
            self._texts.move_to_end(key)
            while len(self._texts) > self.size:
                self._texts.popitem(last=False)
        return text


_CARD_JSON = _CardTexts()


# -- the smoke test --------------------------------------------------------------------------


@dataclass
class Replay:
    """What one smoke test saw, vector by vector (reported by :meth:`Runtimes.tested`)."""

    vectors: int = 0
    """Test vectors run (a card without vectors: the one zero sample, not counted)."""
    failed: list[int] = field(default_factory=list)
    """Indices of the vectors whose output differs beyond the tolerance."""
    max_error: float | None = None
    """The largest absolute difference from an expected output over all vectors run."""
    tolerance: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    """Wall-clock seconds of each vector on this host: send, run, receive (for a board: the
    serial round trip included)."""
    cycles: list[int] = field(default_factory=list)
    """What the runtime measured itself per vector (a board's cycle count), if it does."""
    reason: str | None = None
    """Why the test failed (None: it passed)."""

    @property
    def passed(self) -> bool:
        return self.reason is None


class Runtimes:
    """How the updater and the daemon run a bundle: in this process (LiteRT, ONNX Runtime).

    A device with hardware of its own (an attached microcontroller, see
    :class:`device_agent.gateway.Gateway`) passes a subclass that opens some bundles on that
    hardware, reports the smoke test's results and, after a rollback, puts the hardware back
    on what the active slot names.
    """

    def open(self, bundle: ModelBundle) -> Runtime:
        """A runtime for ``bundle``; AgentError if it cannot run here."""
        if bundle.format not in ("tflite", "onnx"):
            raise RuntimeLoadError(
                f"{bundle.model_path}: a {bundle.format} bundle needs an attached board; "
                "this agent has none configured ([mcu])"
            )
        return open_runtime(bundle)

    def label(self, bundle: ModelBundle) -> str:
        """Where the bundle runs, for the smoke test's messages."""
        return str(bundle.directory)

    def tested(self, bundle: ModelBundle, replay: Replay) -> None:
        """The smoke test of ``bundle`` ended (passed or not) with ``replay``."""

    def restore(self, bundle_dir: Path | None) -> str | None:
        """After a rollback: make what runs outside this process match ``bundle_dir`` (the
        active slot, None: no slot). What it did, for the update's reason, or None if
        nothing needed doing; AgentError if it could not."""
        return None


LOCAL_RUNTIMES = Runtimes()


def smoke_test(bundle_dir: Path, runtimes: Runtimes = LOCAL_RUNTIMES) -> ModelBundle:
    """Load the bundle in its runtime and reproduce its card's test vectors within tolerance.

    Each vector's ``features`` (the float model input) go through the runtime's tensor path
    (quantization, invoke, dequantization); the output must equal the dequantized
    ``expected_output`` within one output quantization step (integer models) or 1e-4
    absolute + 1e-3 relative (float models). A card without vectors: one zero sample must
    run. Every vector runs (all differing ones are listed) unless the runtime fails. An error
    of kind ``transport`` while the bundle opens (an attached board that could not be flashed
    or reached) is raised as it is, for the updater to retry.
    ``runtimes`` opens the bundle (default: in this process) and is told the result
    (:meth:`Runtimes.tested`) whether the test passes or not. SmokeTestError names what
    failed (a bundle that does not load, a model that fails, the first differing vector).
    """
    try:
        bundle = ModelBundle.load(bundle_dir)
    except AgentError as exc:
        raise SmokeTestError(f"{bundle_dir} does not load: {exc}") from exc
    replay = Replay()
    where = runtimes.label(bundle)
    try:
        try:
            runtime = runtimes.open(bundle)
        except AgentError as exc:
            if getattr(exc, "kind", None) == "transport":
                raise  # a board that could not be flashed or reached: the updater retries
            raise SmokeTestError(f"{where}: the model does not load: {exc}") from exc
        with runtime:
            try:
                _replay(bundle, runtime, replay, where)
            except SmokeTestError:
                raise
            except (AgentError, ValueError, TypeError, RuntimeError, FloatingPointError) as exc:
                raise SmokeTestError(f"{where}: the model fails to run: {exc}") from exc
    except SmokeTestError as exc:
        replay.reason = str(exc)
        runtimes.tested(bundle, replay)
        raise
    runtimes.tested(bundle, replay)
    return bundle


def _replay(bundle: ModelBundle, runtime: Runtime, replay: Replay, where: str) -> None:
    """Run the card's test vectors (or one zero sample) through ``runtime`` into ``replay``."""
    card = bundle.card
    if not card.test_vectors or not isinstance(runtime, TensorRuntime):
        runtime.infer(np.zeros(bundle.rule.input_shape, dtype=np.float32))
        return
    quantization = card.quantization.output
    first: str | None = None
    for index, vector in enumerate(card.test_vectors):
        try:
            features = np.asarray(vector["features"], dtype=np.float32).reshape(
                (1, *bundle.rule.model_input_shape)
            )
            expected = np.asarray(vector["expected_output"], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError, ValueError) as exc:
            raise SmokeTestError(f"{where}: test vector {index} is malformed: {exc}") from exc
        if quantization is not None:
            expected = (expected - quantization.zero_point) * quantization.scale
            atol, rtol = quantization.scale * 1.001, 0.0
        else:
            atol, rtol = 1e-4, 1e-3
        replay.tolerance = atol
        start = time.perf_counter()
        got = runtime._run(features).astype(np.float64)
        replay.latencies_s.append(time.perf_counter() - start)
        cycles = getattr(runtime, "last_cycles", None)
        if isinstance(cycles, int):
            replay.cycles.append(cycles)
        replay.vectors += 1
        if got.shape != expected.shape:
            raise SmokeTestError(
                f"{where}: test vector {index}: the model gives {got.size} outputs, "
                f"the card expects {expected.size}"
            )
        worst = float(np.max(np.abs(got - expected))) if got.size else 0.0
        replay.max_error = worst if replay.max_error is None else max(replay.max_error, worst)
        if not np.allclose(got, expected, atol=atol, rtol=rtol):
            replay.failed.append(index)
            if first is None:
                first = (
                    f"{where}: test vector {index}: output differs from the card's by up "
                    f"to {worst:.6g} (tolerance {atol:.6g})"
                )
    if first is not None:
        more = len(replay.failed) - 1
        others = f" ({more} more of {replay.vectors} vectors differ)" if more else ""
        raise SmokeTestError(first + others)


# -- the updater -----------------------------------------------------------------------------


class Updater:
    """Drives one device's updates; see the module docstring.

    ``trust`` builds the TUF client on first use. ``contract`` checks a target's custom
    metadata against this device. ``host`` swaps the champion, tells its
    health and reports transitions. ``runtimes`` opens bundles for the smoke test, is told its
    result, and restores attached hardware after a rollback (:class:`Runtimes`).
    :meth:`boot` runs at start-up on the caller's thread; :meth:`update` and :meth:`resume`
    block and belong on a worker thread.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        trust: Callable[[], TrustSource],
        contract: ContractCheck,
        host: UpdaterHost,
        health_s: float = 10.0,
        max_attempts: int = 3,
        retry_delay_s: float = 2.0,
        health_poll_s: float = 0.25,
        runtimes: Runtimes = LOCAL_RUNTIMES,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.slots = Slots(self.state_dir / "slots")
        self.state_file = self.state_dir / "update" / "state.json"
        self.partial_dir = self.state_dir / "update" / "partial"
        """Where the fetcher keeps partial downloads (emptied when an update ends)."""
        self._trust_factory = trust
        self._trust: TrustSource | None = None
        self._contract = contract
        self.host = host
        self.health_s = health_s
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.health_poll_s = health_poll_s
        self.runtimes = runtimes
        self.stop_event = threading.Event()
        self._target: Any = None  # the TargetFile of this process's download, if any
        self.record = self._load()

    @property
    def state(self) -> UpdateState:
        return self.record.state

    def _load(self) -> UpdateRecord:
        try:
            data = json.loads(self.state_file.read_bytes())
        except FileNotFoundError:
            return UpdateRecord()
        except (OSError, ValueError) as exc:
            log.error("update state %s unreadable (%s); starting from idle", self.state_file, exc)
            return UpdateRecord(reason=f"state file unreadable: {exc}")
        try:
            return UpdateRecord.from_dict(data)
        except (TypeError, ValueError) as exc:
            log.error("update state %s malformed (%s); starting from idle", self.state_file, exc)
            return UpdateRecord(reason=f"state file malformed: {exc}")

    # -- transitions -----------------------------------------------------------------------

    def _apply(self, event: UpdateEvent, reason: str | None = None, **changes: Any) -> None:
        """Report, then persist, the state ``event`` leads to (with ``changes``).

        The report goes first: the host's event queue is durable (the daemon's offline
        buffer), so a power cut after the state was persisted never hides the final state from
        the hub; a cut between report and persist is followed, after the restart, by a
        ``resume`` of the state before (a newer event), so the hub's view ends right either
        way.
        """
        previous = self.record.state
        state = next_state(previous, event)
        failpoints.check(f"updater.enter:{state}")
        record = replace(
            self.record, state=state, reason=reason, ts=round(time.time(), 3), **changes
        )
        transition = Transition(state, previous, event, record.target, record.attempt, reason)
        # in memory before the report: the host re-publishes its state when told, and must
        # read the new one
        before, self.record = self.record, record
        try:
            self.host.report(transition)
        except AgentError as exc:
            log.error("update transition not reported: %s", exc)
        try:
            atomic_write_json(self.state_file, record.to_dict())
        except BaseException:
            self.record = before  # the step does not run: memory says what the file says
            raise
        failpoints.check(f"updater.after:{state}")
        log.info(
            "update %s: %s -(%s)-> %s%s",
            record.target,
            previous,
            event,
            state,
            f" ({reason})" if reason else "",
        )

    # -- start-up --------------------------------------------------------------------------

    def boot(self, desired_target: str | None) -> bool:
        """Apply the resume map (see the module docstring) before the champion is loaded.

        Returns True if an interrupted update is left for :meth:`resume` (worker thread).
        """
        record = self.record
        state = record.state
        if state in AT_REST:
            self._discard_artifact()  # left behind if the cut came right after the end
            return False
        if state in (_S.DOWNLOADING, _S.VERIFYING) and desired_target != record.target:
            self._apply(_E.CANCEL, f"the desired release names {desired_target!r}, not this target")
            self._discard_artifact()
            return False
        if state == _S.ROLLING_BACK:
            self._apply(_E.RESUME, record.reason)
            self._roll_back(live=False)
            return False
        if state == _S.TESTING and self._switched():
            boots = record.boots + 1
            if boots > MAX_TESTING_BOOTS:
                self._apply(_E.RESUME, record.reason, boots=boots)
                self._apply(_E.FAILED, f"crash loop: {boots} restarts while testing the new model")
                self._roll_back(live=False)
                return False
            return self._resume_attempt(boots=boots)
        return self._resume_attempt()

    def _resume_attempt(self, **changes: Any) -> bool:
        attempt = self.record.attempt + 1
        if attempt > self.max_attempts:
            self._apply(_E.RESUME, self.record.reason, **changes)
            self._apply(
                _E.FAILED, f"gave up after {self.max_attempts} attempts (interrupted each time)"
            )
            self._roll_back(live=False)
            return False
        self._apply(_E.RESUME, "the agent restarted in this state", attempt=attempt, **changes)
        return True

    # -- running ---------------------------------------------------------------------------

    def wants(self, target: str) -> bool:
        """True if an update to ``target`` would start now."""
        record = self.record
        if record.state not in AT_REST:
            return False
        pointer = self.slots.pointer()
        if pointer is not None and pointer.target() == target:
            return False
        return not (record.state == _S.ROLLED_BACK and record.target == target)

    def update(self, target: str) -> UpdateState:
        """Run an update to ``target`` to its end (blocking); the state it ended in."""
        if not self.wants(target):
            return self.record.state
        self._target = None
        self._apply(
            _E.START,
            None,
            target=target,
            slot=self.slots.inactive(),
            artifact=None,
            card_file=None,
            attempt=1,
            boots=0,
            pointer_before=None,
        )
        return self.resume()

    def resume(self) -> UpdateState:
        """Carry the update in progress on from its persisted state to a state at rest."""
        while self.record.state not in AT_REST:
            if self.stop_event.is_set():
                return self.record.state
            state = self.record.state
            if state == _S.ROLLING_BACK:
                self._roll_back(live=True)
                continue
            try:
                self._step(state)
            except UpdaterStoppedError:
                log.info("updater stopped in %s; resumed at the next start", state)
                return self.record.state
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._out_of_space(exc)
                else:
                    self._transient(exc)
            except LinkError as exc:
                self._transient(exc)
            except AgentError as exc:
                if getattr(exc, "kind", None) == "transport":
                    self._transient(exc)
                else:
                    self._apply(_E.FAILED, describe(exc))
            except Exception as exc:  # a library failing in a way no one foresaw
                log.exception("update step %s failed unexpectedly", state)
                self._apply(_E.FAILED, f"{type(exc).__name__}: {exc}")
        return self.record.state

    def _transient(self, exc: BaseException) -> None:
        if self.stop_event.is_set():  # the agent stops (its fetcher was closed): not a failure
            return
        attempt = self.record.attempt + 1
        if attempt > self.max_attempts:
            self._apply(_E.FAILED, f"gave up after {self.max_attempts} attempts: {describe(exc)}")
            return
        self._apply(_E.RETRY, describe(exc), attempt=attempt)
        self.stop_event.wait(self.retry_delay_s)  # a stop ends resume(); the next start goes on

    def _out_of_space(self, exc: OSError) -> None:
        """The disk is full: free what this update wrote, then fail it (a retry would fail
        the same way, and the state file could not even be written)."""
        self._remove_downloads()
        self._apply(_E.FAILED, describe(exc))

    def _step(self, state: UpdateState) -> None:
        if state == _S.DOWNLOADING:
            self._download()
        elif state == _S.VERIFYING:
            self._verify()
        elif state == _S.INSTALLING:
            self._install()
        elif state == _S.TESTING:
            self._test()

    def _client(self) -> TrustSource:
        if self._trust is None:
            self._trust = self._trust_factory()
        return self._trust

    def _target_file(self) -> Any:
        """The signed target of this update (metadata refreshed once per process)."""
        if self._target is None:
            trust = self._client()
            trust.refresh()
            target = self.record.target
            assert target is not None
            self._target = trust.get_target(target)
        return self._target

    def _download(self) -> None:
        target = self._target_file()
        self._contract(target.custom)  # refuse an incompatible target before its bytes flow
        free = shutil.disk_usage(self.state_dir).free
        if free < 2 * target.length:
            raise UpdateRefused(
                "io",
                f"{free} bytes free in {self.state_dir}; the target of {target.length} bytes "
                f"needs {2 * target.length} (download and slot)",
            )
        path = self._client().download(target)
        self._apply(_E.DOWNLOADED, None, artifact=str(path))

    def _verify(self) -> None:
        target = self._target_file()
        artifact = Path(self.record.artifact or "")
        if not self.record.artifact or not artifact.is_file():
            raise UpdateRefused("missing_artifact", f"the downloaded file {artifact} is missing")
        with artifact.open("rb") as fh:
            try:
                target.verify_length_and_hashes(fh)
            except LengthOrHashMismatchError as exc:
                kind = "length_mismatch" if "length" in str(exc).lower() else "hash_mismatch"
                raise TrustError(kind, f"{artifact}: {exc}") from exc
        card = self._contract(target.custom)
        card_file = self.state_file.with_name("card.json")
        atomic_write_bytes(card_file, _CARD_JSON.text(target.custom, card))
        self._apply(_E.VERIFIED, None, card_file=str(card_file))

    def _install(self) -> None:
        record = self.record
        assert record.slot is not None and record.card_file is not None and record.artifact
        try:
            # the verified card as written: parsed (once per process for these bytes) and
            # copied into the slot as it is, not serialized again
            card_json = Path(record.card_file).read_bytes()
            card = parse_card(card_json)
            self.slots.write(record.slot, Path(record.artifact), card, card_json)
        except OSError as exc:
            raise UpdateRefused("install", f"the verified card {record.card_file}: {exc}") from exc
        except AgentError as exc:
            raise UpdateRefused("install", f"slot {record.slot}: {exc}") from exc
        self._apply(_E.INSTALLED, None)

    def _switched(self) -> bool:
        pointer = self.slots.pointer()
        return pointer is not None and pointer.active == self.record.slot

    def _test(self) -> None:
        record = self.record
        assert record.slot is not None and record.target is not None
        slot_dir = self.slots.dir(record.slot)
        if not self._switched():
            bundle = smoke_test(slot_dir, self.runtimes)
            before = self.slots.pointer()
            targets = dict(before.targets) if before else {}
            targets[record.slot] = record.target
            new = Pointer(
                active=record.slot, previous=before.active if before else None, targets=targets
            )
            # the pointer to restore on rollback is on disk before the switch
            self._save(replace(record, pointer_before=before.to_dict() if before else None))
            self.slots.switch(new)
            failpoints.check("updater.switched")
            try:
                self.host.activate(slot_dir)
            except UpdaterStoppedError:
                raise
            except AgentError as exc:
                raise UpdateRefused("activation", str(exc)) from exc
            model_id = bundle.model_id
        else:  # loaded at this start: every error since is the new model's
            model_id = ModelBundle.load(slot_dir).model_id
        self._health_check(model_id)
        self._apply(_E.HEALTHY, None)
        self._discard_artifact()

    def _health_check(self, model_id: str) -> None:
        """The champion must be ``model_id`` and have no runtime errors (counted by the host
        since it was installed) for ``health_s`` seconds."""
        deadline = time.monotonic() + self.health_s
        while True:
            health = self.host.health()
            if health.model_id != model_id:
                raise HealthCheckError(
                    f"the champion is {health.model_id!r}, not the new model {model_id!r}"
                )
            errors = health.runtime_errors
            if errors > 0:
                raise HealthCheckError(
                    f"the new model {model_id} failed on {errors} sample(s) after activation"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.stop_event.wait(min(self.health_poll_s, remaining)):
                raise UpdaterStoppedError

    def _save(self, record: UpdateRecord) -> None:
        """Persist ``record`` without a transition (data the next side effect relies on)."""
        atomic_write_json(self.state_file, record.to_dict())
        self.record = record

    def _roll_back(self, *, live: bool) -> None:
        """Finish the rollback: switch the pointer back if it names this update's slot, have
        ``runtimes`` restore what runs outside this process (an attached board) to the active
        slot, then reload the champion (``live``)."""
        record = self.record
        switched = self._switched()
        if switched:
            restore = Pointer.from_dict(record.pointer_before) if record.pointer_before else None
            self.slots.switch(restore)
        reason = record.reason
        try:
            note = self.runtimes.restore(self.slots.active_dir())
        except AgentError as exc:
            log.error("the previous model was not restored after the rollback: %s", exc)
            note = f"previous model NOT restored: {exc}"
        if note:
            reason = f"{reason}; {note}" if reason else note
        if switched and live:
            try:
                self.host.activate(self.slots.active_dir())
            except AgentError as exc:
                log.error("the previous champion did not load after the rollback: %s", exc)
        self._apply(_E.ROLLED_BACK, reason)
        self._discard_artifact()

    def _discard_artifact(self) -> None:
        """Remove the downloaded file and, once at rest, any partial download."""
        if self.record.state in AT_REST:
            self._remove_downloads()
        elif self.record.artifact:
            Path(self.record.artifact).unlink(missing_ok=True)

    def _remove_downloads(self) -> None:
        """Remove the downloaded file and every partial download."""
        artifact = self.record.artifact
        if artifact:
            Path(artifact).unlink(missing_ok=True)
        if self.record.card_file:
            Path(self.record.card_file).unlink(missing_ok=True)
        if self.partial_dir.is_dir():
            for partial in self.partial_dir.glob("*.part"):
                partial.unlink(missing_ok=True)
