"""Fuzzing the hub's API with schemathesis against its own OpenAPI schema.

The schema is loaded from the application (``/openapi.json`` through the ASGI transport, no
socket). Every operation is exercised with schema-conforming (positive) and schema-violating
(negative) requests, four times over: as ``admin``, ``operator`` and ``viewer`` (each with a
token made by :class:`edgeops.api.tokens.TokenService`) and without a token. Each of the
four runs gets its own hub (SQLite database with a few devices, their events, and the
session's registry: the digits dataset and a trained model), since mutating routes really
change it.

Checks on every response:

- ``not_a_server_error``: no 5xx, and no exception escaping the application;
- ``auth_enforced``: without a token every ``/api/v1`` route but ``/api/v1/health`` answers
  401; a viewer gets 403 on every mutating route; an operator gets 403 on admin routes
  (``/api/v1/tokens``); an admin is never refused, nor is any valid token ever answered 401.

Generation is derandomized (fixed seed) and bounded (:func:`examples_for`: every operation
in full as admin, the mutating ones also as operator, the public ones without a token, and a
few requests elsewhere to check the role's answer), so a CI run is reproducible and short.
Nothing is shrunk: every failing request is collected and printed (as a curl command with
the response, or the exception that escaped) and the test fails at the end. Path parameters
are also drawn from the hub's real ids (:func:`known_ids`), so routes get past their 404s.
The TUF file routes are fuzzed in the run without a token only; ``/metrics`` and the
documentation pages are not fuzzed.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.models import ModelFactory

POSITIVE_EXAMPLES = 15
"""schema-conforming requests per operation (see :func:`examples_for`)"""
NEGATIVE_EXAMPLES = 8
"""schema-violating requests per operation (see :func:`examples_for`)"""
FEW_EXAMPLES = 4
"""requests per operation and mode when the role's answer is known beforehand (401/403),
or when the admin's run already fuzzed what the role may do"""
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/api/v1/health"})
ADMIN_PREFIXES = ("/api/v1/tokens",)
EXCLUDED_PATHS = ("/metrics", "/docs", "/openapi.json")
"""not fuzzed: Prometheus' text, the documentation pages"""
TUF_PREFIX = "/v1/tuf/"
"""the release repository's files: public, fuzzed in the run without a token only"""
EXAMPLE_CAPS = {"POST /api/v1/datasets": 2}
"""positive examples of operations whose real work is slow (registering a built-in dataset
reads and splits it)"""
DEVICES = [f"fuzz-dev-{i:02d}" for i in range(4)]
ROLES = ["admin", "operator", "viewer", None]


@dataclass
class Hub:
    """One role's hub: the app, its context, and the token to send (None: no token)."""

    app: Any
    context: Any
    token: str | None
    role: str | None
    ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def seed_fleet(fleet: Any) -> None:
    """A few devices as the bridge stores them: state report, presence, and update events."""
    from device_agent.protocol import Event, Presence, StateReport

    now = time.time()
    for i, device_id in enumerate(DEVICES):
        fleet.record_state(
            StateReport(
                device_id=device_id,
                agent_version="0.1.0",
                hardware={"arch": "x86_64" if i % 2 == 0 else "armv7l", "cohort": f"c{i % 2}"},
                slots={"active": "a", "a": {"target": None}},
                ts=now - 10,
            )
        )
        fleet.record_presence(Presence(device_id=device_id, online=i != 3, ts=now - 5))
        fleet.record_event(
            Event(device_id=device_id, seq=1, event="update", ts=now - 4, detail={"state": "idle"})
        )


def known_ids(context: Any) -> dict[str, list[str]]:
    """Real ids of the hub, by ``"<path prefix> <parameter>"`` of the routes that take them.
    Token ids are left out: an admin would revoke its own token."""
    devices = [view.device_id for view in context.fleet.list_devices()]
    models = context.registry.list_models()
    model_refs = [view.id for view in models] + [view.ref for view in models]
    datasets = sorted({v.version for v in context.datasets.list()} | {"digits"})
    return {
        "/api/v1/devices/ device_id": devices,
        "/api/v1/models/ ref": model_refs,
        "/api/v1/datasets/ ref": datasets,
        "/api/v1/runs/ run_id": [view.id for view in context.registry.list_runs()],
        "/api/v1/drift/policies/ model_name": sorted({view.name for view in models}),
    }


def ids_for(operation: Any, ids: dict[str, list[str]]) -> dict[str, list[str]]:
    """The real ids ``operation``'s path parameters can take."""
    found = {}
    for parameter in operation.path_parameters:
        for key, values in ids.items():
            prefix, name = key.split(" ")
            if name == parameter.name and operation.path.startswith(prefix) and values:
                found[name] = values
    return found


