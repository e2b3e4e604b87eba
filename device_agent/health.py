"""The local health endpoint: the agent's health document over HTTP on localhost.

``GET /health`` (or ``/v1/health``) answers the document the given callable returns, as
JSON; ``GET /metrics`` answers the same document as Prometheus metrics (text exposition
format 0.0.4, written here: the agent does not depend on prometheus-client, see
:func:`render_metrics`); any other path is a 404. The server runs on its own daemon threads
and only reads.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["METRICS_CONTENT_TYPE", "HealthEndpoint", "render_metrics"]

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/health", "/v1/health")
METRICS_PATH = "/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _go_float(value: float) -> str:
    """``value`` written as Go (and prometheus-client) write a sample value: ``+Inf``,
    ``-Inf``, ``NaN``; an exponent once there are more than six digits before the point."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


class _Exposition:
    """Prometheus text format 0.0.4, one family at a time, written as prometheus-client's
    ``generate_latest`` writes it: a counter's ``# HELP`` and ``# TYPE`` name its samples'
    name, ``..._total``; labels sorted by name; values as Go formats them. (The
    ``_created`` samples prometheus-client adds to its own counters are left out: the
    agent does not keep when each counter started.)"""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        """A family of ``kind`` ``counter`` (``name`` gets ``_total``) or ``gauge``."""
        if not samples:
            return
        sample_name = f"{name}_total" if kind == "counter" else name
        self.lines.append(f"# HELP {sample_name} {_help(help_text)}")
        self.lines.append(f"# TYPE {sample_name} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{key}="{_escape(labels[key])}"' for key in sorted(labels))
            self.lines.append(
                f"{sample_name}{{{shown}}} {_go_float(value)}"
                if shown
                else f"{sample_name} {_go_float(value)}"
            )

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def render_metrics(doc: dict[str, Any]) -> str:
    """The health document as Prometheus metrics; a field missing from ``doc`` (or not a
    number) leaves its metric out.

    ``edgeops_agent_info{device_id, agent_version}`` 1; ``edgeops_agent_connected`` 1 while
    the status is ``connected``; ``edgeops_agent_inferences_total`` (samples run through the
    model); ``edgeops_agent_errors_total{kind}``; ``edgeops_agent_windows_total`` (telemetry
    windows closed); ``edgeops_agent_buffer_pending`` (windows waiting in the offline
    buffer); ``edgeops_agent_buffer_dropped_total`` (windows the full buffer dropped);
    ``edgeops_agent_dropped_messages_total{channel}`` (malformed messages from the hub);
    ``edgeops_agent_update_state{state}`` 1 for the updater's state;
    ``edgeops_agent_model_error`` and ``edgeops_agent_source_error`` (1 while there is one);
    ``edgeops_agent_health_timestamp_seconds`` (when the document was written); and, when the
    document carries ``latency_ms`` (``p50``/``p95``/``p99`` in ms),
    ``edgeops_agent_latency_seconds{quantile}``.
    """
    out = _Exposition()
    device = {"device_id": str(doc.get("device_id", ""))}
    out.family(
        "edgeops_agent_info",
        "gauge",
        "the agent's device id and version",
        [({**device, "agent_version": str(doc.get("agent_version", ""))}, 1.0)],
    )
    if isinstance(doc.get("status"), str):
        out.family(
            "edgeops_agent_connected",
            "gauge",
            "1 while the agent is connected to the broker",
            [({}, 1.0 if doc["status"] == "connected" else 0.0)],
        )

    def single(key: str, name: str, kind: str, help_text: str) -> None:
        value = _number(doc.get(key))
        if value is not None:
            out.family(name, kind, help_text, [({}, value)])

    def by_label(key: str, label: str, name: str, help_text: str) -> None:
        values = doc.get(key)
        if isinstance(values, dict):
            samples = [
                ({label: str(k)}, number)
                for k, v in sorted(values.items())
                if (number := _number(v)) is not None
            ]
            out.family(name, "counter", help_text, samples)

    single("samples", "edgeops_agent_inferences", "counter", "samples run through the model")
    by_label("errors", "kind", "edgeops_agent_errors", "errors by kind since the agent started")
    single("windows", "edgeops_agent_windows", "counter", "telemetry windows closed")
    single(
        "buffer_pending", "edgeops_agent_buffer_pending", "gauge", "windows in the offline buffer"
    )
    single(
        "buffer_dropped_total",
        "edgeops_agent_buffer_dropped",
        "counter",
        "windows the full offline buffer dropped",
    )
    by_label(
        "dropped_messages",
        "channel",
        "edgeops_agent_dropped_messages",
        "malformed messages from the hub dropped, by channel",
    )
    if isinstance(doc.get("update_state"), str):
        out.family(
            "edgeops_agent_update_state",
            "gauge",
            "1 for the updater's current state",
            [({"state": doc["update_state"]}, 1.0)],
        )
    for key in ("model_error", "source_error"):
        if key in doc:
            out.family(
                f"edgeops_agent_{key}",
                "gauge",
                f"1 while there is a {key.replace('_', ' ')}",
                [({}, 1.0 if doc[key] else 0.0)],
            )
    single("ts", "edgeops_agent_health_timestamp_seconds", "gauge", "when the document was written")
    latency = doc.get("latency_ms")
    if isinstance(latency, dict):
        samples = [
            ({"quantile": quantile}, value / 1000.0)
            for key, quantile in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
            if (value := _number(latency.get(key))) is not None
        ]
        out.family(
            "edgeops_agent_latency_seconds",
            "gauge",
            "inference latency quantiles of the last telemetry window",
            samples,
        )
    return out.text()


class HealthEndpoint:
    """Serves ``snapshot()`` on ``http://127.0.0.1:<port>/health`` (port 0: any free one)."""

    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], port: int, host: str = "127.0.0.1"
    ) -> None:
        self.snapshot = snapshot
        self.host = host
        self.requested_port = port
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int | None:
        """The port it listens on once started, else None."""
        return self._server.server_address[1] if self._server else None

    def start(self) -> None:
        """Bind and serve on a daemon thread (an ``OSError`` if the port is taken)."""
        snapshot = self.snapshot

        class HealthHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == METRICS_PATH:
                    text = render_metrics(snapshot()).encode()
                    self._reply(200, text, METRICS_CONTENT_TYPE)
                    return
                if path not in HEALTH_PATHS:
                    self._send(404, {"error": f"no such path {self.path!r}; try /health"})
                    return
                self._send(200, snapshot())

            def _send(self, status: int, body: dict[str, Any]) -> None:
                self._reply(status, json.dumps(body, sort_keys=True).encode(), "application/json")

            def _reply(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health endpoint: " + format, *args)

        server = ThreadingHTTPServer((self.host, self.requested_port), HealthHandler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="agent-health", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        """Stop serving and close the socket (nothing if it never started)."""
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
