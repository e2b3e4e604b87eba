"""What every step of a run shares: the hub, the boards, the releases made, the clock.

A step function takes the :class:`RunContext` and its :class:`~hil.plan.Step`, does its
action and returns an :class:`Outcome`: the observed values the runner checks the step's
``expect:`` assertions against, with metrics, series and rows for the reports. A step that
cannot carry out its action raises (any exception: the step's status is ``error``); a step
whose own check does not hold (a fleet invariant) raises :class:`StepFailure` (``failed``).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from hil.boards.base import Board
from hil.errors import HilError
from hil.plan import Plan
from hil.report import Metric, TimelineEvent

if TYPE_CHECKING:
    from hil.hub import RigHub

__all__ = [
    "BoardModel",
    "Outcome",
    "Release",
    "RunContext",
    "StepError",
    "StepFailure",
]


class StepError(HilError):
    """A step could not carry out its action (the message says why)."""


class StepFailure(HilError):  # noqa: N818 - a step's failure, not an error
    """A step's own check did not hold (a fleet invariant, for instance)."""


@dataclass
class Outcome:
    """What a step observed.

    ``observed`` holds the values assertions are checked against: ``bit_exact``,
    ``latencies_ms`` (every sample), ``states`` and ``reasons`` (per board), ``state`` and
    ``reason`` (a rollout's), ``flash_bytes``, ``ram_bytes``, ``errors``, ``samples``,
    ``corrupted`` (per board: chunks its proxy corrupted).

    ``pending`` are threads still gathering evidence after the step function returned (a
    fault in the background, a corruption not yet seen): they add to the outcome with
    :meth:`record`, and the runner checks the step's assertions and adds their metrics to
    the report once they have ended (at the latest at the end of the run).
    """

    observed: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    rows: list[dict[str, Metric]] = field(default_factory=list)
    message: str = ""
    pending: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(
        self,
        metrics: dict[str, Metric] | None = None,
        observed: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Add ``metrics``, and per-board ``observed`` values (``{"corrupted": {board: n}}``
        merged into the dictionaries there), from any thread."""
        with self.lock:
            self.metrics.update(metrics or {})
            for key, values in (observed or {}).items():
                self.observed.setdefault(key, {}).update(values)


@dataclass
class Release:
    """A release a ``release`` step made."""

    id: str
    target_path: str
    model_id: str
    runtime: str
    firmware: str | None
    tflite: bytes | None
    """The .tflite the firmware was generated from (altered one, if tampered)."""
    reference_tflite: bytes | None
    """The model's own .tflite (what the card describes)."""
    tampered: bool = False


@dataclass
class BoardModel:
    """What this run last put on a board: enough to feed it and know its answers."""

    release: Release | None
    tflite: bytes | None = None
    """Microcontroller boards: the .tflite the running image was generated from."""
    input_shape: tuple[int, ...] = ()
    input_dtype: str = "int8"


@dataclass
class RunContext:
    """State shared by a run's steps; see the module docstring."""

    plan: Plan
    seed: int
    workdir: Path
    stack: ExitStack
    progress_stream: TextIO | None = sys.stderr
    t0: float = field(default_factory=time.monotonic)
    timeline: list[TimelineEvent] = field(default_factory=list)
    boards: dict[str, Board] = field(default_factory=dict)
    board_info: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    """Board -> why it is skipped (the rig cannot run it here)."""
    broken: dict[str, str] = field(default_factory=dict)
    """Board (or ``hub``) -> why it did not start."""
    releases: dict[str, Release] = field(default_factory=dict)
    loaded: dict[str, BoardModel] = field(default_factory=dict)
    open_rollout: str | None = None
    background: list[threading.Thread] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)
    deadline: float = float("inf")
    """time.monotonic() by which the current step must end (its timeout, the plan's)."""
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the run ends: evidence threads stop watching, faults in force heal."""
    _hub: RigHub | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.np_rng = np.random.default_rng(self.seed)

    # -- time and the timeline -------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def event(self, what: str, text: str, board: str | None = None) -> None:
        """Note something on the run's timeline (and on the progress stream)."""
        with self._lock:
            self.timeline.append(TimelineEvent(round(self.now(), 3), what, text, board))
        self.progress(f"  {what}: {(board + ': ') if board else ''}{text}")

    def progress(self, line: str) -> None:
        if self.progress_stream is not None:
            print(line, file=self.progress_stream, flush=True)

    def remaining(self, wanted_s: float) -> float:
        """``wanted_s``, or less if the step's deadline comes first (never below 0.1)."""
        return max(0.1, min(wanted_s, self.deadline - time.monotonic()))

    # -- parts -----------------------------------------------------------------------------

    @property
    def hub(self) -> RigHub:
        if "hub" in self.broken:
            raise StepError(f"the rig's hub did not start: {self.broken['hub']}")
        if self._hub is None:
            raise StepError("this plan runs no hub")
        return self._hub

    def set_hub(self, hub: RigHub) -> None:
        self._hub = hub

    @property
    def has_hub(self) -> bool:
        return self._hub is not None

    def board(self, name: str) -> Board:
        if name in self.broken:
            raise StepError(f"board {name} did not start: {self.broken[name]}")
        if name not in self.boards:
            raise StepError(f"board {name} is not running")
        return self.boards[name]

    def device_id(self, name: str) -> str:
        """The device id a Linux board's agent reports under."""
        board = self.board(name)
        device_id = getattr(board, "device_id", None)
        if not isinstance(device_id, str):
            raise StepError(f"board {name} is no Linux board with a device agent")
        return device_id

    def release(self, rid: str) -> Release:
        if rid not in self.releases:
            raise StepError(f"release '{rid}' was not made (its release step did not pass)")
        return self.releases[rid]

    def stop_threads(self, threads: list[threading.Thread], timeout_s: float) -> list[str]:
        """Set :attr:`stopping` and wait up to ``timeout_s`` in all for ``threads`` and the
        background faults to end; the names of those still running."""
        self.stopping.set()
        deadline = time.monotonic() + timeout_s
        alive = []
        for thread in [*self.background, *threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                alive.append(thread.name)
        return alive

    def join_background(self, timeout_s: float) -> None:
        """Wait for faults running in the background to end (they heal what they broke)."""
        deadline = time.monotonic() + timeout_s
        for thread in self.background:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.background = [t for t in self.background if t.is_alive()]
