"""What the embedded broker and a private Mosquitto share as child processes of ours.

:class:`_BrokerChild` owns the child process and the file its output is logged to: it stops the
child (SIGTERM, then SIGKILL), reports a child that had died by itself, and reads the tail of
its log. Subclasses launch the child and say where the log is and how to name the broker.
"""

from __future__ import annotations

import signal
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

from edgeops.errors import BrokerError


class _BrokerChild(ABC):
    """A broker running in a child process whose output goes to a log file."""

    _NORMAL_EXIT_CODES: ClassVar[tuple[int, ...]] = (0, -signal.SIGTERM, -signal.SIGINT)
    """Exit codes of a child that was stopped, not one that died by itself."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @abstractmethod
    def start(self) -> None:
        """Start the child and wait until it serves; :class:`BrokerError` if it fails."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait (SIGKILL after ``timeout_s``); BrokerError if it had died by itself.

        The error carries the tail of the child's log.
        """
        ended_by_itself = self._terminate(timeout_s)
        crashed = ended_by_itself is not None and ended_by_itself not in self._NORMAL_EXIT_CODES
        tail = self.log_tail() if crashed else ""
        self._after_stop()
        if crashed:
            raise BrokerError(
                f"{self._describe()} had exited by itself with code {ended_by_itself}; {tail}"
            )

    def log_tail(self, lines: int = 8, *, since: int = 0) -> str:
        """The last ``lines`` lines of the child's log (from byte ``since``), on one line."""
        try:
            with self._log_file().open("rb") as fh:
                fh.seek(since)
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "no log was written"
        tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return "log: " + " | ".join(tail) if tail else "the log is empty"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @abstractmethod
    def _log_file(self) -> Path:
        """The file the child's output is appended to."""

    @abstractmethod
    def _describe(self) -> str:
        """The broker as the error of :meth:`stop` names it, e.g. ``Mosquitto on host:port``."""

    def _after_stop(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Called by :meth:`stop` once the child is gone and its log tail was read."""

    def _terminate(self, timeout_s: float) -> int | None:
        """Stop the child if it runs; its exit code if it had already ended by itself."""
        process, self._process = self._process, None
        if process is None:
            return None
        ended_by_itself = process.poll()
        if ended_by_itself is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:  # a pipe we read from (the embedded broker's ready line)
            process.stdout.close()
        self._close_log()
        return ended_by_itself

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
