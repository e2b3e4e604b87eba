"""The hub's dashboard: server-rendered pages at ``/``, working offline.

Pages (every one needs an API token, any role; without one the browser is sent to ``/login``):

* ``/`` the fleet: devices online and offline, every device with the model it runs and its
  tags, and the model versions each cohort runs (``?by=<tag>`` picks the tag);
* ``/rollouts`` and ``/rollouts/{id}``: waves, gates, progress (refreshed every 2 s from
  ``/rollouts/{id}/live``), and Pause / Resume / Abort for operators and admins;
* ``/models`` and ``/models/{ref}``: lineage and the compression search's Pareto front;
* ``/drift``: per release and cohort, the newest evaluation's histograms, reference against
  live, and the timeline of drift events.

Every page calls the services on :class:`edgeops.api.context.ApiContext`, as the API's routes
do. ``POST /login`` takes an API token and keeps it in the ``edgeops_token`` cookie (HttpOnly,
SameSite=Strict; Secure when the request came over https or the ``public_url`` setting is an
https address), which :func:`edgeops.api.auth.authenticate` also reads; failed logins count
against the same per-address limiter as the API's failed authentications. Every form POST
must come from a page of this hub: its ``Origin``, else its ``Referer``, must be the
``public_url`` setting's origin when that is set, else name the request's ``Host``. With the
SameSite=Strict cookie, that refuses cross-site requests. The HTML is Jinja2 with
autoescaping; the stylesheet and the few lines of JavaScript are files of this package,
charts are inline SVG drawn by :mod:`edgeops.api.dashboard.charts`: nothing is fetched from
another host.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from edgeops.api.auth import COOKIE, Principal, Role, authenticate
from edgeops.api.dashboard import charts
from edgeops.errors import EdgeOpsError, NotFoundError

if TYPE_CHECKING:
    from edgeops.api.auth import FailureLimiter
    from edgeops.api.context import ApiContext
    from edgeops.monitor.models import DriftEvaluationView

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_HERE = Path(__file__).parent
_STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
DEVICE_ROWS = 500
"""devices listed on the overview page at most (the counts cover all)"""
FEATURE_CHARTS = 16
"""feature histograms drawn per evaluation at most (the drifted ones first)"""
ACTIVE = ("running", "paused")
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # this hub only: no other host is ever contacted, and no inline script runs
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
}

_env = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return "—"
    if value < 1024:
        return f"{value:.0f} B"
    if value < 1024**2:
        return f"{value / 1024:.1f} KiB"
    return f"{value / 1024**2:.2f} MiB"


_env.filters["when"] = _when
_env.filters["bytes"] = _bytes
_env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)


# -- who is asking -----------------------------------------------------------------------------


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _render(
    request: Request,
    template: str,
    who: Principal | None,
    *,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    html = _env.get_template(template).render(
        who=who,
        can_operate=who is not None and who.role.allows(Role.OPERATOR),
        path=request.url.path,
        **values,
    )
    return HTMLResponse(
        html,
        status_code=status_code,
        headers=_HEADERS,
    )


def _public_url(request: Request) -> str | None:
    return _context(request).settings.public_url


def _secure(request: Request) -> bool:
    """Whether the session cookie is Secure: the request came over https, or the hub's
    public address (behind a proxy that ends TLS) is an https one."""
    return request.url.scheme == "https" or (_public_url(request) or "").startswith("https://")


def _forget_token(request: Request, response: Response) -> Response:
    """Clear the session cookie (same attributes as when it was set)."""
    response.delete_cookie(
        COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


def _login_redirect() -> RedirectResponse:
    return RedirectResponse("/login", status_code=303)


def _who(request: Request) -> Principal | Response:
    """The holder of the request's token, or the answer to give instead: a redirect to the
    login page (no token, or one that is not valid), 429 after too many failures."""
    if COOKIE not in request.cookies and "authorization" not in request.headers:
        return _login_redirect()  # nobody tried: not a failed authentication
    try:
        return authenticate(request, cookie=True)
    except HTTPException as exc:
        if exc.status_code == 429:
            return _render(
                request,
                "error.html",
                None,
                status_code=429,
                title="Too many attempts",
                message=str(exc.detail),
            )
        return _forget_token(request, _login_redirect())


def _origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL, lower case, without the scheme's default
    port (as browsers write ``Origin``); None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def _same_origin(request: Request) -> bool:
    """True if the request's ``Origin`` (else ``Referer``) is this hub: the origin of the
    ``public_url`` setting when it is set (the hub behind a reverse proxy), else the host the
    request names in its ``Host`` header."""
    source = request.headers.get("origin")
    if not source or source == "null":
        source = request.headers.get("referer")
    if not source:
        return False
    public = _public_url(request)
    if public is not None:
        return _origin(source) == public
    host = request.headers.get("host")
    if not host:
        return False
    return urllib.parse.urlsplit(source).netloc.lower() == host.lower()


def _forbidden(request: Request, who: Principal | None, message: str) -> HTMLResponse:
    return _render(request, "error.html", who, status_code=403, title="Forbidden", message=message)


def _not_found(request: Request, who: Principal, message: str) -> HTMLResponse:
    return _render(request, "error.html", who, status_code=404, title="Not found", message=message)


async def _form(request: Request) -> dict[str, str]:
    """The fields of a urlencoded form body (first value of each)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}


