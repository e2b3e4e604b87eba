"""Limits on what a request may carry: a body over ``MAX_BODY_BYTES`` is refused with 413
before any route sees it (by its ``Content-Length``; a body sent without one, chunked, is
read here first and refused as soon as it passes the limit)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1024 * 1024
"""the largest request body accepted (1 MiB; 413 above)"""


class BodySizeLimit:
    """ASGI middleware answering 413 to a request body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._refuse(send, declared)
                    return
        if any(name == b"content-length" for name, _ in scope.get("headers", [])):
            # the server delivers no more than the declared length, checked above
            await self.app(scope, receive, send)
            return
        # no Content-Length (chunked): read the body here, refusing it once it is too large;
        # the application then reads what was kept
        kept: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            kept.append(message)
            if message["type"] != "http.request":
                break  # the client went away: the application sees it too
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(send, seen)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if kept:
                return kept.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int) -> None:
        detail: dict[str, Any] = {
            "detail": f"request body too large: at most {self.max_bytes} bytes"
            + (f", got {size}" if size >= 0 else " (bad Content-Length)")
        }
        body = json.dumps(detail).encode()
        status = 413 if size >= 0 else 400
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
