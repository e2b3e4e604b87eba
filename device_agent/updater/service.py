"""The updater inside the daemon: slots at start-up, a worker thread, fetch responses, swaps.

:class:`UpdateService` is what :class:`~device_agent.daemon.AgentDaemon` holds. Threads:

- the daemon's main loop calls :meth:`boot` (before the champion is loaded: seeds slot a from
  ``model_dir``, provisions the trusted root, applies the resume map), :meth:`on_desired`,
  :meth:`deliver` (every ``fetch/res`` payload) and :meth:`pump` (each turn: it performs the
  champion swaps the worker asked for, so the runtime is only ever replaced on that thread);
- one worker thread at a time runs the :class:`~device_agent.updater.updater.Updater`
  (downloads block it, not the main loop). When it finishes an update it looks at the latest
  desired release again, so a release named meanwhile is not lost.

``desired.release`` is ``null`` (nothing to do) or ``{"target": "<target path>"}`` (an
optional ``model_id`` is informative). A target the active slot already holds, or the one
that was just rolled back, starts nothing; a new desired release does not interrupt an
update in progress, it runs after it.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.card import ModelCard
from device_agent.config import AgentSettings
from device_agent.errors import AgentError, ProtocolError
from device_agent.updater.machine import AT_REST, UpdateState
from device_agent.updater.slots import Slots
from device_agent.updater.updater import (
    LOCAL_RUNTIMES,
    ChampionHealth,
    Runtimes,
    Transition,
    TrustSource,
    Updater,
    UpdaterStoppedError,
)

__all__ = ["TARGET_PATTERN", "UpdateService", "parse_release"]

log = logging.getLogger(__name__)

TARGET_PATTERN = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
MAX_TARGET_LENGTH = 512
SWAP_POLL_S = 0.25
JOIN_TIMEOUT_S = 5.0


def parse_release(release: Any) -> str | None:
    """The target path ``desired.release`` names, or None; ProtocolError if malformed."""
    if release is None:
        return None
    if not isinstance(release, dict):
        raise ProtocolError(f"desired 'release' must be an object or null, got {release!r}")
    target = release.get("target")
    if not isinstance(target, str) or not target:
        raise ProtocolError(f"desired release: 'target' must be a string, got {target!r}")
    if (
        len(target) > MAX_TARGET_LENGTH
        or not TARGET_PATTERN.fullmatch(target)
        or any(part in (".", "..") for part in target.split("/"))
    ):
        raise ProtocolError(
            f"desired release: target {target[:80]!r} is not a relative target path of "
            f"letters, digits, '.', '_', '-' and '/' (at most {MAX_TARGET_LENGTH} characters)"
        )
    return target


@dataclass
class _Swap:
    bundle_dir: Path | None
    done: threading.Event = field(default_factory=threading.Event)
    error: AgentError | None = None


class UpdateService:
    """The daemon's updater (see the module docstring).

    ``swap`` replaces the champion with the bundle in a directory (None: no model) and raises
    AgentError if it cannot; ``health`` tells the champion's model id and runtime errors;
    ``report`` sends a transition as an ``update`` event; ``send_fetch`` publishes one
    ``fetch/req`` payload. ``trust`` (tests) replaces the TUF client built from the settings.
    ``wake`` is called after a champion swap was queued for the main loop, so a loop waiting
    for MQTT events or samples takes it at once. ``runtimes`` opens bundles for the smoke
    test and restores attached hardware after a rollback (an attached board:
    :class:`device_agent.gateway.Gateway`).
    """

    def __init__(
        self,
        settings: AgentSettings,
        hardware: dict[str, str],
        *,
        swap: Callable[[Path | None], None],
        health: Callable[[], ChampionHealth],
        report: Callable[[Transition], None],
        send_fetch: Callable[[bytes], None],
        trust: Callable[[], TrustSource] | None = None,
        wake: Callable[[], None] | None = None,
        runtimes: Runtimes = LOCAL_RUNTIMES,
    ) -> None:
        self.settings = settings
        self.hardware = dict(hardware)
        self._swap = swap
        self._health = health
        self._report = report
        self._send_fetch = send_fetch
        self._wake = wake
        self.fetcher: Any = None
        self.slots = Slots(settings.state_dir / "slots")
        self.updater = Updater(
            settings.state_dir,
            trust=trust or self._make_trust,
            contract=self._check_contract,
            host=self,
            health_s=settings.update_health_s,
            max_attempts=settings.update_max_attempts,
            runtimes=runtimes,
        )
        self._swaps: queue.Queue[_Swap] = queue.Queue()
        self._lock = threading.Lock()
        self._wanted: str | None = None
        self._resume_pending = False
        self._running = False
        self._thread: threading.Thread | None = None

    # -- the main loop's side --------------------------------------------------------------

    @property
    def state(self) -> UpdateState:
        return self.updater.state

    def boot(self) -> Path | None:
        """Prepare the slots and apply the resume map; the champion's bundle directory.

        Slot a is seeded from ``model_dir`` on the first start (so a rollback always has a
        target); afterwards the champion is the active slot's bundle (see
        :meth:`Slots.seed` for a changed ``model_dir``).
        """
        try:
            self.settings.provision_trust_root()
        except AgentError as exc:
            log.error("trusted root not provisioned: %s", exc)
        model_dir = self.settings.model_dir
        try:  # not while an update is in progress: it owns the inactive slot
            if model_dir is not None and self.state in AT_REST and self.slots.seed(model_dir):
                log.info("configured model %s activated in slot %s", model_dir, self.slots.active())
        except (AgentError, OSError) as exc:  # reported when the daemon loads model_dir
            log.error("configured model %s not put in a slot: %s", model_dir, exc)
        self._wanted = self._saved_desired_target()
        try:
            self._resume_pending = self.updater.boot(self._wanted)
        except (AgentError, OSError) as exc:  # e.g. a pointer file damaged by hand
            log.error("interrupted update not resumed: %s", exc)
        try:
            active = self.slots.active_dir()
        except AgentError as exc:
            log.error("slot pointer unusable, falling back to model_dir: %s", exc)
            active = None
        return active if active is not None else model_dir

    def start(self) -> None:
        """Carry on an interrupted update, or start the one the desired release names."""
        self._kick()

    def on_desired(self, document: dict[str, Any]) -> bool:
        """Take the desired document's ``release``; ProtocolError if it is malformed.

        Returns True if an update was started (or queued behind the running one).
        """
        target = parse_release(document.get("release"))
        with self._lock:
            self._wanted = target
        if target is None:
            return False
        return self._kick()

    def deliver(self, payload: bytes) -> None:
        """A ``fetch/res`` payload for the fetcher (dropped when no download is running)."""
        fetcher = self.fetcher
        if fetcher is None or not hasattr(fetcher, "deliver"):
            log.debug("fetch response with no download running; dropped")
            return
        fetcher.deliver(payload)

    def pump(self) -> None:
        """Perform the champion swaps the worker asked for (main loop thread only)."""
        while True:
            try:
                swap = self._swaps.get_nowait()
            except queue.Empty:
                return
            try:
                self._swap(swap.bundle_dir)
            except AgentError as exc:
                swap.error = exc
            swap.done.set()

    def swap_pending(self) -> bool:
        """True while a champion swap waits for the main loop's :meth:`pump`."""
        return not self._swaps.empty()

    def slots_report(self) -> dict[str, Any]:
        return self.slots.describe()

    def stop(self) -> None:
        """Stop the worker; an update in progress is resumed at the next start."""
        self.updater.stop_event.set()
        fetcher = self.fetcher
        if fetcher is not None and hasattr(fetcher, "close"):
            fetcher.close()
        thread = self._thread
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning("updater still busy at stop; its state is resumed at the next start")

    # -- UpdaterHost (the worker's side) ---------------------------------------------------

    def activate(self, bundle_dir: Path | None) -> None:
        swap = _Swap(bundle_dir)
        self._swaps.put(swap)
        if self._wake is not None:
            self._wake()  # the main loop may be waiting for MQTT events or samples
        while not swap.done.wait(SWAP_POLL_S):
            if self.updater.stop_event.is_set():
                raise UpdaterStoppedError("the agent stops")
        if swap.error is not None:
            raise swap.error

    def health(self) -> ChampionHealth:
        return self._health()

    def report(self, transition: Transition) -> None:
        self._report(transition)

    # -- the worker ------------------------------------------------------------------------

    def _kick(self) -> bool:
        with self._lock:
            if self._running:
                return True  # the worker looks at the desired release when it is done
            if not self._resume_pending and not self._wants(self._wanted):
                return False
            self._running = True
            self._thread = threading.Thread(target=self._work, name="edgeops-updater", daemon=True)
            self._thread.start()
            return True

    def _wants(self, target: str | None) -> bool:
        if target is None or self.updater.stop_event.is_set():
            return False
        try:
            return self.updater.wants(target)
        except AgentError as exc:
            log.error("update to %s not started: %s", target, exc)
            return False

    def _work(self) -> None:
        try:
            if self._resume_pending:
                self._resume_pending = False
                self.updater.resume()
            while True:
                with self._lock:
                    target = self._wanted
                    if not self._wants(target):
                        self._running = False
                        return
                assert target is not None
                self.updater.update(target)
                if self.updater.stop_event.is_set():
                    break
        except Exception:  # the worker must end cleanly; the state file says where it stood
            log.exception("updater worker failed")
        with self._lock:
            self._running = False

    # -- collaborators ---------------------------------------------------------------------

    def _make_trust(self) -> TrustSource:
        from device_agent.fetch import HttpFetcher, MqttFetcher
        from device_agent.updater.trust import TrustClient

        settings = self.settings
        partial_dir = self.updater.partial_dir
        fetcher: HttpFetcher | MqttFetcher
        if settings.update_transport == "http":
            assert settings.hub_url is not None
            fetcher = HttpFetcher(settings.hub_url, partial_dir=partial_dir)
        else:
            fetcher = MqttFetcher(
                self._send_fetch, partial_dir=partial_dir, device_id=settings.device_id
            )
        self.fetcher = fetcher
        if self.updater.stop_event.is_set():
            fetcher.close()
        trust_dir = settings.trust_dir
        return TrustClient(trust_dir / "metadata", fetcher, trust_dir / "targets")

    def _check_contract(self, custom: Any) -> ModelCard:
        from device_agent.updater.contract import (
            FIRMWARE_CARD_RUNTIME,
            DeviceFacts,
            check_contract,
        )
        from device_agent.updater.errors import ContractError

        # an attached board (the [mcu] table) runs firmware releases
        mcu = self.settings.mcu
        extra = {FIRMWARE_CARD_RUNTIME} if mcu is not None else set()
        card = check_contract(custom, DeviceFacts.detect(self.hardware, extra_runtimes=extra))
        if (
            mcu is not None
            and mcu.target is not None
            and card.firmware is not None
            and card.firmware.target != mcu.target
        ):
            raise ContractError(
                "hardware",
                f"the release is firmware for {card.firmware.target}; the board on {mcu.port} "
                f"is a {mcu.target}",
            )
        return card

    def _saved_desired_target(self) -> str | None:
        path = self.settings.state_dir / "desired.json"
        try:
            document = json.loads(path.read_bytes())
            return parse_release(document.get("release")) if isinstance(document, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ProtocolError) as exc:
            log.warning("saved desired state %s unusable: %s", path, exc)
            return None
