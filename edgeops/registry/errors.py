"""Errors of the model registry and metadata store.

RegistryError (EdgeOpsError)
├── ModelNotFoundError        no model version matches a reference      (also a NotFoundError)
├── RunNotFoundError          no run has this id                        (also a NotFoundError)
├── InvalidModelError         bad input to register_model: name, format, metrics ...
├── UnknownStageError         a stage name that is not one of the four
├── InvalidStageTransitionError  a promotion the stage rules forbid (names both stages)
├── CorruptArtifactError      a model's stored bytes no longer match its sha256
│                             (also edgeops.store.CorruptArtifactError)
└── MissingArtifactError      a model's artifact is gone from the store
                              (also edgeops.store.MissingArtifactError)
"""

from __future__ import annotations

from edgeops import store
from edgeops.errors import EdgeOpsError, NotFoundError

__all__ = [
    "CorruptArtifactError",
    "InvalidModelError",
    "InvalidStageTransitionError",
    "MissingArtifactError",
    "ModelNotFoundError",
    "RegistryError",
    "RunNotFoundError",
    "UnknownStageError",
]


class RegistryError(EdgeOpsError):
    """Base of every error the registry raises on purpose."""


class ModelNotFoundError(RegistryError, NotFoundError):
    """No model version matches the reference (id, NAME, NAME:SEQ or NAME@STAGE)."""


class RunNotFoundError(RegistryError, NotFoundError):
    """No run has this id."""


class InvalidModelError(RegistryError):
    """register_model was given something it cannot record (the message names the field)."""


class UnknownStageError(RegistryError):
    """A stage name that is not candidate, staging, production or archived."""


class InvalidStageTransitionError(RegistryError):
    """A promotion the stage rules forbid; the message names the current and the asked stage."""


class CorruptArtifactError(RegistryError, store.CorruptArtifactError):
    """A model's artifact bytes no longer hash to the digest recorded for it."""


class MissingArtifactError(RegistryError, store.MissingArtifactError):
    """A model's artifact is no longer in the artifact store."""
