"""Errors of the device updater, each with a ``kind`` that events and tests name.

UpdateError                      base; ``kind`` says what went wrong in one word
├── TrustError(kind, message)    TUF verification or transport failed (kinds: TRUST_KINDS)
│   └── UnknownTargetError       the signed targets do not list the path (also UpdateRefused)
├── ContractError(kind, message) the artifact does not fit this device (kinds: CONTRACT_KINDS)
└── UpdateRefused(kind, message) the updater will not start or go on with this update

Messages name the role, file or field at fault; ``str(error)`` is the message and ``kind``
is stable text for the ``reason`` of an ``update`` event.
"""

from __future__ import annotations

from device_agent.errors import AgentError

__all__ = [
    "CONTRACT_KINDS",
    "TRUST_KINDS",
    "ContractError",
    "TrustError",
    "UnknownTargetError",
    "UpdateError",
    "UpdateRefused",
]

TRUST_KINDS = frozenset(
    {
        "bad_signature",
        "below_threshold",
        "rollback",
        "expired",
        "mix_and_match",
        "length_mismatch",
        "hash_mismatch",
        "unknown_target",
        "transport",
    }
)
"""Why TUF verification (or the transfer under it) failed."""

CONTRACT_KINDS = frozenset({"hardware", "runtime", "memory", "agent_version", "malformed"})
"""Why an artifact's compatibility contract does not hold on this device."""


class UpdateError(AgentError):
    """Base of every updater error; ``kind`` names the failure in one word."""

    def __init__(self, message: str, *, kind: str = "update") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _checked(kind: str, kinds: frozenset[str], what: str) -> str:
    if kind not in kinds:
        raise ValueError(f"{what} kind {kind!r} is not one of {', '.join(sorted(kinds))}")
    return kind


class TrustError(UpdateError):
    """TUF refused the metadata or the artifact, or the transfer failed (``kind``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, kind=_checked(kind, TRUST_KINDS, "trust error"))


class ContractError(UpdateError):
    """The artifact's compatibility contract does not hold on this device (``kind``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, kind=_checked(kind, CONTRACT_KINDS, "contract error"))


class UpdateRefused(UpdateError):  # noqa: N818 (the name the design gives it)
    """The updater will not start or go on with this update; ``kind`` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, kind=kind)


class UnknownTargetError(TrustError, UpdateRefused):
    """The signed targets metadata does not list the requested target path."""

    def __init__(self, message: str) -> None:
        UpdateError.__init__(self, message, kind="unknown_target")
