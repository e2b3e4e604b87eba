"""The one interface every board of the rig is driven through.

A board is what a test plan deploys to, feeds and breaks: a Cortex-M firmware image under
QEMU (:mod:`hil.boards.qemu`), a real microcontroller on a serial port
(:mod:`hil.boards.serial`), or a device agent on a Linux host of its own
(:mod:`hil.boards.linux`). Each implements :class:`Board`:

- :meth:`Board.deploy` puts an image on the board (an ELF or binary for a microcontroller,
  a model bundle directory for a Linux agent) and starts it;
- :meth:`Board.reset` restarts it cleanly; :meth:`Board.power_cut` removes power without
  warning (nothing is flushed), waits, and powers it on again;
- :meth:`Board.send_input` hands one input tensor to the model on the board and
  :meth:`Board.read_output` waits for its answer; :meth:`Board.infer` does both;
- :meth:`Board.read_metrics` reports what the board knows of itself (image, boots, cycles,
  memory ...) as a flat mapping of numbers and strings;
- :meth:`Board.close` stops everything the board started. Boards are context managers.

Every failure is a :class:`BoardError` whose message names the board and what went wrong.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import numpy as np

from hil.errors import HilError

__all__ = ["Board", "BoardError", "BoardOutput", "Metrics"]

Metrics = dict[str, float | int | str | None]


class BoardError(HilError):
    """A board did not do what it was asked; the message names the board."""


@dataclass(frozen=True)
class BoardOutput:
    """One answer of the model on a board."""

    values: np.ndarray
    """The output tensor as the board produced it (int8 for a microcontroller running a
    full-int8 model, float32 from a Linux agent)."""
    latency_s: float
    """Wall-clock seconds from sending the input to receiving the answer, on the rig."""
    cycles: int | None = None
    """What the board measured itself (a microcontroller's cycle or instruction count for
    the inference alone), None if it measures nothing."""
    extra: dict[str, object] = field(default_factory=dict)


class Board(abc.ABC):
    """A board under test; see the module docstring."""

    kind: ClassVar[str]
    """``qemu``, ``serial`` or ``linux``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def deploy(self, image: Path) -> None:
        """Put ``image`` on the board and start it (flash and boot, or install and restart)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Restart the board cleanly with the image it has."""

    @abc.abstractmethod
    def power_cut(self, off_s: float = 0.0) -> None:
        """Remove power at once (nothing is flushed), wait ``off_s``, power on again."""

    @abc.abstractmethod
    def send_input(self, tensor: np.ndarray) -> None:
        """Send one input tensor to the model on the board."""

    @abc.abstractmethod
    def read_output(self, timeout_s: float = 10.0) -> BoardOutput:
        """The answer to the last input sent; BoardError if none comes within ``timeout_s``."""

    def infer(self, tensor: np.ndarray, timeout_s: float = 10.0) -> BoardOutput:
        """:meth:`send_input` then :meth:`read_output`."""
        self.send_input(tensor)
        return self.read_output(timeout_s)

    @abc.abstractmethod
    def read_metrics(self) -> Metrics:
        """What the board reports of itself, as a flat mapping."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop everything the board started; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