def open_hub(root: Path, role: str | None, model_factory: ModelFactory) -> Hub:
    """A fresh hub under ``root``: the session's registry copied in, migrated, devices
    recorded, and a token of ``role``."""
    from edgeops.api import create_app
    from edgeops.api.auth import FailureLimiter
    from edgeops.api.context import ApiContext
    from edgeops.config import Settings
    from edgeops.db import Database

    data_dir = model_factory.copy_to(root / "data")
    settings = Settings(data_dir=data_dir)
    database = Database(settings.database)
    database.upgrade()
    context = ApiContext(settings, database)
    seed_fleet(context.fleet)
    app = create_app(context)
    # Every request of the unauthenticated run fails authentication: let none be answered 429
    # (the limiter itself is tested elsewhere), so each shows what the route answers.
    app.state.failure_limiter = FailureLimiter(allowed=10**9)
    token = context.tokens.create(f"fuzz-{role}", role)[1] if role else None
    return Hub(app, context, token, role, known_ids(context))


def is_mutating(method: str) -> bool:
    return method.upper() not in READ_METHODS


def expected_refusal(role: str | None, method: str, path: str) -> int | None:
    """The status ``role`` must get on ``method path`` before any route logic; None if the
    request must get through authentication and authorization."""
    if not path.startswith("/api/v1/") or path in PUBLIC_PATHS:
        return None
    if role is None:
        return 401
    if role == "viewer" and is_mutating(method):
        return 403
    if role != "admin" and path.startswith(ADMIN_PREFIXES):
        return 403
    return None


def auth_check(role: str | None) -> Callable[..., None]:
    """A schemathesis check: the answer ``role`` must get (see the module docstring)."""

    def auth_enforced(ctx: Any, response: Any, case: Any) -> None:
        method, path = case.operation.method.upper(), case.operation.path
        sent = getattr(getattr(response, "request", None), "headers", None)
        # negative generation also sends the secured operations without their credentials
        carried = role is not None and (
            sent is None or "authorization" in {k.lower() for k in sent}
        )
        wanted = expected_refusal(role if carried else None, method, path)
        status = response.status_code
        who = role or "no token"
        if wanted is not None:
            assert status == wanted, f"{who}: {method} {path} must be {wanted}, got {status}"
        elif carried and path.startswith("/api/v1/"):
            assert status not in (401, 403), f"{who}: {method} {path} refused with {status}"

    return auth_enforced


def operations(schema: Any, role: str | None) -> Iterator[Any]:
    """The operations fuzzed for ``role``."""
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith(EXCLUDED_PATHS):
            continue
        if operation.path.startswith(TUF_PREFIX) and role is not None:
            continue
        yield operation


def strategy_for(operation: Any, mode: Any, ids: dict[str, list[str]]) -> Any:
    """Generated requests for ``operation``; also, half the time, with real ids filled into
    the path parameters the hub has ids for."""
    from hypothesis import strategies as st

    generated = operation.as_strategy(generation_mode=mode)
    real = ids_for(operation, ids)
    if not real:
        return generated
    with_ids = st.fixed_dictionaries({n: st.sampled_from(v) for n, v in real.items()}).flatmap(
        lambda chosen: operation.as_strategy(generation_mode=mode, path_parameters=chosen)
    )
    return st.one_of(with_ids, generated)


def examples_for(role: str | None, operation: Any, positive: bool) -> int:
    """How many requests ``role`` sends to ``operation`` in one mode. Everything is fuzzed
    in full as admin, mutating routes also as operator (the role meant for them) and the
    public routes without a token; the other runs check authorization with a few requests
    (the same routes on the same kind of data answer the same)."""
    method, path = operation.method.upper(), operation.path
    full = POSITIVE_EXAMPLES if positive else NEGATIVE_EXAMPLES
    if positive:
        full = EXAMPLE_CAPS.get(operation.label, full)
    if expected_refusal(role, method, path) is not None:
        return FEW_EXAMPLES
    public = not path.startswith("/api/v1/") or path in PUBLIC_PATHS
    if role == "admin" or (role == "operator" and is_mutating(method)) or public:
        return full
    return min(full, FEW_EXAMPLES)


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    """each with the request that reproduces it"""
    sent: int = 0
    found: set[str] = field(default_factory=set)
    """operations with path parameters that answered 2xx at least once (a real id hit)"""


REQUEST_TIMEOUT_S = 300.0


