"""Who may call the API: tokens and roles on every route, revocation, the failure rate limit,
tokens kept hashed, CORS, body limits, error answers, and ``edgeops tokens``."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from edgeops.api import create_app
from edgeops.api.auth import COOKIE, FailureLimiter, Principal, authenticate
from edgeops.api.context import ApiContext
from edgeops.api.limits import MAX_BODY_BYTES
from edgeops.api.tokens import TokenService
from edgeops.cli.main import main
from edgeops.config import Settings
from edgeops.db import Database
from edgeops.errors import DatabaseError, EdgeOpsError, NotFoundError
from edgeops.fleet import IdentityService
from edgeops.rollout.engine import RolloutError
from tests.clitools import run_cli

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
GARBAGE_TOKEN = "eo_0123456789ab_" + "A" * 43  # well formed, never issued
_PARAM = re.compile(r"\{[^}]+\}")


@dataclass
class Hub:
    app: FastAPI
    context: ApiContext
    client: TestClient
    database_file: Path | None

    def token(self, role: str, name: str | None = None) -> str:
        return self.context.tokens.create(name or f"{role}-test", role)[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_hub(database: Database, data_dir: Path, **settings: Any) -> Hub:
    context = ApiContext(Settings(data_dir=data_dir, **settings), database)
    app = create_app(context)
    path = database.engine.url.database if database.backend == "sqlite" else None
    return Hub(app, context, TestClient(app), Path(path) if path else None)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        yield make_hub(database, tmp_path)
    finally:
        database.dispose()


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path with every parameter filled in) of every ``/api/v1`` route."""
    found = []
    for context in iter_route_contexts(app.routes):
        path = context.path
        methods = getattr(context.original_route, "methods", None) or set()
        if not isinstance(path, str) or not path.startswith("/api/v1/"):
            continue
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            found.append((method, _PARAM.sub("x1", path)))
    return found


# -- every route needs a token, every mutating one operator or admin ---------------------------


