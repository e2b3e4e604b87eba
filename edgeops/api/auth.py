"""Who is calling the API: bearer tokens with a role, and the dependencies routes declare.

    @router.get("/things", dependencies=[Depends(viewer)])     # any valid token
    @router.post("/things")                                      # operator or admin
    def create(..., who: Principal = Depends(operator)) -> ...

Roles are ordered: ``viewer`` < ``operator`` < ``admin``. A request without a valid token gets
401 (``WWW-Authenticate: Bearer``); a valid token whose role is too low gets 403. The API
takes a token only from ``Authorization: Bearer <token>``, never from a cookie: a browser
attaches cookies to any request it sends to the hub, also to a form another page on the same
host posts, so a cookie would let such a page act with the user's role. The dashboard's pages
(which check where each form comes from) call :func:`authenticate` with ``cookie=True`` to
read the same token from the ``edgeops_token`` cookie. See :mod:`edgeops.api.tokens` for how
tokens are kept.
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


MAX_FAILING_ADDRESSES = 10_000
"""addresses whose failures are kept at most; past it the one that failed longest ago goes"""


class FailureLimiter:
    """Counts failed authentications per client address in a sliding window; thread-safe.

    Memory stays bounded: only addresses that failed are kept (asking :meth:`retry_after`
    adds nothing), at most once per ``window_s`` a sweep drops every address whose newest
    failure is older than the window, and past ``max_addresses`` the address whose newest
    failure is the oldest is dropped. ``clock`` (seconds, monotonic) is for tests."""

    def __init__(
        self,
        allowed: int = FAILURES_ALLOWED,
        window_s: float = FAILURE_WINDOW_S,
        *,
        max_addresses: int = MAX_FAILING_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if allowed < 1 or window_s <= 0 or max_addresses < 1:
            raise ValueError("allowed, window_s and max_addresses must be positive")
        self.allowed = allowed
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._clock = clock
        # insertion order is the order of each address's newest failure: a failure moves its
        # address to the end, so the first entry is the one that failed longest ago
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._swept_at = clock()

    def __len__(self) -> int:
        """How many addresses have failures kept."""
        with self._lock:
            return len(self._failures)

    def _drop_old(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def _sweep(self, now: float) -> None:
        """Drop the addresses with no failure in the window; at most once per window."""
        if now - self._swept_at < self.window_s:
            return
        self._swept_at = now
        cutoff = now - self.window_s
        for client in [c for c, times in self._failures.items() if times[-1] <= cutoff]:
            del self._failures[client]

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 if it may now."""
        now = self._clock()
        with self._lock:
            times = self._failures.get(client)
            if times is None:
                return 0.0
            self._drop_old(times, now)
            if not times:
                del self._failures[client]
                return 0.0
            if len(times) < self.allowed:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, client: str) -> None:
        """Count a failed authentication from ``client``."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            times = self._failures.pop(client, None)  # re-inserted last: newest failure
            if times is None:
                times = deque(maxlen=self.allowed)  # only the newest ``allowed`` matter
            self._drop_old(times, now)
            times.append(now)
            self._failures[client] = times
            while len(self._failures) > self.max_addresses:
                del self._failures[next(iter(self._failures))]


def _token_of(request: Request, *, cookie: bool) -> str | None:
    """The token the request carries: the ``Authorization`` header's Bearer value ("" for
    another scheme or an empty value); without that header, the cookie if ``cookie``."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else ""
    return request.cookies.get(COOKIE) if cookie else None


def authenticate(request: Request, *, cookie: bool = False) -> Principal:
    """The caller of ``request``: 401 without a valid token, 429 after too many failures.

    The token comes from ``Authorization: Bearer``; with ``cookie=True`` (the dashboard's
    pages only, never ``/api/v1``) a request without that header may carry it in the
    ``edgeops_token`` cookie instead."""
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
    token = _token_of(request, cookie=cookie)
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


def bearer(request: Request) -> Principal:
    """The dependency behind :data:`viewer`, :data:`operator` and :data:`admin`:
    :func:`authenticate` from the ``Authorization`` header alone."""
    return authenticate(request)


def _needs(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(bearer)]) -> Principal:
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
    bearer: Role.VIEWER,
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
