"""A Rich progress bar over Keras training: one task per run, advanced per batch."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edgeops._tf import load_tf


def progress_callback(description: str, epochs: int, steps_per_epoch: int) -> Any:
    """A ``tf_keras.callbacks.Callback`` drawing a bar on stderr while ``fit`` runs.

    Rich draws nothing live when stderr is not a terminal, so it is safe under pipes and CI.
    """
    _tf, tf_keras = load_tf()
    base: Any = tf_keras.callbacks.Callback

    class RichProgress(base):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task: Any = None

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self._progress.start()
            self._task = self._progress.add_task(
                description, total=epochs * steps_per_epoch, status=f"epoch 1/{epochs}"
            )

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._progress.update(self._task, status=f"epoch {epoch + 1}/{epochs}")

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._progress.advance(self._task)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            shown = " ".join(
                f"{key} {float(value):.4f}" for key, value in sorted((logs or {}).items())
            )
            self._progress.update(self._task, status=f"epoch {epoch + 1}/{epochs} {shown}")

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.close()

        def close(self) -> None:
            """Stop drawing (also when ``fit`` raised before ``on_train_end``)."""
            self._progress.stop()

    return RichProgress()
