"""The model registry and metadata store: runs, model versions, stages, artifacts, lineage.

    registry = Registry(database, ArtifactStore(settings.artifacts_dir))
    with registry.start_run("train", {"arch": "cnn"}) as run:
        ...
        model = registry.register_model(name="digits-cnn", artifact=blob, format="keras",
                                        run_id=run.id, dataset_version=dv, parent_id=None,
                                        config={...}, metrics={...}, card=None)
    registry.promote(model.id, "staging")

See docs/registry.md.
"""

from edgeops.registry.codeversion import code_version
from edgeops.registry.errors import (
    CorruptArtifactError,
    InvalidModelError,
    InvalidStageTransitionError,
    MissingArtifactError,
    ModelNotFoundError,
    RegistryError,
    RunNotFoundError,
    UnknownStageError,
)
from edgeops.registry.models import (
    MODEL_FORMATS,
    ModelVersion,
    ModelVersionView,
    Run,
    RunStatus,
    RunView,
)
from edgeops.registry.runs import RunHandle
from edgeops.registry.service import Registry
from edgeops.registry.stages import ALLOWED_PROMOTIONS, Stage

__all__ = [
    "ALLOWED_PROMOTIONS",
    "MODEL_FORMATS",
    "CorruptArtifactError",
    "InvalidModelError",
    "InvalidStageTransitionError",
    "MissingArtifactError",
    "ModelNotFoundError",
    "ModelVersion",
    "ModelVersionView",
    "Registry",
    "RegistryError",
    "Run",
    "RunHandle",
    "RunNotFoundError",
    "RunStatus",
    "RunView",
    "Stage",
    "UnknownStageError",
    "code_version",
]
