"""The hub's HTTP API, served by ``edgeops hub serve``: the fleet view and the TUF repository.

``GET /v1/tuf/metadata/{name}`` and ``GET /v1/tuf/targets/{path}`` serve the release
repository's files byte for byte to devices that use the HTTP transport (the same files the
MQTT fetch server reads). ``Range: bytes=N-`` / ``bytes=N-M`` / ``bytes=-K`` is honoured with
``206 Partial Content`` and ``Content-Range``; an unsatisfiable range is ``416``; a missing
file, or a path that is not a plain relative path under the repository (``..``, symbolic
links), is ``404``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from device_agent._version import __version__
from device_agent.errors import ProtocolError
from edgeops.errors import NotFoundError
from edgeops.fleet import FleetService

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def create_app(fleet: FleetService, *, repository_dir: Path | None = None) -> FastAPI:
    """Build the application; routes call the same services the CLI calls.

    ``repository_dir`` is the release repository's ``repository/`` directory
    (``Settings.trust_dir / "repository"``); without it the TUF routes answer 404.
    """
    app = FastAPI(title="EdgeOps hub", version=__version__, openapi_url="/openapi.json")

    @app.get("/api/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/api/v1/devices")
    def list_devices() -> list[dict[str, Any]]:
        return [device.to_dict() for device in fleet.list_devices()]

    @app.get("/api/v1/devices/{device_id}")
    def get_device(device_id: str) -> dict[str, Any]:
        try:
            return fleet.get_device(device_id).to_dict()
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    @app.get("/v1/tuf/metadata/{name}")
    def tuf_metadata(name: str, request: Request) -> Response:
        return _serve_file(repository_dir, f"metadata/{name}", request, "application/json")

    @app.get("/v1/tuf/targets/{path:path}")
    def tuf_target(path: str, request: Request) -> Response:
        return _serve_file(repository_dir, f"targets/{path}", request, "application/octet-stream")

    return app


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
