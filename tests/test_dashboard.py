"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against
the hub's app on a real uvicorn server. Data is made through the services: devices through
FleetService, a rollout through RolloutEngine, the session's digits model (and its int8
child) through the registry, a compression search as the search records it, and a drift
event from telemetry through the drift watch. Screenshots go to test-artifacts/dashboard/.

The browser is never downloaded: without /usr/bin/chromium these tests fail (``make test``
installs it).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.card import ModelCard
from device_agent.protocol import Presence, StateReport
from device_agent.sketch import ReferenceStats
from device_agent.telemetry import TelemetryWindow
from edgeops.api.context import ApiContext
from edgeops.monitor.watch import ReleaseInfo
from tests.fixtures.models import ModelFactory

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
RELEASE = "digits/2/litert/model.tflite"
OLD_TARGET = "digits/1/litert/model.tflite"
GIB = 1024**3
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


def _contract() -> dict[str, Any]:
    from edgeops.trust import build_custom

    card = ModelCard(
        model_id="m-new",
        version="2",
        name="digits",
        task="classification",
        runtime="litert",
        quantization={"mode": "none"},  # type: ignore[arg-type]
        input_spec={"name": "in", "shape": [1, 64], "dtype": "float32"},  # type: ignore[arg-type]
        output_spec={"name": "out", "shape": [1, 10], "dtype": "float32"},  # type: ignore[arg-type]
        arena_bytes=4096,
        min_agent_version="0.1.0",
        reference={"feature_edges": [], "feature_counts": [], "class_counts": [100] * 10},
    )
    return build_custom(card, "litert", {"arch": ["x86_64", "aarch64"]}, 64 * 1024**2)


def _spec() -> Any:
    from edgeops.rollout import parse_spec

    document = {
        "name": "digits-2",
        "release": RELEASE,
        "waves": {
            "canary": {"count": 2},
            "exponential": {
                "base_rate_per_minute": 2,
                "increment_factor": 2.0,
                "max_rate_per_minute": 8,
            },
        },
        "device_timeout_seconds": 120,
        "gates": {"soak_seconds": 0},
    }
    return parse_spec(json.dumps(document), "json")


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
        fleet.record_state(
            StateReport(
                device_id=device_id,
                agent_version="0.1.0",
                hardware={"arch": "aarch64", "site": site},
                slots={
                    "active": "a",
                    "a": {"target": OLD_TARGET, "model_id": "m-old"},
                    "champion": {"model_id": "m-old", "runtime": "litert"},
                },
                free_memory_bytes=GIB,
                ts=1_700_000_000.0,
            )
        )
        fleet.record_presence(Presence(device_id, online=i not in (4, 5), ts=1_700_000_001.0))


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
    rollout_id = RolloutEngine(database, None).create(_spec(), custom=_contract())
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


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Plain]:
    """An empty hub (no device, rollout, model or evaluation) behind a TestClient."""
    from fastapi.testclient import TestClient

    from edgeops.api import create_app
    from edgeops.config import Settings
    from edgeops.db import Database

    database = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    database.upgrade()
    context = ApiContext(Settings(data_dir=tmp_path), database)
    operator = context.tokens.create("ops", "operator")[1]
    viewer = context.tokens.create("watcher", "viewer")[1]
    with TestClient(create_app(context), follow_redirects=False) as client:
        yield Plain(client, context, operator, viewer)
    database.dispose()


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
    rollout_id = RolloutEngine(plain.context.database, None).create(_spec(), custom=_contract())
    _login(plain, plain.viewer)
    answer = plain.client.get("/")
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    page = answer.text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    answer = plain.client.get(f"/rollouts/{rollout_id}", params={"notice": "<b>hi</b>"})
    assert "&lt;b&gt;hi&lt;/b&gt;" in answer.text and "<b>hi</b>" not in answer.text
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
    assert answer.status_code == 303 and "not+paused" in answer.headers["location"]
    answer = plain.client.post(f"/rollouts/{rollout_id}/abort", headers=ORIGIN)
    assert answer.status_code == 303
    assert plain.context.rollouts.status(rollout_id)["status"] == "aborted"
    assert "aborted by ops from the dashboard" in plain.client.get(answer.headers["location"]).text
