"""Pipelines: a small persisted DAG runner, and the continuous-training pipeline on it.

    from edgeops.pipelines import Pipeline, PipelineRunner, Step

    runner = PipelineRunner(database, [pipeline], registry=registry)
    view = runner.run("example", {"model": "digits-cnn"})
    runner.resume()            # after a restart: runs whose process died carry on

    from edgeops.pipelines.ct import CTParams, CTServices, ct_pipeline
    runner = PipelineRunner(database, [ct_pipeline(services)], registry=registry)
    runner.run("ct", CTParams(model="digits-mlp-int8", labeler={"kind": "oracle"}).to_dict())

See :mod:`edgeops.pipelines.runner`, :mod:`edgeops.pipelines.ct` and docs/pipelines.md.
"""

from edgeops.pipelines.errors import (
    CTConfigError,
    LabelingError,
    LeaseLostError,
    PipelineDefinitionError,
    PipelineError,
    PipelineRunNotFoundError,
    StepFailedError,
    StepTimeoutError,
)
from edgeops.pipelines.labeling import (
    Labeler,
    LabelledFileLabeler,
    SimulatedOracle,
    labeler_from_params,
)
from edgeops.pipelines.runner import (
    METADATA_RUN_KIND,
    Pipeline,
    PipelineRunner,
    PipelineRunView,
    Step,
    StepContext,
    StepView,
)

__all__ = [
    "METADATA_RUN_KIND",
    "CTConfigError",
    "Labeler",
    "LabelingError",
    "LabelledFileLabeler",
    "LeaseLostError",
    "Pipeline",
    "PipelineDefinitionError",
    "PipelineError",
    "PipelineRunNotFoundError",
    "PipelineRunView",
    "PipelineRunner",
    "SimulatedOracle",
    "Step",
    "StepContext",
    "StepFailedError",
    "StepTimeoutError",
    "StepView",
    "labeler_from_params",
]