# -- static files and login ----------------------------------------------------------------------


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The dashboard's stylesheet and script."""
    media_type = _STATIC.get(name)
    if media_type is None:
        raise HTTPException(404, detail=f"no static file {name}")
    return Response(
        (_HERE / "static" / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "max-age=300"},
    )


@router.get("/login")
def login_page(request: Request) -> Response:
    return _render(request, "login.html", None, error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the pasted token; keep it in the session cookie and go to the fleet page."""
    if not _same_origin(request):
        return _forbidden(request, None, "Log in from this hub's own login page.")
    limiter: FailureLimiter = request.app.state.failure_limiter
    client = _client(request)
    wait = limiter.retry_after(client)
    if wait > 0:
        return _render(
            request,
            "login.html",
            None,
            status_code=429,
            error=f"Too many failed attempts from this address; try again in "
            f"{max(1, round(wait))} s.",
        )
    token = (await _form(request)).get("token", "").strip()
    principal = _context(request).tokens.authenticate(token) if token else None
    if principal is None:
        limiter.failed(client)
        return _render(
            request,
            "login.html",
            None,
            status_code=401,
            error="That is not a valid API token.",
        )
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        path="/",
        secure=_secure(request),
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if not _same_origin(request):
        return _forbidden(request, None, "Log out from this hub's own pages.")
    return _forget_token(request, _login_redirect())


# -- the fleet -----------------------------------------------------------------------------------


def _model_label(device: Any) -> str:
    from edgeops.rollout.plan import current_model_of, current_target_of

    return current_target_of(device) or current_model_of(device) or "(none)"


@router.get("/")
def overview(request: Request, by: str | None = None) -> Response:
    """The fleet: counts, devices, and model versions by cohort."""
    from edgeops.rollout.plan import current_model_of

    who = _who(request)
    if isinstance(who, Response):
        return who
    devices = _context(request).fleet.list_devices()
    keys = sorted({k for d in devices for k in (*d.tags, *d.hardware)})
    if by is None or by not in keys:
        by = next((k for k in ("cohort", "site", "arch") if k in keys), keys[0] if keys else "")
    cohorts: dict[str, Counter[str]] = {}
    for device in devices:
        value = device.tags.get(by, device.hardware.get(by)) if by else None
        cohort = f"{by}={value}" if value is not None else f"{by}=(none)" if by else "all"
        cohorts.setdefault(cohort, Counter())[_model_label(device)] += 1
    series = [label for label, _ in sum(cohorts.values(), Counter()).most_common()]
    rows = [
        {
            "device_id": d.device_id,
            "online": d.online,
            "target": _model_label(d),
            "model_id": current_model_of(d),
            "tags": {**d.hardware, **d.tags},
            "agent_version": d.agent_version,
            "update_state": d.update_state,
            "last_seen": d.last_seen,
        }
        for d in devices[:DEVICE_ROWS]
    ]
    cohort_rows = sorted(cohorts.items())
    return _render(
        request,
        "overview.html",
        who,
        total=len(devices),
        online=sum(1 for d in devices if d.online),
        devices=rows,
        shown=min(len(devices), DEVICE_ROWS),
        by=by,
        keys=keys,
        series=series,
        cohorts=[(name, dict(counts)) for name, counts in cohort_rows],
        chart=charts.stacked_bars(
            [(name, dict(counts)) for name, counts in cohort_rows],
            series,
            label=f"model versions by {by or 'fleet'}",
        )
        if devices
        else None,
    )


# -- rollouts ------------------------------------------------------------------------------------


@router.get("/rollouts")
def rollouts(request: Request) -> Response:
    who = _who(request)
    if isinstance(who, Response):
        return who
    listed = _context(request).rollouts.list_rollouts()
    return _render(request, "rollouts.html", who, rollouts=listed)


def _progress(status: Mapping[str, Any]) -> dict[str, Any]:
    counts: Mapping[str, int] = status["counts"]
    succeeded = counts.get("succeeded", 0)
    failed = counts.get("failed", 0) + counts.get("timed_out", 0) + counts.get("rolled_back", 0)
    targeted = counts.get("targeted", 0)
    pending = counts.get("pending", 0)
    total = succeeded + failed + targeted + pending

    def pct(n: int) -> float:
        return round(100.0 * n / total, 2) if total else 0.0

    return {
        "total": total,
        "succeeded": succeeded,
        "failed": failed,
        "targeted": targeted,
        "pending": pending,
        "excluded": counts.get("excluded", 0),
        "pct": {
            "succeeded": pct(succeeded),
            "failed": pct(failed),
            "targeted": pct(targeted),
            "pending": pct(pending),
        },
    }


def _rollout_values(request: Request, rollout_id: str) -> dict[str, Any]:
    status = _context(request).rollouts.status(rollout_id)
    return {"r": status, "progress": _progress(status), "active": status["status"] in ACTIVE}


DONE: dict[str, str] = {
    "paused": "Paused: no further device is updated until the rollout is resumed.",
    "resumed": "Resumed: the rollout continues with its current wave.",
    "aborted": "Aborted: every device the rollout reached gets its previous release back.",
    "pause-refused": "Not paused: the rollout is not running.",
    "resume-refused": "Not resumed: the rollout is not paused.",
    "abort-refused": "Not aborted: the rollout has already ended.",
}
"""what ``/rollouts/{id}?done=CODE`` shows after an action; the page shows no other text from
its address, and nothing for an unknown code"""


@router.get("/rollouts/{rollout_id}")
def rollout(request: Request, rollout_id: str, done: str | None = None) -> Response:
    """One rollout: waves, gates, progress, and the operator's buttons."""
    who = _who(request)
    if isinstance(who, Response):
        return who
    try:
        values = _rollout_values(request, rollout_id)
    except NotFoundError as exc:
        return _not_found(request, who, str(exc))
    return _render(request, "rollout.html", who, notice=DONE.get(done or ""), **values)


@router.get("/rollouts/{rollout_id}/live")
def rollout_live(request: Request, rollout_id: str) -> Response:
    """The live part of the rollout page (status, progress, waves, buttons), as HTML.
    Without a valid token: 401, and the session cookie is cleared, so that a page still
    polling counts one failed authentication, not one per poll; 429 while limited."""
    who = _who(request)
    if isinstance(who, Response):
        if who.status_code == 429:
            return Response("too many failed authentications", status_code=429)
        return _forget_token(request, Response("log in again", status_code=401))
    try:
        values = _rollout_values(request, rollout_id)
    except NotFoundError as exc:
        return Response(str(exc), status_code=404)
    return _render(request, "_rollout_live.html", who, **values)


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(request: Request, rollout_id: str, action: str) -> Response:
    """Pause, resume or abort a rollout (operator or admin), then back to its page."""
    from edgeops.rollout.engine import RolloutError

    if action not in ("pause", "resume", "abort"):
        raise HTTPException(404, detail=f"no action {action!r}: pause, resume or abort")
    if not _same_origin(request):
        return _forbidden(request, None, "This form must be sent from this hub's own pages.")
    who = _who(request)
    if isinstance(who, Response):
        return who
    if not who.role.allows(Role.OPERATOR):
        return _forbidden(
            request, who, f"{action.capitalize()} needs the operator role; you are {who.role}."
        )
    engine = _context(request).rollouts
    try:
        if action == "pause":
            engine.pause(rollout_id)
            done = "paused"
        elif action == "resume":
            engine.resume(rollout_id)
            done = "resumed"
        else:
            engine.abort(rollout_id, f"aborted by {who.name} from the dashboard")
            done = "aborted"
    except NotFoundError as exc:
        return _not_found(request, who, str(exc))
    except RolloutError:
        done = f"{action}-refused"
    target = f"/rollouts/{urllib.parse.quote(rollout_id, safe='')}?done={done}"
    return RedirectResponse(target, status_code=303)


# -- models --------------------------------------------------------------------------------------


@router.get("/models")
def models(request: Request) -> Response:
    who = _who(request)
    if isinstance(who, Response):
        return who
    return _render(request, "models.html", who, models=_context(request).registry.list_models())


def _search_runs(request: Request, model_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The recorded compression searches of any model in ``model_ids``, newest first."""
    found = []
    for run in reversed(_context(request).registry.list_runs(kind="search")):
        front = run.metrics.get("front")
        if run.params.get("model") in model_ids and isinstance(front, list) and front:
            profile = run.params.get("profile")
            found.append(
                {
                    "id": run.id,
                    "model": run.params.get("model"),
                    "profile": profile.get("name") if isinstance(profile, Mapping) else None,
                    "started_at": run.started_at,
                    "candidates": run.metrics.get("candidates"),
                    "fitting": run.metrics.get("fitting"),
                    "front": [p for p in front if isinstance(p, Mapping)],
                    "plot": charts.pareto_plot(
                        [p for p in front if isinstance(p, Mapping)],
                        label=f"Pareto front of search {run.id}",
                    ),
                }
            )
    return found


@router.get("/models/{ref:path}")
def model(request: Request, ref: str) -> Response:
    """A model version: its lineage and its compression search's Pareto front."""
    who = _who(request)
    if isinstance(who, Response):
        return who
    try:
        chain = _context(request).registry.lineage(ref)
    except EdgeOpsError as exc:
        return _not_found(request, who, str(exc))
    return _render(
        request,
        "model.html",
        who,
        model=chain[0],
        chain=chain,
        searches=_search_runs(request, [m.id for m in chain]),
    )


# -- drift ---------------------------------------------------------------------------------------


def _histograms(request: Request, evaluation: DriftEvaluationView) -> dict[str, Any]:
    """Reference against live histograms of one evaluation, as charts."""
    from device_agent.sketch import ReferenceStats, SketchError

    drift = _context(request).drift
    try:
        release = drift.release(evaluation.model_id)
    except EdgeOpsError:
        release = None
    if release is None:
        return {"charts": [], "note": "No release of this model is known: no reference to show."}
    try:
        reference = ReferenceStats.from_dict(release.reference)
    except (SketchError, TypeError, ValueError, KeyError):
        return {"charts": [], "note": "The release's card holds no readable reference."}
    live = drift.live(evaluation)
    drifted = set(evaluation.report.get("drifted_features") or []) | set(
        evaluation.report.get("drifted_outputs") or []
    )
    psi: Mapping[str, float] = evaluation.report.get("psi") or {}
    names = reference.feature_names
    items: list[tuple[str, Sequence[int], Sequence[int] | None]] = []
    if reference.class_counts:
        items.append(("classes", reference.class_counts, live.class_counts if live else None))
    if reference.confidence_counts:
        items.append(
            ("confidence", reference.confidence_counts, live.confidence_counts if live else None)
        )
    features = []
    for f, counts in enumerate(reference.feature_counts):
        target = f"feature:{names[f]}" if names is not None and f < len(names) else f"feature:{f}"
        live_counts = (
            live.feature_counts[f] if live is not None and f < len(live.feature_counts) else None
        )
        features.append((target, counts, live_counts))
    features.sort(key=lambda item: (item[0] not in drifted, -psi.get(item[0], 0.0)))
    shown = features[:FEATURE_CHARTS]
    items.extend(shown)
    drawn = [
        {
            "target": target,
            "drifted": target in drifted,
            "psi": psi.get(target),
            "svg": charts.histogram_pair(ref, live_counts, label=target),
        }
        for target, ref, live_counts in items
    ]
    note = None
    if live is None:
        note = "The telemetry of this evaluation is no longer stored: reference only."
    elif len(features) > len(shown):
        note = (
            f"{len(features) - len(shown)} more features not drawn "
            "(the drifted ones and the highest PSI come first)."
        )
    return {"charts": drawn, "note": note}


@router.get("/drift")
def drift(request: Request, model: str | None = None) -> Response:
    """The newest evaluation of every release and cohort, and the drift events."""
    who = _who(request)
    if isinstance(who, Response):
        return who
    watch = _context(request).drift
    evaluations = watch.status(model or None)
    events = watch.events(model or None, limit=200)
    sections = [{"e": e, **_histograms(request, e)} for e in evaluations]
    return _render(
        request,
        "drift.html",
        who,
        model=model,
        sections=sections,
        events=events,
        timeline=charts.timeline(
            [
                (e.evaluated_at, f"{e.model_name or e.model_id} {e.cohort}", "dot-drift")
                for e in events
            ],
            label="drift events",
        )
        if events
        else None,
    )
