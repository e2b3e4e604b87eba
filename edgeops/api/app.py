"""The hub's HTTP API, served by ``edgeops hub serve``: REST under ``/api/v1``, the dashboard
at ``/``, Prometheus metrics at ``/metrics`` and the TUF repository for devices.

Every ``/api/v1`` route needs an API token (:mod:`edgeops.api.auth`): a viewer reads, an
operator or admin changes things. Routes call the same services the CLI calls
(:class:`edgeops.api.context.ApiContext`); the services own the transactions. Errors are JSON
``{"detail": ...}``: 4xx for what the caller sent (naming the field), 404 for unknown ids,
413 for bodies over ``MAX_BODY_BYTES``.

``GET /v1/tuf/metadata/{name}`` and ``GET /v1/tuf/targets/{path}`` serve the release
repository's files byte for byte to devices that use the HTTP transport (the same files the
MQTT fetch server reads); they need no token, as TUF metadata is signed and public.
``Range: bytes=N-`` / ``bytes=N-M`` / ``bytes=-K`` is honoured with ``206 Partial Content``
and ``Content-Range``; an unsatisfiable range is ``416``; a missing file, or a path that is
not a plain relative path under the repository (``..``, symbolic links), is ``404``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from device_agent._version import __version__
from device_agent.errors import ProtocolError
from edgeops.api.auth import FailureLimiter, Principal, viewer
from edgeops.api.context import ApiContext
from edgeops.api.errors import install_error_handlers
from edgeops.api.limits import MAX_BODY_BYTES, BodySizeLimit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
API_PREFIX = "/api/v1"


def create_app(context: ApiContext, *, repository_dir: Path | None = None) -> FastAPI:
    """Build the application on ``context``'s services.

    ``repository_dir`` is the release repository's ``repository/`` directory; by default
    ``context.settings.trust_dir / "repository"`` (the TUF routes answer 404 while it has
    no files).
    """
    from edgeops.api.dashboard import router as dashboard_router
    from edgeops.api.metrics import install_metrics
    from edgeops.api.routes import ROUTERS, tokens

    if repository_dir is None:
        repository_dir = context.settings.trust_dir / "repository"
    app = FastAPI(
        title="EdgeOps hub",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url=None,  # served below from files shipped in a package, not from a CDN
        redoc_url=None,
        description="The EdgeOps hub: datasets, runs, models, releases, devices, rollouts, "
        "telemetry, drift and pipelines. Authenticate with `Authorization: Bearer <token>` "
        "(`edgeops tokens create --role viewer|operator|admin`).",
    )
    app.state.context = context
    app.state.failure_limiter = FailureLimiter()
    install_error_handlers(app)
    if context.settings.api_cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(context.settings.api_cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    install_metrics(app, context)  # added last: its timing middleware wraps all the others

    @app.get(f"{API_PREFIX}/health", tags=["hub"])
    def health() -> dict[str, Any]:
        """Liveness: answers without a token."""
        return {"status": "ok", "version": __version__}

    @app.get(f"{API_PREFIX}/whoami", tags=["hub"])
    def whoami(principal: Annotated[Principal, Depends(viewer)]) -> dict[str, Any]:
        """The token's holder and role."""
        return {"token_id": principal.token_id, "name": principal.name, "role": principal.role}

    for router in [*ROUTERS, tokens.router]:
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(dashboard_router)
    _install_docs(app)
    _declare_tokens(app)

    @app.get("/v1/tuf/metadata/{name}", tags=["tuf"])
    def tuf_metadata(name: str, request: Request) -> Response:
        return _serve_file(repository_dir, f"metadata/{name}", request, "application/json")

    @app.get("/v1/tuf/targets/{path:path}", tags=["tuf"])
    def tuf_target(path: str, request: Request) -> Response:
        return _serve_file(repository_dir, f"targets/{path}", request, "application/octet-stream")

    return app


def _declare_tokens(app: FastAPI) -> None:
    """Say in the OpenAPI document which operations need a token, and which role: a
    ``bearer`` security scheme, and on each such operation ``security`` and an
    ``x-edgeops-role`` (Swagger UI then offers its Authorize button)."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute, iter_route_contexts

    from edgeops.api.auth import required_role

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API token: edgeops tokens create --role viewer|operator|admin",
            }
        }
        for context in iter_route_contexts(app.routes):
            route = context.original_route
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            role = required_role(route)
            if role is None:
                continue
            for method in route.methods or ():
                operation = schema["paths"].get(context.path_format, {}).get(method.lower())
                if operation is not None:
                    operation["security"] = [{"bearer": []}]
                    operation["x-edgeops-role"] = role.value
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


DOCS_STATIC = "/docs-static"


def _install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI on ``/openapi.json``, its script and stylesheet served by the hub
    from the ``fastapi-offline`` package (the hub works without internet access)."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="EdgeOps hub API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
        )


def _serve_file(
    repository_dir: Path | None, path: str, request: Request, media_type: str
) -> Response:
    from edgeops.trust.files import RepositoryFileNotFoundError, iter_range, open_file

    if repository_dir is None:
        raise HTTPException(status_code=404, detail="no release repository on this hub")
    try:
        fd = open_file(repository_dir, path)
    except (ProtocolError, RepositoryFileNotFoundError, FileNotFoundError):
        raise HTTPException(status_code=404, detail=f"no file {path}") from None
    except OSError:
        raise HTTPException(status_code=500, detail=f"cannot read {path}") from None
    try:
        total = os.fstat(fd).st_size
        wanted = _parse_range(request.headers.get("range"), total)
    except BaseException:
        os.close(fd)
        raise
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
    if wanted is None:
        headers["Content-Length"] = str(total)
        return StreamingResponse(
            iter_range(fd, 0, total), status_code=200, media_type=media_type, headers=headers
        )
    start, end = wanted
    if start >= total:
        os.close(fd)
        return Response(
            status_code=416, headers={"Content-Range": f"bytes */{total}", "Accept-Ranges": "bytes"}
        )
    headers["Content-Range"] = f"bytes {start}-{end}/{total}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        iter_range(fd, start, end - start + 1),
        status_code=206,
        media_type=media_type,
        headers=headers,
    )


def _parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The inclusive byte range a single-range ``Range`` header asks for, clipped to the file;
    None to serve the whole file (no header, or one this server does not honour). A start at
    or past the end is returned as is (the caller answers 416)."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None  # several ranges or another unit: RFC 9110 lets us send the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # bytes=-K: the last K bytes
        suffix = int(last)
        if suffix == 0:
            return (total, total)
        return (max(0, total - suffix), total - 1) if total else (0, 0)
    start = int(first)
    end = total - 1 if not last else min(int(last), total - 1)
    if last and int(last) < start:
        return None
    return (start, end)
