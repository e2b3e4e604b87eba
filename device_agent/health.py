"""The local health endpoint: the agent's health document over HTTP on localhost.

``GET /health`` (or ``/v1/health``) answers the document the given callable returns, as
JSON; any other path is a 404. The server runs on its own daemon threads and only reads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HealthEndpoint"]

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/health", "/v1/health")


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
                if self.path.split("?")[0] not in HEALTH_PATHS:
                    self._send(404, {"error": f"no such path {self.path!r}; try /health"})
                    return
                self._send(200, snapshot())

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, sort_keys=True).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
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
