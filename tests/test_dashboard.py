"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against
the hub's app on a real uvicorn server. Data is made through the services: devices through
FleetService, a rollout through RolloutEngine, the session's digits model (and its int8
child) through the registry, a compression search as the search records it, and a drift
event from telemetry through the drift watch. Screenshots go to test-artifacts/dashboard/.

The browser is never downloaded: without /usr/bin/chromium these tests fail (``make test``
installs it).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.protocol import Presence, StateReport
from device_agent.sketch import ReferenceStats
from device_agent.telemetry import TelemetryWindow
from edgeops.api.context import ApiContext
from edgeops.monitor.watch import ReleaseInfo
from tests.fixtures.models import ModelFactory
from tests.fixtures.rollouts import GIB, OLD_TARGET, contract, make_spec, old_state

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
FIELD_MODEL = "m-field"
FEATURES = 3
CLASSES = 4
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _spec() -> Any:
    return make_spec()


@dataclass
class Hub:
    url: str
    context: ApiContext
    rollout_id: str
    operator: str
    viewer: str
    keras_id: str
    int8_id: str


def _seed_devices(context: ApiContext) -> None:
    fleet = context.fleet
    for i in range(6):
        device_id = f"dev-{i:02d}"
        site = "lab" if i < 3 else "field"
        hardware = {"arch": "aarch64", "site": site}
        fleet.record_state(old_state(device_id, ts=1_700_000_000.0, hardware=hardware))
        fleet.record_presence(Presence(device_id, online=i not in (4, 5), ts=1_700_000_001.0))


def _one_device(context: ApiContext) -> None:
    """One device running the old release: enough for a rollout of :func:`_spec`."""
    context.fleet.record_state(
        StateReport(
            device_id="dev-one",
            agent_version="0.1.0",
            hardware={"arch": "aarch64"},
            slots={"active": "a", "a": {"target": OLD_TARGET, "model_id": "m-old"}},
            free_memory_bytes=GIB,
        )
    )


def _seed_search(context: ApiContext, model_id: str) -> None:
    """A compression search as edgeops.compress.search records it: a run of kind search with
    the parent model in its parameters and the Pareto front in its metrics."""
    front = [
        {"width": w, "sparsity": s, "quantization": q, "accuracy": a, "test_accuracy": a,
         "flash_bytes": f, "gzip_bytes": f // 2, "ram_bytes": r, "arena_bytes": r,
         "latency_ms": 0.1, "macs": None, "ops": [], "fits": fit, "misfits": [] if fit else
         ["flash"], "on_front": True}
        for w, s, q, a, f, r, fit in [
            (0.25, 0.0, "int8", 0.81, 6_000, 2_048, True),
            (0.5, 0.5, "int8", 0.89, 11_000, 3_072, True),
            (1.0, 0.0, "int8", 0.94, 24_000, 6_144, True),
            (1.0, 0.0, "float16", 0.95, 60_000, 12_288, False),
        ]
    ]  # fmt: skip
    params = {"model": model_id, "profile": {"name": "cortex-m4"}, "widths": [0.25, 0.5, 1.0]}
    with context.registry.start_run("search", params) as run:
        run.log_metrics({"candidates": 8, "fitting": 3, "front": front})


def _seed_drift(context: ApiContext) -> None:
    """Telemetry of model m-field shifted away from its release's reference: one drift event.
    The watch's release lookup is this test's (no TUF repository here)."""
    from edgeops.monitor.watch import DriftService

    rng = np.random.default_rng(3)
    reference = ReferenceStats.from_features(rng.normal(size=(4000, FEATURES)), bins=8)
    reference = reference.with_outputs(rng.dirichlet(np.ones(CLASSES) * 2, size=4000))

    def releases(model_id: str) -> ReleaseInfo | None:
        if model_id != FIELD_MODEL:
            return None
        return ReleaseInfo(FIELD_MODEL, "field-mlp", reference.to_dict())

    context.__dict__["drift"] = DriftService(context.database, releases)
    edges = reference.confidence_edges or []
    for i, device_id in enumerate(("dev-00", "dev-01")):
        x = rng.normal(loc=1.5, size=(300, FEATURES))
        p = rng.dirichlet(np.ones(CLASSES) * 2, size=300)
        p[:, 0] += 2.0
        p /= p.sum(axis=1, keepdims=True)
        context.telemetry.record(
            TelemetryWindow(
                device_id,
                FIELD_MODEL,
                seq=1,
                start_ts=1.0 + i,
                end_ts=2.0 + i,
                samples=300,
                feature_counts=reference.count_features(x),
                class_counts=np.bincount(p.argmax(axis=1), minlength=CLASSES).tolist(),
                confidence_counts=np.bincount(
                    np.searchsorted(edges, p.max(axis=1), side="right"), minlength=len(edges) + 1
                ).tolist(),
            )
        )
    [evaluation] = context.drift.evaluate()
    assert evaluation.verdict == "drift" and evaluation.onset


