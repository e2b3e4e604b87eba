"""The updater's state machine: its states, its events and the one table of transitions.

::

    idle ─start─▶ downloading ─downloaded─▶ verifying ─verified─▶ installing ─installed─▶ testing
                                                                                            │
    committed ◀──────────────────────────────────────────────────────────────────healthy───┘
    downloading, verifying, installing, testing ─failed─▶ rolling_back ─rolled_back─▶ rolled_back

``retry`` (a transient failure, e.g. the broker went away) and ``resume`` (the agent restarted
in that state) lead from an in-progress state to itself; ``cancel`` leaves downloading or
verifying for idle when the desired release no longer names the target; ``start`` begins a
new update from any state at rest (idle, committed, rolled_back).

:func:`next_state` is pure: it looks the pair up in :data:`TRANSITIONS` and raises
:class:`IllegalTransitionError` for any pair the table does not hold.
"""

from __future__ import annotations

from enum import StrEnum

from device_agent.errors import AgentError

__all__ = [
    "AT_REST",
    "IN_PROGRESS",
    "TRANSITIONS",
    "IllegalTransitionError",
    "UpdateEvent",
    "UpdateState",
    "next_state",
]


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TESTING = "testing"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class UpdateEvent(StrEnum):
    START = "start"
    """A desired release names a target the active slot does not hold."""
    DOWNLOADED = "downloaded"
    """Metadata refreshed and the target downloaded (length and hashes checked by ngclient)."""
    VERIFIED = "verified"
    """The file matches its signed length and hashes; the contract fits this device."""
    INSTALLED = "installed"
    """The inactive slot holds the new bundle and it loads."""
    HEALTHY = "healthy"
    """Smoke test passed, the pointer switched, and the champion ran healthy long enough."""
    FAILED = "failed"
    """Refused (trust, contract, smoke test, health, crash loop) or out of attempts."""
    ROLLED_BACK = "rolled_back"
    """The pointer names the previous slot again (or was never switched)."""
    RETRY = "retry"
    """A transient failure: the same state is tried again (counts an attempt)."""
    RESUME = "resume"
    """The agent started in this state after an interruption (counts an attempt)."""
    CANCEL = "cancel"
    """The desired release no longer names the target of an unfinished download."""


AT_REST = frozenset({UpdateState.IDLE, UpdateState.COMMITTED, UpdateState.ROLLED_BACK})
IN_PROGRESS = frozenset(
    {UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.INSTALLING, UpdateState.TESTING}
)

_S, _E = UpdateState, UpdateEvent

TRANSITIONS: dict[tuple[UpdateState, UpdateEvent], UpdateState] = {
    # a new update starts from any state at rest
    (_S.IDLE, _E.START): _S.DOWNLOADING,
    (_S.COMMITTED, _E.START): _S.DOWNLOADING,
    (_S.ROLLED_BACK, _E.START): _S.DOWNLOADING,
    # the happy path
    (_S.DOWNLOADING, _E.DOWNLOADED): _S.VERIFYING,
    (_S.VERIFYING, _E.VERIFIED): _S.INSTALLING,
    (_S.INSTALLING, _E.INSTALLED): _S.TESTING,
    (_S.TESTING, _E.HEALTHY): _S.COMMITTED,
    # failure: every state in progress rolls back
    (_S.DOWNLOADING, _E.FAILED): _S.ROLLING_BACK,
    (_S.VERIFYING, _E.FAILED): _S.ROLLING_BACK,
    (_S.INSTALLING, _E.FAILED): _S.ROLLING_BACK,
    (_S.TESTING, _E.FAILED): _S.ROLLING_BACK,
    (_S.ROLLING_BACK, _E.ROLLED_BACK): _S.ROLLED_BACK,
    # transient failures and restarts stay where they are
    (_S.DOWNLOADING, _E.RETRY): _S.DOWNLOADING,
    (_S.VERIFYING, _E.RETRY): _S.VERIFYING,
    (_S.INSTALLING, _E.RETRY): _S.INSTALLING,
    (_S.TESTING, _E.RETRY): _S.TESTING,
    (_S.DOWNLOADING, _E.RESUME): _S.DOWNLOADING,
    (_S.VERIFYING, _E.RESUME): _S.VERIFYING,
    (_S.INSTALLING, _E.RESUME): _S.INSTALLING,
    (_S.TESTING, _E.RESUME): _S.TESTING,
    (_S.ROLLING_BACK, _E.RESUME): _S.ROLLING_BACK,
    # the desired release moved on before anything was installed
    (_S.DOWNLOADING, _E.CANCEL): _S.IDLE,
    (_S.VERIFYING, _E.CANCEL): _S.IDLE,
}
"""Every legal transition, ``(state, event) -> new state``; nothing else is allowed."""


class IllegalTransitionError(AgentError):
    """An event that the transition table does not allow in the current state."""


def next_state(state: UpdateState, event: UpdateEvent) -> UpdateState:
    """The state ``event`` leads to from ``state``; IllegalTransitionError if the table has no such
    pair."""
    try:
        return TRANSITIONS[(UpdateState(state), UpdateEvent(event))]
    except (KeyError, ValueError):
        raise IllegalTransitionError(
            f"update event {event!s} is not allowed in state {state!s}"
        ) from None
