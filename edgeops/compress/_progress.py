"""A Rich progress bar over named steps, on stderr (so ``--json`` output stays clean)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Steps:
    """``with Steps(4, "compress") as steps: steps.start("baseline"); ...; steps.done()``.

    With ``enabled=False`` nothing is drawn. ``total`` may grow (``steps.add(1)``) when the
    work turns out longer, as when a fallback is tried.
    """

    def __init__(self, total: int, title: str, *, enabled: bool = True) -> None:
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
        self._title = title
        self._task = self._progress.add_task(title, total=total) if self._progress else None

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, what: str) -> None:
        """Show that ``what`` is being done now."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self._title}: {what}")

    def done(self, count: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, count)

    def add(self, count: int) -> None:
        """Make the bar ``count`` steps longer."""
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, total=(task.total or 0) + count)
