"""The device updater: trusted download, compatibility contract, A/B slots, rollback.

- :mod:`~device_agent.updater.machine`: states, events, the one transition table
- :mod:`~device_agent.updater.slots`: the A/B slot directories and the active pointer
- :mod:`~device_agent.updater.updater`: the :class:`Updater` (persisted state, resume map,
  attempts, smoke test, activation, health check, rollback)
- :mod:`~device_agent.updater.service`: the updater inside the agent daemon
- :mod:`~device_agent.updater.trust`, :mod:`~device_agent.updater.contract`,
  :mod:`~device_agent.updater.errors`: the TUF client, the compatibility contract, errors
"""

from device_agent.updater.machine import (
    TRANSITIONS,
    IllegalTransitionError,
    UpdateEvent,
    UpdateState,
    next_state,
)
from device_agent.updater.slots import Pointer, SlotError, Slots
from device_agent.updater.updater import (
    ChampionHealth,
    Transition,
    Updater,
    UpdaterHost,
    smoke_test,
)

__all__ = [
    "TRANSITIONS",
    "ChampionHealth",
    "IllegalTransitionError",
    "Pointer",
    "SlotError",
    "Slots",
    "Transition",
    "UpdateEvent",
    "UpdateState",
    "Updater",
    "UpdaterHost",
    "next_state",
    "smoke_test",
]
