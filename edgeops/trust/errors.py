"""Errors of the release repository. Each message names the role, key or file concerned.

TrustError                      (EdgeOpsError)
├── TrustNotInitialisedError    no repository yet: run ``edgeops keys init``   (ConfigError)
├── TrustAlreadyInitialisedError ``keys init`` over an existing repository     (ConfigError)
├── KeyFileError                a key file or key directory is missing, unreadable or not
│                               an Ed25519 private key                          (ConfigError)
├── RootKeysError               fewer root keys at hand than the root threshold (ConfigError)
├── ThresholdError              an impossible key count or threshold            (ConfigError)
├── UnknownRoleError            a role other than root/targets/snapshot/timestamp (ConfigError)
├── MetadataError               repository metadata on disk is missing or does not verify
├── TargetPathError             a target path that is not a safe relative path
└── ReleaseError                a model cannot be released for the runtime asked
    └── HardwareTagsError       malformed --hardware tags                       (ConfigError)
"""

from __future__ import annotations

from edgeops.errors import ConfigError, EdgeOpsError

__all__ = [
    "HardwareTagsError",
    "KeyFileError",
    "MetadataError",
    "ReleaseError",
    "RootKeysError",
    "TargetPathError",
    "ThresholdError",
    "TrustAlreadyInitialisedError",
    "TrustError",
    "TrustNotInitialisedError",
    "UnknownRoleError",
]


class TrustError(EdgeOpsError):
    """Base class of the release repository's errors."""


class TrustNotInitialisedError(TrustError, ConfigError):
    """The trust repository does not exist yet."""


class TrustAlreadyInitialisedError(TrustError, ConfigError):
    """``init`` was asked for a repository that already exists."""


class KeyFileError(TrustError, ConfigError):
    """A key file or key directory is missing, unreadable, or holds no Ed25519 private key."""


class RootKeysError(TrustError, ConfigError):
    """Not enough of the current root keys were found to reach the root threshold."""


class ThresholdError(TrustError, ConfigError):
    """A key count or threshold that cannot work (threshold above the key count, below 1)."""


class UnknownRoleError(TrustError, ConfigError):
    """A role name other than root, targets, snapshot or timestamp."""


class MetadataError(TrustError):
    """Metadata on disk is missing, malformed or does not verify against its delegator."""


class TargetPathError(TrustError):
    """A target path that is not a safe relative path."""


class ReleaseError(TrustError):
    """A model version cannot be released for the runtime asked."""


class HardwareTagsError(ReleaseError, ConfigError):
    """Hardware tags that are not ``KEY=VALUE[|VALUE...]`` pairs."""
