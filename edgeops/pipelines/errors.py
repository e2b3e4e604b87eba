"""Errors of the pipeline runner and the continuous-training pipeline.

PipelineError (EdgeOpsError)
├── PipelineDefinitionError  a malformed pipeline: duplicate or unknown step, a cycle ...
├── PipelineRunNotFoundError (also NotFoundError) no run has that id
├── LeaseLostError           another process took the run over (this one stalled too long)
├── StepFailedError          raised inside a step: it gives up at once, without retries
├── StepTimeoutError         a step attempt ran past its timeout (retried like any failure)
├── CTConfigError (also ConfigError) bad continuous-training parameters
└── LabelingError            the labelling source could not label the collected samples
"""

from __future__ import annotations

from edgeops.errors import ConfigError, EdgeOpsError, NotFoundError

__all__ = [
    "CTConfigError",
    "LabelingError",
    "LeaseLostError",
    "PipelineDefinitionError",
    "PipelineError",
    "PipelineRunNotFoundError",
    "StepFailedError",
    "StepTimeoutError",
]


class PipelineError(EdgeOpsError):
    """Something about a pipeline or one of its runs is wrong."""


class PipelineDefinitionError(PipelineError, ConfigError):
    """A pipeline that cannot run: duplicate or unknown steps, a cycle, bad retry settings."""


class PipelineRunNotFoundError(PipelineError, NotFoundError):
    """No pipeline run has that id."""


class LeaseLostError(PipelineError):
    """This process no longer holds the run's lease; another one carries it on."""


class StepFailedError(PipelineError):
    """A step gives up: no retry would help; its message is recorded as the step's error."""


class StepTimeoutError(PipelineError):
    """A step attempt ran longer than its timeout."""


class CTConfigError(PipelineError, ConfigError):
    """Bad parameters for the continuous-training pipeline."""


class LabelingError(PipelineError):
    """The labelling source could not label the samples (unreadable file, unknown class ...)."""
