"""Who is calling the API: bearer tokens with a role, and the dependencies routes declare.

    @router.get("/things", dependencies=[Depends(viewer)])     # any valid token
    @router.post("/things")                                      # operator or admin
    def create(..., who: Principal = Depends(operator)) -> ...

Roles are ordered: ``viewer`` < ``operator`` < ``admin``. A request without a valid token gets
401 (``WWW-Authenticate: Bearer``); a valid token whose role is too low gets 403. Tokens are
``Authorization: Bearer <token>``; the dashboard also accepts the same token in the
``edgeops_token`` cookie. See :mod:`edgeops.api.tokens` for how tokens are kept.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status

if TYPE_CHECKING:
    from edgeops.api.context import ApiContext


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Principal:
    """The holder of a valid token."""

    token_id: str
    name: str
    role: Role


# -- the dependencies routes declare -------------------------------------------------------------

FAILURES_ALLOWED = 10
"""failed authentications one client address may make in FAILURE_WINDOW_S before 429"""
FAILURE_WINDOW_S = 60.0
COOKIE = "edgeops_token"


class FailureLimiter:
    """Counts failed authentications per client address in a sliding window; thread-safe."""

    def __init__(self, allowed: int = FAILURES_ALLOWED, window_s: float = FAILURE_WINDOW_S) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.allowed:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
            if len(self._failures) > 10_000:  # forget quiet addresses, bounded memory
                for key in [k for k, v in self._failures.items() if not v]:
                    del self._failures[key]


def _token_of(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else ""
    return request.cookies.get(COOKIE)


def authenticate(request: Request) -> Principal:
    """The caller of ``request``: 401 without a valid token, 429 after too many failures."""
    context: ApiContext = request.app.state.context
    limiter: FailureLimiter = request.app.state.failure_limiter
    client = request.client.host if request.client else "unknown"
    wait = limiter.retry_after(client)
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="too many failed authentications from this address; try again later",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    token = _token_of(request)
    principal = context.tokens.authenticate(token) if token else None
    if principal is None:
        limiter.failed(client)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API token (Authorization: Bearer <token>)"
            if token is None
            else "invalid API token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.principal = principal
    return principal


def _needs(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.role.allows(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"this needs the {role.value} role; the token has {principal.role.value}",
            )
        return principal

    return check


viewer = _needs(Role.VIEWER)
"""Any valid token (read-only routes)."""
operator = _needs(Role.OPERATOR)
"""operator or admin: every route that changes something."""
admin = _needs(Role.ADMIN)
"""admin only: tokens."""

_ROLE_OF: dict[object, Role] = {
    authenticate: Role.VIEWER,
    viewer: Role.VIEWER,
    operator: Role.OPERATOR,
    admin: Role.ADMIN,
}


def required_role(route: object) -> Role | None:
    """The highest role ``route``'s dependencies (nested ones too) demand; None if it needs no
    token. ``route`` is what routing put in ``scope["route"]`` (an ``APIRoute``)."""
    found: Role | None = None
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is None:
            continue
        role = _ROLE_OF.get(getattr(dependant, "call", None))
        if role is not None and (found is None or role.rank > found.rank):
            found = role
        pending.extend(getattr(dependant, "dependencies", ()))
    return found


def check_before_body(request: Request) -> Principal | None:
    """Authenticate ``request`` for its route if its dependencies have not done so yet.

    FastAPI reads and parses a request's body before it runs the route's dependencies, so a
    malformed body would be answered 400/422 before the token is looked at. The error
    handlers call this first: without a valid token the answer is 401 (or 429), with a role
    too low 403, as for any other request to the route. Raises that HTTPException; returns
    the principal (None for a route that needs no token)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    needed = required_role(request.scope.get("route"))
    if needed is None:
        return None
    principal = authenticate(request)
    _needs(needed)(principal)
    return principal
