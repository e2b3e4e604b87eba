"""Failpoints: named places where a test can make the agent die as a power cut would.

A failpoint is armed through the environment variable ``EDGEOPS_AGENT_FAILPOINTS``, a
comma-separated list of specs; unset (the normal case) every check is one dictionary lookup
and does nothing. The only action is ``kill``: the process sends itself SIGKILL, so nothing
after that point runs — no ``finally``, no flush, no atexit — exactly what a power cut or
the OOM killer leaves behind.

Specs::

    updater.enter:<state>=kill     before the updater persists and acts on entering <state>
    updater.after:<state>=kill     right after the updater persisted <state>
    fetch.bytes:<N>=kill           once at least N bytes of a target were received and written
    <any name>=kill                at :func:`check` of that name

Example: ``EDGEOPS_AGENT_FAILPOINTS=updater.enter:installing=kill``.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV_VAR = "EDGEOPS_AGENT_FAILPOINTS"
_BYTES_PREFIX = "fetch.bytes:"


def _parse(text: str) -> tuple[frozenset[str], int | None]:
    names: set[str] = set()
    byte_limit: int | None = None
    for spec in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = spec.partition("=")
        if action != "kill":
            raise ValueError(f"{ENV_VAR}: {spec!r}: the only action is 'kill'")
        if name.startswith(_BYTES_PREFIX):
            try:
                byte_limit = int(name[len(_BYTES_PREFIX) :])
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {spec!r}: expected fetch.bytes:<integer>") from None
        else:
            names.add(name)
    return frozenset(names), byte_limit


_NAMES, _BYTE_LIMIT = _parse(os.environ.get(ENV_VAR, ""))


def armed() -> bool:
    """True if any failpoint is armed in this process."""
    return bool(_NAMES) or _BYTE_LIMIT is not None


def _die(reason: str) -> None:
    log.warning("failpoint %s: killing the process (SIGKILL)", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def check(name: str) -> None:
    """Die here if the failpoint ``name`` is armed."""
    if name in _NAMES:
        _die(name)


def check_bytes(received: int) -> None:
    """Die here if a ``fetch.bytes:N`` failpoint is armed and ``received >= N``."""
    if _BYTE_LIMIT is not None and received >= _BYTE_LIMIT:
        _die(f"{_BYTES_PREFIX}{_BYTE_LIMIT} (received {received})")


def reload() -> None:
    """Re-read the environment (tests that arm failpoints in-process call this)."""
    global _NAMES, _BYTE_LIMIT
    _NAMES, _BYTE_LIMIT = _parse(os.environ.get(ENV_VAR, ""))
