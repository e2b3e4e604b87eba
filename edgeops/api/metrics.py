"""Prometheus metrics of the hub at ``GET /metrics`` (text exposition format, no token).

Each application has its own :class:`prometheus_client.CollectorRegistry`
(``app.state.metrics_registry``), never the process-wide default one.

Measured as requests are answered (a pure ASGI middleware around the whole application):

``edgeops_http_requests_total{method, route, status}``
    requests answered; ``route`` is the route's template (``/api/v1/devices/{device_id}``),
    never the raw path, and ``<unmatched>`` for paths no route serves; ``method`` is ``other``
    for methods outside GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS.
``edgeops_http_request_duration_seconds{method, route, status}``
    histogram of the time from the request's arrival to the end of its answer.

Read from the database through the services at each scrape (a few grouped counts):

``edgeops_telemetry_windows_total``
    telemetry windows stored (Prometheus derives the ingest rate from it:
    ``rate(edgeops_telemetry_windows_total[5m])``).
``edgeops_telemetry_windows_last_minute``
    windows the hub received in the last 60 s.
``edgeops_devices{presence}``
    devices ``online`` and ``offline`` as their presence last said.
``edgeops_rollouts{status}``
    rollouts by status (``running``, ``paused``, ``aborted``, ``succeeded``, ``failed``).
``edgeops_rollout_current_wave{rollout, name, status}``
    the current wave's index of each running or paused rollout.
``edgeops_rollout_wave_state{rollout, wave, state}``
    1 for the state of each wave of a running or paused rollout (``pending``, ``running``,
    ``soaking``, ``passed`` ...).
``edgeops_rollout_gate_passed{rollout, wave, gate}``
    1 or 0: each quality gate evaluated for a wave of a running or paused rollout.
``edgeops_rollout_devices{rollout, status}``
    the devices of a running or paused rollout by their status in it.
``edgeops_drift_alarms_total{model}``
    drift events (onsets) by model id.
``edgeops_models_drifting``
    model ids whose newest evaluation says ``drift`` in at least one cohort.
``edgeops_metrics_database_up``
    1 if the scrape could read the database, else 0 (and the database metrics are missing).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Mount, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeops.api.context import ApiContext
from edgeops.db.types import utcnow

__all__ = ["CONTENT_TYPE", "HubCollector", "RequestMetrics", "install_metrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "<unmatched>"
RECENT_S = 60.0
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_ACTIVE = ("running", "paused")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RouteEntry = tuple[re.Pattern[str], str, frozenset[str] | None]
"""a route's path regex, its template and its methods (None: any)"""


def install_metrics(app: FastAPI, context: ApiContext) -> None:
    """Serve ``/metrics`` from a registry of this application's own, and time every request.

    The timing middleware is added here; middleware added after this call wraps it (and its
    answers, 413 for an oversized body for instance, are not counted)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HubCollector(context))
    requests = Counter(
        "edgeops_http_requests",
        "HTTP requests answered, by method, route template and status",
        ("method", "route", "status"),
        registry=registry,
    )
    duration = Histogram(
        "edgeops_http_request_duration_seconds",
        "time from a request's arrival to the end of its answer",
        ("method", "route", "status"),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetrics, requests=requests, duration=duration)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """The hub's metrics in Prometheus' text format (no token: counts only)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)