def fuzz(hub: Hub, schema: Any) -> Outcome:
    """Run every operation of ``schema`` against ``hub``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup

    outcome = Outcome()
    failures = outcome.failures
    took: dict[str, float] = {}
    checks = [not_a_server_error, auth_check(hub.role)]
    for operation in operations(schema, hub.role):
        began = time.perf_counter()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = examples_for(hub.role, operation, mode == GenerationMode.POSITIVE)

            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy_for(operation, mode, hub.ids))
            def run(case: Any) -> None:
                outcome.sent += 1
                try:
                    # no timing check: registering a built-in dataset takes tens of
                    # seconds on a loaded machine (schemathesis' default timeout is 10 s)
                    response = case.call(headers=hub.headers, timeout=REQUEST_TIMEOUT_S)
                except Exception:
                    curl = case.as_curl_command(headers=hub.headers)
                    failures.append(f"{curl}\n  raised:\n{traceback.format_exc(limit=-6)}")
                    return
                if response.status_code < 300 and case.operation.path_parameters:
                    outcome.found.add(case.operation.label)
                try:
                    case.validate_response(response, checks=checks, headers=hub.headers)
                except (AssertionError, FailureGroup) as exc:
                    failures.append(str(exc))

            try:
                run()
            except Unsatisfiable:  # nothing to violate: no parameters, no body
                assert mode == GenerationMode.NEGATIVE, operation.label
        took[operation.label] = time.perf_counter() - began
    slowest = sorted(took.items(), key=lambda item: -item[1])[:6]
    print(
        f"\n{hub.role or 'no token'}: {outcome.sent} requests, {len(took)} operations, "
        f"{sum(took.values()):.1f} s; slowest:",
        ", ".join(f"{op} {seconds:.2f} s" for op, seconds in slowest),
    )
    return outcome


@pytest.mark.parametrize("role", ROLES, ids=[r or "anonymous" for r in ROLES])
def test_api_fuzz(role: str | None, tmp_path: Path, model_factory: ModelFactory) -> None:
    import schemathesis

    hub = open_hub(tmp_path, role, model_factory)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", hub.app)
        labels = [op.label for op in operations(schema, role)]
        assert "GET /api/v1/health" in labels and "GET /api/v1/whoami" in labels, labels
        outcome = fuzz(hub, schema)
    finally:
        hub.context.database.dispose()
    assert outcome.sent >= len(labels) * 2, f"{outcome.sent} requests, {len(labels)} operations"
    if role is not None:  # the real ids got past the 404s
        for label in ("GET /api/v1/devices/{device_id}", "GET /api/v1/models/{ref}"):
            assert label in outcome.found, sorted(outcome.found)
    unique = list(dict.fromkeys(outcome.failures))
    assert not unique, f"{len(unique)} failing requests as {role or 'no token'}:\n\n" + "\n\n".join(
        unique[:30]
    )


def test_auth_check_catches_a_wrong_answer() -> None:
    """The custom check itself: a 200 where 401/403 is due, and a 403 where none is, fail."""

    @dataclass
    class Op:
        method: str
        path: str

    @dataclass
    class Case:
        operation: Op

    @dataclass
    class Response:
        status_code: int

    post = Case(Op("post", "/api/v1/rollouts"))
    get = Case(Op("get", "/api/v1/devices"))
    with pytest.raises(AssertionError, match="must be 401"):
        auth_check(None)(None, Response(200), post)
    with pytest.raises(AssertionError, match="must be 403"):
        auth_check("viewer")(None, Response(422), post)
    with pytest.raises(AssertionError, match="refused with 403"):
        auth_check("operator")(None, Response(403), post)
    with pytest.raises(AssertionError, match="must be 403"):
        auth_check("operator")(None, Response(200), Case(Op("post", "/api/v1/tokens")))
    auth_check("viewer")(None, Response(200), get)
    auth_check(None)(None, Response(200), Case(Op("get", "/api/v1/health")))
    auth_check("admin")(None, Response(404), post)


def test_fuzz_reports_server_errors() -> None:
    """The harness itself: a 500 answer and an exception escaping a route are both reported,
    each with a request that reproduces it."""
    import schemathesis
    from fastapi import FastAPI, HTTPException

    app = FastAPI()

    @app.get("/api/v1/items/{n}")
    def item(n: int) -> dict[str, int]:
        if n % 2 == 0:
            raise HTTPException(500, detail="even")
        return {"n": n}

    @app.post("/api/v1/crash")
    def crash() -> None:
        raise RuntimeError("boom")

    hub = Hub(app, context=None, token="not-checked", role="admin")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    outcome = fuzz(hub, schema)
    failures = outcome.failures
    assert outcome.sent > 2
    items = [f for f in failures if "/api/v1/items/" in f]
    crashes = [f for f in failures if "/api/v1/crash" in f]
    assert items and "500" in items[0] and "curl" in items[0], failures
    assert crashes and "RuntimeError: boom" in crashes[0] and "curl" in crashes[0], failures
