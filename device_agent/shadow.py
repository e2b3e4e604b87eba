"""The challenger slot: a second model run in shadow mode beside the champion.

A challenger named by the desired state (``{"challenger": {"model_id": ..., "path": ...}}``,
the path under ``models_dir``) runs on the same inputs as the champion; its outputs never
leave the agent, only its agreement with the champion and its latency (a
:class:`ShadowResult`) go into the telemetry window.

:class:`ChallengerSpec` parses and validates the desired document; :class:`ChallengerSlot`
holds the running challenger, loads (checked against the champion) and stops its bundle, and
runs it on a sample. Neither logs nor sends events: the daemon decides what a refused or
stopped challenger means for its windows and its reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import AgentError
from device_agent.runtime import ModelBundle, Prediction, Runtime, open_runtime
from device_agent.telemetry import ShadowResult

__all__ = ["RUN_ERRORS", "ChallengerError", "ChallengerSlot", "ChallengerSpec"]

# errors a runtime may raise on a sample beyond InputError (interpreter failures, numpy)
RUN_ERRORS = (AgentError, ValueError, TypeError, RuntimeError, FloatingPointError)


class ChallengerError(AgentError):
    """The desired state names a challenger that cannot run beside the champion."""


@dataclass(frozen=True)
class ChallengerSpec:
    """A challenger as the desired state names it, its path resolved inside ``models_dir``."""

    model_id: str
    path: Path

    @classmethod
    def parse(cls, spec: Any, models_dir: Path) -> ChallengerSpec:
        """Validate the desired ``challenger`` object; :class:`ChallengerError` if it is bad."""
        if not isinstance(spec, dict):
            raise ChallengerError(f"desired 'challenger' must be an object, got {spec!r}")
        model_id, raw_path = spec.get("model_id"), spec.get("path")
        if not isinstance(model_id, str) or not model_id:
            raise ChallengerError(
                f"desired challenger: 'model_id' must be a string, got {model_id!r}"
            )
        if not isinstance(raw_path, str) or not raw_path:
            raise ChallengerError(f"desired challenger: 'path' must be a string, got {raw_path!r}")
        root = models_dir.resolve()
        path = (root / raw_path).resolve()
        if not path.is_relative_to(root):
            raise ChallengerError(
                f"desired challenger path {raw_path!r} is outside the models dir {root}"
            )
        return cls(model_id, path)


class ChallengerSlot:
    """The challenger the daemon runs in shadow mode, if any."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.path: Path | None = None

    def holds(self, spec: ChallengerSpec) -> bool:
        """True if the challenger named by ``spec`` is the one already running."""
        current = self.runtime
        return current is not None and current.model_id == spec.model_id and self.path == spec.path

    def load(self, spec: ChallengerSpec, champion: ModelBundle | None) -> Runtime:
        """Open the bundle ``spec`` names, checked against ``champion``; not yet installed."""
        if champion is None:
            raise ChallengerError("no champion is loaded to compare a challenger with")
        model_id, path = spec.model_id, spec.path
        bundle = ModelBundle.load(path)
        if bundle.model_id != model_id:
            raise ChallengerError(
                f"bundle in {path} holds model {bundle.model_id!r}, desired names {model_id!r}"
            )
        if bundle.rule.input_shape != champion.rule.input_shape:
            raise ChallengerError(
                f"challenger {model_id} takes input shape {bundle.rule.input_shape}, "
                f"the champion {champion.model_id} takes {champion.rule.input_shape}"
            )
        return open_runtime(bundle)

    def install(self, runtime: Runtime, path: Path) -> None:
        """Make ``runtime`` (loaded from ``path``) the running challenger."""
        self.runtime, self.path = runtime, path

    def stop(self) -> Runtime | None:
        """Empty the slot and close its runtime; the runtime stopped, or None if empty."""
        runtime = self.runtime
        if runtime is None:
            return None
        self.runtime, self.path = None, None
        runtime.close()
        return runtime

    def run(self, raw: np.ndarray, champion: Prediction) -> ShadowResult | None:
        """Run the challenger on the champion's input; None if the slot is empty.

        Its output never leaves the agent. A failing sample raises one of
        :data:`RUN_ERRORS`, for the caller to count.
        """
        challenger = self.runtime
        if challenger is None:
            return None
        prediction = challenger.infer(raw)
        agreed = prediction.label == champion.label
        return ShadowResult(challenger.model_id, agreed, prediction.latency_s)
