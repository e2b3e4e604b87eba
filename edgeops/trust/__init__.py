"""Trusted delivery, the hub's side: a TUF release repository and the servers devices read.

    from edgeops.trust import TrustRepository

    repo = TrustRepository(settings.trust_dir)
    repo.init(Path("/media/offline"), root_keys=3, root_threshold=2)
    target = repo.add_target("digits-mlp/3/litert/model.tflite", data, custom)
    repo.rotate("timestamp", Path("/media/offline"))

See docs/security.md for the roles, keys, rotation and what a device verifies.
"""

from edgeops.trust.errors import (
    HardwareTagsError,
    KeyFileError,
    MetadataError,
    ReleaseError,
    RootKeysError,
    TargetPathError,
    ThresholdError,
    TrustAlreadyInitialisedError,
    TrustError,
    TrustNotInitialisedError,
    UnknownRoleError,
)
from edgeops.trust.metadata import (
    DEFAULT_EXPIRIES,
    ONLINE_ROLES,
    ROLES,
    Expiries,
    check_target_path,
)
from edgeops.trust.release import (
    RELEASE_RUNTIMES,
    Release,
    build_custom,
    card_of,
    card_text,
    release_model,
    released_cards,
)
from edgeops.trust.repository import TrustRepository, repository_for
from edgeops.trust.server import FetchServer, FetchServerStats, TimestampRefresher

__all__ = [
    "DEFAULT_EXPIRIES",
    "ONLINE_ROLES",
    "RELEASE_RUNTIMES",
    "ROLES",
    "Expiries",
    "FetchServer",
    "FetchServerStats",
    "HardwareTagsError",
    "KeyFileError",
    "MetadataError",
    "Release",
    "ReleaseError",
    "RootKeysError",
    "TargetPathError",
    "ThresholdError",
    "TimestampRefresher",
    "TrustAlreadyInitialisedError",
    "TrustError",
    "TrustNotInitialisedError",
    "TrustRepository",
    "UnknownRoleError",
    "build_custom",
    "card_of",
    "card_text",
    "check_target_path",
    "release_model",
    "released_cards",
    "repository_for",
]
