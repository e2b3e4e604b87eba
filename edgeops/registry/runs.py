"""A run in progress: :class:`RunHandle`, returned by :meth:`Registry.start_run`.

::

    with registry.start_run("train", {"arch": "cnn", "epochs": 5}) as run:
        run.log("epoch 1/5")
        ...
        run.log_metrics({"accuracy": 0.97})
        registry.register_model(..., run_id=run.id, ...)

The run's row is written when it starts (status ``running``) so that models registered inside
it can point at it. When the block ends the row gets its end time, duration, metrics and log
lines, and ``succeeded``; if the block raises, ``failed`` with the error, and the exception
goes on. A process killed inside the block leaves the run ``running``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from edgeops.registry._json import json_document
from edgeops.registry.models import RunStatus

if TYPE_CHECKING:
    from edgeops.registry.service import Registry

__all__ = ["RunHandle"]

log = logging.getLogger(__name__)


class RunHandle:
    """A started run. Use it as a context manager; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        run_id: str,
        kind: str,
        params: dict[str, Any],
        started_at: datetime,
    ) -> None:
        self._registry = registry
        self.id = run_id
        self.kind = kind
        self.params = params
        self.started_at = started_at
        self.status = RunStatus.RUNNING
        self.metrics: dict[str, Any] = {}
        self.logs: list[str] = []

    @property
    def run_id(self) -> str:
        """The same as :attr:`id`."""
        return self.id

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r}, kind={self.kind!r}, status={self.status!r})"

    def log(self, line: str) -> None:
        """Add a line to the run's log (stored when the run ends; also logged at INFO)."""
        log.info("run %s: %s", self.id, line)
        self.logs.append(str(line))

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Merge ``metrics`` into the run's metrics (stored when the run ends).

        They must be JSON-able (NumPy numbers are converted; NaN is refused)."""
        self.metrics.update(json_document(metrics, f"metrics of run {self.id}"))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status != RunStatus.RUNNING:
            return
        if exc is None:
            self._registry._finish_run(self, RunStatus.SUCCEEDED, None)
            self.status = RunStatus.SUCCEEDED
            return
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.status = RunStatus.FAILED
        try:
            self._registry._finish_run(self, RunStatus.FAILED, error)
        except Exception as record_error:  # noqa: BLE001 - never hide the run's own error
            log.warning("could not record the failure of run %s: %s", self.id, record_error)