@pytest.fixture(scope="module")
def hub(
    tmp_path_factory: pytest.TempPathFactory, model_factory: ModelFactory, int8_model_dir: Path
) -> Iterator[Hub]:
    import uvicorn

    from edgeops.api import create_app
    from edgeops.config import Settings
    from edgeops.db import Database
    from edgeops.rollout.engine import RolloutEngine

    data_dir = model_factory.copy_to(tmp_path_factory.mktemp("dashboard") / "data")
    database = Database(f"sqlite:///{data_dir / 'edgeops.db'}")
    database.upgrade()
    context = ApiContext(Settings(data_dir=data_dir), database)
    _seed_devices(context)
    rollout_id = RolloutEngine(database, None).create(_spec(), custom=contract())
    models = context.registry.list_models()
    keras = next(m for m in models if m.format == "keras")
    int8 = next(m for m in models if m.parent_id == keras.id and m.name.endswith("-int8"))
    _seed_search(context, int8.id)
    _seed_drift(context)
    operator = context.tokens.create("ops", "operator")[1]
    viewer = context.tokens.create("watcher", "viewer")[1]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(context), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            time.sleep(0.025)
        assert server.started, "the hub's server did not start"
        yield Hub(
            f"http://127.0.0.1:{port}", context, rollout_id, operator, viewer, keras.id, int8.id
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        database.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (make test does, through "
            "scripts/test-services.sh); the browser tests never download one"
        )
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _page(browser: Any, hub: Hub, token: str | None) -> Any:
    """A fresh browser context's page, logged in with ``token`` through the login form."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = context.new_page()
    if token is not None:
        page.goto(f"{hub.url}/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url(f"{hub.url}/")
    return page


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_login_refuses_a_bad_token_then_shows_the_fleet(browser: Any, hub: Hub) -> None:
    page = _page(browser, hub, None)
    page.goto(f"{hub.url}/")
    assert page.url == f"{hub.url}/login"  # no cookie: to the login form
    page.fill("#token", "eo_000000000000_" + "x" * 43)
    page.click("button[type=submit]")
    assert "not a valid API token" in page.locator("[role=alert]").inner_text()
    _shot(page, "login-refused")
    page.fill("#token", hub.viewer)
    page.click("button[type=submit]")
    page.wait_for_url(f"{hub.url}/")
    assert page.locator("h1").inner_text() == "Fleet"
    assert page.locator("#count-total").inner_text() == "6"
    assert page.locator("#count-online").inner_text() == "4"
    assert page.locator("#count-offline").inner_text() == "2"
    rows = page.locator("#devices tbody tr")
    assert rows.count() == 6
    assert "offline" in rows.nth(4).inner_text() and OLD_TARGET in rows.nth(4).inner_text()
    # model versions by cohort: the site tag, two cohorts of three
    cohorts = page.locator("#cohorts tbody tr")
    assert [cohorts.nth(i).inner_text().split() for i in range(cohorts.count())] == [
        ["site=field", "3"],
        ["site=lab", "3"],
    ]
    assert page.locator(".chart svg rect").count() == 2
    _shot(page, "fleet")
    page.click("text=Log out")
    page.wait_for_url(f"{hub.url}/login")
    page.goto(f"{hub.url}/rollouts")
    assert page.url == f"{hub.url}/login"
    page.context.close()


def test_an_operator_pauses_and_resumes_a_rollout_by_clicking(browser: Any, hub: Hub) -> None:
    from playwright.sync_api import expect

    engine = hub.context.rollouts
    page = _page(browser, hub, hub.operator)
    page.click("nav >> text=Rollouts")
    row = page.locator("#rollouts tbody tr")
    assert row.count() == 1 and "running" in row.inner_text()
    _shot(page, "rollouts")
    page.click(f"text={hub.rollout_id}")
    page.wait_for_url(f"{hub.url}/rollouts/{hub.rollout_id}")
    waves = engine.status(hub.rollout_id)["waves"]
    assert page.locator("#waves tbody tr").count() == len(waves) >= 2
    assert page.locator("#waves tbody tr").first.inner_text().split()[:3] == ["0", "canary", "2"]
    assert "6 pending" in page.locator("#progress-counts").inner_text()
    assert page.locator("#rollout-status").inner_text() == "running"
    _shot(page, "rollout-running")

    page.click("#pause")
    page.wait_for_selector("#resume")
    assert page.locator("#rollout-status").inner_text() == "paused"
    assert engine.status(hub.rollout_id)["status"] == "paused"
    _shot(page, "rollout-paused")

    page.click("#resume")
    page.wait_for_selector("#pause")
    assert page.locator("#rollout-status").inner_text() == "running"
    assert engine.status(hub.rollout_id)["status"] == "running"

    # live progress: a change made elsewhere shows without a reload
    engine.pause(hub.rollout_id)
    try:
        expect(page.locator("#rollout-status")).to_have_text("paused", timeout=8_000)
        assert page.locator("#resume").count() == 1
    finally:
        engine.resume(hub.rollout_id)
    page.context.close()


def test_a_viewer_sees_no_buttons_and_a_forged_post_is_refused(browser: Any, hub: Hub) -> None:
    page = _page(browser, hub, hub.viewer)
    page.goto(f"{hub.url}/rollouts/{hub.rollout_id}")
    assert page.locator("#rollout-status").inner_text() == "running"
    assert page.locator("#pause, #resume, #abort").count() == 0
    _shot(page, "rollout-viewer")
    # the viewer's own cookie, sent from this hub's origin: still not allowed
    answer = page.context.request.post(
        f"{hub.url}/rollouts/{hub.rollout_id}/pause",
        headers={"Origin": hub.url},
        max_redirects=0,
    )
    assert answer.status == 403
    assert hub.context.rollouts.status(hub.rollout_id)["status"] == "running"
    page.context.close()

    # an operator's cookie on a request from another site: refused before anything else
    page = _page(browser, hub, hub.operator)
    answer = page.context.request.post(
        f"{hub.url}/rollouts/{hub.rollout_id}/abort",
        headers={"Origin": "http://evil.example"},
        max_redirects=0,
    )
    assert answer.status == 403
    assert hub.context.rollouts.status(hub.rollout_id)["status"] == "running"
    page.context.close()


def test_the_model_page_shows_lineage_and_the_pareto_plot(browser: Any, hub: Hub) -> None:
    page = _page(browser, hub, hub.viewer)
    page.click("nav >> text=Models")
    listed = page.locator("#models").inner_text()
    assert hub.keras_id in listed and hub.int8_id in listed
    _shot(page, "models")
    page.goto(f"{hub.url}/models/{hub.int8_id}")
    entries = page.locator("#lineage .lineage-entry")
    assert entries.count() == 2
    assert hub.int8_id in entries.nth(0).inner_text()
    assert hub.keras_id in entries.nth(1).inner_text()
    assert "digits" in entries.nth(1).inner_text()  # the parent's dataset version
    plot = page.locator(".pareto svg")
    assert plot.count() == 1
    assert plot.locator("circle").count() == 4  # every front point, RAM known
    assert page.locator("table.front tbody tr").count() == 4
    _shot(page, "model")
    page.goto(f"{hub.url}/models/{hub.keras_id}")  # no search of it or its parents
    assert "No compression search recorded" in page.locator("#no-search").inner_text()
    page.context.close()


def test_the_drift_page_shows_histograms_and_the_alarm_timeline(browser: Any, hub: Hub) -> None:
    page = _page(browser, hub, hub.viewer)
    page.click("nav >> text=Drift")
    section = page.locator("section.evaluation")
    assert section.count() == 1
    assert "drift" in section.locator(".badge").inner_text()
    figures = section.locator("figure.hist")
    assert figures.count() == 2 + FEATURES  # classes, confidence and every feature
    assert figures.locator("svg .bar-live").count() > 0
    assert figures.locator("svg .bar-ref").count() > 0
    assert section.locator("figure.hist.drifted").count() >= 1
    assert page.locator("#timeline svg circle").count() == 1
    assert "field-mlp" in page.locator("#events tbody tr").inner_text()
    _shot(page, "drift")
    page.context.close()


def test_live_polling_with_a_revoked_token_goes_to_the_login_page(browser: Any, hub: Hub) -> None:
    view, token = hub.context.tokens.create("short-lived", "viewer")
    page = _page(browser, hub, token)
    page.goto(f"{hub.url}/rollouts/{hub.rollout_id}")
    assert page.locator("#rollout-status").inner_text() == "running"
    hub.context.tokens.revoke(view.id)
    page.wait_for_url(f"{hub.url}/login", timeout=8_000)  # the next poll's 401
    cookies = [c["name"] for c in page.context.cookies()]
    assert "edgeops_token" not in cookies  # the live endpoint cleared it
    page.context.close()


def test_live_polling_stops_on_429(browser: Any, hub: Hub) -> None:
    """A limited address gets no more polls from the page: one request, then a note."""
    page = _page(browser, hub, hub.viewer)
    polls: list[str] = []

    def limited(route: Any) -> None:
        polls.append(route.request.url)
        route.fulfill(status=429, body="too many failed authentications")

    page.route("**/live", limited)
    page.clock.install()
    page.goto(f"{hub.url}/rollouts/{hub.rollout_id}")
    page.clock.run_for(2_500)
    page.wait_for_selector("#live-stopped", timeout=5_000)
    assert "HTTP 429" in page.locator("#live-stopped").inner_text()
    page.clock.run_for(120_000)  # two minutes of page time: no retry
    page.wait_for_timeout(300)
    assert len(polls) == 1
    assert page.url == f"{hub.url}/rollouts/{hub.rollout_id}"
    page.context.close()


# -- without a browser: the same app through FastAPI's TestClient ------------------------------


def test_the_api_docs_render_from_files_the_hub_serves(browser: Any, hub: Hub) -> None:
    """/docs is Swagger UI on /openapi.json; its script and stylesheet come from the hub
    itself, so the page works without internet access (any other request is refused)."""
    page = _page(browser, hub, None)
    elsewhere: list[str] = []

    def only_this_hub(route: Any) -> None:
        if route.request.url.startswith(hub.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_hub)
    page.goto(f"{hub.url}/docs")
    page.wait_for_selector(".opblock-tag", timeout=15_000)
    tags = page.locator(".opblock-tag").all_inner_texts()
    assert any("rollouts" in tag for tag in tags) and any("devices" in tag for tag in tags)
    assert page.locator(".opblock").count() >= 30
    assert elsewhere == []
    _shot(page, "api-docs")
    page.context.close()


@dataclass
class Plain:
    client: Any
    context: ApiContext
    operator: str
    viewer: str


ORIGIN = {"Origin": "http://testserver"}


@contextlib.contextmanager
def _plain_hub(
    tmp_path: Path, base_url: str = "http://testserver", **settings: Any
) -> Iterator[Plain]:
    """An empty hub (no device, rollout, model or evaluation) behind a TestClient."""
    from fastapi.testclient import TestClient

    from edgeops.api import create_app
    from edgeops.config import Settings
    from edgeops.db import Database

    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    context = ApiContext(Settings(data_dir=tmp_path, **settings), database)
    operator = context.tokens.create("ops", "operator")[1]
    viewer = context.tokens.create("watcher", "viewer")[1]
    try:
        with TestClient(create_app(context), base_url=base_url, follow_redirects=False) as client:
            yield Plain(client, context, operator, viewer)
    finally:
        database.dispose()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Plain]:
    with _plain_hub(tmp_path) as hub:
        yield hub


def _login(plain: Plain, token: str) -> None:
    answer = plain.client.post(
        "/login", content=f"token={token}", headers={**ORIGIN, "Content-Type": _FORM}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie


_FORM = "application/x-www-form-urlencoded"


def test_pages_without_a_token_go_to_the_login_form_and_count_no_failure(plain: Plain) -> None:
    for path in ("/", "/rollouts", "/rollouts/r-1", "/models", "/models/x:1", "/drift"):
        answer = plain.client.get(path)
        assert (answer.status_code, answer.headers["location"]) == (303, "/login"), path
    assert plain.client.get("/login").status_code == 200
    # twelve visits without a token are no failed authentications: a login still works
    _login(plain, plain.viewer)
    assert plain.client.get("/").status_code == 200


def test_every_page_of_an_empty_hub_says_so_in_a_sentence(plain: Plain) -> None:
    _login(plain, plain.viewer)
    expected = {
        "/": "No device has reported to this hub yet",
        "/rollouts": "No rollout yet",
        "/models": "No model is registered yet",
        "/drift": "No drift evaluation yet",
    }
    for path, sentence in expected.items():
        answer = plain.client.get(path)
        assert answer.status_code == 200, path
        assert sentence in answer.text, path
    assert "No drift event recorded" in plain.client.get("/drift").text
    for path in ("/rollouts/r-nothing", "/models/nothing:1", "/models/m-000000000000",
                 "/models/a:99999999999999999999999", "/models/a@nostage"):  # fmt: skip
        answer = plain.client.get(path)
        assert answer.status_code == 404, path
        assert "not found" in answer.text.lower() or "unknown" in answer.text.lower(), path


def test_failed_logins_are_rate_limited_with_the_api(plain: Plain) -> None:
    for _ in range(10):
        answer = plain.client.post(
            "/login", content="token=eo_nope", headers={**ORIGIN, "Content-Type": _FORM}
        )
        assert answer.status_code == 401
        assert "not a valid API token" in answer.text
    answer = plain.client.post(
        "/login", content=f"token={plain.viewer}", headers={**ORIGIN, "Content-Type": _FORM}
    )
    assert answer.status_code == 429 and "set-cookie" not in answer.headers
    # the API shares the limiter
    api = plain.client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {plain.viewer}"})
    assert api.status_code == 429


def test_forms_from_another_site_or_without_an_origin_are_refused(plain: Plain) -> None:
    for headers in ({}, {"Origin": "http://evil.example"}, {"Referer": "http://evil.example/x"}):
        answer = plain.client.post(
            "/login", content=f"token={plain.operator}", headers={**headers, "Content-Type": _FORM}
        )
        assert answer.status_code == 403 and "set-cookie" not in answer.headers
    answer = plain.client.post(
        "/login",
        content=f"token={plain.operator}",
        headers={"Referer": "http://testserver/login", "Content-Type": _FORM},
    )
    assert answer.status_code == 303
    # logged in as an operator, but the action comes from elsewhere
    answer = plain.client.post("/rollouts/r-1/pause", headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403
    # same origin: an unknown rollout is a 404 page, an unknown action a 404
    assert plain.client.post("/rollouts/r-1/pause", headers=ORIGIN).status_code == 404
    assert plain.client.post("/rollouts/r-1/explode", headers=ORIGIN).status_code == 404
    # logging out clears the cookie; the next page goes to the login form
    answer = plain.client.post("/logout", headers=ORIGIN)
    assert answer.status_code == 303 and 'edgeops_token=""' in answer.headers["set-cookie"]
    plain.client.cookies.clear()
    assert plain.client.get("/").headers["location"] == "/login"


def test_what_the_pages_show_is_escaped_and_served_from_this_hub(plain: Plain) -> None:
    from edgeops.rollout.engine import RolloutEngine

    plain.context.fleet.record_state(
        StateReport(
            device_id="dev-x",
            agent_version="0.1.0",
            hardware={"arch": "aarch64", "site": "<script>alert(1)</script>"},
            slots={"active": "a", "a": {"target": OLD_TARGET, "model_id": "m-old"}},
            free_memory_bytes=GIB,
        )
    )
    rollout_id = RolloutEngine(plain.context.database, None).create(_spec(), custom=contract())
    _login(plain, plain.viewer)
    answer = plain.client.get("/")
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    page = answer.text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    answer = plain.client.get(f"/rollouts/{rollout_id}")
    assert 'id="pause"' not in answer.text  # a viewer gets no buttons
    # the live fragment the page polls
    live = plain.client.get(f"/rollouts/{rollout_id}/live")
    assert live.status_code == 200 and 'id="rollout-status"' in live.text
    # nothing from another host: every src/href is a path of this hub
    for path in ("/", f"/rollouts/{rollout_id}", "/drift", "/models", "/login"):
        text = plain.client.get(path).text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
    css = plain.client.get("/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "url(" not in css.text and "@import" not in css.text
    assert plain.client.get("/static/dashboard.js").status_code == 200
    assert plain.client.get("/static/..%2Fapp.py").status_code == 404
    # a viewer's forged pause is 403 and changes nothing; an operator's works
    assert plain.client.post(f"/rollouts/{rollout_id}/pause", headers=ORIGIN).status_code == 403
    assert plain.context.rollouts.status(rollout_id)["status"] == "running"
    _login(plain, plain.operator)
    answer = plain.client.post(f"/rollouts/{rollout_id}/resume", headers=ORIGIN)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/rollouts/{rollout_id}?done=resume-refused"
    assert (
        "Not resumed: the rollout is not paused."
        in plain.client.get(answer.headers["location"]).text
    )
    answer = plain.client.post(f"/rollouts/{rollout_id}/abort", headers=ORIGIN)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/rollouts/{rollout_id}?done=aborted"
    assert plain.context.rollouts.status(rollout_id)["status"] == "aborted"
    text = plain.client.get(answer.headers["location"]).text
    assert "aborted by ops from the dashboard" in text
    assert "Aborted: every device the rollout reached gets its previous release back." in text


def test_the_rollout_page_shows_only_fixed_sentences_from_its_address(plain: Plain) -> None:
    """``?done=`` picks one of the fixed sentences; no text of the address reaches the page."""
    from edgeops.api.dashboard import DONE
    from edgeops.rollout.engine import RolloutEngine

    _one_device(plain.context)
    rollout_id = RolloutEngine(plain.context.database, None).create(_spec(), custom=contract())
    _login(plain, plain.operator)
    answer = plain.client.post(f"/rollouts/{rollout_id}/pause", headers=ORIGIN)
    assert answer.headers["location"] == f"/rollouts/{rollout_id}?done=paused"
    page = plain.client.get(answer.headers["location"]).text
    assert f'id="notice">{DONE["paused"]}</p>' in page
    for params in (
        {"notice": "Your session expired: log in at evil.example"},
        {"done": "Your session expired: log in at evil.example"},
        {"done": "<b>hi</b>"},
        {"done": ""},
    ):
        page = plain.client.get(f"/rollouts/{rollout_id}", params=params).text
        assert 'id="notice"' not in page, params
        assert "evil.example" not in page and "hi</b>" not in page, params


# -- behind a reverse proxy: public_url ----------------------------------------------------------

PUBLIC = "https://hub.example.com"
PROXIED = {"Host": "127.0.0.1:8000", "Content-Type": _FORM}
"""nginx's default: the request reaches the hub with the upstream's address as its Host"""


def test_public_url_must_be_an_http_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from edgeops.config import Settings

    assert Settings(public_url="https://Hub.Example.com/").public_url == PUBLIC
    assert Settings(public_url="https://hub.example.com:443").public_url == PUBLIC
    assert Settings(public_url="http://hub:8080").public_url == "http://hub:8080"
    assert Settings(public_url="").public_url is None
    monkeypatch.setenv("EDGEOPS_PUBLIC_URL", "https://hub.example.com")
    assert Settings().public_url == PUBLIC
    bad_values = ["ftp://hub", "hub.example.com", "https://", "https://hub/edgeops"]
    bad_values += ["https://hub/?a=1", "https://hub#x", "https://user@hub", "https://hub:99999"]
    for bad in bad_values:
        with pytest.raises(ValidationError, match="public_url"):
            Settings(public_url=bad)


def test_behind_a_proxy_forms_must_come_from_the_public_url(tmp_path: Path) -> None:
    from edgeops.rollout.engine import RolloutEngine

    with _plain_hub(tmp_path, public_url=PUBLIC) as hub:
        login = {"content": f"token={hub.operator}"}
        for source in ({"Origin": PUBLIC}, {"Origin": f"{PUBLIC}:443"},
                       {"Referer": f"{PUBLIC}/login?x=1"}):  # fmt: skip
            answer = hub.client.post("/login", **login, headers={**PROXIED, **source})
            assert answer.status_code == 303, source
            cookie = answer.headers["set-cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie  # https public address
        # the Host header no longer decides; another scheme, host or port is another origin
        for source in ({"Origin": "http://127.0.0.1:8000"}, {"Origin": "http://hub.example.com"},
                       {"Origin": f"{PUBLIC}:8443"}, {"Origin": "https://evil.example"},
                       {"Referer": "https://hub.example.com.evil.example/"}, {}):  # fmt: skip
            answer = hub.client.post("/login", **login, headers={**PROXIED, **source})
            assert answer.status_code == 403 and "set-cookie" not in answer.headers, source
        answer = hub.client.post(
            "/login", **login, headers={"Origin": "http://testserver", "Content-Type": _FORM}
        )
        assert answer.status_code == 403
        # a rollout action and logging out from the public address work
        _one_device(hub.context)
        rollout_id = RolloutEngine(hub.context.database, None).create(_spec(), custom=contract())
        bearer = {"Authorization": f"Bearer {hub.operator}"}
        answer = hub.client.post(
            f"/rollouts/{rollout_id}/pause", headers={**PROXIED, **bearer, "Origin": PUBLIC}
        )
        assert answer.status_code == 303
        assert hub.context.rollouts.status(rollout_id)["status"] == "paused"
        answer = hub.client.post("/logout", headers={**PROXIED, "Origin": PUBLIC})
        assert answer.status_code == 303
        assert 'edgeops_token=""' in answer.headers["set-cookie"]
        assert "Secure" in answer.headers["set-cookie"]


def test_without_public_url_the_host_header_decides_and_https_makes_the_cookie_secure(
    tmp_path: Path,
) -> None:
    with _plain_hub(tmp_path / "a") as hub:
        login = {"content": f"token={hub.operator}"}
        answer = hub.client.post("/login", **login, headers={**PROXIED, "Origin": PUBLIC})
        assert answer.status_code == 403  # Origin and Host differ
        answer = hub.client.post("/login", **login, headers={**ORIGIN, "Content-Type": _FORM})
        assert answer.status_code == 303 and "Secure" not in answer.headers["set-cookie"]
    with _plain_hub(tmp_path / "b", base_url="https://testserver") as hub:
        answer = hub.client.post(
            "/login",
            content=f"token={hub.operator}",
            headers={"Origin": "https://testserver", "Content-Type": _FORM},
        )
        assert answer.status_code == 303 and "Secure" in answer.headers["set-cookie"]
    with _plain_hub(tmp_path / "c", public_url="http://hub.example.com") as hub:
        answer = hub.client.post(
            "/login",
            content=f"token={hub.operator}",
            headers={**PROXIED, "Origin": "http://hub.example.com"},
        )
        assert answer.status_code == 303 and "Secure" not in answer.headers["set-cookie"]


# -- live polling --------------------------------------------------------------------------------


def test_live_polls_with_a_revoked_token_clear_the_cookie_and_are_not_rate_limited(
    plain: Plain,
) -> None:
    from edgeops.rollout.engine import RolloutEngine

    _one_device(plain.context)
    rollout_id = RolloutEngine(plain.context.database, None).create(_spec(), custom=contract())
    view, token = plain.context.tokens.create("short-lived", "viewer")
    _login(plain, token)
    assert plain.client.get(f"/rollouts/{rollout_id}/live").status_code == 200
    plain.context.tokens.revoke(view.id)
    answer = plain.client.get(f"/rollouts/{rollout_id}/live")
    assert answer.status_code == 401
    assert 'edgeops_token=""' in answer.headers["set-cookie"]
    assert "edgeops_token" not in plain.client.cookies
    # a page that keeps polling sends no token any more: no failed authentication counted
    for _ in range(15):
        assert plain.client.get(f"/rollouts/{rollout_id}/live").status_code == 401
    _login(plain, plain.viewer)
    assert (
        plain.client.get(
            "/api/v1/whoami", headers={"Authorization": f"Bearer {plain.viewer}"}
        ).status_code
        == 200
    )


# -- charts with degenerate data -----------------------------------------------------------------


def _svg_ok(markup: str) -> ET.Element:
    root = ET.fromstring(str(markup))
    assert root.tag.endswith("svg")
    assert re.search(r"\b(nan|inf)\b|j\)", str(markup).lower()) is None
    return root


def _point(flash: Any, accuracy: Any, ram: Any) -> dict[str, Any]:
    return {"flash_bytes": flash, "accuracy": accuracy, "ram_bytes": ram, "fits": True,
            "width": 1.0, "sparsity": 0.0, "quantization": "int8"}  # fmt: skip


def test_the_pareto_plot_draws_degenerate_fronts() -> None:
    from edgeops.api.dashboard import charts

    circles = ".//{http://www.w3.org/2000/svg}circle"
    cases = {
        "every RAM 0": [_point(6_000, 0.8, 0), _point(9_000, 0.9, 0)],
        "one point": [_point(6_000, 0.8, 2_048)],
        "equal sizes and accuracies": [_point(6_000, 0.8, 1), _point(6_000, 0.8, 2)],
        "size 0": [_point(0, 0.5, 0)],
        "size -5": [_point(-5, 0.5, 0)],
        "large accuracy": [_point(1, 1e12, 0)],
        "large sizes": [_point(1e15, 0.5, 1), _point(-1e15, 0.6, 1)],
        "negative RAM": [_point(6_000, 0.8, -4), _point(7_000, 0.9, 0)],
    }
    for name, points in cases.items():
        root = _svg_ok(charts.pareto_plot(points, label=name))
        assert len(root.findall(circles)) == len(points), name
    # not numbers, not finite, or booleans: left out; nothing left: a sentence
    odd = [_point(float("nan"), 0.5, 0), _point(float("inf"), 0.5, 0), _point(True, 0.5, 0),
           _point("6000", 0.5, 0), _point(6_000, None, 0), _point(1e308, 0.5, 0),
           _point(1, 1e20, 0)]  # fmt: skip
    for nothing in (odd, []):
        drawn = charts.pareto_plot(nothing)
        _svg_ok(drawn)
        assert "no candidates with size and accuracy" in drawn
    root = _svg_ok(charts.pareto_plot([_point(6_000, 0.8, float("nan")), _point(7_000, 0.9, 5)]))
    assert len(root.findall(circles)) == 1  # unknown RAM: a hollow square
    assert len(root.findall(".//{http://www.w3.org/2000/svg}rect[@width='10']")) == 1


def test_the_other_charts_draw_empty_and_zero_data() -> None:
    from edgeops.api.dashboard import charts

    for reference, live in (([], None), ([], []), ([0, 0, 0], [0, 0]), ([3, 1], None),
                            ([float("nan"), -1, 2], [float("inf"), 1])):  # fmt: skip
        _svg_ok(charts.histogram_pair(reference, live, label="h"))
    _svg_ok(charts.stacked_bars([], [], label="nothing"))
    _svg_ok(charts.stacked_bars([("a", {}), ("b", {"x": 0})], ["x"], label="zeros"))
    _svg_ok(charts.stacked_bars([("a", {"x": -3, "y": 2})], ["x", "y"], label="negative"))
    when = datetime(2026, 1, 1, tzinfo=UTC)
    _svg_ok(charts.timeline([], label="none"))
    _svg_ok(charts.timeline([(when, "one", "dot-drift")], label="one"))
    _svg_ok(charts.timeline([(when, "a", "dot-drift"), (when, "b", "dot-drift")], label="same"))