def test_every_mutating_route_refuses_anonymous_garbage_device_and_viewer(hub: Hub) -> None:
    hub.app.state.failure_limiter = FailureLimiter(allowed=1_000_000)
    enrollment = IdentityService(hub.context.database).enroll("sensor-7")
    basic = base64.b64encode(f"sensor-7:{enrollment.password}".encode()).decode()
    refused: list[dict[str, str]] = [
        {},
        bearer(GARBAGE_TOKEN),
        bearer("not-a-token"),
        {"Authorization": "Token " + hub.token("admin", "other-scheme")},
        bearer(enrollment.password),  # a device's broker password
        {"Authorization": f"Basic {basic}"},  # a device's broker credentials
    ]
    viewer = bearer(hub.token("viewer"))
    routes = [(m, p) for m, p in api_routes(hub.app) if m in MUTATING]
    assert ("POST", "/api/v1/tokens") in routes and ("DELETE", "/api/v1/tokens/x1") in routes
    assert len(routes) >= 10, routes  # the domains' routers are mounted
    for method, path in routes:
        for headers in refused:
            answer = hub.client.request(method, path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
        answer = hub.client.request(method, path, headers=viewer, json={})
        assert answer.status_code == 403, (method, path, answer.text)
        assert "operator" in answer.json()["detail"] or "admin" in answer.json()["detail"]


def test_every_read_route_needs_a_token_except_health(hub: Hub) -> None:
    hub.app.state.failure_limiter = FailureLimiter(allowed=1_000_000)
    reads = [p for m, p in api_routes(hub.app) if m == "GET"]
    assert "/api/v1/health" in reads and len(reads) >= 10, reads
    for path in reads:
        answer = hub.client.get(path)
        expected = 200 if path == "/api/v1/health" else 401
        assert answer.status_code == expected, (path, answer.text)
    viewer = bearer(hub.token("viewer"))
    assert hub.client.get("/api/v1/whoami", headers=viewer).json()["role"] == "viewer"
    # the tokens are an admin's business alone
    assert hub.client.get("/api/v1/tokens", headers=viewer).status_code == 403
    assert (
        hub.client.get("/api/v1/tokens", headers=bearer(hub.token("operator"))).status_code == 403
    )


def test_tokens_over_the_api_and_revocation(hub: Hub) -> None:
    admin = bearer(hub.token("admin"))
    made = hub.client.post("/api/v1/tokens", headers=admin, json={"name": "ci", "role": "operator"})
    assert made.status_code == 201, made.text
    created = made.json()
    token = created["token"]
    assert created["role"] == "operator" and created["revoked_at"] is None
    assert token.startswith(f"eo_{created['id']}_")
    assert hub.client.get("/api/v1/whoami", headers=bearer(token)).json() == {
        "token_id": created["id"],
        "name": "ci",
        "role": "operator",
    }
    listed = hub.client.get("/api/v1/tokens", headers=admin)
    assert listed.status_code == 200
    assert token not in listed.text and "secret" not in listed.text
    assert {"ci", "admin-test"} <= {t["name"] for t in listed.json()}

    revoked = hub.client.delete(f"/api/v1/tokens/{created['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    answer = hub.client.get("/api/v1/whoami", headers=bearer(token))
    assert answer.status_code == 401 and answer.json()["detail"] == "invalid API token"
    assert hub.client.delete("/api/v1/tokens/ffffffffffff", headers=admin).status_code == 404

    for bad, field in (
        ({"name": "ci", "role": "root"}, "body.role"),
        ({"name": "has space", "role": "viewer"}, "body.name"),
        ({"name": 5, "role": "viewer"}, "body.name"),
        ({"role": "viewer"}, "body.name"),
        ({"name": "ci", "role": "viewer", "extra": 1}, "body.extra"),
    ):
        answer = hub.client.post("/api/v1/tokens", headers=admin, json=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["message"].startswith(field), answer.json()
        assert answer.json()["detail"][0]["loc"][:2] == field.split(".")[:2]
    assert len(hub.context.tokens.list()) == 2  # nothing half-written


def test_repeated_failures_are_rate_limited_per_address(hub: Hub) -> None:
    good = bearer(hub.token("viewer"))
    for _ in range(10):
        assert hub.client.get("/api/v1/whoami", headers=bearer(GARBAGE_TOKEN)).status_code == 401
    limited = hub.client.get("/api/v1/whoami", headers=bearer(GARBAGE_TOKEN))
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert hub.client.get("/api/v1/whoami", headers=good).status_code == 429  # same address
    other = TestClient(hub.app, client=("10.0.0.9", 40000))
    assert other.get("/api/v1/whoami", headers=good).status_code == 200
    assert hub.client.get("/api/v1/health").status_code == 200  # no token, no limit


def test_tokens_are_stored_hashed(hub: Hub) -> None:
    token = hub.token("admin")
    secret = token.rsplit("_", 1)[1]
    hub.context.database.dispose()  # checkpoint: everything in the main file
    assert hub.database_file is not None
    stored = b"".join(
        p.read_bytes() for p in hub.database_file.parent.glob(hub.database_file.name + "*")
    )
    assert token.encode() not in stored and secret.encode() not in stored
    assert hub.client.get("/api/v1/whoami", headers=bearer(token)).status_code == 200


# -- CORS, limits, error answers ---------------------------------------------------------------


def test_cors_is_off_unless_configured(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        closed = make_hub(database, tmp_path)
        preflight = {"Origin": "https://ops.example", "Access-Control-Request-Method": "POST"}
        answer = closed.client.options("/api/v1/tokens", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        answer = closed.client.get("/api/v1/health", headers={"Origin": "https://ops.example"})
        assert "access-control-allow-origin" not in answer.headers

        opened = make_hub(database, tmp_path, api_cors_origins=("https://ops.example",))
        answer = opened.client.options("/api/v1/tokens", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://ops.example"
        answer = opened.client.get("/api/v1/health", headers={"Origin": "https://ops.example"})
        assert answer.headers["access-control-allow-origin"] == "https://ops.example"
        answer = opened.client.get("/api/v1/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in answer.headers
    finally:
        database.dispose()


def test_oversized_and_malformed_bodies(hub: Hub) -> None:
    admin = bearer(hub.token("admin"))
    json_headers = {**admin, "Content-Type": "application/json"}
    big = b'{"name": "' + b"a" * MAX_BODY_BYTES + b'", "role": "viewer"}'
    answer = hub.client.post("/api/v1/tokens", headers=json_headers, content=big)
    assert answer.status_code == 413 and "too large" in answer.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for _ in range(3):
            yield b" " * (MAX_BODY_BYTES // 2)

    answer = hub.client.post("/api/v1/tokens", headers=json_headers, content=chunks())
    assert answer.status_code == 413

    answer = hub.client.post("/api/v1/tokens", headers=json_headers, content=b'{"name": ')
    assert answer.status_code == 422
    assert answer.json()["message"].startswith("body: JSON decode error")
    answer = hub.client.post("/api/v1/tokens", headers=json_headers, content=b"\xff\xfe{")
    assert answer.status_code in (400, 422) and "body" in answer.text  # not even text
    answer = hub.client.post("/api/v1/tokens", headers=json_headers, content=b"[1, 2]")
    assert answer.status_code == 422 and answer.json()["message"].startswith("body")
    assert len(hub.context.tokens.list()) == 1


def test_service_errors_and_unexpected_exceptions_answer_json(hub: Hub) -> None:
    raised: dict[str, Exception] = {
        "missing": NotFoundError("no rollout 'r-9'"),
        "finished": RolloutError("rollout r-1 is succeeded, not running"),
        "database": DatabaseError("cannot connect to database at 127.0.0.1:1"),
        "refused": EdgeOpsError("model has no int8 variant"),
        "bug": KeyError("secret-internal-name"),
    }

    @hub.app.get("/test-errors/{kind}")
    def fail(kind: str) -> None:
        raise raised[kind]

    client = TestClient(hub.app, raise_server_exceptions=False)
    expected = {"missing": 404, "finished": 409, "database": 503, "refused": 400}
    for kind, status in expected.items():
        answer = client.get(f"/test-errors/{kind}")
        assert answer.status_code == status, kind
        assert answer.json() == {"detail": str(raised[kind])}
    answer = client.get("/test-errors/bug")
    assert answer.status_code == 500
    assert answer.json() == {"detail": "internal error"}
    assert "secret-internal-name" not in answer.text and "Traceback" not in answer.text


def test_token_lifecycle_on_each_database(database: Database, tmp_path: Path) -> None:
    hub = make_hub(database, tmp_path)
    admin = bearer(hub.token("admin"))
    made = hub.client.post("/api/v1/tokens", headers=admin, json={"name": "pg", "role": "viewer"})
    assert made.status_code == 201
    token = made.json()["token"]
    assert hub.client.get("/api/v1/whoami", headers=bearer(token)).status_code == 200
    assert hub.client.post("/api/v1/tokens", headers=bearer(token), json={}).status_code == 403
    hub.client.delete(f"/api/v1/tokens/{made.json()['id']}", headers=admin)
    assert hub.client.get("/api/v1/whoami", headers=bearer(token)).status_code == 401


# -- edgeops tokens ----------------------------------------------------------------------------


def test_tokens_cli_create_revoke_list(
    isolated_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    created = run_cli("edgeops", "tokens", "create", "--role", "operator")
    assert created.returncode == 0, created.stderr
    token = next(w for w in created.stdout.split() if w.startswith("eo_"))
    assert "not shown again" in created.stdout
    token_id = token.split("_")[1]
    database = Database(Settings().database)
    try:
        # as a running hub would: the CLI's revocation reaches another service (another
        # process) once what that service remembers is older than remember_s (1 s; 0 here)
        tokens = TokenService(database, remember_s=0.0)
        assert tokens.authenticate(token) is not None
        assert main(["tokens", "revoke", token_id]) == 0  # in process: quicker
        assert f"revoked token {token_id}" in capsys.readouterr().out
        assert tokens.authenticate(token) is None
    finally:
        database.dispose()

    listed = run_cli("edgeops", "tokens", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["id"] == token_id and row["role"] == "operator" and row["revoked_at"]
    assert re.fullmatch(r"operator-\d{8}", row["name"])
    assert token not in listed.stdout and token.rsplit("_", 1)[1] not in listed.stdout

    # errors: one line, exit 2 for a bad role (usage), 1 for an unknown token
    capsys.readouterr()
    assert main(["tokens", "create", "--role", "root"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["edgeops: error: unknown role 'root': choose one of viewer, operator, admin"]
    assert main(["tokens", "revoke", "ffffffffffff"]) == 1
    assert capsys.readouterr().err.strip() == "edgeops: error: no API token 'ffffffffffff'"


def test_a_body_that_does_not_parse_is_refused_for_the_token_first(hub: Hub) -> None:
    hub.app.state.failure_limiter = FailureLimiter(allowed=1_000_000)
    json_type = {"Content-Type": "application/json"}
    viewer = {**bearer(hub.token("viewer")), **json_type}
    admin = {**bearer(hub.token("admin")), **json_type}
    for body in (b"\x00", b'{"name": ', b"\xff\xfe{"):
        anonymous = hub.client.post("/api/v1/tokens", headers=json_type, content=body)
        assert anonymous.status_code == 401, (body, anonymous.text)
        refused = hub.client.post("/api/v1/tokens", headers=viewer, content=body)
        assert refused.status_code == 403, (body, refused.text)
        allowed = hub.client.post("/api/v1/tokens", headers=admin, content=body)
        assert allowed.status_code in (400, 422) and "body" in allowed.text, allowed.text


def test_nan_and_infinity_in_a_body_are_refused_never_a_server_error(hub: Hub) -> None:
    """Python's JSON parser reads NaN and Infinity, which JSON cannot carry back: every
    mutating route answers them with a 4xx (a validation error that echoes the value must
    not fail to encode), and nothing is stored."""
    hub.client = TestClient(hub.app, raise_server_exceptions=False)
    admin = bearer(hub.token("admin")) | {"Content-Type": "application/json"}
    routes = [(m, p) for m, p in api_routes(hub.app) if m in MUTATING]
    bodies = [b"NaN", b'{"name": NaN, "role": "viewer"}', b'{"window_s": Infinity}']
    for method, path in routes:
        for body in bodies:
            answer = hub.client.request(method, path, headers=admin, content=body)
            assert 400 <= answer.status_code < 500, (method, path, body, answer.text)
            json.loads(answer.text)  # valid JSON: no bare NaN echoed back
    assert [t.name for t in hub.context.tokens.list()] == ["admin-test"]


def test_the_openapi_document_says_which_role_each_operation_needs(hub: Hub) -> None:
    schema = hub.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    roles = {
        (method.upper(), path): operation.get("x-edgeops-role")
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    assert roles[("GET", "/api/v1/health")] is None
    assert roles[("GET", "/api/v1/devices")] == "viewer"
    assert roles[("POST", "/api/v1/rollouts/{rollout_id}/pause")] == "operator"
    assert roles[("POST", "/api/v1/tokens")] == "admin"
    for (method, path), role in roles.items():
        if path.startswith("/api/v1/") and path != "/api/v1/health":
            assert role is not None, (method, path)
            if path.startswith("/api/v1/tokens"):
                assert role == "admin", (method, path)
            else:
                assert (role == "viewer") == (method == "GET"), (method, path, role)
            operation = schema["paths"][path][method.lower()]
            assert operation["security"] == [{"bearer": []}]


# -- the dashboard's cookie is not an API credential (CSRF) --------------------------------------


def test_the_api_refuses_the_dashboard_cookie_so_a_posted_form_cannot_act(hub: Hub) -> None:
    """A page on the same host (another port) can make the browser POST a plain HTML form
    to the API, and the browser attaches the hub's cookie: the API must not accept it."""
    hub.app.state.failure_limiter = FailureLimiter(allowed=1_000_000)
    admin = hub.token("admin")
    with_cookie = TestClient(hub.app, cookies={COOKIE: admin})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    routes = [(m, p) for m, p in api_routes(hub.app) if m in MUTATING]
    assert ("POST", "/api/v1/rollouts/x1/abort") in routes
    assert ("POST", "/api/v1/devices/x1/revoke") in routes
    for method, path in routes:
        answer = with_cookie.request(method, path, headers=form, content=b"name=x&role=admin")
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
    assert with_cookie.get("/api/v1/whoami").status_code == 401
    assert [t.name for t in hub.context.tokens.list()] == ["admin-test"]  # nothing made
    # the header still works beside the cookie, and the cookie where it is asked for
    assert with_cookie.get("/api/v1/whoami", headers=bearer(admin)).status_code == 200

    @hub.app.get("/test-page")
    def page(request: Request) -> dict[str, str]:
        return {"role": authenticate(request, cookie=True).role.value}

    assert with_cookie.get("/test-page").json() == {"role": "admin"}
    assert TestClient(hub.app).get("/test-page").status_code == 401


# -- the failure limiter stays small ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_limiter_keeps_only_failing_addresses_and_sweeps_once_a_window() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(allowed=3, window_s=60.0, clock=clock)
    for n in range(1000):
        assert limiter.retry_after(f"10.0.{n // 256}.{n % 256}") == 0.0
    assert len(limiter) == 0  # asking adds nothing

    # blocking still works, and ends with the window
    for _ in range(3):
        limiter.failed("10.9.9.9")
    assert limiter.retry_after("10.9.9.9") == 60.0
    clock.now += 45
    assert limiter.retry_after("10.9.9.9") == 15.0
    clock.now += 15
    assert limiter.retry_after("10.9.9.9") == 0.0
    assert len(limiter) == 0  # its failures all expired: forgotten

    start = clock.now
    limiter.failed("a")  # t=0 (swept at creation, 60 s ago: this one sweeps, nothing to drop)
    clock.now = start + 30
    limiter.failed("b")
    clock.now = start + 61
    limiter.failed("c")  # 61 s after the last sweep: a is dropped, b is within the window
    assert len(limiter) == 2
    clock.now = start + 95
    limiter.failed("d")  # 34 s after the last sweep: none; b is stale but stays till the next
    assert len(limiter) == 3
    clock.now = start + 121
    limiter.failed("e")  # sweep: b (t=30) and c (t=61) are a window old; d and e stay
    assert len(limiter) == 2
    assert limiter.retry_after("d") == 0.0 and limiter.retry_after("e") == 0.0


def test_failure_limiter_is_bounded_and_drops_the_address_that_failed_longest_ago() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(allowed=2, window_s=60.0, max_addresses=1000, clock=clock)
    limiter.failed("kept")
    for n in range(50_000):  # all within one window: the sweep cannot help
        limiter.failed(f"addr-{n}")
        if n % 997 == 0:
            limiter.failed("kept")  # failing again makes it the newest
        assert n > 1000 or len(limiter) <= 1000
    assert len(limiter) == 1000
    limiter.failed("kept")
    assert limiter.retry_after("kept") > 0  # still counted: it failed recently
    limiter.failed("addr-0")  # dropped long ago: starts again from one failure
    assert limiter.retry_after("addr-0") == 0.0
    limiter.failed("addr-49999")
    assert limiter.retry_after("addr-49999") > 0


# -- the token cache under concurrent requests ---------------------------------------------------


class _PausingDict(dict[tuple[str, str], tuple[Principal, float]]):
    """Runs ``during`` once, after the first key, while something iterates over it."""

    during: Callable[[], None] | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for n, key in enumerate(dict.__iter__(self)):
            yield key
            if n == 0 and self.during is not None:
                during, self.during = self.during, None
                during()


def test_revoke_while_another_request_thread_remembers_a_token(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        tokens = TokenService(database)
        first = tokens.create("first", "viewer")
        second = tokens.create("second", "viewer")[1]
        assert tokens.authenticate(first[1]) is not None
        known = _PausingDict(tokens._known)
        tokens._known = known
        outcome: list[Principal | None] = []

        def another_request() -> None:  # a request thread, while revoke looks at the cache
            thread = threading.Thread(target=lambda: outcome.append(tokens.authenticate(second)))
            thread.start()
            thread.join(0.3)  # it waits for revoke to let go of the cache (else: inserted now)

        known.during = another_request
        tokens.revoke(first[0].id)  # no "dictionary changed size during iteration"
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outcome and outcome[0] is not None and outcome[0].name == "second"
        assert tokens.authenticate(first[1]) is None
    finally:
        database.dispose()


def test_a_lookup_that_read_the_row_before_a_revocation_does_not_remember_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        tokens = TokenService(database, remember_s=3600.0)
        view, token = tokens.create("ci", "operator")
        hooks: list[Callable[[], object]] = [lambda: tokens.revoke(view.id)]

        @contextmanager
        def session() -> Iterator[Any]:
            with database.session() as opened:
                yield opened
            if hooks:  # the lookup has read the row: the revocation commits now
                hooks.pop()()

        monkeypatch.setattr(tokens, "_db", SimpleNamespace(session=session))
        in_flight = tokens.authenticate(token)
        assert in_flight is not None and not hooks  # it read the row before the revocation
        assert tokens.authenticate(token) is None  # and did not remember it
        assert tokens.list()[0].revoked_at is not None
    finally:
        database.dispose()


def test_a_revocation_reaches_another_process_within_remember_s(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    try:
        hub_process = TokenService(database, remember_s=0.3)
        cli_process = TokenService(database)
        view, token = cli_process.create("ci", "viewer")
        assert hub_process.authenticate(token) is not None
        cli_process.revoke(view.id)
        assert cli_process.authenticate(token) is None  # at once where it was revoked
        assert hub_process.authenticate(token) is not None  # remembered for remember_s
        time.sleep(0.35)
        assert hub_process.authenticate(token) is None
    finally:
        database.dispose()