class RequestMetrics:
    """ASGI middleware counting and timing HTTP requests by method, route template and status."""

    def __init__(self, app: ASGIApp, requests: Counter, duration: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.duration = duration
        self._table: list[RouteEntry] | None = None
        self._table_key = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            elapsed = time.perf_counter() - started
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "other"  # bounded label values
            labels = (method, self._route_of(scope), str(status))
            self.requests.labels(*labels).inc()
            self.duration.labels(*labels).observe(elapsed)

    def _route_of(self, scope: Scope) -> str:
        """The template of the route ``scope``'s path and method take (the path's template if
        only the method differs; ``<unmatched>`` if none), also for answers given before
        routing (413, CORS preflight)."""
        app = scope.get("app")
        routes: list[BaseRoute] = list(getattr(app, "routes", ()))
        if self._table is None or self._table_key != len(routes):
            self._table = _route_table(routes)
            self._table_key = len(routes)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        partial: str | None = None
        for pattern, template, methods in self._table:
            if pattern.fullmatch(path):
                if methods is None or method in methods:
                    return template
                partial = partial or template
        return partial or UNMATCHED


def _route_table(
    routes: list[BaseRoute],
) -> list[RouteEntry]:
    """(path regex, template, methods or None for any) of every route, included routers'
    routes with their prefixes, in matching order."""
    from fastapi.routing import iter_route_contexts

    table: list[RouteEntry] = []
    for context in iter_route_contexts(routes):
        template = context.path
        if not isinstance(template, str):
            continue
        route = context.original_route
        if isinstance(route, Mount):
            template = template.rstrip("/") + "/{path:path}"
        regex, _, _ = compile_path(template)
        methods = getattr(route, "methods", None)
        table.append((regex, template, frozenset(methods) if methods else None))
    return table


class HubCollector(Collector):
    """Reads the fleet, telemetry, rollout and drift figures at each scrape."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context

    def describe(self) -> Iterable[Metric]:
        return []  # collected from the database at scrape time only

    def collect(self) -> Iterator[Metric]:
        metrics: list[Metric] = []
        try:
            metrics = list(self._collect())
        except Exception:  # a scrape must answer even without a database
            log.warning("metrics: cannot read the database", exc_info=True)
            metrics = []
        up = GaugeMetricFamily(
            "edgeops_metrics_database_up", "1 if this scrape could read the database, else 0"
        )
        up.add_metric([], 1 if metrics else 0)
        yield up
        yield from metrics

    def _collect(self) -> Iterator[Metric]:
        ctx = self.context
        total, recent = ctx.telemetry.count_received(utcnow() - timedelta(seconds=RECENT_S))
        windows = CounterMetricFamily(
            "edgeops_telemetry_windows", "telemetry windows stored (derive the ingest rate)"
        )
        windows.add_metric([], total)
        yield windows
        last_minute = GaugeMetricFamily(
            "edgeops_telemetry_windows_last_minute", "telemetry windows received in the last 60 s"
        )
        last_minute.add_metric([], recent)
        yield last_minute

        devices = GaugeMetricFamily(
            "edgeops_devices", "devices by presence, as last reported", labels=["presence"]
        )
        for presence, count in sorted(ctx.fleet.count_by_presence().items()):
            devices.add_metric([presence], count)
        yield devices

        yield from self._rollouts()

        alarms = CounterMetricFamily(
            "edgeops_drift_alarms", "drift events (onsets) by model id", labels=["model"]
        )
        for model_id, count in sorted(ctx.drift.event_counts().items()):
            alarms.add_metric([model_id], count)
        yield alarms
        drifting = GaugeMetricFamily(
            "edgeops_models_drifting",
            "model ids whose newest evaluation says drift in at least one cohort",
        )
        drifting.add_metric([], len(ctx.drift.drifting_models()))
        yield drifting

    def _rollouts(self) -> Iterator[Metric]:
        from edgeops.errors import NotFoundError
        from edgeops.rollout.models import ROLLOUT_STATUSES

        engine = self.context.rollouts
        rollouts = engine.list_rollouts()
        by_status = GaugeMetricFamily("edgeops_rollouts", "rollouts by status", labels=["status"])
        counts = dict.fromkeys(ROLLOUT_STATUSES, 0)
        for rollout in rollouts:
            counts[rollout["status"]] = counts.get(rollout["status"], 0) + 1
        for name, count in counts.items():
            by_status.add_metric([name], count)
        yield by_status

        current = GaugeMetricFamily(
            "edgeops_rollout_current_wave",
            "current wave index of each running or paused rollout",
            labels=["rollout", "name", "status"],
        )
        wave_state = GaugeMetricFamily(
            "edgeops_rollout_wave_state",
            "1 for the state of each wave of a running or paused rollout",
            labels=["rollout", "wave", "state"],
        )
        gates = GaugeMetricFamily(
            "edgeops_rollout_gate_passed",
            "1 if the gate passed, 0 if not, for each evaluated wave of an active rollout",
            labels=["rollout", "wave", "gate"],
        )
        devices = GaugeMetricFamily(
            "edgeops_rollout_devices",
            "devices of a running or paused rollout by their status in it",
            labels=["rollout", "status"],
        )
        for rollout in rollouts:
            if rollout["status"] not in _ACTIVE:
                continue
            try:
                detail: dict[str, Any] = engine.status(rollout["id"])
            except NotFoundError:
                continue  # deleted between the two reads
            rollout_id = str(detail["id"])
            current.add_metric(
                [rollout_id, str(detail["name"]), str(detail["status"])], detail["current_wave"]
            )
            for wave in detail["waves"]:
                index = str(wave["index"])
                wave_state.add_metric([rollout_id, index, str(wave["state"])], 1)
                for gate in wave.get("gates") or []:
                    gates.add_metric(
                        [rollout_id, index, str(gate["name"])], 1 if gate["passed"] else 0
                    )
            for device_status, count in detail["counts"].items():
                devices.add_metric([rollout_id, str(device_status)], count)
        yield current
        yield wave_state
        yield gates
        yield devices
