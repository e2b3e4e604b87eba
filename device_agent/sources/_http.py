"""The HTTP source: ``POST /v1/predict`` and ``GET /v1/health`` on localhost."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from device_agent.sources._base import (
    DEFAULT_MAX_PENDING,
    DEFAULT_REPLY_TIMEOUT_S,
    BadSampleError,
    Reply,
    Sample,
    Source,
    SourceError,
    parse_sample,
    without_status,
)

log = logging.getLogger(__name__)

MAX_HTTP_BODY_BYTES = 1024 * 1024


class _Pending:
    """One HTTP request's wait for the daemon's answers."""

    def __init__(self, expected: int) -> None:
        self.answers: list[dict[str, Any] | None] = [None] * expected
        self._left = expected
        self._lock = threading.Lock()
        self.done = threading.Event()

    def replier(self, index: int) -> Reply:
        def reply(document: dict[str, Any]) -> None:
            with self._lock:
                if self.answers[index] is None:
                    self.answers[index] = document
                    self._left -= 1
                if self._left == 0:
                    self.done.set()

        return reply


class HttpSource(Source):
    """``POST /v1/predict`` and ``GET /v1/health`` on ``host:port`` (localhost by default).

    A request holds ``{"inputs": [...]}`` (one sample, answered with one prediction) or
    ``{"instances": [[...], ...]}`` (answered with ``{"predictions": [...]}``). Request
    threads queue the samples and wait up to ``reply_timeout_s`` for the daemon's answers
    (503 otherwise). Malformed requests get 400 with ``{"error": "..."}``. ``port=0`` picks a
    free port (see :attr:`port`). ``health`` adds fields to the health answer.
    """

    kind = "http"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        input_shape: Sequence[int] = (),
        *,
        reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        health: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(input_shape)
        self.reply_timeout_s = reply_timeout_s
        self._health = health
        self._queue: queue.Queue[Sample] = queue.Queue(maxsize=max_pending)
        self._waiting: set[_Pending] = set()
        self._waiting_lock = threading.Lock()
        handler = type("Handler", (_PredictHandler,), {"source": self})
        try:
            self._server = _Server((host, port), handler)
        except OSError as exc:
            raise SourceError(f"http source cannot listen on {host}:{port}: {exc}") from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name=f"http-source-{self.port}",
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def poll(self, timeout_s: float | None = None) -> Sample | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._closed.is_set():
            remaining = 0.25 if deadline is None else deadline - time.monotonic()
            try:
                return self._queue.get(timeout=max(0.0, min(0.25, remaining)))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
        return None

    def close(self) -> None:
        if self._closed.is_set():
            return
        super().close()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
        with self._waiting_lock:
            waiting = list(self._waiting)
        for pending in waiting:
            for index in range(len(pending.answers)):
                pending.replier(index)({"error": "the agent is shutting down", "status": 503})

    def health(self) -> dict[str, Any]:
        errors = dict(self.errors)
        document: dict[str, Any] = {
            "status": "ok",
            "pending": self._queue.qsize(),
            "errors": errors,
        }
        if self._health is not None:
            try:
                document.update(self._health())
            except Exception as exc:  # noqa: BLE001 - the caller's hook must not kill the server
                document["status"] = f"health hook failed: {exc}"
        return document

    def submit(self, raws: list[np.ndarray]) -> tuple[int, dict[str, Any] | list[Any]]:
        """Queue samples, wait for their answers; (HTTP status, answers)."""
        pending = _Pending(len(raws))
        with self._waiting_lock:
            self._waiting.add(pending)
        try:
            for index, raw in enumerate(raws):
                try:
                    self._queue.put_nowait(Sample(raw, reply=pending.replier(index)))
                except queue.Full:
                    message = self._reject(
                        BadSampleError("overload", "too many requests waiting; retry later"), ""
                    )
                    return HTTPStatus.SERVICE_UNAVAILABLE, {"error": message}
            if not pending.done.wait(self.reply_timeout_s):
                message = self._reject(
                    BadSampleError("timeout", f"no answer within {self.reply_timeout_s:g} s"), ""
                )
                return HTTPStatus.SERVICE_UNAVAILABLE, {"error": message}
        finally:
            with self._waiting_lock:
                self._waiting.discard(pending)
        return HTTPStatus.OK, [a for a in pending.answers if a is not None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer is logged, not printed as a traceback."""
        log.debug("http source: connection from %s failed", client_address, exc_info=True)


class _PredictHandler(BaseHTTPRequestHandler):
    source: HttpSource
    protocol_version = "HTTP/1.1"
    timeout = 30.0  # seconds an idle keep-alive connection may hold its thread
    server_version = "edgeops-agent"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http source: " + format, *args)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/v1/health":
            self._send(HTTPStatus.OK, self.source.health())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/v1/predict":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
            return
        source = self.source
        try:
            raws, single = self._read_samples()
        except BadSampleError as exc:
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if exc.kind == "too_large" else 400
            self._send(status, {"error": source._reject(exc, "")})
            return
        status, answers = source.submit(raws)
        if isinstance(answers, dict):
            self._send(status, answers)
        elif single:
            answer = dict(answers[0])
            code = answer.pop("status", 400) if "error" in answer else HTTPStatus.OK
            valid = isinstance(code, int) and not isinstance(code, bool) and 200 <= code < 600
            self._send(int(code) if valid else 400, answer)
        else:
            self._send(status, {"predictions": [without_status(a) for a in answers]})

    def _read_samples(self) -> tuple[list[np.ndarray], bool]:
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            raise BadSampleError("parse", "the request needs a Content-Length header")
        if length > MAX_HTTP_BODY_BYTES:
            self.close_connection = True
            if length <= 16 * MAX_HTTP_BODY_BYTES:  # read it, so the client sees the answer
                left = length
                while left > 0 and (chunk := self.rfile.read(min(65536, left))):
                    left -= len(chunk)
            raise BadSampleError(
                "too_large", f"request body of {length} bytes exceeds {MAX_HTTP_BODY_BYTES}"
            )
        body = self.rfile.read(length)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise BadSampleError("parse", f"the body is not valid JSON: {exc}") from None
        shape = self.source.input_shape
        if isinstance(document, dict) and "inputs" in document:
            try:
                return [parse_sample(document["inputs"], shape)], True
            except BadSampleError as exc:
                raise BadSampleError(exc.kind, f"inputs: {exc}") from None
        if isinstance(document, dict) and isinstance(document.get("instances"), list):
            raws = []
            for index, values in enumerate(document["instances"]):
                try:
                    raws.append(parse_sample(values, shape))
                except BadSampleError as exc:
                    raise BadSampleError(exc.kind, f"instances[{index}]: {exc}") from None
            if not raws:
                raise BadSampleError("shape", "instances: the list is empty")
            return raws, False
        raise BadSampleError(
            "parse", 'expected a JSON object {"inputs": [...]} or {"instances": [[...], ...]}'
        )

    def _send(self, status: int, document: dict[str, Any]) -> None:
        try:
            body = json.dumps(document, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:  # e.g. NaN from a broken model
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            body = json.dumps({"error": f"the answer cannot be sent as JSON: {exc}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
